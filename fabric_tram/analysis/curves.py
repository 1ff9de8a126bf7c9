"""Training curves of several runs (``curves.png`` of a report): the loss, d, the radius and ‖e‖ against the step,
one line per update rule (the mean over its seeds), read from each run's CSV log."""

from __future__ import annotations

import csv
import math
from pathlib import Path

CURVES = (("loss", "training loss"), ("d", "trust-region distance d"), ("radius", "radius r"), ("e_norm", "‖e‖"))


def read_log(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``RUN/logs/csv/metrics.csv`` as numbers (empty cells left out); no log, no rows."""
    path = Path(run_dir) / "logs" / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: number for k, v in row.items() if (number := _number(v)) is not None} for row in csv.DictReader(fh)]


def _number(text: str | None) -> float | None:
    """A cell as a number; flags (True/False) and empty cells are not curves."""
    try:
        return float(text) if text not in ("", None, "True", "False") else None
    except ValueError:
        return None


def mean_curve(logs: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    """Steps and the mean of ``key`` over the runs that logged it at that step."""
    by_step: dict[float, list[float]] = {}
    for rows in logs:
        for row in rows:
            if key in row and "step" in row and math.isfinite(row[key]):
                by_step.setdefault(row["step"], []).append(row[key])
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def plot_curves(runs: list[tuple[str, Path]], path: Path) -> bool:
    """Draw one panel per curve, one line per rule (``runs``: (rule, run folder)); False when no run has a log."""
    logs: dict[str, list[list[dict]]] = {}
    for rule, run_dir in runs:
        rows = read_log(run_dir)
        if rows:
            logs.setdefault(rule, []).append(rows)
    if not logs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {rule: colors[i % len(colors)] for i, rule in enumerate(logs)}  # one colour per rule in every panel
    # a panel only for what some run logged (an adam-only report has no d, radius or ‖e‖)
    curves = [(k, t) for k, t in CURVES if any(mean_curve(rule_logs, k)[0] for rule_logs in logs.values())]
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], curves, strict=True):
        for rule, rule_logs in logs.items():
            steps, values = mean_curve(rule_logs, key)
            if steps:
                ax.plot(steps, values, label=f"{rule} (mean of {len(rule_logs)})", linewidth=1, color=color[rule])
        if key != "loss" and any(line.get_ydata().min() > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0][0].legend(fontsize=7, title="rule (runs averaged)", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
