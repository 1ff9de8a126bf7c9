"""Divergences against values computed independently (torch's kl_div, hand formulas), chunking and masking."""

import pytest
import torch
import torch.nn.functional as F

from fabric_tram.optim.divergences import divergence_sum


def test_kl_variants_match_torch_and_ignore_masked_positions():
    torch.manual_seed(0)
    target, current = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    lp, lq = target.log_softmax(-1)[mask], current.log_softmax(-1)[mask]
    forward = F.kl_div(lq, lp, log_target=True, reduction="sum")
    reverse = F.kl_div(lp, lq, log_target=True, reduction="sum")
    for name, expected in (
        ("kl", forward),
        ("kl-reverse", reverse),
        ("kl-sym", forward + reverse),
        ("l2", (lp.exp() - lq.exp()).norm(dim=-1).sum()),
    ):
        total, count = divergence_sum(name, target, current, mask, chunk_size=3)  # chunks cross rows
        assert int(count) == 7
        assert float(total) == pytest.approx(float(expected), rel=1e-5)


def test_gradient_with_respect_to_the_current_logits():
    target, current = torch.randn(4, 3), torch.randn(4, 3, requires_grad=True)  # targets come from no-grad forwards
    total, _ = divergence_sum("kl", target, current)
    total.backward()
    torch.testing.assert_close(current.grad, current.softmax(-1) - target.softmax(-1))  # d KL(p‖q)/d logits_q


def test_mmd_for_classification_and_a_clear_error_for_language_modelling():
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    total, count = divergence_sum("mmd", p, q)
    pp, qq = p.softmax(-1), q.softmax(-1)

    def k(a, b):
        return sum(
            1.0 / torch.sqrt(h * h + ((a[:, None] - b[None]) ** 2).sum(-1)) for h in (0.1, 0.2, 0.5, 1, 2, 5, 10)
        ).mean()

    assert int(count) == 2
    assert float(total) == pytest.approx(2 * float(k(pp, pp) + k(qq, qq) - 2 * k(pp, qq)), rel=1e-5)
    with pytest.raises(ValueError, match="classification .* only"):
        divergence_sum("mmd", torch.randn(2, 3, 5), torch.randn(2, 3, 5))


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "every-row"])
@pytest.mark.parametrize("normalized", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("name", ["kl", "kl-reverse", "kl-sym"])
def test_chunked_kl_gradients_match_autograd_in_both_branches(name, normalized, masked):
    """Inputs are logits, or log-probabilities computed upstream in the graph (as the loss hands them over): the
    gradients reaching the leaves must be those of plain autograd through the same log-softmaxes either way.
    Without a mask every row weighs 1 and the value is summed without per-row products: the same value."""
    torch.manual_seed(1)
    target = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    current = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3 if masked else torch.ones(3, 5, dtype=torch.bool)

    def ours(t, c):
        inputs = [x.log_softmax(-1) if n else x for x, n in zip((t, c), normalized, strict=True)]
        return divergence_sum(name, *inputs, mask if masked else None, chunk_size=4, normalized=normalized)

    total, count = ours(target, current)
    total.backward()
    # reference: plain autograd on the selected rows, written out independently
    t2, c2 = target.detach().clone().requires_grad_(True), current.detach().clone().requires_grad_(True)
    lp, lq = t2.log_softmax(-1)[mask], c2.log_softmax(-1)[mask]
    fwd, rev = (lp.exp() * (lp - lq)).sum(), (lq.exp() * (lq - lp)).sum()
    expected = {"kl": fwd, "kl-reverse": rev, "kl-sym": fwd + rev}[name]
    expected.backward()
    assert int(count) == int(mask.sum())
    torch.testing.assert_close(total, expected.detach())
    torch.testing.assert_close(target.grad, t2.grad)
    torch.testing.assert_close(current.grad, c2.grad)
    assert torch.autograd.gradcheck(
        lambda t, c: ours(t, c)[0], (t2.detach().requires_grad_(True), c2.detach().requires_grad_(True))
    )
    # a graph kept with retain_graph=True gives the same gradients again (an incoming gradient of 3, not 1)
    graph = ours(target, current)[0] * 3.0
    first = torch.autograd.grad(graph, (target, current), retain_graph=True)
    second = torch.autograd.grad(graph, (target, current))
    for a, b, expected_grad in zip(first, second, (t2.grad, c2.grad), strict=True):
        torch.testing.assert_close(a, 3.0 * expected_grad)
        torch.testing.assert_close(b, 3.0 * expected_grad)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "every-row"])
@pytest.mark.parametrize("branch", ["current", "target"])
@pytest.mark.parametrize("name", ["kl", "kl-reverse", "kl-sym"])
def test_chunked_kl_through_one_branch_matches_autograd(name, branch, masked):
    """The regularisers' shape: the target comes from a no-grad forward, so one branch alone needs a gradient
    (KL(p‖q) through the current one is where the value is read off the weighted gradient); value and gradient
    equal plain autograd's, in float64, with rows of unequal weight or none."""
    torch.manual_seed(4)
    logits = [torch.randn(3, 5, 13, dtype=torch.float64) for _ in range(2)]
    mask = torch.rand(3, 5) > 0.4 if masked else torch.ones(3, 5, dtype=torch.bool)
    leaf = logits[branch == "current"].clone().requires_grad_(True)
    pair = (leaf, logits[1]) if branch == "target" else (logits[0], leaf)
    log_probs = [x.log_softmax(-1) for x in pair]
    total, count = divergence_sum(name, *log_probs, mask if masked else None, chunk_size=4, normalized=(True, True))
    (ours,) = torch.autograd.grad(total, leaf)
    reference = leaf.detach().clone().requires_grad_(True)
    ref_pair = (reference, logits[1]) if branch == "target" else (logits[0], reference)
    lp, lq = (x.log_softmax(-1)[mask] for x in ref_pair)
    fwd, rev = (lp.exp() * (lp - lq)).sum(), (lq.exp() * (lq - lp)).sum()
    expected = {"kl": fwd, "kl-reverse": rev, "kl-sym": fwd + rev}[name]
    (expected_grad,) = torch.autograd.grad(expected, reference)
    assert int(count) == int(mask.sum())
    torch.testing.assert_close(total, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, expected_grad, rtol=1e-12, atol=1e-12)


def test_log_probabilities_from_the_loss_give_the_logits_value_and_gradient():
    """cross_entropy_sum hands its log-softmax to the divergences: CE + λ KL read from it equals CE + λ KL on logits."""
    from fabric_tram.loss import cross_entropy_sum

    torch.manual_seed(2)
    target, labels = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    labels[1, 4:] = -100
    grads = []
    for use_log_probs in (False, True):
        current = torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(3), requires_grad=True)
        out, tgt = cross_entropy_sum(current, labels), cross_entropy_sum(target, labels)
        assert out.divergence_input()[1] and tgt.as_target().logits is None  # a target keeps only its log-probabilities
        if use_log_probs:
            d, _ = divergence_sum("kl", tgt.log_probs, out.log_probs, out.mask, normalized=(True, True))
        else:
            d, _ = divergence_sum("kl", target, current, out.mask)
        (out.loss_sum + 0.7 * d).backward()
        grads.append(current.grad)
    torch.testing.assert_close(grads[1], grads[0])
    p, q = target.softmax(-1), torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(3)).softmax(-1)
    onehot = F.one_hot(labels.clamp(min=0), 9) * (labels != -100)[..., None]
    expected = (q - onehot) * (labels != -100)[..., None] + 0.7 * (q - p) * (labels != -100)[..., None]
    torch.testing.assert_close(
        grads[1], expected
    )  # d(CE + λ KL(p‖q))/d logits = (q − onehot) + λ (q − p) on valid rows


@pytest.mark.parametrize("rule", ["trpo", "r3f", "mesa", "tram-prev", "asam+r3f"])
def test_rules_reading_the_loss_log_probabilities_train_like_rules_reading_logits(rule):
    """The same three steps with the loss handing over its log-softmax (the fast path) and without it (the
    divergences recompute it from the logits): same losses, d and weights."""
    import dataclasses

    from fabric_tram.loss import cross_entropy_sum
    from fabric_tram.models.gpt2 import GPT2, GPT2Config
    from fabric_tram.optim.api import UpdateRuleLoop

    def run(keep_log_probs: bool):
        torch.manual_seed(0)
        model = GPT2(
            GPT2Config(preset="tiny", n_layer=2, n_head=2, n_embd=16, n_positions=12, vocab_size=37, dropout=0.1)
        )

        def loss_fn(m, batch, **kw):
            out = cross_entropy_sum(m(batch["input_ids"], **kw), batch["labels"])
            return out if keep_log_probs else dataclasses.replace(out, log_probs=None)

        extra = {} if rule.startswith("tram") else {"lam": 20.0}  # large enough for a wrong divergence gradient to show
        loop = UpdateRuleLoop(rule, model, torch.optim.SGD(model.parameters(), lr=0.5), loss_fn, **extra)  # (Adam would
        # blow float noise in near-zero gradient components up to lr)
        ids = torch.randint(0, 37, (3, 13), generator=torch.Generator().manual_seed(1))
        labels = ids[:, 1:].clone()
        labels[2, 7:] = -100
        stats = [
            loop.step({"input_ids": ids[:, :-1], "labels": labels, "example_index": torch.arange(3)}) for _ in range(3)
        ]
        return stats, {k: v.detach().clone() for k, v in model.state_dict().items()}

    (fast, fast_params), (slow, slow_params) = run(True), run(False)
    for a, b in zip(fast, slow, strict=True):
        # d is a KL of nearly equal float32 distributions (~1e-3 here): the order of a log-softmax's reductions
        # (whole rows vs chunks) moves it by ~1e-4 relative
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["d"] == pytest.approx(b["d"], rel=1e-3, abs=1e-7)
    for name in fast_params:
        torch.testing.assert_close(fast_params[name], slow_params[name], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("branch", ["none", "current", "target"])
@pytest.mark.parametrize("name", ["kl", "kl-reverse", "kl-sym"])
def test_float32_value_of_close_distributions_keeps_its_precision(name, branch):
    """What only float32 shows: distributions 1e-3 apart (TRAM's d late in a run, KL ~ 1e-4 a position) over a
    4,096-word vocabulary. Summed as Σ p log p − Σ p log q, two numbers near the entropy (~8) whose difference
    is the KL, the value lost about 1% (measured: 1.2e-2); with δ = log p − log q taken elementwise first it
    keeps about 1e-4 of the float64 value, whichever branch carries a gradient."""
    torch.manual_seed(5)
    base = 2 * torch.randn(2, 32, 4096, dtype=torch.float64)
    lp, lq = base.log_softmax(-1).float(), (base + 1e-3 * torch.randn_like(base)).log_softmax(-1).float()
    lp64, lq64 = lp.double(), lq.double()  # the float32 inputs exactly: what is tested is the summation
    mask = torch.rand(2, 32) > 0.2
    fwd, rev = (lp64.exp() * (lp64 - lq64)).sum(-1), (lq64.exp() * (lq64 - lp64)).sum(-1)
    expected = float(({"kl": fwd, "kl-reverse": rev, "kl-sym": fwd + rev}[name])[mask].sum())
    if branch != "none":
        (lp if branch == "target" else lq).requires_grad_(True)
    with torch.set_grad_enabled(branch != "none"):
        total, _ = divergence_sum(name, lp, lq, mask, normalized=(True, True))
    assert total.dtype == torch.float32
    assert abs(float(total.detach()) - expected) <= 1e-3 * expected
