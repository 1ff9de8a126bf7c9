"""The GPU suite: one command, one table, one JSON (about 6 minutes on one H100/H200).

    python benchmarks/gpu_suite.py                                   # on a GPU: GPT-2 124M, 1,024 tokens a row
    python benchmarks/gpu_suite.py --device cpu --size tiny --steps 2 --compile-backend aot_eager
                                                                     # the same code path on a CPU (the tests)

Side by side, bf16-mixed, our GPT2 module, the bundled demo text (no download), random weights, at the micro-batch
that fills the device (where users run): on a GPU, the largest of up to 64 rows for GPT-2 124M (llm.c's 64 x 1,024)
and of up to 16 rows for GPT2-XL (llm.c's 16 x 1,024), as ``trainer.micro_batch_size=auto`` chooses it from the
memory estimate; each row of the table names the batch it used.

1. a bare eager loop and a bare compiled loop (fused AdamW on a GPU): tokens/s and MFU;
2. the trainer's adam with strategy auto and fsdp, eager and compiled, and with the chunked cross-entropy
   (``task.cross_entropy=chunked``, strategy auto): tokens/s against the bare loop;
3. every update rule's step against its pass floor (forward-with-gradient passes × T_fb + no-grad forwards × T_f);
4. memory: the peak of tram-prev over adam, beside parameter bytes + one micro-batch's logits in bf16;
5. GPT2-XL on one device without FSDP, adam and tram-prev, global batch 16 x 1,024 tokens with the filling
   micro-batch and no activation checkpointing where one row fits without it (with it otherwise): tokens/s, MFU,
   HFU (the recomputed forwards counted), peak memory beside ``fabric-tram estimate``'s.

MFU divides by our table of dense peaks (engine/monitor.py) and counts every pass a rule runs; HFU adds the
forwards activation checkpointing recomputes (the blocks', not the output head's).
"""

from __future__ import annotations

import argparse
import time

import torch

from fabric_tram.bench.common import (
    SIZES,
    divergence_kinds,
    divergence_seconds,
    divergence_work,
    engine_optimizer,
    loss_fn,
    make_batch,
    make_model,
    operators_per_call,
    pass_floor,
    pass_floors,
    synchronize,
    table,
    trainer_model_settings,
    write_json,
)
from fabric_tram.bench.step_cost import RULES
from fabric_tram.config import ConfigError, load_config
from fabric_tram.contracts import unwrap
from fabric_tram.data.batching import StepSampler
from fabric_tram.engine.batch_size import resolve_batch_size
from fabric_tram.engine.batches import StepBatches
from fabric_tram.engine.estimate import estimate
from fabric_tram.engine.monitor import available_flops, flops_per_step
from fabric_tram.engine.setup import compile_blocks, setup
from fabric_tram.engine.trainer import training_step
from fabric_tram.loss import IGNORE_INDEX
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.optim.update_rule import Passes, rule_class


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="gpt2", choices=sorted(SIZES), help="the model of parts 1-4")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: the largest of up to 64 "
                        "that the estimate fits on a GPU; the size's on a CPU)")  # fmt: skip
    parser.add_argument(
        "--xl", default=None, help="the GPT-2 preset of part 5 (default: gpt2-xl on a GPU, tiny on a CPU)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after 3 warm-up)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    args.xl = args.xl or ("gpt2-xl" if args.device.startswith("cuda") else "tiny")  # XL does not fit a small CPU
    return args


_START = time.perf_counter()


def progress(what: str, seconds: float) -> None:
    """One line per measurement as it is made, flushed: a run stopped at a time limit still shows its figures."""
    print(f"[{time.perf_counter() - _START:6.0f} s] {what}: {seconds * 1e3:.2f} ms/step", flush=True)


def timed_steps(step, steps: int, device: str, warmup: int = 3) -> float:
    """Seconds per step over ``steps`` steps (after ``warmup``), the device synchronised once at each end."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def bare_loop(args, batch: dict, compiled: bool) -> float:
    model = make_model(args.size, args.device)
    if compiled:
        compile_blocks(model, args.compile_backend)
    params = list(model.parameters())
    optimizer = engine_optimizer(params, torch.optim.AdamW, lr=1e-5)
    loss = loss_fn("bf16-mixed")

    def step():
        loss(model, batch).loss_sum.div(batch["labels"].numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, args.steps, args.device)


XL_GLOBAL_BATCH = 16  # llm.c's GPT2-XL batch per GPU (scripts/run_gpt2_1558M.sh), rows of 1,024 tokens
FILLING_ROWS = 64  # llm.c's GPT-2 124M batch per GPU (scripts/run_gpt2_124M.sh)


def trainer_config(args, preset_or_size: str, rule: str, strategy: str, compiled: bool, xl: bool = False,
                   rows: int | None = None, checkpointing: bool = False, extra: tuple = ()):  # fmt: skip
    """The trainer's config for a measurement: ``rows`` per micro-batch; for GPT2-XL (``xl``) the micro-batch is
    left to ``trainer.micro_batch_size=auto`` within a global batch of 16 rows (4 of 64 tokens on a CPU)."""
    if xl:
        block = 1024 if args.device.startswith("cuda") else 64
        global_batch = XL_GLOBAL_BATCH if args.device.startswith("cuda") else 4
        model = ["model.name=gpt2", f"model.preset={preset_or_size}", "model.dropout=0.0", "task.name=lm",
                 "task.data_dir=demo", "task.tokenizer=gpt2", f"task.block_size={block}"]  # fmt: skip
        batch = ["trainer.micro_batch_size=auto", f"trainer.global_batch_size={global_batch}"]
    else:
        model = trainer_model_settings(preset_or_size)
        batch = [f"trainer.micro_batch_size={rows or SIZES[preset_or_size][5]}"]
    settings = [
        *model, f"optimizer.name={rule}", "optimizer.lr=1e-5", "trainer.grad_clip=1.0",
        *batch, "trainer.precision=bf16-mixed", f"trainer.accelerator={args.device}",
        "trainer.devices=1", f"trainer.strategy={strategy}", f"trainer.compile={compiled}",
        f"trainer.compile_backend={args.compile_backend}", "trainer.max_steps=1000000", "trainer.log_every=1000000",
        "trainer.progress_bar=false", f"trainer.run_dir={args.out}/gpu_suite-run",
        f"trainer.activation_checkpointing={checkpointing}", *extra,
    ]  # fmt: skip
    return load_config(None, settings)


def filling_rows(args) -> int:
    """Rows per micro-batch for parts 1-4: ``--batch``, or on a GPU the largest of up to 64 that the trainer's
    adam fits (the memory estimate at 90% of the free memory, as micro_batch_size=auto), or the size's on a CPU."""
    if args.batch or not args.device.startswith("cuda"):
        return args.batch or SIZES[args.size][5]
    config = trainer_config(args, args.size, "adam", "auto", False)
    config.trainer.micro_batch_size, config.trainer.global_batch_size = "auto", FILLING_ROWS
    print(resolve_batch_size(config, 1, torch.device(args.device)), flush=True)
    return config.trainer.micro_batch_size


def xl_config(args, rule: str):
    """GPT2-XL's measurement: without activation checkpointing where one row fits without it, with it otherwise;
    the micro-batch then the largest that fits (its line printed)."""
    for checkpointing in (False, True):
        config = trainer_config(args, args.xl, rule, "auto", False, xl=True, checkpointing=checkpointing)
        try:
            print(resolve_batch_size(config, 1, torch.device(args.device)), flush=True)
            return config
        except ConfigError as err:
            if checkpointing:
                raise
            print(f"GPT2-XL {rule} without activation checkpointing: {err}; measured with it", flush=True)
    raise AssertionError("unreachable")


def through_trainer(config, args) -> tuple[float, object]:
    """Seconds per step of the trainer's own step (data, the rule's passes, the base step), and the run."""
    run = setup(config, training=True)
    t = config.trainer
    sampler = StepSampler(len(run.task.train_set), t.micro_batch_size, t.accumulate, 1, 0)
    state = {"step": 0}
    batches = StepBatches(run.task, sampler)  # once, as the trainer's step_batches builds it

    def step():
        state["step"] += 1
        training_step(run, batches[state["step"] - 1], state["step"])

    return timed_steps(step, args.steps, args.device), run


def mfu(run, seconds: float, tokens: int, seq_len: int, peak: float | None) -> float | None:
    flops = flops_per_step(unwrap(run.model), tokens, seq_len, run.rule.passes)
    return flops / seconds / peak if flops is not None and peak else None


def hfu(run, seconds: float, tokens: int, seq_len: int, peak: float | None) -> float | None:
    """MFU plus the forwards activation checkpointing recomputes: each backward pass runs the blocks' forward
    again (the output head, 2·C·V per token, is not recomputed)."""
    model_flops = mfu(run, seconds, tokens, seq_len, peak)
    if model_flops is None or not run.config.trainer.activation_checkpointing:
        return model_flops
    model = unwrap(run.model)
    head = 2.0 * model.sizes["n_embd"] * model.sizes["vocab_size"]
    recomputed = (model.forward_flops_per_token(seq_len) - head) * tokens * run.rule.passes.backward
    return model_flops + recomputed / seconds / peak


def main() -> dict:
    args = arguments()
    n_layer, n_head, n_embd, vocab, block, default_batch = SIZES[args.size]
    rows_per_step = filling_rows(args)
    batch = make_batch(args.size, args.device, rows=rows_per_step)
    tokens = rows_per_step * block
    shape = f"{rows_per_step} x {block:,}"
    peak = available_flops(torch.device(args.device), "bf16-mixed")
    with torch.device("meta"):
        model_flops = make_model(args.size, "meta").forward_flops_per_token(block) * tokens * 3  # fwd + bwd (2x)
    results, rows = {}, []
    compile_modes = [False] if args.skip_compile else [False, True]

    # 1-2. bare loop vs trainer
    for compiled in compile_modes:
        name = "compiled" if compiled else "eager"
        bare = bare_loop(args, batch, compiled)
        progress(f"bare loop, {name}", bare)
        results[f"bare_{name}"] = {
            "seconds": bare,
            "tokens_per_s": tokens / bare,
            "mfu": model_flops / bare / peak if peak else None,
        }
        rows.append([f"bare loop, {name}", shape, tokens / bare, results[f"bare_{name}"]["mfu"] or float("nan"), 1.0])
        # the chunked cross-entropy (task.cross_entropy=chunked): kept as a default only if it is measured to help
        for strategy, cross_entropy in (("auto", "plain"), ("fsdp", "plain"), ("auto", "chunked")):
            config = trainer_config(args, args.size, "adam", strategy, compiled, rows=rows_per_step,
                                    extra=(f"task.cross_entropy={cross_entropy}",))  # fmt: skip
            seconds, run = through_trainer(config, args)
            label = f"{strategy}, {name}" + (", chunked CE" if cross_entropy == "chunked" else "")
            progress(f"trainer adam, {label}", seconds)
            key = f"trainer_{strategy}_{name}" + ("_chunked_ce" if cross_entropy == "chunked" else "")
            results[key] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "over_bare": bare / seconds}
            rows.append(
                [
                    f"trainer adam, {label}",
                    shape,
                    tokens / seconds,
                    mfu(run, seconds, tokens, block, peak) or float("nan"),
                    bare / seconds,
                ]
            )

    # 3. every rule against its pass floor (interleaving is not needed on a dedicated GPU)
    loss = loss_fn("bf16-mixed")
    passes = pass_floors(args.size, args.device, loss, batch)
    t_fb, t_f = (timed_steps(passes[name], args.steps, args.device) for name in ("fwd+bwd", "no-grad fwd"))
    steps, kinds, operators = {}, {}, {}
    for name in ["adam", *RULES]:
        model = make_model(args.size, args.device)
        params = list(model.parameters())
        loop = UpdateRuleLoop(name, model, engine_optimizer(params, lr=1e-5), loss, grad_clip=1.0)
        steps[name] = timed_steps(lambda lp=loop: lp.rule.step(context(lp, batch)), args.steps, args.device)
        operators[name] = operators_per_call(lambda lp=loop: lp.rule.step(context(lp, batch)))[0]  # one more step
        passes: Passes = rule_class(name).passes
        kinds[name] = divergence_kinds(loop.rule, passes.forward, passes.no_grad_forward)
        progress(f"rule {name}", steps[name])
        del loop, model, params
    # the divergences' own compute over the output, which the pass floor does not count (step_cost.py)
    work = divergence_work(kinds, args.size, args.device, loss, batch)
    seconds_of = {label: timed_steps(run, args.steps, args.device) for label, run in work.items()}
    results["divergence_seconds"] = seconds_of
    results["adam_operators_per_step"] = operators["adam"]
    rule_rows = []
    for name in RULES:
        passes = rule_class(name).passes
        floor = pass_floor(passes.forward, passes.no_grad_forward, t_fb, t_f)
        ratio = steps[name] / steps["adam"]
        with_divergences = floor + divergence_seconds(kinds[name], seconds_of) / t_fb
        results.setdefault("rules", {})[name] = {
            "ratio_to_adam": ratio,
            "floor": floor,
            "over_floor": ratio / floor,
            "floor_with_divergences": with_divergences,
            "over_floor_with_divergences": ratio / with_divergences,
            "operators_per_step": operators[name],
        }
        rule_rows.append(
            [
                name,
                ratio,
                floor,
                f"{100 * (ratio / floor - 1):+.1f}%",
                with_divergences,
                f"{100 * (ratio / with_divergences - 1):+.1f}%",
                f"{operators[name]:,}",
            ]
        )

    # 4. memory of one step: tram-prev over adam
    memory = {}
    if args.device.startswith("cuda"):
        for name in ("adam", "tram-prev"):
            model = make_model(args.size, args.device)
            params = list(model.parameters())
            loop = UpdateRuleLoop(name, model, engine_optimizer(params, lr=1e-5), loss)
            loop.rule.step(context(loop, batch))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loop.rule.step(context(loop, batch))
            torch.cuda.synchronize()
            memory[name] = torch.cuda.max_memory_allocated() - base
            param_bytes = sum(p.numel() * p.element_size() for p in params)
            del loop, model, params
        logits_bf16 = tokens * vocab * 2
        memory["budget"] = param_bytes + logits_bf16
    results["memory"] = memory

    # 5. GPT2-XL on one device, the micro-batch that fills it
    xl = {}
    for name in ("adam", "tram-prev"):
        config = xl_config(args, name)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds, run = through_trainer(config, args)
        progress(f"GPT2-XL {name}", seconds)
        t = config.trainer
        xl_tokens = t.micro_batch_size * t.accumulate * config.task.block_size
        xl[name] = {"seconds": seconds, "tokens_per_s": xl_tokens / seconds,
                    "batch": f"{t.micro_batch_size} x {t.accumulate} x {config.task.block_size:,}",
                    "activation_checkpointing": t.activation_checkpointing,
                    "mfu": mfu(run, seconds, xl_tokens, config.task.block_size, peak),
                    "hfu": hfu(run, seconds, xl_tokens, config.task.block_size, peak),
                    "peak_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
                    "estimated_bytes": estimate(config, devices=1)["total_bytes"]}  # fmt: skip
        del run
    xl["tram_over_adam"] = xl["tram-prev"]["seconds"] / xl["adam"]["seconds"]
    results["xl"] = xl

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{device_name}, torch {torch.__version__}, bf16-mixed, {args.size} ({rows_per_step} x {block} tokens), "
          f"{args.steps} timed steps; peak {peak or float('nan'):.3g} FLOP/s")  # fmt: skip
    print(table(["what", "rows x tokens", "tokens/s", "MFU", "vs bare eager loop"], rows))
    print(f"T_fb {t_fb * 1e3:.2f} ms, T_f {t_f * 1e3:.2f} ms, adam step {steps['adam'] * 1e3:.2f} ms")
    headers = ["rule", "step / adam", "floor", "over floor", "floor + divergences", "over it", "operators / step"]
    print(table(headers, rule_rows))
    print(f"adam: {operators['adam']:,} operators a step")
    if memory:
        print(f"peak of one step above the memory before it: adam {memory['adam'] / 2**30:.2f} GiB, tram-prev "
              f"{memory['tram-prev'] / 2**30:.2f} GiB (+{(memory['tram-prev'] - memory['adam']) / 2**30:.2f} GiB; "
              f"budget: parameters + one micro-batch's bf16 logits = {memory['budget'] / 2**30:.2f} GiB)")  # fmt: skip
    print(table(["GPT2-XL (" + args.xl + "), one device", "micro x accumulate x tokens", "checkpointing",
                 "tokens/s", "MFU", "HFU", "peak GiB", "estimate GiB"],
                [[name, r["batch"], "on" if r["activation_checkpointing"] else "off", r["tokens_per_s"],
                  r["mfu"] or float("nan"), r["hfu"] or float("nan"), (r["peak_bytes"] or float("nan")) / 2**30,
                  r["estimated_bytes"] / 2**30] for name, r in xl.items() if isinstance(r, dict)]))  # fmt: skip
    print(f"GPT2-XL tram-prev / adam step: {xl['tram_over_adam']:.2f}x")
    results.update(device=device_name, size=args.size, batch=rows_per_step, block=block, steps=args.steps,
                   t_fb=t_fb, t_f=t_f, torch=torch.__version__)  # fmt: skip
    print(f"written: {write_json(args.out, 'gpu_suite', results)}")
    return results


def context(rule_loop: UpdateRuleLoop, batch: dict):
    """The engine's step context for one micro-batch (the rule's step alone, values left on the device)."""
    from fabric_tram.optim.step import StepContext

    rule_loop.step_count += 1
    n = batch["labels"].ne(IGNORE_INDEX).sum().double()
    return StepContext(fabric=rule_loop.fabric, model=rule_loop.model, optimizer=rule_loop.optimizer,
                       loss_fn=rule_loop.loss_fn, micro_batches=[batch], step=rule_loop.step_count, n_global=n,
                       n_local=n, grad_clip=1.0, compute_dtype=torch.bfloat16,
                       params=rule_loop.rule.params)  # fmt: skip


if __name__ == "__main__":
    main()
