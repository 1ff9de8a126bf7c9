"""Precision modes, activation checkpointing, and the set-up refusals (strategy/precision/devices, CLI)."""

import math

import pytest
import torch
from click.testing import CliRunner
from conftest import EXACT_ABS, EXACT_REL, initial_params, max_param_diff, small_config, trajectory
from memory_probes import FEW_FAULTS, GLIBC, MANY_FAULTS, page_faults_per_step

from fabric_tram.cli import main
from fabric_tram.config import ConfigError, TrainerConfig
from fabric_tram.engine.fabric_setup import build_fabric
from fabric_tram.engine.trainer import train


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_precision_modes_train(corpus, tmp_path, precision):
    config = small_config(corpus, tmp_path / precision, "adam", steps=2, precision=precision)
    run = train(config)
    assert all(math.isfinite(s["loss"]) for s in run.history)
    params = trajectory(run)["params"]
    assert all(torch.isfinite(p.float()).all() for p in params.values())
    if precision == "16-mixed":  # a real fp16 loss scaler on CPU, stepped through Fabric
        scaler = run.fabric.strategy.precision.scaler
        assert scaler is not None and scaler.get_scale() > 1
    if precision == "bf16-true":
        assert params["transformer.wte.weight"].dtype == torch.bfloat16


def test_16_mixed_overflow_skips_the_step_and_backs_off(corpus, tmp_path, poison_gradients):
    poison_gradients(when=lambda ctx: ctx.step == 1)
    config = small_config(corpus, tmp_path / "fp16", "sgd", steps=1, precision="16-mixed")
    before = {}
    run = train(
        config,
        callbacks=(lambda run, s: before.update(scale=run.fabric.strategy.precision.scaler.get_scale()),),
    )
    assert run.history[0]["skipped"] is True
    assert before["scale"] < 2.0**16  # backed off from GradScaler's initial scale
    assert all(torch.isfinite(p).all() for p in trajectory(run)["params"].values())


@pytest.mark.parametrize("rule", ["sgd", "tram-prev"])
def test_trainer_clips_the_final_gradient_to_grad_clip(corpus, tmp_path, rule):
    """SGD's step is lr times the clipped gradient: ‖θ_1 − θ_0‖ = lr · c · ‖g‖ / (‖g‖ + 1e-6), with ‖g‖ logged
    before clipping (for tram-prev at step 1, e = 0, so g is also the descent gradient)."""
    extra = ["trainer.grad_clip=0.01", "optimizer.lr=0.5"] + (["optimizer.base=sgd"] if rule != "sgd" else [])
    config = small_config(corpus, tmp_path / "clip", rule, steps=1, extra=extra)
    run = train(config)
    norm = run.history[0]["grad_norm"]
    assert norm > 0.01
    before, after = initial_params(config), trajectory(run)["params"]
    names = [n for n, _ in run.model.module.named_parameters()]  # lm_head.weight is tied to wte: counted once
    moved = sum(float((after[n] - before[n]).pow(2).sum()) for n in names) ** 0.5
    assert moved == pytest.approx(0.5 * 0.01 * norm / (norm + 1e-6), rel=EXACT_REL)


def test_activation_checkpointing_gives_the_same_updates(corpus, tmp_path):
    plain = trajectory(train(small_config(corpus, tmp_path / "plain", "adam", steps=2)))
    ckpt = trajectory(
        train(small_config(corpus, tmp_path / "ac", "adam", steps=2, extra=["trainer.activation_checkpointing=true"]))
    )
    assert max_param_diff(plain["params"], ckpt["params"]) < EXACT_ABS  # float64: the same arithmetic, recomputed


def test_fsdp_with_fp16_is_refused_with_the_config(corpus, tmp_path):
    with pytest.raises(ConfigError, match="16-mixed is refused with trainer.strategy=fsdp"):
        small_config(corpus, tmp_path / "r", "adam", strategy="fsdp", precision="16-mixed")
    with pytest.raises(ConfigError, match="16-mixed is refused with trainer.strategy=fsdp"):  # built by hand
        build_fabric(TrainerConfig(strategy="fsdp", precision="16-mixed", accelerator="cpu"))


def test_devices_conflicting_with_fabric_run_are_refused(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LT_CLI_USED", "1")
    monkeypatch.setenv("LT_DEVICES", "4")
    config = small_config(corpus, tmp_path / "r", "adam", extra=["trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"trainer.devices=2 in the config conflicts with `fabric run --devices 4`"):
        build_fabric(config.trainer)
    monkeypatch.setenv("LT_STRATEGY", "fsdp")
    config = small_config(corpus, tmp_path / "r", "adam")
    with pytest.raises(ConfigError, match="leave --strategy out and set trainer.strategy=fsdp"):
        build_fabric(config.trainer)


def test_cli_reports_bad_input_clearly(corpus, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", "recipes/tiny_sample.py", "optimizer.name=adma"])
    assert (
        result.exit_code != 0
        and "Valid optimizer names: adam, adamw, asam" in result.output
        and "tram-prev" in result.output
    )
    result = runner.invoke(
        main,
        [
            "train",
            "recipes/tiny_sample.py",
            f"task.data_dir={tmp_path / 'nothing'}",
            f"trainer.run_dir={tmp_path / 'run'}",
        ],
    )
    assert result.exit_code != 0 and "does not exist; set task.data_dir" in result.output
    result = runner.invoke(main, ["train", "no_such_recipe.py"])
    assert result.exit_code != 0 and "recipe 'no_such_recipe.py' does not exist" in result.output


def test_cli_trains_and_evaluates_a_recipe(corpus, tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "cli"
    args = [
        "train",
        "recipes/tiny_sample.py",
        f"task.data_dir={corpus}",
        f"trainer.run_dir={run_dir}",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.progress_bar=false",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (run_dir / "results.json").is_file() and (run_dir / "logs" / "csv" / "metrics.csv").is_file()
    result = runner.invoke(main, ["evaluate", str(run_dir)])
    assert result.exit_code == 0 and "alpha" in result.output and "ppl=" in result.output


@pytest.mark.parametrize("rule", ["adam", "trpo", "tram-prev"])
def test_vocabulary_sized_outputs_are_freed_before_the_model_backward(rule):
    """The step drops each micro-batch's LossOutput before its backward: the logits and log-probabilities (the
    largest tensors of a language-model step) must be gone by the time the backward reaches the embedding."""
    import weakref

    from fabric_tram.loss import cross_entropy_sum
    from fabric_tram.models.gpt2 import GPT2, GPT2Config
    from fabric_tram.optim.api import UpdateRuleLoop

    torch.manual_seed(0)
    model = GPT2(GPT2Config(preset="tiny", n_layer=1, n_head=2, n_embd=16, n_positions=8, vocab_size=50, dropout=0.0))
    alive, seen = [], []

    def loss_fn(m, batch, **kw):
        out = cross_entropy_sum(m(batch["input_ids"], **kw), batch["labels"])
        if torch.is_grad_enabled():
            alive[:] = [weakref.ref(out.logits), weakref.ref(out.log_probs)]
        return out

    model.transformer.wpe.weight.register_hook(lambda g: seen.append([r() is not None for r in alive]))
    loop = UpdateRuleLoop(rule, model, torch.optim.Adam(model.parameters(), lr=1e-3), loss_fn)
    ids = torch.randint(0, 50, (2, 9))
    loop.step({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    assert seen and all(flags == [False, False] for flags in seen), seen


@pytest.mark.slow
@pytest.mark.parametrize("keep", [True, False])
def test_cpu_runs_keep_freed_memory_unless_told_not_to(keep):
    """trainer.keep_freed_cpu_memory (default on): a CPU run's large tensors reuse freed memory instead of
    page-faulting fresh pages every step (measured 1,004 -> 1,682 tokens/s for adam, README)."""
    setup = (
        "from fabric_tram.config import TrainerConfig; from fabric_tram.engine.fabric_setup import build_fabric; "
        f"build_fabric(TrainerConfig(accelerator='cpu', devices=1, keep_freed_cpu_memory={keep}))"
    )
    _, faults = page_faults_per_step(setup)
    if GLIBC:
        assert (faults < FEW_FAULTS) if keep else (faults >= MANY_FAULTS), faults


RELEASE_AT_EXIT = """
import atexit, socket, torch
from fabric_tram.config import TrainerConfig
from fabric_tram.engine.fabric_setup import build_fabric
atexit.register(lambda: print("initialized at exit:", torch.distributed.is_initialized()))  # runs after ours (LIFO)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
for _ in range(3):  # several runs in one process register the release once
    build_fabric(TrainerConfig(accelerator="cpu", devices=1))
print("initialized after runs:", torch.distributed.is_initialized())
"""


@pytest.mark.slow
def test_the_process_group_is_destroyed_before_the_interpreter_exits():
    """build_fabric registers the default group's release with atexit, once, as torch asks of every program."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RELEASE_AT_EXIT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialized after runs: True" in out.stdout and "initialized at exit: False" in out.stdout, out.stdout


def test_without_a_progress_bar_rank_0_prints_a_plain_line_at_most_every_quiet_every_seconds(capsys):
    """trainer.progress_bar=false (a log file, a recipe's runs one after another): a long run is not silent for
    minutes, a short one prints nothing, another rank never prints. A fake clock: no time is measured."""
    from types import SimpleNamespace

    from fabric_tram.engine.monitor import Progress

    now = [0.0]
    stats = {"loss": 2.345678, "lr": 1e-4, "tokens_per_s": 12345.6}
    progress = Progress(SimpleNamespace(is_global_zero=True), 0, 30, enabled=False, quiet_every=60.0,
                        clock=lambda: now[0])  # fmt: skip
    for step, seconds in ((1, 10.0), (2, 59.0), (3, 61.0), (4, 100.0), (5, 121.5)):
        now[0] = seconds
        progress.update(step, stats)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 3/30: loss 2.3457, lr 1.00e-04, tok_s 12,346 (61 s)",
                     "step 5/30: loss 2.3457, lr 1.00e-04, tok_s 12,346 (122 s)"]  # fmt: skip
    other = Progress(SimpleNamespace(is_global_zero=False), 0, 30, enabled=False, quiet_every=0.0)
    other.update(1, stats)
    assert capsys.readouterr().out == ""
