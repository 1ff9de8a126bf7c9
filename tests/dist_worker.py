"""Run by tests/test_distributed.py as ``fabric run --devices 2 tests/dist_worker.py STRATEGY DATA OUT``.

One launch per strategy covers: equivalence runs (sgd, adam), a checkpoint round trip with dropout (per-rank
RNG matters), and the FSDP2 facts of docs/design.md (mesh size, shard sizes, resharding after no-grad forwards).
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import (  # noqa: E402
    DIST_RULES,
    DIST_VARIANTS,
    LLAMA_LORA,
    LLAMA_MODEL,
    dist_rule,
    hf_checkpoints,
    measure_run,
    poisoned_forward_backward,
    rule_extra,
    small_config,
    small_pretrained,
    trajectory,
    vit_smoke_config,
    xnli_smoke_config,
)

import fabric_tram.jsonfile as jsonfile  # noqa: E402
from fabric_tram.distributed import (  # noqa: E402
    is_dtensor,
    local,
    reshard_after_no_grad_forward,
)
from fabric_tram.engine.evaluation import evaluate  # noqa: E402
from fabric_tram.engine.trainer import train  # noqa: E402

strategy, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
results = {}


class SlowJson:
    """trainer.json with a results write that takes a second: a rank returning from train() before rank 0 has
    written results.json would then not find it."""

    loads = staticmethod(json.loads)

    @staticmethod
    def dumps(*args, **kwargs):
        time.sleep(1.0)
        return json.dumps(*args, **kwargs)


for optimizer in ("sgd", "adam"):
    jsonfile.json = SlowJson  # rank 0's results.json write (fabric_tram.jsonfile) takes a second
    run = train(small_config(data, out / f"eq-{optimizer}", optimizer, micro=2, accumulate=2, strategy=strategy))
    jsonfile.json = json
    seen = torch.tensor(float((run.run_dir / "results.json").exists()))  # before any collective that would wait
    results[optimizer] = {**trajectory(run), "results": run.results}  # trainer.eval_batches=1: a global count
    n_local = torch.tensor([s["n_local"] for s in run.history])
    results[optimizer]["n_local_per_rank"] = run.fabric.all_gather(n_local).tolist()
    results["world_size"] = run.fabric.world_size
    results[optimizer]["results_json_seen_by_rank"] = run.fabric.all_gather(seen).tolist()

for name in (*DIST_RULES, *DIST_VARIANTS):  # norms, d and TRAM's calibrated scale all-reduced over ranks / shards
    rule, extra = dist_rule(name)
    run = train(small_config(data, out / f"rule-{name}", rule, micro=2, accumulate=2, strategy=strategy, extra=extra))
    results[name] = {"history": run.history, "params": trajectory(run)["params"]}

try:  # per-rank perturbations: allowed under DDP, refused under sharding, before any step
    run = train(
        small_config(
            data,
            out / "m-sharpness",
            "sam",
            micro=2,
            accumulate=2,
            steps=2,
            strategy=strategy,
            extra=["optimizer.m_sharpness=true", "optimizer.base=sgd"],
        )
    )
    results["m_sharpness"] = {
        "steps": len(run.history),
        "finite": all(torch.isfinite(torch.tensor(s["loss"])) for s in run.history),
    }
except ValueError as err:
    results["m_sharpness"] = {"error": str(err)}

if strategy == "fsdp":  # the Llama family sharded: GQA projections and tied embeddings split over the ranks
    run = train(
        small_config(
            data, out / "llama", "tram-prev", micro=2, accumulate=2, strategy=strategy, extra=rule_extra("tram-prev"),
            model=LLAMA_MODEL,
        )
    )  # fmt: skip
    results["llama"] = {"history": run.history, "params": trajectory(run)["params"]}
    # the encoder family through the XNLI recipe's smoke setting: sentence pairs, accuracy per language
    run = train(xnli_smoke_config(out / "xnli", strategy=strategy, micro=2, accumulate=1))
    results["xnli"] = {"history": run.history, "params": trajectory(run)["params"], "results": run.results}
    # the ViT through the CIFAR-100 recipe's smoke: patch embeddings, augmented images, tram-x's noise, accuracy
    run = train(vit_smoke_config(out / "vit", strategy=strategy, micro=2, accumulate=1))
    results["vit"] = {"history": run.history, "params": trajectory(run)["params"], "results": run.results}

if strategy == "fsdp":  # transformers models sharded per _no_split_modules block: GPT-2 with tram-x's noise by the
    # hook on its embedding; a Llama with LoRA adapters on frozen, sharded base weights under tram-prev
    hf = hf_checkpoints(out.parent, data, write=False)
    for name, family, rule, lora in (("hf-gpt2", "gpt2", "tram-x", []), ("hf-llama-lora", "llama", "tram-prev",
                                                                            LLAMA_LORA)):  # fmt: skip
        run = train(small_config(data, out / name, rule, micro=2, accumulate=2, strategy=strategy,
                                 extra=rule_extra(rule), model=[*hf[family][1], *lora]))  # fmt: skip
        results[name] = {"history": run.history, "params": trajectory(run)["params"]}

if strategy == "fsdp":  # the analysis commands on a sharded checkpoint, 2 processes
    if torch.distributed.get_rank() == 0:
        small_pretrained(data, out / "pretrained")
    torch.distributed.barrier()
    results["measure"] = measure_run(out / "eq-adam", out / "pretrained")

if strategy == "fsdp":  # negative control: a per-shard norm (no all-reduce) gives another perturbation
    import fabric_tram.optim.geometry as geometry

    real_shard_sum = geometry.shard_sum
    geometry.shard_sum = lambda total, like: total
    run = train(
        small_config(
            data, out / "per-shard", "asam", micro=2, accumulate=2, strategy=strategy, extra=["optimizer.base=sgd"]
        )
    )
    results["asam_per_shard_norm"] = {"history": run.history, "params": trajectory(run)["params"]}
    geometry.shard_sum = real_shard_sum

if strategy == "ddp":  # fp16: an inf injected on rank 0 alone in the ascent gradients skips the step on every rank
    from fabric_tram.optim.step import StepContext

    real_fb = StepContext.forward_backward
    passes: list = []  # the first pass of the run (step 1's ascent) overflows on rank 0 only
    StepContext.forward_backward = poisoned_forward_backward(
        real_fb, when=lambda ctx: len(passes) == 1 and ctx.fabric.global_rank == 0, passes=passes
    )
    run = train(
        small_config(
            data,
            out / "fp16",
            "sam",
            micro=2,
            accumulate=2,
            steps=2,
            strategy=strategy,
            precision="16-mixed",
            extra=["optimizer.base=sgd"],
        )
    )
    StepContext.forward_backward = real_fb
    scale = torch.tensor([run.fabric.strategy.precision.scaler.get_scale()])
    skipped = torch.tensor([float(s["skipped"]) for s in run.history])
    results["fp16"] = {
        "scale": run.fabric.all_gather(scale).tolist(),
        "skipped": run.fabric.all_gather(skipped).tolist(),
        "finite": bool(all(torch.isfinite(p).all() for p in trajectory(run)["params"].values()))
        if run.fabric.global_rank == 0
        else True,
    }

if strategy == "ddp":  # negative control: forgetting the factor W leaves g / W, which SGD does not hide
    from fabric_tram.optim.step import StepContext

    original = StepContext.world_size
    StepContext.world_size = property(lambda self: 1)
    results["sgd_without_W"] = trajectory(
        train(small_config(data, out / "no-w", "sgd", micro=2, accumulate=2, strategy=strategy))
    )
    StepContext.world_size = original

if strategy == "fsdp":  # checkpoints that reshard: 2 processes write one (step 2 of 4), and resume 1 process's
    reshard = ["trainer.save_every=0", *rule_extra("tram-prev")]
    train(small_config(data, out / "reshard-2", "tram-prev", micro=2, accumulate=2, steps=2, strategy=strategy,
                       extra=reshard))  # fmt: skip
    if torch.distributed.get_rank() == 0:  # the reference fixture's 1-process checkpoint, copied to resume here
        import shutil

        shutil.copytree(out.parent / "reshard-1", out / "reshard-from-1")
    torch.distributed.barrier()
    run = train(small_config(data, out / "reshard-from-1", "tram-prev", micro=2, accumulate=2, steps=4,
                             strategy=strategy, extra=[*reshard, "trainer.resume=auto"]))  # fmt: skip
    results["reshard_from_1"] = {"start": run.start_step, "history": run.history, "params": trajectory(run)["params"]}

# checkpoint round trip: 4 uninterrupted steps saving at 2, then a fresh run resumed from step 2
extra = ["model.dropout=0.1", "trainer.save_every=2"]
a = train(small_config(data, out / "ckpt-a", "adam", micro=2, accumulate=2, steps=4, strategy=strategy, extra=extra))
results["uninterrupted"] = trajectory(a)
b = train(
    small_config(
        data,
        out / "ckpt-b",
        "adam",
        micro=2,
        accumulate=2,
        steps=4,
        strategy=strategy,
        extra=extra + [f"trainer.resume={out / 'ckpt-a' / 'checkpoints' / 'step-00000002'}"],
    )
)
results["resumed"] = trajectory(b)
# the same for tram-prev, whose previous iterate (sharded like the parameters) must survive the resume
extra_tram = extra + ["optimizer.base=sgd"]
a2 = train(
    small_config(data, out / "tram-a", "tram-prev", micro=2, accumulate=2, steps=4, strategy=strategy, extra=extra_tram)
)
b2 = train(
    small_config(
        data,
        out / "tram-b",
        "tram-prev",
        micro=2,
        accumulate=2,
        steps=4,
        strategy=strategy,
        extra=extra_tram + [f"trainer.resume={out / 'tram-a' / 'checkpoints' / 'step-00000002'}"],
    )
)
results["tram_resume"] = {
    "full": [s["d"] for s in a2.history[2:]],
    "resumed": [s["d"] for s in b2.history],
    "diff": (trajectory(a2)["params"], trajectory(b2)["params"]),
}

if strategy == "fsdp":
    model = b.model
    wte = model.transformer.wte.weight
    results["wte_local_rows"] = local(wte).shape[0]
    results["wte_rows"] = wte.shape[0]
    with torch.no_grad():  # a forward without backward leaves the root group gathered...
        model(torch.zeros(1, 4, dtype=torch.long))
    results["root_sharded_after_no_grad_forward"] = is_dtensor(next(model.parameters()))
    reshard_after_no_grad_forward(model)  # ...until resharded explicitly
    results["root_sharded_after_reshard"] = is_dtensor(next(model.parameters()))
    evaluate(b, "validation", 1)
    results["sharded_after_evaluate"] = all(is_dtensor(p) for p in model.parameters())


if b.fabric.global_rank == 0:
    torch.save(results, out / "results.pt")
