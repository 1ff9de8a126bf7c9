"""One generic registry, filled by decorators (fairseq-style: a duplicate name raises, as in fairseq's registries).

    @register_model("gpt2", config=GPT2Config, description="GPT-2 (nanoGPT-style) ...")
    class GPT2(nn.Module): ...

Every entry carries its config dataclass and a one-line description; a duplicate name raises.
Plugins are explicit imports: ``--plugin my_pkg.tasks`` or the entry-point group ``fabric_tram.plugins``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from fabric_tram.contracts import check_model_class, check_optimizer_entry, check_task_class

PLUGIN_ENTRY_POINT_GROUP = "fabric_tram.plugins"


@dataclass(frozen=True)
class Entry:
    name: str
    target: Any  # the registered class or function
    config: type | None  # its config dataclass (None: takes no options)
    description: str
    kind: str = ""  # what the entry is, where a registry holds several kinds (optimizers: base or rule)


class Registry:
    """Entries of one kind by name. ``builtins``: the module whose import registers our own entries, imported
    on the first lookup (so that ``import fabric_tram.optim.api`` never loads a task or a data module)."""

    def __init__(self, kind: str, builtins: str | None = None, check: Callable | None = None,
                 kinds: tuple[str, ...] = ("",)):  # fmt: skip
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._builtins = builtins
        self._check = check  # (name, target[, entry kind, config]) -> None, raising what an entry lacks (contracts.py)
        self.kinds = kinds  # the kinds of entry this registry holds; the first is the default

    def load_builtins(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None  # first: a lookup during that import must not recurse
            importlib.import_module(module)

    def register(self, name: str, config: type | None = None, description: str = "", kind: str | None = None
                 ) -> Callable:  # fmt: skip
        kind = self.kinds[0] if kind is None else kind
        if kind not in self.kinds:
            raise ValueError(f"{self.kind} {name!r}: kind {kind!r} is not one of {', '.join(self.kinds)}")

        def decorator(target):
            self.load_builtins()  # a plugin's duplicate of a built-in name is caught here, naming the plugin
            if name in self._entries:
                previous = self._entries[name].target
                raise ValueError(
                    f"duplicate {self.kind} name {name!r}: already registered by "
                    f"{previous.__module__}.{getattr(previous, '__qualname__', previous)}; choose another name"
                )
            if self._check is not None:
                self._check(name, target, kind, config)
            doc = (getattr(target, "__doc__", None) or "").strip().splitlines()
            self._entries[name] = Entry(name, target, config, description or (doc[0] if doc else ""), kind)
            return target

        return decorator

    def get(self, name: str) -> Entry:
        if name not in self:
            raise KeyError(self.describe_unknown(name))
        return self._entries[name]

    def describe_unknown(self, name: str) -> str:
        """The error for an unknown name: the closest valid names, then all of them."""
        close = difflib.get_close_matches(str(name), self.names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind} names: {', '.join(self.names())}"

    def build(self, name: str, *args, **kwargs):
        return self.get(name).target(*args, **kwargs)

    def names(self) -> list[str]:
        self.load_builtins()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        self.load_builtins()
        return name in self._entries

    def unregister(self, name: str) -> None:
        """Remove an entry (for tests and interactive re-definition); unknown names raise."""
        self.get(name)
        del self._entries[name]


MODELS = Registry("model", "fabric_tram.models", check_model_class)
TASKS = Registry("task", "fabric_tram.tasks", check_task_class)
# an optimizer is a base optimizer (builds a torch optimizer) or an update rule (wraps one: register_rule)
OPTIMIZERS = Registry("optimizer", "fabric_tram.optim", check_optimizer_entry, kinds=("base optimizer", "update rule"))
DIVERGENCES = Registry("divergence", "fabric_tram.optim.divergences")
SCHEDULES = Registry("schedule", "fabric_tram.optim.schedules")
REGISTRIES = {
    "models": MODELS,
    "tasks": TASKS,
    "optimizers": OPTIMIZERS,
    "divergences": DIVERGENCES,
    "schedules": SCHEDULES,
}

register_model = MODELS.register
register_task = TASKS.register
register_optimizer = OPTIMIZERS.register
register_divergence = DIVERGENCES.register
register_schedule = SCHEDULES.register

_loaded_plugins: set[str] = set()


def load_builtins() -> None:
    """Import our own modules so that their decorators fill every registry (idempotent; each registry also
    does this for itself on its first lookup)."""
    for registry in REGISTRIES.values():
        registry.load_builtins()


def load_plugins(modules: tuple[str, ...] | list[str] = ()) -> None:
    """Import plugin modules named on the command line and every ``fabric_tram.plugins`` entry point."""
    load_builtins()
    if modules and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: a plugin module in the working directory is found
    for ep in entry_points(group=PLUGIN_ENTRY_POINT_GROUP):
        if ep.value not in _loaded_plugins:
            _loaded_plugins.add(ep.value)
            ep.load()
    for module in modules:
        if module in _loaded_plugins:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"plugin module {module!r} could not be imported ({err}); pass an importable dotted module path "
                "(is its folder on PYTHONPATH, or its package installed?)"
            ) from err
        _loaded_plugins.add(module)
