"""Configs are dataclasses; one shape everywhere: a nested dict of sections, resolved against the registries.

A run's config has five sections. ``model``, ``task``, ``optimizer`` and ``schedule`` each carry a ``name``
that picks a registry entry; the entry's config dataclass gives the section's other keys. ``trainer`` is
:class:`TrainerConfig`. An optimizer whose config has a ``base`` field (the update rules) also takes the keys
of its base optimizer's config, flat: ``optimizer.name=sam optimizer.base=adam optimizer.lr=1e-4``.

Overrides are dotted ``key=value`` strings; values are parsed as YAML and coerced to the field's type.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fabric_tram.config_values import ConfigError, build_dataclass, unknown_key_message
from fabric_tram.lora_config import LoraConfig
from fabric_tram.registry import MODELS, OPTIMIZERS, SCHEDULES, TASKS, Registry, load_builtins
from fabric_tram.tracking_config import MLflowSettings, WandbSettings, check_loggers

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    strategy: str = "auto"  # auto | ddp | fsdp (FSDP2 through ModelParallelStrategy)
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed | bf16-true
    accelerator: str = "auto"  # auto | cpu | cuda | ...
    devices: int | str = "auto"  # `fabric run --devices N` overrides this
    num_nodes: int = 1  # `fabric run --num-nodes M` overrides this
    micro_batch_size: int | str = 8  # sequences per micro-batch per device; auto: the largest that fits (needs
    # global_batch_size; engine/batch_size.py)
    accumulate: int = 1  # micro-batches per optimizer step on each device (follows from global_batch_size if set)
    global_batch_size: int | None = None  # examples per optimizer step over all processes, kept exactly
    max_steps: int = 100
    max_epochs: int = 0  # > 0: train this many passes over the training set (sets max_steps once data is known)
    data_workers: int = 0  # background processes that build each step's batches (decode, augment); 0: in-line
    grad_clip: float = 1.0  # max global L2 norm of the (descent) gradient; 0 disables
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (GPUs: faster steps after a first slow one)
    compile_backend: str = "inductor"  # torch.compile's backend (the tests use aot_eager: no code generation)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 0  # batches of micro_batch_size per split over all processes; 0: the whole split
    eval_splits: list = field(default_factory=lambda: ["validation"])
    save_every: int = 0  # 0: save only at the end
    keep_last: int = 3
    select_best: bool = False  # keep the checkpoint with the lowest in-domain validation loss; evaluate it at the end
    resume: str | None = None  # a checkpoint folder, or "auto" for the newest in run_dir/checkpoints
    progress_bar: bool = True
    keep_freed_cpu_memory: bool = True  # CPU runs: malloc reuses freed memory instead of page-faulting it back
    peak_flops: float | None = None  # per device, for MFU (default: our table of A100/H100/H200 dense peaks)
    on_nonfinite: str = "stop"  # non-finite loss or gradient: stop (an error naming the step), or skip and count
    preflight: bool = True  # refuse a run whose estimated memory exceeds the device's free memory, before building it
    loggers: list = field(default_factory=lambda: ["csv", "tensorboard"])  # + wandb, mlflow (csv always; tensorboard
    # when installed); engine/tracking.py
    wandb: WandbSettings = field(default_factory=WandbSettings)
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)


@dataclass
class Config:
    model: Any
    task: Any
    optimizer: Any
    schedule: Any
    trainer: TrainerConfig


SECTION_REGISTRIES: dict[str, Registry] = {
    "model": MODELS,
    "task": TASKS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
}
DEFAULT_NAMES = {"schedule": "constant"}
_section_classes: dict[tuple, type] = {}


# ------------------------------------------------------------------------------------------- overrides


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. trainer.max_steps=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
        set_dotted(nested, key.strip(), value)
    return nested


def set_dotted(nested: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = nested
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def merge(base: dict, update: dict) -> dict:
    """Deep merge; a section's ``name`` change drops the keys that belonged to the old entry."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            old = out[key]
            if "name" in value and value["name"] != old.get("name") and key in SECTION_REGISTRIES:
                keep = _shared_keys(key, value["name"], value.get("base", old.get("base")))
                old = {k: v for k, v in old.items() if k in keep}
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def _shared_keys(section: str, new_name: str, base) -> set:
    """Keys that stay meaningful when a section switches entry: the new entry's, and for an update rule its base
    optimizer's too (lr and betas survive adam -> tram-prev). An unknown name keeps nothing (resolve then
    names the valid ones)."""
    if new_name not in SECTION_REGISTRIES[section]:
        return set()
    if section == "optimizer":
        base = rule_base(new_name, {"base": base} if base else {})
    else:
        base = None
    return {f.name for f in dataclasses.fields(section_class(section, new_name, base))}


def _base_field(name: str) -> dataclasses.Field | None:
    """The ``base`` field (its default: the rule's default base) of an update rule's config; None for a base
    optimizer (whether an entry is a rule is the registry's answer: its kind)."""
    entry = OPTIMIZERS.get(name)
    if entry.kind != "update rule":
        return None
    return next(f for f in dataclasses.fields(entry.config) if f.name == "base")


def rule_base(name: str, values: dict) -> str | None:
    """The one place that decides "which base optimizer": for an update rule (an optimizer whose config has a
    ``base`` field) the base named in ``values`` or the rule's default; None for a base optimizer itself."""
    field_ = _base_field(name)
    if field_ is None:
        return None
    base = values.get("base") or field_.default
    if base not in OPTIMIZERS:
        raise ConfigError(f"optimizer.base: {OPTIMIZERS.describe_unknown(base)}")
    if _base_field(base) is not None:
        bases = [n for n in OPTIMIZERS.names() if _base_field(n) is None]
        raise ConfigError(f"optimizer.base={base!r} is an update rule; choose a base optimizer: {', '.join(bases)}")
    return base


def drop_own_base(name: str, base) -> None:
    """A recipe may name its base optimizer twice, ``{name: sgd, base: sgd}``, so that a rule chosen later by
    ``optimizer.name=tram-prev`` wraps SGD rather than the rules' default; any other base on a base optimizer is
    a mistake."""
    if base != name:
        raise ConfigError(
            f"optimizer.base={base!r} applies to update rules, and optimizer.name={name!r} is a base optimizer: "
            f"drop optimizer.base, or set it to {name!r} (the base a rule named later wraps)"
        )


def base_optimizer_name(section) -> str:
    """The registry name of the torch optimizer to build from a resolved optimizer section."""
    return getattr(section, "base", None) or section.name


# ------------------------------------------------------------------------------------------- resolution


def section_class(section: str, name: str, base: str | None) -> type:
    """The dataclass of one section: the entry's config plus ``name`` (and the base optimizer's keys)."""
    registry = SECTION_REGISTRIES[section]
    try:
        entry = registry.get(name)
    except KeyError as err:
        raise ConfigError(f"{section}.name: {err.args[0]}") from None
    key = (section, name, base)
    if key not in _section_classes:
        config_cls = entry.config
        fields_: list = [("name", str, field(default=name))]
        if section == "model":  # adapters apply to any model (engine-level): every model section has the key
            fields_.append(("lora", LoraConfig | None, field(default=None)))
        hints = dict(typing.get_type_hints(config_cls)) if config_cls else {}
        if base is not None:
            base_cls = section_class(section, base, None)
            own = {f.name for f in dataclasses.fields(config_cls)} | {"name"}
            fields_ += [(f.name, f.type, _field_default(f)) for f in dataclasses.fields(base_cls) if f.name not in own]
            hints = {**base_cls._hints, **hints}
        cls_name = f"{section.capitalize()}Section_{name}".replace("-", "_").replace("+", "_")
        ns = {"__module__": config_cls.__module__ if config_cls else __name__}
        # subclass the entry's config so that its methods (e.g. GPT2Config.sizes) stay available
        cls = dataclasses.make_dataclass(cls_name, fields_, bases=(config_cls,) if config_cls else (), namespace=ns)
        cls._hints = {**hints, "name": str, **({"lora": LoraConfig | None} if section == "model" else {})}
        _section_classes[key] = cls
    return _section_classes[key]


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return field(default=f.default)
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory)
    return field()


def resolve(raw: dict) -> Config:
    """Turn a nested dict into a :class:`Config`, validating every key and coercing every value."""
    load_builtins()
    unknown = set(raw) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ConfigError(unknown_key_message("", sorted(unknown)[0], [f.name for f in dataclasses.fields(Config)]))
    sections = {}
    for section in SECTION_REGISTRIES:
        values = dict(raw.get(section) or {})
        name = values.get("name", DEFAULT_NAMES.get(section))
        if name is None:
            raise ConfigError(
                f"{section}.name is missing; choose one of: {', '.join(SECTION_REGISTRIES[section].names())}"
            )
        base = rule_base(name, values) if section == "optimizer" and name in OPTIMIZERS else None
        if section == "optimizer" and base is None and "base" in values:
            drop_own_base(name, values.pop("base"))
        sections[section] = build_dataclass(section_class(section, name, base), values, section)
        check_section(sections[section], SECTION_REGISTRIES[section].get(name).config, base)
    sections["trainer"] = build_dataclass(TrainerConfig, dict(raw.get("trainer") or {}), "trainer")
    config = Config(**sections)
    validate(config)
    for section in sections.values():  # a section whose values depend on another's (TRAM's calibration start)
        if hasattr(section, "resolve_with"):
            try:
                section.resolve_with(config)
            except ValueError as err:
                raise ConfigError(str(err)) from None
    config.trainer.run_dir = expand_run_dir(config)
    return config


def expand_run_dir(config: Config) -> str:
    """``trainer.run_dir`` may name the run by its settings, ``{section.key}`` filled from the resolved config:
    ``runs/gpt2_s2orc-{optimizer.name}-seed{trainer.seed}`` (so each rule and seed gets its own folder)."""
    template = config.trainer.run_dir
    try:
        return template.format(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    except (KeyError, AttributeError, IndexError, ValueError) as err:
        raise ConfigError(
            f"trainer.run_dir={template!r}: cannot fill its {{...}} ({type(err).__name__}: {err}); use config keys "
            "such as {optimizer.name} or {trainer.seed} (double the braces for a literal one)"
        ) from None


def check_section(section, config_cls: type | None, base: str | None) -> None:
    """Run the ``check()`` that a registered config dataclass may define (and, for an update rule, its base
    optimizer's, on the same flat section): values are refused here, before anything is built or written."""
    classes = [config_cls] + ([OPTIMIZERS.get(base).config] if base else [])
    for cls in classes:
        check = getattr(cls, "check", None)
        if check is not None:
            try:
                check(section)
            except ValueError as err:  # a ConfigError already, or a plain ValueError from a plugin's check
                raise ConfigError(str(err)) from None


NONFINITE_POLICIES = ("stop", "skip")


def validate(config: Config) -> None:
    validate_trainer(config.trainer)


def validate_trainer(t: TrainerConfig) -> None:
    """The trainer section's values (also run by ``build_fabric`` for a TrainerConfig built by hand)."""
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}")
    if isinstance(t.micro_batch_size, str) and t.micro_batch_size != "auto":
        raise ConfigError(f"trainer.micro_batch_size must be a positive integer or auto, got {t.micro_batch_size!r}")
    sizes = ("micro_batch_size", "accumulate", "max_steps", "log_every", "keep_last", "num_nodes", "global_batch_size")
    for key in sizes:
        value = getattr(t, key)
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {value}")
    for key in ("save_every", "eval_every", "eval_batches", "grad_clip", "max_epochs", "data_workers"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.{key} must be >= 0 (0 turns it off), got {getattr(t, key)}")
    if isinstance(t.devices, str) and t.devices != "auto" or isinstance(t.devices, int) and t.devices < 1:
        raise ConfigError(f"trainer.devices must be a positive integer or 'auto', got {t.devices!r}")
    if t.on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(f"trainer.on_nonfinite={t.on_nonfinite!r} is not one of {', '.join(NONFINITE_POLICIES)}")
    try:
        check_loggers(t.loggers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if t.strategy == "fsdp" and t.precision == "16-mixed":
        raise ConfigError(
            "trainer.precision=16-mixed is refused with trainer.strategy=fsdp (no all-reduced overflow check for "
            "sharded loss scaling yet); use bf16-mixed, or ddp with 16-mixed"
        )


# ------------------------------------------------------------------------------------------- files


def to_dict(config: Config) -> dict:
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in dataclasses.fields(config)}


def dump_yaml(config: Config, path: str | Path) -> None:
    text = yaml.safe_dump(_plain(to_dict(config)), sort_keys=False)
    Path(path).write_text(text)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    return " ".join(
        str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part
    ) or str(err)


def load_recipe(path: str | Path, smoke: bool = False) -> dict:
    """A recipe is a Python file defining ``RECIPE``, a nested dict of sections (raw, unresolved), and
    optionally ``SMOKE``, the overrides of its ``--smoke`` setting."""
    import runpy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    try:
        namespace = runpy.run_path(str(path), run_name="__recipe__")
    except SyntaxError as err:  # a typo in the recipe: where, not a traceback through runpy
        raise ConfigError(f"{path}:{err.lineno}:{err.offset}: syntax error in the recipe: {err.msg}") from None
    if not isinstance(namespace.get("RECIPE"), dict):
        raise ConfigError(f"recipe {str(path)!r} defines no RECIPE dict")
    if smoke:
        if not isinstance(namespace.get("SMOKE"), dict):
            raise ConfigError(f"recipe {str(path)!r} defines no SMOKE dict: it has no --smoke setting")
        return merge(namespace["RECIPE"], namespace["SMOKE"])
    return namespace["RECIPE"]


def load_raw(source: str | Path | dict | None, smoke: bool = False) -> dict:
    """A recipe (.py), a config file (.yaml/.yml), a run folder (its config.yaml) or a dict."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.yaml"
    if path.suffix == ".py":
        return load_recipe(path, smoke)
    if smoke:
        raise ConfigError("--smoke applies to recipes (.py files with a SMOKE dict), not to config files")
    return load_yaml(path)


def load_config(source=None, overrides: list[str] | tuple[str, ...] = (), smoke: bool = False) -> Config:
    return resolve(merge(load_raw(source, smoke), parse_overrides(overrides)))
