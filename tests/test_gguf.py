"""GGUF → Hugging Face folder (models/gguf.py) on a tiny Llama written here as llama.cpp writes one: query/key rows
permuted, some tensors quantised to Q8_0, a byte-level BPE vocabulary in the metadata. The converted folder loads
into our Llama and into transformers alike; unsupported files are refused before anything is written."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from fabric_tram.models.gguf import GGUFError, convert_gguf, unpermute_rotary_rows  # noqa: E402
from fabric_tram.models.llama import Llama, LlamaConfig  # noqa: E402

HEADS, KV_HEADS, HIDDEN, FFN, LAYERS = 4, 2, 64, 96, 2
QUANTISED = ("ffn_up", "ffn_down", "attn_v")  # written as Q8_0; the rest F32
# a byte-level vocabulary: the end-of-text token, printable ASCII, 'Ġ' (a space) and two merges: 98 ids. The
# merge "4 2" is there to be refused: SmolLM2's pre-tokenizer splits digits one by one before any merge
TOKENS = ["<|endoftext|>", *(chr(c) for c in range(33, 127)), "Ġ", "he", "42"]
MERGES = ["h e", "4 2"]

HF_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama query/key rows (rotate-half → interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, state: dict, arch: str = "llama", extra_tensor=None) -> dict:
    """Write ``state`` (Hugging Face names) as a GGUF file; return the weights a reader should get back."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(32)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] + [1] * (len(TOKENS) - 1))
    writer.add_token_merges(MERGES)
    expected = {}
    tensors = [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight")]
    for layer in range(LAYERS):
        tensors += [(f"blk.{layer}.{g}.weight", f"model.layers.{layer}.{h}.weight") for g, h in HF_NAMES.items()]
    for gguf_name, hf_name in tensors:
        w = state[hf_name].numpy().astype(np.float32)
        kind = gguf_name.split(".")[-2]
        stored = llama_cpp_permute(w, HEADS if kind == "attn_q" else KV_HEADS) if kind in ("attn_q", "attn_k") else w
        if kind in QUANTISED:
            quantised = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            w = gguf.quants.dequantize(quantised, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)
        else:
            writer.add_tensor(gguf_name, stored)
        expected[hf_name] = torch.from_numpy(np.ascontiguousarray(w))
    if extra_tensor is not None:
        writer.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture
def tiny_hf():
    sizes = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=FFN,
                 num_hidden_layers=LAYERS, vocab_size=len(TOKENS), max_position_embeddings=32)  # fmt: skip
    config = transformers.LlamaConfig(**sizes, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_a_gguf_llama_converts_to_a_folder_both_loaders_read_identically(tmp_path, tiny_hf):
    expected = write_gguf(tmp_path / "tiny.gguf", tiny_hf.state_dict())
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    from safetensors.torch import load_file

    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(expected)  # tied: no lm_head stored
    for name, weights in expected.items():  # F32 rows back in rotate-half order; Q8_0 dequantised exactly
        assert torch.equal(converted[name], weights), name
    original = tiny_hf.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert 0 < (converted["model.layers.0.mlp.up_proj.weight"] - original).abs().max() < 0.01 * original.abs().max()
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == KV_HEADS and config["tie_word_embeddings"] is True
    ours = Llama.from_config(LlamaConfig(pretrained=str(out))).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, len(TOKENS), (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=2e-5, rtol=0)


def test_the_converted_tokenizer_splits_digits_and_keeps_special_tokens(tmp_path, tiny_hf):
    write_gguf(tmp_path / "tiny.gguf", tiny_hf.state_dict())
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    from fabric_tram.data.tokenizer import end_of_text_id, load_tokenizer

    tok = load_tokenizer(str(out))
    ids = tok.encode("he said 42<|endoftext|>").ids
    assert [TOKENS[i] for i in ids] == ["he", "Ġ", "s", "a", "i", "d", "Ġ", "4", "2", "<|endoftext|>"]
    assert tok.decode(ids, skip_special_tokens=False) == "he said 42<|endoftext|>"
    assert end_of_text_id(str(out)) == 0


def test_an_unsupported_tensor_type_is_refused_before_anything_is_written(tmp_path, tiny_hf):
    iq4 = np.zeros((4, 18), dtype=np.uint8)  # 4 rows of one IQ4_NL block (32 weights in 18 bytes)
    extra = ("blk.0.extra.weight", iq4, gguf.GGMLQuantizationType.IQ4_NL)
    write_gguf(tmp_path / "iq.gguf", tiny_hf.state_dict(), extra_tensor=extra)
    with pytest.raises(GGUFError, match="tensor type.s. IQ4_NL are not supported .*e.g. Q8_0"):
        convert_gguf(tmp_path / "iq.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_other_architectures_and_an_existing_output_are_refused(tmp_path, tiny_hf):
    write_gguf(tmp_path / "gpt2.gguf", tiny_hf.state_dict(), arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not converted; supported: llama, qwen2"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "hf")
    write_gguf(tmp_path / "tiny.gguf", tiny_hf.state_dict())
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a model.safetensors"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    assert np.array_equal(unpermute_rotary_rows(llama_cpp_permute(w, 2), 2), w)
    assert not np.array_equal(llama_cpp_permute(w, 2), w)
