"""Result tables: one run's row (training domains, the others, the zero-shot average) and a table written as CSV,
JSON and Markdown. A leaf of analysis/: the report (results.py), the correlations and the sweeps all use it."""

from __future__ import annotations

import csv
from pathlib import Path

from fabric_tram.jsonfile import write_json

ZS_AVG = "ZS Avg."
METRIC_NAMES = {"ppl": "perplexity", "accuracy": "accuracy (%)"}


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def abbreviated(domain: str) -> str:
    from fabric_tram.data.m2d2 import ABBREVIATIONS

    return ABBREVIATIONS.get(domain, domain)


def run_row(results: dict, train_domains: list[str], split: str, metric: str = "ppl") -> dict[str, float]:
    """One run's row: its training domain(s), every other domain, and the zero-shot average."""
    per_domain = results[split]
    row = {d: per_domain[d][metric] for d in train_domains if d in per_domain}
    zero_shot = {d: m[metric] for d, m in per_domain.items() if d not in train_domains}
    row.update(zero_shot)
    if zero_shot:
        row[ZS_AVG] = sum(zero_shot.values()) / len(zero_shot)
    return row


def pick_split(results: dict) -> str:
    return "test" if "test" in results else next(iter(results))


def write_table(rows: dict[str, dict[str, str | float]], columns: list[str], out_stem: Path) -> str:
    """Write ``rows`` (label -> column -> value) as CSV, JSON and Markdown; return the Markdown."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    with open(out_stem.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run", *columns])
        for label, row in rows.items():
            writer.writerow([label, *[row.get(c, "") for c in columns]])
    write_json(out_stem.with_suffix(".json"), rows)
    header = ["run", *[abbreviated(c) for c in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in rows.items():
        cells = [_fmt(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    markdown = "\n".join(lines) + "\n"
    out_stem.with_suffix(".md").write_text(markdown)
    return markdown


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
