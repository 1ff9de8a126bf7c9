"""``fabric-tram``: train, evaluate, list.

fabric-tram train recipes/tiny_sample.py optimizer.lr=1e-3 trainer.max_steps=50
fabric-tram evaluate runs/tiny/checkpoints/step-00000050
fabric-tram list
fabric run --devices 2 recipes/tiny_sample.py trainer.strategy=fsdp     # several processes
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fabric_tram.config import ConfigError, load_config, merge, parse_overrides, resolve
from fabric_tram.registry import REGISTRIES, load_plugins

plugin_option = click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="MODULE",
    help="import MODULE first, so its @register_* decorators add models/tasks/optimizers",
)


def _fail(err: Exception) -> None:
    raise click.ClickException(f"{type(err).__name__}: {err}")


def train_job(config):
    """A training job as the CLI and the recipes run it: ``train``, then the run's paper table (Table 4's row:
    training domain, each zero-shot domain, their average) written into the run folder by rank 0."""
    from fabric_tram.engine.trainer import train

    run = train(config)
    domains = list(getattr(run.task, "train_domains", []))
    if run.fabric.is_global_zero and domains:
        from fabric_tram.analysis.results import write_run_results

        run.fabric.print(write_run_results(run.run_dir, run.results, domains, config.optimizer.name))
    return run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fine-tune pre-trained models with TRAM and its baselines on Lightning Fabric."""


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("source", required=False)
@click.argument("overrides", nargs=-1)
@plugin_option
@click.option("--smoke", is_flag=True, help="the recipe's SMOKE setting: tiny model, bundled data, a few steps")
def train(source, overrides, plugins, smoke):
    """Train from SOURCE (a recipe .py, a config .yaml or a run folder) plus dotted key=value OVERRIDES."""
    if source is not None and "=" in source:  # no source, only overrides
        source, overrides = None, (source, *overrides)
    try:
        load_plugins(plugins)
        config = load_config(source, overrides, smoke=smoke)
        train_job(config)
    except (ConfigError, KeyError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        _fail(err)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("checkpoint")
@click.argument("overrides", nargs=-1)
@click.option("--split", "splits", multiple=True, help="split(s) to score (default: the config's trainer.eval_splits)")
@plugin_option
def evaluate(checkpoint, overrides, splits, plugins):
    """Score CHECKPOINT (a checkpoint folder, or a run folder: its newest checkpoint) on the evaluation splits."""
    from fabric_tram.engine.evaluation import evaluate_checkpoint

    try:
        load_plugins(plugins)
        results = evaluate_checkpoint(checkpoint, overrides, splits)
    except (ConfigError, KeyError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        _fail(err)
    from fabric_tram.engine.evaluation import format_results

    click.echo(format_results(results))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option(
    "--out", "out_dir", default="report", show_default=True, help="folder for report.{csv,json,md} and figure2.png"
)
@click.option("--split", default=None, help="split to compare (default: test if evaluated, else the first)")
def report(run_dirs, out_dir, split):
    """Put several runs side by side (grouped by update rule, mean ± std over seeds) and draw Figure 2."""
    from fabric_tram.analysis.results import report as make_report

    try:
        click.echo(make_report([Path(d) for d in run_dirs], Path(out_dir), split))
    except (FileNotFoundError, ValueError, KeyError) as err:
        _fail(err)
    click.echo(f"written: {Path(out_dir) / 'report.md'}, {Path(out_dir) / 'figure2.png'}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("source")
@click.argument("overrides", nargs=-1)
@click.option("--devices", default=1, show_default=True, help="devices per node")
@click.option("--num-nodes", default=1, show_default=True)
@plugin_option
def estimate(source, overrides, devices, num_nodes, plugins):
    """Per-device memory (parameters, gradients, optimizer state, rule buffers, activations) and FLOPs per step."""
    from fabric_tram.analysis.estimate import estimate as run_estimate
    from fabric_tram.analysis.estimate import format_estimate

    try:
        load_plugins(plugins)
        config = load_config(source, overrides)
        click.echo(format_estimate(config, run_estimate(config, devices, num_nodes)))
    except (ConfigError, KeyError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        _fail(err)


BENCHMARKS = ("step_cost", "memory", "engine_overhead", "divergence", "gpu_check")


class _HelpToBenchmark(click.Command):
    """`fabric-tram bench --help` is this command's help; `fabric-tram bench NAME --help` is the benchmark's own."""

    def parse_args(self, ctx, args):
        if args and args[0] in BENCHMARKS:
            ctx.help_option_names = []
        return super().parse_args(ctx, args)


@main.command(cls=_HelpToBenchmark, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name", type=click.Choice(BENCHMARKS))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name, args):
    """Run benchmark NAME (the scripts of benchmarks/); ARGS go to it (--size, --device cuda, --repeats, ...;
    `fabric-tram bench NAME --help` lists them)."""
    import runpy

    saved = sys.argv
    sys.argv = [f"fabric-tram bench {name}", *args]
    try:
        runpy.run_module(f"fabric_tram.bench.{name}", run_name="__main__")
    finally:
        sys.argv = saved


@main.command(name="list")
@plugin_option
def list_registries(plugins):
    """Print every registry: models, tasks, optimizers (base and update rules), divergences, schedules."""
    load_plugins(plugins)
    for kind, registry in REGISTRIES.items():
        click.echo(f"{kind}:")
        for entry in registry.entries():
            click.echo(f"  {entry.name:<14} {entry.description}")


def run_recipe(recipe: dict, argv: list[str] | None = None, smoke: dict | None = None):
    """Entry point of ``python recipes/X.py [--smoke] [overrides]`` and ``fabric run recipes/X.py ...``.

    ``--plugin MODULE`` may be given; ``--smoke`` applies the recipe's ``smoke`` overrides (tiny model, bundled
    data, a few steps, the same code path); every other argument is a dotted ``key=value`` override.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in argv:
        if smoke is None:
            sys.exit("error: this recipe has no --smoke setting")
        argv.remove("--smoke")
        recipe = merge(recipe, smoke)
    plugins = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--plugin"]
    overrides = [a for i, a in enumerate(argv) if a != "--plugin" and (i == 0 or argv[i - 1] != "--plugin")]
    try:
        load_plugins(plugins)
        config = resolve(merge(recipe, parse_overrides(overrides)))
    except (ConfigError, KeyError, ValueError, ModuleNotFoundError) as err:
        sys.exit(f"error: {err}")
    return train_job(config)


if __name__ == "__main__":  # pragma: no cover
    main()
