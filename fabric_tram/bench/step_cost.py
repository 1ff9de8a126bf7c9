"""Step cost of every update rule relative to adam, measured interleaved in one run, beside its floor.

The floor of a rule is (forward-with-gradient passes × T_fb + no-grad forward passes × T_f) / T_fb, with T_fb
(forward + backward) and T_f (no-grad forward) measured in the same run on the same model and batch; a forward
with gradient counts its own backward, so r3f's backward through two graphs counts twice.

A rule that compares output distributions also computes divergences over the whole output (TRAM's d, a
regulariser's term and its gradient): compute the pass floor does not count, large where the output head is
most of the model (``--size tiny``: 256 positions × 4,096 words against 0.4M weights). Each kind is timed in the
same run at the size's output ("floor + divergences"), so that what a step adds beyond both is the engine's.

A rule may carry settings, ``name:key=value:key=value`` (``tram-prev:ascent_every=4:radius_every=4``): it is then
timed over blocks of as many steps as its schedules take to repeat, its floor from its passes averaged over a
block. The TRAM rules run at a fixed ``radius_scale`` of 1 unless one is given (calibration would take d on
every one of its steps, whatever ``radius_every`` says).

    python benchmarks/step_cost.py --size small --rules tram-prev,tram-prev:ascent_every=4:radius_every=4
"""

from __future__ import annotations

import math

import yaml

from fabric_tram.bench.common import (
    arguments,
    divergence_kinds,
    divergence_label,
    divergence_seconds,
    divergence_work,
    engine_optimizer,
    interleave,
    loss_fn,
    make_batch,
    make_model,
    operators_per_call,
    pass_floor,
    pass_floors,
    table,
    write_json,
)
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.registry import load_builtins

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


def parse_rule(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value:...`` -> (the rule's name, its settings), TRAM at a fixed scale of 1 unless set."""
    name, *settings = spec.split(":")
    hyper = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in settings)}
    if name.startswith("tram-") and name != "tram-fisher":
        hyper.setdefault("radius_scale", 1.0)
    return name, hyper


def main() -> dict:
    args = arguments(__doc__.splitlines()[0], lambda p: p.add_argument("--rules", default=",".join(RULES)), timing=True)
    load_builtins()
    rules = args.rules.split(",")
    batch = make_batch(args.size, args.device)
    loss = loss_fn(args.precision)
    loops, blocks = {}, {}
    for spec in ["adam", *rules]:
        name, settings = parse_rule(spec)
        model = make_model(args.size, args.device)
        loops[spec] = UpdateRuleLoop(name, model, engine_optimizer(model.parameters(), lr=1e-5), loss, **settings)
        blocks[spec] = math.lcm(settings.get("ascent_every", 1), settings.get("radius_every", 1))
    candidates = pass_floors(args.size, args.device, loss, batch)
    kinds = {
        spec: divergence_kinds(loop.rule, *type(loop.rule).mean_passes(loop.rule.config)[:2])
        for spec, loop in loops.items()
    }
    divergences = divergence_work(kinds, args.size, args.device, loss, batch)
    candidates.update(divergences)
    for spec, loop in loops.items():
        candidates[spec] = (lambda rule_loop, n: lambda: [rule_loop.step(batch) for _ in range(n)])(loop, blocks[spec])
    block_median = interleave(candidates, args.device, args.repeats)
    operators = {spec: operators_per_call(candidates[spec]) for spec in loops}  # one more block each, counted
    median = {spec: block_median[spec] / blocks.get(spec, 1) for spec in block_median}  # seconds per step
    t_fb, t_f = median["fwd+bwd"], median["no-grad fwd"]
    rows, results = [], {}
    for name in rules:
        loop = loops[name]
        fwd, nograd, bwd = type(loop.rule).mean_passes(loop.rule.config)
        floor = pass_floor(fwd, nograd, t_fb, t_f)
        ratio = median[name] / median["adam"]
        # its divergences' own compute, priced in the same run
        floor_with_divergences = floor + divergence_seconds(kinds[name], median) / t_fb
        # the same floor in seconds, without adam as the unit (a noisy adam median moves every ratio at once)
        over_seconds = median[name] / (fwd * t_fb + nograd * t_f)
        results[name] = {
            "ratio_to_adam": ratio,
            "floor": floor,
            "over_floor": ratio / floor,
            "over_floor_in_seconds": over_seconds,
            "passes": [fwd, nograd, bwd],
            "seconds": median[name],
            "divergences": {divergence_label(kind): count for kind, count in kinds[name].items()},
            "operators_per_step": operators[name][0] / blocks[name],
            "metadata_operators_per_step": operators[name][1] / blocks[name],
            "floor_with_divergences": floor_with_divergences,
            "over_floor_with_divergences": ratio / floor_with_divergences,
        }
        within = "yes" if ratio / floor <= TARGET else "no"
        rows.append(
            [
                name,
                ratio,
                floor,
                f"{100 * (ratio / floor - 1):+.1f}%",
                within,
                f"{100 * (over_seconds - 1):+.1f}%",
                floor_with_divergences,
                f"{100 * (ratio / floor_with_divergences - 1):+.1f}%",
                f"{operators[name][0] / blocks[name]:,.0f}",
            ]
        )
    print(
        f"size {args.size}, {args.device}, {args.precision}, allocator: {args.allocator}; "
        f"adam step {median['adam'] * 1e3:.1f} ms, "
        f"fwd+bwd {t_fb * 1e3:.1f} ms, no-grad fwd {t_f * 1e3:.1f} ms (medians of {args.repeats} interleaved rounds)"
    )
    headers = ["rule", "step / adam", "floor", "over floor", "within 5%", "step / floor in seconds"]
    print(table([*headers, "floor + divergences", "over it", "operators / step"], rows))
    print(f"adam: {operators['adam'][0] / blocks['adam']:,.0f} operators a step (counted, not timed)")
    print(
        "divergences, each its value and gradient at the size's output: "
        + ", ".join(f"{label} {median[label] * 1e3:.2f} ms" for label in divergences)
    )
    payload = {
        "size": args.size,
        "device": args.device,
        "precision": args.precision,
        "allocator": args.allocator,
        "adam_seconds": median["adam"],
        "adam_operators_per_step": operators["adam"][0] / blocks["adam"],
        "fwd_bwd_seconds": t_fb,
        "no_grad_fwd_seconds": t_f,
        "divergence_seconds": {label: median[label] for label in divergences},
        "rules": results,
    }
    print(f"written: {write_json(args.out, 'step_cost', payload)}")
    return payload


if __name__ == "__main__":
    main()
