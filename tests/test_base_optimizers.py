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
