"""Scale equivalence (a): k micro-batches of B/k equal one batch of B, with token-weighted normalisation."""

import pytest
from helpers import max_param_diff, small_config, trajectory

from fabric_tram.engine.trainer import train
from fabric_tram.optim import step as step_module

TOL = {"sgd": 2e-6, "adam": 2e-5}  # fp32; Adam divides by sqrt(v): relative errors of ~1e-7 grow to ~1e-6


def _run(corpus, tmp_path, name, optimizer, micro, accumulate):
    return trajectory(train(small_config(corpus, tmp_path / name, optimizer, micro=micro, accumulate=accumulate)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulation_matches_one_big_batch(corpus, tmp_path, optimizer):
    one = _run(corpus, tmp_path, "k1", optimizer, micro=8, accumulate=1)
    four = _run(corpus, tmp_path, "k4", optimizer, micro=2, accumulate=4)
    for a, b in zip(one["steps"], four["steps"], strict=True):
        assert a["n_targets"] == b["n_targets"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    diff = max_param_diff(one["params"], four["params"])
    assert diff < TOL[optimizer]
    # the padded micro-batches really hold unequal token counts, so the weighting is exercised
    assert len({s["n_targets"] for s in one["steps"]}) > 1


def _per_micro_batch_mean(self, objective=None, per_rank=False):
    """The classic mistake: average each micro-batch's loss, then divide by k."""
    k = len(self.micro_batches)
    total = 0.0
    for batch in self.micro_batches:
        out = self.loss_fn(self.model, batch)
        self.fabric.backward(out.loss_sum / out.count / k)
        total += float(out.loss_sum.detach())
    return step_module.PassResult(total / float(self.n_global), None)


def test_negative_control_wrong_normalisation_breaks_equivalence(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(step_module.StepContext, "forward_backward", _per_micro_batch_mean)
    one = _run(corpus, tmp_path, "k1", "sgd", micro=8, accumulate=1)
    four = _run(corpus, tmp_path, "k4", "sgd", micro=2, accumulate=4)
    assert max_param_diff(one["params"], four["params"]) > 100 * TOL["sgd"]
