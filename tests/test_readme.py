"""The documentation's examples run verbatim (README and the docs/ pages it links: the plugin example of
docs/extending.md as a script and as a plugin, --plugin and entry points; the user loop of docs/rules.md);
.ci/run runs exactly the README's install and test commands."""

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


def python_block(containing: str) -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", DOCS, flags=re.S) if containing in b]
    return block


def run(cmd, cwd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_readme_plugin_example_trains_and_registers(tmp_path):
    block = python_block('register_task("parity"')
    (tmp_path / "my_parity.py").write_text(block)
    out = run([sys.executable, "my_parity.py"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    loss = float(out.stdout.strip().splitlines()[-1].split()[-1])
    assert 0 < loss < 0.6931 + 0.05  # at most chance (ln 2) plus noise: it trained without error
    assert (tmp_path / "runs" / "parity" / "results.json").is_file()
    script = shutil.which("fabric-tram")  # the installed console script: the working directory is not on its path
    listed = run([script, "list", "--plugin", "my_parity"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in ("bag-of-embeddings", "parity", "signsgd", "decaying-sam"):
        assert name in listed.stdout
    assert "SAM whose ρ halves every half_life steps; 2 fwd / 2 bwd; state 1x" in listed.stdout
    # the docs' update rule of one's own, as a plugin: two passes a step, ρ decaying
    rule = run([script, "train", "--plugin", "my_parity", "model.name=bag-of-embeddings", "task.name=parity",
                "optimizer.name=decaying-sam", "optimizer.half_life=2", "trainer.max_steps=3",
                "trainer.run_dir=runs/rule", "trainer.progress_bar=false", "trainer.log_every=1"],
               tmp_path)  # fmt: skip
    assert rule.returncode == 0, rule.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "runs" / "rule").rglob("metrics.csv")))))
    norms = [float(r["e_norm"]) for r in rows if r.get("e_norm")]
    assert len(norms) == 3 and norms[0] > norms[1] > norms[2] > 0  # ‖e‖ = ρ 0.5^(s/2): it halves every 2 steps
    # the README's model under a rule that noises the inputs: the input_noise contract holds
    noised = run([script, "train", "--plugin", "my_parity", "model.name=bag-of-embeddings", "task.name=parity",
                  "optimizer.name=tram-x", "optimizer.lr=0.01", "trainer.max_steps=3", "trainer.run_dir=runs/noised",
                  "trainer.progress_bar=false"], tmp_path)  # fmt: skip
    assert noised.returncode == 0, noised.stderr[-3000:]
    assert (tmp_path / "runs" / "noised" / "results.json").is_file()


def test_entry_point_plugins_load_without_flags(tmp_path):
    block = python_block('register_task("parity"')
    (tmp_path / "my_parity.py").write_text(block)
    dist = tmp_path / "my_parity-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-parity\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fabric_tram.plugins]\nparity = my_parity\n")
    listed = run([sys.executable, "-m", "fabric_tram.cli", "list"], tmp_path, {"PYTHONPATH": str(tmp_path)})
    assert listed.returncode == 0, listed.stderr
    assert "signsgd" in listed.stdout and "parity" in listed.stdout


def test_ci_runs_exactly_the_readme_commands_in_a_new_virtual_environment():
    ci_text = (ROOT / ".ci" / "run").read_text()
    ci = [
        line
        for line in ci_text.splitlines()
        if line and not line.startswith(("#", "set ", "cd ", "export ", "trap ", "python3 -m venv ", "source "))
    ]
    assert 'python3 -m venv "$CI_VENV"' in ci_text and 'source "$CI_VENV/bin/activate"' in ci_text  # a new venv
    setup_block = re.search(r"```bash\n(pip install torch==.*?)```", README, flags=re.S).group(1).splitlines()
    readme_install_and_test = [c for c in setup_block if c.startswith("pip ") or "pytest" in c]
    assert ci == readme_install_and_test


def test_the_readmes_first_screen_has_its_three_uses_and_the_public_install_first():
    first_screen = README[: README.index("## The main job")]
    for shown in ("fabric-tram estimate recipes/gpt2xl_s2orc.py", "fabric run --devices 4 recipes/gpt2xl_s2orc.py",
                  "--num-nodes 2", "@register_task("):  # fmt: skip
        assert shown in first_screen, shown
    public, offline = (first_screen.index(line) for line in ("pip install torch --index-url", "pip install torch==2"))
    assert public < offline


@pytest.mark.slow
def test_the_readmes_task_of_a_few_lines_trains_with_tram(tmp_path):
    (tmp_path / "counting.py").write_text(python_block('register_task("counting"'))
    out = run([sys.executable, "counting.py"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    loss = float(out.stdout.strip().splitlines()[-1].split()[-1])
    assert loss < 0.5 * math.log(16)  # it learned to count: half the loss of a uniform guess over 16 tokens
    assert (tmp_path / "runs" / "counting" / "results.json").is_file()


def test_readme_user_loop_example_runs_on_a_hugging_face_model(tmp_path):
    (tmp_path / "user_loop.py").write_text(python_block("UpdateRuleLoop"))
    out = run([sys.executable, "user_loop.py"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    fields = out.stdout.split()
    assert fields[0] == "loss" and float(fields[1]) > 0 and float(fields[3]) > 0  # a positive trust-region radius d
