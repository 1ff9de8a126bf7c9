"""Image throughput: a ViT trained through fabric_tram's trainer on JPEG files, batches built in-line and by
background workers (trainer.data_workers), against a bare loop that decodes in the main process; images/s.

The images are generated (photograph-sized JPEGs, so decoding and resizing cost what real ones do) into a
temporary image folder; the model is small enough that the data path matters. Each candidate runs ``--steps``
optimizer steps per round, rounds interleaved, the median reported.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fabric_tram.bench.common import engine_optimizer, synchronize, table, write_json
from fabric_tram.config import load_config
from fabric_tram.contracts import unwrap
from fabric_tram.data.batching import StepSampler
from fabric_tram.data.images import to_tensor
from fabric_tram.engine.batches import step_batches
from fabric_tram.engine.setup import setup
from fabric_tram.engine.trainer import training_step


def make_images(root: Path, count: int, side: int, classes: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)  # JPEG-friendly, not noise
        Image.fromarray(smooth).resize((side, side), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    for split in ("validation", "test"):  # one image per class: the trainer checks that the splits exist
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((side, side, 3), 40 * c, dtype=np.uint8)).save(root / split / f"class{c}" / "0.jpg")


def arguments():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="generated training images")
    parser.add_argument("--side", type=int, default=384, help="side of the generated JPEGs (pixels)")
    parser.add_argument("--image-size", type=int, default=64, help="the model's input side")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per candidate and round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the median is reported)")
    parser.add_argument("--workers", type=int, default=2, help="trainer.data_workers of the workers candidate")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    return parser.parse_args()


def main() -> dict:
    args = arguments()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "images"
        make_images(root, args.images, args.side)
        config = load_config(None, [
            "model.name=vit", "model.num_labels=4", f"model.image_size={args.image_size}", "model.patch_size=8",
            "task.name=image", f"task.data_dir={root}", f"task.image_size={args.image_size}",
            "optimizer.name=sgd", "optimizer.lr=0.01", "trainer.grad_clip=0", f"trainer.micro_batch_size={args.batch}",
            "trainer.max_steps=1000000", f"trainer.run_dir={scratch}/run", "trainer.progress_bar=false",
        ])  # fmt: skip
        run = setup(config, training=True)
        task = run.task
        sampler = StepSampler(len(task.train_set), args.batch, 1, 1, 0)
        model = unwrap(run.model)
        bare_optimizer = engine_optimizer(model.parameters(), torch.optim.SGD, lr=0.01)
        device = str(next(model.parameters()).device)
        position = {"step": 0}
        # one stream of steps per trainer candidate, as fit() has one: its worker processes start once
        streams = {w: step_batches(task, sampler, 1, 10**9, w) for w in (0, args.workers)}

        def trainer(workers: int) -> float:
            start = time.perf_counter()
            for _ in range(args.steps):
                step, batches = next(streams[workers])
                training_step(run, batches, step)
            synchronize(device)
            return time.perf_counter() - start

        def bare() -> float:
            start = time.perf_counter()
            for _ in range(args.steps):
                position["step"] += 1
                (idx,) = sampler.step_indices(position["step"] - 1)
                examples = [task.train_set[i] for i in idx]  # each image decoded once, as the trainer does
                pixels = torch.stack([to_tensor(image, task.image_size, task.mean, task.std) for image, _ in examples])
                labels = torch.tensor([label for _, label in examples])
                pixels, labels = pixels.to(device), labels.to(device)  # the trainer's device (a GPU where there is one)
                torch.nn.functional.cross_entropy(model(pixels), labels).backward()
                bare_optimizer.step()
                bare_optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            return time.perf_counter() - start

        candidates = {"bare loop": bare, "trainer, in-line": lambda: trainer(0),
                      f"trainer, {args.workers} workers": lambda: trainer(args.workers)}  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for round_ in range(1 + args.repeats):  # round 0 warms up (and starts the worker processes once)
            for name, fn in candidates.items():
                seconds = fn()
                if round_:
                    times[name].append(seconds)
    images = {name: args.steps * args.batch / float(np.median(t)) for name, t in times.items()}
    bare_rate = images["bare loop"]
    threads = torch.get_num_threads()
    print(
        f"{args.images} JPEGs of {args.side}px → {args.image_size}px, batch {args.batch}, model on {device}, "
        f"{threads} CPU threads"
    )
    print(table(["", "images/s", "vs bare loop"], [[n, r, r / bare_rate] for n, r in images.items()]))
    payload = {"settings": vars(args), "device": device, "images_per_s": images}
    print(f"written: {write_json(args.out, 'images', payload)}")
    return payload


if __name__ == "__main__":
    main()
