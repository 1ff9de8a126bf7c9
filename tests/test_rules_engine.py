"""The update rules through the engine on the LM task: pass counts, accumulation equivalence (float64),
tram-prev's first steps, checkpoint round trips of persistent state, fp16 overflow, and set-up refusals."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    EXACT_ABS,
    EXACT_REL,
    assert_histories_match,
    initial_params,
    max_param_diff,
    small_config,
    trajectory,
)

from fabric_tram.engine.trainer import train

# docs/algorithms.md: (forward with gradient, no-grad forward, backward) per step
PASSES = {
    "sam": (2, 0, 2),
    "asam": (2, 0, 2),
    "fsam": (2, 0, 2),
    "tram-prev": (2, 1, 2),
    "tram-init": (2, 1, 2),
    "tram-x": (2, 1, 2),
    "tram-fisher": (2, 0, 2),
    "trpo": (1, 1, 1),
    "r3f": (2, 0, 2),  # one backward through two graphs costs two
    "mesa": (1, 1, 1),
    "asam+trpo": (2, 2, 2),
    "asam+r3f": (4, 0, 4),
    "asam+mesa": (2, 2, 2),
}
WITH_D = {"tram-prev", "tram-init", "tram-x", "trpo", "r3f", "mesa", "asam+trpo", "asam+r3f", "asam+mesa"}
ONE_PASS = {"trpo", "r3f", "mesa"}


def test_initial_params_are_the_weights_a_run_starts_from(corpus, tmp_path):
    config = small_config(corpus, tmp_path / "zero", "sgd", steps=1, extra=["optimizer.lr=0"])
    assert max_param_diff(trajectory(train(config))["params"], initial_params(config)) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("rule", sorted(PASSES))
def test_two_step_smoke_of_every_rule(corpus, tmp_path, rule):
    config = small_config(corpus, tmp_path / "r", rule, steps=2, extra=["optimizer.lr=0.001", "model.dropout=0.1"])
    run = train(config)
    for stats in run.history:
        assert math.isfinite(stats["loss"])
        assert (stats["passes/forward"], stats["passes/no_grad_forward"], stats["passes/backward"]) == PASSES[rule]
    assert tuple(run.rule.passes) == PASSES[rule]
    assert max_param_diff(trajectory(run)["params"], initial_params(config)) > 0  # the weights changed
    logged = run.history[-1]
    assert ("d" in logged) == (rule in WITH_D)
    assert ("e_norm" in logged) == (rule not in ONE_PASS)
    if rule not in ONE_PASS:
        assert logged["e_norm"] > 0 and logged["Tg_norm"] > 0


ACCUMULATION_RULES = ["sam", "asam", "fsam", "tram-prev", "tram-x", "tram-fisher", "trpo", "r3f", "asam+mesa"]


@pytest.mark.slow
@pytest.mark.parametrize("rule", ACCUMULATION_RULES)
def test_accumulation_equivalence_of_rules(corpus, tmp_path, rule):
    """k = 4 micro-batches of 2 equal one batch of 8: every per-step scalar that shapes the step, and the weights
    (float64; the noise of tram-x, tram-fisher and r3f is drawn per example, whatever the micro-batch)."""

    def run(micro, k):
        config = small_config(
            corpus, tmp_path / f"{rule}-{k}", rule, micro=micro, accumulate=k, extra=["optimizer.base=sgd"]
        )
        r = train(config)
        return r.history, trajectory(r)["params"]

    one, p1 = run(8, 1)
    four, p4 = run(2, 4)
    keys = ("loss", "Tg_norm", "e_norm", "radius", "d", "regulariser", "n_targets")
    assert_histories_match(one, four, keys, label=rule)
    if rule in WITH_D:
        assert all(s["d"] > 0 for s in one[1:]), [s["d"] for s in one]  # a real distance from step 2 on
    assert max_param_diff(p1, p4) < EXACT_ABS


def test_tram_prev_first_step_is_the_base_step_and_d_is_the_kl_of_successive_iterates(corpus, tmp_path):
    base = trajectory(train(small_config(corpus, tmp_path / "adam", "adam", steps=1)))
    scale_one = ["optimizer.radius_scale=1"]  # r = d (no calibration, whose first steps climb radius_target)
    tram = trajectory(train(small_config(corpus, tmp_path / "tram1", "tram-prev", steps=1, extra=scale_one)))
    assert tram["steps"][0]["loss"] == base["steps"][0]["loss"]
    assert max_param_diff(base["params"], tram["params"]) == 0.0  # d = 0: e = 0, the descent gradient is g

    weights = []
    config = small_config(corpus, tmp_path / "tram2", "tram-prev", steps=2, extra=scale_one)
    run = train(config, callbacks=(lambda run, s: weights.append(trajectory(run)["params"]),))
    d2 = run.history[1]["d"]
    assert d2 > 0
    # independently: the KL between the outputs at θ_0 and θ_1 on step 2's micro-batch
    from fabric_tram.data.batching import StepSampler
    from fabric_tram.models.gpt2 import GPT2

    task = run.task
    idx = StepSampler(len(task.train_set), 8, 1, 1, 0, seed=0).step_indices(1)[0]
    batch = task.collate([task.train_set[i] for i in idx], idx)
    logits = []
    for state in (initial_params(config), weights[0]):
        model = GPT2(config.model).double()
        model.load_state_dict(state)
        with torch.no_grad():
            logits.append(model(batch["input_ids"]))
    mask = batch["labels"] != -100
    p_log, q_log = logits[0].log_softmax(-1)[mask], logits[1].log_softmax(-1)[mask]
    expected = F.kl_div(q_log, p_log, log_target=True, reduction="sum") / mask.sum()
    assert d2 == pytest.approx(float(expected), rel=EXACT_REL, abs=EXACT_ABS)


@pytest.mark.parametrize("rule", ["tram-prev", "tram-init", "mesa"])
def test_checkpoint_round_trip_restores_persistent_state(corpus, tmp_path, rule):
    extra = ["trainer.save_every=2", "optimizer.base=adam"]
    full = train(small_config(corpus, tmp_path / "full", rule, steps=4, extra=extra))
    assert any(isinstance(v, list) and v for v in full.rule.state_dict().values())
    train(small_config(corpus, tmp_path / "stop", rule, steps=2, extra=extra))
    resumed = train(small_config(corpus, tmp_path / "stop", rule, steps=4, extra=extra + ["trainer.resume=auto"]))
    assert [s["d"] for s in resumed.history] == [s["d"] for s in full.history[2:]]
    assert max_param_diff(trajectory(resumed)["params"], trajectory(full)["params"]) == 0.0
    checkpoint = tmp_path / "stop" / "checkpoints" / "step-00000002"
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint / "state")).read_metadata().state_dict_metadata
    buffers = {k[len("rule.") :]: m for k, m in metadata.items() if k.startswith("rule.")}  # by parameter name
    expected_key = {"tram-prev": "previous_iterate", "tram-init": "initial_weights", "mesa": "ema"}[rule]
    assert {k.split("/")[0] for k in buffers} == {expected_key}
    assert {k.split("/", 1)[1] for k in buffers} == {n for n, _ in full.model.module.named_parameters()}
    shared = torch.load(checkpoint / "global.pt", weights_only=True)["rule"]
    assert list(shared) == (["radius"] if rule.startswith("tram") else [])  # TRAM's radius: the same on all ranks
    if rule == "mesa":  # the EMA is accumulated in at least float32: float64 here, as the weights
        assert all(m.properties.dtype == torch.float64 for m in buffers.values())


@pytest.mark.parametrize(
    "name,override,message",
    [
        ("asam", "optimizer.rho=-0.1", "optimizer.rho must be >= 0"),
        ("tram-x", "optimizer.sigma=-1", "optimizer.sigma must be >= 0"),
        ("trpo", "optimizer.lam=-0.5", "optimizer.lam must be >= 0"),
        ("tram-prev", "optimizer.divergence=js", "unknown divergence 'js'"),
        ("tram-x", "optimizer.embedding_module=encoder.tokens", "embedding module 'encoder.tokens' not found"),
    ],
)
def test_bad_rule_settings_fail_at_setup(corpus, tmp_path, name, override, message):
    steps = []
    with pytest.raises((ValueError, KeyError), match=message):
        train(small_config(corpus, tmp_path / "bad", name, extra=[override]), callbacks=(lambda r, s: steps.append(s),))
    assert steps == []  # refused before any step ran


def test_noise_rule_on_a_model_without_input_noise_or_named_embedding_is_refused():
    from fabric_tram.optim.api import UpdateRuleLoop

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no input_noise argument and no embedding module was named"):
        UpdateRuleLoop("r3f", model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b, **k: m(b).sum())
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['rhoo'\] for 'sam'"):
        UpdateRuleLoop("sam", model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b, **k: m(b).sum(), rhoo=1)


class NoisedBag(torch.nn.Module):
    """A model with an input_noise argument, used as the contract says, as a tensor, or not at all."""

    def __init__(self, use: str):
        super().__init__()
        self.embed, self.head, self.use = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2), use

    def forward(self, x, input_noise=None):
        e = self.embed(x)
        if input_noise is not None and self.use == "function":
            e = input_noise(e)
        elif input_noise is not None and self.use == "tensor":
            e = e + input_noise
        return self.head(e.mean(1))


@pytest.mark.parametrize("use,error,message", [("function", None, None),
                                               ("tensor", TypeError, "is a function to apply to the token embeddings"),
                                               ("ignored", ValueError, "without noising its inputs")])  # fmt: skip
def test_the_input_noise_contract_is_checked_with_a_clear_error(use, error, message):
    from fabric_tram.optim.api import UpdateRuleLoop

    model = NoisedBag(use)
    loss = lambda m, b, **kw: F.cross_entropy(m(b, **kw), torch.zeros(len(b), dtype=torch.long), reduction="sum")  # noqa: E731
    rule = UpdateRuleLoop("tram-x", model, torch.optim.SGD(model.parameters(), lr=0.1),
                          lambda m, b, **kw: (loss(m, b, **kw), len(b), m(b, **kw), None))  # fmt: skip
    batch = torch.randint(0, 10, (4, 3))
    if error is None:
        assert rule.step(batch)["d"] > 0
    else:
        with pytest.raises(error, match=message):
            rule.step(batch)


def test_activation_checkpointing_recomputes_at_the_perturbed_weights(corpus, tmp_path):
    """The restore runs after the descent backward, so recomputed activations see θ + e as the forward did."""
    extra = ["optimizer.base=sgd"]
    plain = trajectory(train(small_config(corpus, tmp_path / "plain", "tram-prev", steps=3, extra=extra)))
    ac = trajectory(
        train(
            small_config(
                corpus, tmp_path / "ac", "tram-prev", steps=3, extra=extra + ["trainer.activation_checkpointing=true"]
            )
        )
    )
    assert max_param_diff(plain["params"], ac["params"]) < EXACT_ABS


def test_fp16_overflow_in_the_ascent_pass_skips_the_whole_step(corpus, tmp_path, poison_gradients):
    config = small_config(corpus, tmp_path / "fp16", "tram-prev", steps=1, precision="16-mixed")
    passes = poison_gradients(when=lambda ctx: ctx.step == 1)
    run = train(config)
    assert run.history[0]["skipped"] is True
    assert passes == [1]  # the ascent pass only: no descent pass ran
    assert run.fabric.strategy.precision.scaler.get_scale() < 2.0**16  # backed off
    initial = initial_params(config)
    assert max_param_diff(trajectory(run)["params"], initial) == 0.0  # no update, no NaN
    assert all(torch.equal(b, p.detach()) for b, p in zip(run.rule.backup, run.model.parameters(), strict=True))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_rules_train_in_mixed_precision(corpus, tmp_path, precision):
    for rule in ("tram-prev", "fsam"):
        config = small_config(corpus, tmp_path / f"{rule}-{precision}", rule, steps=2, precision=precision,
                              extra=["optimizer.lr=0.001"])  # fmt: skip
        run = train(config)
        assert all(math.isfinite(s["loss"]) and not s["skipped"] for s in run.history)
        assert all(torch.isfinite(p).all() for p in trajectory(run)["params"].values())


def test_target_forward_replays_the_dropout_masks(corpus, tmp_path):
    """Step 1 of tram-prev compares θ_0 with itself: with dropout 0.1 and the target forward under the ascent
    pass's own dropout masks, d is exactly 0; with target_mode=eval (the published code) it is the dropout gap."""
    replayed = train(small_config(corpus, tmp_path / "train", "tram-prev", steps=1, extra=["model.dropout=0.1"]))
    assert replayed.history[0]["d"] == 0.0
    published = train(
        small_config(
            corpus,
            tmp_path / "eval",
            "tram-prev",
            steps=1,
            extra=["model.dropout=0.1", "optimizer.target_mode=eval"],
        )
    )
    assert published.history[0]["d"] > 1e-4
