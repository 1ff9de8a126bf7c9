"""What a model and a task must provide (fabric_tram/contracts.py), checked when they are registered: a plugin that
lacks a member is refused at import with a message naming each missing member and what it is for."""

import pytest
import torch

from fabric_tram.contracts import TASK_REQUIRED, ContractError, check_task, model_sizes
from fabric_tram.registry import MODELS, TASKS, register_model, register_task


class CompleteTask:
    train_set = [0, 1]

    def eval_sets(self, split):
        return {}

    def collate(self, examples, indices):
        return {}

    def loss(self, model, batch, **forward_kwargs):
        return None

    def count_targets(self, batch):
        return 0

    @staticmethod
    def metrics(loss_sum, count):
        return {}


@pytest.mark.parametrize("member", sorted(TASK_REQUIRED))
def test_a_task_missing_a_required_method_is_refused_at_registration(member):
    broken = type("Broken", (), {k: v for k, v in vars(CompleteTask).items() if k != member})
    with pytest.raises(ContractError, match=rf"task 'broken-{member}' .*lacks what the engine needs: {member} — "):
        register_task(f"broken-{member}")(broken)
    assert f"broken-{member}" not in TASKS


def test_a_complete_task_registers_and_a_built_task_without_its_training_set_is_refused():
    register_task("complete-task")(CompleteTask)
    try:
        assert "complete-task" in TASKS
        check_task("complete-task", CompleteTask())
        no_data = type("NoData", (), {k: v for k, v in vars(CompleteTask).items() if k != "train_set"})
        with pytest.raises(ContractError, match="lacks what the engine needs: train_set — train_set: the training"):
            check_task("no-data", no_data())
    finally:
        TASKS.unregister("complete-task")


def test_a_model_that_is_no_module_or_has_no_forward_or_a_bad_block_class_is_refused():
    class NotAModule:
        def forward(self, x):
            return x

    class NoForward(torch.nn.Module):
        pass

    class BadBlocks(torch.nn.Module):
        block_class = "Block"

        def forward(self, x):
            return x

    class EmbeddingNotAProperty(torch.nn.Module):
        input_embedding = None

        def forward(self, x):
            return x

    EmbeddingNotAProperty.input_embedding = torch.nn.Embedding(2, 2)
    for cls, expected in ((NotAModule, "must be a torch.nn.Module"), (NoForward, r"must define forward — forward\("),
                          (BadBlocks, "block_class a class or a tuple of classes"),
                          (EmbeddingNotAProperty, "input_embedding a property")):  # fmt: skip
        with pytest.raises(ContractError, match=expected):
            register_model(f"bad-{cls.__name__}")(cls)
        assert f"bad-{cls.__name__}" not in MODELS


def test_every_family_exposes_its_sizes_as_a_dict():
    from fabric_tram.config import load_config
    from fabric_tram.models import build_model

    for name in ("gpt2", "llama", "encoder", "vit"):
        task = {"vit": "image", "encoder": "nli"}.get(name, "lm")
        config = load_config(None, [f"model.name={name}", f"task.name={task}", "optimizer.name=adam"])
        with torch.device("meta"):
            sizes = model_sizes(build_model(config.model))
        assert sizes["n_layer"] > 0 and sizes["n_embd"] > 0, name
        assert ("image_size" in sizes) == (name == "vit") and ("vocab_size" in sizes) == (name != "vit"), name


@pytest.mark.parametrize("member", sorted(TASK_REQUIRED))
def test_a_task_whose_required_member_is_no_method_is_refused(member):
    """Present is not enough: a required member must be callable (``loss = None`` would fail at the first step)."""
    broken = type("NotCallable", (), {**vars(CompleteTask), member: None})
    with pytest.raises(ContractError, match=rf"task 'uncallable-{member}' .*lacks what the engine needs: {member} — "):
        register_task(f"uncallable-{member}")(broken)
    assert f"uncallable-{member}" not in TASKS


def test_a_model_whose_block_class_tuple_holds_a_name_is_refused():
    class Block(torch.nn.Module):
        pass

    class NamesInATuple(torch.nn.Module):
        block_class = (Block, "Block")

        def forward(self, x):
            return x

    class Classes(torch.nn.Module):
        block_class = (Block,)

        def forward(self, x):
            return x

    with pytest.raises(ContractError, match=r"block_class a class or a tuple of classes \(got \(<class"):
        register_model("names-in-a-tuple")(NamesInATuple)
    assert "names-in-a-tuple" not in MODELS
    register_model("classes-in-a-tuple")(Classes)
    MODELS.unregister("classes-in-a-tuple")


# reads of a contract member's name that are not of a model or a task: what each reads instead
NOT_A_CONTRACT_READ = {
    ("fabric_tram/distributed.py", "module", "module"): "DDP's wrapper, in the torch-only leaf below the contracts",
    ("fabric_tram/engine/estimate.py", "model.config", "vocab_size"): "a model config's field",
    ("fabric_tram/engine/export.py", "t", "train_domains"): "the task section of the run's config",
    ("fabric_tram/models/hf.py", "text", "vocab_size"): "a transformers config's field",
    ("fabric_tram/models/hf.py", "hf", "image_size"): "a transformers config's field",
    ("fabric_tram/models/hf.py", "hf", "num_labels"): "a transformers config's field",
}


def test_optional_members_and_wrappers_are_read_through_one_accessor_each():
    """An optional member of a model or a task, a wrapper's module or optimizer, or the loss scaler is read in
    contracts.py, one accessor each with its default (unwrap, unwrap_optimizer, loss_scaler, train_domains, ...),
    and nowhere else by a raw getattr/hasattr: a new read of one elsewhere fails here until it goes through it."""
    import re
    from pathlib import Path

    from fabric_tram.contracts import MODEL_OPTIONAL, TASK_OPTIONAL

    root = Path(__file__).resolve().parents[1]
    members = {*TASK_OPTIONAL, *MODEL_OPTIONAL, "module", "scaler", "_orig_mod", "_original_module", "optimizer"}
    raw = re.compile(r'(?:getattr|hasattr)\(([^,()]+(?:\([^()]*\))?),\s*"(' + "|".join(sorted(members)) + r')"')
    found = set()
    for path in sorted((root / "fabric_tram").rglob("*.py")):
        if path.name == "contracts.py":
            continue
        for match in raw.finditer(path.read_text()):
            found.add((str(path.relative_to(root)), match.group(1).strip(), match.group(2)))
    assert found == set(NOT_A_CONTRACT_READ), sorted(found ^ set(NOT_A_CONTRACT_READ))


def test_every_family_declares_its_sizing_and_one_without_is_told_why_it_cannot_be_sized():
    from dataclasses import dataclass

    from fabric_tram.contracts import Sizing, model_sizing
    from fabric_tram.engine.estimate import sized_section

    for name in ("gpt2", "llama", "encoder", "vit"):
        sizing = model_sizing(MODELS.get(name).target)
        assert isinstance(sizing, Sizing) and "tiny" in sizing.presets and callable(sizing.from_hf), name
    gpt2 = model_sizing(MODELS.get("gpt2").target)
    assert {hub: preset for preset, hub in gpt2.hub_ids.items()}["gpt2-xl"] == "gpt2-xl"

    @dataclass
    class Section:
        name: str = "no-sizing"
        pretrained: str = "my/checkpoint"

    class NoSizing(torch.nn.Module):
        def forward(self, x):
            return x

    register_model("no-sizing", config=Section)(NoSizing)
    try:
        with pytest.raises(ValueError, match="model 'no-sizing' declares no sizing .*model.pretrained='my/checkpoint'"):
            sized_section(Section())
    finally:
        MODELS.unregister("no-sizing")
