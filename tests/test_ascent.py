"""The ascent in the shapes real models have and toy ones lack (optim/geometry.py, optim/weights.py): several
multi-tensor groups, a parameter without a gradient before the others, frozen parameters, ASAM's original T by
parameter name, an fp16 loss scale. Float64, against a reference computed here from the gradients."""

import pytest
import torch
import torch.nn as nn

import fabric_tram.optim.weights as weights
from fabric_tram.bench.step_cost import RULES
from fabric_tram.loss import cross_entropy_sum
from fabric_tram.optim.api import UpdateRuleLoop

VOCAB = 13


class Several(nn.Module):
    """Tensors of unequal sizes; ``unused`` (trainable, never in the forward: no gradient) comes before the ones
    that have one, ``frozen`` is not trainable; the token embedding is the noise rules' input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.unused = nn.Linear(3, 3)
        self.emb = nn.Embedding(VOCAB, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.lin = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, VOCAB)
        self.double()

    def forward(self, ids):
        return self.head(self.norm(torch.tanh(self.lin(self.frozen(self.emb(ids))))))


def batch(step: int) -> dict:
    ids = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "example_index": torch.arange(4)}


def loss_fn(seen=None):
    def loss(model, b, **kw):
        if seen is not None:
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return cross_entropy_sum(model(b["input_ids"]), b["labels"])

    return loss


HYPER = {  # enough for every rule to run a few steps here: a short calibration, the noise on the embedding
    "tram-prev": {"calibration_steps": 2},
    "tram-init": {"calibration_steps": 2},
    "tram-x": {"calibration_steps": 1, "embedding_module": "emb"},
    "tram-fisher": {"embedding_module": "emb"},
    "r3f": {"embedding_module": "emb"},
    "asam+r3f": {"embedding_module": "emb"},
}


def trajectory(name: str, steps: int = 4, scaler=None) -> tuple[list[dict], dict]:
    model = Several()
    params = [p for p in model.parameters() if p.requires_grad]
    rule = UpdateRuleLoop(name, model, torch.optim.Adam(params, lr=1e-2), loss_fn(), grad_clip=0.5, scaler=scaler,
                          **HYPER.get(name, {}))  # fmt: skip
    stats = [rule.step(batch(s)) for s in range(steps)]
    return stats, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_groups_cover_every_tensor_once_in_order_within_the_byte_limit(monkeypatch):
    monkeypatch.setattr(weights, "GROUP_BYTES", 1000)
    tensors = [torch.zeros(n, dtype=torch.float64) for n in (3, 100, 30, 200, 1, 124, 125, 7)]  # 8 bytes each
    index = list(range(len(tensors)))
    parts = list(weights.groups(tensors, index))
    assert [i for _, idx in parts for i in idx] == index  # nothing dropped, nothing twice, aligned lists
    assert all(t is tensors[i] for ts, idx in parts for t, i in zip(ts, idx, strict=True))
    assert len(parts) > 3
    for ts, _ in parts:  # within the limit, or a single tensor larger than it
        assert sum(t.numel() * 8 for t in ts) <= 1000 or len(ts) == 1


@pytest.mark.parametrize("name", ["adam", *RULES])
def test_every_rule_steps_the_same_in_one_multi_tensor_group_and_in_many(name, monkeypatch):
    """A model over ~67M float32 parameters has several groups: every multi-tensor operation (the climb, the
    restore, the target's swaps, the EMA, clipping) must then still touch every tensor."""
    one_stats, one = trajectory(name)
    monkeypatch.setattr(weights, "GROUP_BYTES", 600)  # 8 x 16 float64 = 1 KiB: the larger tensors stand alone
    many_stats, many = trajectory(name)
    for key in ("loss", "d", "radius", "Tg_norm", "e_norm", "grad_norm"):
        a, b = [s.get(key) for s in one_stats], [s.get(key) for s in many_stats]
        # a statistic the rule does not report is absent in both runs (pytest >= 9.2 refuses approx on None)
        assert [x is None for x in a] == [x is None for x in b], (name, key)
        present = [i for i, x in enumerate(a) if x is not None]
        assert [a[i] for i in present] == pytest.approx([b[i] for i in present], rel=1e-12, abs=1e-15), (name, key)
    for n, p in one.items():
        torch.testing.assert_close(many[n], p, rtol=1e-12, atol=1e-15, msg=f"{name}: {n}")
    assert torch.equal(one["frozen.weight"], Several().frozen.weight)  # never moved
    assert torch.equal(one["unused.weight"], Several().unused.weight)  # no gradient: never moved


def reference_ascent(model: Several, rho: float, eta: float, original: bool) -> dict[str, torch.Tensor]:
    """ASAM's e = ρ T² g / ‖T g‖ over the parameters with a gradient, T = |θ| + η, and, as the original ASAM
    code, T only on the parameters named '*weight*' (T = 1 elsewhere)."""
    model.zero_grad()
    loss_fn()(model, batch(0)).loss_sum.backward()
    with_grad = {n: p for n, p in model.named_parameters() if p.grad is not None}
    t = {
        n: (p.detach().abs() + eta) if (not original or "weight" in n) else torch.ones_like(p)
        for n, p in with_grad.items()
    }
    norm = torch.sqrt(sum(((t[n] * p.grad) ** 2).sum() for n, p in with_grad.items()))
    return {n: rho * t[n] ** 2 * p.grad / norm for n, p in with_grad.items()}


@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize("group_bytes", [1 << 28, 600])
def test_asams_perturbation_is_t_squared_g_by_parameter_whatever_the_groups(original, group_bytes, monkeypatch):
    monkeypatch.setattr(weights, "GROUP_BYTES", group_bytes)
    expected = reference_ascent(Several(), rho=0.5, eta=0.01, original=original)
    model, seen = Several(), []
    params = [p for p in model.parameters() if p.requires_grad]
    rule = UpdateRuleLoop("asam", model, torch.optim.SGD(params, lr=0.1), loss_fn(seen), rho=0.5, eta=0.01,
                          asam_like_original=original)  # fmt: skip
    rule.step(batch(0))
    at_w, at_w_plus_e = seen[0], seen[1]  # the ascent pass ran at w, the descent pass at w + e
    for n in at_w:
        e = at_w_plus_e[n] - at_w[n]
        torch.testing.assert_close(e, expected.get(n, torch.zeros_like(e)), rtol=1e-9, atol=1e-15, msg=n)


@pytest.mark.parametrize("name", ["fsam", "asam", "tram-fisher"])
def test_an_fp16_loss_scale_changes_nothing_in_e_or_the_logged_norms(name):
    """The ascent gradients are the scaled ones under a GradScaler: e must be formed from them divided by the
    scale (a power of two, so exactly), or FSAM's f = 1 + η g² and every logged ‖T g‖ are off."""
    plain_stats, plain = trajectory(name, steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
    scaled_stats, scaled = trajectory(name, steps=2, scaler=scaler)
    for key in ("loss", "Tg_norm", "e_norm", "grad_norm"):
        assert [s[key] for s in scaled_stats] == pytest.approx([s[key] for s in plain_stats], rel=1e-12), key
    for n, p in plain.items():
        torch.testing.assert_close(scaled[n], p, rtol=1e-12, atol=1e-15, msg=n)
