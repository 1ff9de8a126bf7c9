"""trainer.compile: each transformer block compiled once for every rule's forwards (grad and no-grad, weight
swaps, noise, dropout replay) and the same updates as eager."""

import pytest
import torch
from conftest import EXACT_ABS, max_param_diff, small_config, trajectory

from fabric_tram.engine.trainer import train

# packed blocks: every micro-batch has the same shape (padded documents would add a dynamic-shape recompile)
EXTRA = ["optimizer.base=sgd", "task.packing=true", "model.dropout=0.1"]


def no_recompile_after_the_first_step(last_step: int):
    """A callback that makes dynamo raise on any recompile from step 2 to the last (the final evaluation, in eval
    mode, is a legitimate new variant)."""

    def callback(run, stats):
        torch._dynamo.config.error_on_recompile = 1 <= stats["step"] < last_step

    return callback


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["tram-prev", "tram-x", "r3f", "asam+mesa"])
def test_compiled_blocks_do_not_recompile_and_match_eager(corpus, tmp_path, rule):
    """aot_eager: dynamo's graphs and guards without code generation (recompiles are a dynamo matter), so the
    result must equal eager's exactly, dropout masks replayed by the target forward included."""
    torch._dynamo.reset()
    eager = train(small_config(corpus, tmp_path / "eager", rule, steps=4, extra=EXTRA))
    compiled_extra = EXTRA + ["trainer.compile=true", "trainer.compile_backend=aot_eager"]
    try:
        compiled = train(small_config(corpus, tmp_path / "compiled", rule, steps=4, extra=compiled_extra),
                         callbacks=(no_recompile_after_the_first_step(4),))  # fmt: skip
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert [s["loss"] for s in compiled.history] == [s["loss"] for s in eager.history]
    assert max_param_diff(trajectory(compiled)["params"], trajectory(eager)["params"]) == 0.0


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager_in_float64(corpus, tmp_path):
    """The real backend (C++ code generated on the CPU): fused kernels round differently, within float64's noise."""
    torch._dynamo.reset()
    extra = ["optimizer.base=sgd", "task.packing=true"]
    eager = train(small_config(corpus, tmp_path / "eager", "tram-prev", steps=3, extra=extra))
    compiled = train(
        small_config(corpus, tmp_path / "compiled", "tram-prev", steps=3, extra=extra + ["trainer.compile=true"])
    )
    assert max_param_diff(trajectory(compiled)["params"], trajectory(eager)["params"]) < EXACT_ABS


@pytest.mark.slow
def test_compiled_llama_blocks_do_not_recompile_and_match_eager(corpus, tmp_path):
    """The Llama family under trainer.compile: its blocks (rotary tables passed in, GQA through SDPA) compiled
    once for tram-x's clean, noised and replayed forwards, the updates equal to eager's."""
    from conftest import LLAMA_MODEL

    torch._dynamo.reset()
    eager = train(small_config(corpus, tmp_path / "eager", "tram-x", steps=4, extra=EXTRA, model=LLAMA_MODEL))
    compiled_extra = EXTRA + ["trainer.compile=true", "trainer.compile_backend=aot_eager"]
    try:
        config = small_config(corpus, tmp_path / "compiled", "tram-x", steps=4, extra=compiled_extra, model=LLAMA_MODEL)
        compiled = train(config, callbacks=(no_recompile_after_the_first_step(4),))
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert [s["loss"] for s in compiled.history] == [s["loss"] for s in eager.history]
    assert max_param_diff(trajectory(compiled)["params"], trajectory(eager)["params"]) == 0.0
