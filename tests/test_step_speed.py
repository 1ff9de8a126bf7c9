"""What makes the step fast on a GPU, shown on the CPU: no host synchronisation but the skip decisions, and no
kernel launched per parameter tensor outside the model's passes."""

import collections
import inspect
from pathlib import Path

import pytest
import torch

from fabric_tram.bench.step_cost import RULES as STEP_COST_RULES
from fabric_tram.loss import cross_entropy_sum
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.optim.step import StepContext
from fabric_tram.optim.update_rule import rule_class

RULES = ["adam", *STEP_COST_RULES]
# sharpness-aware rules run two gradient passes (ascent and descent); r3f's one pass runs two graphs
TWO_PASS = {n for n in STEP_COST_RULES if rule_class(n).passes.forward // rule_class(n).graphs_per_pass == 2}
PACKAGE = str(Path(__import__("fabric_tram").__file__).parent)
TRANSFERS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy", "__format__")


def host_transfers(fn) -> collections.Counter:
    """Count the tensor-to-host conversions made by fabric_tram's own code while ``fn`` runs (torch's internal
    ones, e.g. an optimizer reading its CPU step counter, are not ours and are left out)."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in TRANSFERS}

    def counted(name, original):
        def method(self, *args, **kwargs):
            caller = inspect.stack(0)[1].filename
            if caller.startswith(PACKAGE):
                counts[f"{Path(caller).name}:{inspect.stack(0)[1].lineno}"] += 1
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts


class Tiny(torch.nn.Module):
    """A small LM with ``n`` blocks of parameter tensors: the parameter count is the experiment's variable."""

    def __init__(self, n: int = 2, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(n))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids, input_noise=None):
        x = self.embed(ids)
        if input_noise is not None:
            x = input_noise(x)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def loop(rule: str, n: int = 2):
    torch.manual_seed(0)
    model = Tiny(n)
    loss = lambda m, b, **kw: cross_entropy_sum(m(b["x"], **kw), b["y"])  # noqa: E731
    return UpdateRuleLoop(rule, model, torch.optim.Adam(model.parameters(), lr=1e-3), loss, grad_clip=1.0)


def batches(k: int):
    ids = torch.randint(0, 11, (4 * k, 7), generator=torch.Generator().manual_seed(1))
    micro = [{"x": ids[i::k, :-1], "y": ids[i::k, 1:], "example_index": torch.arange(i, 4 * k, k)} for i in range(k)]
    return micro, float(sum(b["y"].numel() for b in micro))


def one_step(rule_loop, k: int):
    """The rule's step alone (what the engine runs), without the API's final conversion of the values."""
    micro, n = batches(k)
    rule_loop.step_count += 1
    ctx = StepContext(fabric=rule_loop.fabric, model=rule_loop.model, optimizer=rule_loop.optimizer,
                      loss_fn=rule_loop.loss_fn, micro_batches=micro, step=rule_loop.step_count,
                      n_global=torch.tensor(n, dtype=torch.float64), n_local=torch.tensor(n, dtype=torch.float64),
                      grad_clip=1.0)  # fmt: skip
    return rule_loop.rule.step(ctx)


@pytest.mark.parametrize("rule", sorted(TWO_PASS))
def test_the_ascent_gradients_are_freed_before_the_descent_pass_makes_its_own(rule):
    """e is formed in the ascent gradients' memory; once θ + e is set, nothing may keep that memory through the
    descent pass, which allocates gradients of its own (else a step holds two gradient-sized buffers: on GPT2-XL
    on one GPU, 5.8 GiB the estimate does not count). Checked by weak references to the storage of the ascent
    pass's gradients (any alias keeps a storage alive), read when the descent pass's forward starts."""
    from torch.multiprocessing.reductions import StorageWeakRef

    torch.manual_seed(0)
    model = Tiny(2)
    backwards, seen = [], []  # weak references to each backward's gradients; at each forward, which are alive

    def loss(m, b, **kw):
        seen.append([[not ref.expired() for ref in refs] for refs in backwards])
        return cross_entropy_sum(m(b["x"], **kw), b["y"])

    def record(param):
        if not backwards or len(backwards[-1]) == len(list(model.parameters())):
            backwards.append([])
        backwards[-1].append(StorageWeakRef(param.grad.untyped_storage()))

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(record)
    rule_loop = UpdateRuleLoop(rule, model, torch.optim.Adam(model.parameters(), lr=1e-3), loss)
    micro, n = batches(1)
    rule_loop.step(None, micro_batches=micro, n_targets=n)
    descent = next(alive for alive in seen if alive)  # the first forward after a backward: the descent pass's
    assert len(backwards) == 2 and descent == [[False] * len(backwards[0])], descent


@pytest.mark.parametrize("rule", ["sam", "asam", "tram-prev"])
def test_along_the_momentum_the_copies_e_is_formed_in_are_freed_before_the_pass(rule, monkeypatch):
    """ascent_direction=momentum forms e in float32 copies of the base optimizer's first moment; they are dropped
    once θ + e is set, before the step's one pass allocates its gradients (weak references to their storage,
    read when the pass's forward starts, on step 2: step 1 has no moment yet)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    import fabric_tram.optim.update_rule as update_rule

    copies, seen = [], []
    original = update_rule.direction_groups

    def recording(params, vectors):
        parts = original(params, vectors)
        copies.extend(StorageWeakRef(x.untyped_storage()) for _, group, _ in parts for x in group)
        return parts

    monkeypatch.setattr(update_rule, "direction_groups", recording)
    torch.manual_seed(0)
    model = Tiny(2)

    def loss(m, b, **kw):
        seen.append([not ref.expired() for ref in copies])
        return cross_entropy_sum(m(b["x"], **kw), b["y"])

    hyper = (
        {"ascent_direction": "momentum", "radius_scale": 1.0}
        if rule == "tram-prev"
        else {"ascent_direction": "momentum"}
    )
    rule_loop = UpdateRuleLoop(rule, model, torch.optim.Adam(model.parameters(), lr=1e-3), loss, **hyper)
    micro, n = batches(1)
    for _ in range(2):
        rule_loop.step(None, micro_batches=micro, n_targets=n)
    assert copies and seen[-1] == [False] * len(copies), seen[-1]


@pytest.mark.parametrize("rule", RULES)
def test_a_step_waits_on_the_device_only_for_its_skip_decisions(rule):
    """One transfer to decide whether to skip before the base step, one more after a sharpness-aware ascent;
    none per micro-batch, per pass, per parameter or per logged value (those come later, all at once)."""
    expected = 2 if rule in TWO_PASS else 1
    for k in (1, 4):
        rule_loop = loop(rule)
        one_step(rule_loop, k)  # the first step (state set up) is not special either, but warm up anyway
        counts = host_transfers(lambda rl=rule_loop, kk=k: one_step(rl, kk))
        assert sum(counts.values()) == expected, (rule, k, dict(counts))


# view and metadata operations launch no kernel on a GPU; everything else counted below would launch one (or one
# multi-tensor kernel per dtype and device)
METADATA = {"aten::detach", "aten::alias", "aten::view", "aten::reshape", "aten::promote_types", "aten::to",
            "aten::lift_fresh", "aten::select", "aten::slice", "aten::unsqueeze", "aten::expand", "aten::item",
            "aten::_local_scalar_dense"}  # fmt: skip


def dispatched_ops(fn) -> collections.Counter:
    """The operations ``fn`` dispatches from Python (top-level, kernel-launching ones) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    return collections.Counter(e.name for e in events if e.name not in METADATA)


def host_operators(fn) -> collections.Counter:
    """Every top-level operator ``fn`` dispatches, metadata ones (``detach``, views) included: each costs host
    time (the dispatcher and the Python around it) whether or not a GPU kernel follows."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def with_grads(n: int) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def per_parameter_work():
    """Every piece of a step that touches all parameters, outside the model's passes."""
    from fabric_tram.distributed import global_norm
    from fabric_tram.optim.geometry import (
        ASAMGeometry,
        FisherGeometry,
        SAMGeometry,
        climb,
        scale_gradients,
        scale_parts,
    )
    from fabric_tram.optim.momentum import direction_groups
    from fabric_tram.optim.weights import (
        exchange,
        locals_of,
        restore_weights,
        store_weights,
        update_ema,
        weights_swapped_in,
    )

    def norm_and_climb(geometry_of):
        def run(params, buffers):
            geometry = geometry_of(len(params))
            parts, norm = scale_gradients(geometry, params)
            climb(geometry, parts, params, 0.1 / norm)

        return run

    def clip(params, buffers):
        ctx = StepContext(
            fabric=None, model=None, optimizer=None, loss_fn=None, micro_batches=[], step=1, grad_clip=0.5
        )
        ctx.__dict__["grads"] = lambda: [p.grad for p in params]  # the context's gradients: these parameters'
        ctx.clip_gradients()

    def swapped_in_and_out(params, buffers):
        with weights_swapped_in(params, buffers):
            pass

    def along_momentum(params, buffers):  # the buffers stand for the optimizer's first moments
        parts, norm = scale_parts(SAMGeometry(), direction_groups(params, buffers), params)
        climb(SAMGeometry(), parts, params, -0.1 / norm)

    return {
        "sam": norm_and_climb(lambda n: SAMGeometry()),
        "asam": norm_and_climb(lambda n: ASAMGeometry(0.0, [True] * n)),
        "asam_like_original": norm_and_climb(lambda n: ASAMGeometry(0.01, [i % 2 == 0 for i in range(n)])),
        "fisher": norm_and_climb(lambda n: FisherGeometry(0.1)),
        "store and restore": lambda params, buffers: (store_weights(buffers, params), restore_weights(params, buffers)),
        "swap": lambda params, buffers: exchange(locals_of(params), buffers),
        "swapped in and out": swapped_in_and_out,
        "momentum direction": along_momentum,
        "ema": lambda params, buffers: update_ema(buffers, params, 0.9),
        "gradient norm": lambda params, buffers: global_norm([p.grad for p in params]),
        "clipping": clip,
    }


@pytest.mark.parametrize("piece", sorted(per_parameter_work()))
def test_per_parameter_work_launches_as_many_kernels_for_10_or_100_tensors(piece):
    """Multi-tensor operations: a model with ten times more parameter tensors costs no more launches (a Python
    loop over parameters, as every public SAM implementation has, would launch ten times more)."""
    from fabric_tram.optim.weights import clone_weights

    fn = per_parameter_work()[piece]
    (few, few_buffers), (many, many_buffers) = ((p, clone_weights(p)) for p in (with_grads(10), with_grads(100)))
    fn(few, few_buffers)  # warm-up (first-call setup)
    assert dispatched_ops(lambda: fn(few, few_buffers)) == dispatched_ops(lambda: fn(many, many_buffers))


@pytest.mark.parametrize("piece", sorted(per_parameter_work()))
def test_per_parameter_work_runs_as_many_host_operators_for_10_or_100_tensors(piece):
    """Not a launch either: a ``detach()`` per tensor (each walk of the parameters to reach their tensors made
    one, five to seven walks a two-pass step: about 1,000 operators of host time a step on GPT-2's 148 tensors)
    is host time that grows with the model's tensor count. The parameters are written under no_grad instead."""
    from fabric_tram.optim.weights import clone_weights

    fn = per_parameter_work()[piece]
    (few, few_buffers), (many, many_buffers) = ((p, clone_weights(p)) for p in (with_grads(10), with_grads(100)))
    fn(few, few_buffers)  # warm-up (first-call setup)
    assert host_operators(lambda: fn(few, few_buffers)) == host_operators(lambda: fn(many, many_buffers))


SHARDED_STEP = """
import socket, sys, torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import _api
from fabric_tram.bench.common import loss_fn, make_batch
from fabric_tram.models.gpt2 import GPT2, GPT2Config
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.registry import load_builtins
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
load_builtins()
calls = [0]
apply = _api._ToTorchTensor.apply
def counted(*args, **kwargs):  # DTensor.to_local() with grad enabled: an autograd function per tensor
    calls[0] += 1
    return apply(*args, **kwargs)
_api._ToTorchTensor.apply = counted
for spec in sys.argv[1].split(","):
    name, *setting = spec.split(":")
    torch.manual_seed(0)
    model = GPT2(GPT2Config(preset="tiny", n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=512))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    hyper = dict(item.split("=") for item in setting)
    loop = UpdateRuleLoop(name, model, torch.optim.Adam(model.parameters(), lr=1e-4), loss_fn("32-true"),
                          grad_clip=1.0, **hyper)
    batch = make_batch("tiny", "cpu")
    batch = {k: v % 512 if k != "example_index" else v for k, v in batch.items()}
    loop.step(batch)
    calls[0] = 0
    loop.step(batch)  # the second: the momentum direction has a moment to move along
    print(spec, calls[0])
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_a_sharded_step_reaches_its_shards_without_an_autograd_function_per_tensor():
    """Under FSDP2 every parameter and gradient is a DTensor; its ``to_local()`` with grad enabled runs an
    autograd function (measured on a CPU: 0.95 ms a walk of GPT-2's 148 tensors, 0.18 ms under no_grad). Every
    walk of a step (the norm, clipping, the restore point, a target's swap, the ascent) runs under no_grad: none
    is left, for any rule (before: two walks a step, 56 calls on this model's 28 tensors)."""
    import subprocess
    import sys

    rules = ["adam", "sam", "asam", "tram-prev", "trpo", "mesa", "asam+trpo", "asam:ascent_direction=momentum"]
    out = subprocess.run([sys.executable, "-c", SHARDED_STEP, ",".join(rules)], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    counts = dict(line.rsplit(" ", 1) for line in out.stdout.strip().splitlines())
    assert counts == dict.fromkeys(rules, "0"), counts


def test_a_target_under_mixed_precision_holds_its_logits_in_the_compute_dtype_only(corpus, tmp_path, monkeypatch):
    """The target forward's float32 logits and log-probabilities (2 × B·T·V·4 bytes) are not kept until the
    divergence: only the logits, cast back to bf16 (losslessly: autocast computed them in bf16). d is unchanged."""
    from conftest import small_config

    from fabric_tram.engine import trainer
    from fabric_tram.optim import targets

    held = []
    real_output = targets.WeightTarget.output
    monkeypatch.setattr(
        targets.WeightTarget, "output", lambda self, ctx, batch: held.append(real_output(self, ctx, batch)) or held[-1]
    )
    config = small_config(corpus, tmp_path / "bf16", "tram-prev", steps=2, precision="bf16-mixed")
    run = trainer.train(config)
    assert held and all(o.log_probs is None and o.logits.dtype == torch.bfloat16 for o in held)
    monkeypatch.setattr(trainer, "MIXED_PRECISION_DTYPES", {})  # keep float32 log-probabilities instead
    reference = trainer.train(small_config(corpus, tmp_path / "f32", "tram-prev", steps=2, precision="bf16-mixed"))
    assert [s["d"] for s in run.history] == [s["d"] for s in reference.history] and run.history[1]["d"] > 0


@pytest.mark.parametrize(
    "name,precision,expected",
    [
        ("NVIDIA H200", "bf16-mixed", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "16-mixed", 989.4e12),
        ("NVIDIA H100 PCIe", "bf16-true", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),
        ("NVIDIA A100 80GB PCIe", "64-true", 19.5e12),
        ("NVIDIA GeForce RTX 4090", "bf16-mixed", None),
    ],
)
def test_mfu_divides_by_our_table_of_dense_peaks(name, precision, expected):
    from fabric_tram.engine.monitor import peak_flops

    assert peak_flops(name, precision) == expected


def test_mfu_with_a_given_peak_and_fsdp_on_one_process_runs_unsharded(corpus, tmp_path):
    """trainer.peak_flops sets MFU's denominator anywhere (here on a CPU); fsdp on one process shards nothing
    (no DTensor, no FSDP hooks: the same step as strategy auto), and checkpoints and resume work as usual."""
    from conftest import max_param_diff, small_config, trajectory

    from fabric_tram.engine.trainer import train

    extra = ["trainer.peak_flops=1e12", "trainer.save_every=1"]
    run = train(small_config(corpus, tmp_path / "fsdp", "adam", steps=2, strategy="fsdp", extra=extra))
    assert all(0 < s["mfu"] == pytest.approx(s["flops_per_s"] / 1e12) for s in run.history)
    assert not any(type(p).__name__ == "DTensor" for p in run.model.parameters())
    auto = train(small_config(corpus, tmp_path / "auto", "adam", steps=2, extra=extra))
    assert max_param_diff(trajectory(run)["params"], trajectory(auto)["params"]) == 0.0
    resumed = train(small_config(corpus, tmp_path / "fsdp", "adam", steps=3, strategy="fsdp",
                                 extra=extra + ["trainer.resume=auto"]))  # fmt: skip
    assert resumed.start_step == 2
