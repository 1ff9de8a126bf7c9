"""Labelled images: where they come from, and how a batch of them becomes the tensor a checkpoint expects.

Sources (one shape: a sequence of ``(image, label)`` with a PIL image):
- a folder ``DATA/<split>/<class>/<image file>`` (class names sorted give the label indices);
- a hub dataset through ``datasets`` (``hf://OWNER/NAME``), with its image and label columns found by type
  (``task.image_key``/``task.label_key`` to choose).

Preprocessing follows the checkpoint's ``preprocessor_config.json`` (``ViTImageProcessor``): convert to RGB (a
greyscale image is replicated, an alpha channel dropped, a palette expanded: what ``transformers`` does), resize to
``size`` with bilinear resampling, scale to [0, 1], normalise by ``image_mean``/``image_std``. Training images
are augmented first as Kim et al. (2022) do for transfer: a random crop of the resized image padded by an eighth
of its side (zeros, after normalisation), and a horizontal flip with probability 1/2. Each image's crop and flip
are drawn from (step, example index), so one step sees the same images however it is split into micro-batches or
processes, a resumed run sees what an uninterrupted one would, and an image gets a new crop every epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fabric_tram.data.text import DataError
from fabric_tram.data.tokenizer import hub_file, is_hub_id

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm")
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
IMAGENET_MEAN, IMAGENET_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViT's processor (google/vit-base-patch16-224)


class FolderImages:
    """``split_dir/<class>/<file>`` as (PIL image, label) pairs, decoded when indexed."""

    def __init__(self, split_dir: Path, classes: list[str]):
        self.items = []
        for label, name in enumerate(classes):
            folder = split_dir / name
            if folder.is_dir():
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                self.items += [(path, label) for path in files]
        extra = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise DataError(
                f"{split_dir}: class folder(s) {extra} are not classes of the training split ({len(classes)}: "
                f"{', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''}); a label outside the head's range"
            )

    def __len__(self) -> int:
        return len(self.items)

    def verify(self) -> None:
        """Open every file and check its image structure (PIL's ``verify``: header and chunk checksums, no pixel
        decoding), so a damaged file stops the run before step 1 with its name, not mid-epoch."""
        from PIL import Image

        bad = []
        for path, _ in self.items:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
                bad.append(f"{path} ({type(err).__name__}: {err})")
        if bad:
            raise DataError(
                f"{len(bad)} image file(s) cannot be read: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
                "replace or remove them"
            )

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as image:
                image.load()
                return image, label
        except Exception as err:  # damaged after the check (or truncated pixel data that verify cannot see)
            what = f"{type(err).__name__}: {err}"
            raise DataError(f"{path}: cannot be decoded as an image ({what}); replace or remove it") from None


def folder_split(root: Path, split: str) -> Path | None:
    for name in SPLIT_NAMES.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    return None


def folder_classes(root: Path) -> list[str]:
    train = folder_split(root, "train")
    if train is None:
        raise DataError(f"image folder {root} has no train/ split: expected {root}/train/<class>/<image>")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train} holds no class folder: expected {train}/<class>/<image>")
    return classes


class HubImages:
    """A ``datasets`` split as (PIL image, label) pairs; the image and label columns found by feature type."""

    def __init__(self, rows, image_key: str | None, label_key: str | None, name: str):
        import datasets

        features = rows.features
        images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
        self.image_key = image_key or (images[0] if images else None)
        self.label_key = label_key or (labels[0] if labels else ("label" if "label" in features else None))
        if self.image_key not in features:
            raise DataError(f"{name}: no image column (columns: {', '.join(features)}); set task.image_key")
        if self.label_key not in features:
            raise DataError(f"{name}: no label column (columns: {', '.join(features)}); set task.label_key")
        feature = features[self.label_key]
        self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[int(i)]
        return row[self.image_key], int(row[self.label_key])


def processor_settings(source: str | None) -> dict:
    """size, mean and std from a checkpoint's preprocessor_config.json: ``source`` is a folder or a hub id
    (``google/vit-base-patch16-224``); ViT's defaults when it is None or a folder without that file."""
    settings = {"size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if source is None:
        return settings
    if is_hub_id(source):
        path = Path(hub_file(source, "preprocessor_config.json", "task.processor"))
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser() / "preprocessor_config.json"
    else:
        raise DataError(
            f"task.processor={source!r} is neither a folder nor a hub id (OWNER/NAME): give the checkpoint whose "
            "preprocessor_config.json sets the image size, mean and std"
        )
    if path.is_file():
        config = json.loads(path.read_text())
        size = config.get("size", 224)
        settings["size"] = size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else size
        settings["mean"] = tuple(config.get("image_mean", IMAGENET_MEAN))
        settings["std"] = tuple(config.get("image_std", IMAGENET_STD))
    return settings


def to_tensor(image, size: int, mean, std) -> torch.Tensor:
    """RGB, bilinear resize to size × size, [0, 1], normalised: a (3, size, size) float32 tensor."""
    from PIL import Image

    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def augment(pixels: torch.Tensor, step: int, index: int) -> torch.Tensor:
    """Random crop (padding size/8) and horizontal flip, drawn from (step, example index)."""
    generator = torch.Generator().manual_seed(step * 1_000_003 + index)
    size = pixels.shape[-1]
    pad = max(1, size // 8)
    padded = torch.nn.functional.pad(pixels, (pad, pad, pad, pad))
    top, left = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    out = padded[:, top : top + size, left : left + size]
    if torch.rand((), generator=generator) < 0.5:
        out = out.flip(-1)
    return out.contiguous()
