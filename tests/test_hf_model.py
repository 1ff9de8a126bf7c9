"""``model.name=hf``: any transformers model under every update rule, equal to our own families in float64.

Checkpoints of three architectures are written here by our families' exporters (GPT-2, a Llama with grouped-query
attention, a BERT classifier), then loaded both ways: ``model.name=gpt2|llama|encoder`` and ``model.name=hf``. Every
update rule takes the same steps on both (the update-rule API, float64), the engine's runs agree (noise through the
hook on the hf model's input embeddings, accumulation), and what the engine refuses it refuses before training.
The 2-process FSDP2 runs of an hf model are in tests/test_distributed.py (one launch for every sharded check).
"""

import pytest
import torch
from conftest import EXACT_ABS, assert_histories_match, small_config

from fabric_tram.bench.step_cost import RULES
from fabric_tram.config import ConfigError, load_config
from fabric_tram.engine.trainer import train
from fabric_tram.models import build_model
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.registry import TASKS

transformers = pytest.importorskip("transformers")
RULE_KEYS = ("n_targets", "loss", "grad_norm", "Tg_norm", "e_norm", "radius", "d", "regulariser", "radius_scale")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """``{family: (native model overrides, hf model overrides, task overrides)}``, each a checkpoint folder."""
    from conftest import hf_checkpoints, write_corpus

    root = tmp_path_factory.mktemp("hf")
    return hf_checkpoints(root, write_corpus(root / "data"))


def task_and_batch(task_overrides: list[str]):
    """The task and a micro-batch of 3 of its examples (language modelling: their first 12 tokens, so that 13
    rules × 2 models × 50,257-word float64 logits stay quick)."""
    config = load_config(None, ["optimizer.name=sgd", "model.name=gpt2", *task_overrides])
    task = TASKS.build(config.task.name, config.task)
    batch = task.collate([task.train_set[i] for i in range(3)], list(range(3)))
    if config.task.name == "lm":
        batch = {k: v[:, :12] if k != "example_index" else v for k, v in batch.items()}
    return task, batch


def double_model(overrides: list[str]) -> torch.nn.Module:
    config = load_config(None, ["optimizer.name=sgd", "task.name=lm", *overrides])
    torch.manual_seed(0)
    return build_model(config.model).double()


def hf_form(model) -> dict[str, torch.Tensor]:
    """The parameters in transformers' names and layout (native families convert; hf is transformers already)."""
    return {k: v.detach() for k, v in model.to_hf(None)[1].items()}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_every_rule_takes_the_same_steps_on_hf_and_on_our_family(checkpoints, family):
    native, hf, task_overrides = checkpoints[family]
    task, batch = task_and_batch(task_overrides)
    if family == "bert":  # the rules noise the embeddings: the batch must reach the model as the task gives it
        assert set(batch) >= {"attention_mask", "token_type_ids"}
    for rule in RULES:
        steps, weights = {}, {}
        for name, overrides in (("native", native), ("hf", hf)):
            model = double_model(overrides + task_overrides[:1])
            loop = UpdateRuleLoop(rule, model, torch.optim.SGD(model.parameters(), lr=0.5), task.loss)
            steps[name] = [loop.step(batch) for _ in range(2)]
            weights[name] = hf_form(model)
        assert_histories_match(steps["native"], steps["hf"], RULE_KEYS, label=f"{family} {rule}")
        common = set(weights["native"]) & set(weights["hf"])
        assert len(common) >= len(weights["native"]) - 1, sorted(set(weights["native"]) ^ set(weights["hf"]))
        moved = max((weights["native"][k] - weights["hf"][k]).abs().max().item() for k in common)
        assert moved < EXACT_ABS, (family, rule, moved)


def test_engine_runs_of_hf_and_gpt2_agree_with_noise_and_accumulation(checkpoints, tmp_path):
    """Through the engine: tram-x (noise by the hook on the hf model's embedding) and r3f, micro-batches 2 × 4
    against 8 × 1."""
    native, hf, task_overrides = checkpoints["gpt2"]
    data = task_overrides[1].split("=", 1)[1]
    for rule, extra in (("tram-x", ["optimizer.calibration_steps=2", "optimizer.calibration_start=0"]), ("r3f", [])):
        runs = {}
        for name, model, micro, k in (("native", native, 8, 1), ("hf", hf, 2, 4)):
            config = small_config(data, tmp_path / f"{rule}-{name}", rule, micro=micro, accumulate=k, model=model,
                                  extra=["optimizer.base=sgd", *extra])  # fmt: skip
            runs[name] = train(config)
        assert_histories_match(runs["native"].history, runs["hf"].history, RULE_KEYS, label=rule)
        a, b = (hf_form(runs[n].model.module) for n in ("native", "hf"))
        assert len(set(a) & set(b)) == len(a) and max((a[k] - b[k]).abs().max().item() for k in a) < EXACT_ABS


def test_noise_reaches_the_hf_embeddings_and_is_removed_after_the_forward(checkpoints):
    _, hf, _ = checkpoints["llama"]
    model = double_model(hf)
    ids = torch.randint(0, 100, (2, 8))
    clean = model(ids)
    z = 0.3 * torch.randn(2, 8, model.input_embedding.embedding_dim, dtype=torch.float64)
    noised = model(ids, input_noise=lambda e: e + z)
    inputs_embeds = model.hf.get_input_embeddings()(ids) + z  # transformers' own path for given embeddings
    torch.testing.assert_close(noised, model.hf(inputs_embeds=inputs_embeds).logits, rtol=0, atol=1e-12)
    assert (noised - clean).abs().max() > 1e-3
    torch.testing.assert_close(model(ids), clean, rtol=0, atol=0)  # the hook is gone


def test_the_auto_class_follows_the_task_and_a_wrong_head_is_a_clear_error(checkpoints):
    _, hf, task_overrides = checkpoints["bert"]
    config = load_config(None, ["optimizer.name=sgd", *hf, *task_overrides])
    assert config.model.head == "sequence-classification" and config.model.num_labels == 3
    model = build_model(config.model)
    assert type(model.hf).__name__ == "BertForSequenceClassification" and model.num_labels == 3
    assert model.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    from fabric_tram.models.hf import HFConfig, HFModel

    _, gpt2, _ = checkpoints["gpt2"]
    wrong_head = r"model.head=causal-lm does not fit task 'nli', whose loss reads a sequence-classification head"
    with pytest.raises(ConfigError, match=wrong_head):
        load_config(None, ["optimizer.name=sgd", *gpt2, "model.head=causal-lm", *task_overrides])
    with pytest.raises(ConfigError, match="model.head=image-classification does not fit task 'lm'"):
        load_config(None, ["optimizer.name=sgd", "task.name=lm", *gpt2, "model.head=image-classification"])
    folder = gpt2[1].split("=", 1)[1]  # a task of one's own may name any head: the checkpoint must have it
    with pytest.raises(ValueError, match="has no AutoModelForImageClassification .*choose a checkpoint with that"):
        HFModel.from_config(HFConfig(pretrained=folder, head="image-classification"))
    with pytest.raises(ValueError, match="model.head=auto does not know task 'parity'"):
        HFConfig(pretrained="x").resolve_with(type("C", (), {"task": type("T", (), {"name": "parity"})})())


def test_remote_code_is_refused_unless_allowed(checkpoints, tmp_path):
    import json
    import shutil

    _, hf, _ = checkpoints["gpt2"]
    folder = tmp_path / "remote"
    shutil.copytree(hf[1].split("=", 1)[1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    with pytest.raises(ValueError, match="runs its own Python code .*set model.trust_remote_code=true"):
        build_model(load_config(None, ["optimizer.name=sgd", "task.name=lm", "model.name=hf",
                                       f"model.pretrained={folder}"]).model)  # fmt: skip


def test_a_model_without_block_classes_is_refused_under_fsdp_with_the_fix(checkpoints, tmp_path):
    native, hf, task_overrides = checkpoints["gpt2"]
    data = task_overrides[1].split("=", 1)[1]
    unknown = [*hf, "model.block_classes=[NoSuchLayer]"]  # what a model without _no_split_modules gets: none
    for setting in ("trainer.strategy=fsdp", "trainer.activation_checkpointing=true", "trainer.compile=true"):
        config = small_config(data, tmp_path / setting, "adam", model=unknown, extra=[setting])
        with pytest.raises(ConfigError, match="names no repeated block class .*set model.block_classes"):
            train(config)
    # the fix: name the block class
    config = small_config(data, tmp_path / "named", "adam", steps=1, model=[*hf, "model.block_classes=[GPT2Block]"],
                          extra=["trainer.activation_checkpointing=true"])  # fmt: skip
    run = train(config)
    assert [cls.__name__ for cls in run.model.block_class] == ["GPT2Block"]
    assert run.model.activation_checkpointing


def test_estimate_counts_an_hf_model_from_its_config_without_reading_weights(checkpoints, monkeypatch):
    from fabric_tram.engine.estimate import estimate

    native, hf, task_overrides = checkpoints["gpt2"]
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", None)  # reading weights would fail
    ours = estimate(load_config(None, ["optimizer.name=adam", *native, *task_overrides]), 1)
    theirs = estimate(load_config(None, ["optimizer.name=adam", *hf, *task_overrides]), 1)
    assert theirs["n_params"] == ours["n_params"] and theirs["bytes"] == ours["bytes"]
    assert theirs["flops_per_step_per_device"] == pytest.approx(ours["flops_per_step_per_device"], rel=1e-12)


def test_list_shows_hf():
    from click.testing import CliRunner

    from fabric_tram.cli import main

    out = CliRunner().invoke(main, ["list"]).output
    assert "hf" in out.split() and "any Hugging Face transformers model" in out


def test_hf_export_loads_in_transformers(checkpoints, tmp_path):
    from fabric_tram.engine.export import export

    native, hf, task_overrides = checkpoints["llama"]
    data = task_overrides[1].split("=", 1)[1]
    run = train(small_config(data, tmp_path / "run", "adam", steps=2, model=hf, extra=["trainer.save_every=2"]))
    export(tmp_path / "run", tmp_path / "out", dtype="float64")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64)
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, run.model(ids), rtol=0, atol=1e-12)


def test_hf_blocks_compiled_and_checkpointed_take_the_same_steps(checkpoints, tmp_path):
    """trainer.compile (per _no_split_modules block; the aot_eager backend keeps the test short) and activation
    checkpointing (transformers' own, non-reentrant) on an hf model: the eager run's steps, in float64."""
    _, hf, task_overrides = checkpoints["gpt2"]
    data = task_overrides[1].split("=", 1)[1]
    extra = ["optimizer.base=sgd", "optimizer.calibration_steps=2", "optimizer.calibration_start=0"]
    runs = {}
    for name, setting in (("eager", []), ("compiled", ["trainer.compile=true", "trainer.compile_backend=aot_eager"]),
                          ("checkpointed", ["trainer.activation_checkpointing=true"])):  # fmt: skip
        runs[name] = train(small_config(data, tmp_path / name, "tram-x", steps=3, model=hf, extra=[*extra, *setting]))
    assert runs["compiled"].model.hf.transformer.h[0]._compiled_call_impl is not None  # the blocks were compiled
    for name in ("compiled", "checkpointed"):
        assert_histories_match(runs["eager"].history, runs[name].history, RULE_KEYS, label=name)
