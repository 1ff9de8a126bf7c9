"""The main job on the bundled default, the paper's cross-domain LM experiment in miniature (CPU, minutes).

A small GPT-2 pre-trained on four bundled domains (recipes/demo_pretrain.py made it) is fine-tuned on one of
them (jargon, the Jargon File) with adam, asam and tram-prev over 5 seeds, each rule at the radius setting a
sweep selected on validation (SELECTED below), then evaluated on all four: the training domain, two related ones
(wordnet: dictionary glosses; python-manual: computing prose) and a distant one (bible: the World English Bible).
Prints the per-domain table (mean ± std and the 95% confidence interval over seeds) and draws Figure 2 and the
training curves (loss, d, radius, ‖e‖) into runs/demo/report/.

    python recipes/demo.py                                   # everything, into runs/demo/ (~13 min on 2 cores)
    python recipes/demo.py --seeds 1 --rules adam,tram-prev trainer.max_steps=50
    python recipes/demo.py --smoke                           # a cut-down setting, into runs/demo-smoke/ (tests)
    python recipes/demo.py --analyse                         # + ε-sharpness and CKA of every run (Table 6)

The sweep that chose SELECTED (20 runs, ~19 min on 2 cores; its tables and figure land in runs/demo-sweep/sweep/):

    fabric-tram sweep recipes/demo.py optimizer.name=adam,asam,tram-prev asam:optimizer.rho=0.1,0.5,2.0 \
        tram-prev:optimizer.radius_target=0.1,0.5,2.0 tram-prev:optimizer.radius_transform=linear,sqrt \
        trainer.seed=0,1 --out runs/demo-sweep

Run folders that already hold results are reused when they hold the same run (their config.yaml equals what
this command would train; otherwise it stops and says what differs), and an interrupted run continues from its
newest checkpoint (checkpoints every 60 steps), so a rerun of an interrupted demo continues where it stopped.
The first row of the table is the pre-trained model itself, evaluated like the runs, before any fine-tuning.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fabric_tram.analysis.results import report
from fabric_tram.cli import reported_errors, train_job
from fabric_tram.config import dump_yaml, merge, parse_overrides, resolve
from fabric_tram.config_compare import refuse_another_run
from fabric_tram.engine.evaluation import evaluate
from fabric_tram.engine.setup import setup
from fabric_tram.jsonfile import write_json

RULES = ["adam", "asam", "tram-prev"]
# Each rule's radius setting, as the sweep in the docstring selected it on in-domain validation loss (grids of the
# same size: asam's rho, tram-prev's radius_target and radius_transform; 2 seeds per setting).
SELECTED = {
    "asam": {"rho": 0.1},
    "tram-prev": {"radius_target": 0.1, "radius_transform": "linear"},
}
RECIPE = {
    "model": {"name": "gpt2", "pretrained": "bundled:demo-gpt2", "dropout": 0.1},
    "task": {"name": "lm", "data_dir": "demo", "tokenizer": "demo", "block_size": 128, "train_domains": ["jargon"]},
    "optimizer": {"name": "adam", "lr": 5e-4, "betas": [0.9, 0.99]},
    "schedule": {"name": "polynomial", "warmup_steps": 12},
    "trainer": {
        "max_steps": 120,
        "micro_batch_size": 8,
        "precision": "32-true",
        "eval_splits": ["validation", "test"],
        "eval_batches": 0,
        "save_every": 60,
        "progress_bar": False,
    },
}
SMOKE = {"trainer": {"max_steps": 3, "eval_batches": 2, "save_every": 1}}
# what the pre-trained row's scores depend on (it trains nothing)
EVALUATION_KEYS = ("model.", "task.", "trainer.eval_", "trainer.precision", "trainer.micro_batch_size")


def parse(argv: list[str], defaults: dict) -> tuple[dict, list[str]]:
    options = {**defaults, "smoke": False, "analyse": False}
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--analyse":
            options["analyse"] = True
        elif arg == "--smoke":  # a folder of its own: a smoke never stands in for the real runs
            options["smoke"], options["seeds"] = True, 1
            options["out"] = options["out"] if "--out" in argv else f"{defaults['out']}-smoke"
        elif arg in ("--seeds", "--rules", "--out"):
            value = argv[i + 1]
            options[arg[2:]] = int(value) if arg == "--seeds" else value.split(",") if arg == "--rules" else value
            i += 1
        else:
            rest.append(arg)
        i += 1
    return options, rest


def pretrained_row(base: dict, out: Path) -> Path:
    """The bundled pre-trained model, evaluated before any fine-tuning on every split the runs report (the
    forgetting that fine-tuning causes shows against it): a run-like folder the report puts first."""
    folder = out / "pretrained"
    config = resolve(merge(base, {"trainer": {"run_dir": str(folder)}}))
    if (folder / "results.json").is_file():
        refuse_another_run(folder, config, EVALUATION_KEYS)  # scored as asked, not on a smoke's 2 batches
        return folder
    run = setup(config, training=False)
    results = {split: evaluate(run, split, config.trainer.eval_batches) for split in config.trainer.eval_splits}
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"optimizer": "pre-trained", "seed": 0, "train_domains": list(run.task.train_domains), "results": results,
               "metric": getattr(run.task, "headline_metric", "ppl")}  # fmt: skip
    dump_yaml(config, folder / "config.yaml")
    write_json(folder / "results.json", summary)
    return folder


def analyse(run_dirs: list[Path], recipe: dict, smoke: bool) -> None:
    """ε-sharpness and CKA with the pre-trained model on every domain's validation split, for each run not yet
    measured (RUN/analysis/); the report then adds Table 6. The paper's settings (ε 1e-5, SGD lr 8e-5, 4 batches
    of 32 per step), 10 ascent steps; the smoke setting measures 1 batch of 4, 2 steps."""
    from fabric_tram.measure import cka, sharpness

    size, batches, steps = (4, 1, 2) if smoke else (32, 4, 10)
    for run_dir in run_dirs:
        if not (run_dir / "analysis" / "sharpness-validation.json").is_file():
            print(f"== ε-sharpness of {run_dir}")
            sharpness(run_dir, "validation", steps=steps, batch_size=size, accumulate=batches)
        if not (run_dir / "analysis" / "cka-validation.json").is_file():
            print(f"== CKA of {run_dir} with {recipe['model']['pretrained']}")
            cka(recipe["model"]["pretrained"], run_dir, "validation", batch_size=size, limit=batches * 8)


def main(
    argv: list[str] | None = None,
    recipe: dict = RECIPE,
    smoke: dict = SMOKE,
    selected: dict = SELECTED,
    defaults: dict | None = None,
) -> str:
    """Every rule × seed from ``recipe`` (each rule with its ``selected`` settings), the pre-trained row, the
    table and figures. ``defaults``: seeds, rules and output folder unless --seeds/--rules/--out say otherwise."""
    defaults = {"seeds": 5, "rules": RULES, "out": "runs/demo", **(defaults or {})}
    with reported_errors():  # bad input: one line naming the problem and the fix
        return run_all(*parse(list(sys.argv[1:] if argv is None else argv), defaults), recipe, smoke, selected)


def run_all(options: dict, overrides: list[str], recipe: dict, smoke: dict, selected: dict) -> str:
    base = merge(recipe, smoke) if options["smoke"] else recipe
    given = parse_overrides(overrides)
    # optimizer.* overrides go to each rule after its own settings: a rule's key (optimizer.ascent_every, say) is
    # unknown to the recipe's base optimizer, and the pre-trained row trains nothing
    rule_settings = given.pop("optimizer", {})
    base = merge(base, given)
    out = Path(options["out"])
    run_dirs = [pretrained_row(base, out)]
    for seed in range(options["seeds"]):
        for rule in options["rules"]:
            run_dir = out / f"{rule}-seed{seed}"
            run_dirs.append(run_dir)
            optimizer = {"name": rule, **selected.get(rule, {}), **rule_settings}
            settings = {"optimizer": optimizer, "trainer": {"seed": seed, "run_dir": str(run_dir)}}
            if (run_dir / "results.json").is_file():
                refuse_another_run(run_dir, resolve(merge(base, settings)))  # the same run, or a clear stop
                print(f"reusing {run_dir} (delete it to train again)")
                continue
            if (run_dir / "config.yaml").is_file():  # interrupted: continue from its newest checkpoint
                settings["trainer"]["resume"] = "auto"
                print(f"== {rule}, seed {seed}: continuing the interrupted run in {run_dir}")
            else:
                print(f"== {rule}, seed {seed} -> {run_dir}")
            train_job(resolve(merge(base, settings)))
    if options["analyse"]:
        analyse(run_dirs[1:], recipe, options["smoke"])
    table = report(run_dirs, out / "report")
    print(table)
    print(f"written: {out / 'report'}/(report.md, figure2.png, curves.png)")
    return table


if __name__ == "__main__":
    main()
