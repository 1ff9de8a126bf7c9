"""``fabric-tram sweep``: a grid of runs from one recipe, trained here one after another or in processes of their
own, then each rule's setting selected on validation (fabric_tram/analysis/sweep.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from fabric_tram.cli.commands import main, plugin_option, train_job
from fabric_tram.config import load_config
from fabric_tram.config_compare import refuse_another_run
from fabric_tram.engine.reporting import reported_errors
from fabric_tram.registry import load_plugins


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("source")
@click.argument("grid", nargs=-1, required=True)
@click.option("--out", default=None, help="folder of the sweep's runs and its report (default: runs/sweep-RECIPE)")
@click.option("--parallel", default=1, show_default=True, help="runs at once, each in its own process")
@click.option("--report-only", is_flag=True, help="summarise the finished runs, train nothing")
@plugin_option
def sweep(source, grid, out, parallel, report_only, plugins):
    """Train a grid of runs from SOURCE and select each rule's setting on validation.

    GRID: KEY=V1,V2,... (every run), RULE:KEY=V1,V2,... (that rule's runs only), a single value sets it in every
    run; trainer.seed=0,1,2 gives each setting its seeds. Each run has its own folder under --out; an
    interrupted sweep resumes unfinished runs and skips finished ones. Writes OUT/sweep/: selection.md (every
    setting's validation loss), selected.md (the selected settings' test table, mean ± std and 95% CI over
    seeds), sweep.png, figure2.png and curves.png.
    """
    from fabric_tram.analysis import sweep as grid_search
    from fabric_tram.analysis.results import report as make_report

    with reported_errors():
        load_plugins(plugins)
        if parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {parallel}")
        out = Path(out or f"runs/sweep-{Path(source).stem}")
        points = grid_search.expand(grid_search.parse_grid(grid), load_config(source).optimizer.name)
        configs = [load_config(source, point_overrides(p, out)) for p in points]  # every bad key/value, up front
        if "validation" not in configs[0].trainer.eval_splits:
            raise ValueError("a sweep selects on the validation split: add validation to trainer.eval_splits")
        if not report_only:
            from fabric_tram.engine.tracking import sweep_overrides

            tracked = sweep_overrides(configs[0], out.name, out)  # the tracking backends show the sweep together
            configs = [load_config(source, point_overrides(p, out, tracked)) for p in points]
            run_points(source, points, configs, out, parallel, plugins, tracked)
        click.echo(grid_search.summarise(points, out))
        selected = grid_search.selected_run_dirs(points, out)
        click.echo(make_report(selected, out / "sweep"))
    click.echo(f"written: {out / 'sweep'}/(selection.md, selected.md, sweep.png, report.md, figure2.png, curves.png)")


def point_overrides(point, out: Path, tracked: list[str] = ()) -> list[str]:
    run_dir = point.run_dir(out)
    resume = ["trainer.resume=auto"] if (run_dir / "config.yaml").is_file() else []  # interrupted: continue
    return [*point.overrides, *tracked, f"trainer.run_dir={run_dir}", *resume]


def run_points(source, points, configs, out: Path, parallel: int, plugins, tracked: list[str] = ()) -> None:
    """Train the points without results yet: in this process one after another, or ``parallel`` at a time in
    processes of their own (threads shared out among them); progress says how many remain."""
    finished = [(p, c) for p, c in zip(points, configs, strict=True) if (p.run_dir(out) / "results.json").is_file()]
    for point, config in finished:  # a finished run is reused only if it is this point's run
        refuse_another_run(point.run_dir(out), config)
    todo = [(p, c) for p, c in zip(points, configs, strict=True) if not (p.run_dir(out) / "results.json").is_file()]
    click.echo(f"sweep: {len(points)} runs, {len(points) - len(todo)} finished, {len(todo)} to train -> {out}")
    if parallel == 1:
        for i, (point, config) in enumerate(todo, start=1):
            click.echo(f"== [{i}/{len(todo)}] {point.label} ({len(todo) - i} remaining after it)")
            train_job(config)
        return
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}
    plugin_args = [a for m in plugins for a in ("--plugin", m)]
    running, failed, done = [], [], 0
    queue = list(todo)
    while queue or running:
        while queue and len(running) < parallel:
            point, _ = queue.pop(0)
            log = out / "logs" / f"{point.label}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "fabric_tram.cli", "train", source, *point_overrides(point, out, tracked)]
            with open(log, "w") as fh:
                process = subprocess.Popen([*command, *plugin_args], stdout=fh, stderr=subprocess.STDOUT, env=env)
            running.append((point, process, log))
            click.echo(f"== started {point.label} (log: {log})")
        time.sleep(1.0)
        for entry in [r for r in running if r[1].poll() is not None]:
            running.remove(entry)
            done += 1
            point, process, log = entry
            if process.returncode != 0:
                failed.append(f"{point.label} (exit {process.returncode}; see {log})")
            click.echo(f"== [{done}/{len(todo)}] {point.label} ended ({len(todo) - done} remaining)")
    if failed:
        raise ChildProcessError("sweep runs failed: " + "; ".join(failed) + ". Rerun the sweep to retry them")
