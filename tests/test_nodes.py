"""Two nodes simulated on one machine (``fabric run --num-nodes 2 --node-rank 0|1 --main-address 127.0.0.1``, one
CPU process each): FSDP2 over the nodes with TRAM in float64 equals one process, step by step, in its final
weights and its test metrics; it resumes its checkpoint; the node-local token caches are built per node (separate
folders) or once under a lock (a shared folder); the run folder is written once; a node that fails ends the other
within a bounded time, each launcher's summary ending with the cause."""

import json
from pathlib import Path

import pytest
from conftest import EXACT_ABS, assert_histories_match
from launch import launch_two_nodes

from fabric_tram.config import load_config
from fabric_tram.engine.export import export
from fabric_tram.engine.trainer import train

pytestmark = pytest.mark.distributed
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_sample.py"
TESTS = str(Path(__file__).parent)
SETTINGS = [
    "trainer.precision=64-true", "optimizer.name=tram-prev", "optimizer.base=sgd", "optimizer.lr=0.5",
    "optimizer.calibration_steps=2", "optimizer.calibration_start=0", "schedule.name=constant", "model.dropout=0.0",
    "trainer.save_every=2", "trainer.eval_every=0", "trainer.eval_batches=2", "trainer.eval_splits=[test]",
    "trainer.micro_batch_size=4", "trainer.progress_bar=false", "trainer.log_every=1",
    "task.tokenizer=demo", "model.vocab_size=4099",  # 4,099 rows, not GPT-2's 50,257: float64 steps 8x cheaper
]  # fmt: skip
KEYS = ("loss", "grad_norm", "d", "radius", "e_norm", "radius_scale", "n_targets")


def history(run_dir: Path) -> list[dict]:
    """Per-step values from the run's metrics.csv (floats written in full: repr)."""
    import csv

    rows = list(csv.DictReader(open(run_dir / "logs" / "csv" / "metrics.csv")))
    steps = [{k: float(v) for k, v in r.items() if k in KEYS and v != ""} for r in rows if r.get("loss")]
    assert [int(float(r["step"])) for r in rows if r.get("loss")] == list(range(1, len(steps) + 1)), "one row a step"
    return steps


def weights(run_dir: Path, step: int, out: Path) -> dict:
    from safetensors.torch import load_file

    export(run_dir / "checkpoints" / f"step-{step:08d}", out, dtype="float64")
    return load_file(out / "model.safetensors")


def node_env(root: Path, shared_cache: bool) -> list[dict]:
    return [{"FABRIC_TRAM_CACHE": str(root / ("shared" if shared_cache else f"node{r}") / "cache"),
             "TMPDIR": str(root / f"node{r}"), "PYTHONPATH": TESTS} for r in range(2)]  # fmt: skip


def test_two_nodes_equal_one_process_resume_and_build_their_caches(tmp_path):
    # one process, accumulating what the two nodes hold: 4 micro-batches of 4 a step, 6 steps, checkpoints 2, 4, 6
    reference = train(load_config(RECIPE, [*SETTINGS, "trainer.accumulate=4", "trainer.max_steps=6",
                                           f"trainer.run_dir={tmp_path / 'one'}"]))  # fmt: skip
    run_dir = tmp_path / "two-nodes"
    args = [str(RECIPE), *SETTINGS, "trainer.strategy=fsdp", "trainer.accumulate=2", f"trainer.run_dir={run_dir}"]
    # 4 steps, each node with its own token cache (a cluster without a shared home)
    nodes = launch_two_nodes([*args, "trainer.max_steps=4"], [tmp_path / "node0", tmp_path / "node1"],
                             node_env(tmp_path, shared_cache=False))  # fmt: skip
    assert [p.returncode for p in nodes] == [0, 0], nodes[0].stderr[-3000:] + nodes[1].stderr[-3000:]
    for r in range(2):  # each node tokenised what it reads, completely
        built = [json.loads(f.read_text()) for f in (tmp_path / f"node{r}" / "cache" / "tokens").glob("*.json")]
        assert built and all(m["complete"] for m in built), r
    two = history(run_dir)  # written once: one row per step (rank 0 of the world writes the logs)
    assert_histories_match(reference.history[:4], two, KEYS, label="2 nodes, steps 1-4")
    assert "radius_scale" in two[2] and two[1]["d"] > 0
    ours, theirs = weights(run_dir, 4, tmp_path / "x-two"), weights(tmp_path / "one", 4, tmp_path / "x-one")
    assert set(ours) == set(theirs) and max((ours[k] - theirs[k]).abs().max() for k in ours) < EXACT_ABS
    # resumed to 6 steps, now with one token cache shared by both nodes (built under its lock, never half-read)
    folders = [tmp_path / "node0", tmp_path / "node1"]
    nodes = launch_two_nodes([*args, "trainer.max_steps=6", "trainer.resume=auto"], folders,
                             node_env(tmp_path, shared_cache=True))  # fmt: skip
    assert [p.returncode for p in nodes] == [0, 0], nodes[0].stderr[-3000:] + nodes[1].stderr[-3000:]
    shared = [json.loads(f.read_text()) for f in (tmp_path / "shared" / "cache" / "tokens").glob("*.json")]
    assert shared and all(m["complete"] for m in shared)
    assert_histories_match(reference.history[4:], history(run_dir)[4:], KEYS, label="2 nodes resumed, steps 5-6")
    ours, theirs = weights(run_dir, 6, tmp_path / "y-two"), weights(tmp_path / "one", 6, tmp_path / "y-one")
    assert max((ours[k] - theirs[k]).abs().max() for k in ours) < EXACT_ABS
    results = json.loads((run_dir / "results.json").read_text())["results"]["test"]
    for domain, metrics in reference.results["test"].items():
        assert results[domain]["loss"] == pytest.approx(metrics["loss"], rel=1e-10), domain


def test_a_failing_node_ends_the_other_with_its_cause_in_each_summary(tmp_path):
    args = [str(RECIPE), "--plugin", "node_failure", "trainer.strategy=fsdp", "optimizer.name=tram-prev",
            "trainer.max_steps=6", "trainer.save_every=0", "trainer.eval_batches=1", "trainer.micro_batch_size=4",
            "trainer.accumulate=1", "trainer.progress_bar=false", f"trainer.run_dir={tmp_path / 'run'}",
            "task.tokenizer=demo", "model.vocab_size=4099"]  # fmt: skip
    env = node_env(tmp_path, shared_cache=False)
    env[1]["FAIL_AT_STEP"] = "3"  # node 1 raises in its step 3 (tests/node_failure.py)
    nodes = launch_two_nodes(args, [tmp_path / "node0", tmp_path / "node1"], env, timeout=240)  # a hang times out
    assert [p.returncode for p in nodes] == [1, 1]
    last = [p.stderr.strip().splitlines()[-2] for p in nodes]  # the launcher summary's last line before its rule
    assert "error: RuntimeError: planted failure at step 3" in last[1], nodes[1].stderr[-2000:]
    assert "error: another process of this run failed, so this one stopped" in last[0], nodes[0].stderr[-2000:]
