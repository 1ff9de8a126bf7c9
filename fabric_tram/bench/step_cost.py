"""Step cost of every update rule relative to adam, measured interleaved in one run, beside its floor.

The floor of a rule is (forward-with-gradient passes × T_fb + no-grad forward passes × T_f) / T_fb, with T_fb
(forward + backward) and T_f (no-grad forward) measured in the same run on the same model and batch; a forward
with gradient counts its own backward, so r3f's backward through two graphs counts twice.
"""

from __future__ import annotations

import torch

from fabric_tram.bench.common import (
    arguments,
    interleave,
    loss_fn,
    make_batch,
    make_model,
    pass_floor,
    pass_floors,
    table,
    write_json,
)
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.registry import OPTIMIZERS, load_builtins

RULES = [
    "sam",
    "asam",
    "fsam",
    "tram-prev",
    "tram-init",
    "tram-x",
    "tram-fisher",
    "trpo",
    "r3f",
    "mesa",
    "asam+trpo",
    "asam+r3f",
    "asam+mesa",
]
TARGET = 1.05  # within 5% of the floor


def main() -> dict:
    args = arguments(__doc__.splitlines()[0], lambda p: p.add_argument("--rules", default=",".join(RULES)), timing=True)
    load_builtins()
    rules = args.rules.split(",")
    batch = make_batch(args.size, args.device)
    loss = loss_fn(args.precision)
    loops = {}
    for name in ["adam", *rules]:
        model = make_model(args.size, args.device)
        loops[name] = UpdateRuleLoop(name, model, torch.optim.Adam(model.parameters(), lr=1e-5), loss)
    candidates = pass_floors(args.size, args.device, loss, batch)
    for name, loop in loops.items():
        candidates[name] = (lambda rule_loop: lambda: rule_loop.step(batch))(loop)
    median = interleave(candidates, args.device, args.repeats)
    t_fb, t_f = median["fwd+bwd"], median["no-grad fwd"]
    rows, results = [], {}
    for name in rules:
        fwd, nograd, bwd = OPTIMIZERS.get(name).target.passes
        floor = pass_floor(fwd, nograd, t_fb, t_f)
        ratio = median[name] / median["adam"]
        # the same floor in seconds, without adam as the unit (a noisy adam median moves every ratio at once)
        over_seconds = median[name] / (fwd * t_fb + nograd * t_f)
        results[name] = {
            "ratio_to_adam": ratio,
            "floor": floor,
            "over_floor": ratio / floor,
            "over_floor_in_seconds": over_seconds,
            "passes": [fwd, nograd, bwd],
            "seconds": median[name],
        }
        within = "yes" if ratio / floor <= TARGET else "no"
        rows.append(
            [name, ratio, floor, f"{100 * (ratio / floor - 1):+.1f}%", within, f"{100 * (over_seconds - 1):+.1f}%"]
        )
    print(
        f"size {args.size}, {args.device}, {args.precision}, allocator: {args.allocator}; "
        f"adam step {median['adam'] * 1e3:.1f} ms, "
        f"fwd+bwd {t_fb * 1e3:.1f} ms, no-grad fwd {t_f * 1e3:.1f} ms (medians of {args.repeats} interleaved rounds)"
    )
    print(table(["rule", "step / adam", "floor", "over floor", "within 5%", "step / floor in seconds"], rows))
    payload = {
        "size": args.size,
        "device": args.device,
        "precision": args.precision,
        "allocator": args.allocator,
        "adam_seconds": median["adam"],
        "fwd_bwd_seconds": t_fb,
        "no_grad_fwd_seconds": t_f,
        "rules": results,
    }
    print(f"written: {write_json(args.out, 'step_cost', payload)}")
    return payload


if __name__ == "__main__":
    main()
