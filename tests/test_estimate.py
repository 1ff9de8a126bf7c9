"""fabric-tram estimate: its parameter-and-state part equals the bytes actually allocated for a small model."""

import pytest
import torch
from click.testing import CliRunner
from conftest import small_config

from fabric_tram.cli import main
from fabric_tram.config import load_config
from fabric_tram.engine.estimate import estimate
from fabric_tram.engine.trainer import train


def tensor_bytes(tensors) -> int:
    return sum(
        t.numel() * t.element_size() for t in tensors if t is not None and t.numel() > 1
    )  # scalars (Adam's step) aside


@pytest.mark.parametrize("rule", ["adam", "sgd", "tram-init", "mesa", "asam+trpo"])
def test_parameter_and_state_bytes_match_allocated_tensors(corpus, tmp_path, rule):
    extra = (
        ["optimizer.base=adam"]
        if rule not in ("adam", "sgd")
        else (["optimizer.momentum=0.9"] if rule == "sgd" else [])
    )
    config = small_config(corpus, tmp_path / rule, rule, steps=1, extra=extra)
    run = train(config)
    params = [p for p in run.model.parameters()]
    for p in params:  # the gradients a step holds
        p.grad = torch.zeros_like(p)
    optimizer_state = [
        t for state in run.optimizer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    ]
    # every per-parameter buffer (TRAM's radius state is calibration_steps + 2 scalars, not per parameter)
    rule_state = [t for buffers in run.rule.state_dict().values() if isinstance(buffers, list) for t in buffers]
    backup = getattr(run.rule, "backup", None)
    if backup is not None and all(backup is not v for v in run.rule.state_dict().values()):
        rule_state += backup  # the restore point is held between steps even when it is not saved
    e = estimate(config, devices=1)["bytes"]
    assert e["parameters"] == tensor_bytes(params)
    assert e["gradients"] == tensor_bytes(p.grad for p in params)
    assert e["optimizer_state"] == tensor_bytes(optimizer_state)
    assert e["update_rule_buffers"] == tensor_bytes(rule_state)


def test_estimate_command_for_the_gpt2xl_recipe():
    result = CliRunner().invoke(
        main, ["estimate", "recipes/gpt2xl_s2orc.py", "--devices", "4", "optimizer.name=tram-prev"]
    )
    assert result.exit_code == 0, result.output
    assert "1,557.6M parameters" in result.output and "4 device(s)" in result.output
    assert "2 fwd + 1 no-grad fwd + 2 bwd" in result.output
    one = estimate(load_config("recipes/gpt2xl_s2orc.py"), devices=1)
    four = estimate(load_config("recipes/gpt2xl_s2orc.py"), devices=4)
    assert four["bytes"]["parameters"] == pytest.approx(one["bytes"]["parameters"] / 4)  # fsdp shards the state


def test_activation_terms_follow_the_graphs_and_output_sized_tensors_of_each_rule():
    """adam: one graph with its float32 logits and log-probabilities; trpo adds the target's log-probabilities
    and the divergence's gradient; r3f holds two graphs and a divergence gradient for each."""
    acts = {
        rule: estimate(load_config("recipes/gpt2_s2orc.py", [f"optimizer.name={rule}"]), devices=1)["bytes"][
            "activations"
        ]
        for rule in ("adam", "trpo", "r3f", "sam", "tram-prev")
    }
    config = load_config("recipes/gpt2_s2orc.py")
    output = config.trainer.micro_batch_size * config.task.block_size * 50257 * 4  # one float32 (B, T, V) tensor
    assert acts["trpo"] - acts["adam"] == 2 * output
    assert acts["r3f"] - 2 * acts["adam"] == 2 * output
    assert acts["sam"] == acts["adam"] and acts["tram-prev"] - acts["adam"] == output


@pytest.mark.parametrize(("precision", "logit_bytes"), [("bf16-mixed", 2), ("32-true", 4)])
def test_the_chunked_cross_entropy_is_counted_at_its_logits_alone(precision, logit_bytes):
    """Per graph, the plain cross-entropy keeps float32 logits and log-probabilities (8 bytes an output), the chunked
    one the logits in the model's dtype: r3f's two graphs save twice the difference; nothing else changes."""
    config = load_config("recipes/gpt2_s2orc.py")
    outputs = config.trainer.micro_batch_size * config.task.block_size * 50257
    for rule, graphs in (("adam", 1), ("tram-prev", 1), ("r3f", 2)):
        e = {ce: estimate(load_config("recipes/gpt2_s2orc.py", [f"optimizer.name={rule}", f"task.cross_entropy={ce}",
                                                                f"trainer.precision={precision}"]), devices=1)
             for ce in ("plain", "chunked")}  # fmt: skip
        plain, chunked = e["plain"]["bytes"], e["chunked"]["bytes"]
        assert plain["activations"] - chunked["activations"] == graphs * (8 - logit_bytes) * outputs, rule
        assert {k: v for k, v in plain.items() if k != "activations"} == {
            k: v for k, v in chunked.items() if k != "activations"
        }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_what_each_cross_entropy_saves_for_its_backward_is_what_the_estimate_counts(dtype):
    """Measured: the tensors autograd saves between a loss's forward and its backward (saved_tensors_hooks), other
    than the logits the model hands over. The plain loss saves float32 log-probabilities, 4 bytes an output (with
    the float32 logits alive, the estimate's 8; bf16 logits make it 6, so 8 is a bound there); the chunked one
    nothing output-sized: what it keeps is the logits themselves, as the estimate counts."""
    from fabric_tram.loss import IGNORE_INDEX, chunked_cross_entropy_sum, cross_entropy_sum

    logits = torch.randn(4, 16, 1000, dtype=dtype).requires_grad_()
    labels = torch.randint(0, 1000, (4, 16))
    labels[0, :5] = IGNORE_INDEX
    rows, outputs = labels.numel(), logits.numel()
    for name, loss in (("plain", cross_entropy_sum), ("chunked", chunked_cross_entropy_sum)):
        saved = {}

        def pack(tensor, saved=saved):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = loss(logits, labels)
        extra = sum(n for ptr, n in saved.items() if ptr != logits.untyped_storage().data_ptr())
        small = rows * (8 + 8 + 1 + 4)  # labels, their in-range copy, the mask, one value a row
        if name == "plain":
            assert 4 * outputs <= extra <= 4 * outputs + small
        else:
            assert logits.untyped_storage().data_ptr() in saved and extra <= small
        out.loss_sum.backward()  # what was saved is what the backward needs: it runs


def test_an_amortised_radius_counts_a_fraction_of_the_target_forward():
    every = {
        n: estimate(
            load_config("recipes/gpt2_s2orc.py", ["optimizer.name=tram-prev", f"optimizer.radius_every={n}"]), 1
        )
        for n in (1, 4)
    }
    assert every[1]["passes"]["no_grad_forward"] == 1 and every[4]["passes"]["no_grad_forward"] == 0.25
    # FLOPs per step: (2 + 1/N) forwards + 2 backwards at twice a forward's cost
    assert every[4]["flops_per_step_per_device"] / every[1]["flops_per_step_per_device"] == pytest.approx(6.25 / 7)


def test_r3fs_backward_through_two_graphs_costs_two_backwards_in_flops():
    flops = {
        rule: estimate(load_config("recipes/gpt2_s2orc.py", [f"optimizer.name={rule}"]), 1)["flops_per_step_per_device"]
        for rule in ("adam", "r3f", "asam+r3f", "sam")
    }
    # a forward costs 1, a backward 2: adam 3, r3f 2 + 2·2 = 6, asam+r3f twice that, sam 6
    assert flops["r3f"] / flops["adam"] == pytest.approx(2.0) and flops["asam+r3f"] / flops["adam"] == pytest.approx(
        4.0
    )
    assert flops["r3f"] == pytest.approx(flops["sam"])
