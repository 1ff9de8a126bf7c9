"""``fabric-tram sweep``: grid syntax and its errors (before any run starts), selection and confidence intervals
on fake run folders, and a small real sweep that resumes after an interruption."""

import json
import math
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from fabric_tram.analysis.stats import mean_ci
from fabric_tram.analysis.sweep import collect, expand, parse_grid, select, split_values, summarise
from fabric_tram.cli import main

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny_sample.py")


def test_values_split_on_top_level_commas_only():
    assert split_values("1e-4,[0.9,0.99],(1, 2)") == ["1e-4", "[0.9,0.99]", "(1, 2)"]


def test_grid_expands_rule_by_rule_with_scoped_keys_and_fixed_single_values():
    grid = parse_grid(
        ["optimizer.name=adam,asam", "asam:optimizer.rho=0.1,0.5", "trainer.seed=0,1", "trainer.max_steps=5"]
    )
    points = expand(grid, "adam")
    assert [p.label for p in points] == [
        "optimizer.name=adam,trainer.seed=0",
        "optimizer.name=adam,trainer.seed=1",
        "optimizer.name=asam,optimizer.rho=0.1,trainer.seed=0",
        "optimizer.name=asam,optimizer.rho=0.1,trainer.seed=1",
        "optimizer.name=asam,optimizer.rho=0.5,trainer.seed=0",
        "optimizer.name=asam,optimizer.rho=0.5,trainer.seed=1",
    ]
    assert points[2].overrides == ("optimizer.name=asam", "trainer.max_steps=5", "optimizer.rho=0.1", "trainer.seed=0")
    assert {p.setting for p in points} == {"(recipe)", "optimizer.rho=0.1", "optimizer.rho=0.5"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["optimizer.lr"], "is not KEY=V1,V2"),
        (["lr=1,2"], "with a dotted key"),
        (["optimizer.lr=1,,2"], "non-empty values"),
        (["optimizer.lr=1,2", "optimizer.lr=3"], "given twice"),
        (["optimizer.lr=1,1"], "repeats a value"),
        (["asam:optimizer.name=sam"], "cannot be scoped"),
        ([], "at least one KEY=V1,V2"),
    ],
)
def test_bad_grid_syntax_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(args)


def test_a_key_scoped_to_a_rule_the_sweep_does_not_run_is_refused():
    with pytest.raises(ValueError, match="scoped to sam, which the sweep does not run"):
        expand(parse_grid(["optimizer.name=adam,asam", "sam:optimizer.rho=0.1,0.2"]), "adam")


@pytest.mark.parametrize(
    "grid,message",
    [
        (["optimizer.rhoo=0.1,0.5"], "rhoo"),  # unknown key: the registry's error, with a suggestion
        (["optimizer.lr=0.1,fast"], "optimizer.lr"),  # a bad value
        (["optimizer.lr"], "is not KEY=V1,V2"),
    ],
)
def test_the_cli_refuses_a_bad_sweep_before_any_run_starts(tmp_path, grid, message):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", RECIPE, *grid, "--out", str(out)])
    assert result.exit_code == 1 and message in result.output and result.output.startswith("error: ")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- selection


def fake_run(folder: Path, rule: str, seed: int, val_loss: float, test_ppl: float) -> None:
    folder.mkdir(parents=True)
    results = {
        "validation": {"jargon": {"loss": val_loss, "ppl": math.exp(val_loss), "tokens": 100.0}},
        "test": {"jargon": {"ppl": test_ppl}, "bible": {"ppl": 2 * test_ppl}},
    }
    summary = {"optimizer": rule, "seed": seed, "train_domains": ["jargon"], "results": results}
    (folder / "results.json").write_text(json.dumps(summary))


def test_selection_by_mean_validation_loss_and_the_95_percent_interval(tmp_path):
    points = expand(
        parse_grid(["optimizer.name=adam,asam", "asam:optimizer.rho=0.1,0.5", "trainer.seed=0,1,2"]), "adam"
    )
    # asam ρ = 0.5 wins on the mean (2.0) though ρ = 0.1 has the single best seed (1.7)
    val = {"(recipe)": [3.0, 3.1, 2.9], "optimizer.rho=0.1": [1.7, 2.6, 2.6], "optimizer.rho=0.5": [2.0, 2.1, 1.9]}
    test = [10.0, 11.0, 15.0]
    for p in points:
        seed = int(p.label[-1])
        fake_run(p.run_dir(tmp_path), p.rule, seed, val[p.setting][seed], test[seed])
    (points[-1].run_dir(tmp_path) / "results.json").unlink()  # an unfinished run: counted, left out
    found = collect(points, tmp_path)
    assert select(found) == {"adam": "(recipe)", "asam": "optimizer.rho=0.5"}
    text = summarise(points, tmp_path)
    assert "1 run(s) unfinished" in text and "asam optimizer.rho=0.5 (selected)" in text
    mean, std, half = mean_ci(test)
    assert std == pytest.approx(statistics.stdev(test)) and half == pytest.approx(4.303 * std / math.sqrt(3))
    row = json.loads((tmp_path / "sweep" / "selected.json").read_text())["adam (recipe) (n=3)"]
    assert row["jargon"] == f"{mean:.2f} ± {std:.2f} [{mean - half:.2f}, {mean + half:.2f}]"
    assert "(n=2)" in text  # asam ρ = 0.5 has two finished seeds
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------- a real sweep

SMALL = [
    *("trainer.max_steps=2", "trainer.eval_batches=1", "trainer.eval_splits=[validation,test]"),
    *("trainer.save_every=1", "trainer.progress_bar=false", "model.n_layer=1", "model.n_embd=16", "model.n_head=2"),
    "task.train_domains=[python-docs]",  # licenses then is zero-shot: Figure 2 has something to show
]


@pytest.mark.slow
def test_a_sweep_trains_selects_and_resumes_without_retraining_finished_runs(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", RECIPE, "optimizer.lr=1e-3,1e-2", "trainer.seed=0,1", *SMALL, "--out", str(out)]
    first = CliRunner().invoke(main, [*args, "--parallel", "2"])  # two runs at a time, each in its own process
    assert first.exit_code == 0, first.output
    assert "4 runs, 0 finished, 4 to train" in first.output and "[4/4]" in first.output
    assert len(list((out / "logs").glob("*.log"))) == 4  # each process's output
    for name in ("selection.md", "selected.md", "sweep.png", "report.md", "figure2.png", "curves.png"):
        assert (out / "sweep" / name).is_file(), name
    interrupted = out / "optimizer.lr=1e-2,trainer.seed=1"
    (interrupted / "results.json").unlink()  # as if killed after its last checkpoint
    second = CliRunner().invoke(main, args)  # in this process, one after another
    assert second.exit_code == 0, second.output
    assert "4 runs, 3 finished, 1 to train" in second.output and "(selected)" in second.output
    assert "continuing" in second.output or "resumed from" in second.output  # from its newest checkpoint


UNEQUAL = {  # two training domains of unequal size and a zero-shot one
    "a": {"loss": 1.0, "tokens": 100.0},
    "b": {"loss": 3.0, "tokens": 300.0},
    "zero-shot": {"loss": 10.0, "tokens": 50.0},
}


def test_the_in_domain_loss_that_picks_checkpoints_and_settings_is_per_target_not_per_domain():
    from types import SimpleNamespace

    from fabric_tram.analysis.sweep import validation_loss
    from fabric_tram.engine.checkpoint import in_domain_loss

    expected = (1.0 * 100 + 3.0 * 300) / 400  # 2.5, where the mean of the two domains' losses is 2.0
    assert in_domain_loss(SimpleNamespace(train_domains=["a", "b"]), UNEQUAL) == pytest.approx(expected)
    assert validation_loss({"validation": UNEQUAL}, ["a", "b"]) == pytest.approx(expected)
    classification = {k: {"loss": v["loss"], "examples": v["tokens"]} for k, v in UNEQUAL.items()}
    assert in_domain_loss(SimpleNamespace(train_domains=["a", "b"]), classification) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no target count"):
        validation_loss({"validation": {"a": {"loss": 1.0}}}, ["a"])
