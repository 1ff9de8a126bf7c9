"""Registries (duplicates, lookups) and config (overrides, errors naming keys and types, YAML round trip)."""

import pytest

from fabric_tram.config import ConfigError, dump_yaml, load_config, load_yaml, parse_overrides, to_dict
from fabric_tram.registry import MODELS, OPTIMIZERS, Registry, load_builtins

load_builtins()


def test_duplicate_name_raises_and_keeps_the_first():
    registry = Registry("thing")

    @registry.register("a", description="first")
    def first():
        return 1

    with pytest.raises(ValueError, match="duplicate thing name 'a'"):
        registry.register("a")(lambda: 2)
    assert registry.build("a") == 1


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match=r"Did you mean 'adam'.*Valid optimizer names: adam, adamw, asam.*tram-prev"):
        OPTIMIZERS.get("adma")
    with pytest.raises(ConfigError, match=r"model.name: unknown model 'gtp2'.*gpt2"):
        load_config(None, ["model.name=gtp2", "task.name=lm", "optimizer.name=adam"])


def test_entries_carry_config_and_description():
    entry = MODELS.get("gpt2")
    assert entry.config.__name__ == "GPT2Config" and entry.description


BASE = ["model.name=gpt2", "task.name=lm", "optimizer.name=adam"]


def test_overrides_are_typed():
    config = load_config(
        None,
        BASE
        + [
            "optimizer.lr=1e-4",
            "optimizer.betas=[0.9,0.95]",
            "trainer.max_steps=7",
            "trainer.activation_checkpointing=true",
            "model.pretrained=null",
        ],
    )
    assert config.optimizer.lr == 1e-4 and isinstance(config.optimizer.lr, float)
    assert config.optimizer.betas == [0.9, 0.95]
    assert config.trainer.max_steps == 7 and config.trainer.activation_checkpointing is True
    assert config.model.pretrained is None and config.model.sizes()["n_layer"] == 2  # methods of GPT2Config kept


def test_unknown_key_names_the_closest_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr'. Did you mean 'optimizer.lr'"):
        load_config(None, BASE + ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"'trainer.max_step'.*'trainer.max_steps'"):
        load_config(None, BASE + ["trainer.max_step=3"])


def test_wrong_type_names_the_expected_type():
    with pytest.raises(ConfigError, match=r"'trainer.max_steps' expects an integer, got 'many'"):
        load_config(None, BASE + ["trainer.max_steps=many"])
    with pytest.raises(ConfigError, match=r"'optimizer.lr' expects a number"):
        load_config(None, BASE + ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match="strategy='fdsp' is not one of auto, ddp, fsdp"):
        load_config(None, BASE + ["trainer.strategy=fdsp"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["trainer.max_steps"])


def test_switching_optimizer_keeps_shared_keys_and_drops_foreign_ones(tmp_path):
    recipe = tmp_path / "r.py"
    recipe.write_text(
        "RECIPE = {'model': {'name': 'gpt2'}, 'task': {'name': 'lm'},"
        " 'optimizer': {'name': 'adam', 'lr': 0.1, 'betas': [0.8, 0.9]}}\n"
    )
    config = load_config(recipe, ["optimizer.name=sgd"])
    assert config.optimizer.name == "sgd" and config.optimizer.lr == 0.1 and not hasattr(config.optimizer, "betas")


def test_switching_to_an_update_rule_keeps_the_base_optimizer_keys(tmp_path):
    recipe = tmp_path / "r.py"
    recipe.write_text(
        "RECIPE = {'model': {'name': 'gpt2'}, 'task': {'name': 'lm'},"
        " 'optimizer': {'name': 'adam', 'lr': 5e-4, 'betas': [0.8, 0.9]}}\n"
    )
    for rule in ("asam", "tram-prev", "trpo"):
        config = load_config(recipe, [f"optimizer.name={rule}"])
        assert (config.optimizer.base, config.optimizer.lr, config.optimizer.betas) == ("adam", 5e-4, [0.8, 0.9])
    config = load_config(recipe, ["optimizer.name=sam", "optimizer.base=sgd"])
    assert config.optimizer.lr == 5e-4 and not hasattr(config.optimizer, "betas")


def test_yaml_round_trip(tmp_path):
    config = load_config(None, BASE + ["optimizer.lr=3e-4", "task.train_domains=[licenses]", "trainer.devices=2"])
    dump_yaml(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(config)
    assert load_yaml(tmp_path / "config.yaml")["optimizer"]["lr"] == 3e-4
    assert to_dict(load_config(tmp_path)) == to_dict(config)  # a run folder loads through its config.yaml


def test_plugin_import_error_is_clear():
    from fabric_tram.registry import load_plugins

    with pytest.raises(ModuleNotFoundError, match="plugin module 'no_such_pkg.tasks' could not be imported"):
        load_plugins(["no_such_pkg.tasks"])


def test_optional_fields_are_coerced_like_the_others():
    """`X | None` annotations (PEP 604) are coerced as Optional[X] are: YAML reads 1e-3 as a string."""
    base = ["model.name=gpt2", "task.name=lm", "optimizer.name=tram-prev"]
    config = load_config(None, base + ["optimizer.max_radius=1e-3", "optimizer.eta=1e-2", "trainer.peak_flops=1e12",
                                       "model.n_layer=3"])  # fmt: skip
    assert config.optimizer.max_radius == 1e-3 and config.optimizer.eta == 1e-2 and config.trainer.peak_flops == 1e12
    assert config.model.n_layer == 3
    with pytest.raises(ConfigError, match="optimizer.eta' expects float, got 'big'"):
        load_config(None, ["model.name=gpt2", "task.name=lm", "optimizer.name=tram-prev", "optimizer.eta=big"])


def test_the_docs_tables_and_descriptions_give_each_rule_the_passes_and_state_its_class_declares():
    """Passes and state are declared once, on the class; `fabric-tram list` derives its text from it, and the
    tables of docs/algorithms.md must agree (a rule whose cost changes fails here until the docs say so)."""
    import re
    from pathlib import Path

    from fabric_tram.optim.update_rule import cost, rule_class
    from fabric_tram.registry import OPTIMIZERS

    text = (Path(__file__).resolve().parents[1] / "docs" / "algorithms.md").read_text()
    rows = {}  # the rule tables: name | perturbation or loss | defaults | passes fwd / no-grad / bwd | state
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("| |", "|  |").strip().strip("|").split(" | ")]  # "|" also in p(·|x)
        if line.startswith("| `") and len(cells) == 5:
            names = re.findall(r"`([a-z0-9+-]+)`", cells[0].split("(")[0])
            rows.update(zip(names, re.findall(r"\d+ / \d+ / \d+", cells[3]), strict=True))
    rules = [n for n in OPTIMIZERS.names() if rule_class(n).__name__ != "UpdateRule"]
    assert len(rules) == 13 and set(rows) == set(rules), sorted(set(rows) ^ set(rules))
    for name in rules:
        cls = rule_class(name)
        assert rows[name] == " / ".join(map(str, cls.passes)), name
        assert OPTIMIZERS.get(name).description.endswith(cost(cls)), name


def test_the_optimizer_registry_knows_each_entrys_kind_and_refuses_a_config_that_says_otherwise():
    from dataclasses import dataclass

    from fabric_tram.contracts import ContractError
    from fabric_tram.optim.update_rule import UpdateRule, is_rule, register_rule, rule_class
    from fabric_tram.registry import OPTIMIZERS, register_optimizer

    kinds = {entry.name: entry.kind for entry in OPTIMIZERS.entries()}
    assert {n for n, k in kinds.items() if k == "base optimizer"} == {"adam", "adamw", "sgd"}
    assert len([k for k in kinds.values() if k == "update rule"]) == len(kinds) - 3 == 13
    assert all(is_rule(n) == (kinds[n] == "update rule") for n in kinds)
    assert rule_class("adam") is UpdateRule and rule_class("tram-prev").__name__ == "TRAMPrev"

    @dataclass
    class WithBase:
        base: str = "adam"

    @dataclass
    class WithoutBase:
        lr: float = 0.1

    with pytest.raises(ContractError, match="optimizer 'disguised-rule': its config has a base field"):
        register_optimizer("disguised-rule", config=WithBase)(lambda params, config: None)
    with pytest.raises(ContractError, match="update rule 'baseless-rule': its config WithoutBase has no base field"):
        register_rule("baseless-rule", WithoutBase, "no base")(type("Baseless", (UpdateRule,), {}))
    with pytest.raises(ValueError, match="kind 'scheduler' is not one of base optimizer, update rule"):
        register_optimizer("odd", kind="scheduler")
    assert not {"disguised-rule", "baseless-rule", "odd"} & set(OPTIMIZERS.names())
