"""Step-exact batching: which examples each rank's micro-batches of optimizer step ``s`` hold.

The stream of example indices is one fixed permutation per epoch (from the seed). Step ``s`` takes the next
``G = micro_batch_size * accumulate * world_size`` indices of that stream; rank ``r`` takes its contiguous slice
and cuts it into ``accumulate`` micro-batches. So the examples of a step do not depend on how they are split
(k = 1 vs k = 4, 1 vs 2 processes), and the data position of a run is just its step number: resuming needs no
iterator state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class StepSampler:
    num_examples: int
    micro_batch_size: int
    accumulate: int
    world_size: int
    rank: int
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.num_examples < 1:
            raise ValueError("the training split is empty: nothing to sample")
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulate * self.world_size

    def _index(self, j: int) -> int:
        epoch, offset = divmod(j, self.num_examples)
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            self._perms = {
                epoch: torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
            }
        return int(self._perms[epoch][offset])

    def step_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for 0-based step ``step``."""
        per_rank = self.micro_batch_size * self.accumulate
        start = step * self.global_batch_size + self.rank * per_rank
        mine = [self._index(j) for j in range(start, start + per_rank)]
        return [mine[i * self.micro_batch_size : (i + 1) * self.micro_batch_size] for i in range(self.accumulate)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / self.num_examples


def eval_batches(
    num_examples: int, batch_size: int, world_size: int, rank: int, max_batches: int = 0
) -> list[list[int]]:
    """Sequential evaluation batches; every rank gets the same number (FSDP needs all ranks in every forward).

    ``max_batches`` (``trainer.eval_batches``) counts batches of ``batch_size`` over all ranks together: the same
    first ``max_batches × batch_size`` examples are scored whatever the number of processes, so a metric (and
    the best checkpoint or sweep setting it picks) does not depend on it. A rank with no examples left gets an
    empty list, which the caller turns into a zero-weight batch.
    """
    limit = num_examples if not max_batches else min(num_examples, max_batches * batch_size)
    rounds = -(-limit // (batch_size * world_size))
    out = []
    for i in range(rounds):
        start = min((i * world_size + rank) * batch_size, limit)
        out.append(list(range(start, min(start + batch_size, limit))))
    return out


def pad_sequences(sequences: Sequence[torch.Tensor], pad_value: int) -> torch.Tensor:
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out
