"""Bad input found by trying the project as a new user: each ends in one line that names the problem and the fix,
the same from `fabric-tram`, `python recipes/X.py` and `fabric run`, before anything is written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_config
from launch import launch_two_processes

from fabric_tram.config import ConfigError, load_config
from fabric_tram.engine.trainer import NonFiniteError, train

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args, cwd, **env):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, expected: str) -> None:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["optimizer.betas=[0.9]"], "optimizer.betas must be two numbers in [0, 1)"),
        (["optimizer.betas=[0.9,0.99,5]"], "optimizer.betas must be two numbers in [0, 1)"),
        (["trainer.save_every=-1"], "trainer.save_every must be >= 0"),
        (["trainer.eval_every=-5"], "trainer.eval_every must be >= 0"),
        (["optimizer.name=tram-prev", "optimizer.base=asam"], "optimizer.base='asam' is an update rule"),
        (["optimizer.name=tram-prev", "optimizer.base=adamm"], "optimizer.base: unknown optimizer 'adamm'"),
        (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite='ignore' is not one of stop, skip"),
        (["schedule.name=cosine", "schedule.end_factor=2"], "schedule.end_factor must be in [0, 1]"),
        (["optimizer.lr=[1"], "not valid YAML"),
    ],
)
def test_bad_values_are_refused_with_the_config(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "recipes" / "tiny_sample.py", overrides)
    assert expected in str(err.value)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: gpt2\ntrainer: {max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4:1: YAML syntax error"):
        load_config(path)


def test_nothing_is_written_when_the_config_is_refused_and_the_corrected_rerun_goes_ahead(corpus, tmp_path):
    bad = subprocess.run([sys.executable, str(ROOT / "recipes" / "tiny_sample.py"), f"task.data_dir={corpus}",
                          f"trainer.run_dir={tmp_path / 'run'}", "optimizer.betas=[0.9,0.99,5]", "trainer.max_steps=1"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_one_line_error(bad, "optimizer.betas")
    assert not (tmp_path / "run").exists()
    good = train(small_config(corpus, tmp_path / "run", "adam", steps=1))
    assert len(good.history) == 1


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["cli", "script"])
def test_errors_inside_training_end_in_one_line_from_both_launch_forms(corpus, tmp_path, launch):
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "config.yaml").write_text("model: {}\n")  # an existing run folder: refused, untouched
    first = ["recipes/tiny_sample.py", f"task.data_dir={corpus}", f"trainer.run_dir={run_dir}"]
    command = (
        [sys.executable, "-m", "fabric_tram.cli", "train", *first] if launch == "cli" else [sys.executable, *first]
    )
    assert_one_line_error(run_cli(command, ROOT), "already holds a run")
    missing = [*first[:1], f"task.data_dir={tmp_path / 'absent'}", f"trainer.run_dir={tmp_path / 'other'}"]
    command = (
        [sys.executable, "-m", "fabric_tram.cli", "train", *missing] if launch == "cli" else [sys.executable, *missing]
    )
    assert_one_line_error(run_cli(command, ROOT), "does not exist; set task.data_dir")


def test_a_recipe_syntax_error_a_file_as_run_dir_and_a_non_gguf_file_are_one_line(corpus, tmp_path):
    recipe = tmp_path / "broken.py"
    recipe.write_text('RECIPE = {"model": {"name": "gpt2"},\n  "task" {}}\n')
    cli = [sys.executable, "-m", "fabric_tram.cli"]
    assert_one_line_error(run_cli([*cli, "train", str(recipe)], tmp_path), "broken.py:2:")
    assert "syntax error in the recipe" in run_cli([*cli, "train", str(recipe)], tmp_path).stderr
    (tmp_path / "a-file").write_text("not a folder")
    proc = run_cli([sys.executable, str(ROOT / "recipes" / "tiny_sample.py"), f"task.data_dir={corpus}",
                    f"trainer.run_dir={tmp_path / 'a-file'}", "trainer.max_steps=1"], tmp_path)  # fmt: skip
    assert_one_line_error(proc, "is an existing file, not a folder; choose another run_dir")
    assert (tmp_path / "a-file").read_text() == "not a folder"  # untouched
    proc = run_cli([*cli, "convert-gguf", str(tmp_path / "a-file"), str(tmp_path / "out")], tmp_path)
    assert_one_line_error(proc, "a-file is not a GGUF file (GGUF magic invalid)")


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path):
    proc = run_cli([sys.executable, "-m", "fabric_tram.cli", "list", "--plugin", "bad.module"], tmp_path)
    assert_one_line_error(proc, "plugin module 'bad.module' could not be imported")


def test_a_plugin_task_lacking_a_required_member_is_one_line_naming_each(tmp_path):
    (tmp_path / "half_task.py").write_text(
        "from fabric_tram.registry import register_task\n\n\n@register_task('half')\nclass Half:\n"
        "    def collate(self, examples, indices):\n        return {}\n"
    )
    proc = run_cli([sys.executable, "-m", "fabric_tram.cli", "train", "--plugin", "half_task", "task.name=half"],
                   tmp_path)  # fmt: skip
    assert_one_line_error(proc, "ContractError: task 'half' (half_task.Half) lacks what the engine needs: eval_sets")
    for member in ("loss —", "count_targets —", "metrics —"):
        assert member in proc.stderr


def test_list_is_one_line_per_entry_and_keys_adds_each_entrys_defaults():
    from click.testing import CliRunner

    from fabric_tram.cli import main
    from fabric_tram.registry import REGISTRIES

    lines = CliRunner().invoke(main, ["list"]).output.strip().splitlines()
    assert len(lines) == sum(1 + len(list(r.entries())) for r in REGISTRIES.values())  # a header per registry
    assert any(line.split()[0] == "tram-prev" for line in lines)
    out = CliRunner().invoke(main, ["list", "--keys"]).output
    assert "rho=0.5" in out and "radius_scale=auto" in out and "betas=[0.9, 0.99]" in out and "warmup_steps=0" in out
    assert "ascent_every=1 ascent_direction=gradient" in out  # every perturbing rule's schedule keys
    lora = next(line for line in out.splitlines() if line.split()[:1] == ["model.lora"])
    assert lora.split()[1:] == ["r=8", "alpha=16.0", "dropout=0.0", "target_modules=[]", "modules_to_save=[]"]
    trainer = next(line for line in out.splitlines() if line.split()[:1] == ["trainer"]).split()
    for key in ("micro_batch_size=8", "global_batch_size=None", "loggers=['csv', 'tensorboard']",
                "wandb.project=None", "mlflow.tracking_uri=None"):  # fmt: skip
        assert key in " ".join(trainer), key


def test_plugin_may_come_before_the_subcommand(tmp_path):
    (tmp_path / "my_rule.py").write_text(
        "from fabric_tram.registry import register_schedule\n"
        "@register_schedule('flat-out', description='a plugin schedule')\n"
        "def flat(step, max_steps, config):\n    return 1.0\n"
    )
    for args in (["--plugin", "my_rule", "list"], ["list", "--plugin", "my_rule"]):
        proc = run_cli([sys.executable, "-m", "fabric_tram.cli", *args], tmp_path, PYTHONPATH=str(tmp_path))
        assert proc.returncode == 0 and "flat-out" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_diverging_run_stops_naming_the_step_or_skips_and_counts(corpus, tmp_path, policy):
    extra = ["optimizer.lr=1e6", "trainer.save_every=1", f"trainer.on_nonfinite={policy}"]
    config = small_config(corpus, tmp_path / policy, "sgd", steps=4, extra=extra)
    if policy == "stop":
        with pytest.raises(NonFiniteError, match=r"step \d: the loss or its gradient is not finite"):
            train(config)
        return
    run = train(config)
    skipped = [s["step"] for s in run.history if s.get("nonfinite")]
    assert skipped and run.history[-1]["nonfinite_steps"] == len(skipped)
    assert all(s.get("nonfinite") for s in run.history if s["step"] > skipped[0])  # nothing learned from NaN
    import torch
    from conftest import trajectory

    assert all(torch.isfinite(p).all() for p in trajectory(run)["params"].values())  # no NaN reached the weights


@pytest.mark.distributed
def test_a_config_error_under_fabric_run_is_the_last_thing_printed(tmp_path):
    args = [str(ROOT / "recipes" / "tiny_sample.py"), "trainer.strategy=fsdp", "trainer.precision=16-mixed",
            f"trainer.run_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = launch_two_processes(args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip() and not set(line.strip()) <= {"="}]
    assert "error: ConfigError: trainer.precision=16-mixed is refused" in lines[-1], output[-3000:]


@pytest.mark.parametrize("rule", ["sgd", "sam"])
def test_a_non_finite_gradient_with_a_finite_loss_never_reaches_the_weights(corpus, tmp_path, poison_gradients, rule):
    from conftest import max_param_diff, trajectory

    extra = ["trainer.on_nonfinite=skip"] + (["optimizer.base=sgd"] if rule != "sgd" else [])
    one = train(small_config(corpus, tmp_path / "one", rule, steps=1, extra=extra))
    passes = poison_gradients(when=lambda ctx: ctx.step == 2)  # every pass of step 2: the final gradient too
    two = train(small_config(corpus, tmp_path / "two", rule, steps=2, extra=extra))
    assert passes.count(2) >= 1 and two.history[1]["nonfinite"] and two.history[1]["nonfinite_steps"] == 1
    assert max_param_diff(trajectory(one)["params"], trajectory(two)["params"]) == 0.0  # step 2 changed nothing


def test_fabric_tram_run_takes_a_free_port_for_a_default_that_is_taken_and_refuses_a_given_one():
    from fabric_tram.engine.launch import main_port

    taken = {29400, 29500}

    def is_free(port):
        return port not in taken

    def free_port():
        return 40123

    args = ["--devices", "2", "recipe.py", "--main-port", "29500"]  # the script's own argument is not ours
    assert main_port(args, is_free, free_port) == (["--main-port", "40123", *args],
                                                   "fabric-tram run: port 29400 is taken (another run on this "
                                                   "machine?); using --main-port 40123")  # fmt: skip
    assert main_port(["--main-port=29401", "r.py"], is_free, free_port) == (["--main-port=29401", "r.py"], None)
    for args, where in ((["--main-port", "29500", "r.py"], ""), (["--num-nodes", "2", "r.py"], ", the same on every")):
        with pytest.raises(OSError, match=rf"--main-port 29\d00 is taken on this machine .*--main-port 40123{where}"):
            main_port(args, is_free, free_port)
    assert main_port(["--num-nodes", "2", "--node-rank", "1", "r.py"], is_free, free_port)[1] is None  # connects


@pytest.mark.distributed
def test_two_runs_on_one_machine_with_fabric_tram_run(tmp_path):
    """A second launch while another holds the default port: on a free port, said in one line, and it trains; a
    taken port given on the command line is one line naming a free one, before anything starts."""
    import socket

    from launch import free_port

    with socket.socket() as other, socket.socket() as given:
        try:
            other.bind(("", 29400))  # another run's rendezvous (or this port is taken already: the same case)
            other.listen()
        except OSError:
            pass
        port = free_port()
        given.bind(("", port))
        given.listen()
        cli = [sys.executable, "-m", "fabric_tram.cli", "run", "--devices", "2", "--accelerator", "cpu"]
        recipe = [str(ROOT / "recipes" / "tiny_sample.py"), "trainer.max_steps=1", "trainer.eval_batches=1",
                  "trainer.progress_bar=false"]  # fmt: skip
        refused = run_cli([*cli, "--main-port", str(port), *recipe, f"trainer.run_dir={tmp_path / 'refused'}"],
                          tmp_path)  # fmt: skip
        assert_one_line_error(refused, f"PortTaken: --main-port {port} is taken on this machine")
        assert not (tmp_path / "refused").exists()
        moved = run_cli([*cli, *recipe, f"trainer.run_dir={tmp_path / 'moved'}"], tmp_path)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "fabric-tram run: port 29400 is taken (another run on this machine?); using --main-port" in moved.stdout
    assert (tmp_path / "moved" / "results.json").is_file()


@pytest.mark.parametrize("family", ["hf", "gpt2"])
def test_a_checkpoint_folder_with_only_pickled_weights_is_one_line(corpus, tmp_path, family):
    """transformers' own folders of old (pytorch_model.bin): refused before loading, naming what the folder holds
    and how to convert it, for model.name=hf as for our families; nothing is written."""
    import torch
    from safetensors.torch import load_file

    from fabric_tram.models.gpt2 import GPT2
    from fabric_tram.models.hf_folder import save_hf_folder

    save_hf_folder(GPT2(small_config(corpus, tmp_path / "unused").model), tmp_path / "old")
    torch.save(load_file(tmp_path / "old" / "model.safetensors"), tmp_path / "old" / "pytorch_model.bin")
    (tmp_path / "old" / "model.safetensors").unlink()
    proc = run_cli([sys.executable, "-m", "fabric_tram.cli", "train", f"model.name={family}", "model.pretrained=old",
                    "task.name=lm", f"task.data_dir={corpus}", "optimizer.name=adam", "trainer.max_steps=1",
                    f"trainer.run_dir={tmp_path / 'run'}"], tmp_path)  # fmt: skip
    assert_one_line_error(proc, "old has no model.safetensors (found: config.json, pytorch_model.bin). Only "
                                "safetensors weights are read")  # fmt: skip
    assert not (tmp_path / "run").exists()
