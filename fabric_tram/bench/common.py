"""Shared by the benchmarks: a model and batch of a given size, timing, tables and JSON output."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fabric_tram.engine.cpu_memory import keep_freed_cpu_memory
from fabric_tram.loss import cross_entropy_sum
from fabric_tram.models.gpt2 import GPT2, GPT2Config
from fabric_tram.optim.base import implementation

SIZES = {  # (n_layer, n_head, n_embd, vocab, block, batch)
    "tiny": (2, 2, 64, 4096, 64, 4),
    "small": (4, 4, 256, 8192, 256, 8),
    # small with GPT-2's vocabulary: the output head and the loss over 50,257 words dominate, as at a large batch
    "small-50k": (4, 4, 256, 50257, 256, 8),
    "gpt2": (12, 12, 768, 50257, 1024, 8),
    # a CPU stand-in for launch overhead: 580 small parameter tensors, where per-tensor Python work dominates
    "many-tensors": (48, 2, 32, 4096, 64, 8),
}


def trainer_model_settings(size: str) -> list[str]:
    """The model and task keys under which the trainer builds ``make_model(size)``'s architecture on the bundled
    demo text: GPT-2's tokenizer for GPT-2's vocabulary, else the demo's 4,096 tokens (so that a small size is not
    a 50,257-word output head with a little model in front, and the bare loop and the trainer run one model)."""
    n_layer, n_head, n_embd, vocab, block, _ = SIZES[size]
    return [
        "model.name=gpt2", "model.preset=tiny", f"model.n_layer={n_layer}", f"model.n_head={n_head}",
        f"model.n_embd={n_embd}", f"model.n_positions={block}", f"model.vocab_size={vocab}", "model.dropout=0.0",
        "task.name=lm", "task.data_dir=demo", f"task.tokenizer={'gpt2' if vocab == 50257 else 'demo'}",
        f"task.block_size={block}",
    ]  # fmt: skip


def arguments(description: str, extra=None, timing: bool = False) -> argparse.Namespace:
    """Parse the common flags; ``timing`` benchmarks on CPU also switch malloc to keep freed memory (see
    :mod:`fabric_tram.engine.cpu_memory`: they compare the work of the rules, not the kernel's page faults)
    unless ``--system-malloc``; ``args.allocator`` says which was used."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", default="small", choices=sorted(SIZES), help="model and batch size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (the median is reported)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    if timing:
        parser.add_argument(
            "--system-malloc",
            action="store_true",
            help="on CPU, keep glibc's default of returning large freed blocks to the system",
        )
    if extra:
        extra(parser)
    args = parser.parse_args()
    args.allocator = "cuda caching" if args.device.startswith("cuda") else "system"
    if timing and not args.device.startswith("cuda") and not args.system_malloc and keep_freed_cpu_memory():
        args.allocator = "glibc, freed memory kept (no mmap, no trim)"
    return args


def make_model(size: str, device: str, seed: int = 0) -> GPT2:
    n_layer, n_head, n_embd, vocab, block, _ = SIZES[size]
    torch.manual_seed(seed)
    config = GPT2Config(
        preset="tiny", n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=block, vocab_size=vocab, dropout=0.1
    )
    return GPT2(config).to(device)


def engine_optimizer(params, kind=torch.optim.Adam, **settings) -> torch.optim.Optimizer:
    """A torch optimizer in the implementation the engine builds (fused kernels where torch has them:
    optim/base.py), so that a benchmark's loop times the engine's base step, not torch's per-tensor CPU default."""
    params = list(params)
    return kind(params, **settings, **implementation(params))


def make_batch(size: str, device: str, seed: int = 0, rows: int | None = None) -> dict:
    _, _, _, vocab, block, batch = SIZES[size]
    batch = rows or batch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, block + 1), generator=g)
    return {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device), "example_index": torch.arange(batch)}


def loss_fn(precision: str):
    def loss(model, batch, **forward_kwargs):
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(batch["input_ids"], **forward_kwargs)
        return cross_entropy_sum(logits.float(), batch["labels"])

    return loss


def pass_floors(size: str, device: str, loss, batch: dict) -> dict:
    """The passes a floor is made of, on a model of their own: one forward + backward, one no-grad forward."""
    probe = make_model(size, device)

    def forward_backward():
        loss(probe, batch).loss_sum.backward()
        probe.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward_only():
        loss(probe, batch)

    return {"fwd+bwd": forward_backward, "no-grad fwd": forward_only}


def divergence_kinds(rule, forward: float, no_grad: float) -> dict[tuple[str, str], float]:
    """A rule's divergences per step as {(divergence, branches with a gradient): count}: TRAM's d without a
    gradient on each target forward; a regulariser's term with its gradient through the current branch once per
    gradient pass, or through both (r3f's noised and clean forwards, one pass with two graphs)."""
    if rule.meter is None:
        return {}
    if rule.divergence_gradients == 0:
        return {(rule.meter.name, "none"): no_grad}
    branches = "both" if rule.graphs_per_pass == 2 else "current"
    return {(rule.meter.name, branches): forward / rule.graphs_per_pass}


def divergence_work(kinds_by_rule: dict[str, dict], size: str, device: str, loss, batch: dict) -> dict:
    """A candidate per divergence kind any rule of ``kinds_by_rule`` (``divergence_kinds`` of each) computes: its
    value and, through the branches named, its gradient at the size's output (log-probabilities of two forwards,
    as the loss hands them over): compute the pass floor does not count, priced so that what a step adds beyond
    its passes and its divergences is the engine's own."""
    from fabric_tram.optim.divergences import divergence_sum

    probe = make_model(size, device)
    with torch.no_grad():
        target = loss(probe, batch)
        probe.eval()  # without dropout: a current output near, not equal to, the target's
        current = loss(probe, batch)
    candidates = {}
    for name, branches in sorted({kind for kinds in kinds_by_rule.values() for kind in kinds}):

        def run(name=name, branches=branches):
            t = target.log_probs.detach().requires_grad_(branches == "both")
            c = current.log_probs.detach().requires_grad_(branches != "none")
            with torch.set_grad_enabled(branches != "none"):
                total, _ = divergence_sum(name, t, c, current.mask, normalized=(True, True))
            if branches != "none":
                torch.autograd.grad(total, [c, t] if branches == "both" else [c])

        candidates[divergence_label((name, branches))] = run
    return candidates


def divergence_label(kind: tuple[str, str]) -> str:
    name, branches = kind
    return f"{name} ({'no gradient' if branches == 'none' else 'gradient: ' + branches})"


def divergence_seconds(kinds: dict[tuple[str, str], float], seconds: dict[str, float]) -> float:
    """Seconds a step spends in its divergences: each kind's count (``divergence_kinds``) at its measured time
    (``seconds``, by ``divergence_label``)."""
    return sum(count * seconds[divergence_label(kind)] for kind, count in kinds.items())


def operators_per_call(fn) -> tuple[int, int]:
    """(operators, of which metadata) that one call of ``fn`` dispatches to ATen, backward included: host work
    counted without a clock, so a change that adds some shows on any machine, noise-free. Metadata operators
    (views, ``detach``) launch no GPU kernel but cost host time all the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"all": 0, "metadata": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["all"] += 1
            counts["metadata"] += func.overloadpacket.__name__ in METADATA_OPERATORS
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counts["all"], counts["metadata"]


METADATA_OPERATORS = frozenset(
    {"view", "_unsafe_view", "t", "transpose", "detach", "alias", "expand", "split", "slice", "select", "unsqueeze",
     "squeeze", "as_strided", "permute", "unbind", "split_with_sizes", "_reshape_alias", "lift_fresh"}
)  # fmt: skip


def pass_floor(forward: int, nograd: float, t_fb: float, t_f: float) -> float:
    """A step's floor in units of one forward + backward: ``forward`` gradient passes at ``t_fb`` seconds each and
    ``nograd`` no-grad forwards at ``t_f`` (fractional when a rule runs one every N steps)."""
    return (forward * t_fb + nograd * t_f) / t_fb


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleave(candidates: dict, device: str, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each candidate, measured A B C A B C ... so that machine drift cancels."""
    times = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            t = timed(fn, device)
            if round_ >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_json(out: str, name: str, payload: dict) -> Path:
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
