"""Imports run one way (docs/design.md, "Layers"): checked on the source, and on what one import really loads."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fabric_tram"
BOTTOM = {
    "registry",
    "contracts",
    "lora_config",
    "tracking_config",
    "config",
    "config_values",
    "config_compare",
    "loss",
    "distributed",
    "jsonfile",
}
# what each part of the package may import from the rest of it (itself always)
ALLOWED = {
    "registry": {"contracts"},
    "contracts": set(),
    "config": {"registry", "config_values", "lora_config", "tracking_config"},
    "lora_config": set(),
    "tracking_config": set(),
    "config_values": set(),
    "config_compare": {"config", "config_values"},
    "loss": set(),
    "distributed": set(),
    "jsonfile": set(),
    "data": BOTTOM,
    "models": BOTTOM,
    "tasks": BOTTOM | {"data"},
    "analysis": BOTTOM | {"models", "data"},
    "optim": BOTTOM,  # an update rule never sees a model class, a task, a dataset or the CLI
    "engine": BOTTOM | {"models", "tasks", "data", "optim"},  # never analysis: tables are the callers' job
    "bench": BOTTOM | {"models", "tasks", "data", "optim", "engine", "analysis"},
    "measure": BOTTOM | {"models", "tasks", "data", "optim", "engine", "analysis"},  # analysis of trained runs
    "cli": BOTTOM | {"models", "tasks", "data", "optim", "engine", "analysis", "measure"},
}


def imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        parts |= {n.split(".")[1] for n in names if n.startswith("fabric_tram.")}
    return parts


def test_every_module_imports_only_from_its_own_layer_or_below():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part in ("__init__", "assets"):
            continue
        extra = imported_parts(path) - ALLOWED[part] - {part}
        if extra:
            wrong.append(f"{path.relative_to(PACKAGE)} imports {sorted(extra)}")
    assert not wrong, wrong


def test_importing_the_user_loop_api_loads_no_task_data_model_or_engine_module():
    code = "import sys, fabric_tram.optim.api; print(' '.join(m for m in sys.modules if m.startswith('fabric_tram')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "fabric_tram.optim.api" in loaded
    assert not [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in ("tasks", "data", "models", "engine")], (
        loaded
    )


def test_a_registry_loads_its_builtins_on_first_use():
    code = "from fabric_tram.registry import OPTIMIZERS; print('tram-prev' in OPTIMIZERS, 'adam' in OPTIMIZERS.names())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]


def test_no_two_modules_of_the_package_import_each_other():
    """The import graph between the package's modules (packages' __init__ files, which fill the registries, aside;
    imports for type checking counted: they are a dependency too) has no cycle: engine/setup.py and
    engine/checkpoint.py once imported each other for a collective helper."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            modules["fabric_tram." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)] = path
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fabric_tram"):
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}  # from x import module
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
