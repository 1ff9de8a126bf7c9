"""Forgetting against steps (``recipes/demo_long.py``): the in-domain and the zero-shot perplexity of each run at
every periodic evaluation (``trainer.eval_every``: ``validation/DOMAIN/ppl`` in its CSV log), averaged over seeds
per setting with the 95% band of the mean, beside the table of the final test scores; the pre-trained model's
scores start every curve at step 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fabric_tram.analysis.curves import read_log
from fabric_tram.analysis.stats import mean_ci, mean_std_ci
from fabric_tram.analysis.tables import ZS_AVG, run_row, write_table
from fabric_tram.jsonfile import write_json


def scores_along_the_way(run_dir: Path, train_domains: list[str], split: str = "validation") -> dict[int, dict]:
    """``{step: {"in-domain": ppl, "zero-shot": mean ppl over the other domains}}`` from a run's periodic
    evaluations and its final one (the CSV rows with every domain's ``SPLIT/DOMAIN/ppl``, or ``final/SPLIT/...``
    at the last step)."""
    out = {}
    for row in read_log(run_dir):
        values = {k.split("/")[-2]: v for k, v in row.items()
                  if k.removeprefix("final/").startswith(f"{split}/") and k.endswith("/ppl")}  # fmt: skip
        if not values or not set(train_domains) <= set(values) or "step" not in row:
            continue
        zero_shot = [v for d, v in values.items() if d not in train_domains]
        out[int(row["step"])] = {
            "in-domain": sum(values[d] for d in train_domains) / len(train_domains),
            "zero-shot": sum(zero_shot) / len(zero_shot) if zero_shot else math.nan,
        }
    return out


def pretrained_scores(folder: Path, train_domains: list[str], split: str = "validation") -> dict[str, float]:
    results = json.loads((Path(folder) / "results.json").read_text())["results"]
    row = run_row(results, train_domains, split)
    return {"in-domain": sum(row[d] for d in train_domains) / len(train_domains), "zero-shot": row[ZS_AVG]}


def curves(groups: dict[str, list[Path]], train_domains: list[str], start: dict[str, float] | None) -> dict:
    """Per setting and curve: steps, mean over seeds, and the half-width of the 95% CI of the mean (NaN for one
    seed); step 0 is the pre-trained model (``start``), the same for every setting."""
    out = {}
    for label, run_dirs in groups.items():
        per_run = [scores_along_the_way(d, train_domains) for d in run_dirs]
        steps = sorted(set().union(*(set(r) for r in per_run)))
        out[label] = {}
        for curve in ("in-domain", "zero-shot"):
            points = [(s, [r[s][curve] for r in per_run if s in r]) for s in steps]
            stats = [(s, *mean_ci(v)[::2]) for s, v in points if v]  # (step, mean, half-width)
            if start is not None:
                stats.insert(0, (0, start[curve], 0.0))
            out[label][curve] = {"steps": [s for s, _, _ in stats], "mean": [m for _, m, _ in stats],
                                 "ci": [h for _, _, h in stats]}  # fmt: skip
    return out


def plot_forgetting(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    titles = {"in-domain": "in-domain perplexity", "zero-shot": "zero-shot perplexity (mean of the other domains)"}
    for ax, (curve, title) in zip(axes, titles.items(), strict=True):
        for label, per_curve in data.items():
            c = per_curve[curve]
            lows = [m - (h if math.isfinite(h) else 0) for m, h in zip(c["mean"], c["ci"], strict=True)]
            highs = [m + (h if math.isfinite(h) else 0) for m, h in zip(c["mean"], c["ci"], strict=True)]
            (line,) = ax.plot(c["steps"], c["mean"], label=label, linewidth=1.4)
            ax.fill_between(c["steps"], lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def forgetting_report(groups: dict[str, list[Path]], pretrained: Path | None, out_dir: Path, split: str = "test"
                      ) -> str:  # fmt: skip
    """The final table (mean ± std [95% CI] per setting) and ``forgetting.png`` with its numbers in
    ``forgetting.json``; returns the table and, per setting, the zero-shot perplexity at each evaluation."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(d for dirs in groups.values() for d in dirs)
    train_domains = json.loads((first / "results.json").read_text())["train_domains"]
    rows = {}
    if pretrained is not None:
        results = json.loads((Path(pretrained) / "results.json").read_text())["results"]
        rows["pre-trained"] = {c: f"{v:.2f}" for c, v in run_row(results, train_domains, split).items()}
    for label, run_dirs in groups.items():
        per_run = [run_row(json.loads((d / "results.json").read_text())["results"], train_domains, split)
                   for d in run_dirs]  # fmt: skip
        rows[f"{label} (n={len(per_run)})"] = {c: mean_std_ci([r[c] for r in per_run]) for c in per_run[0]}
    columns = list(next(iter(rows.values())))
    table = write_table(rows, columns, out_dir / "forgetting_table")
    start = pretrained_scores(pretrained, train_domains) if pretrained is not None else None
    data = curves(groups, train_domains, start)
    write_json(out_dir / "forgetting.json", data)  # a single seed's band is null, not a bare NaN
    plot_forgetting(data, out_dir / "forgetting.png")
    along = "\n".join(
        f"{label}: "
        + ", ".join(
            f"{s} {m:.2f}" for s, m in zip(c["zero-shot"]["steps"], c["zero-shot"]["mean"], strict=True)
        )  # fmt: skip
        for label, c in data.items()
    )
    return f"{split} perplexity (mean ± std [95% CI of the mean] over seeds):\n{table}\nzero-shot perplexity at each " \
           f"evaluation (validation, mean over seeds):\n{along}\n"  # fmt: skip
