"""The language-model head, with the vocabulary padded to a multiple of 64 for the GPU's matrix units."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GPU_VOCAB_MULTIPLE = 64  # as nanoGPT's padded 50304; 8 would already leave the unaligned kernels
CPU_VOCAB_MULTIPLE = 1  # no gain on a CPU, only the copy (tests set 64 to run the GPU's path here)


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, multiple: int | None = None) -> torch.Tensor:
    """``hidden @ weight.T`` over a vocabulary padded with zero rows to ``multiple`` (64 on a GPU, none on a CPU),
    the padded columns cut off again: the same logits and gradients, as a view whose rows are 64-aligned.

    Why: a 16-bit matrix product whose output rows are not a multiple of 8 elements (GPT-2's 50,257 words) falls
    back to unaligned Turing-era kernels on Hopper. Measured on an H200 (GPT-2 124M, 8 x 1,024 tokens, bf16-mixed,
    benchmarks/profile_step.py): the head's forward and two backward products took 15.5 of adam's 41.3 ms of kernel
    time, as ``cutlass_75_..._align1`` kernels. The parameter keeps its shape, so checkpoints, FSDP shards and
    loading are untouched; the pad is one copy of the weight per forward (a bf16 cast under autocast makes one anyway).
    """
    if multiple is None:
        multiple = GPU_VOCAB_MULTIPLE if weight.is_cuda else CPU_VOCAB_MULTIPLE
    pad = -weight.size(0) % multiple
    if pad == 0:
        return F.linear(hidden, weight)
    return F.linear(hidden, F.pad(weight, (0, 0, 0, pad)))[..., : weight.size(0)]
