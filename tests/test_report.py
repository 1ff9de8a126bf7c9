"""Result tables (per run, and side by side across runs with mean ± spread) and Figure 2, on fake run folders."""

import csv
import json

from click.testing import CliRunner

from fabric_tram.analysis.results import write_run_results
from fabric_tram.analysis.tables import run_row
from fabric_tram.cli import main


def fake_run(folder, optimizer, seed, math_ppl, art_ppl, cs_ppl):
    folder.mkdir(parents=True)
    results = {
        "test": {
            d: {"loss": 0.0, "ppl": p, "tokens": 100.0}
            for d, p in (("math_l1", math_ppl), ("Art", art_ppl), ("cs_l1", cs_ppl))
        }
    }
    (folder / "results.json").write_text(
        json.dumps({"optimizer": optimizer, "seed": seed, "train_domains": ["math_l1"], "results": results})
    )
    return folder


def test_run_row_orders_training_domain_then_zero_shot_and_average():
    results = {"test": {"Art": {"ppl": 30.0}, "math_l1": {"ppl": 10.0}, "cs_l1": {"ppl": 20.0}}}
    assert run_row(results, ["math_l1"], "test") == {"math_l1": 10.0, "Art": 30.0, "cs_l1": 20.0, "ZS Avg.": 25.0}


def test_per_run_table_files(tmp_path):
    folder = fake_run(tmp_path / "run", "adam", 0, 10.0, 30.0, 20.0)
    text = write_run_results(folder, json.loads((folder / "results.json").read_text())["results"], ["math_l1"], "adam")
    assert "| run | Math | Art | CS | ZS Avg. |" in text and "| adam | 10.00 | 30.00 | 20.00 | 25.00 |" in text
    rows = list(csv.reader(open(folder / "results_table.csv")))
    assert rows[0] == ["run", "math_l1", "Art", "cs_l1", "ZS Avg."] and rows[1][0] == "adam"
    assert json.loads((folder / "results_table.json").read_text())["adam"]["ZS Avg."] == 25.0


def test_report_side_by_side_with_seeds_and_figure(tmp_path):
    runs = [
        fake_run(tmp_path / "adam0", "adam", 0, 10.0, 30.0, 20.0),
        fake_run(tmp_path / "adam1", "adam", 1, 12.0, 32.0, 22.0),
        fake_run(tmp_path / "asam0", "asam", 0, 9.0, 33.0, 19.0),
        fake_run(tmp_path / "tram0", "tram-prev", 0, 8.5, 29.0, 18.0),
    ]
    result = CliRunner().invoke(main, ["report", *map(str, runs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    # mean ± std [95% CI of the mean]: t(0.975, 1 df) = 12.706, times std / √2 = 1 gives a half-width of 12.71
    cells = ["11.00 ± 1.41 [-1.71, 23.71]", "31.00 ± 1.41 [18.29, 43.71]", "21.00 ± 1.41 [8.29, 33.71]"]
    assert f"| adam (n=2) | {' | '.join(cells)} | 26.00 ± 1.41 [13.29, 38.71] |" in result.output
    assert "| tram-prev | 8.50 | 29.00 | 18.00 | 23.50 |" in result.output
    png = (tmp_path / "out" / "figure2.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    bad = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert bad.exit_code != 0 and "is a finished run folder (with results.json)" in bad.output
    # a glob over a folder of runs also matches the report's own folder: skipped, named
    with_report = CliRunner().invoke(
        main, ["report", *map(str, runs), str(tmp_path / "out"), "--out", str(tmp_path / "o2")]
    )
    assert with_report.exit_code == 0 and f"skipped (not finished runs): {tmp_path / 'out'}" in with_report.output


def test_results_json_holds_null_for_a_diverged_metric(tmp_path):
    from fabric_tram.jsonfile import write_json

    write_json(tmp_path / "r.json", {"loss": float("nan"), "ppl": [1.0, float("inf")]})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: 1 / 0) == {
        "loss": None,
        "ppl": [1.0, None],
    }


def test_recipe_runs_are_named_by_rule_and_seed():
    from fabric_tram.config import load_config

    settings = (["optimizer.name=adam"], ["optimizer.name=tram-prev"], ["optimizer.name=tram-prev", "trainer.seed=1"])
    dirs = {load_config("recipes/gpt2_wiki.py", o, smoke=True).trainer.run_dir for o in settings}
    assert dirs == {"runs/smoke/gpt2_wiki-adam-seed0", "runs/smoke/gpt2_wiki-tram-prev-seed0",
                    "runs/smoke/gpt2_wiki-tram-prev-seed1"}  # fmt: skip


def drawn_figures(monkeypatch) -> dict:
    """Every figure a report saves, by file name, captured as it is saved (its axes can then be read)."""
    from matplotlib.figure import Figure

    saved, real = {}, Figure.savefig

    def capture(fig, path, *args, **kwargs):
        saved[str(path).rsplit("/", 1)[-1]] = fig
        return real(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return saved


def test_figures_say_what_they_show_and_empty_ones_are_not_written(tmp_path, monkeypatch):
    from fabric_tram.analysis.results import report

    figures = drawn_figures(monkeypatch)
    runs = [fake_run(tmp_path / f"adam{s}", "adam", s, 10.0 + s, 30.0 - s, 20.0) for s in range(3)]
    for run in runs:  # adam logs its loss only
        (run / "logs" / "csv").mkdir(parents=True)
        (run / "logs" / "csv" / "metrics.csv").write_text("step,loss\n1,3.0\n2,2.5\n")
    report(runs, tmp_path / "out")
    curves = figures["curves.png"].axes
    assert [ax.get_title() for ax in curves] == ["training loss"]  # no empty d / radius / ‖e‖ panels
    assert [t.get_text() for t in curves[0].get_legend().get_texts()] == ["adam (mean of 3)"]
    assert "across the same 3 fine-tuned runs" in figures["domain_correlations.png"].axes[0].get_title()
    assert "one point per run" in figures["figure2.png"].axes[0].get_title()
    # one domain only: nothing is zero-shot, so no Figure 2
    only = tmp_path / "only"
    only.mkdir()
    results = {"test": {"math_l1": {"loss": 0.0, "ppl": 10.0, "tokens": 100.0}}}
    (only / "results.json").write_text(json.dumps({"optimizer": "adam", "seed": 0, "train_domains": ["math_l1"],
                                                   "results": results}))  # fmt: skip
    report([only], tmp_path / "out-only")
    assert not (tmp_path / "out-only" / "figure2.png").exists()


def test_the_sweep_figure_explains_its_star_and_bars(tmp_path, monkeypatch):
    from fabric_tram.analysis.sweep import plot_selection

    figures = drawn_figures(monkeypatch)
    results = [{"results": {"validation": {"a": {"loss": v, "tokens": 10.0}}}, "train_domains": ["a"]} for v in (1, 2)]
    plot_selection({"asam": {"rho=0.1": results, "rho=0.5": results[:1]}}, {"asam": "rho=0.1"}, tmp_path / "s.png")
    labels = [t.get_text() for t in figures["s.png"].axes[0].get_legend().get_texts()]
    assert set(labels) == {"selected (lowest mean)", "mean over seeds, 95% CI"}


def test_forgetting_curves_average_the_seeds_at_each_evaluation_and_start_at_the_pretrained_model(tmp_path):
    """Run folders made here: two seeds of one setting, evaluated at steps 5 and 10 (and finally), three domains
    of which `a` is trained: each point is the mean over seeds with the t-interval of the mean, step 0 is the
    pre-trained model; the table's numbers are the runs' final test scores."""
    import csv as csv_module
    import json
    import math

    import pytest

    from fabric_tram.analysis.forgetting import forgetting_report

    def run(folder, rows, test):
        (folder / "logs" / "csv").mkdir(parents=True)
        keys = sorted({k for r in rows for k in r})
        with open(folder / "logs" / "csv" / "metrics.csv", "w", newline="") as fh:
            writer = csv_module.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        results = {"test": {d: {"ppl": v} for d, v in test.items()}, "validation": {d: {"ppl": 1.0} for d in test}}
        (folder / "results.json").write_text(json.dumps({"results": results, "train_domains": ["a"],
                                                          "optimizer": "adam"}))  # fmt: skip

    def evaluation(step, a, b, c, final=False):
        prefix = "final/validation" if final else "validation"
        return {"step": step, f"{prefix}/a/ppl": a, f"{prefix}/b/ppl": b, f"{prefix}/c/ppl": c}

    run(tmp_path / "s0", [{"step": 1, "loss": 2.0}, evaluation(5, 10.0, 20.0, 30.0), evaluation(10, 8.0, 22.0, 34.0,
                                                                                                  final=True)],
        {"a": 7.0, "b": 21.0, "c": 35.0})  # fmt: skip
    run(tmp_path / "s1", [evaluation(5, 12.0, 24.0, 28.0), evaluation(10, 10.0, 26.0, 30.0, final=True)],
        {"a": 9.0, "b": 23.0, "c": 33.0})  # fmt: skip
    (tmp_path / "pre").mkdir()
    pretrained = {"validation": {"a": {"ppl": 15.0}, "b": {"ppl": 18.0}, "c": {"ppl": 24.0}},
                  "test": {"a": {"ppl": 16.0}, "b": {"ppl": 19.0}, "c": {"ppl": 25.0}}}  # fmt: skip
    (tmp_path / "pre" / "results.json").write_text(json.dumps({"results": pretrained}))
    text = forgetting_report({"adam": [tmp_path / "s0", tmp_path / "s1"]}, tmp_path / "pre", tmp_path / "out")
    data = json.loads((tmp_path / "out" / "forgetting.json").read_text())["adam"]
    assert data["zero-shot"]["steps"] == [0, 5, 10]
    # zero-shot = mean of b and c per run: (25, 26) at step 5, (28, 28) at step 10; step 0: (18 + 24) / 2
    assert data["zero-shot"]["mean"] == pytest.approx([21.0, 25.5, 28.0])
    assert data["in-domain"]["mean"] == pytest.approx([15.0, 11.0, 9.0])
    half = 12.706 * math.sqrt(0.5) / math.sqrt(2)  # t(1) · std of (25, 26) / √2
    assert data["zero-shot"]["ci"] == pytest.approx([0.0, half, 0.0])
    assert "| adam (n=2) | 8.00 ± 1.41" in text and "| pre-trained | 16.00 | 19.00 | 25.00 | 22.00 |" in text
    assert (tmp_path / "out" / "forgetting.png").is_file()
