"""The image task (tasks/image_classification.py, data/images.py): preprocessing as transformers' ViT processor does
it on images of every mode, augmentation drawn per (step, image), epochs, background batch workers and mid-epoch
resume that change nothing (float64), hub datasets through `datasets`, and clear errors before training."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fabric_tram.config import ConfigError, load_config
from fabric_tram.data.images import processor_settings, to_tensor
from fabric_tram.data.text import DataError
from fabric_tram.engine.trainer import train
from fabric_tram.tasks.image_classification import ImageClassificationTask, ImageConfig

SAMPLE = Path(__file__).resolve().parents[1] / "fabric_tram" / "assets" / "data" / "image-sample"


def mixed_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (28, 40, 3), dtype=np.uint8))
    return [rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), rgb.resize((17, 23))]


def test_preprocessing_matches_transformers_vit_processor_on_every_mode(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32},
              "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3], "do_resize": True, "do_rescale": True,
              "do_normalize": True, "resample": 2, "rescale_factor": 1 / 255}  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    settings = processor_settings(str(tmp_path))
    theirs = transformers.ViTImageProcessor.from_pretrained(tmp_path)
    for image in mixed_images():
        expected = torch.as_tensor(
            np.asarray(theirs(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0])
        )
        ours = to_tensor(image, settings["size"], settings["mean"], settings["std"])
        assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_processor_settings_come_from_a_hub_id_and_a_missing_source_is_refused(tmp_path, monkeypatch):
    import huggingface_hub

    config = {"size": {"height": 48, "width": 48}, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    asked = []

    def fake_download(repo_id, filename, **kwargs):  # the hub's cache, offline: the file the test wrote
        asked.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    settings = processor_settings("google/vit-base-patch16-224")
    assert asked == [("google/vit-base-patch16-224", "preprocessor_config.json")]
    assert settings == {"size": 48, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    with pytest.raises(DataError, match="task.processor='no/such/folder' is neither a folder nor a hub id"):
        processor_settings("no/such/folder")


def test_training_augmentation_is_drawn_per_step_and_image_evaluation_is_not_augmented():
    task = ImageClassificationTask(ImageConfig())
    assert (len(task.train_set), len(task.split("validation")), task.num_labels) == (24, 6, 3)
    examples = [task.train_set[i] for i in (0, 5)]
    a = task.collate(examples, [0, 5], step=3)["pixel_values"]
    assert torch.equal(a, task.collate(examples, [0, 5], step=3)["pixel_values"])  # the same step: the same crop
    assert not torch.equal(a, task.collate(examples, [0, 5], step=4)["pixel_values"])  # a new step: a new crop
    plain = task.collate(examples, [0, 5])["pixel_values"]
    assert torch.equal(plain[0], to_tensor(examples[0][0], task.image_size, task.mean, task.std))
    assert torch.equal(plain, task.collate(examples, [0, 5])["pixel_values"]) and not torch.equal(plain, a)


def image_config(run_dir, *extra):
    return load_config(None, ["model.name=vit", "model.num_labels=3", "task.name=image", "task.image_size=32",
                              "optimizer.name=tram-x", "optimizer.base=sgd", "optimizer.lr=0.1",
                              "optimizer.calibration_steps=2", "schedule.name=cosine", "trainer.precision=64-true",
                              "trainer.micro_batch_size=4", "trainer.max_epochs=1", "trainer.eval_batches=1",
                              "trainer.progress_bar=false", "trainer.eval_splits=[validation,test]",
                              f"trainer.run_dir={run_dir}", *extra])  # fmt: skip


def test_epochs_workers_accumulation_and_mid_epoch_resume_change_nothing(tmp_path):
    inline = train(image_config(tmp_path / "inline", "trainer.save_every=2"))
    assert inline.config.trainer.max_steps == 6 and len(inline.history) == 6  # 24 images / 4 per step
    workers = train(image_config(tmp_path / "workers", "trainer.data_workers=2"))
    assert [s["loss"] for s in workers.history] == [s["loss"] for s in inline.history]
    checkpoint = tmp_path / "inline" / "checkpoints" / "step-00000002"  # mid-epoch
    resumed = train(image_config(tmp_path / "resumed", f"trainer.resume={checkpoint}"))
    assert [s["loss"] for s in resumed.history] == [s["loss"] for s in inline.history[2:]]
    # k = 1 vs 4 (float64): one image per micro-batch gives the same steps to rounding of float64, not float32
    one_by_one = train(image_config(tmp_path / "k4", "trainer.micro_batch_size=1", "trainer.accumulate=4"))
    for ours, theirs in zip(one_by_one.history, inline.history, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-12, abs=0)
    summary = json.loads((tmp_path / "inline" / "results.json").read_text())
    assert summary["metric"] == "accuracy" and set(summary["results"]["test"]) == {"image-sample"}
    assert 0.0 <= summary["results"]["test"]["image-sample"]["accuracy"] <= 100.0


def test_a_hub_dataset_is_read_by_its_column_types(monkeypatch):
    import datasets

    images = mixed_images()[:4]
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b"])})
    table = datasets.Dataset.from_dict({"img": images, "fine_label": [0, 1, 1, 0]}, features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, revision=None: table)
    task = ImageClassificationTask(ImageConfig(data_dir="hf://uoft-cs/cifar100", image_size=32))
    assert task.num_labels == 2 and task.dataset == "cifar100" and task.train_set[1][1] == 1
    unlabelled = datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, revision=None: unlabelled)
    with pytest.raises(DataError, match="no label column .columns: img.; set task.label_key"):
        ImageClassificationTask(ImageConfig(data_dir="hf://some/unlabelled"))


def test_bad_images_and_mismatched_models_are_refused_before_training(tmp_path):
    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat", "dog", "emu"])):
        for name in classes:
            (tmp_path / "data" / split / name).mkdir(parents=True)
            mixed_images()[0].save(tmp_path / "data" / split / name / "0.png")
    task = ImageClassificationTask(ImageConfig(data_dir=str(tmp_path / "data")))
    with pytest.raises(DataError, match=r"class folder\(s\) \['emu'\] are not classes of the training split"):
        task.split("test")
    with pytest.raises(ConfigError, match="the task has 3 labels but model.num_labels=5: set model.num_labels=3"):
        train(image_config(tmp_path / "run", "model.num_labels=5"))
    with pytest.raises(ConfigError, match="resizes images to 48×48 but the model takes 32×32"):
        train(image_config(tmp_path / "run2", "task.image_size=48"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_damaged_image_file_stops_the_run_before_step_1_naming_the_file(tmp_path):
    for split in ("train", "validation", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i, image in enumerate(mixed_images()[:2]):
                image.save(tmp_path / "data" / split / name / f"{i}.png")
    good = (tmp_path / "data" / "train" / "dog" / "1.png").read_bytes()
    (tmp_path / "data" / "train" / "dog" / "1.png").write_bytes(good[:40] + b"\x00" * 20 + good[60:])  # chunk CRC
    (tmp_path / "data" / "test" / "cat" / "0.png").write_bytes(b"not an image at all")
    config = image_config(tmp_path / "run", f"task.data_dir={tmp_path / 'data'}", "model.num_labels=2")
    with pytest.raises(DataError, match=r"1 image file\(s\) cannot be read: .*train/dog/1.png .*replace or remove"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
    (tmp_path / "data" / "train" / "dog" / "1.png").write_bytes(good)
    with pytest.raises(DataError, match=r"test/cat/0.png \(UnidentifiedImageError"):
        train(image_config(tmp_path / "run2", f"task.data_dir={tmp_path / 'data'}", "model.num_labels=2"))
    assert not (tmp_path / "run2" / "checkpoints").exists()  # the test split is read before step 1 too


def test_the_accuracy_table_has_confidence_intervals_over_runs(tmp_path):
    """Table 3's shape from fake run folders: top-1 accuracy per dataset, mean ± std [95% CI] over 5 runs."""
    from fabric_tram.analysis.results import report

    folders = []
    for rule, base in (("sgd", 89.0), ("tram-prev", 90.0)):
        for seed in range(5):
            for dataset in ("cifar100", "oxford-flowers"):
                folder = tmp_path / f"{dataset}-{rule}-{seed}"
                folder.mkdir()
                accuracy = base + 0.1 * seed + (5.0 if dataset == "oxford-flowers" else 0.0)
                results = {"test": {dataset: {"accuracy": accuracy, "loss": 0.5, "examples": 100.0}}}
                summary = {"optimizer": rule, "seed": seed, "train_domains": [dataset], "metric": "accuracy",
                           "results": results}  # fmt: skip
                (folder / "results.json").write_text(json.dumps(summary))
                folders.append(folder)
    text = report(folders, tmp_path / "report")
    assert text.startswith("test accuracy (%) (mean ± std [95% CI of the mean]")
    assert "| tram-prev (n=5) | 90.20 ± 0.16 [90.00, 90.40] | 95.20 ± 0.16 [95.00, 95.40] |" in text
