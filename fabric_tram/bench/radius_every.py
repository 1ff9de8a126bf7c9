"""Step cost of tram-prev with its radius amortised (``optimizer.radius_every=N``) against adam and asam.

d, and the target forward it needs, are taken on one step in N; the others reuse the last radius, so a step
costs on average (2 T_fb + T_f / N) / T_fb of a forward + backward instead of (2 T_fb + T_f) / T_fb. Each
candidate is timed as a block of N consecutive steps (one that measures d, N − 1 that reuse it), interleaved
with adam, asam and the passes the floor is made of; the table divides by N.
"""

from __future__ import annotations

from fabric_tram.bench.common import (
    arguments,
    engine_optimizer,
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
from fabric_tram.registry import load_builtins

EVERY = (1, 2, 4, 8, 16)


def block_of_steps(loop: UpdateRuleLoop, batch: dict, n: int):
    def run():
        for _ in range(n):
            loop.step(batch)

    return run


def main() -> dict:
    def extra(parser):
        parser.add_argument("--every", default=",".join(map(str, EVERY)), help="values of radius_every")

    args = arguments(__doc__.splitlines()[0], extra, timing=True)
    load_builtins()
    every = [int(n) for n in args.every.split(",")]
    batch = make_batch(args.size, args.device)
    loss = loss_fn(args.precision)

    def loop(name, **hyper):
        model = make_model(args.size, args.device)
        return UpdateRuleLoop(name, model, engine_optimizer(model.parameters(), lr=1e-5), loss, **hyper)

    candidates = pass_floors(args.size, args.device, loss, batch)
    candidates["adam"] = block_of_steps(loop("adam"), batch, 1)
    candidates["asam"] = block_of_steps(loop("asam"), batch, 1)
    loops = {n: loop("tram-prev", radius_every=n, radius_scale=1.0) for n in every}  # a fixed scale: no calibration
    for n, rule_loop in loops.items():
        candidates[f"every={n}"] = block_of_steps(rule_loop, batch, n)
    median = interleave(candidates, args.device, args.repeats, warmup=1)
    t_fb, t_f, adam = median["fwd+bwd"], median["no-grad fwd"], median["adam"]
    rows, results = [], {}
    for n in every:
        step = median[f"every={n}"] / n
        floor = pass_floor(2, 1 / n, t_fb, t_f)
        results[n] = {"seconds_per_step": step, "ratio_to_adam": step / adam, "floor": floor, "ratio_to_asam":
                      step / median["asam"]}  # fmt: skip
        rows.append([n, step * 1e3, step / adam, floor, step / median["asam"]])
    print(
        f"size {args.size}, {args.device}, {args.precision}, allocator: {args.allocator}; adam step {adam * 1e3:.1f} "
        f"ms, asam step {median['asam'] * 1e3:.1f} ms, fwd+bwd {t_fb * 1e3:.1f} ms, no-grad fwd {t_f * 1e3:.1f} ms "
        f"(medians of {args.repeats} interleaved rounds)"
    )
    print(table(["radius_every", "ms per step", "step / adam", "floor (2 + f0/N)", "step / asam"], rows))
    payload = {
        "size": args.size,
        "device": args.device,
        "precision": args.precision,
        "allocator": args.allocator,
        "adam_seconds": adam,
        "asam_seconds": median["asam"],
        "fwd_bwd_seconds": t_fb,
        "no_grad_fwd_seconds": t_f,
        "every": results,
    }
    print(f"written: {write_json(args.out, 'radius_every', payload)}")
    return payload


if __name__ == "__main__":
    main()
