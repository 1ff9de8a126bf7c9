"""Models leave the engine: `fabric-tram export` writes folders transformers loads with its Auto classes and
gives our logits (float64, every family), and `fabric-tram generate` continues a prompt through a KV cache, as
transformers' greedy generate does on the exported folder. 2 processes' checkpoint: tests/test_distributed.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GPT2_IDS, recipe_smoke_config, small_config

from fabric_tram.config import load_config
from fabric_tram.data.tokenizer import load_tokenizer
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
SAMPLE_IMAGES = ROOT / "fabric_tram" / "assets" / "data" / "image-sample"
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
                             extra=[*GPT2_IDS, "optimizer.calibration_steps=1",
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


def test_an_image_run_exports_the_processor_and_labels_it_trained_with_field_by_field(tmp_path):
    """What transformers' processor and config read back is what the run trained with: a processor whose mean,
    std and size all differ from ViT's defaults (and mean ≠ std), the class folders as id2label; the pipeline a
    user would run (their processor, their model) gives our logits on a real image."""
    from PIL import Image

    from fabric_tram.data.images import to_tensor

    processor = {"size": {"height": 32, "width": 32}, "image_mean": [0.41, 0.52, 0.63], "image_std": [0.21, 0.26, 0.31]}
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "preprocessor_config.json").write_text(json.dumps(processor))
    run = train(load_config(None, ["model.name=vit", "model.num_labels=3", "task.name=image", "task.image_size=32",
                                   f"task.processor={tmp_path / 'proc'}", "optimizer.name=sgd", "optimizer.lr=0.1",
                                   "trainer.precision=64-true", "trainer.micro_batch_size=4", "trainer.max_steps=1",
                                   "trainer.eval_batches=1", "trainer.progress_bar=false",
                                   f"trainer.run_dir={tmp_path / 'run'}"]))  # fmt: skip
    export(tmp_path / "run", tmp_path / "hf", dtype="float32")
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert list(theirs.image_mean) == processor["image_mean"] and list(theirs.image_std) == processor["image_std"]
    assert theirs.size == {"height": 32, "width": 32} and theirs.do_normalize and theirs.do_resize
    assert theirs.rescale_factor == pytest.approx(1 / 255) and theirs.resample == 2  # bilinear, as we resize
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.id2label == {0: "circle", 1: "square", 2: "stripes"}
    assert config.label2id == {"circle": 0, "square": 1, "stripes": 2} and config.image_size == 32
    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    image = Image.open(next((SAMPLE_IMAGES / "test" / "square").iterdir())).convert("RGB")
    pixels = torch.as_tensor(theirs(images=image, return_tensors="np")["pixel_values"]).double()
    ours = to_tensor(image, 32, run.task.mean, run.task.std)[None].double()
    torch.testing.assert_close(pixels, ours, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, run.model(pixels),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_a_classifier_run_exports_its_own_label_order_and_tokenizer_roles(tmp_path):
    """A label order other than the default (ids ≠ their defaults): config.json's id2label and label2id are the
    run's, and the tokenizer's special tokens are the ones its vocabulary names."""
    run = train(recipe_smoke_config("xlmr_xnli", tmp_path / "run", extra=[
        "task.labels=[neutral,contradiction,entailment]", "trainer.max_steps=1", "trainer.eval_batches=1",
        "trainer.progress_bar=false"]))  # fmt: skip
    assert run.task.label_names == ["neutral", "contradiction", "entailment"]  # neither default nor sorted
    export(tmp_path / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "neutral", "1": "contradiction", "2": "entailment"}
    assert config["label2id"] == {"neutral": 0, "contradiction": 1, "entailment": 2}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    roles = {role: getattr(tokenizer, role) for role in ("bos_token", "eos_token", "cls_token", "sep_token",
                                                          "pad_token", "unk_token", "mask_token")}  # fmt: skip
    assert roles == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": None,
    }  # no <mask> in its vocabulary
    assert tokenizer.pad_token_id == config["pad_token_id"] == 1  # the padding the model masks is the one it pads


def test_the_nucleus_keeps_the_most_probable_tokens_up_to_the_first_that_reaches_top_p():
    from fabric_tram.models.generate import nucleus

    probs = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.0625], dtype=torch.float64)  # dyadic: sums are exact
    kept = {p: (nucleus(probs, p) > 0).nonzero().flatten().tolist() for p in (0.3, 0.5, 0.51, 0.75, 0.76, 0.875)}
    assert kept == {0.3: [1], 0.5: [1], 0.51: [1, 3], 0.75: [1, 3], 0.76: [0, 1, 3], 0.875: [0, 1, 3]}
    assert torch.equal(nucleus(probs, 1.0), probs)
    assert torch.equal(nucleus(probs, 0.75), torch.tensor([0.0, 0.5, 0.0, 0.25, 0.0], dtype=torch.float64))
    # transformers' top_p keeps the same tokens (it removes those whose cumulative probability stays <= 1 - top_p)
    for top_p in (0.3, 0.7, 0.8):  # (away from the boundaries, where its softmax of our log-probabilities rounds)
        theirs = transformers.TopPLogitsWarper(top_p=top_p)(None, probs.log()[None])[0]
        assert (theirs > -float("inf")).nonzero().flatten().tolist() == kept[{0.3: 0.3, 0.7: 0.51, 0.8: 0.76}[top_p]]


def test_sampling_draws_only_from_the_nucleus_and_generation_stops_after_an_end_token():
    ours = perturbed("gpt2")
    prompt = [5, 17, 3, 42]
    logits = ours(torch.tensor([prompt]))[0, -1].detach()
    probs = torch.softmax(logits.double(), -1)
    order = probs.argsort(descending=True).tolist()
    top_p = float(probs[order[:3]].sum())  # reached exactly by the third most probable token
    drawn = {generate(ours, prompt, 1, temperature=1.0, top_p=top_p, seed=s)[0] for s in range(200)}
    assert drawn == set(order[:3])  # never outside the nucleus, and every member of it
    greedy = generate(ours, prompt, max_new_tokens=12)
    end = greedy[4]
    first = greedy.index(end)
    assert generate(ours, prompt, max_new_tokens=12, eos_ids=(end,)) == greedy[: first + 1]  # the end token included
    assert generate(ours, prompt, max_new_tokens=12, eos_ids=(999, end)) == greedy[: first + 1]  # any of several
    assert generate(ours, prompt, max_new_tokens=3, eos_ids=(999,)) == greedy[:3]


def chat_like_gpt2_base(corpus, folder: Path) -> Path:
    """A GPT-2 checkpoint of the small sizes (our exporter) whose special ids are not the tokenizer's end of text:
    bos 1, eos 2 in config.json and eos [2, 50256] in generation_config.json, as SmolLM2-Instruct's 1/2 ≠ its
    ``<|endoftext|>`` 0."""
    torch.manual_seed(0)
    model = GPT2(small_config(corpus, folder / "unused", extra=GPT2_IDS).model)
    save_hf_folder(model, folder, extra_config={"bos_token_id": 1, "eos_token_id": 2})
    generation = {"bos_token_id": 1, "eos_token_id": [2, 50256], "max_new_tokens": 7}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_a_hugging_face_causal_lm_run_generates_and_exports_with_its_base_ids_and_one_tied_head(corpus, tmp_path):
    """model.name=hf, a causal LM: `generate` works on the run (not refused) with the base's stop ids and gives the
    tokens transformers' greedy generate gives on the export; the export keeps the base's bos/eos (never the
    tokenizer's end of text), its generation_config.json, and writes the tied head once."""
    from safetensors import safe_open

    from fabric_tram.engine.decoder import load_decoder

    base = chat_like_gpt2_base(corpus, tmp_path / "base")
    hf_model = ["model.name=hf", f"model.pretrained={base}"]
    run = train(small_config(corpus, tmp_path / "run", "adam", steps=2, precision="32-true",
                             extra=["task.tokenizer=gpt2"], model=hf_model))  # fmt: skip
    decoder = load_decoder(tmp_path / "run")
    assert decoder.eos_ids == (2, 50256)
    export(tmp_path / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # the base's, not <|endoftext|> = 50256
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == [2, 50256]
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ('"', "#")  # ids 1 and 2 of GPT-2's BPE
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # tied: written once
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    ids = decoder.tokenizer.encode("hello there").ids
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.tensor([ids])).logits, run.model(torch.tensor([ids])), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    expected = theirs.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :].tolist()
    cli = [sys.executable, "-m", "fabric_tram.cli", "generate", str(tmp_path / "run"), "hello there"]
    out = subprocess.run([*cli, "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "hello there" + decoder.tokenizer.decode(expected, skip_special_tokens=False) + "\n"


def test_generate_stops_on_the_end_token_and_prints_it(corpus, tmp_path):
    """A model whose every next token is <|endoftext|> (the final norm's output is its bias, which the
    embedding row of <|endoftext|> points along): generation stops after one token, and prints it."""
    torch.manual_seed(0)
    model = GPT2(small_config(corpus, tmp_path / "unused", extra=GPT2_IDS).model)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.randn(33))
        model.transformer.wte.weight[50256] = 100 * model.transformer.ln_f.bias
    save_hf_folder(model, tmp_path / "hf", extra_config={"bos_token_id": 50256, "eos_token_id": 50256})
    tokenizer = load_tokenizer("gpt2")
    tokenizer.add_special_tokens(["<|endoftext|>"])  # special, as hub tokenizers mark their control tokens
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    out = subprocess.run([sys.executable, "-m", "fabric_tram.cli", "generate", str(tmp_path / "hf"), "hello",
                          "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "hello<|endoftext|>\n"


def test_a_task_of_ones_own_declares_its_export_files_and_head_without_touching_the_engine(corpus, tmp_path):
    """A task registered in a plugin carries what export and model.name=hf need (``export_files``, ``hf_head``;
    contracts.py): its writer's files land beside the weights, and head=auto reads its head."""
    from fabric_tram.models.hf import HFConfig
    from fabric_tram.registry import TASKS, register_task
    from fabric_tram.tasks.language_modeling import LanguageModelingTask, LMConfig

    def notes(task_config, model, folder, ids):
        (folder / "notes.txt").write_text(f"trained on {task_config.data_dir}")
        return ["notes.txt"]

    @register_task("lm-with-notes", config=LMConfig, description="lm, exported with a notes file")
    class WithNotes(LanguageModelingTask):
        export_files = staticmethod(notes)

    try:
        config = small_config(corpus, tmp_path / "run", "sgd", steps=1, precision="32-true")
        config.task.name = "lm-with-notes"
        train(config)
        files = export(tmp_path / "run", tmp_path / "hf")
        assert "notes.txt" in files and "tokenizer.json" not in files  # its own writer, not the lm task's
        assert (tmp_path / "hf" / "notes.txt").read_text() == f"trained on {corpus}"
        head = HFConfig(pretrained="x")
        head.resolve_with(type("C", (), {"task": type("T", (), {"name": "lm-with-notes", "labels": None})})())
        assert head.head == "causal-lm"  # declared by the class it derives from
    finally:
        TASKS.unregister("lm-with-notes")
