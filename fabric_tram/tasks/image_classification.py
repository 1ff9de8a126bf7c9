"""Image classification (the paper's cross-dataset transfer: ViT from ImageNet to CIFAR-100, Stanford Cars, Oxford
Flowers; section 4.1, Table 3): top-1 accuracy on one dataset, images preprocessed as the checkpoint expects.

Data: ``hf://OWNER/NAME`` through ``datasets`` (image and label columns found by type), a folder
``DATA/<split>/<class>/<image>``, or ``image-sample`` (bundled: a few generated images of 3 classes in mixed
modes and sizes). Preprocessing and augmentation: ``fabric_tram.data.images``. The loss is summed over images.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from fabric_tram.data.images import (
    FolderImages,
    HubImages,
    augment,
    folder_classes,
    folder_split,
    processor_settings,
    to_tensor,
)
from fabric_tram.data.text import DataError
from fabric_tram.registry import register_task
from fabric_tram.tasks.classification import ClassificationTask
from fabric_tram.tasks.export_files import image_processor_files


@dataclass
class ImageConfig:
    data_dir: str = "image-sample"  # "image-sample" (bundled), a folder DATA/<split>/<class>/<image>, hf://ID
    dataset_name: str | None = None  # its column in result tables (default: the folder or hub dataset name)
    processor: str | None = None  # a checkpoint folder whose preprocessor_config.json sets size, mean and std
    image_size: int | None = None  # overrides the processor's size (it must match the model's image_size)
    augment: bool = True  # random crop and flip of training images (Kim et al. 2022)
    image_key: str | None = None  # hub datasets: the image column (default: the first Image feature)
    label_key: str | None = None  # hub datasets: the label column (default: the first ClassLabel, or "label")
    validation_split: str = "validation"  # hub split names (CIFAR-100 has no validation split: set it to test)
    test_split: str = "test"
    revision: str | None = None


@register_task("image", config=ImageConfig, description="image classification; top-1 accuracy (ViT transfer)")
class ImageClassificationTask(ClassificationTask):
    hf_head, peft_task_type = "image-classification", None  # model.name=hf; peft has no task type for images
    export_files = staticmethod(image_processor_files)

    def __init__(self, config: ImageConfig):
        self.config = config
        settings = processor_settings(config.processor)
        self.image_size = config.image_size or settings["size"]
        self.mean, self.std = settings["mean"], settings["std"]
        self.dataset = config.dataset_name or config.data_dir.rstrip("/").split("/")[-1]
        self.train_domains = [self.dataset]  # one "domain": the in-domain validation loss selects
        self._splits: dict[str, object] = {}
        if config.data_dir.startswith("hf://"):
            train = self._load("train")
            self.num_labels = len(train.classes) if train.classes else int(max(train.rows[train.label_key])) + 1
            self.label_names = list(train.classes) if train.classes else None
        else:
            self.classes = folder_classes(self.root)
            self.num_labels = len(self.classes)
            self.label_names = list(self.classes)
        self.train_set = self.split("train")

    @property
    def root(self) -> Path:
        if self.config.data_dir == "image-sample":
            return Path(str(files("fabric_tram") / "assets" / "data" / "image-sample"))
        return Path(self.config.data_dir).expanduser()

    def _load(self, split: str):
        c = self.config
        if c.data_dir.startswith("hf://"):
            from datasets import load_dataset

            name = {"validation": c.validation_split, "test": c.test_split}.get(split, split)
            rows = load_dataset(c.data_dir[len("hf://") :], split=name, revision=c.revision)
            data = HubImages(rows, c.image_key, c.label_key, f"{c.data_dir} {name}")
        else:
            folder = folder_split(self.root, split)
            if folder is None:
                raise DataError(f"image folder {self.root} has no {split}/ split: expected {self.root}/{split}/")
            data = FolderImages(folder, self.classes)
        if len(data) == 0:
            raise DataError(f"{c.data_dir}: the {split} split holds no image")
        self._splits[split] = data
        return data

    def split(self, split: str):
        """A split's (image, label) pairs; every label checked against the head's range when first read."""
        if split not in self._splits or not getattr(self._splits[split], "checked", False):
            data = self._splits.get(split) or self._load(split)
            if isinstance(data, FolderImages):
                data.verify()  # every file opened before step 1: a damaged image names itself now, not mid-run
            labels = data.rows[data.label_key] if isinstance(data, HubImages) else [y for _, y in data.items]
            outside = sorted({int(y) for y in labels if not 0 <= int(y) < self.num_labels})
            if outside:
                raise DataError(
                    f"{self.config.data_dir} {split}: label(s) {outside[:8]} outside the head's range "
                    f"0-{self.num_labels - 1} (the training split's classes)"
                )
            data.checked = True
        return self._splits[split]

    def eval_sets(self, split: str) -> dict:
        return {self.dataset: self.split(split)}

    def collate(self, examples: list, indices: list[int], step: int | None = None) -> dict[str, torch.Tensor]:
        """Pixels (B, 3, size, size) and labels; training batches (``step`` given) augmented per image."""
        pixels = []
        for (image, _), index in zip(examples, indices, strict=True):
            x = to_tensor(image, self.image_size, self.mean, self.std)
            if step is not None and self.config.augment:
                x = augment(x, step=step, index=index)
            pixels.append(x)
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)
        return {"pixel_values": torch.stack(pixels), "labels": labels, "example_index": torch.tensor(indices)}

    def logits(self, model, batch: dict, **forward_kwargs) -> torch.Tensor:
        return model(batch["pixel_values"], **forward_kwargs)
