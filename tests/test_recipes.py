"""The paper's recipes: --smoke of each (1 process; gpt2xl_s2orc also on 2 processes with FSDP), and the
best-checkpoint selection they use."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_config
from launch import launch_two_processes

from fabric_tram.cli import train_job
from fabric_tram.config import load_config
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", ["gpt2_s2orc", "gpt2_wiki", "smollm2_m2d2"])
def test_recipe_smoke_in_process(recipe, tmp_path):
    config = load_config(
        ROOT / "recipes" / f"{recipe}.py",
        [f"trainer.run_dir={tmp_path / recipe}", "optimizer.name=tram-prev"],
        smoke=True,
    )
    full = load_config(ROOT / "recipes" / f"{recipe}.py")
    pretrained = "HuggingFaceTB/SmolLM2-360M" if recipe.startswith("smollm2") else "gpt2"
    assert full.trainer.max_steps == 50_000 and full.trainer.micro_batch_size == 16
    assert full.model.pretrained == pretrained
    assert full.task.data_dir == "hf://machelreid/m2d2" and len(full.task.eval_domains) == 11
    assert config.optimizer.lr == 2e-5 and config.optimizer.betas == [0.9, 0.99]  # the recipe's own, kept by the rule
    run = train_job(config)  # what `python recipes/X.py` and `fabric-tram train` run: train() and the paper table
    assert len(run.history) == 4 and (tmp_path / recipe / "results_table.md").is_file()


@pytest.mark.distributed
@pytest.mark.parametrize("devices", [1, 2])
def test_gpt2xl_recipe_smoke_with_fsdp(devices, tmp_path):
    full = load_config(ROOT / "recipes" / "gpt2xl_s2orc.py")
    settings = (full.trainer.strategy, full.trainer.precision, full.trainer.micro_batch_size, full.trainer.max_steps)
    assert settings == ("fsdp", "bf16-mixed", 4, 100_000)
    assert full.model.pretrained == "gpt2-xl" and full.schedule.warmup_steps == 10_000
    args = [
        str(ROOT / "recipes" / "gpt2xl_s2orc.py"),
        "--smoke",
        f"trainer.run_dir={tmp_path / 'xl'}",
        "optimizer.name=tram-prev",
    ]
    if devices == 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    else:
        launch_two_processes(args, fresh=(tmp_path / "xl",), cwd=tmp_path)
    summary = json.loads((tmp_path / "xl" / "results.json").read_text())
    assert summary["optimizer"] == "tram-prev" and set(summary["results"]) == {"validation", "test"}
    assert (tmp_path / "xl" / "checkpoints" / "best.json").is_file()


def test_select_best_evaluates_the_lowest_validation_loss_checkpoint(corpus, tmp_path):
    # SGD with a huge learning rate diverges: the best in-domain validation loss is early, not at the end
    config = small_config(
        corpus,
        tmp_path / "best",
        "sgd",
        steps=5,
        extra=[
            "optimizer.lr=20",
            "trainer.eval_every=1",
            "trainer.select_best=true",
            "trainer.save_every=1",
            "trainer.keep_last=1",
            "task.train_domains=[alpha]",
            "trainer.eval_batches=0",
        ],
    )
    train(config)
    rows = list(csv.DictReader(open(tmp_path / "best" / "logs" / "csv" / "metrics.csv")))
    losses = {int(r["step"]): float(r["validation/alpha/loss"]) for r in rows if r.get("validation/alpha/loss")}
    best = ckpt.best_step(tmp_path / "best")
    assert best == min(losses, key=losses.get) and best < 5
    summary = json.loads((tmp_path / "best" / "results.json").read_text())
    assert summary["evaluated_step"] == best
    assert summary["results"]["validation"]["alpha"]["loss"] == pytest.approx(losses[best], rel=1e-6)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "best")]
    assert names == [f"step-{best:08d}", "step-00000005"]  # keep_last=1 never prunes the best


VISION = {"vit_cifar100": ("uoft-cs/cifar100", 100), "vit_cars": ("Multimodal-Fatima/StanfordCars_train", 196),
          "vit_flowers": ("nelorth/oxford-flowers", 102)}  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(VISION))
def test_vision_recipe_settings_and_smoke(recipe, tmp_path):
    full = load_config(ROOT / "recipes" / f"{recipe}.py")
    dataset, labels = VISION[recipe]
    assert (full.model.name, full.model.pretrained, full.model.num_labels) == (
        "vit",
        "google/vit-base-patch16-224",
        labels,
    )
    assert (
        full.model.new_head and full.task.data_dir == f"hf://{dataset}" and full.task.processor == full.model.pretrained
    )
    # the paper's setting (B.3): SGD at 5e-4, cosine decay without warm-up, 200 epochs, the final checkpoint
    assert (full.optimizer.name, full.optimizer.lr, full.schedule.name, full.schedule.warmup_steps) == (
        "sgd",
        5e-4,
        "cosine",
        0,
    )
    assert (full.trainer.max_epochs, full.trainer.select_best, full.trainer.eval_splits) == (200, False, ["test"])
    # an update rule named on the command line wraps the recipe's SGD with its learning rate, not Adam
    rule = load_config(ROOT / "recipes" / f"{recipe}.py", ["optimizer.name=tram-x"])
    momentum = getattr(rule.optimizer, "momentum", "absent: not SGD's keys")
    assert (rule.optimizer.base, rule.optimizer.lr, momentum) == ("sgd", 5e-4, 0.0)
    config = load_config(
        ROOT / "recipes" / f"{recipe}.py", [f"trainer.run_dir={tmp_path / recipe}", "optimizer.name=tram-x"], smoke=True
    )
    run = train_job(config)  # 2 epochs of the 24 bundled training images, 4 per step
    assert len(run.history) == 12 and run.config.optimizer.base == "sgd"
    assert all(s["radius"] > 0 for s in run.history if "radius" in s)
    table = (tmp_path / recipe / "results_table.md").read_text()
    assert "| tram-x |" in table and "image-sample" in table
    summary = json.loads((tmp_path / recipe / "results.json").read_text())
    assert summary["metric"] == "accuracy" and summary["evaluated_step"] == 12


def test_a_base_optimizer_named_with_another_base_is_refused():
    from fabric_tram.config import ConfigError

    with pytest.raises(ConfigError, match="optimizer.base='sgd' applies to update rules.*'adam' is a base optimizer"):
        load_config(None, ["model.name=gpt2", "task.name=lm", "optimizer.name=adam", "optimizer.base=sgd"])


def test_the_long_horizon_demo_smoke_evaluates_along_the_way_and_reports_forgetting(tmp_path):
    """recipes/demo_long.py --smoke: each run evaluates every domain at each tenth of its steps (here every step),
    the report's curves start at the pre-trained model and end at the final evaluation; finished runs are reused."""
    import json
    import subprocess
    import sys

    out = tmp_path / "long"
    command = [sys.executable, str(ROOT / "recipes" / "demo_long.py"), "--smoke", "--out", str(out), "--seeds", "0",
               "--variants", "adam,tram-init r=0.5"]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads((out / "report" / "forgetting.json").read_text())
    assert set(data) == {"adam", "tram-init r=0.5"}
    assert data["adam"]["zero-shot"]["steps"] == [0, 1, 2, 3, 4]
    import yaml

    config = yaml.safe_load((out / "tram-init-r0.5-seed0" / "config.yaml").read_text())
    assert config["optimizer"]["radius_target"] == 0.5 and config["trainer"]["eval_every"] == 1
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("reusing") == 2
