"""The preflight (engine/preflight.py): a run that cannot fit is refused before any model is built, with the
numbers and the remedies; one that fits starts; trainer.preflight=false starts anyway."""

import pytest
import torch
from conftest import small_config

import fabric_tram.engine.preflight as preflight
import fabric_tram.engine.setup as setup
from fabric_tram.config import ConfigError, load_config
from fabric_tram.engine.trainer import train


def test_gpt2_xl_on_this_cpu_is_refused_before_it_is_built_with_the_numbers_and_remedies(tmp_path, monkeypatch):
    config = load_config(None, ["model.name=gpt2", "model.preset=gpt2-xl", "task.name=lm", "task.data_dir=demo",
                                "task.tokenizer=gpt2", "task.block_size=1024", "optimizer.name=tram-prev",
                                "trainer.micro_batch_size=4", "trainer.precision=32-true", "trainer.progress_bar=false",
                                f"trainer.run_dir={tmp_path / 'xl'}"])  # fmt: skip
    built = []
    monkeypatch.setattr(setup, "build_model", lambda section: built.append(section))
    with pytest.raises(ConfigError) as err:
        train(config)
    assert built == []  # refused before 1.5B parameters are built (that takes minutes)
    message = str(err.value)
    assert "this run needs about" in message and "GiB per device" in message and "it would not fit" in message
    assert "the CPU has" in message and "GiB of memory available" in message
    for remedy in ("trainer.strategy=fsdp", "trainer.activation_checkpointing=true", "trainer.micro_batch_size",
                   "trainer.precision=bf16-mixed", "trainer.preflight=false"):  # fmt: skip
        assert remedy in message
    assert not (tmp_path / "xl" / "config.yaml").exists()  # nothing written


def test_a_run_that_fits_starts_and_preflight_false_starts_anyway(corpus, tmp_path, monkeypatch):
    assert len(train(small_config(corpus, tmp_path / "fits", "adam", steps=1)).history) == 1
    monkeypatch.setattr(preflight, "available_bytes", lambda device, n: (1024.0, "the CPU has 0.0 GiB available"))
    with pytest.raises(ConfigError, match="it would not fit"):
        train(small_config(corpus, tmp_path / "refused", "adam", steps=1))
    run = train(small_config(corpus, tmp_path / "forced", "adam", steps=1, extra=["trainer.preflight=false"]))
    assert len(run.history) == 1


@pytest.mark.parametrize("devices, nodes, sharing", [(1, 1, 1), (4, 1, 4), (4, 2, 2)])
def test_the_margin_and_the_share_of_a_nodes_memory_decide_exactly(corpus, tmp_path, monkeypatch, devices, nodes,
                                                                   sharing):  # fmt: skip
    """A run fits while its estimate is at most MARGIN (0.9) of the memory one process may take, the CPU's
    available memory divided between the processes of one node (world size / nodes): one byte more is refused."""
    available = 64 * 2**30
    monkeypatch.setattr(preflight, "cpu_available_bytes", lambda: float(available))
    per_process = available / sharing
    config = small_config(corpus, tmp_path / "run", "adam", extra=[f"trainer.num_nodes={nodes}"])
    for needed, refused in ((0.9 * per_process, False), (0.9 * per_process + 1, True)):
        monkeypatch.setattr(preflight, "estimate", lambda c, devices, n=needed: {"total_bytes": n, "bytes": {"all": n}})
        error = preflight.preflight_error(config, devices, torch.device("cpu"))
        assert (error is not None) == refused, (needed, error)
    assert f"this run needs about {(0.9 * per_process + 1) / 2**30:.1f} GiB per device" in error
    assert "the CPU has 64.0 GiB of memory available" in error
    assert (f", shared by {sharing} processes" in error) == (sharing > 1)


def test_a_run_the_estimator_cannot_size_says_the_preflight_was_skipped_and_why(corpus, tmp_path, monkeypatch, capsys):
    def cannot(config, devices):
        raise NotImplementedError("a plugin model without sizes")

    monkeypatch.setattr(preflight, "estimate", cannot)
    run = train(small_config(corpus, tmp_path / "run", "adam", steps=1))
    assert len(run.history) == 1  # it still runs
    assert ("the memory preflight was skipped: model 'gpt2' cannot be estimated (NotImplementedError: a plugin "
            "model without sizes)") in capsys.readouterr().out  # fmt: skip
