"""Models leave the engine: `fabric-tram export` writes folders transformers loads with its Auto classes and
gives our logits (float64, every family), and `fabric-tram generate` continues a prompt through a KV cache, as
transformers' greedy generate does on the exported folder. 2 processes' checkpoint: tests/test_distributed.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_config

from fabric_tram.engine.checkpoint import CheckpointError
from fabric_tram.engine.export import export
from fabric_tram.engine.trainer import train
from fabric_tram.models.encoder import Encoder, EncoderConfig
from fabric_tram.models.generate import generate
from fabric_tram.models.gpt2 import GPT2, GPT2Config
from fabric_tram.models.hf_folder import save_hf_folder
from fabric_tram.models.llama import Llama, LlamaConfig
from fabric_tram.models.vit import ViT, ViTConfig

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 101

FAMILIES = {
    "gpt2": lambda: GPT2(GPT2Config(preset="tiny", n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB)),
    "llama-tied": lambda: Llama(LlamaConfig(preset="tiny", vocab_size=VOCAB)),
    "llama-untied": lambda: Llama(LlamaConfig(preset="tiny", vocab_size=VOCAB, tie_word_embeddings=False)),
    "qwen2-biases": lambda: Llama(
        LlamaConfig(preset="tiny", vocab_size=VOCAB, attention_bias=True, tie_word_embeddings=False)
    ),  # fmt: skip
    "xlm-roberta": lambda: Encoder(EncoderConfig(preset="tiny", num_labels=3)),
    "bert": lambda: Encoder(
        EncoderConfig(preset="tiny", variant="bert", type_vocab_size=2, pad_token_id=0, num_labels=4)
    ),  # fmt: skip
    "vit": lambda: ViT(ViTConfig(preset="tiny", num_labels=5)),
}
AUTO = {
    **dict.fromkeys(("gpt2", "llama-tied", "llama-untied", "qwen2-biases"), "CausalLM"),
    **dict.fromkeys(("xlm-roberta", "bert"), "SequenceClassification"),
    "vit": "ImageClassification",
}


def perturbed(name: str) -> torch.nn.Module:
    """A float64 model of ``name`` whose every parameter differs from its initialisation (LayerNorm weights of
    one, zero biases and a fresh head would hide a swapped or missing tensor)."""
    torch.manual_seed(0)
    model = FAMILIES[name]().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_exports_to_a_folder_transformers_loads_with_our_logits(name, tmp_path):
    ours = perturbed(name)
    labels = [f"class-{i}" for i in range(ours.config.num_labels)] if AUTO[name] != "CausalLM" else None
    save_hf_folder(ours, tmp_path / "hf", dtype="float64", labels=labels)
    auto = getattr(transformers, f"AutoModelFor{AUTO[name]}")
    theirs, info = auto.from_pretrained(tmp_path / "hf", dtype=torch.float64, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key: nothing initialised afresh
    theirs.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if AUTO[name] == "CausalLM":
            ids = torch.randint(0, VOCAB, (2, 9), generator=g)
            mine, reference = ours(ids), theirs(ids).logits
        elif AUTO[name] == "SequenceClassification":
            ids = torch.randint(5, 250, (2, 9), generator=g)
            mask = torch.ones_like(ids)
            mask[1, 6:] = 0  # padding in one row
            mine, reference = ours(ids, attention_mask=mask), theirs(input_ids=ids, attention_mask=mask).logits
        else:
            pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
            mine, reference = ours(pixels), theirs(pixel_values=pixels).logits
    torch.testing.assert_close(reference, mine, rtol=1e-10, atol=1e-12)
    if labels:
        assert theirs.config.id2label == dict(enumerate(labels))


def test_large_models_are_sharded_with_an_index_and_dtypes_are_cast(tmp_path):
    ours = perturbed("llama-untied")
    files = save_hf_folder(ours, tmp_path / "hf", dtype="bfloat16", max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-0")]) > 2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert theirs.dtype == torch.bfloat16
    for name, p in ours.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[name].double(), p.to(torch.bfloat16).double(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama-untied", "qwen2-biases"])
def test_greedy_generation_through_the_kv_cache_equals_transformers_generate(name, tmp_path):
    ours = perturbed(name)
    prompt = [5, 17, 3, 42]
    # the cache gives the same next-token logits as the whole sequence again
    cache, ids = ours.new_cache(), torch.tensor([prompt + [7, 9, 11]])
    with torch.no_grad():
        stepwise = [ours(ids[:, :4], cache=cache)[0, -1]] + [
            ours(ids[:, i : i + 1], cache=cache)[0, -1] for i in (4, 5, 6)
        ]
        whole = ours(ids)[0, 3:]
    torch.testing.assert_close(torch.stack(stepwise), whole, rtol=1e-10, atol=1e-12)
    save_hf_folder(ours, tmp_path / "hf", dtype="float64")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert generate(ours, prompt, max_new_tokens=12) == expected[0, len(prompt) :].tolist()
    sampled = [generate(ours, prompt, 12, temperature=1.0, top_p=0.9, seed=s) for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded: the same seed, the same tokens


def test_export_and_generate_commands_from_a_run(corpus, tmp_path):
    run = train(small_config(corpus, tmp_path / "run", "tram-prev", steps=2, precision="32-true",
                             extra=["task.tokenizer=gpt2", "optimizer.calibration_steps=1",
                                    "optimizer.radius_scale=1"]))  # fmt: skip
    cli = [sys.executable, "-m", "fabric_tram.cli"]
    out = subprocess.run([*cli, "export", str(tmp_path / "run"), str(tmp_path / "hf")], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "written:" in out.stdout and "tokenizer.json" in out.stdout and "README.md" in out.stdout
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "tram-prev" in card and "steps: 2" in card and "validation / alpha" in card
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer("hello there, world").input_ids
    assert ids == [31373, 612, 11, 995] and theirs.config.eos_token_id == 50256
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.tensor([ids])).logits, run.model(torch.tensor([ids])),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    greedy = [
        subprocess.run([*cli, "generate", str(src), "hello there", "--max-new-tokens", "5"], capture_output=True,
                       text=True, timeout=300)
        for src in (tmp_path / "run", tmp_path / "hf")
    ]  # fmt: skip
    assert all(g.returncode == 0 for g in greedy), greedy[0].stderr[-2000:]
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.startswith("hello there")


def test_export_refuses_an_existing_folder_and_a_foreign_checkpoint_and_writes_nothing(corpus, tmp_path):
    train(small_config(corpus, tmp_path / "run", "sgd", steps=1))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export(tmp_path / "run", tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"
    meta = json.loads((checkpoint / "meta.json").read_text())
    foreign = {**meta, "model": {**meta["model"], "n_layer": 7}}  # written for another model than the run's
    (checkpoint / "meta.json").write_text(json.dumps(foreign))
    with pytest.raises(CheckpointError, match="was written for another model .model.n_layer: checkpoint 7"):
        export(tmp_path / "run", tmp_path / "new")
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    shard = next((checkpoint / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"distcp is truncated or missing \(100 of"):
        export(tmp_path / "run", tmp_path / "new")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp-*"))
