"""LoRA adapters (``model.lora``, through peft) on our families and on hf models, under every update rule: only the
adapters train and only they carry state; the estimate knows it; a LoRA run resumes exactly; it exports merged (a
plain transformers model) or as peft's adapter folder. The 2-process FSDP2 run with frozen base weights is in
tests/test_distributed.py."""

import pytest
import torch
from conftest import LLAMA_LORA, assert_histories_match, small_config, trajectory

from fabric_tram.bench.step_cost import RULES
from fabric_tram.config import load_config
from fabric_tram.engine.checkpoint_state import clean_name
from fabric_tram.engine.estimate import estimate
from fabric_tram.engine.trainer import train
from fabric_tram.models import build_model
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.optim.update_rule import rule_class
from fabric_tram.registry import TASKS

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
GPT2_LORA = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.target_modules=[c_attn,c_fc]"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    from conftest import hf_checkpoints, write_corpus

    root = tmp_path_factory.mktemp("lora")
    return hf_checkpoints(root, write_corpus(root / "data"))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def lora_model(overrides: list[str]) -> torch.nn.Module:
    config = load_config(None, ["optimizer.name=sgd", "task.name=lm", *overrides])
    torch.manual_seed(0)
    return build_model(config.model).double()


def test_only_the_adapters_train_and_unknown_module_names_are_refused(checkpoints):
    native, hf, _ = checkpoints["gpt2"]
    for overrides in (native, hf):
        model = lora_model([*overrides, *GPT2_LORA])
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all(".lora_A.default." in n or ".lora_B.default." in n for n in trained)
        assert {n.split(".")[-4] for n in trained} == {"c_attn", "c_fc"}
    with pytest.raises(ValueError, match=r"\['q_proj'\] name no linear layer of this model; .*c_attn, c_fc"):
        lora_model([*native, "model.lora.target_modules=[q_proj]"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_no_rule_touches_a_frozen_parameter(checkpoints, family):
    """Every rule, two steps: frozen weights bit for bit as loaded, no gradient on them; the adapters moved."""
    native, hf, task_overrides = checkpoints[family]
    config = load_config(None, ["optimizer.name=sgd", *native, *task_overrides])
    task = TASKS.build(config.task.name, config.task)
    batch = task.collate([task.train_set[i] for i in range(2)], [0, 1])
    batch = {k: v[:, :10] if k != "example_index" else v for k, v in batch.items()}
    for rule in RULES:
        model = lora_model([*hf, *(GPT2_LORA if family == "gpt2" else LLAMA_LORA)])
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainable = [p for p in model.parameters() if p.requires_grad]
        loop = UpdateRuleLoop(rule, model, torch.optim.SGD(trainable, lr=0.5), task.loss)
        for _ in range(2):
            loop.step(batch)
        for name, param in model.named_parameters():
            if name in frozen:
                assert param.grad is None and torch.equal(param, frozen[name]), (rule, name)
        assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters), rule


@pytest.mark.parametrize("rule", ["tram-prev", "tram-init", "mesa", "asam+trpo", "tram-x"])
def test_rule_state_and_the_estimate_are_adapter_sized(checkpoints, tmp_path, rule):
    native, _, task_overrides = checkpoints["gpt2"]
    data = task_overrides[1].split("=", 1)[1]
    tram = ["optimizer.calibration_steps=2", "optimizer.calibration_start=0"] if rule.startswith("tram") else []
    config = small_config(data, tmp_path / rule, rule, steps=2, model=[*native, *GPT2_LORA],
                          extra=["optimizer.base=adam", *tram])  # fmt: skip
    run = train(config)
    params = list(run.model.parameters())
    adapters = [p for p in params if p.requires_grad]
    assert 0 < tensor_bytes(adapters) < tensor_bytes(params) / 20
    rule_state = [t for buffers in run.rule.parameter_state().values() for t in buffers]
    backup = run.rule.backup if run.rule.backup is not None else []
    if all(b is not t for b in backup for t in rule_state):
        rule_state += list(backup)  # the restore point, held between steps
    held = rule_class(rule).held_per_param_byte(8)
    assert tensor_bytes(rule_state) == held * tensor_bytes(adapters) > 0
    state = [t for s in run.optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    e = estimate(config, devices=1)
    assert e["n_trained"] == sum(p.numel() for p in adapters) and e["n_params"] == sum(p.numel() for p in params)
    assert e["bytes"]["parameters"] == tensor_bytes(params)
    assert e["bytes"]["gradients"] == tensor_bytes(adapters)
    assert e["bytes"]["optimizer_state"] == tensor_bytes(state) == 2 * tensor_bytes(adapters)
    assert e["bytes"]["update_rule_buffers"] == tensor_bytes(rule_state)


def test_noise_reaches_an_hf_model_under_lora_and_no_gradient_reaches_its_frozen_embedding(checkpoints):
    _, hf, _ = checkpoints["llama"]
    model = lora_model([*hf, *LLAMA_LORA])
    ids = torch.randint(0, 100, (2, 8))
    z = 0.3 * torch.randn(2, 8, model.input_embedding.embedding_dim, dtype=torch.float64)
    clean, noised = model(ids), model(ids, input_noise=lambda e: e + z)
    assert (noised - clean).abs().max() > 1e-3
    noised.sum().backward()
    assert model.input_embedding.weight.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_lora_run_resumes_exactly(checkpoints, tmp_path):
    """tram-prev on adapters: its previous iterate (adapter-sized) and the adapters survive a resume at step 2."""
    native, _, task_overrides = checkpoints["gpt2"]
    data = task_overrides[1].split("=", 1)[1]
    extra = ["optimizer.base=adam", "optimizer.calibration_steps=2", "optimizer.calibration_start=0",
             "trainer.save_every=2"]  # fmt: skip
    full = train(small_config(data, tmp_path / "full", "tram-prev", steps=4, model=[*native, *GPT2_LORA], extra=extra))
    step2 = tmp_path / "full" / "checkpoints" / "step-00000002"
    resumed = train(small_config(data, tmp_path / "resumed", "tram-prev", steps=4, model=[*native, *GPT2_LORA],
                                 extra=[*extra, f"trainer.resume={step2}"]))  # fmt: skip
    assert resumed.start_step == 2 and "d" in full.history[2]
    assert_histories_match(full.history[2:], resumed.history, ("loss", "d", "radius", "e_norm"), rel=0, abs_=0)
    a, b = trajectory(full)["params"], trajectory(resumed)["params"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


@pytest.mark.parametrize("family", ["gpt2", "hf"])
def test_a_lora_run_exports_merged_and_as_a_peft_adapter(checkpoints, tmp_path, family):
    from fabric_tram.engine.export import export

    native, hf, task_overrides = checkpoints["gpt2"]
    data = task_overrides[1].split("=", 1)[1]
    model = [*(native if family == "gpt2" else hf), *GPT2_LORA]
    run = train(small_config(data, tmp_path / "run", "adam", steps=2, model=model, extra=["trainer.save_every=2"]))
    ids = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        ours = run.model(ids)
    export(tmp_path / "run", tmp_path / "merged", dtype="float64")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64)
    export(tmp_path / "run", tmp_path / "adapter", dtype="float64", adapter=True)
    base_folder = native[1].split("=", 1)[1]
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float64)
    with torch.no_grad():
        plain = base(ids).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert (ours - plain).abs().max() > 1e-4  # the adapters changed the model
        torch.testing.assert_close(merged(ids).logits, ours, rtol=0, atol=1e-10)
        torch.testing.assert_close(adapted(ids).logits, ours, rtol=0, atol=1e-10)


def test_adapter_export_of_a_run_without_lora_is_refused(checkpoints, tmp_path):
    from fabric_tram.engine.export import export

    native, _, task_overrides = checkpoints["gpt2"]
    data = task_overrides[1].split("=", 1)[1]
    train(small_config(data, tmp_path / "run", "adam", steps=1, model=native, extra=["trainer.save_every=1"]))
    with pytest.raises(ValueError, match="not a LoRA run .*export it without --adapter"):
        export(tmp_path / "run", tmp_path / "adapter", adapter=True)
    assert not (tmp_path / "adapter").exists()


def test_lora_keys_are_checked_when_the_config_is_read():
    from fabric_tram.config import ConfigError

    base = ["optimizer.name=adam", "task.name=lm", "model.name=gpt2"]
    with pytest.raises(ConfigError, match="unknown config key 'model.lora.rank'. Valid keys of model.lora: r, alpha"):
        load_config(None, [*base, "model.lora.rank=4"])
    assert load_config(None, [*base, "model.lora.r=4"]).model.lora.target_modules == []  # peft's default, later
    with pytest.raises(ConfigError, match="model.lora.r must be >= 1"):
        load_config(None, [*base, "model.lora.r=0", "model.lora.target_modules=[c_attn]"])
    config = load_config(None, [*base, "model.lora.r=4", "model.lora.target_modules=[c_attn]"])
    assert config.model.lora.r == 4 and config.model.lora.alpha == 16.0


def test_an_adapter_names_its_base_so_that_peft_finds_it_from_any_folder(checkpoints, tmp_path, monkeypatch):
    """A run whose base is a relative folder: the adapter's base_model_name_or_path is that folder's absolute path
    (a relative one is read as a hub id from anywhere else), so AutoPeftModelForCausalLM loads base and adapter
    from another working directory and gives our logits; every other field of adapter_config.json as configured."""
    import json
    import shutil

    from fabric_tram.engine.export import export

    native, hf, task_overrides = checkpoints["gpt2"]
    data = task_overrides[1].split("=", 1)[1]
    shutil.copytree(hf[1].split("=", 1)[1], tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    lora = ["model.lora.r=4", "model.lora.alpha=12", "model.lora.dropout=0.0",
            "model.lora.target_modules=[c_fc,c_attn]"]  # fmt: skip
    run = train(small_config(data, tmp_path / "run", "adam", steps=2,
                             model=["model.name=hf", "model.pretrained=base", *lora]))  # fmt: skip
    export("run", "adapter", dtype="float64", adapter=True)
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert (settings["r"], settings["lora_alpha"], settings["lora_dropout"]) == (4, 12.0, 0.0)
    assert settings["target_modules"] == ["c_attn", "c_fc"] and settings["task_type"] == "CAUSAL_LM"
    assert settings["peft_type"] == "LORA" and settings["fan_in_fan_out"] is True  # GPT-2's Conv1D layers
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float64).eval()
    ids = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, run.model(ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("family, saved, trained_in_full", [
    ("native", "classifier", {"classifier.weight", "classifier.bias"}),
    ("native", "pooler.dense", {"body.pooler.dense.weight", "body.pooler.dense.bias"}),  # not the layers' dense
    ("hf", "classifier", {"hf.classifier.weight", "hf.classifier.bias"}),  # below the top level
    ("hf", "pooler", {"hf.bert.pooler.dense.weight", "hf.bert.pooler.dense.bias"}),
])  # fmt: skip
def test_modules_to_save_train_in_full_at_any_depth_and_nothing_else(checkpoints, tmp_path, family, saved,
                                                                     trained_in_full):  # fmt: skip
    """modules_to_save names a module by its path's end (peft's matching): its parameters train in full, beside
    the adapters; every other parameter stays as loaded, bit for bit, through two steps."""
    native, hf, task_overrides = checkpoints["bert"]
    model = [*(native if family == "native" else hf), "model.lora.r=4", "model.lora.target_modules=[query,value]",
             f"model.lora.modules_to_save=[{saved}]"]  # fmt: skip
    config = load_config(None, ["optimizer.name=adam", "optimizer.lr=0.01", *model, *task_overrides,
                                "trainer.max_steps=2", "trainer.micro_batch_size=4", "trainer.precision=64-true",
                                "trainer.progress_bar=false", "trainer.eval_splits=[]",
                                f"trainer.run_dir={tmp_path / 'run'}"])  # fmt: skip
    torch.manual_seed(0)
    before = {n: p.detach().clone() for n, p in build_model(config.model).double().named_parameters()}
    run = train(config)
    after = {n: p.detach() for n, p in trajectory(run)["params"].items()}
    trainable = {clean_name(n) for n, p in run.model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert adapters and trainable - adapters == trained_in_full
    for name, value in before.items():
        if name in trainable:
            assert not torch.equal(after[name], value), name  # trained
        else:
            assert torch.equal(after[name], value), name  # frozen: as loaded


def test_a_module_to_save_that_names_no_module_is_refused(checkpoints):
    native, _, task_overrides = checkpoints["bert"]
    with pytest.raises(ValueError, match=r"modules_to_save: \['classifier.out_proj'\] name no module"):
        build_model(load_config(None, ["optimizer.name=adam", *native, *task_overrides, "model.lora.r=4",
                                       "model.lora.target_modules=[query]",
                                       "model.lora.modules_to_save=[classifier.out_proj]"]).model)  # fmt: skip


def tiny_hf_folder(folder, model_type: str):
    """A transformers checkpoint of ``model_type`` at a tiny size, written by transformers itself."""
    config = transformers.AutoConfig.for_model(model_type, vocab_size=4096, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                               max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gpt2", "llama-ours", "gpt2-ours"])
def test_lora_without_target_modules_adapts_pefts_default_for_the_architecture(tmp_path, model_type, capsys):
    """No module list: peft's own per-model-type choice (q_proj, v_proj for Mistral, Qwen2, Llama; c_attn for
    GPT-2), on transformers' models and on our families alike; what was adapted is said at the start."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    from fabric_tram.engine.setup import setup
    from fabric_tram.models.lora import adapted_modules

    if model_type.endswith("-ours"):
        family = model_type.removesuffix("-ours")
        model, expected = [f"model.name={family}"], PEFT_DEFAULTS[family]
    else:
        folder = tiny_hf_folder(tmp_path / model_type, model_type)
        model, expected = ["model.name=hf", f"model.pretrained={folder}"], PEFT_DEFAULTS[model_type]
    config = load_config(None, ["optimizer.name=adam", "task.name=lm", "task.data_dir=demo", "task.block_size=16",
                                "task.tokenizer=demo", "model.lora.r=2", *model, f"trainer.run_dir={tmp_path / 'run'}",
                                "trainer.progress_bar=false", "trainer.preflight=false"])  # fmt: skip
    run = setup(config, training=False)
    assert adapted_modules(run.model) == sorted(expected)
    printed = capsys.readouterr().out
    assert f"model.lora: rank 2 adapters on {', '.join(sorted(expected))} (peft's default for this architecture)" in (
        printed
    )
    trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert f"{trained:,} trained parameters of {sum(p.numel() for p in run.model.parameters()):,}" in printed


def test_lora_without_target_modules_on_an_architecture_peft_has_no_default_for_names_the_layers(checkpoints):
    from fabric_tram.models.hf import HFModel

    with pytest.raises(ValueError, match="target_modules is empty and .* has no default .*named c_attn, c_fc"):
        from fabric_tram.models.lora import add_lora

        class NoDefault(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.c_attn, self.c_fc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        add_lora(NoDefault(), load_config(None, ["optimizer.name=adam", "task.name=lm", "model.name=gpt2",
                                                 "model.lora.r=2"]).model.lora)  # fmt: skip
    assert HFModel.lora_target_modules  # declared on the hf family: read from peft's mapping by model type
