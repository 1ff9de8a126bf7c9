"""Result tables like the paper's Tables 4 and 5 (the headline metric on the training domain or language, each
zero-shot one and their average: perplexity for language modelling, accuracy for classification), per run and
across runs (``fabric-tram report``), and the paper's Figure 2 (in-domain vs zero-shot average, one point per run,
the trend line of the non-TRAM runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fabric_tram.analysis.correlations import domain_correlations, measure_tables, plot_correlations
from fabric_tram.analysis.curves import plot_curves
from fabric_tram.analysis.stats import mean_std_ci
from fabric_tram.analysis.tables import ZS_AVG, abbreviated, metric_name, pick_split, run_row, write_table


def write_run_results(run_dir: Path, results: dict, train_domains: list[str], label: str, metric: str = "ppl") -> str:
    """After a run's final evaluation: ``results_table.{csv,json,md}`` in the run folder."""
    split = pick_split(results)
    row = run_row(results, train_domains, split, metric)
    return f"{split} {metric_name(metric)}:\n" + write_table({label: row}, list(row), Path(run_dir) / "results_table")


# ------------------------------------------------------------------------------------------- report


def load_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no results.json: is it a finished fabric_tram run folder?")
    data = json.loads(path.read_text())
    for key in ("results", "optimizer", "train_domains"):
        if key not in data:
            raise ValueError(f"{path} lacks {key!r}; it was written by an older fabric_tram, rerun the evaluation")
    return data


def report(run_dirs: list[Path], out_dir: Path, split: str | None = None) -> str:
    """Side-by-side table of several runs (grouped by update rule: mean ± spread over seeds) and Figure 2.

    Folders that are not finished runs (no results.json: the report's own folder, a run still training) are
    skipped and named in the text; none left is an error."""
    finished = [Path(d) for d in run_dirs if (Path(d) / "results.json").is_file()]
    skipped = [str(d) for d in run_dirs if Path(d) not in finished]
    if not finished:
        raise FileNotFoundError(f"none of {', '.join(map(str, run_dirs))} is a finished run folder (with results.json)")
    runs = [(d, load_run(d)) for d in finished]
    metric = runs_metric([r for _, r in runs])
    split = split or pick_split(runs[0][1]["results"])
    per_run = [
        (d, r["optimizer"], r.get("seed", 0), run_row(r["results"], r["train_domains"], split, metric)) for d, r in runs
    ]
    columns = list(dict.fromkeys(c for *_, row in per_run for c in row))
    groups: dict[str, list[dict]] = {}
    for _, name, _, row in per_run:
        groups.setdefault(name, []).append(row)
    table = {}
    for name, rows in groups.items():
        # runs per cell (runs of several datasets, as Table 3's, each fill their own column)
        n = max(sum(c in r for r in rows) for c in columns)
        table[f"{name} (n={n})" if n > 1 else name] = {c: _mean_spread([r[c] for r in rows if c in r]) for c in columns}
    markdown = write_table(table, columns, Path(out_dir) / "report")
    train_domains = runs[0][1]["train_domains"]
    if any(ZS_AVG in row for *_, row in per_run):  # Figure 2 needs a zero-shot domain; no empty figure
        plot_in_vs_out(per_run, train_domains, Path(out_dir) / "figure2.png", metric)
    plot_curves([(name, d) for d, name, _, _ in per_run], Path(out_dir) / "curves.png")  # loss, d, r, ‖e‖ per step
    note = f"skipped (not finished runs): {', '.join(skipped)}\n" if skipped else ""
    spread = "(mean ± std [95% CI of the mean] over seeds where n > 1)"
    text = note + f"{split} {metric_name(metric)} {spread}:\n" + markdown
    return text + analysis_tables(per_run, runs, train_domains, split, metric, Path(out_dir))


def analysis_tables(per_run, runs, train_domains: list[str], split: str, metric: str, out_dir: Path) -> str:
    """Appendix C.1 (each domain's correlation with the training domain across runs, 3 or more) and Table 6
    (sharpness and CKA, from the runs that ``fabric-tram sharpness``/``cka`` measured on the validation split)."""

    text = ""
    same_training = all(r["train_domains"] == train_domains for _, r in runs)
    tuned = [row for _, name, _, row in per_run if name != "pre-trained"]  # fine-tuned runs only, as the paper's
    if len(tuned) >= 3 and same_training:
        correlations = domain_correlations(tuned, train_domains)
        label = f"r with {', '.join(abbreviated(d) for d in train_domains)}"
        table = write_table({label: correlations}, list(correlations), out_dir / "domain_correlations")
        plot_correlations(correlations, train_domains, out_dir / "domain_correlations.png", runs=len(tuned))
        text += f"\nPearson r across runs between each domain's {split} {metric_name(metric)} and the training "
        text += f"domain's (appendix C.1):\n{table}"
    measured = [(d, r["optimizer"], r["train_domains"]) for d, r in runs]
    return text + measure_tables(measured, "validation", out_dir)


def runs_metric(runs: list[dict]) -> str:
    """The headline metric the runs' results.json name (perplexity when they predate the field); runs of tasks
    with different metrics cannot share a table."""
    metrics = sorted({r.get("metric", "ppl") for r in runs})
    if len(metrics) > 1:
        raise ValueError(f"the runs report different metrics ({', '.join(metrics)}): report each task separately")
    return metrics[0]


def _mean_spread(values: list[float]):
    if not values:
        return ""
    if len(values) == 1:
        return values[0]
    return mean_std_ci(values)


def plot_in_vs_out(per_run, train_domains: list[str], path: Path, metric: str = "ppl") -> None:
    """Figure 2: x = in-domain metric, y = zero-shot average; the trend line fits the non-TRAM runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    points = []
    for _, name, _, row in per_run:
        x = sum(row[d] for d in train_domains if d in row) / max(1, sum(d in row for d in train_domains))
        y = row.get(ZS_AVG, math.nan)
        points.append((name, x, y))
    names = list(dict.fromkeys(n for n, *_ in points))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        xs = [x for n, x, _ in points if n == name]
        ys = [y for n, _, y in points if n == name]
        ax.scatter(
            xs, ys, label=name, color=colors[i % len(colors)], marker="*" if name.startswith("tram") else "o", s=60
        )
    baseline = [(x, y) for n, x, y in points if not n.startswith("tram") and math.isfinite(y)]
    if len({x for x, _ in baseline}) >= 2:
        n = len(baseline)
        mx, my = sum(x for x, _ in baseline) / n, sum(y for _, y in baseline) / n
        slope = sum((x - mx) * (y - my) for x, y in baseline) / sum((x - mx) ** 2 for x, _ in baseline)
        xs = sorted(x for _, x, _ in points)
        ax.plot(
            [xs[0], xs[-1]], [my + slope * (xs[0] - mx), my + slope * (xs[-1] - mx)], "b:", label="trend (non-TRAM)"
        )
    ax.set_xlabel(f"in-domain {metric_name(metric)} ({', '.join(abbreviated(d) for d in train_domains)})")
    ax.set_ylabel(f"zero-shot average {metric_name(metric)}")
    ax.set_title("one point per run; trend: least squares over the non-TRAM runs", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
