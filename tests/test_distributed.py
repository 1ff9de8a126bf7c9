"""Scale equivalence (b) and (c) on 2 CPU processes (gloo): DDP and FSDP2 vs 1 process; resume under each."""

import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import max_param_diff, small_config, trajectory

from fabric_tram.engine.trainer import train

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).parent / "dist_worker.py"
TOL = {"sgd": 2e-6, "adam": 2e-5}
RULES = ("sam", "asam", "fsam", "tram-prev", "tram-x", "trpo", "r3f")
D_REL = 3e-3  # d: a KL of nearly equal fp32 distributions (see test_rules_engine.py)
D_ABS = 1e-7  # and its float32 resolution


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(strategy, corpus, out) -> dict:
    """One 2-process launch. A launch whose process was killed by a signal is retried once, in a fresh folder,
    and reported. (The SIGABRT seen about once in thirty launches is a rank aborting at exit, after all its work,
    with "terminate called without an active exception": gloo threads meeting interpreter finalization. Releasing
    the process group at exit did not remove it: once more in 35 launches after.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        target = out if attempt == 0 else out.with_name(out.name + "-retry")
        cmd = [
            sys.executable,
            "-m",
            "lightning.fabric.cli",
            "--devices",
            "2",
            "--accelerator",
            "cpu",
            "--main-port",
            str(free_port()),
            str(WORKER),
            strategy,
            str(corpus),
            str(target),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        killed = "SIGABRT" in proc.stderr or "SIGSEGV" in proc.stderr
        if proc.returncode == 0 or not killed or attempt == 1:
            break
        clues = [
            line
            for line in (proc.stdout + proc.stderr).splitlines()
            if re.search(r"abort|malloc|terminate|what\(\)|corrupt|gloo|Connection", line, re.IGNORECASE)
        ]
        (target.parent / f"{target.name}-killed-stderr.txt").write_text(proc.stdout + proc.stderr)
        warnings.warn(
            f"2-process {strategy} launch killed by a signal, retrying once; lines that may name the "
            "cause:\n"
            + "\n".join(clues[:30])
            + f"\n(whole output in {target.parent / (target.name + '-killed-stderr.txt')})",
            stacklevel=2,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(target / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import write_corpus

    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "data")
    ref = {
        opt: trajectory(train(small_config(corpus, root / f"ref-{opt}", opt, micro=8, accumulate=1)))
        for opt in ("sgd", "adam")
    }
    for rule in RULES:
        run = train(
            small_config(corpus, root / f"ref-{rule}", rule, micro=8, accumulate=1, extra=["optimizer.base=sgd"])
        )
        ref[rule] = {"history": run.history, "params": trajectory(run)["params"]}
    return root, corpus, ref


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(reference, strategy):
    root, corpus, ref = reference
    got = launch(strategy, corpus, root / strategy)
    assert got["world_size"] == 2
    for opt in ("sgd", "adam"):
        assert got[opt]["results_json_seen_by_rank"] == [
            1.0,
            1.0,
        ]  # train() returns on every rank after rank 0's writes
        per_rank = torch.tensor(got[opt]["n_local_per_rank"])  # (ranks, steps)
        assert (per_rank[0] != per_rank[1]).any(), "ranks should hold unequal token counts"
        for a, b in zip(ref[opt]["steps"], got[opt]["steps"], strict=True):
            assert a["n_targets"] == b["n_targets"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # the shard-aware global norm
        assert max_param_diff(ref[opt]["params"], got[opt]["params"]) < TOL[opt]
    # (c) resumed from step 2: steps 3-4 and the final weights equal the uninterrupted run exactly
    assert got["resumed"]["steps"] == got["uninterrupted"]["steps"][2:]
    assert max_param_diff(got["resumed"]["params"], got["uninterrupted"]["params"]) == 0.0
    tram = got["tram_resume"]
    assert tram["resumed"] == tram["full"] and all(d > 0 for d in tram["full"])
    assert max_param_diff(*tram["diff"]) == 0.0
    for rule in RULES:  # the update rules: per-step ‖T g‖, ‖e‖, d, and the final weights
        for a, b in zip(ref[rule]["history"], got[rule]["history"], strict=True):
            assert a["n_targets"] == b["n_targets"]
            for key, rel in (
                ("loss", 1e-5),
                ("Tg_norm", 1e-5),
                ("e_norm", D_REL),
                ("d", D_REL),
                ("regulariser", D_REL),
            ):
                if key in a:  # abs: trpo's d is ~1.5e-5 here, a KL summed from float32 log-probabilities near -10
                    assert a[key] == pytest.approx(b[key], rel=rel, abs=D_ABS), (rule, key)
        assert max_param_diff(ref[rule]["params"], got[rule]["params"]) < TOL["sgd"], rule
    if strategy == "fsdp":  # negative control: without the all-reduce of the sums of squares, e is wrong
        wrong = got["asam_per_shard_norm"]
        assert wrong["history"][0]["Tg_norm"] != pytest.approx(ref["asam"]["history"][0]["Tg_norm"], rel=1e-3)
        assert max_param_diff(ref["asam"]["params"], wrong["params"]) > 10 * TOL["sgd"]
    if strategy == "ddp":
        assert got["m_sharpness"] == {"steps": 2, "finite": True}
    else:
        assert "m_sharpness (per-rank perturbations) is refused under sharding" in got["m_sharpness"]["error"]
    if strategy == "ddp":  # fp16 overflow on one rank: both ranks skip step 1, both scales back off, no NaN
        fp16 = got["fp16"]
        assert fp16["skipped"] == [[1.0, 0.0], [1.0, 0.0]]
        assert fp16["scale"][0] == fp16["scale"][1] and fp16["scale"][0][0] < 2.0**16
        assert fp16["finite"]
    if strategy == "ddp":  # the negative control fails the same tolerance
        assert max_param_diff(ref["sgd"]["params"], got["sgd_without_W"]["params"]) > 100 * TOL["sgd"]
    if strategy == "fsdp":
        assert got["wte_local_rows"] < got["wte_rows"]  # data-parallel size = world size: really sharded
        assert got["root_sharded_after_no_grad_forward"] is False  # docs/design.md: the fact, confirmed
        assert got["root_sharded_after_reshard"] is True
        assert got["sharded_after_evaluate"] is True
