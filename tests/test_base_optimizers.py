"""The base optimizers are what their names say (optim/base.py): each entry's step equals the torch optimizer it
names with the same settings, and AdamW's decay is decoupled (differs from Adam's L2 on the same settings)."""

import pytest
import torch

from fabric_tram.config import load_config
from fabric_tram.optim.update_rule import build_base_optimizer


def stepped(make_optimizer, steps=3) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    optimizer = make_optimizer([w])
    for s in range(steps):
        optimizer.zero_grad()
        ((w - s) ** 2).sum().backward()
        optimizer.step()
    return w.detach()


@pytest.mark.parametrize(
    "name,settings,reference",
    [
        ("adam", ["optimizer.weight_decay=0.1"], lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99),
                                                                              weight_decay=0.1)),
        ("adamw", ["optimizer.weight_decay=0.1"], lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.99),
                                                                                weight_decay=0.1)),
        ("sgd", ["optimizer.weight_decay=0.1", "optimizer.momentum=0.9", "optimizer.nesterov=true"],
         lambda p: torch.optim.SGD(p, lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True)),
    ],
)  # fmt: skip
def test_each_base_optimizer_steps_as_the_torch_optimizer_it_names(name, settings, reference):
    section = load_config(None, ["model.name=gpt2", "task.name=lm", f"optimizer.name={name}", "optimizer.lr=0.01",
                                 *settings]).optimizer  # fmt: skip
    ours = stepped(lambda p: build_base_optimizer(section, p))
    assert torch.equal(ours, stepped(reference))


def test_adamw_decay_is_decoupled_not_adams_l2():
    adam = stepped(lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1))
    section = load_config(None, ["model.name=gpt2", "task.name=lm", "optimizer.name=adamw", "optimizer.lr=0.01",
                                 "optimizer.weight_decay=0.1"]).optimizer  # fmt: skip
    assert (stepped(lambda p: build_base_optimizer(section, p)) - adam).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_base_optimizers_take_torchs_fused_kernels_on_a_cpu_and_stay_its_default_elsewhere(name):
    """Fused on a CPU as on a GPU (one kernel for all parameters: 4-7x faster than torch's per-tensor CPU default,
    docs/benchmarks.md); their steps differ from the per-tensor ones by rounding only."""
    setting = "optimizer.momentum=0.9" if name == "sgd" else "optimizer.weight_decay=0.1"
    section = load_config(None, ["model.name=gpt2", "task.name=lm", f"optimizer.name={name}", "optimizer.lr=0.01",
                                 setting]).optimizer  # fmt: skip
    w = torch.nn.Parameter(torch.ones(3))
    assert build_base_optimizer(section, [w]).defaults["fused"] is True
    on_meta = torch.nn.Parameter(torch.ones(3, device="meta"))  # the estimator's models: no kernels at all
    assert not build_base_optimizer(section, [on_meta]).defaults.get("fused")
    torch.manual_seed(0)
    start = torch.randn(4, 7, dtype=torch.float64)
    walked = []
    for fused in (True, False):
        w = torch.nn.Parameter(start.clone())
        kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
        optimizer = kind([w], lr=0.01, **({"momentum": 0.9} if name == "sgd" else {}), fused=fused)
        for s in range(20):
            optimizer.zero_grad()
            ((w - s) ** 2 * torch.arange(7.0)).sum().backward()
            optimizer.step()
        walked.append(w.detach())
    assert (walked[0] - walked[1]).abs().max() < 1e-13


def test_a_loaded_state_keeps_this_runs_kernels_not_the_saving_runs():
    """A checkpoint carries its run's kernel choice in each param group; resumed where that kernel does not exist
    (one CPU process's fused SGD, resumed by FSDP2 processes: no DTensor rule for it) it must not come back."""
    from fabric_tram.engine.checkpoint_parts import optimizer_part

    model = torch.nn.Linear(3, 2, dtype=torch.float64)
    saving = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    saving.step()
    state = optimizer_part(model, saving).state_dict()
    resuming = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)  # what FSDP2 builds
    optimizer_part(model, resuming).load_state_dict(state)
    assert resuming.param_groups[0]["fused"] is None and resuming.param_groups[0]["foreach"] is False
    buffer = resuming.state[model.weight]["momentum_buffer"]  # and the state itself is the saved one
    assert torch.equal(buffer, saving.state[model.weight]["momentum_buffer"])


SHARDED_BASE_STEP = """
import socket, torch
from torch.distributed.fsdp import fully_shard
from fabric_tram.config import load_config
from fabric_tram.optim.update_rule import build_base_optimizer
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
for name in ("sgd", "adam", "adamw"):
    model = torch.nn.Linear(4, 3)
    fully_shard(model)
    section = load_config(None, ["model.name=gpt2", "task.name=lm", f"optimizer.name={name}", "optimizer.momentum=0.9"
                                 if name == "sgd" else "optimizer.lr=0.01"]).optimizer
    optimizer = build_base_optimizer(section, model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()  # torch has no DTensor rule for fused SGD: this step would raise
    print(name, bool(optimizer.defaults.get("fused")))
"""


def test_on_fsdp2s_sharded_parameters_sgd_steps_unfused_and_adam_fused():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SHARDED_BASE_STEP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["sgd", "False", "adam", "True", "adamw", "True"]
