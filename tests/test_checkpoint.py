"""Scale equivalence (c) on one process, atomic writes, keep-last-N, refusals; the run folder is never lost."""

import pytest
import torch
from conftest import EXACT_ABS, assert_histories_match, max_param_diff, small_config, trajectory

from fabric_tram.config import ConfigError
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine import checkpoint_files as ckpt_files
from fabric_tram.engine import checkpoint_parts as ckpt_parts
from fabric_tram.engine.evaluation import evaluate_checkpoint
from fabric_tram.engine.trainer import train

DROPOUT = ["model.dropout=0.1"]  # so that the restored RNG state matters


def test_stop_after_step_2_and_resume_equals_uninterrupted(corpus, tmp_path):
    full = trajectory(
        train(small_config(corpus, tmp_path / "full", "adam", micro=2, accumulate=2, steps=4, extra=DROPOUT))
    )
    train(small_config(corpus, tmp_path / "stopped", "adam", micro=2, accumulate=2, steps=2, extra=DROPOUT))
    resumed = train(
        small_config(
            corpus,
            tmp_path / "stopped",
            "adam",
            micro=2,
            accumulate=2,
            steps=4,
            extra=DROPOUT + ["trainer.resume=auto"],
        )
    )
    assert resumed.start_step == 2
    assert trajectory(resumed)["steps"] == full["steps"][2:]
    assert max_param_diff(trajectory(resumed)["params"], full["params"]) == 0.0
    assert (tmp_path / "stopped" / "config.yaml").is_file()
    assert (tmp_path / "stopped" / "config.resumed-step-00000002.yaml").is_file()
    # the first run's metrics survive the resumed run, in the same file, each step once
    assert [int(r["step"]) for r in metrics_rows(tmp_path / "stopped") if r["loss"]] == [1, 2, 3, 4]


def test_keep_last_and_interrupted_save_leaves_previous_loadable(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(small_config(corpus, run_dir, "sgd", steps=4, extra=["trainer.save_every=1", "trainer.keep_last=2"]))
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000003", "step-00000004"]

    real_save = torch.save

    def crash_on_rank_file(obj, path, *a, **k):
        if str(path).endswith("rank-0.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_rank_file)
    with pytest.raises(OSError, match="simulated"):
        train(small_config(corpus, run_dir, "sgd", steps=6, extra=["trainer.save_every=1", "trainer.resume=auto"]))
    monkeypatch.setattr(torch, "save", real_save)
    assert (run_dir / "checkpoints" / "step-00000005.tmp").is_dir()  # the interrupted write...
    assert ckpt.latest_checkpoint(run_dir).name == "step-00000004"  # ...never shadows the last complete one
    run = train(small_config(corpus, run_dir, "sgd", steps=6, extra=["trainer.save_every=1", "trainer.resume=auto"]))
    assert run.start_step == 4 and ckpt.latest_checkpoint(run_dir).name == "step-00000006"
    assert not (run_dir / "checkpoints" / "step-00000005.tmp").exists()


def test_existing_run_folder_is_not_overwritten(corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(small_config(corpus, run_dir, "sgd", steps=1))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run.*trainer.resume=auto"):
        train(small_config(corpus, run_dir, "adam", steps=2))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_checkpoint_of_another_model_is_refused_naming_keys(corpus, tmp_path):
    train(small_config(corpus, tmp_path / "a", "sgd", steps=1))
    config = small_config(
        corpus,
        tmp_path / "b",
        "sgd",
        steps=2,
        extra=["model.n_embd=36", f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'step-00000001'}"],
    )
    with pytest.raises(ckpt.CheckpointError, match=r"model.n_embd: checkpoint 33 vs config 36"):
        train(config)


def test_evaluate_command_reproduces_the_final_evaluation(corpus, tmp_path):
    run = train(small_config(corpus, tmp_path / "run", "adam", steps=2))
    again = evaluate_checkpoint(tmp_path / "run")
    for domain, metrics in run.results["validation"].items():
        assert again["validation"][domain] == pytest.approx(metrics)


KILL_AT_STEP_4 = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import small_config
from fabric_tram.engine.trainer import train

def kill(run, stats):  # kill -9 after steps 3 and 4 were logged (not flushed) and the step-2 checkpoint exists
    if stats["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)

train(small_config({data!r}, {run!r}, "sgd", steps=6, extra=["trainer.save_every=2", "model.dropout=0.1"]),
      callbacks=(kill,))
"""


def metrics_rows(run_dir) -> list[dict]:
    """The rows of a run's CSV log (none if nothing reached the disk)."""
    import csv

    path = run_dir / "logs" / "csv" / "metrics.csv"
    return list(csv.DictReader(open(path))) if path.is_file() else []


def test_a_run_killed_after_its_first_checkpoint_keeps_every_logged_step_once(corpus, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path / "killed"
    code = KILL_AT_STEP_4.format(tests=str(Path(__file__).parent), data=str(corpus), run=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [int(r["step"]) for r in metrics_rows(run_dir) if r["loss"]] == [1, 2]  # flushed with the checkpoint
    extra = ["trainer.save_every=2", "model.dropout=0.1", "trainer.resume=auto"]
    resumed = train(small_config(corpus, run_dir, "sgd", steps=6, extra=extra))
    assert resumed.start_step == 2
    assert [int(r["step"]) for r in metrics_rows(run_dir) if r["loss"]] == [1, 2, 3, 4, 5, 6]
    full = train(small_config(corpus, tmp_path / "full", "sgd", steps=6, extra=extra[:2]))
    assert [float(r["loss"]) for r in metrics_rows(run_dir) if r["loss"]] == [s["loss"] for s in full.history]


def _stopped_run(corpus, tmp_path, rule="sgd"):
    run_dir = tmp_path / "stopped"
    extra = ["trainer.save_every=2", "model.dropout=0.1"]
    train(small_config(corpus, run_dir, rule, steps=4, extra=extra))
    return run_dir, extra


def test_resume_auto_falls_back_past_a_damaged_checkpoint_and_continues_exactly(corpus, tmp_path, capsys):
    run_dir, extra = _stopped_run(corpus, tmp_path)
    rank_file = run_dir / "checkpoints" / "step-00000004" / "rank-0.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:100])  # truncated
    resumed = train(small_config(corpus, run_dir, "sgd", steps=6, extra=extra + ["trainer.resume=auto"]))
    printed = capsys.readouterr().out
    assert "checkpoint step-00000004 is damaged" in printed and "rank-0.pt cannot be read" in printed
    assert resumed.start_step == 2
    full = train(small_config(corpus, tmp_path / "full", "sgd", steps=6, extra=extra))
    assert max_param_diff(trajectory(resumed)["params"], trajectory(full)["params"]) == 0.0
    assert [int(r["step"]) for r in metrics_rows(run_dir) if r["loss"]] == [1, 2, 3, 4, 5, 6]


def test_resume_auto_falls_back_to_the_newest_undamaged_of_several_checkpoints(corpus, tmp_path, capsys):
    run_dir = tmp_path / "stopped"
    extra = ["trainer.save_every=1", "trainer.keep_last=5", "model.dropout=0.1"]
    train(small_config(corpus, run_dir, "sgd", steps=4, extra=extra))
    assert [ckpt.step_of(c) for c in ckpt.list_checkpoints(run_dir)] == [1, 2, 3, 4]
    (run_dir / "checkpoints" / "step-00000004" / "rank-0.pt").write_bytes(b"")
    resumed = train(small_config(corpus, run_dir, "sgd", steps=5, extra=extra + ["trainer.resume=auto"]))
    assert resumed.start_step == 3  # the newest complete one before the damaged, not an older one
    assert "resumed from" in capsys.readouterr().out and [s["step"] for s in resumed.history] == [4, 5]


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c: (c / "rank-0.pt").write_bytes(b""), r"rank-0.pt cannot be read"),
        (lambda c: (c / "state" / ".metadata").write_bytes(b""), r"state/.metadata is missing or empty"),
        (
            lambda c: [f.write_bytes(f.read_bytes()[:500]) for f in (c / "state").glob("*.distcp")],
            r"distcp is truncated or missing \(500 of \d+ bytes\)",
        ),
        (lambda c: (c / "global.pt").write_bytes(b"oops"), r"global.pt cannot be read"),
        (lambda c: (c / "meta.json").write_text("{not json"), r"meta.json is corrupt"),
    ],
)
def test_a_damaged_checkpoint_named_for_resume_is_a_clear_error(corpus, tmp_path, damage, message):
    run_dir, extra = _stopped_run(corpus, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-00000004"
    damage(checkpoint)
    with pytest.raises(ckpt.CheckpointError, match=message):
        train(small_config(corpus, tmp_path / "again", "sgd", steps=6, extra=extra + [f"trainer.resume={checkpoint}"]))
    assert not (tmp_path / "again" / "checkpoints").exists()  # refused before any step


def test_resuming_with_another_rule_says_what_differs(corpus, tmp_path):
    run_dir, extra = _stopped_run(corpus, tmp_path, rule="tram-prev")
    with pytest.raises(
        ckpt.CheckpointError, match=r"optimizer.name: checkpoint 'tram-prev' vs config 'adam'.*previous_iterate"
    ):
        train(small_config(corpus, run_dir, "adam", steps=6, extra=extra + ["trainer.resume=auto"]))


def test_resume_auto_without_a_checkpoint_says_it_starts_over(corpus, tmp_path, capsys):
    run = train(small_config(corpus, tmp_path / "new", "sgd", steps=1, extra=["trainer.resume=auto"]))
    assert run.start_step == 0 and "no complete checkpoint" in capsys.readouterr().out


def test_resume_auto_on_a_finished_run_does_nothing_again(corpus, tmp_path, capsys):
    done = train(small_config(corpus, tmp_path / "run", "sgd", steps=2))
    csv_file = tmp_path / "run" / "logs" / "csv" / "metrics.csv"
    rows, results = csv_file.read_text(), (tmp_path / "run" / "results.json").read_text()
    again = train(small_config(corpus, tmp_path / "run", "sgd", steps=2, extra=["trainer.resume=auto"]))
    assert "finished at step 2 already" in capsys.readouterr().out
    assert again.history == [] and again.results == done.results
    assert csv_file.read_text() == rows and (tmp_path / "run" / "results.json").read_text() == results


def write_format_1(run, folder):
    """A checkpoint in the first layout (before resharding), as fabric_tram wrote it: ``fabric.save`` of the model
    and optimizer, the rule's state and RNG in the rank file, meta.json without a format."""
    import json

    folder.mkdir(parents=True)
    run.fabric.save(folder / "state", {"model": run.model, "optimizer": run.optimizer, "step": 2})
    torch.save({"rng": ckpt_parts.rng_state(), "rule": run.rule.state_dict(), "scaler": None}, folder / "rank-0.pt")
    meta = json.loads((ckpt.checkpoint_path(run.run_dir, 2) / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("format", "global_batch", "micro_batch_size", "accumulate")}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_of_the_first_format_still_resumes(corpus, tmp_path):
    extra = ["optimizer.calibration_steps=2", "model.dropout=0.1"]
    first = train(small_config(corpus, tmp_path / "a", "tram-prev", steps=2, extra=extra))
    old = tmp_path / "old" / "checkpoints" / "step-00000002"
    # the RNG as the step-2 save saw it (training ended there; the evaluation after it draws nothing in eval mode)
    ckpt_parts.set_rng_state(torch.load(ckpt.checkpoint_path(first.run_dir, 2) / "rank-0.pt")["rng"])
    write_format_1(first, old)
    new = ckpt.checkpoint_path(first.run_dir, 2)
    from_old = train(
        small_config(corpus, tmp_path / "b", "tram-prev", steps=4, extra=[*extra, f"trainer.resume={old}"])
    )
    from_new = train(
        small_config(corpus, tmp_path / "c", "tram-prev", steps=4, extra=[*extra, f"trainer.resume={new}"])
    )
    assert from_old.start_step == from_new.start_step == 2
    assert [s["loss"] for s in from_old.history] == [s["loss"] for s in from_new.history]
    assert max_param_diff(trajectory(from_old)["params"], trajectory(from_new)["params"]) == 0.0


def test_resume_with_another_split_of_the_same_global_batch_and_refuse_another_global_batch(corpus, tmp_path):
    """The data position is step × examples per step: 2 × 2 resumed as 1 × 4 continues exactly (float64); 2 × 1
    is refused with the arithmetic, before anything is loaded."""
    extra = ["optimizer.calibration_steps=2"]
    train(small_config(corpus, tmp_path / "run", "tram-prev", micro=2, accumulate=2, steps=2, extra=extra))
    full = train(small_config(corpus, tmp_path / "full", "tram-prev", micro=2, accumulate=2, steps=4, extra=extra))
    resumed = train(small_config(corpus, tmp_path / "run", "tram-prev", micro=1, accumulate=4, steps=4,
                                 extra=[*extra, "trainer.resume=auto"]))  # fmt: skip
    assert_histories_match(full.history[2:], resumed.history, ("loss", "d", "radius", "e_norm", "radius_scale"))
    assert max_param_diff(trajectory(resumed)["params"], trajectory(full)["params"]) < EXACT_ABS
    with pytest.raises(ckpt.CheckpointError, match=r"Keep micro_batch_size × accumulate × processes = 4"):
        train(small_config(corpus, tmp_path / "run", "tram-prev", micro=2, accumulate=1, steps=6,
                           extra=[*extra, "trainer.resume=auto"]))  # fmt: skip


def test_rule_buffers_are_saved_under_the_model_states_names_whatever_wraps_the_model():
    """A checkpoint's rule keys (TRAM's θ_{t-1} per parameter) must name each parameter as the model's state does
    (torch.distributed.checkpoint's names), compiled or not, wrapped or not: a run resumed, evaluated or exported
    with another wrapping then finds every buffer. Wrappings: torch.compile of the whole model (an OptimizedModule:
    '_orig_mod.'), of one block in place of it, and activation checkpointing's wrapper."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from fabric_tram.engine.checkpoint_state import rule_tensors
    from fabric_tram.models.gpt2 import GPT2, GPT2Config
    from fabric_tram.optim.api import UpdateRuleLoop

    def plain():
        torch.manual_seed(0)
        return GPT2(GPT2Config(preset="tiny", n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_positions=8))

    def rule_names(model) -> set[str]:
        loop = UpdateRuleLoop("tram-prev", model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: None)
        keys = rule_tensors(loop.rule, model)
        assert {k.split("/", 1)[0] for k in keys} == {"previous_iterate"}
        return {k.split("/", 1)[1] for k in keys}

    expected = set(get_model_state_dict(plain())) - {"lm_head.weight"}  # tied: named once, as the embedding
    assert expected and rule_names(plain()) == expected
    whole = torch.compile(plain())
    assert any("_orig_mod." in n for n, _ in whole.named_parameters())
    block = plain()
    block.transformer.h[0] = torch.compile(block.transformer.h[0])
    wrapped = plain()
    wrapped.transformer.h[1] = checkpoint_wrapper(wrapped.transformer.h[1])
    for model in (whole, block, wrapped):
        assert rule_names(model) == expected == set(get_model_state_dict(model)) - {"lm_head.weight"}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process, no group
def test_a_shard_missing_only_its_last_byte_is_refused_and_a_complete_one_passes(tmp_path):
    """The shard check (run on every resume, before the collective load) reads the end of every item a shard file
    holds (offset + length, the largest): a file one byte short of its last item is damaged; the same file whole is
    not. A distributed checkpoint written here: two tensors in one shard file, the second at an offset."""
    import torch.distributed.checkpoint as dcp

    state = tmp_path / "state"
    dcp.save({"a": torch.arange(10.0), "b": torch.ones(3, 4, dtype=torch.float64)}, checkpoint_id=str(state))
    (shard,) = state.glob("*.distcp")
    ckpt_files.check_state_files(tmp_path)  # complete: passes
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-1])
    with pytest.raises(ckpt.CheckpointError, match=rf"{shard.name} is truncated or missing \({len(whole) - 1} of "
                                                  rf"{len(whole)} bytes\)"):  # fmt: skip
        ckpt_files.check_state_files(tmp_path)
    shard.unlink()
    with pytest.raises(ckpt.CheckpointError, match=rf"{shard.name} is truncated or missing \(missing of "):
        ckpt_files.check_state_files(tmp_path)
    shard.write_bytes(whole)
    ckpt_files.check_state_files(tmp_path)


def test_a_resume_names_what_differs_the_rule_the_base_optimizer_or_the_examples_per_step(tmp_path):
    """The checks a resume runs on meta.json, each on its own (the run-level test below goes through train): the
    rule and its base optimizer compared by name, the global batch compared whatever its split."""
    meta = {"step": 2, "world_size": 2, "optimizer": "tram-prev", "optimizer_base": "adam", "rule_state": ["prev"],
            "global_batch": 12, "micro_batch_size": 2, "accumulate": 3}  # fmt: skip
    ckpt_files.check_same_optimizer(meta, {"name": "tram-prev", "base": "adam"}, tmp_path)
    for config, differs in (
        ({"name": "tram-prev", "base": "sgd"}, "optimizer.base: checkpoint 'adam' vs config 'sgd'"),
        ({"name": "asam", "base": "adam"}, "optimizer.name: checkpoint 'tram-prev' vs config 'asam'"),
    ):
        with pytest.raises(ckpt.CheckpointError, match=rf"another optimizer \({differs}\), whose state .*prev"):
            ckpt_files.check_same_optimizer(meta, config, tmp_path)
    ckpt_files.check_global_batch(meta, 12, "4 × 3 × 1 process", tmp_path)  # another split of the same 12
    with pytest.raises(ckpt.CheckpointError, match=r"trained with 12 examples per optimizer step \(2 × 3 × 2 "
                                                   r"process\(es\)\); this run takes 8 \(2 × 2 × 2\)"):  # fmt: skip
        ckpt_files.check_global_batch(meta, 8, "2 × 2 × 2", tmp_path)
    ckpt_files.check_global_batch({k: v for k, v in meta.items() if k != "global_batch"}, 8, "", tmp_path)  # format 1


def test_meta_json_holds_each_field_resume_and_export_read_and_resume_compares_rule_and_base(corpus, tmp_path):
    """meta.json field by field (a global batch of 2 × 3 = 6, neither factor alone; a rule over adam, the rule's
    name ≠ its base's), and a resume refused, naming the field, for another rule, another base optimizer with the
    same rule, or another global batch; another split of the same global batch resumes."""
    import json

    from fabric_tram.config import to_dict

    extra = ["trainer.save_every=2", "optimizer.base=adam", "optimizer.radius_scale=1"]
    config = small_config(corpus, tmp_path / "run", "tram-prev", micro=2, accumulate=3, steps=2, extra=extra)
    run = train(config)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta == {"format": 2, "step": 2, "world_size": 1, "model": json.loads(json.dumps(to_dict(config)["model"])),
                    "optimizer": "tram-prev", "optimizer_base": "adam", "rule_state": sorted(run.rule.state_dict()),
                    "global_batch": 6, "micro_batch_size": 2, "accumulate": 3, "labels": None}  # fmt: skip
    assert "previous_iterate" in meta["rule_state"]
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002"
    for rule, more, refusal in (
        ("tram-prev", ["optimizer.base=sgd"], r"optimizer.base: checkpoint 'adam' vs config 'sgd'\)"),
        ("asam", ["optimizer.base=adam"], r"optimizer.name: checkpoint 'tram-prev' vs config 'asam'\)"),
    ):
        with pytest.raises(ckpt.CheckpointError, match=refusal):
            train(small_config(corpus, tmp_path / rule, rule, micro=2, accumulate=3, steps=4,
                               extra=[*more, f"trainer.resume={step2}"]))  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match=r"trained with 6 examples per optimizer step \(2 × 3 × 1"):
        train(small_config(corpus, tmp_path / "b4", "tram-prev", micro=2, accumulate=2, steps=4,
                           extra=[*extra, f"trainer.resume={step2}"]))  # fmt: skip
    resumed = train(small_config(corpus, tmp_path / "b6", "tram-prev", micro=3, accumulate=2, steps=3,
                                 extra=[*extra, f"trainer.resume={step2}"]))  # fmt: skip
    assert resumed.start_step == 2
