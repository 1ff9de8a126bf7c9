"""What memory a step costs, measured: page faults of a step in a fresh process (is freed memory kept?), and the
elements autograd saves per token (what the estimator counts for activations)."""

from __future__ import annotations

import platform
import subprocess
import sys

import torch

GLIBC = platform.libc_ver()[0] == "glibc"
# A step of the page-fault probe frees and reallocates 64 MiB tensors (16,384 pages each): without freed memory
# kept, each step faults at least two of them back in (measured ~65,000); kept, measured 0 or 1 per step, and
# once in a while a few thousand when the machine reclaims memory. A quarter of one tensor separates the two.
FEW_FAULTS, MANY_FAULTS = 16384 // 4, 2 * 16384
_FAULTS = """
import resource, torch
from fabric_tram.engine.cpu_memory import keep_freed_cpu_memory
from fabric_tram.models.gpt2 import GPT2, GPT2Config
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.loss import cross_entropy_sum
{setup}
torch.manual_seed(0)
model = GPT2(GPT2Config(preset="tiny", n_layer=1, n_head=2, n_embd=32, n_positions=256, vocab_size=32768, dropout=0.0))
loss = lambda m, b: cross_entropy_sum(m(b["x"]), b["y"])  # noqa: E731
loop = UpdateRuleLoop("adam", model, torch.optim.Adam(model.parameters()), loss)
ids = torch.randint(0, 32768, (2, 257))
faults = []
for _ in range(7):  # logits and log-probabilities of 2 x 256 x 32768 floats: 64 MiB each
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loop.step({{"x": ids[:, :-1], "y": ids[:, 1:]}})
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[2:])[2])  # the median step once the heap has grown to its working size
"""


def page_faults_per_step(setup: str) -> tuple[str, float]:
    """In a fresh process: run ``setup`` (its printed lines come back first), then count the page faults of a
    training step whose logits and log-probabilities are 64 MiB each (the median of five steps after two)."""
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS.format(setup=setup)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    *printed, faults = out.stdout.split()
    return " ".join(printed), float(faults)


def saved_elements_per_token(run_block, keep_out, tokens: int) -> float:
    """Elements of the tensors autograd saves while ``run_block()`` runs, per token: what `fabric-tram estimate`
    counts for activations (``keep_out``: parameters and tables; per-token statistics, < 16 per token, left out)."""
    skip = {t.untyped_storage().data_ptr() for t in keep_out}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.nbytes() // t.element_size() >= tokens * 16:
            saved[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_block()
    return sum(saved.values()) / tokens
