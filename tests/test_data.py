"""Data pipeline: the true GPT-2 tokenizer offline, domains and splits, packing, padding, errors, batching."""

import json

import numpy as np
import pytest
import torch

from fabric_tram.config import load_config
from fabric_tram.data.batching import StepSampler, eval_batches
from fabric_tram.data.text import DataError
from fabric_tram.data.tokenizer import GPT2_EOT, load_tokenizer
from fabric_tram.tasks.language_modeling import DocumentSequences, LanguageModelingTask, PackedBlocks


def lm(data_dir, *overrides):
    config = load_config(
        None, ["model.name=gpt2", "task.name=lm", "optimizer.name=adam", f"task.data_dir={data_dir}", *overrides]
    )
    return LanguageModelingTask(config.task)


def test_bundled_gpt2_tokenizer_gives_gpt2_ids():
    tok = load_tokenizer("gpt2")
    assert tok.get_vocab_size() == 50257
    assert tok.encode("Hello world").ids == [15496, 995]  # GPT-2's published ids
    assert tok.decode([15496, 995, 0]) == "Hello world!"


def test_domains_splits_and_packing(corpus):
    task = lm(corpus, "task.block_size=16", "task.train_domains=[alpha]")
    assert (
        task.domains == ["alpha", "beta"] and task.train_domains == ["alpha"] and task.eval_domains == ["alpha", "beta"]
    )
    assert all(len(task.train_set[i]) == 17 for i in range(len(task.train_set)))  # block + 1 shifted target
    tokens = load_tokenizer("gpt2")
    first_doc = (corpus / "alpha" / "train.txt").read_text().split("\n\n")[0]
    expected = tokens.encode(first_doc).ids + [GPT2_EOT]
    assert task.train_set[0].tolist() == expected[:17]
    batch = task.collate([task.train_set[0], task.train_set[1]], [0, 1])
    assert torch.equal(batch["labels"][0], task.train_set[0][1:]) and torch.equal(
        batch["input_ids"][0], task.train_set[0][:-1]
    )


def test_packed_blocks_keep_token_order_and_drop_the_tail():
    tokens = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=np.uint16)
    blocks = PackedBlocks(tokens, block_size=3)
    assert [blocks[i].tolist() for i in range(len(blocks))] == [[1, 2, 3, 4], [4, 5, 6, 7]]
    docs = DocumentSequences(tokens, np.array([3, 4, 9]), block_size=3)  # documents [1 2 3] [4] [5 6 7 8 9]
    assert [docs[i].tolist() for i in range(len(docs))] == [[1, 2, 3], [5, 6, 7, 8]]


def test_unpacked_documents_are_padded_and_masked(corpus):
    task = lm(corpus, "task.packing=false", "task.block_size=32")
    lengths = {len(task.train_set[i]) for i in range(len(task.train_set))}
    assert len(lengths) > 3 and max(lengths) <= 33
    examples = sorted([task.train_set[i] for i in range(4)], key=len)
    batch = task.collate(examples, [0, 1, 2, 3])
    assert (batch["labels"] != -100).sum(1).tolist() == [len(s) - 1 for s in examples]


def test_jsonl_and_corrupt_line_reported_with_file_and_line(tmp_path):
    folder = tmp_path / "d" / "news"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(json.dumps({"text": "a b c " * 50}) + "\n" + '{"text": "broken\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: corrupt JSON line"):
        lm(tmp_path / "d")
    (folder / "train.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: expected an object with a string field 'text'"):
        lm(tmp_path / "d")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_file_that_is_not_utf8_names_its_line_and_byte(tmp_path, suffix):
    folder = tmp_path / "d" / "news"
    folder.mkdir(parents=True)
    lines = [json.dumps({"text": "a b c " * 50}) if suffix == ".jsonl" else "a b c " * 50] * 3
    text = ("\n".join(lines) + "\n").encode()
    (folder / f"train{suffix}").write_bytes(text + "caf\xe9 au lait\n".encode("latin1") * 2)
    with pytest.raises(DataError, match=rf"train{suffix}:4: byte {len(text) + 3} \(0xe9\) is not UTF-8 .*re-encode"):
        lm(tmp_path / "d")


def test_missing_empty_and_too_small_data(tmp_path, corpus):
    with pytest.raises(DataError, match="does not exist; set task.data_dir"):
        lm(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no domain"):
        lm(tmp_path / "empty")
    with pytest.raises(DataError, match=r"domain\(s\) \['gamma'\] not found.*available: alpha, beta"):
        lm(corpus, "task.train_domains=[gamma]")
    small = tmp_path / "small" / "tiny"
    small.mkdir(parents=True)
    (small / "train.txt").write_text("just a few words\n")
    with pytest.raises(DataError, match="too little text for one sequence of block_size=128"):
        lm(tmp_path / "small")


def test_step_sampler_splits_the_same_examples_whatever_the_layout():
    def step_examples(micro, accumulate, world):
        out = []
        for step in range(5):
            per_rank = [StepSampler(37, micro, accumulate, world, r, seed=3).step_indices(step) for r in range(world)]
            out.append(sorted(i for rank in per_rank for mb in rank for i in mb))
        return out

    reference = step_examples(8, 1, 1)
    assert step_examples(2, 4, 1) == reference == step_examples(2, 2, 2) == step_examples(4, 1, 2)
    assert reference[0] != reference[1]  # successive steps move on through the permutation
    single = StepSampler(37, 8, 1, 1, 0, seed=3)
    stream = [i for step in range(5) for i in single.step_indices(step)[0]]
    assert sorted(stream[:37]) == list(range(37))  # one epoch visits every example once


def test_each_epoch_is_a_new_order_of_every_example_and_the_seed_fixes_it():
    def epochs(seed, n=3):
        sampler = StepSampler(20, 4, 1, 1, 0, seed=seed)  # 5 steps per epoch
        stream = [i for step in range(5 * n) for i in sampler.step_indices(step)[0]]
        return [stream[k * 20 : (k + 1) * 20] for k in range(n)]

    orders = epochs(seed=3)
    assert all(sorted(order) == list(range(20)) for order in orders)  # each epoch visits every example once
    assert len({tuple(order) for order in orders}) == 3  # in an order of its own (200 vision epochs)
    assert epochs(seed=3) == orders and epochs(seed=4)[0] != orders[0]  # resumable: a function of seed and epoch


def test_eval_batches_equal_count_per_rank_and_cover_everything():
    per_rank = [eval_batches(11, 2, 3, r) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # FSDP: every rank joins every forward
    assert sorted(i for b in per_rank for mb in b for i in mb) == list(range(11))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_batches_is_a_global_count_the_same_examples_whatever_the_processes(world):
    per_rank = [eval_batches(11, 2, world, r, max_batches=3) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert sorted(i for b in per_rank for mb in b for i in mb) == list(range(6))  # 3 batches of 2, not 3 per rank


@pytest.mark.parametrize("split,content,message", [("validation", None, "has no validation split"),
                                                   ("test", "", "too little text")])  # fmt: skip
def test_every_split_the_run_will_read_is_checked_before_the_first_step(corpus, tmp_path, split, content, message):
    from conftest import small_config

    from fabric_tram.engine.trainer import train

    path = corpus / "beta" / f"{split}.txt"
    path.unlink() if content is None else path.write_text(content)
    steps = []
    config = small_config(corpus, tmp_path / "run", "sgd", extra=["trainer.eval_splits=[validation,test]"])
    with pytest.raises(DataError, match=message):
        train(config, callbacks=(lambda run, stats: steps.append(stats),))
    assert steps == [] and not (tmp_path / "run" / "config.yaml").exists()  # no step ran, nothing was written


def test_m2d2_domain_unpacked_once_when_ranks_ask_together(tmp_path, monkeypatch):
    """Every rank of every node that shares the cache asks for the domain at start-up: the first unpacks it under
    a file lock, the others wait and find it complete (before the lock they raced on one temporary folder)."""
    import tarfile
    import threading
    import time

    import huggingface_hub

    from fabric_tram.data import m2d2

    source = tmp_path / "src" / "math_l1"
    source.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (source / f"{split}.txt").write_text(f"{split} text\n")
    archive = tmp_path / "math_l1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="math_l1")
    downloads = []

    def slow_download(**kwargs):
        downloads.append(kwargs["filename"])
        time.sleep(0.3)  # long enough for every other rank to arrive meanwhile
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", slow_download)
    found, errors = [], []

    def rank():
        try:
            found.append(m2d2.fetch_domain("math_l1", root=tmp_path / "cache"))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(found) == 4 and len(set(found)) == 1
    assert downloads == ["data/math_l1.tar.gz"]  # one download and unpack for the four
    assert (found[0] / "train.txt").read_text() == "train text\n" and (found[0] / ".complete").is_file()
