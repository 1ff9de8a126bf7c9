"""Scale equivalence (a): k micro-batches of B/k equal one batch of B, with token-weighted normalisation
(float64: the comparison is about the algebra; see conftest's tolerances)."""

import pytest
from conftest import EXACT_ABS, assert_histories_match, max_param_diff, small_config, trajectory

from fabric_tram.engine.trainer import train
from fabric_tram.optim import step as step_module


def _run(corpus, tmp_path, name, optimizer, micro, accumulate):
    return trajectory(train(small_config(corpus, tmp_path / name, optimizer, micro=micro, accumulate=accumulate)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulation_matches_one_big_batch(corpus, tmp_path, optimizer):
    one = _run(corpus, tmp_path, "k1", optimizer, micro=8, accumulate=1)
    four = _run(corpus, tmp_path, "k4", optimizer, micro=2, accumulate=4)
    assert [s["n_targets"] for s in one["steps"]] == [s["n_targets"] for s in four["steps"]]
    assert_histories_match(one["steps"], four["steps"], ("loss", "grad_norm"), label=optimizer)
    assert max_param_diff(one["params"], four["params"]) < EXACT_ABS
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
    assert max_param_diff(one["params"], four["params"]) > 1e6 * EXACT_ABS
