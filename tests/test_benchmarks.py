"""The benchmarks run on a tiny setting and write sane JSON (figures themselves are for the README, not tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from memory_probes import FEW_FAULTS, GLIBC, MANY_FAULTS, page_faults_per_step

from fabric_tram.bench.common import pass_floor
from fabric_tram.bench.step_cost import RULES
from fabric_tram.optim.update_rule import rule_class

ROOT = Path(__file__).resolve().parents[1]


def bench(tmp_path, name, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout, json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow
def test_keeping_freed_cpu_memory_removes_the_page_faults_of_each_step():
    """Why the timing benchmarks switch malloc (engine/cpu_memory.py): by default each fresh 64 MiB tensor of a
    step is a new mapping whose 16,384 pages fault on first touch; kept, freed blocks are reused."""
    switched, faults = page_faults_per_step("print(keep_freed_cpu_memory())")
    _, faults_by_default = page_faults_per_step("print(None)")
    assert switched == str(GLIBC)
    if GLIBC:
        assert faults_by_default >= MANY_FAULTS and faults < FEW_FAULTS, (faults_by_default, faults)


@pytest.mark.slow
def test_step_cost(tmp_path):
    variant = "tram-prev:ascent_every=2:radius_every=2"  # timed over blocks of 2 steps
    rules = ["sam", "tram-prev", "r3f", "trpo", variant, "asam:ascent_direction=momentum"]
    text, result = bench(tmp_path, "step_cost", "--size", "tiny", "--repeats", "1", "--rules", ",".join(rules))
    assert "| tram-prev |" in text
    assert result["allocator"] == ("glibc, freed memory kept (no mmap, no trim)" if GLIBC else "system")
    # the floors are the rules' declared passes priced at the recorded pass times: algebra, never a timed bound
    passes = {name: r["passes"] for name, r in result["rules"].items()}
    assert passes == {"sam": [2, 0, 2], "tram-prev": [2, 1, 2], "r3f": [2, 0, 2],  # r3f: one pass, two graphs
                      "trpo": [1, 1, 1], variant: [1.5, 0.5, 1.5],
                      "asam:ascent_direction=momentum": [1, 0, 1]}  # fmt: skip
    # each rule's divergences per step, priced at the divergences' own recorded times
    divergences = {name: r["divergences"] for name, r in result["rules"].items()}
    assert divergences == {"sam": {}, "tram-prev": {"kl (no gradient)": 1}, "r3f": {"kl-sym (gradient: both)": 1},
                           "trpo": {"kl (gradient: current)": 1}, variant: {"kl (no gradient)": 0.5},
                           "asam:ascent_direction=momentum": {}}  # fmt: skip
    kinds = {"kl (no gradient)", "kl-sym (gradient: both)", "kl (gradient: current)"}
    assert set(result["divergence_seconds"]) == kinds
    # host work counted, not timed: every rule dispatches more operators a step than adam's one pass
    assert all(r["operators_per_step"] > result["adam_operators_per_step"] > 100 for r in result["rules"].values())
    t_fb, t_f = result["fwd_bwd_seconds"], result["no_grad_fwd_seconds"]
    for name, r in result["rules"].items():
        fwd, nograd, _ = r["passes"]
        assert r["floor"] == pytest.approx((fwd * t_fb + nograd * t_f) / t_fb, rel=1e-12), name
        assert r["ratio_to_adam"] == pytest.approx(r["seconds"] / result["adam_seconds"], rel=1e-12), name
        assert r["over_floor"] == pytest.approx(r["ratio_to_adam"] / r["floor"], rel=1e-12), name
        priced = sum(count * result["divergence_seconds"][label] for label, count in r["divergences"].items())
        assert r["floor_with_divergences"] == pytest.approx(r["floor"] + priced / t_fb, rel=1e-12), name
        assert r["over_floor_with_divergences"] == pytest.approx(
            r["ratio_to_adam"] / r["floor_with_divergences"], rel=1e-12
        ), name


def test_each_rule_declares_the_divergences_a_step_computes():
    """What step_cost prices beside the passes: TRAM's d without a gradient on each target forward, a
    regulariser's term with its gradient once per gradient pass (both branches for r3f)."""
    from fabric_tram.bench.common import divergence_kinds, make_model
    from fabric_tram.optim.api import UpdateRuleLoop
    from fabric_tram.registry import load_builtins

    load_builtins()
    expected = {
        **dict.fromkeys(["sam", "asam", "fsam", "tram-fisher"], {}),
        **dict.fromkeys(["tram-prev", "tram-init", "tram-x"], {("kl", "none"): 1}),
        **dict.fromkeys(["trpo", "mesa"], {("kl", "current"): 1}),
        **dict.fromkeys(["asam+trpo", "asam+mesa"], {("kl", "current"): 2}),
        "r3f": {("kl-sym", "both"): 1},
        "asam+r3f": {("kl-sym", "both"): 2},
    }
    assert sorted(expected) == sorted(RULES)
    for name in RULES:
        model = make_model("tiny", "cpu")
        rule = UpdateRuleLoop(name, model, torch.optim.Adam(model.parameters()), None).rule
        forward, no_grad, _ = type(rule).mean_passes(rule.config)
        assert divergence_kinds(rule, forward, no_grad) == expected[name], name


def test_a_pass_floor_prices_each_pass_at_its_time():
    assert pass_floor(2, 0, 0.3, 0.1) == 2.0
    assert pass_floor(2, 1, 0.4, 0.1) == pytest.approx(2.25)
    assert pass_floor(2, 1 / 4, 0.4, 0.1) == pytest.approx(2.0625)  # one no-grad forward every 4 steps


@pytest.mark.slow
def test_radius_every(tmp_path):
    text, result = bench(tmp_path, "radius_every", "--size", "tiny", "--repeats", "1", "--every", "1,4")
    assert "| 4 |" in text
    t_fb, t_f = result["fwd_bwd_seconds"], result["no_grad_fwd_seconds"]
    assert sorted(int(n) for n in result["every"]) == [1, 4]
    for n, r in result["every"].items():  # (2 T_fb + T_f / N) / T_fb at the recorded pass times
        assert r["floor"] == pytest.approx((2 * t_fb + t_f / int(n)) / t_fb, rel=1e-12), n
        assert r["ratio_to_adam"] == pytest.approx(r["seconds_per_step"] / result["adam_seconds"], rel=1e-12), n


@pytest.mark.slow
def test_memory_held_by_rules_is_at_target(tmp_path):
    text, result = bench(tmp_path, "memory", "--size", "tiny")
    for name, r in result["rules"].items():
        assert r["held_per_param_byte"] == pytest.approx(r["target"]), name
    assert set(result["peak_bytes"]) == {"adam", "tram-prev"}


@pytest.mark.slow
def test_engine_overhead(tmp_path):
    _, result = bench(tmp_path, "engine_overhead", "--size", "tiny", "--repeats", "1")
    assert result["engine_over_loop_tokens_per_s"] > 0
    operators = result["operators_per_step"]  # counted: the same model's forward and backward in both, and more
    assert operators["engine"] > operators["loop"] > 100
    # the loop steps the engine's fused Adam; torch's CPU default walks the 28 tensors, 6+ operators each
    assert result["base_optimizer"] == {"fused": True}
    assert operators["default"] > operators["loop"] + 6 * 28


def test_operators_are_counted_with_the_backward_and_metadata_apart():
    from fabric_tram.bench.common import operators_per_call

    x = torch.ones(4, requires_grad=True)
    assert operators_per_call(lambda: x.detach()) == (1, 1)
    assert operators_per_call(lambda: torch.mul(x.detach(), 2.0)) == (2, 1)
    forward, _ = operators_per_call(lambda: (x * 3.0).sum())
    with_backward, _ = operators_per_call(lambda: (x * 3.0).sum().backward())
    assert forward == 2 and with_backward > forward  # the backward's operators are dispatched in the same call


@pytest.mark.slow
def test_divergence_chunked_equals_naive_with_less_memory(tmp_path):
    _, result = bench(tmp_path, "divergence", "--batch", "2", "--naive-batch", "2", "--seq", "256", "--vocab", "50257")
    chunked, naive = result["results"]["chunked"], result["results"]["naive"]
    assert chunked["d"] == pytest.approx(naive["d"], rel=1e-4)
    assert chunked["extra_peak_bytes"] < naive["extra_peak_bytes"]


def test_cross_entropy_chunked_equals_plain_with_less_memory(tmp_path):
    """Each in its own process at (2, 256, 50257) bf16 logits (50 MiB): the same loss; the plain one builds a float32
    log-softmax (100 MiB) that the chunked one never does."""
    args = ["--batch", "2", "--seq", "256", "--repeats", "1"]
    _, result = bench(tmp_path, "cross_entropy", *args)
    plain, chunked = result["results"]["plain"], result["results"]["chunked"]
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert plain["extra_peak_bytes"] - chunked["extra_peak_bytes"] > result["logits_mib"] * 2**20


@pytest.mark.slow
def test_gpu_suite_path_on_cpu(tmp_path):
    """The GPU suite's code path on a CPU (the figures mean nothing here): every part runs and is reported."""
    args = ["--device", "cpu", "--size", "tiny", "--steps", "1", "--compile-backend", "aot_eager"]  # XL: tiny on CPU
    text, result = bench(tmp_path, "gpu_suite", *args)
    assert "| bare loop, compiled |" in text and "| trainer adam, fsdp, compiled |" in text
    assert "| trainer adam, auto, eager, chunked CE |" in text and "trainer_auto_compiled_chunked_ce" in result
    assert set(result["rules"]) == set(RULES)
    # every floor is forward passes + no-grad forwards × T_f/T_fb, with one measured T_f/T_fb for all rules (its
    # value is timing noise on a tiny CPU model; the formula is not)
    t_f_over_t_fb = result["rules"]["tram-prev"]["floor"] - 2
    assert t_f_over_t_fb > 0
    for name, r in result["rules"].items():
        fwd, nograd, _ = rule_class(name).passes
        assert r["floor"] == pytest.approx(fwd + nograd * t_f_over_t_fb, rel=1e-12), name
    # beside it, the floor with each rule's divergences priced (kinds as test_each_rule_declares_...)
    seconds = result["divergence_seconds"]
    assert set(seconds) == {"kl (no gradient)", "kl (gradient: current)", "kl-sym (gradient: both)"}
    assert result["rules"]["sam"]["floor_with_divergences"] == result["rules"]["sam"]["floor"]
    extra = {name: r["floor_with_divergences"] - r["floor"] for name, r in result["rules"].items()}
    assert extra["asam+trpo"] == pytest.approx(2 * extra["trpo"], rel=1e-9)  # one term per gradient pass
    assert extra["asam+r3f"] == pytest.approx(2 * extra["r3f"], rel=1e-9)
    assert all(r["operators_per_step"] > result["adam_operators_per_step"] > 100 for r in result["rules"].values())
    ratio = seconds["kl-sym (gradient: both)"] / seconds["kl (no gradient)"]
    assert extra["r3f"] / extra["tram-prev"] == pytest.approx(ratio, rel=1e-9)
    xl = result["xl"]
    assert xl["tram_over_adam"] == pytest.approx(xl["tram-prev"]["seconds"] / xl["adam"]["seconds"], rel=1e-12)
    for name in ("adam", "tram-prev"):  # one device, the micro-batch the estimator fits within the global batch 4
        r = xl[name]
        micro, accumulate, tokens = (int(x.replace(",", "")) for x in r["batch"].split(" x "))
        assert micro * accumulate == 4 and tokens == 64 and r["activation_checkpointing"] is False
        assert r["estimated_bytes"] > 0 and r["hfu"] == r["mfu"]  # nothing recomputed without checkpointing


def test_profile_step_places_each_rules_time_by_kind(tmp_path):
    args = ["--device", "cpu", "--size", "tiny", "--rules", "adam,tram-prev", "--precision", "32-true"]
    text, result = bench(tmp_path, "profile_step", *args)
    assert set(result) == {"adam", "tram-prev"} and "| tram-prev |" in text
    for r in result.values():
        assert 0 < r["busy"] and sum(r["by_kind"].values()) == pytest.approx(r["busy"])
        assert r["by_kind"]["matmul"] > 0 and r["by_kind"]["softmax"] > 0  # the kinds recognise CPU operators
    assert result["tram-prev"]["kernels"] > result["adam"]["kernels"]  # the target forward's operators


def test_every_benchmark_script_is_a_bench_command():
    """benchmarks/X.py and `fabric-tram bench X` are the same program (cross_entropy and lora_cost were missing)."""
    from fabric_tram.cli.commands import BENCHMARKS

    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    modules = {p.stem for p in (ROOT / "fabric_tram" / "bench").glob("*.py")} - {"__init__", "common"}
    assert scripts == modules == set(BENCHMARKS)
    for name in BENCHMARKS:  # each script runs its module's main
        assert f"from fabric_tram.bench.{name} import main" in (ROOT / "benchmarks" / f"{name}.py").read_text()


def test_bench_command_passes_help_to_the_benchmark():
    from click.testing import CliRunner

    from fabric_tram.cli import main

    result = CliRunner().invoke(main, ["bench", "step_cost", "--help"])
    assert result.exit_code == 0 and "--system-malloc" in result.output and "--rules" in result.output
    result = CliRunner().invoke(main, ["bench", "--help"])  # the command's own help lists the benchmarks
    assert result.exit_code == 0 and "step_cost|radius_every|memory" in result.output


@pytest.mark.slow
def test_images_throughput(tmp_path):
    text, result = bench(tmp_path, "images", "--images", "24", "--side", "64", "--steps", "1", "--repeats", "1",
                         "--batch", "4")  # fmt: skip
    assert "| trainer, 2 workers |" in text
    assert set(result["images_per_s"]) == {"bare loop", "trainer, in-line", "trainer, 2 workers"}
    assert all(rate > 0 for rate in result["images_per_s"].values())


def test_lora_cost_measures_full_and_lora_side_by_side(tmp_path):
    stdout, result = bench(tmp_path, "lora_cost", "--checkpoint", "none", "--steps", "1", "--rules", "adam")
    full, lora = result["rows"]
    assert (full["mode"], lora["mode"]) == ("full", "lora") and full["rule"] == lora["rule"] == "adam"
    assert full["trained_parameters"] == full["parameters"]  # fine-tuning in full trains everything
    assert 0 < lora["trained_parameters"] < full["parameters"] / 50 < lora["parameters"]
    assert all(r["ms_per_step"] > 0 and r["peak_above_start_mib"] > 0 for r in (full, lora))
    assert "| adam | lora |" in stdout


def test_hfu_adds_the_blocks_forward_once_per_backward_when_checkpointing():
    """HFU = MFU + what activation checkpointing recomputes: each backward pass runs the blocks' forward again,
    not the output head's (2·C·V per token). Figures made up so that each term differs."""
    from types import SimpleNamespace

    from fabric_tram.bench.gpu_suite import hfu, mfu
    from fabric_tram.optim.update_rule import Passes

    C, V, per_token, tokens, seconds, peak = 8, 100, 5000.0, 64, 0.5, 1e6
    model = SimpleNamespace(sizes={"n_embd": C, "vocab_size": V}, forward_flops_per_token=lambda seq_len: per_token)
    for checkpointing, passes in ((False, Passes(1, 0, 1)), (True, Passes(1, 0, 1)), (True, Passes(2, 1, 2))):
        run = SimpleNamespace(
            model=model,
            rule=SimpleNamespace(passes=passes),
            config=SimpleNamespace(trainer=SimpleNamespace(activation_checkpointing=checkpointing)),
        )
        model_flops = per_token * tokens * (passes.forward + passes.no_grad_forward + 2 * passes.backward)
        assert mfu(run, seconds, tokens, 16, peak) == pytest.approx(model_flops / seconds / peak)
        recomputed = (per_token - 2 * C * V) * tokens * passes.backward if checkpointing else 0.0
        assert hfu(run, seconds, tokens, 16, peak) == pytest.approx((model_flops + recomputed) / seconds / peak)


@pytest.mark.parametrize("size", ["tiny", "small", "gpt2", "many-tensors"])
def test_the_trainer_and_the_bare_loop_run_one_model_at_every_size(size):
    """A benchmark that sets the trainer beside a bare loop compares like with like: the same parameter shapes
    (a tokenizer's vocabulary must not make the trainer's output head another size than the loop's)."""
    from fabric_tram.bench.common import make_model, trainer_model_settings
    from fabric_tram.config import load_config
    from fabric_tram.models import build_model

    config = load_config(None, [*trainer_model_settings(size), "optimizer.name=adam"])
    with torch.device("meta"):
        ours = {n: p.shape for n, p in build_model(config.model).named_parameters()}
        bare = {n: p.shape for n, p in make_model(size, "meta").named_parameters()}
    assert ours == bare
