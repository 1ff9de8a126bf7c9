"""The paper's claim where fine-tuning has time to forget: the demo's setting at a long horizon.

Every comparison of the other recipes ran for 30-120 steps, where adam, asam and tram-prev could not be told apart.
Here the demo's small GPT-2 (pre-trained on four bundled domains) is fine-tuned on jargon for HORIZON steps, with
the zero-shot and in-domain perplexity evaluated every tenth of the run, so that forgetting can be drawn against
the steps for each rule (mean over seeds and the 95% band of the mean): adam, asam, tram-prev and tram-init, each
at the demo's selected radius and at a larger one, 3 seeds.

    python recipes/demo_long.py                                  # on a GPU: trainer.accelerator=cuda
    python recipes/demo_long.py --horizon 600 --seeds 0,1,2      # the CPU horizon (docs/experiments.md)
    python recipes/demo_long.py --variants adam,"tram-prev r=0.5" --seeds 0      # a part of the grid
    python recipes/demo_long.py --smoke                          # a few steps, the same code path (tests)

Finished runs are reused (when they are the run asked for) and interrupted ones continue, so the grid can be
split between processes (--variants/--seeds) and run again to report everything:
RUN_DIR/report/forgetting_table.md, forgetting.png, forgetting.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo import RECIPE as DEMO  # noqa: E402
from demo import pretrained_row  # noqa: E402

from fabric_tram.analysis.forgetting import forgetting_report  # noqa: E402
from fabric_tram.cli import reported_errors, train_job  # noqa: E402
from fabric_tram.config import merge, parse_overrides, resolve  # noqa: E402
from fabric_tram.config_compare import refuse_another_run  # noqa: E402

HORIZON = 2000  # steps, meant for a GPU (not run there yet); on CPU: 600 (docs/experiments.md)
DEMO_TRAM = {"radius_transform": "linear"}  # the demo's sweep: linear transform, radius_target 0.1
VARIANTS = {  # label: (rule, its settings): the demo's selected radius, and one five times larger
    "adam": ("adam", {}),
    "asam ρ=0.1": ("asam", {"rho": 0.1}),
    "asam ρ=0.5": ("asam", {"rho": 0.5}),
    "tram-prev r=0.1": ("tram-prev", {**DEMO_TRAM, "radius_target": 0.1}),
    "tram-prev r=0.5": ("tram-prev", {**DEMO_TRAM, "radius_target": 0.5}),
    "tram-init r=0.1": ("tram-init", {**DEMO_TRAM, "radius_target": 0.1}),
    "tram-init r=0.5": ("tram-init", {**DEMO_TRAM, "radius_target": 0.5}),
}
SMOKE = {"trainer": {"eval_batches": 2}}


def recipe(horizon: int) -> dict:
    """The demo at ``horizon`` steps: the warm-up a tenth of the demo's share kept at 12 steps, the polynomial
    decay over the whole run, an evaluation (all four domains, validation) every tenth of it."""
    every = max(1, horizon // 10)
    return merge(DEMO, {"trainer": {"max_steps": horizon, "eval_every": every, "save_every": every,
                                    "keep_last": 1, "progress_bar": False}})  # fmt: skip


def folder_name(label: str) -> str:
    return label.replace(" ", "-").replace("ρ=", "rho").replace("r=", "r")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=int, default=HORIZON)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="labels of VARIANTS, comma-separated")
    parser.add_argument("--out", default="runs/demo_long")
    parser.add_argument("--smoke", action="store_true", help="4 steps, 2 evaluation batches: the code path")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    with reported_errors():
        horizon = 4 if args.smoke else args.horizon
        base = merge(merge(recipe(horizon), SMOKE) if args.smoke else recipe(horizon), parse_overrides(overrides))
        variants = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants {unknown}: not among {', '.join(VARIANTS)}")
        out = Path(args.out)
        pretrained = pretrained_row(base, out)
        groups = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            for label in variants:
                rule, settings = VARIANTS[label]
                run_dir = out / f"{folder_name(label)}-seed{seed}"
                groups.setdefault(label, []).append(run_dir)
                config = {"optimizer": {"name": rule, **settings}, "trainer": {"seed": seed, "run_dir": str(run_dir)}}
                if (run_dir / "results.json").is_file():
                    refuse_another_run(run_dir, resolve(merge(base, config)))
                    print(f"reusing {run_dir}")
                    continue
                if (run_dir / "config.yaml").is_file():
                    config["trainer"]["resume"] = "auto"
                print(f"== {label}, seed {seed} -> {run_dir}", flush=True)
                train_job(resolve(merge(base, config)))
        text = forgetting_report(groups, pretrained, out / "report")
    print(text)
    print(f"written: {out / 'report'}/(forgetting_table.md, forgetting.png, forgetting.json)")
    return text


if __name__ == "__main__":
    main()
