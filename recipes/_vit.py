"""Shared by the vision recipes (paper section 4.1, appendices A and B.3, Table 3): ViT-B/16 from ImageNet
fine-tuned on one image dataset, and the smoke setting.

The paper follows Kim et al. (2022, Fisher SAM, section 5.1): SGD as the base optimizer with an initial learning
rate of 5e-4, cosine decay with no warm-up or restarts, 200 epochs, the final checkpoint scored (no early
stopping), 5 runs averaged with a 95% confidence interval. The learning rate is the one docs/algorithms.md
records for the paper's vision runs (the paper's text extraction lost the number). The batch size and momentum
are given by neither the paper nor our reading of it: 128 images per step and plain SGD (momentum 0) are this
recipe's choices; set ``trainer.micro_batch_size``/``trainer.accumulate`` and ``optimizer.momentum`` to change
them. Gradients are clipped at norm 1 (the engine's default, as in the language experiments).

None of the three datasets has a validation split: periodic evaluation (a curve, never a selection) reads the
test split, and the final weights are scored on it.
"""

import math

from _m2d2 import run_dir

HUB_ID = "google/vit-base-patch16-224"  # ViT-B/16, ImageNet-21k pre-trained, ImageNet-1k fine-tuned
IMAGES_PER_STEP = 128


def vit_recipe(name: str, dataset: str, num_labels: int, train_images: int, **task) -> dict:
    """The paper's setting for one dataset (``train_images`` sets the evaluation cadence: about every 10 epochs)."""
    every = 10 * math.ceil(train_images / IMAGES_PER_STEP)
    return {
        "model": {"name": "vit", "pretrained": HUB_ID, "num_labels": num_labels, "new_head": True},
        "task": {
            "name": "image",
            "data_dir": f"hf://{dataset}",
            "processor": HUB_ID,
            "validation_split": "test",
            "test_split": "test",
            **task,
        },
        "optimizer": {"name": "sgd", "base": "sgd", "lr": 5e-4},
        "schedule": {"name": "cosine", "warmup_steps": 0},
        "trainer": {
            "run_dir": run_dir(name),
            "strategy": "auto",
            "precision": "bf16-mixed",
            "micro_batch_size": IMAGES_PER_STEP,
            "accumulate": 1,
            "max_epochs": 200,
            "data_workers": 8,
            "eval_every": every,
            "save_every": every,
            "eval_splits": ["test"],
            "select_best": False,
            "keep_last": 2,
        },
    }


def vit_smoke(name: str) -> dict:
    """The tiny ViT on the bundled generated images (3 classes, 32 × 32), 2 epochs of 4 images per step."""
    return {
        "model": {"pretrained": None, "preset": "tiny", "num_labels": 3},
        "task": {
            "data_dir": "image-sample",
            "processor": None,
            "image_size": 32,
            "image_key": None,
            "label_key": None,
            "validation_split": "validation",
            "dataset_name": "image-sample",
        },
        "optimizer": {"lr": 0.05},
        "trainer": {
            "run_dir": run_dir(f"smoke/{name}"),
            "precision": "32-true",
            "micro_batch_size": 4,
            "max_epochs": 2,
            "data_workers": 0,
            "eval_every": 6,
            "save_every": 6,
            "eval_batches": 2,
            "progress_bar": False,
        },
    }
