"""SIGTERM and Ctrl-C end a run with a checkpoint, not a loss (engine/interrupt.py): the run stops after the step
it was in, saves it, says how to continue, and a resume continues exactly; a second Ctrl-C stops at once; the
ranks of a launch agree on a signal that reached one of them."""

import os

import pytest
import torch
from conftest import max_param_diff, small_config, trajectory

from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.trainer import train

TWO_CTRL_C_AT_STEP_3 = """
import signal, sys
# a terminal's Ctrl-C handling, whatever the test process passed on (an ignored SIGINT is inherited across exec)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from conftest import small_config
from fabric_tram.engine.reporting import reported_errors
from fabric_tram.engine.trainer import train

def ctrl_c_twice(run, stats):  # the second arrives before the step loop acts on the first: a user who will not wait
    if stats["step"] == 3:  # raise_signal: to this thread, handled before it returns (os.kill may reach another
        signal.raise_signal(signal.SIGINT)  # thread, and two pending SIGINTs then reach Python as one)
        signal.raise_signal(signal.SIGINT)

with reported_errors():
    train(small_config({data!r}, {run!r}, "sgd", steps=6, extra=["trainer.save_every=2"]), callbacks=(ctrl_c_twice,))
"""


def test_a_second_ctrl_c_stops_at_once_and_says_which_checkpoint_a_resume_starts_from(corpus, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path / "run"
    code = TWO_CTRL_C_AT_STEP_3.format(tests=str(Path(__file__).parent), data=str(corpus), run=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    said_at_once = "SIGINT: saving a checkpoint after this step, then stopping (Ctrl-C again: stop at once, without it)"
    assert said_at_once in lines
    step2 = ckpt.checkpoint_path(run_dir, 2)
    assert lines[-1] == (f"stopped: stopped at once by a second Ctrl-C after step 3 of 6, unsaved: the newest complete "
                         f"checkpoint is {step2} (step 2); run the same command with trainer.resume=auto to continue "
                         "from it")  # fmt: skip
    assert [ckpt.step_of(c) for c in ckpt.list_checkpoints(run_dir)] == [2]


def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(corpus, tmp_path):
    import os
    import signal

    from fabric_tram.engine.interrupt import TrainingInterrupted

    def preempt(run, stats):  # the scheduler's SIGTERM arrives during step 3
        if stats["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    extra = ["trainer.save_every=0", "model.dropout=0.1"]
    config = small_config(
        corpus, tmp_path / "run", "tram-prev", steps=6, extra=[*extra, "optimizer.calibration_steps=2"]
    )
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM after step 3 of 6: .*step-00000003 saved"):
        train(config, callbacks=(preempt,))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the run
    assert [ckpt.step_of(c) for c in ckpt.list_checkpoints(tmp_path / "run")] == [3]
    more = [*extra, "optimizer.calibration_steps=2", "trainer.resume=auto"]
    resumed = train(small_config(corpus, tmp_path / "run", "tram-prev", steps=6, extra=more))
    full = train(
        small_config(corpus, tmp_path / "full", "tram-prev", steps=6, extra=[*extra, "optimizer.calibration_steps=2"])
    )
    assert resumed.start_step == 3 and [s["loss"] for s in resumed.history] == [s["loss"] for s in full.history[3:]]
    assert max_param_diff(trajectory(resumed)["params"], trajectory(full)["params"]) == 0.0


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_saves_and_says_how_to_continue(corpus, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_sample.py"
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(recipe), f"task.data_dir={corpus}", f"trainer.run_dir={run_dir}",
                             "trainer.max_steps=100000", "trainer.progress_bar=false", "trainer.eval_batches=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    csv = run_dir / "logs" / "csv" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (csv.is_file() and csv.read_text().count("\n") > 3):
        time.sleep(0.2)  # training is under way (logs are flushed at the first checkpoint; this waits for rows)
        if proc.poll() is not None:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: stopped by SIGINT after step ") and "trainer.resume=auto" in last
    assert "Traceback" not in err and len(ckpt.list_checkpoints(run_dir)) == 1


@pytest.mark.distributed
def test_a_stop_signal_that_reaches_one_rank_stops_both_after_the_same_step(corpus, tmp_path, monkeypatch):
    """SIGTERM to rank 1 alone, during step 2 of 5 (2 processes): the ranks agree on it where the host waits
    anyway, both save step 2 and stop, each saying how to continue; nothing after step 2 is written."""
    from pathlib import Path

    from launch import launch_two_processes

    tests = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("SIGNAL_AT_STEP", "2")
    monkeypatch.setenv("SIGNAL_RANK", "1")
    run_dir = tmp_path / "run"
    args = [str(tests.parent / "recipes" / "tiny_sample.py"), "--plugin", "signal_one_rank", f"task.data_dir={corpus}",
            "trainer.max_steps=5", "trainer.save_every=0", "trainer.progress_bar=false", "trainer.strategy=ddp",
            f"trainer.run_dir={run_dir}"]  # fmt: skip
    proc = launch_two_processes(args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    # the launcher's summary holds each rank's own line: both stopped after step 2
    assert output.count("traceback : stopped: stopped by SIGTERM after step 2 of 5: ") == 2, output[-3000:]
    assert [ckpt.step_of(c) for c in ckpt.list_checkpoints(run_dir)] == [2]


class TwoRankFabric:
    """A stand-in for two processes' all_reduce: this rank's value against the other rank's."""

    world_size, device = 2, torch.device("cpu")

    def __init__(self, other: float):
        self.other = other

    def all_reduce(self, tensor, reduce_op):
        both = torch.stack([tensor, torch.tensor(self.other)])
        return {"max": both.max(), "min": both.min(), "sum": both.sum()}[reduce_op]


def test_ranks_agree_to_stop_when_any_of_them_was_signalled():
    """The in-process rule behind the 2-process launch test: the signal any rank received (the largest number), so a
    SIGTERM that reached one rank stops both; none received, none stops."""
    import signal

    from fabric_tram.engine.interrupt import StopRequest

    for mine, other, agreed in ((0, 0, 0), (signal.SIGTERM, 0, signal.SIGTERM), (0, signal.SIGTERM, signal.SIGTERM),
                                (signal.SIGINT, signal.SIGTERM, signal.SIGTERM)):  # fmt: skip
        request = StopRequest()
        request.signum = int(mine)
        assert request.agreed(TwoRankFabric(float(other))) == int(agreed), (mine, other)
