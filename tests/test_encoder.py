"""The encoder family (models/encoder.py) and the sentence-pair task (tasks/pair_classification.py): hidden states
and logits identical to Hugging Face's XLM-R and BERT on tiny configs built here, a masked-LM checkpoint getting a
new head, input noise as inputs_embeds, pair encoding as transformers' tokenizer does it, every update rule
stepping on the encoder, hub data through `datasets`, and clear errors before training."""

import json
from pathlib import Path

import pytest
import torch

from fabric_tram.bench.step_cost import RULES
from fabric_tram.config import ConfigError, load_config
from fabric_tram.data.text import DataError
from fabric_tram.loss import LossOutput
from fabric_tram.models.encoder import Encoder, EncoderConfig, config_from_hf
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.tasks.pair_classification import PairClassificationTask, PairConfig

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=40, num_labels=3)  # fmt: skip


def hf_classifier(kind: str):
    torch.manual_seed(0)
    if kind == "xlm-roberta":
        model = transformers.XLMRobertaForSequenceClassification(transformers.XLMRobertaConfig(**SIZES))
    else:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**SIZES))
    with torch.no_grad():  # non-zero biases, so every bias is really compared
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def padded_pairs(pad: int, bert: bool):
    ids = torch.randint(3, 99, (3, 12))
    ids[1, 8:], ids[2, 5:] = pad, pad  # right padding of different lengths
    ids[0, :2] = pad  # left padding: RoBERTa's positions must skip it (counted over the non-padding tokens)
    types = torch.zeros_like(ids)
    if bert:
        types[:, 4:] = 1  # segment B
    return ids, (ids != pad).long(), types


@pytest.mark.parametrize("kind", ["xlm-roberta", "bert"])
def test_hidden_states_and_logits_match_transformers(tmp_path, kind):
    theirs = hf_classifier(kind)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours = Encoder.from_config(EncoderConfig(pretrained=str(tmp_path))).eval()
    assert ours.sizes["variant"] == ("bert" if kind == "bert" else "roberta")
    ids, mask, types = padded_pairs(theirs.config.pad_token_id, kind == "bert")
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        keep = mask.bool()[..., None]  # padded positions' states are not compared (nothing reads them)
        ours_h = ours.hidden_states(ids, mask, types)
        torch.testing.assert_close(ours_h * keep, out.hidden_states[-1] * keep, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(ids, mask, types), out.logits, atol=1e-5, rtol=0)
        # input noise = Hugging Face's inputs_embeds path (positions passed: HF cannot derive them from embeddings)
        z = 0.1 * torch.randn(3, 12, 32)
        positions = ours.positions(ids, mask.bool())
        noised = theirs(inputs_embeds=theirs.base_model.embeddings.word_embeddings(ids) + z, attention_mask=mask,
                        token_type_ids=types, position_ids=positions).logits  # fmt: skip
        torch.testing.assert_close(ours(ids, mask, types, input_noise=lambda e: e + z), noised, atol=1e-5, rtol=0)
        assert (noised - out.logits).abs().max() > 1e-4  # the noise changes the logits: the comparison has teeth


def test_a_masked_lm_checkpoint_loads_its_body_and_gets_a_new_head(tmp_path):
    torch.manual_seed(0)
    mlm = transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(**SIZES)).eval()
    mlm.save_pretrained(tmp_path, safe_serialization=True)
    torch.manual_seed(1)
    ours = Encoder.from_config(EncoderConfig(pretrained=str(tmp_path), num_labels=5)).eval()
    ids, mask, _ = padded_pairs(1, False)
    with torch.no_grad():
        hidden = mlm.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours.hidden_states(ids, mask) * mask[..., None], hidden * mask[..., None],
                                   atol=1e-5, rtol=0)  # fmt: skip
    assert ours.classifier.out_proj.weight.shape == (5, 32) and ours.classifier.out_proj.weight.std() > 0.01


def test_another_architecture_or_preset_is_refused_before_loading(tmp_path):
    hf = {
        "model_type": "xlm-roberta",
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "vocab_size": 250002,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "pad_token_id": 1,
        "layer_norm_eps": 1e-5,
    }  # fmt: skip  (FacebookAI/xlm-roberta-base's config.json)
    assert config_from_hf(EncoderConfig(preset="xlm-roberta-base", pretrained="x"), hf).sizes()["n_layer"] == 12
    with pytest.raises(ValueError, match="does not match model.preset='xlm-roberta-large'.*n_layer=24 .config."):
        config_from_hf(EncoderConfig(preset="xlm-roberta-large", pretrained="x"), hf)
    with pytest.raises(ValueError, match="model_type='gpt2', not an encoder of this family"):
        config_from_hf(EncoderConfig(pretrained="x"), {**hf, "model_type": "gpt2"})
    theirs = hf_classifier("bert")
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match=r"classifier.weight \(3, 32\) vs \(4, 32\).*model.new_head=true"):
        Encoder.from_config(EncoderConfig(pretrained=str(tmp_path), num_labels=4))
    fresh = Encoder.from_config(EncoderConfig(pretrained=str(tmp_path), num_labels=4, new_head=True))
    assert fresh.classifier.weight.shape == (4, 32)


def test_xlm_roberta_base_preset_has_the_published_parameter_count():
    with torch.device("meta"):
        model = Encoder(EncoderConfig(preset="xlm-roberta-base"))
    # XLMRobertaModel's 278,043,648, less its pooler (768² + 768), plus the 3-label head (768² + 768 + 768·3 + 3)
    pooler, head = 768 * 768 + 768, 768 * 768 + 768 + 768 * 3 + 3
    assert sum(p.numel() for p in model.parameters()) == 278_043_648 - pooler + head


# ----------------------------------------------------------------------------------------------- the task


def test_pairs_are_encoded_as_transformers_encodes_them_longer_segment_truncated_first():
    tokenizer_file = str(ROOT / "tokenizers" / "nli-sample" / "tokenizer.json")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
    task = PairClassificationTask(PairConfig(max_length=16))
    premise = "A man is playing a guitar on stage while two children are running in the park."
    for hypothesis in ("A man is performing.", "Kids are outside in the rain and the sky is clear and dry today."):
        ours = task.encoder.encode(premise, hypothesis)
        expected = theirs(premise, hypothesis, truncation=True, max_length=16)
        assert ours.ids == expected["input_ids"] and len(ours.ids) == 16
        assert ours.tokens[0] == "<s>" and ours.tokens.count("</s>") == 3 and ours.tokens[-1] == "</s>"
    short = task.encoder.encode("A man.", "Kids.")  # no truncation below the limit: both segments whole
    assert short.ids == theirs("A man.", "Kids.", truncation=True, max_length=16)["input_ids"]


def test_every_update_rule_steps_on_the_encoder():
    task = PairClassificationTask(PairConfig())
    batch = task.collate([task.train_set[i] for i in range(4)], list(range(4)))
    for name in RULES:
        torch.manual_seed(0)
        model = Encoder(EncoderConfig())
        before = [p.detach().clone() for p in model.parameters()]
        loop = UpdateRuleLoop(name, model, torch.optim.Adam(model.parameters(), lr=1e-3), task.loss)
        stats = loop.step(batch)
        assert torch.isfinite(torch.tensor(stats["loss"])), name
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), name


def test_tram_x_noise_reaches_the_token_embeddings():
    """tram-x's noised target forward reaches the encoder's embeddings (one of the step's forwards carries the
    noise function) and its d, the divergence from the noised outputs, is positive."""
    task = PairClassificationTask(PairConfig())
    batch = task.collate([task.train_set[i] for i in range(4)], list(range(4)))
    seen = []
    model = Encoder(EncoderConfig(dropout=0.0))
    real = model.hidden_states

    def spy(input_ids, attention_mask=None, token_type_ids=None, input_noise=None):
        seen.append(input_noise is not None)
        return real(input_ids, attention_mask, token_type_ids, input_noise)

    model.hidden_states = spy
    loop = UpdateRuleLoop("tram-x", model, torch.optim.SGD(model.parameters(), lr=0.0), task.loss)
    stats = loop.step(batch)
    assert any(seen) and not all(seen)  # one noised forward, the others clean
    assert stats["d"] > 0


def test_hub_data_reads_multinli_for_training_and_xnli_per_language(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split))
        rows = [{"premise": f"{name} {config} p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(6)]
        return rows + [{"premise": "no gold label", "hypothesis": "x", "label": -1}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = PairClassificationTask(PairConfig(data_dir="hub", eval_languages=["en", "sw"]))
    assert len(task.train_set) == 6  # the row without a gold label is left out
    assert set(task.eval_sets("test")) == {"en", "sw"}
    assert ("nyu-mll/multi_nli", None, "train") in calls and ("facebook/xnli", "sw", "test") in calls
    with pytest.raises(DataError, match="language.s. \\['xx'\\] not in the data .*available: en, ar, bg"):
        PairClassificationTask(PairConfig(data_dir="hub", eval_languages=["xx"]))


def write_pairs(folder: Path, language: str, split: str, rows: list) -> None:
    (folder / language).mkdir(parents=True, exist_ok=True)
    (folder / language / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bad_data_is_refused_before_training(tmp_path):
    good = {"premise": "a b", "hypothesis": "c", "label": "neutral"}
    write_pairs(tmp_path, "en", "train", [good, {"premise": "a", "hypothesis": "b", "label": 7}])
    with pytest.raises(DataError, match="en/train.jsonl:2: label 7 is outside the label set"):
        PairClassificationTask(PairConfig(data_dir=str(tmp_path)))
    write_pairs(tmp_path, "en", "train", [good, {"premise": "a", "label": 0}])
    with pytest.raises(DataError, match="train.jsonl:2: no field.s. \\['hypothesis'\\]"):
        PairClassificationTask(PairConfig(data_dir=str(tmp_path)))
    write_pairs(tmp_path, "en", "train", [good])
    with pytest.raises(DataError, match="language.s. \\['fr'\\] not in the data"):
        PairClassificationTask(PairConfig(data_dir=str(tmp_path), eval_languages=["fr"]))
    with pytest.raises(DataError, match="'gpt2' adds no special tokens to a pair"):
        PairClassificationTask(PairConfig(tokenizer="gpt2"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.num_labels=4"], "the task has 3 labels .* but model.num_labels=4: set model.num_labels=3"),
        (["model.vocab_size=100"], "'nli-sample' has 255 tokens but the model's embedding table has 100 rows"),
    ],
)
def test_a_model_that_does_not_fit_the_task_is_refused_before_training(tmp_path, overrides, message):
    from fabric_tram.engine.trainer import train

    config = load_config(
        ROOT / "recipes" / "xlmr_xnli.py", [f"trainer.run_dir={tmp_path / 'run'}", *overrides], smoke=True
    )
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_recipe_smoke_and_the_per_language_table(tmp_path):
    from fabric_tram.analysis.results import report
    from fabric_tram.cli import train_job

    full = load_config(ROOT / "recipes" / "xlmr_xnli.py")
    assert (full.task.data_dir, full.model.pretrained, full.trainer.micro_batch_size) == (
        "hub", "FacebookAI/xlm-roberta-base", 32)  # fmt: skip
    assert full.optimizer.betas == [0.9, 0.99] and full.optimizer.lr == 2e-5 and full.schedule.name == "polynomial"
    for rule, seed in (("adam", 0), ("adam", 1), ("tram-prev", 0)):
        overrides = [f"trainer.run_dir={tmp_path / f'{rule}-{seed}'}", f"optimizer.name={rule}", f"trainer.seed={seed}",
                     *(["optimizer.calibration_steps=2"] if rule.startswith("tram") else [])]  # fmt: skip
        run = train_job(load_config(ROOT / "recipes" / "xlmr_xnli.py", overrides, smoke=True))
        assert len(run.history) == 4
    summary = json.loads((tmp_path / "adam-0" / "results.json").read_text())
    assert summary["metric"] == "accuracy" and set(summary["results"]["test"]) == {"en", "fr", "de", "es"}
    assert "| run | en | de | es | fr | ZS Avg. |" in (tmp_path / "adam-0" / "results_table.md").read_text()
    text = report(sorted(tmp_path.glob("*-*")), tmp_path / "report")
    assert text.startswith("test accuracy (%) (mean ± std [95% CI of the mean]")
    assert "| adam (n=2) |" in text and "| tram-prev |" in text and (tmp_path / "report" / "figure2.png").is_file()


def test_accuracy_leaves_out_padding_examples():
    """A rank that ran out of evaluation examples runs a zero-weight batch (labels -100): it adds nothing to the
    loss, the count or the correct predictions."""
    task = PairClassificationTask(PairConfig())
    batch = task.collate([task.train_set[i] for i in range(3)], [0, 1, 2])
    batch["labels"][1:] = -100  # two padding examples
    logits = torch.zeros(3, 3)
    logits[:, 0] = 1.0  # every example predicted as label 0 (the padding ones too)
    out = LossOutput(torch.tensor(0.0), task.count_targets(batch), logits, batch["labels"] != -100)
    correct = task.eval_sums(out, batch)["correct"]
    assert int(correct) == int(batch["labels"][0] == 0) and int(out.count) == 1
    assert task.metrics(0.0, 1.0, float(correct))["accuracy"] == 100.0 * int(correct)


def test_the_real_cross_lingual_check_runs_its_smoke_setting_and_asks_for_its_inputs(tmp_path, monkeypatch):
    import runpy

    recipe = runpy.run_path(str(ROOT / "recipes" / "e5_crosslingual.py"))
    assert recipe["RECIPE"]["model"]["pretrained"] == recipe["RECIPE"]["task"]["tokenizer"] == recipe["CHECKPOINT"]
    monkeypatch.chdir(tmp_path)  # no checkpoint or data here: the recipe says how to make them
    with pytest.raises(SystemExit, match="does not exist; make them with the commands of this file's docstring"):
        recipe["check_inputs"]([])
    defaults = {"seeds": 3, "rules": recipe["RULES"], "out": str(tmp_path / "out")}
    table = recipe["main"](["--smoke", "--rules", "tram-x"], recipe["RECIPE"], recipe["SMOKE"], recipe["SELECTED"],
                           defaults)  # fmt: skip
    assert table.startswith("test accuracy (%)") and "| pre-trained |" in table and "| tram-x |" in table
    assert "calibration_steps: 10" in (tmp_path / "out-smoke" / "tram-x-seed0" / "config.yaml").read_text()
