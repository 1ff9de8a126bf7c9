"""Each optimizer step's micro-batches, built in-line or by background worker processes.

Step ``s`` (1-based) takes the examples ``StepSampler.step_indices(s - 1)`` names, so what a step sees does not
depend on who builds it: ``trainer.data_workers=N`` moves the building (reading, decoding and augmenting images,
padding) into N processes that work a couple of steps ahead, and the steps are the same batches as in-line.
A task whose ``collate`` takes ``step=`` gets the step number (for augmentation drawn per step); evaluation calls
it without one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch

from fabric_tram.data.batching import StepSampler


def takes_step(collate) -> bool:
    return "step" in inspect.signature(collate).parameters


class StepBatches(torch.utils.data.Dataset):
    """Item ``s``: this rank's collated micro-batches (CPU tensors) of 0-based step ``s``."""

    def __init__(self, task, sampler: StepSampler):
        self.task, self.sampler, self.with_step = task, sampler, takes_step(task.collate)

    def __len__(self) -> int:  # steps are addressed by number; the loader's sampler says which
        raise TypeError("StepBatches has no length: iterate it with step_batches")

    def __getitem__(self, step0: int) -> list[dict]:
        task, out = self.task, []
        for idx in self.sampler.step_indices(step0):
            examples = [task.train_set[i] for i in idx]
            out.append(task.collate(examples, idx, step=step0 + 1) if self.with_step else task.collate(examples, idx))
        return out


def step_batches(task, sampler: StepSampler, first: int, last: int, workers: int = 0) -> Iterator[tuple[int, list]]:
    """(step, micro-batches) for the 1-based steps ``first`` to ``last``, built by ``workers`` processes (two
    steps ahead each) or, with 0, in this process when asked for."""
    batches = StepBatches(task, sampler)
    if workers == 0:
        for step in range(first, last + 1):
            yield step, batches[step - 1]
        return
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(first - 1, last), num_workers=workers, prefetch_factor=2
    )
    yield from zip(range(first, last + 1), loader, strict=True)
