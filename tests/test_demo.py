"""The bundled demo: corpus, tokenizer and pre-trained checkpoint ship with the package; the demo command runs
end to end on a cut-down setting; our GPT-2 export loads in Hugging Face transformers with identical logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fabric_tram.data.tokenizer import end_of_text_id, load_tokenizer
from fabric_tram.models.gpt2 import GPT2, GPT2Config
from fabric_tram.models.hf_folder import save_hf_folder
from fabric_tram.tasks.language_modeling import bundled_data_dir

ROOT = Path(__file__).resolve().parents[1]


def test_demo_assets_are_bundled():
    domains = sorted(p.name for p in bundled_data_dir("demo").iterdir() if p.is_dir())
    assert domains == ["bible", "jargon", "python-manual", "wordnet"]
    for domain in domains:
        sizes = {
            s: (bundled_data_dir("demo") / domain / f"{s}.txt").stat().st_size for s in ("train", "validation", "test")
        }
        assert sizes["train"] > 900_000 and sizes["validation"] > 90_000 and sizes["test"] > 90_000
    assert load_tokenizer("demo").get_vocab_size() == 4096 and end_of_text_id("demo") == 0
    model = GPT2.from_config(GPT2Config(pretrained="bundled:demo-gpt2"))
    assert model.config.vocab_size == 4096 and sum(p.numel() for p in model.parameters()) < 2_000_000


def test_export_loads_in_transformers_with_identical_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = GPT2(GPT2Config(preset="tiny", n_layer=2, n_head=2, n_embd=32, n_positions=40, vocab_size=97)).eval()
    save_hf_folder(ours, tmp_path / "export", extra_config={"bos_token_id": 0, "eos_token_id": 0})
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)
    again = GPT2.from_config(GPT2Config(pretrained=str(tmp_path / "export"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)


INTERRUPTED_DEMO = """
import os, signal, sys, runpy
from fabric_tram.engine import trainer

real = trainer.after_step

def after_step(run, step, stats, progress):  # kill -9 the demo in tram-prev's run, after its step-2 checkpoint
    real(run, step, stats, progress)
    if run.config.optimizer.name == "tram-prev" and step == 2:
        os.kill(os.getpid(), signal.SIGKILL)

trainer.after_step = after_step
sys.argv = [{demo!r}, "--smoke", "--out", {out!r}, "--rules", "adam,tram-prev"]
runpy.run_path({demo!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_demo_command_on_a_cut_down_setting_continues_after_an_interruption(tmp_path):
    demo, out_dir = str(ROOT / "recipes" / "demo.py"), str(tmp_path / "demo")
    killed = subprocess.run([sys.executable, "-c", INTERRUPTED_DEMO.format(demo=demo, out=out_dir)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "demo" / "adam-seed0" / "results.json").is_file()
    assert not (tmp_path / "demo" / "tram-prev-seed0" / "results.json").is_file()
    args = [sys.executable, demo, "--smoke", "--out", out_dir, "--rules", "adam,tram-prev"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reusing" in out.stdout and "continuing the interrupted run" in out.stdout
    assert "resumed from" in out.stdout and "step-00000002 at step 2" in out.stdout
    assert "| run | jargon | bible | python-manual | wordnet | ZS Avg. |" in out.stdout
    assert "| pre-trained |" in out.stdout and "| tram-prev |" in out.stdout and "| adam |" in out.stdout
    assert (tmp_path / "demo" / "report" / "figure2.png").is_file()
    assert (tmp_path / "demo" / "report" / "curves.png").is_file()  # loss, d, radius, ‖e‖ over steps
    config = (tmp_path / "demo" / "tram-prev-seed0" / "config.yaml").read_text()
    assert "radius_target: 0.1" in config  # the setting the sweep selected (recipes/demo.py, SELECTED)
    summary = json.loads((tmp_path / "demo" / "tram-prev-seed0" / "results.json").read_text())
    assert summary["train_domains"] == ["jargon"]
    assert set(summary["results"]["test"]) == {"bible", "jargon", "python-manual", "wordnet"}
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert rerun.returncode == 0 and rerun.stdout.count("reusing") == 2  # finished runs are reused
    # (another setting never reuses them: test_a_finished_run_of_other_settings_is_never_reused, in-process)


def test_a_finished_run_of_other_settings_is_never_reused(tmp_path, capsys):
    """In-process (the planted bug's cheap check): a rerun with another setting stops on the finished run, naming
    the key that differs, instead of putting the old result into the new table."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import demo

    args = ["--smoke", "--out", str(tmp_path / "demo"), "--rules", "adam", "--seeds", "1"]
    demo.main(args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        demo.main([*args, "trainer.max_steps=4"])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "holds a finished run of other settings" in err
    assert "trainer.max_steps: 3 there, 4 here" in err


def test_a_smoke_writes_beside_the_real_runs_not_into_them():
    sys.path.insert(0, str(ROOT / "recipes"))
    import demo

    assert demo.parse(["--smoke"], {"out": "runs/demo"})[0]["out"] == "runs/demo-smoke"
    assert demo.parse(["--smoke", "--out", "x"], {"out": "runs/demo"})[0]["out"] == "x"
    assert demo.parse([], {"out": "runs/demo"})[0]["out"] == "runs/demo"


def test_a_rules_key_given_to_the_demo_reaches_each_rule_after_its_own_settings(tmp_path):
    """`--rules asam,tram-prev optimizer.ascent_every=2`: a key adam's section does not have goes to each rule's
    (the recipe's base optimizer would refuse it), and the rule's selected settings are kept beside it."""
    import yaml

    sys.path.insert(0, str(ROOT / "recipes"))
    import demo

    out = tmp_path / "demo"
    demo.main(["--smoke", "--out", str(out), "--rules", "asam,tram-prev", "--seeds", "1", "optimizer.ascent_every=2",
               "trainer.max_steps=2"])  # fmt: skip
    for rule in ("asam", "tram-prev"):
        optimizer = yaml.safe_load((out / f"{rule}-seed0" / "config.yaml").read_text())["optimizer"]
        assert optimizer["ascent_every"] == 2 and optimizer["name"] == rule, rule
    assert yaml.safe_load((out / "tram-prev-seed0" / "config.yaml").read_text())["optimizer"]["radius_target"] == 0.1
