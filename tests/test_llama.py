"""The Llama family (models/llama.py): logits identical to Hugging Face's Llama and Qwen2 on tiny configs built
here, sharded safetensors, rotary positions past the config's length, input noise as inputs_embeds, every update
rule stepping on it, and clear errors for a checkpoint that does not fit."""

import pytest
import torch

from fabric_tram.bench.common import loss_fn
from fabric_tram.bench.step_cost import RULES
from fabric_tram.models.llama import Llama, LlamaConfig
from fabric_tram.optim.api import UpdateRuleLoop

transformers = pytest.importorskip("transformers")
SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, num_hidden_layers=2,
             vocab_size=97, max_position_embeddings=32, rope_theta=10000.0, rms_norm_eps=1e-6)  # fmt: skip


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
    with pytest.raises(ValueError, match="rope_scaling"):
        from fabric_tram.models.llama import config_from_hf

        config_from_hf(LlamaConfig(), {"rope_scaling": {"rope_type": "llama3"}, "num_attention_heads": 4})


def test_flops_count_grouped_query_attention():
    mha = Llama(LlamaConfig(n_kv_head=4, vocab_size=97)).forward_flops_per_token(16)
    gqa = Llama(LlamaConfig(n_kv_head=2, vocab_size=97)).forward_flops_per_token(16)
    weights = lambda m: sum(p.numel() for n, p in m.named_parameters() if "embed" not in n and "norm" not in n)  # noqa: E731
    assert mha - gqa == 2.0 * (weights(Llama(LlamaConfig(n_kv_head=4, vocab_size=97)))
                              - weights(Llama(LlamaConfig(n_kv_head=2, vocab_size=97))))  # fmt: skip


def test_smollm2_presets_have_the_published_parameter_counts():
    with torch.device("meta"):
        small = Llama(LlamaConfig(preset="smollm2-135m"))
    # HuggingFaceTB/SmolLM2-135M: 134,515,008 parameters (tied embeddings counted once)
    assert sum(p.numel() for p in small.parameters()) == 134_515_008


def test_estimate_sizes_a_llama_hub_checkpoint_by_its_preset_offline():
    from fabric_tram.analysis.estimate import estimate
    from fabric_tram.config import load_config

    overrides = [
        "model.name=llama",
        "model.pretrained=HuggingFaceTB/SmolLM2-135M",
        "task.name=lm",
        "optimizer.name=adam",
    ]
    e = estimate(load_config(None, overrides), devices=1)
    assert e["n_params"] == 134_515_008 and e["bytes"]["parameters"] == 4 * 134_515_008


def llama_overrides(run_dir, **trainer) -> list[str]:
    settings = {"max_steps": 3, "precision": "64-true", "eval_batches": 0, "eval_every": 0, "save_every": 3,
                "progress_bar": "false", "run_dir": run_dir, **trainer}  # fmt: skip
    return ["model.name=llama", "model.dropout=0.0", "optimizer.name=tram-prev", "optimizer.calibration_steps=2",
            "optimizer.base=sgd", "optimizer.lr=0.5", *(f"trainer.{k}={v}" for k, v in settings.items())]  # fmt: skip


def step_log(run_dir) -> list[dict]:
    from fabric_tram.analysis.curves import read_log

    return [
        {k: row[k] for k in ("loss", "d", "radius", "e_norm") if k in row} for row in read_log(run_dir) if "loss" in row
    ]


@pytest.mark.distributed
def test_two_fsdp_processes_train_a_llama_as_one(tmp_path):
    """FSDP2 over 2 processes (8 rows each) against 1 process accumulating 2 micro-batches of 8: the same steps in
    float64, so per-step loss, d, radius and ‖e‖ and the final evaluation agree to 1e-10 (no dropout: the ranks
    would draw other masks than one process does)."""
    import json

    from conftest import EXACT_REL, launch_two_processes

    from fabric_tram.cli import train_job
    from fabric_tram.config import load_config

    recipe = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "recipes" / "tiny_sample.py")
    one = tmp_path / "one"
    train_job(load_config(recipe, llama_overrides(one, accumulate=2)))
    two = tmp_path / "two"
    launch_two_processes([recipe, *llama_overrides(two, accumulate=1, strategy="fsdp")], fresh=(two,), cwd=tmp_path)
    a, b = step_log(one), step_log(two)
    assert len(a) == len(b) == 3 and "radius" in a[2]
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y) and all(x[k] == pytest.approx(y[k], rel=EXACT_REL, abs=1e-12) for k in x)
    val = [json.loads((d / "results.json").read_text())["results"]["validation"] for d in (one, two)]
    for domain, metrics in val[0].items():
        assert metrics["loss"] == pytest.approx(val[1][domain]["loss"], rel=EXACT_REL)
