"""Every rule on a 2-parameter quadratic small enough to compute by hand; the expected values below were
computed with plain Python floats, independently of fabric_tram (see each comment).

Model: logits = h * w with h = embed(x) (an Identity the noise hooks onto), x = (1, 1), w0 = (1, -2).
Loss: L(w) = (3 w0² + w1²) / 2, so g = (3 w0, w1); one position, two classes, for the divergences.
Base optimizer: SGD, lr 0.1.
"""

import pytest
import torch

from fabric_tram.optim.api import UpdateRuleLoop


class TwoParam(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Identity()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))

    def forward(self, x):
        return self.embed(x) * self.w


def make(name, start=None, **hyper):
    model = TwoParam()
    if start is not None:
        with torch.no_grad():
            model.w.copy_(torch.tensor(start, dtype=torch.float64))
    seen = []  # the weights every forward ran with

    def loss_fn(m, batch, **kw):
        seen.append(m.w.detach().clone())
        logits = m(batch)
        loss = 0.5 * (3 * m.w[0] ** 2 + m.w[1] ** 2)
        return loss, None, logits, None

    rule = UpdateRuleLoop(name, model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, **hyper)
    return model, rule, seen


X = torch.ones(1, 2, dtype=torch.float64)


def w(model):
    return model.w.detach().tolist()


@pytest.mark.parametrize(
    "name,hyper,e,new",
    [
        # e = ρ g/‖g‖ with g = (3, -2)
        ("sam", {"rho": 0.05}, [0.04160251471688065, -0.027735009811253767], [0.6875192455849358, -1.7972264990188747]),
        # T = |w| = (1, 2): e = ρ T²g/‖Tg‖ = 0.5 (3, -8)/5
        ("asam", {"rho": 0.5}, [0.3, -0.8], [0.61, -1.72]),
        # f = 1 + 0.1 g²: e = γ (g/f)/sqrt(Σ g²/f)
        (
            "fsam",
            {"gamma": 0.1, "eta": 0.1},
            [0.05729711925509414, -0.051840250754608984],
            [0.6828108642234717, -1.7948159749245391],
        ),
        # the loss ignores x, so the noised ascent gives g̃ = g: the same numbers as fsam
        (
            "tram-fisher",
            {"gamma": 0.1, "eta": 0.1, "embedding_module": "embed"},
            [0.05729711925509414, -0.051840250754608984],
            [0.6828108642234717, -1.7948159749245391],
        ),
    ],
)
def test_one_step_perturbation_and_update(name, hyper, e, new):
    model, rule, seen = make(name, **hyper)
    stats = rule.step(X)
    ascent_w, descent_w = seen[-2], seen[-1]
    torch.testing.assert_close(descent_w - ascent_w, torch.tensor(e, dtype=torch.float64), rtol=0, atol=1e-12)
    assert stats["e_norm"] == pytest.approx(float(torch.tensor(e).norm()), rel=1e-6)
    torch.testing.assert_close(model.w.detach(), torch.tensor(new, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["tram-prev", "tram-init"])
def test_tram_weight_targets(name):
    model, rule, seen = make(name, radius_scale=1.0)  # r = d: the paper's radius, no calibration
    first = rule.step(X)
    # step 1: the target is θ_0 = current weights, so d = 0 and the step is a plain SGD step
    assert first["d"] == 0.0 and first["e_norm"] == 0.0
    assert w(model) == pytest.approx([0.7, -1.8], abs=1e-12)
    seen.clear()
    second = rule.step(X)
    # step 2: d = KL(softmax(w0) ‖ softmax(w1)) for both (θ_{s−2} = θ_0 here)
    assert second["d"] == pytest.approx(0.006589446130024216, rel=1e-9)
    torch.testing.assert_close(
        seen[0], torch.tensor([1.0, -2.0], dtype=torch.float64), rtol=0, atol=0
    )  # target ran at θ_0
    e = seen[2] - seen[1]
    t = seen[1].abs()
    g = torch.tensor([3 * 0.7, -1.8], dtype=torch.float64)
    assert torch.allclose(e / (t**2 * g), (e / (t**2 * g))[0].expand(2), rtol=1e-9)  # e ∥ T² g
    assert float((e / t).norm()) == pytest.approx(second["d"], rel=1e-9)  # ‖e / T‖ = d
    torch.testing.assert_close(
        seen[2] - seen[1],
        torch.tensor([0.0019057817496180168, -0.010801281986173252], dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    third = rule.step(X)
    # step 3 tells them apart: tram-prev's target is θ_1, tram-init's stays θ_0
    expected = {
        "tram-prev": (0.006012415596669145, [0.3423663499990059, -1.4560891692395581]),
        "tram-init": (0.023737427663545564, [0.3416781652086469, -1.4533217721426293]),
    }[name]
    assert third["d"] == pytest.approx(expected[0], rel=1e-9)
    assert w(model) == pytest.approx(expected[1], abs=1e-12)


def test_tram_x_with_a_given_noise():
    z = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    model, rule, seen = make(
        "tram-x", embedding_module="embed", noise_sampler=lambda step, idx, emb: z, radius_scale=1.0
    )
    stats = rule.step(X)
    # d = KL(softmax((x+z) w0) ‖ softmax(x w0)); e = d T²g/‖Tg‖; the descent ran on clean inputs
    assert stats["d"] == pytest.approx(0.0002399316636205566, rel=1e-9)
    torch.testing.assert_close(
        seen[2] - seen[1],
        torch.tensor([0.00014395899817230517, -0.00038389066179281376], dtype=torch.float64),
        rtol=0,
        atol=1e-14,
    )
    assert w(model) == pytest.approx([0.6999568123005483, -1.7999616109338206], abs=1e-12)


@pytest.mark.parametrize(
    "name,hyper,expected",
    [
        # grad = g + λ (q − p): d KL(p‖q)/d logits_q = q − p, with p from θ_{s−2}: θ_0 at steps 1 and 2, θ_1 at 3
        (
            "trpo",
            {"lam": 0.1},
            [[0.7, -1.8], [0.4902843230684367, -1.6202843230684367], [0.3435211827530321, -1.4585780473667196]],
        ),
        # ... or from the EMA (decay 0.9, so decay and 1 - decay differ): ema = 0.9 ema + 0.1 θ after each step
        (
            "mesa",
            {"lam": 0.1, "ema_decay": 0.9},
            [[0.7, -1.8], [0.49026121668462685, -1.6202612166846269], [0.3437250599990913, -1.4587773033360167]],
        ),
    ],
)
def test_regularisers_three_steps(name, hyper, expected):
    model, rule, _ = make(name, **hyper)
    for step, new in enumerate(expected, start=1):
        rule.step(X)
        assert w(model) == pytest.approx(new, abs=1e-12), step  # zero regulariser at step 1
        if name == "mesa":  # the EMA itself, after each base step
            ema = {1: [0.97, -1.98], 2: [0.9220261216684627, -1.9440261216684627]}.get(step)
            if ema:
                assert rule.rule.target.buffers[0].tolist() == pytest.approx(ema, abs=1e-12)


@pytest.mark.parametrize(
    "name,hyper,new",
    [
        # g = (3, -2), ‖g‖ = sqrt(13) > 1: the step uses g / (‖g‖ + 1e-6)
        ("sgd", {}, [0.9167949936431323, -1.9445299957620883]),
        # clipping applies to the descent gradient g(w + e), ‖g(w + e)‖ = 3.725, not to the ascent one
        ("sam", {"rho": 0.05}, [0.916114102566676, -1.9455651688458715]),
    ],
)
def test_gradient_clipping_of_the_final_gradient(name, hyper, new):
    model, rule, _ = make(name, grad_clip=1.0, **hyper)
    stats = rule.step(X)
    assert w(model) == pytest.approx(new, abs=1e-12)
    assert stats["grad_norm"] > 1.0  # the norm before clipping is what is logged


class WeightAndBias(torch.nn.Module):
    """Parameters named 'weight' and 'bias': L = (3 w0² + w1²)/2 + (b0² + 2 b1²)/2."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.tensor([0.5, -0.5], dtype=torch.float64))

    def forward(self, x):
        return x * self.weight + self.bias


def test_asam_like_original_scales_only_the_parameters_named_weight():
    model, seen = WeightAndBias(), []

    def loss_fn(m, batch, **kw):
        seen.append([m.weight.detach().clone(), m.bias.detach().clone()])
        loss = 0.5 * (3 * m.weight[0] ** 2 + m.weight[1] ** 2) + 0.5 * (m.bias[0] ** 2 + 2 * m.bias[1] ** 2)
        return loss, None, m(batch), None

    rule = UpdateRuleLoop("asam", model, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn, asam_like_original=True)
    rule.step(X)
    # by hand: T = |w| + 0.01 on the weight, T = 1 on the bias; e = ρ T² g / ‖T g‖ with ρ = 0.5
    e_weight, e_bias = seen[1][0] - seen[0][0], seen[1][1] - seen[0][1]
    assert e_weight.tolist() == pytest.approx([0.29673188930565486, -0.783469925160132], abs=1e-12)
    assert e_bias.tolist() == pytest.approx([0.04848084980323088, -0.09696169960646175], abs=1e-12)


def test_r3f_gradient_through_both_branches():
    z = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    model, rule, _ = make("r3f", lam=1.0, noise_sampler=lambda step, idx, emb: z, embedding_module="embed")
    rule.step(X)
    # by hand: logits a = w (clean), b = (1+z) w (noised, from the detached lookup); KLsym(a, b) = Σ (p_a − p_b)(a − b)
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    a, b = w0, (1 + z[0]) * w0
    pa, pb = a.softmax(-1), b.softmax(-1)
    reg = ((pa - pb) * (a.log_softmax(-1) - b.log_softmax(-1))).sum()
    (0.5 * (3 * w0[0] ** 2 + w0[1] ** 2) + reg).backward()
    torch.testing.assert_close(model.w.detach(), (w0 - 0.1 * w0.grad).detach(), rtol=0, atol=1e-12)


class TrainableLookup(torch.nn.Module):
    """An embedding with parameters, so that what reaches its gradient is visible: h = E x, logits = h * w."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(2, 2, bias=False).double()
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[0.9, 0.2], [-0.1, 1.1]], dtype=torch.float64))
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))

    def forward(self, x):
        return self.embed(x) * self.w


def test_r3f_noised_branch_starts_from_the_detached_lookup():
    """The embedding's gradient comes from the clean branch only (as fairseq): with a trainable lookup, a noised
    branch that is not detached would send the regulariser's gradient into E a second time."""
    z = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    model = TrainableLookup()

    def loss_fn(m, batch, **kw):
        logits = m(batch)
        return 0.5 * (3 * m.w[0] ** 2 + m.w[1] ** 2) + 0.5 * (m.embed.weight**2).sum(), None, logits, None

    rule = UpdateRuleLoop("r3f", model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, lam=1.0,
                          noise_sampler=lambda step, idx, emb: z, embedding_module="embed")  # fmt: skip
    reference = TrainableLookup()
    rule.step(X)
    # by hand, with autograd on the formula: a = (E x) w, b = (stop_grad(E x) + z) w, L + KLsym(a, b)
    h = reference.embed(X)
    a, b = h * reference.w, (h.detach() + z) * reference.w
    pa, pb = a.softmax(-1), b.softmax(-1)
    reg = ((pa - pb) * (a.log_softmax(-1) - b.log_softmax(-1))).sum()
    task = 0.5 * (3 * reference.w[0] ** 2 + reference.w[1] ** 2) + 0.5 * (reference.embed.weight**2).sum()
    (task + reg).backward()
    for ours, theirs in ((model.w, reference.w), (model.embed.weight, reference.embed.weight)):
        torch.testing.assert_close(ours.detach(), (theirs - 0.1 * theirs.grad).detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["tram-prev", "tram-init"])
def test_weight_targets_restore_bit_exactly_when_d_is_positive(name):
    """lr 0 keeps the weights, so move them by hand between steps: step 2 then sees d > 0, perturbs, descends and
    must put back exactly the weights it started from."""
    model, rule, seen = make(name)
    rule.optimizer.optimizer.param_groups[0]["lr"] = 0.0
    rule.step(X)
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.6, -1.7], dtype=torch.float64))
    start = model.w.detach().clone()
    seen.clear()
    stats = rule.step(X)
    assert stats["d"] > 0 and stats["e_norm"] > 0 and not torch.equal(seen[2], seen[1])  # the descent ran at θ + e
    assert torch.equal(model.w.detach(), start)


def weight_buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "radius"}  # TRAM's radius state: tests/test_radius.py


@pytest.mark.parametrize("name", ["tram-prev", "tram-init", "trpo", "mesa", "asam+trpo", "asam+mesa"])
def test_loading_a_rules_state_replaces_its_buffers(name):
    """A checkpoint's rule state must land in the buffers: a rule built on other weights takes the saved ones."""
    source_model, source, _ = make(name)
    source.step(X)
    _, target, _ = make(name, start=[3.0, -6.0])  # other weights: its own buffers start elsewhere
    before = {k: [b.clone() for b in v] for k, v in weight_buffers(target.rule.state_dict()).items()}
    target.load_state_dict(source.state_dict())
    for key, buffers in weight_buffers(source.rule.state_dict()).items():
        loaded = target.rule.state_dict()[key]
        assert all(torch.equal(a, b) for a, b in zip(loaded, buffers, strict=True)), key
        assert not all(torch.equal(a, b) for a, b in zip(loaded, before[key], strict=True)), key


def test_mesa_keeps_its_ema_in_float32_for_bfloat16_weights():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    rule = UpdateRuleLoop("mesa", model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b, **k: m(b).sum())
    assert all(b.dtype == torch.float32 for b in rule.rule.target.buffers)


@pytest.mark.parametrize(
    "name",
    ["sam", "asam", "fsam", "tram-prev", "tram-init", "tram-x", "tram-fisher", "asam+trpo", "asam+r3f", "asam+mesa"],
)
def test_restore_is_bit_exact(name):
    model = TwoParam()
    start = model.w.detach().clone()
    rule = UpdateRuleLoop(
        name,
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        lambda m, batch, **kw: (0.5 * (3 * m.w[0] ** 2 + m.w[1] ** 2), None, m(batch), None),
        **({"embedding_module": "embed"} if name in ("tram-x", "tram-fisher", "asam+r3f") else {}),
    )
    for _ in range(3):
        stats = rule.step(X)
        assert stats["e_norm"] > 0 or name in ("tram-prev", "tram-init")  # the weights really moved during the step
    assert torch.equal(model.w.detach(), start)  # lr 0: after ascent, perturbation, descent and restore, unchanged


def test_asam_combinations_match_asam_on_the_regularised_loss():
    """asam+trpo at step 1 (θ_{s−2} = θ_0 = θ) is ASAM on L + λ KL(p(θ_0)‖p(θ)): same as asam when it adds 0."""
    model_a, rule_a, _ = make("asam", rho=0.5)
    model_b, rule_b, _ = make("asam+trpo", rho=0.5, lam=0.1)
    rule_a.step(X)
    stats = rule_b.step(X)
    # ascent: the regulariser is 0 at θ = θ_0 with zero gradient; descent at θ+e: its gradient is not zero
    assert stats["d"] == 0.0
    assert not torch.equal(model_a.w, model_b.w)
    w0, e = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.3, -0.8], dtype=torch.float64)
    we = (w0 + e).requires_grad_(True)
    p0 = w0.softmax(-1)
    reg = (p0 * (p0.log() - we.log_softmax(-1))).sum()
    (0.5 * (3 * we[0] ** 2 + we[1] ** 2) + 0.1 * reg).backward()
    torch.testing.assert_close(model_b.w.detach(), w0 - 0.1 * we.grad, rtol=0, atol=1e-12)


def test_radius_scale_and_max_radius():
    model, rule, seen = make("tram-prev", radius_scale=2.0, max_radius=0.01)
    rule.step(X)
    seen.clear()
    stats = rule.step(X)
    # d = 0.006589446130024216 (as above); radius = min(2 d, 0.01) = 0.01, so ‖e / T‖ = 0.01
    assert stats["d"] == pytest.approx(0.006589446130024216, rel=1e-9) and stats["radius"] == 0.01
    e, t = seen[2] - seen[1], seen[1].abs()
    assert float((e / t).norm()) == pytest.approx(0.01, rel=1e-9)
