"""The step contract (optim/step.py) on its own: normalisation by the step's global target count times the
world size, the per-rank normalisation of m-sharpness, the regulariser term, and the pass counts."""

import pytest
import torch

from fabric_tram.loss import LossOutput
from fabric_tram.optim.api import LocalFabric
from fabric_tram.optim.step import StepContext


class TwoRankFabric(LocalFabric):
    """One rank of a pretend 2-rank job whose other rank holds twice this rank's targets: its all-reduce of a
    count returns three times the local one (and DDP would average the two ranks' gradients)."""

    world_size = 2

    def all_reduce(self, tensor, reduce_op="sum"):
        return tensor * 3


def weighted_sum_loss(model, batch, **kw):
    # loss_sum = Σ_i w · x_i over the batch's targets: its gradient is Σ x_i, easy to state by hand
    return LossOutput(loss_sum=(model.weight * batch).sum(), count=torch.tensor(float(batch.numel())))


def context(fabric, batches, **kw):
    model = torch.nn.Linear(1, 1, bias=False).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return model, StepContext(fabric=fabric, model=model, optimizer=optimizer, loss_fn=weighted_sum_loss,
                              micro_batches=batches, step=1, **kw)  # fmt: skip


BATCHES = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)]


def test_each_backward_is_the_local_sum_over_the_global_count_times_the_world_size():
    n_local = torch.tensor(3.0, dtype=torch.float64)
    model, ctx = context(TwoRankFabric(torch.device("cpu")), BATCHES, n_local=n_local, n_global=3 * n_local)
    result = ctx.forward_backward()
    # Σ x = 6 over 3 local targets of 9 in all; DDP would average over W = 2, so the local gradient is 2 · 6 / 9
    assert float(model.weight.grad) == pytest.approx(2 * 6 / 9, rel=1e-15)
    assert result.loss == pytest.approx(3 * float(model.weight.detach()) * 6 / 9, rel=1e-15)  # all-reduced sum / N
    assert ctx.passes == {"forward": 1, "no_grad_forward": 0, "backward": 1}


def test_per_rank_normalisation_is_this_ranks_own_mean_gradient():
    """m-sharpness: no averaging over ranks and this rank's count only (the global normalisation gives 2/3 of it)."""
    n_local = torch.tensor(3.0, dtype=torch.float64)
    model, ctx = context(TwoRankFabric(torch.device("cpu")), BATCHES, n_local=n_local, n_global=3 * n_local)
    ctx.forward_backward(per_rank=True)
    assert float(model.weight.grad) == pytest.approx(6 / 3, rel=1e-15)


def test_one_micro_batch_takes_its_count_from_the_loss_output_and_several_need_it_given():
    model, ctx = context(LocalFabric(torch.device("cpu")), BATCHES[:1])
    ctx.forward_backward()
    assert float(ctx.n_global) == 2.0 and float(model.weight.grad) == pytest.approx(3 / 2, rel=1e-15)
    _, ctx = context(LocalFabric(torch.device("cpu")), BATCHES)
    with pytest.raises(ValueError, match="pass their global target count"):
        ctx.forward_backward()


def test_the_regulariser_is_differentiated_but_not_logged_as_the_loss():
    model, ctx = context(LocalFabric(torch.device("cpu")), BATCHES[:1])

    def objective(batch):
        out = ctx.forwards.forward(batch)
        return out.with_regulariser(10.0 * model.weight.sum() ** 2)

    result = ctx.forward_backward(objective)
    w = float(model.weight.detach())
    assert result.loss == pytest.approx(3 * w / 2, rel=1e-15)
    assert result.regulariser == pytest.approx(10 * w**2 / 2, rel=1e-15)
    assert float(model.weight.grad) == pytest.approx((3 + 20 * w) / 2, rel=1e-15)


def test_passes_count_every_forward_over_the_micro_batches():
    _, ctx = context(LocalFabric(torch.device("cpu")), BATCHES, n_global=torch.tensor(3.0, dtype=torch.float64))

    def objective(batch):  # a target forward and two forwards with gradient per micro-batch (as r3f + a target)
        ctx.forwards.no_grad_forward(batch)
        out = ctx.forwards.forward(batch)
        return out.with_regulariser(ctx.forwards.forward(batch).loss_sum)

    ctx.forward_backward(objective)
    ctx.forward_backward()
    assert ctx.passes == {"forward": 3, "no_grad_forward": 1, "backward": 3}  # 2 graphs, then 1


def test_all_finite_is_false_for_any_non_finite_value_among_tensors_and_numbers():
    """The step's one host decision: every value finite, tensors (any float dtype) and Python numbers alike; None
    is no value. Opposite infinities (whose sum is nan) and a lone nan among finite values are caught."""
    from fabric_tram.optim.step import all_finite

    inf, nan = float("inf"), float("nan")
    t = torch.tensor
    assert all_finite(t(1.0), t(2.5, dtype=torch.float64), 0.5, None)
    assert all_finite(None) and all_finite(3.0) and all_finite(t(65504.0, dtype=torch.float16), t(3e38))
    for values in (
        (t(inf), t(1.0)),
        (t(1.0), t(nan)),
        (t(inf), t(-inf)),
        (t(1.0), nan),
        (inf,),
        (t(1.0, dtype=torch.float16) * 1e5, t(0.0)),
        (t(2.0), None, t(-inf, dtype=torch.bfloat16)),
    ):
        assert not all_finite(*values), values  # fmt: skip
