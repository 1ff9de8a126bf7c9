"""Scale equivalence (b) and (c) on 2 CPU processes (gloo): DDP and FSDP2 vs 1 process, in float64 (the
comparison is about the algebra; conftest's tolerances); resume under each, exactly."""

from pathlib import Path

import pytest
import torch
from conftest import (
    DIST_RULES,
    DIST_VARIANTS,
    EXACT_ABS,
    EXACT_REL,
    LLAMA_LORA,
    LLAMA_MODEL,
    assert_histories_match,
    dist_rule,
    hf_checkpoints,
    max_param_diff,
    measure_run,
    rule_extra,
    small_config,
    small_pretrained,
    trajectory,
    vit_smoke_config,
    write_corpus,
    xnli_smoke_config,
)
from launch import launch_two_processes

from fabric_tram.engine.checkpoint import CheckpointError
from fabric_tram.engine.trainer import train

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).parent / "dist_worker.py"
RULES = (*DIST_RULES, *DIST_VARIANTS)
RULE_KEYS = ("n_targets", "loss", "Tg_norm", "e_norm", "radius", "d", "regulariser", "radius_scale")


def launch(strategy, corpus, out) -> dict:
    """One 2-process launch of the worker (retried once if a process is killed by a signal)."""
    launch_two_processes([str(WORKER), strategy, str(corpus), str(out)], fresh=(out,))
    return torch.load(out / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "data")
    ref = {}
    for opt in ("sgd", "adam"):
        run = train(small_config(corpus, root / f"ref-{opt}", opt, micro=2, accumulate=4))  # the ranks' batch size
        ref[opt] = {**trajectory(run), "results": run.results}
    for name in RULES:
        rule, extra = dist_rule(name)
        run = train(small_config(corpus, root / f"ref-{name}", rule, micro=8, accumulate=1, extra=extra))
        ref[name] = {"history": run.history, "params": trajectory(run)["params"]}
    extra = rule_extra("tram-prev")
    run = train(small_config(corpus, root / "ref-llama", "tram-prev", micro=8, extra=extra, model=LLAMA_MODEL))
    ref["llama"] = {"history": run.history, "params": trajectory(run)["params"]}
    ref["measure"] = measure_run(root / "ref-adam", small_pretrained(corpus, root / "pretrained"))
    hf = hf_checkpoints(root, corpus)  # transformers models (model.name=hf) on 1 process, micro-batches 8 × 1
    for name, family, rule, lora in (("hf-gpt2", "gpt2", "tram-x", []), ("hf-llama-lora", "llama", "tram-prev",
                                                                            LLAMA_LORA)):  # fmt: skip
        run = train(small_config(corpus, root / f"ref-{name}", rule, micro=8, extra=rule_extra(rule),
                                 model=[*hf[family][1], *lora]))  # fmt: skip
        ref[name] = {"history": run.history, "params": trajectory(run)["params"]}
    run = train(xnli_smoke_config(root / "ref-xnli", micro=2, accumulate=2))
    ref["xnli"] = {"history": run.history, "params": trajectory(run)["params"], "results": run.results}
    run = train(vit_smoke_config(root / "ref-vit", micro=1, accumulate=4))  # other micro-batches than the ranks
    ref["vit"] = {"history": run.history, "params": trajectory(run)["params"], "results": run.results}
    # resharding checkpoints: an uninterrupted tram-prev run, and step 2 of it saved by 1 process
    reshard = ["trainer.save_every=0", *rule_extra("tram-prev")]
    run = train(small_config(corpus, root / "reshard-full", "tram-prev", micro=2, accumulate=4, steps=4, extra=reshard))
    ref["reshard"] = {"history": run.history, "params": trajectory(run)["params"], "extra": reshard}
    train(small_config(corpus, root / "reshard-1", "tram-prev", micro=2, accumulate=4, steps=2, extra=reshard))
    return root, corpus, ref


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(reference, strategy):
    root, corpus, ref = reference
    got = launch(strategy, corpus, root / strategy)
    assert got["world_size"] == 2
    for opt in ("sgd", "adam"):
        assert got[opt]["results_json_seen_by_rank"] == [1.0, 1.0]  # train() returns after rank 0's writes
        per_rank = torch.tensor(got[opt]["n_local_per_rank"])  # (ranks, steps)
        assert (per_rank[0] != per_rank[1]).any(), "ranks should hold unequal token counts"
        assert [s["n_targets"] for s in ref[opt]["steps"]] == [s["n_targets"] for s in got[opt]["steps"]]
        # grad_norm: the shard-aware global norm
        assert_histories_match(ref[opt]["steps"], got[opt]["steps"], ("loss", "grad_norm"), label=opt)
        assert max_param_diff(ref[opt]["params"], got[opt]["params"]) < EXACT_ABS
        for split, domains in ref[opt]["results"].items():  # eval_batches=1 scores the same examples on 2 ranks
            for domain, metrics in domains.items():
                theirs = got[opt]["results"][split][domain]
                assert metrics["tokens"] == theirs["tokens"], (opt, split, domain)
                assert metrics["loss"] == pytest.approx(theirs["loss"], rel=EXACT_REL), (opt, split, domain)
    # (c) resumed from step 2: steps 3-4 and the final weights equal the uninterrupted run exactly
    assert got["resumed"]["steps"] == got["uninterrupted"]["steps"][2:]
    assert max_param_diff(got["resumed"]["params"], got["uninterrupted"]["params"]) == 0.0
    tram = got["tram_resume"]
    assert tram["resumed"] == tram["full"] and all(d > 0 for d in tram["full"])
    assert max_param_diff(*tram["diff"]) == 0.0
    # TRAM's scale calibrated at step 2 (tram-prev) and tram-x's reused radius at step 3 are in the comparison
    assert "radius_scale" in ref["tram-prev"]["history"][2] and "d" not in ref["tram-x"]["history"][2]
    for rule in RULES:  # the update rules: per-step ‖T g‖, ‖e‖, d, the regulariser, and the final weights
        assert_histories_match(ref[rule]["history"], got[rule]["history"], RULE_KEYS, label=rule)
        assert max_param_diff(ref[rule]["params"], got[rule]["params"]) < EXACT_ABS, rule
    if strategy == "fsdp":  # the Llama family under FSDP2: TRAM's d, radius and ‖e‖ per step, the final weights
        assert "radius_scale" in ref["llama"]["history"][2]
        assert_histories_match(ref["llama"]["history"], got["llama"]["history"], RULE_KEYS, label="llama")
        assert max_param_diff(ref["llama"]["params"], got["llama"]["params"]) < EXACT_ABS
        # ε-sharpness and CKA of a sharded checkpoint on 2 processes = on 1 (the same batches, float64)
        for kind, key in (("sharpness", "sharpness"), ("cka", "cka")):
            assert set(got["measure"][kind]) == set(ref["measure"][kind]) and ref["measure"][kind]
            for domain, value in ref["measure"][kind].items():
                assert got["measure"][kind][domain][key] == pytest.approx(value[key], rel=1e-9), (kind, domain)
        assert all(v["sharpness"] > 0 for v in ref["measure"]["sharpness"].values())
        # model.name=hf on 2 FSDP2 processes (per-block shards of a transformers model; noise by its embedding's
        # hook), and LoRA adapters on its frozen sharded base: the steps and the final weights of 1 process
        for name in ("hf-gpt2", "hf-llama-lora"):
            assert "d" in ref[name]["history"][0] and "radius_scale" in ref[name]["history"][2 if "lora" in name else 1]
            assert_histories_match(ref[name]["history"], got[name]["history"], RULE_KEYS, label=name)
            assert max_param_diff(ref[name]["params"], got[name]["params"]) < EXACT_ABS, name
        frozen = [k for k in ref["hf-llama-lora"]["params"] if "lora_" not in k]
        assert frozen and all(torch.equal(ref["hf-llama-lora"]["params"][k], got["hf-llama-lora"]["params"][k])
                              for k in frozen)  # fmt: skip
        # the XNLI recipe's smoke on 2 FSDP2 processes: the encoder's steps, weights and per-language evaluation
        assert_histories_match(ref["xnli"]["history"], got["xnli"]["history"], RULE_KEYS, label="xnli")
        assert max_param_diff(ref["xnli"]["params"], got["xnli"]["params"]) < EXACT_ABS
        for split, languages in ref["xnli"]["results"].items():
            assert set(languages) == {"en", "fr", "de", "es"}
            for language, metrics in languages.items():
                theirs = got["xnli"]["results"][split][language]
                assert metrics["loss"] == pytest.approx(theirs["loss"], rel=EXACT_REL)
                assert metrics["accuracy"] == theirs["accuracy"]
        # the vision recipe's smoke on 2 FSDP2 processes: ViT steps with tram-x, weights, test accuracy
        assert "radius_scale" in ref["vit"]["history"][1] and len(ref["vit"]["history"]) == 6
        assert_histories_match(ref["vit"]["history"], got["vit"]["history"], RULE_KEYS, label="vit")
        assert max_param_diff(ref["vit"]["params"], got["vit"]["params"]) < EXACT_ABS
        for split, datasets in ref["vit"]["results"].items():
            for dataset, metrics in datasets.items():
                assert metrics["loss"] == pytest.approx(got["vit"]["results"][split][dataset]["loss"], rel=EXACT_REL)
                assert metrics["accuracy"] == got["vit"]["results"][split][dataset]["accuracy"]
    if strategy == "fsdp":  # a checkpoint of 2 FSDP2 processes resumed on 1 (accumulate 4), and of 1 on 2
        full, extra = ref["reshard"]["history"], [*ref["reshard"]["extra"], "trainer.resume=auto"]
        one = train(small_config(corpus, root / strategy / "reshard-2", "tram-prev", micro=2, accumulate=4, steps=4,
                                 extra=extra))  # fmt: skip
        two = got["reshard_from_1"]
        assert one.start_step == two["start"] == 2 and "radius_scale" in full[2]  # calibrated before the save
        for label, resumed in (("2 -> 1", one.history), ("1 -> 2", two["history"])):
            assert_histories_match(full[2:], resumed, RULE_KEYS, label=label)
        assert max_param_diff(trajectory(one)["params"], ref["reshard"]["params"]) < EXACT_ABS
        assert max_param_diff(two["params"], ref["reshard"]["params"]) < EXACT_ABS
        # export on 1 process: the 2-process checkpoint gives the 1-process one's weights
        from safetensors.torch import load_file

        from fabric_tram.engine.export import export

        for name, run_dir in (("two", root / strategy / "reshard-2"), ("one", root / "reshard-1")):
            export(run_dir / "checkpoints" / "step-00000002", root / f"export-{name}", dtype="float64")
        two, one = (load_file(root / f"export-{n}" / "model.safetensors") for n in ("two", "one"))
        assert set(two) == set(one) and max((two[k] - one[k]).abs().max() for k in one) < EXACT_ABS
        # and `fabric-tram evaluate` of the 2-process checkpoint on 1 process scores what the 1-process one does
        from fabric_tram.engine.evaluation import evaluate_checkpoint

        scores = [evaluate_checkpoint(d / "checkpoints" / "step-00000002", ["trainer.eval_batches=2"], ["test"])
                  for d in (root / strategy / "reshard-2", root / "reshard-1")]  # fmt: skip
        for domain, metrics in scores[1]["test"].items():
            assert scores[0]["test"][domain]["loss"] == pytest.approx(metrics["loss"], rel=EXACT_REL)
        refused = r"trained with 8 examples per optimizer step \(2 × 4 × 1 process\(es\)\); this run takes 4 \(2 × 2"
        with pytest.raises(CheckpointError, match=refused):  # the newest checkpoint is now the 1-process one
            train(small_config(corpus, root / strategy / "reshard-2", "tram-prev", micro=2, accumulate=2, steps=4,
                               extra=extra))  # fmt: skip
    if strategy == "fsdp":  # negative control: without the all-reduce of the sums of squares, e is wrong
        wrong = got["asam_per_shard_norm"]
        assert wrong["history"][0]["Tg_norm"] != pytest.approx(ref["asam"]["history"][0]["Tg_norm"], rel=1e-3)
        assert max_param_diff(ref["asam"]["params"], wrong["params"]) > 1e6 * EXACT_ABS
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
        assert max_param_diff(ref["sgd"]["params"], got["sgd_without_W"]["params"]) > 1e6 * EXACT_ABS
    if strategy == "fsdp":
        assert got["wte_local_rows"] < got["wte_rows"]  # data-parallel size = world size: really sharded
        assert got["root_sharded_after_no_grad_forward"] is False  # docs/design.md: the fact, confirmed
        assert got["root_sharded_after_reshard"] is True
        assert got["sharded_after_evaluate"] is True
