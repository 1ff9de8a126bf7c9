"""A grid of runs and the choice among them (``fabric-tram sweep``; the runs themselves are launched by the CLI).

Grid syntax, one argument per key::

    optimizer.name=adam,asam,tram-prev        a key and its values (commas inside [..] or (..) stay in a value)
    asam:optimizer.rho=0.1,0.5,2              a key swept only in the runs of one update rule
    trainer.seed=0,1,2                        the seed key: runs that differ only in it are one setting's seeds

Every combination is a run in its own folder ``OUT/<key=value,...>``. Selection: for each update rule, the setting
with the lowest mean in-domain validation loss over its seeds; the report gives each selected setting's test
metrics as mean ± std with a 95% confidence interval over seeds (Student's t), the selection table of every
setting, and a figure of validation loss against each setting.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fabric_tram.analysis.results import runs_metric
from fabric_tram.analysis.stats import mean_ci, mean_std_ci
from fabric_tram.analysis.tables import metric_name, run_row, write_table
from fabric_tram.loss import token_weighted_loss

SEED_KEY = "trainer.seed"
RULE_KEY = "optimizer.name"


@dataclass
class Grid:
    common: dict[str, list[str]] = field(default_factory=dict)  # key -> values, in every run
    per_rule: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # rule -> key -> values


@dataclass(frozen=True)
class Point:
    """One run of the grid: its overrides, its folder's name, its rule and its setting (all but the seed)."""

    overrides: tuple[str, ...]
    label: str
    rule: str | None
    setting: str

    def run_dir(self, out: Path) -> Path:
        return Path(out) / self.label


def split_values(text: str) -> list[str]:
    """``a,b,[c,d]`` -> ``['a', 'b', '[c,d]']``: commas inside brackets or parentheses belong to the value."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [v.strip() for v in values]


def parse_grid(args: list[str] | tuple[str, ...]) -> Grid:
    """Parse ``key=v1,v2`` and ``rule:key=v1,v2`` arguments; a malformed one raises naming it and the fix."""
    grid = Grid()
    for arg in args:
        head, sep, text = arg.partition("=")
        rule, _, key = head.rpartition(":")
        values = split_values(text) if sep else []
        if not sep or not key or "." not in key or not all(values):
            raise ValueError(
                f"sweep argument {arg!r} is not KEY=V1,V2,... with a dotted key and non-empty values "
                "(e.g. optimizer.lr=1e-4,3e-4, or asam:optimizer.rho=0.1,0.5 for one rule's runs only)"
            )
        if rule and key == RULE_KEY:
            raise ValueError(f"sweep argument {arg!r}: {RULE_KEY} cannot be scoped to a rule; give it unscoped")
        target = grid.per_rule.setdefault(rule, {}) if rule else grid.common
        if key in target:
            raise ValueError(f"sweep key {head!r} is given twice; put all its values in one argument")
        if len(set(values)) != len(values):
            raise ValueError(f"sweep argument {arg!r} repeats a value")
        target[key] = values
    if not grid.common and not grid.per_rule:
        raise ValueError("a sweep needs at least one KEY=V1,V2,... argument")
    return grid


def expand(grid: Grid, default_rule: str | None) -> list[Point]:
    """Every combination, rule by rule: the common keys times that rule's own keys."""
    rules = grid.common.get(RULE_KEY) or [default_rule]
    unknown = sorted(set(grid.per_rule) - set(rules))
    if unknown:
        raise ValueError(
            f"sweep keys scoped to {', '.join(unknown)}, which the sweep does not run "
            f"(its rules: {', '.join(str(r) for r in rules)}); add them to {RULE_KEY}=... or drop those keys"
        )
    points = []
    for rule in rules:
        keys = {k: v for k, v in grid.common.items() if k != RULE_KEY}
        keys.update(grid.per_rule.get(rule, {}))
        fixed = [f"{k}={v[0]}" for k, v in keys.items() if len(v) == 1]  # one value: set in every run, not named
        swept = {k: v for k, v in keys.items() if len(v) > 1}
        ordered = ([RULE_KEY] if len(rules) > 1 else []) + [k for k in swept if k != SEED_KEY]
        ordered += [SEED_KEY] if SEED_KEY in swept else []
        choices = [[rule] if k == RULE_KEY else swept[k] for k in ordered]
        rule_override = [f"{RULE_KEY}={rule}"] if rule is not None and RULE_KEY in grid.common else []
        for combo in itertools.product(*choices):
            pairs = list(zip(ordered, combo, strict=True))
            label = ",".join(f"{k}={v}" for k, v in pairs).replace("/", "_") or "run"
            setting = ",".join(f"{k}={v}" for k, v in pairs if k not in (SEED_KEY, RULE_KEY)) or "(recipe)"
            overrides = rule_override + fixed + [f"{k}={v}" for k, v in pairs if k != RULE_KEY]
            points.append(Point(tuple(overrides), label, rule, setting))
    return points


# ------------------------------------------------------------------------------------------- selection and report


def validation_loss(results: dict, train_domains: list[str]) -> float:
    """The in-domain validation loss of a run (token-weighted over its training domains), as the trainer's
    best-checkpoint choice computes it."""
    metrics = results.get("validation")
    if not metrics:
        raise ValueError("a sweep selects on the validation split: add validation to trainer.eval_splits")
    return token_weighted_loss(metrics, train_domains)


def collect(points: list[Point], out: Path) -> dict[str, dict[str, list[dict]]]:
    """Finished runs by rule and setting: {rule: {setting: [results.json, ...]}} (seeds in grid order)."""
    found: dict[str, dict[str, list[dict]]] = {}
    for point in points:
        path = point.run_dir(out) / "results.json"
        if path.is_file():
            data = json.loads(path.read_text())
            data["run_dir"] = str(point.run_dir(out))
            found.setdefault(data["optimizer"], {}).setdefault(point.setting, []).append(data)
    return found


def select(found: dict[str, dict[str, list[dict]]]) -> dict[str, str]:
    """Each rule's setting with the lowest mean in-domain validation loss over its seeds."""
    return {
        rule: min(
            settings,
            key=lambda s: statistics.fmean(validation_loss(r["results"], r["train_domains"]) for r in settings[s]),
        )  # fmt: skip
        for rule, settings in found.items()
    }


def summarise(points: list[Point], out: Path, split: str | None = None) -> str:
    """Write ``OUT/sweep/selection.{md,csv,json}``, ``OUT/sweep/selected.{md,csv,json}`` and ``sweep.png``;
    return the Markdown of both tables. Unfinished runs are counted and left out."""
    out = Path(out)
    found = collect(points, out)
    if not found:
        raise FileNotFoundError(f"no run of this sweep under {out} has finished (no results.json yet)")
    chosen = select(found)
    selection, selected = {}, {}
    for rule, settings in found.items():
        for setting, runs in settings.items():
            losses = [validation_loss(r["results"], r["train_domains"]) for r in runs]
            mark = " (selected)" if chosen[rule] == setting else ""
            selection[f"{rule} {setting}{mark}"] = {
                "seeds": len(runs),
                "validation loss": mean_std_ci(losses, digits=4),
            }
        runs = settings[chosen[rule]]
        split_used = split or ("test" if "test" in runs[0]["results"] else "validation")
        metric = runs_metric(runs)
        rows = [run_row(r["results"], r["train_domains"], split_used, metric) for r in runs]
        columns = list(dict.fromkeys(c for row in rows for c in row))
        selected[f"{rule} {chosen[rule]} (n={len(runs)})"] = {c: mean_std_ci([row[c] for row in rows if c in row])
                                                               for c in columns}  # fmt: skip
    folder = out / "sweep"
    left = sum(not (p.run_dir(out) / "results.json").is_file() for p in points)
    text = f"selection on in-domain validation loss (mean ± std [95% CI] over seeds); {left} run(s) unfinished:\n"
    text += write_table(selection, ["seeds", "validation loss"], folder / "selection")
    columns = list(dict.fromkeys(c for row in selected.values() for c in row))
    text += f"\n{split_used} {metric_name(metric)} of each rule's selected setting (mean ± std [95% CI] over seeds):\n"
    text += write_table(selected, columns, folder / "selected")
    plot_selection(found, chosen, folder / "sweep.png")
    return text


def selected_run_dirs(points: list[Point], out: Path) -> list[Path]:
    found = collect(points, out)
    chosen = select(found)
    return [Path(r["run_dir"]) for rule, settings in found.items() for r in settings[chosen[rule]]]


def plot_selection(found: dict, chosen: dict[str, str], path: Path) -> None:
    """Validation loss (mean ± 95% CI over seeds) of every setting, one panel per rule; the selected one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(found), figsize=(3.2 * len(found), 3.4), squeeze=False, sharey=True)
    for ax, (rule, settings) in zip(axes[0], found.items(), strict=True):
        names = list(settings)
        stats = [mean_ci([validation_loss(r["results"], r["train_domains"]) for r in settings[s]]) for s in names]
        xs = range(len(names))
        ax.errorbar(xs, [m for m, *_ in stats], yerr=[0 if math.isnan(h) else h for *_, h in stats], fmt="o",
                    label="mean over seeds, 95% CI")  # fmt: skip
        best = names.index(chosen[rule])
        ax.plot([best], [stats[best][0]], "r*", markersize=14, label="selected (lowest mean)")
        ax.set_xticks(list(xs), [s.replace("optimizer.", "") for s in names], rotation=45, ha="right", fontsize=7)
        ax.set_title(rule, fontsize=9)
    axes[0][0].set_ylabel("in-domain validation loss")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
