"""Every family's attention is torch's ``scaled_dot_product_attention``, called in the form whose fused kernels a
GPU can choose: the decoders (GPT-2; Llama with grouped-query heads, ``enable_gqa``) causal by flag and the ViT
unmasked, so FlashAttention can take them; the encoder with its padding mask (the memory-efficient kernel takes
a mask, FlashAttention does not); a transformers model through its "sdpa" attention unless told otherwise.
Checked here on a CPU by recording the calls; which kernel a GPU then runs is for its profile to show
(benchmarks/profile_step.py)."""

import pytest
import torch
from conftest import LLAMA_MODEL, SMALL_MODEL, hf_checkpoints, small_config, vit_smoke_config, xnli_smoke_config

from fabric_tram.models import build_model


@pytest.fixture
def attention_calls(monkeypatch):
    """The keyword form of every scaled_dot_product_attention call made while the test runs."""
    calls, original = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append({"mask": attn_mask is not None, "causal": is_causal, "gqa": kwargs.get("enable_gqa", False),
                      "kv_heads": k.shape[1], "heads": q.shape[1]})  # fmt: skip
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_decoders_attend_causally_by_flag_with_no_mask(tmp_path, attention_calls, family):
    config = small_config(tmp_path, tmp_path / "run", model=SMALL_MODEL if family == "gpt2" else LLAMA_MODEL).model
    model = build_model(config)
    model(torch.randint(0, 4099, (2, 9)))
    layers = config.n_layer
    assert len(attention_calls) == layers and all(c["causal"] and not c["mask"] for c in attention_calls)
    if family == "llama":  # grouped-query heads handed over as they are (no repeated keys and values)
        assert all(c["gqa"] and c["kv_heads"] == 2 and c["heads"] == 4 for c in attention_calls)


def test_the_vit_attends_without_a_mask(tmp_path, attention_calls):
    config = vit_smoke_config(tmp_path / "run").model
    model = build_model(config)
    side = model.sizes["image_size"]
    model(torch.randn(2, 3, side, side))
    assert len(attention_calls) == model.sizes["n_layer"]
    assert all(not c["mask"] and not c["causal"] for c in attention_calls)


def test_the_encoder_hands_its_padding_mask_to_the_kernel(tmp_path, attention_calls):
    config = xnli_smoke_config(tmp_path / "run").model
    model = build_model(config)
    ids = torch.randint(5, 50, (2, 7))
    keep = torch.ones(2, 7, dtype=torch.long)
    keep[1, 4:] = 0  # a padded second sequence
    model(ids, attention_mask=keep)
    assert len(attention_calls) == model.sizes["n_layer"]
    assert all(c["mask"] and not c["causal"] for c in attention_calls)


def test_a_transformers_model_runs_transformers_sdpa_attention_unless_told_otherwise(tmp_path, attention_calls):
    corpus = tmp_path / "data"
    _, hf, _ = hf_checkpoints(tmp_path, corpus)["gpt2"]
    model = build_model(small_config(corpus, tmp_path / "run", model=hf).model)
    assert model.hf.config._attn_implementation == "sdpa"
    model(torch.randint(0, 4099, (2, 9)))
    assert len(attention_calls) == 2  # one per block: transformers' sdpa path is torch's kernel call
    eager = build_model(small_config(corpus, tmp_path / "run", model=[*hf, "model.attn_implementation=eager"]).model)
    assert eager.hf.config._attn_implementation == "eager"
