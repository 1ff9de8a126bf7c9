"""The paper's analysis tables across runs: how each zero-shot domain's result moves with the training domain's
(appendix C.1, Table 9), and ε-sharpness and CKA per rule with the in- vs out-of-domain sharpness correlation
(Table 6), from the files ``fabric-tram sharpness`` and ``fabric-tram cka`` wrote into each run folder.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fabric_tram.analysis.stats import mean_std_ci
from fabric_tram.analysis.tables import ZS_AVG, write_table


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's r; NaN when either side is constant or there are fewer than 3 pairs."""
    if len(xs) != len(ys) or len(xs) < 3:
        return math.nan
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def domain_correlations(rows: list[dict[str, float]], train_domains: list[str]) -> dict[str, float]:
    """Across runs: r between the training domain's value (the mean over several) and each other column's."""
    x = [statistics.fmean(row[d] for d in train_domains if d in row) for row in rows]
    columns = [c for c in dict.fromkeys(c for row in rows for c in row) if c not in train_domains]
    return {c: pearson(x, [row[c] for row in rows]) for c in columns if all(c in row for row in rows)}


PEARSON = "Pearson r (mean [min, max] over ZS domains)"


def mean_and_range(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def read_measure(run_dir: Path, kind: str, split: str) -> dict | None:
    """``RUN/analysis/{kind}-{split}.json``'s per-domain results, or None when the run was not measured."""
    path = Path(run_dir) / "analysis" / f"{kind}-{split}.json"
    return json.loads(path.read_text())["results"] if path.is_file() else None


def measure_tables(runs: list[tuple[Path, str, list[str]]], split: str, out_dir: Path) -> str:
    """Table 6 from the runs that were measured: per rule, ε-sharpness and CKA on the training domain and the
    zero-shot average (mean ± std [95% CI] over runs), and the Pearson r between the training domain's sharpness
    and each zero-shot domain's across the rule's runs (their mean and range over the domains: a t-interval would
    leave [-1, 1]). Empty when nothing was measured."""
    text = ""
    for kind, key in (("sharpness", "sharpness"), ("cka", "cka")):
        groups: dict[str, list[dict[str, float]]] = {}
        for run_dir, rule, train_domains in runs:
            found = read_measure(run_dir, kind, split)
            if found is None:
                continue
            values = {d: m[key] for d, m in found.items()}
            zero_shot = [v for d, v in values.items() if d not in train_domains]
            row = {"in-domain": statistics.fmean(values[d] for d in train_domains if d in values)}
            if zero_shot:
                row[ZS_AVG] = statistics.fmean(zero_shot)
            groups.setdefault(rule, []).append({**row, "_domains": values, "_train": train_domains})
        if not groups:
            continue
        table = {}
        for rule, rows in groups.items():
            digits = 4 if kind == "sharpness" else 3  # sharpness is small at the paper's ε: 2 decimals say nothing
            entry = {c: mean_std_ci([r[c] for r in rows if c in r], digits=digits) for c in ("in-domain", ZS_AVG)}
            if kind == "sharpness":
                per_domain = domain_correlations([dict(r["_domains"]) for r in rows], rows[0]["_train"])
                finite = [v for v in per_domain.values() if math.isfinite(v)]
                entry[PEARSON] = mean_and_range(finite) if finite else "n/a (fewer than 3 runs)"
            table[f"{rule} (n={len(rows)})"] = entry
        if kind == "sharpness":
            plot_sharpness(groups, Path(out_dir) / "sharpness.png")
        columns = ["in-domain", ZS_AVG] + ([PEARSON] if kind == "sharpness" else [])
        label = "ε-sharpness" if kind == "sharpness" else "CKA with the pre-trained model"
        text += f"\n{split} {label} (mean ± std [95% CI] over runs):\n"
        text += write_table(table, columns, Path(out_dir) / kind)
    return text


def plot_sharpness(groups: dict[str, list[dict]], path: Path) -> None:
    """Table 6a as a scatter: each run's in-domain against its zero-shot average ε-sharpness, a colour per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for rule, rows in groups.items():
        points = [(r["in-domain"], r[ZS_AVG]) for r in rows if ZS_AVG in r]
        ax.scatter(
            [x for x, _ in points], [y for _, y in points], label=rule, marker="*" if rule.startswith("tram") else "o"
        )
    ax.set_xlabel("in-domain ε-sharpness")
    ax.set_ylabel("zero-shot average ε-sharpness")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_correlations(correlations: dict[str, float], train_domains: list[str], path: Path, runs: int) -> None:
    """Appendix C.1 as a bar chart: each zero-shot domain's r with the training domain, across ``runs`` runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(correlations)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 1.5), 3.6))
    values = [correlations[n] for n in names]
    ax.bar(names, values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel(f"Pearson r with {', '.join(train_domains)}")
    ax.set_title(f"each bar: r across the same {runs} fine-tuned runs", fontsize=8)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
