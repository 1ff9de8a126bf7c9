"""Shared by the tests and the 2-process worker: the small equivalence set-up of DESIGN.md.

The test model has tied embeddings, parameters in the root FSDP group (wte, wpe, ln_f) and dimensions not
divisible by 2 (n_embd = 33, vocabulary 50257: FSDP pads its shards); documents are padded, not packed, so
micro-batches and ranks hold unequal token counts.
"""
from __future__ import annotations

from fabric_tram.config import load_config
from fabric_tram.engine.distributed import full_state_dict

SMALL_MODEL = ["model.name=gpt2", "model.preset=tiny", "model.n_layer=2", "model.n_head=3", "model.n_embd=33",
               "model.n_positions=48", "model.dropout=0.0"]


def small_config(data_dir, run_dir, optimizer="sgd", micro=8, accumulate=1, steps=3, strategy="auto", extra=()):
    lr = "0.5" if optimizer == "sgd" else "0.003"
    return load_config(None, SMALL_MODEL + [
        "task.name=lm", f"task.data_dir={data_dir}", "task.packing=false", "task.block_size=32",
        f"optimizer.name={optimizer}", f"optimizer.lr={lr}", "schedule.name=constant",
        f"trainer.run_dir={run_dir}", f"trainer.micro_batch_size={micro}", f"trainer.accumulate={accumulate}",
        f"trainer.max_steps={steps}", f"trainer.strategy={strategy}", "trainer.precision=32-true",
        "trainer.grad_clip=0", "trainer.progress_bar=false", "trainer.eval_batches=1", *extra])


def trajectory(run) -> dict:
    """What equivalence tests compare: per-step stats and the final (gathered) parameters."""
    keys = ("loss", "grad_norm", "n_targets")
    return {"steps": [{k: s[k] for k in keys} for s in run.history], "params": full_state_dict(run.model)}


def max_param_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
