"""``task.cross_entropy=chunked``: the cross-entropy without a float32 log-softmax the size of the logits equals the
plain one (value and gradient, float64), and every rule trains the same with it, the divergences then reading the
logits instead of the loss's log-probabilities."""

import pytest
import torch
from conftest import EXACT_ABS, assert_histories_match, max_param_diff, small_config, trajectory

from fabric_tram.config import ConfigError
from fabric_tram.engine.trainer import train
from fabric_tram.loss import IGNORE_INDEX, chunked_cross_entropy_sum, cross_entropy_sum


def logits_and_labels(dtype=torch.float64, vocab=11):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, vocab, generator=generator, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, (3, 7), generator=generator)
    # padding at the start, inside and at the end of sequences, so that chunks hold both kinds, and a valid last
    # position (a shorter last chunk with a target in it)
    labels[0, :3] = IGNORE_INDEX
    labels[2, 4:6] = IGNORE_INDEX
    labels[1, 6] = IGNORE_INDEX
    labels[1, 2] = vocab - 1  # the last class, where an off-by-one in the gather would show
    return logits, labels


@pytest.mark.parametrize("chunk", [1, 5, 21, 1000])  # one row, chunks across sequences (21 rows = 4 x 5 + 1), all
def test_chunked_cross_entropy_equals_the_plain_one_in_float64(chunk):
    logits, labels = logits_and_labels()
    results = {}
    for name, loss in (("plain", cross_entropy_sum), ("chunked", chunked_cross_entropy_sum)):
        x = logits.clone().requires_grad_()
        out = loss(x, labels) if name == "plain" else loss(x, labels, chunk_size=chunk)
        (grad,) = torch.autograd.grad(1.7 * out.loss_sum, x)  # an upstream gradient other than 1
        results[name] = (out, grad)
    (plain, plain_grad), (chunked, chunked_grad) = results["plain"], results["chunked"]
    assert chunked.loss_sum.dtype == torch.float64
    assert chunked.loss_sum.item() == pytest.approx(plain.loss_sum.item(), rel=1e-14)
    assert int(chunked.count) == int(plain.count) == 15
    torch.testing.assert_close(chunked.mask, plain.mask)
    assert chunked_grad.dtype == torch.float64
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=1e-14, atol=1e-15)
    assert chunked_grad[labels == IGNORE_INDEX].abs().max() == 0  # padding has no gradient
    # what the divergences read: the logits (no log-probabilities handed over)
    assert chunked.log_probs is None and chunked.divergence_input()[1] is False
    hand = torch.logsumexp(logits, -1) - logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    assert chunked.loss_sum.item() == pytest.approx(hand[labels != IGNORE_INDEX].sum().item(), rel=1e-14)


def test_chunked_cross_entropy_of_bf16_logits_gives_a_bf16_gradient_close_to_the_plain_one():
    logits, labels = logits_and_labels(torch.bfloat16, vocab=300)
    grads, values = [], []
    for loss in (cross_entropy_sum, chunked_cross_entropy_sum):
        x = logits.clone().requires_grad_()
        out = loss(x, labels)
        out.loss_sum.backward()
        grads.append(x.grad)
        values.append(out.loss_sum)
    assert values[1].dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    assert values[1].item() == pytest.approx(values[0].item(), rel=1e-6)
    torch.testing.assert_close(grads[1].float(), grads[0].float(), rtol=0, atol=2e-3)  # bf16 rounding of both


@pytest.mark.parametrize("rule", ["tram-prev", "asam+trpo", "r3f"])  # d, a regulariser, two graphs
def test_every_rule_trains_the_same_with_the_chunked_cross_entropy(corpus, tmp_path, rule):
    """float64, three steps with accumulation over two micro-batches: the loss, d and the regulariser (the
    divergences reading the logits, not the loss's log-probabilities) and the weights as with the plain loss."""
    runs = {}
    for name in ("plain", "chunked"):
        config = small_config(corpus, tmp_path / name, rule, micro=4, accumulate=2,
                              extra=[f"task.cross_entropy={name}"])  # fmt: skip
        runs[name] = train(config)
    keys = ("loss", "d", "regulariser", "Tg_norm", "e_norm")
    assert_histories_match(runs["plain"].history, runs["chunked"].history, keys, label=rule)
    assert max_param_diff(trajectory(runs["plain"])["params"], trajectory(runs["chunked"])["params"]) < EXACT_ABS
    assert trajectory(runs["plain"])["params"] != {}


def test_the_language_modelling_task_uses_the_cross_entropy_its_config_names(corpus, tmp_path):
    """The equivalence above would hold trivially if the setting were ignored: the task's loss hands the
    divergences its log-probabilities with plain and none (they read the logits) with chunked."""
    from fabric_tram.engine.setup import build_task
    from fabric_tram.models.gpt2 import GPT2, GPT2Config

    model = GPT2(GPT2Config(preset="tiny", n_layer=1, n_head=2, n_embd=16, n_positions=8, vocab_size=50257))
    batch = {"input_ids": torch.randint(0, 50257, (2, 8)), "labels": torch.randint(0, 50257, (2, 8))}
    for name in ("plain", "chunked"):
        task = build_task(small_config(corpus, tmp_path / name, "adam", extra=[f"task.cross_entropy={name}"]))
        out = task.loss(model, batch)
        assert (out.log_probs is None) == (name == "chunked"), name
        assert out.loss_sum.item() == pytest.approx(
            cross_entropy_sum(model(batch["input_ids"]), batch["labels"]).loss_sum.item(), rel=1e-5
        )


def test_an_unknown_cross_entropy_is_refused_with_the_choices(corpus, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="task.cross_entropy must be one of plain, chunked"):
        small_config(corpus, tmp_path, "adam", extra=["task.cross_entropy=fused"])
