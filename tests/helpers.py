"""Shared by the tests and the 2-process worker: the small equivalence set-up of docs/design.md.

The test model has tied embeddings, parameters in the root FSDP group (wte, wpe, ln_f) and dimensions not
divisible by 2 (n_embd = 33, vocabulary 50257: FSDP pads its shards); documents are padded, not packed, so
micro-batches and ranks hold unequal token counts.
"""

from __future__ import annotations

import platform
import subprocess
import sys

from fabric_tram.config import load_config
from fabric_tram.distributed import full_state_dict

SMALL_MODEL = [
    "model.name=gpt2",
    "model.preset=tiny",
    "model.n_layer=2",
    "model.n_head=3",
    "model.n_embd=33",
    "model.n_positions=48",
    "model.dropout=0.0",
]


def small_config(data_dir, run_dir, optimizer="sgd", micro=8, accumulate=1, steps=3, strategy="auto", extra=()):
    lr = "0.5" if optimizer == "sgd" else "0.003"
    return load_config(
        None,
        SMALL_MODEL
        + [
            "task.name=lm",
            f"task.data_dir={data_dir}",
            "task.packing=false",
            "task.block_size=32",
            f"optimizer.name={optimizer}",
            f"optimizer.lr={lr}",
            "schedule.name=constant",
            f"trainer.run_dir={run_dir}",
            f"trainer.micro_batch_size={micro}",
            f"trainer.accumulate={accumulate}",
            f"trainer.max_steps={steps}",
            f"trainer.strategy={strategy}",
            "trainer.precision=32-true",
            "trainer.grad_clip=0",
            "trainer.progress_bar=false",
            "trainer.eval_batches=1",
            *extra,
        ],
    )


def trajectory(run) -> dict:
    """What equivalence tests compare: per-step stats and the final (gathered) parameters."""
    keys = ("loss", "grad_norm", "n_targets")
    return {"steps": [{k: s[k] for k in keys} for s in run.history], "params": full_state_dict(run.model)}


def max_param_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


GLIBC = platform.libc_ver()[0] == "glibc"
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
