"""Sharpness at a lower price (docs/algorithms.md, "The ascent every k steps, and along the momentum"):
``ascent_every=k`` perturbs on steps 1, 1 + k, ... and takes the base step on the clean gradient in between, the
rule's state kept current; ``ascent_direction=momentum`` perturbs along −v/‖v‖ (the base optimizer's first
moment after the previous step) with one pass at θ + e and the base step from θ. Each checked against values
computed here in plain Python floats on the 2-parameter quadratic of tests/test_rules_closed_form.py."""

import math

import pytest
import torch
from conftest import EXACT_ABS, assert_histories_match, max_param_diff, small_config, trajectory
from test_rules_closed_form import TwoParam, X

from fabric_tram.config import ConfigError, load_config
from fabric_tram.engine.trainer import train
from fabric_tram.optim.api import UpdateRuleLoop

LR, RHO = 0.1, 0.05


def grad(w):
    return [3 * w[0], w[1]]  # L(w) = (3 w0² + w1²) / 2


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def loop(name, momentum=0.0, **hyper):
    model, seen = TwoParam(), []

    def loss_fn(m, batch, **kw):
        seen.append(m.w.detach().clone())
        return 0.5 * (3 * m.w[0] ** 2 + m.w[1] ** 2), None, m(batch), None

    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    return model, UpdateRuleLoop(name, model, optimizer, loss_fn, **hyper), seen


def softmax(z):
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def kl(p_logits, q_logits):
    p, q = softmax(p_logits), softmax(q_logits)
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True))


def test_sam_every_3_is_sam_on_steps_1_and_4_and_sgd_between():
    model, rule, _ = loop("sam", rho=RHO, ascent_every=3)
    w, expected = [1.0, -2.0], []
    for step in range(1, 7):
        g = grad(w)
        if (step - 1) % 3 == 0:  # climb to w + ρ g/‖g‖, descend with the gradient there
            g = grad([wi + RHO * gi / norm(g) for wi, gi in zip(w, g, strict=True)])
        w = [wi - LR * gi for wi, gi in zip(w, g, strict=True)]
        expected.append(w)
    got = []
    for _ in range(6):
        stats = rule.step(X)
        got.append(model.w.detach().tolist())
        assert ("e_norm" in stats) == (len(got) in (1, 4))  # only the perturbing steps report e
    for step, (a, b) in enumerate(zip(got, expected, strict=True), start=1):
        assert a == pytest.approx(b, abs=1e-12), step


def test_the_ascent_phase_is_a_function_of_the_step_so_a_resumed_run_keeps_it():
    """ascent_every=3 perturbs on steps 1, 4, 7, ...: a rule first asked about step 5 (a run resumed there) answers
    as the uninterrupted run does, whatever it was asked before."""
    _, rule, _ = loop("sam", rho=RHO, ascent_every=3)
    steps = [5, 6, 7, 4, 10, 2]
    assert [rule.rule.ascends(s) for s in steps] == [False, False, True, True, True, False]


@pytest.mark.parametrize(
    ("ascent_every", "radius_every", "steps", "takes_d"),
    [
        (2, 1, 5, {1, 3, 5}),  # d on every step would be overwritten unread on 2 and 4: taken where it is used
        (4, 3, 13, {1, 4, 7, 13}),  # scheduled 1, 4, 7, 10, 13: d(4) is read by step 5, d(7) by 9, d(10) never
    ],
)
def test_tram_prev_between_perturbations_keeps_its_previous_iterate_and_takes_only_the_d_it_reads(
    ascent_every, radius_every, steps, takes_d
):
    """Steps 1, 1 + k, ... perturb with the radius of the last d taken; the previous iterate is stored on every
    plain step (d at a perturbing step is between θ_{s-2} and θ_{s-1}, whichever step they came from), and a d
    that a later scheduled d would overwrite before any perturbing step reads it is not taken at all."""
    model, rule, seen = loop(
        "tram-prev", radius_scale=1.0, max_radius="none", ascent_every=ascent_every, radius_every=radius_every
    )
    w, previous, last_d, expected = [1.0, -2.0], [1.0, -2.0], None, []
    for step in range(1, steps + 1):
        if step in takes_d:
            last_d = kl(previous, w)  # logits = x · w with x = (1, 1): the logits are the weights
        g = grad(w)
        if (step - 1) % ascent_every == 0:  # e = d T² g / ‖T g‖, T = |w|
            t = [abs(wi) for wi in w]
            tg = norm([ti * gi for ti, gi in zip(t, g, strict=True)])
            e = [last_d * ti * ti * gi / (tg + 1e-12) for ti, gi in zip(t, g, strict=True)]
            g = grad([wi + ei for wi, ei in zip(w, e, strict=True)])
        previous = w
        w = [wi - LR * gi for wi, gi in zip(w, g, strict=True)]
        expected.append((last_d if step in takes_d else None, w))
    for step, (d, w) in enumerate(expected, start=1):
        stats = rule.step(X)
        assert ("d" in stats) == (d is not None), step
        if d is not None:
            assert stats["d"] == pytest.approx(d, rel=1e-9, abs=1e-15), step
            assert d > 0 or step == 1, step  # the target is the model itself at step 1 only
        assert model.w.detach().tolist() == pytest.approx(w, abs=1e-12), step


def test_the_momentum_direction_moves_against_v_before_the_base_step_updates_it():
    """SGD with momentum 0.9: step 1 has no v, so e = 0 and it is an SGD step; from step 2 the one pass runs at
    w − ρ v/‖v‖ with v the buffer after the previous step, and the step is taken from w (not from w + e)."""
    model, rule, seen = loop("sam", momentum=0.9, rho=RHO, ascent_direction="momentum")
    w, v = [1.0, -2.0], None
    for step in range(1, 5):
        seen.clear()
        point = w if v is None else [wi - RHO * vi / norm(v) for wi, vi in zip(w, v, strict=True)]
        g = grad(point)
        v = g if v is None else [0.9 * vi + gi for vi, gi in zip(v, g, strict=True)]  # torch's SGD buffer
        w = [wi - LR * vi for wi, vi in zip(w, v, strict=True)]
        stats = rule.step(X)
        assert len(seen) == 1  # one forward: the pass at w + e
        assert seen[0].tolist() == pytest.approx(point, abs=1e-12), step
        assert model.w.detach().tolist() == pytest.approx(w, abs=1e-12), step
        assert stats["e_norm"] == pytest.approx(0.0 if step == 1 else RHO, abs=1e-12)


def test_asam_along_adams_first_moment():
    """ASAM's geometry on Adam's exp_avg m: e = −ρ T² m/‖T m‖ with T = |w|, m after the previous step."""
    model, seen = TwoParam(), []

    def loss_fn(m, batch, **kw):
        seen.append(m.w.detach().clone())
        return 0.5 * (3 * m.w[0] ** 2 + m.w[1] ** 2), None, m(batch), None

    betas = (0.9, 0.99)
    rule = UpdateRuleLoop("asam", model, torch.optim.Adam(model.parameters(), lr=LR, betas=betas), loss_fn, rho=0.5,
                          ascent_direction="momentum")  # fmt: skip
    w, m, s = [1.0, -2.0], [0.0, 0.0], [0.0, 0.0]
    for step in range(1, 4):
        seen.clear()
        if step == 1:
            point = w
        else:
            t = [abs(wi) for wi in w]
            tm = norm([ti * mi for ti, mi in zip(t, m, strict=True)])
            point = [wi - 0.5 * ti * ti * mi / (tm + 1e-12) for wi, ti, mi in zip(w, t, m, strict=True)]
        g = grad(point)
        m = [betas[0] * mi + (1 - betas[0]) * gi for mi, gi in zip(m, g, strict=True)]
        s = [betas[1] * si + (1 - betas[1]) * gi * gi for si, gi in zip(s, g, strict=True)]
        m_hat = [mi / (1 - betas[0] ** step) for mi in m]
        s_hat = [si / (1 - betas[1] ** step) for si in s]
        w = [wi - LR * mh / (math.sqrt(sh) + 1e-8) for wi, mh, sh in zip(w, m_hat, s_hat, strict=True)]
        rule.step(X)
        assert seen[0].tolist() == pytest.approx(point, abs=1e-12), step
        assert model.w.detach().tolist() == pytest.approx(w, abs=1e-12), step


def test_the_momentum_direction_is_refused_where_there_is_no_momentum_or_no_meaning():
    base = ["task.name=lm", "model.name=gpt2"]
    for overrides, message in (
        (["optimizer.name=asam", "optimizer.base=sgd", "optimizer.ascent_direction=momentum"],
         "sgd without momentum keeps none: set optimizer.momentum > 0"),
        (["optimizer.name=tram-fisher", "optimizer.ascent_direction=momentum"], "not defined for tram-fisher"),
        (["optimizer.name=sam", "optimizer.m_sharpness=true", "optimizer.ascent_direction=momentum"],
         "the momentum is the same on every rank"),
        (["optimizer.name=sam", "optimizer.ascent_direction=uphill"], "ascent_direction must be one of gradient"),
        (["optimizer.name=sam", "optimizer.ascent_every=0"], "ascent_every must be an integer >= 1"),
        (["optimizer.name=trpo", "optimizer.ascent_every=2"], "unknown config key 'optimizer.ascent_every'"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, *overrides])
    model = TwoParam()
    with pytest.raises(ValueError, match="SGD without momentum keeps none: use adam, adamw, or sgd with momentum"):
        UpdateRuleLoop("sam", model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: None,
                       ascent_direction="momentum")  # fmt: skip


# ------------------------------------------------------------------------------------------- through the engine

SCHEDULED = {  # name: (rule, overrides) -- each with sgd + momentum so that the momentum direction has a moment
    "tram-prev-every-3": ("tram-prev", ["optimizer.ascent_every=3", "optimizer.radius_scale=1"]),
    "tram-prev-momentum": ("tram-prev", ["optimizer.ascent_direction=momentum", "optimizer.radius_scale=1",
                                         "optimizer.radius_every=2"]),
    "asam+trpo-every-2": ("asam+trpo", ["optimizer.ascent_every=2"]),
    "asam-momentum": ("asam", ["optimizer.ascent_direction=momentum"]),
}  # fmt: skip


def scheduled_config(corpus, run_dir, variant, micro=8, accumulate=1, steps=6, extra=()):
    rule, overrides = SCHEDULED[variant]
    return small_config(corpus, run_dir, rule, micro=micro, accumulate=accumulate, steps=steps,
                        extra=["optimizer.base=sgd", "optimizer.momentum=0.9", *overrides,
                               *extra])  # fmt: skip


def test_the_engine_counts_the_passes_each_step_ran_and_the_estimate_averages_them(corpus, tmp_path):
    from fabric_tram.engine.estimate import estimate

    expected = {
        "tram-prev-every-3": [(2, 1, 2), (1, 0, 1), (1, 0, 1)] * 2,  # e and d every third step: d is read there
        "tram-prev-momentum": [(1, 1, 1), (1, 0, 1)] * 3,  # one pass a step; d every second step
        "asam+trpo-every-2": [(2, 2, 2), (1, 1, 1)] * 3,  # the regulariser's target in every pass
        "asam-momentum": [(1, 0, 1)] * 6,
    }
    for variant, passes in expected.items():
        config = scheduled_config(corpus, tmp_path / variant, variant)
        run = train(config)
        logged = [(s["passes/forward"], s["passes/no_grad_forward"], s["passes/backward"]) for s in run.history]
        assert logged == passes, variant
        mean = estimate(config, devices=1)["passes"]
        assert (mean["forward"], mean["no_grad_forward"], mean["backward"]) == pytest.approx(
            tuple(sum(p[i] for p in passes) / len(passes) for i in range(3)), rel=1e-12
        ), variant
        perturbing = [s for s in run.history if "e_norm" in s]
        assert len(perturbing) == {"tram-prev-every-3": 2, "asam+trpo-every-2": 3}.get(variant, 6), variant


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(SCHEDULED))
def test_a_schedule_is_the_same_with_accumulation_and_after_a_resume_mid_schedule(corpus, tmp_path, variant):
    """k = 4 micro-batches of 2 equal one of 8 (float64); a run stopped at step 2 (between two perturbations for
    every variant) and resumed takes the uninterrupted run's steps 3-5 exactly: the phase is the step's."""
    keys = ("loss", "Tg_norm", "e_norm", "radius", "d", "regulariser", "n_targets")
    one = train(scheduled_config(corpus, tmp_path / "k1", variant, steps=5))
    four = train(scheduled_config(corpus, tmp_path / "k4", variant, micro=2, accumulate=4, steps=5))
    assert_histories_match(one.history, four.history, keys, label=variant)
    assert max_param_diff(trajectory(one)["params"], trajectory(four)["params"]) < EXACT_ABS
    extra = ["trainer.save_every=2"]
    train(scheduled_config(corpus, tmp_path / "stop", variant, steps=2, extra=extra))
    resumed = train(
        scheduled_config(corpus, tmp_path / "stop", variant, steps=5, extra=[*extra, "trainer.resume=auto"])
    )
    assert resumed.start_step == 2
    assert_histories_match(one.history[2:], resumed.history, keys, rel=0, abs_=0, label=variant)
    assert max_param_diff(trajectory(resumed)["params"], trajectory(one)["params"]) == 0.0


def test_tram_prev_along_the_momentum_holds_and_is_estimated_with_a_second_copy(corpus, tmp_path):
    """Its target forward runs while θ is moved: the previous iterate and the restore point are two buffers, and
    the estimate counts both; the gradient direction keeps the one shared buffer."""
    from fabric_tram.engine.estimate import estimate

    sizes = {}
    for variant, extra in (("gradient", []), ("momentum", ["optimizer.ascent_direction=momentum"])):
        config = small_config(corpus, tmp_path / variant, "tram-prev", steps=2,
                              extra=["optimizer.radius_scale=1", *extra])  # fmt: skip
        run = train(config)
        buffers = {id(b) for b in run.rule.target.buffers} | {id(b) for b in run.rule.backup}
        assert len(buffers) == {"gradient": 1, "momentum": 2}[variant] * len(run.rule.params), variant
        sizes[variant] = estimate(config, devices=1)["bytes"]["update_rule_buffers"]
    assert sizes["momentum"] == 2 * sizes["gradient"] > 0
