"""Planted bugs in the engine (fabric_tram/engine): checkpoints, export, generate, preflight, signals, the loop."""

from __future__ import annotations

from .mutation import Mutation

MUTATIONS = (  # fmt: skip
    Mutation(
        "resume-takes-the-saving-runs-kernels",
        "a resumed optimizer keeps the checkpoint's fused/foreach flags (a CPU run's fused SGD under FSDP2 fails)",
        (
            (
                "fabric_tram/engine/checkpoint_parts.py",
                "        with implementation_kept(torch_optimizer):\n",
                "        if True:\n",
            ),
        ),
        ("tests/test_base_optimizers.py::test_a_loaded_state_keeps_this_runs_kernels_not_the_saving_runs",),
    ),
    Mutation(
        "logs-not-flushed-at-checkpoints",
        "the CSV log is not flushed with a checkpoint (a kill -9 then loses the steps before it)",
        (
            (
                "fabric_tram/engine/trainer.py",
                "        run.last_saved = step\n        flush_logs(run)\n",
                "        run.last_saved = step\n",
            ),
        ),
        ("tests/test_checkpoint.py::test_a_run_killed_after_its_first_checkpoint_keeps_every_logged_step_once",),
    ),
    Mutation(
        "no-fallback-past-a-damaged-checkpoint",
        "resume=auto gives up on a damaged newest checkpoint instead of using the one before",
        (
            (
                "fabric_tram/engine/checkpoint.py",
                "for candidate in [path, *(older if fallback else [])]:",
                "for candidate in [path]:",
            ),
        ),
        ("tests/test_checkpoint.py::test_resume_auto_falls_back_past_a_damaged_checkpoint_and_continues_exactly",),
    ),
    Mutation(
        "workers-see-other-steps",
        "background batch workers build the steps shifted by one",
        (("fabric_tram/engine/batches.py", "sampler=range(first - 1, last)", "sampler=range(first, last + 1)"),),
        ("tests/test_images.py::test_epochs_workers_accumulation_and_mid_epoch_resume_change_nothing",),
    ),
    Mutation(
        "estimate-one-token-per-image",
        "fabric-tram estimate counts one token per image instead of the [CLS] and the patches",
        (
            (
                "fabric_tram/engine/estimate.py",
                "    T = tokens_per_example(model)\n",
                "    T = None\n",
            ),
        ),
        ("tests/test_vit.py::test_estimate_counts_patches_and_the_tensors_a_block_saves",),
    ),
    Mutation(
        "resume-falls-back-to-the-oldest",
        "resume=auto falls back to the oldest complete checkpoint instead of the newest before the damaged one",
        (
            (
                "fabric_tram/engine/checkpoint.py",
                "older = [c for c in reversed(list_checkpoints(run.run_dir))",
                "older = [c for c in list_checkpoints(run.run_dir)",
            ),
        ),
        ("tests/test_checkpoint.py::test_resume_auto_falls_back_to_the_newest_undamaged_of_several_checkpoints",),
    ),
    Mutation(
        "sigterm-ignored",
        "a SIGTERM during training is recorded but the loop never stops to save a checkpoint",
        (
            (
                "fabric_tram/engine/trainer.py",
                "signum = stop.agreed(fabric) if stop is not None and synced else 0",
                "signum = 0",
            ),
        ),
        ("tests/test_stop_signals.py::test_sigterm_saves_a_checkpoint_and_resume_continues_exactly",),
    ),
    Mutation(
        "no-preflight",
        "the memory preflight never runs: a run too big for the machine starts and is killed minutes later",
        (("fabric_tram/engine/setup.py", "    if training and t.preflight:", "    if False:"),),
        ("tests/test_preflight.py::test_a_run_that_fits_starts_and_preflight_false_starts_anyway",),
    ),
    Mutation(
        "resume-ignores-the-global-batch",
        "a checkpoint resumed with another number of examples per step (the data position then shifts)",
        (("fabric_tram/engine/checkpoint_files.py", "    if saved is None or saved == global_batch:", "    if True:"),),
        (
            "tests/test_checkpoint.py::test_a_resume_names_what_differs_the_rule_the_base_optimizer_or_the_examples_per_step",
        ),
    ),
    Mutation(
        "checkpoint-shards-unchecked",
        "a truncated shard of a distributed checkpoint passes the checks (resume=auto cannot fall back past it)",
        (("fabric_tram/engine/checkpoint_files.py", "    if state.is_dir():\n        check_shard_files(state)", ""),),
        ("tests/test_checkpoint.py::test_a_shard_missing_only_its_last_byte_is_refused_and_a_complete_one_passes",),
    ),
    Mutation(
        "lora-export-unmerged",
        "a LoRA run exported without merging its adapters (transformers would load the base weights alone)",
        (("fabric_tram/engine/export.py", "                merge_lora(model)  #", "                pass  #"),),
        ("tests/test_lora.py::test_a_lora_run_exports_merged_and_as_a_peft_adapter",),
    ),
    Mutation(
        "estimate-gradients-of-frozen-weights",
        "the estimate counts gradients for frozen parameters too",
        (
            (
                "fabric_tram/engine/estimate.py",
                '"gradients": n_trained * param_bytes / shards,',
                '"gradients": n_params * param_bytes / shards,',
            ),
        ),
        ("tests/test_lora.py::test_rule_state_and_the_estimate_are_adapter_sized",),
    ),
    Mutation(
        "checkpoint-labels-sorted",
        "a checkpoint records a classifier's label names sorted, not in the order of its label ids",
        (
            (
                "fabric_tram/engine/checkpoint.py",
                '"labels": label_names(run.task),',
                '"labels": sorted(label_names(run.task) or []) or None,',
            ),
        ),
        ("tests/test_export.py::test_a_classifier_run_exports_its_own_label_order_and_tokenizer_roles",),
    ),
    Mutation(
        "export-ids-from-the-tokenizer",
        "export writes the tokenizer's <|endoftext|> as bos/eos over the base checkpoint's ids",
        (
            (
                "fabric_tram/engine/export.py",
                'ids = {"bos_token_id": eot, "eos_token_id": eot, **ids}',
                'ids = {**ids, "bos_token_id": eot, "eos_token_id": eot}',
            ),
        ),
        (
            "tests/test_export.py::test_a_hugging_face_causal_lm_run_generates_and_exports_with_its_base_ids_and_one_tied_head",
        ),
    ),
    Mutation(
        "adapter-base-path-as-given",
        "an adapter names its base folder as the run gave it (relative: peft then looks for a hub id)",
        (
            (
                "fabric_tram/engine/export.py",
                "adapted_modules(model), base_model_path(config.model.pretrained),",
                "adapted_modules(model), config.model.pretrained,",
            ),
        ),
        ("tests/test_lora.py::test_an_adapter_names_its_base_so_that_peft_finds_it_from_any_folder",),
    ),
    Mutation(
        "stop-signal-agreed-by-min",
        "ranks agree on a stop signal by its minimum: a signal that reached one rank stops none",
        (("fabric_tram/engine/interrupt.py", 'reduce_op="max"', 'reduce_op="min"'),),
        ("tests/test_stop_signals.py::test_ranks_agree_to_stop_when_any_of_them_was_signalled",),
    ),
    Mutation(
        "preflight-without-its-margin",
        "the preflight lets the estimate take all the free memory (no margin for what it leaves out)",
        (("fabric_tram/engine/preflight.py", "if needed <= MARGIN * free:", "if needed <= free:"),),
        ("tests/test_preflight.py::test_the_margin_and_the_share_of_a_nodes_memory_decide_exactly",),
    ),
    Mutation(
        "preflight-shares-memory-with-every-process",
        "the preflight divides a node's memory by every process of the run, not by those on the node",
        (
            (
                "fabric_tram/engine/preflight.py",
                "available_bytes(device, max(1, world_size // nodes))",
                "available_bytes(device, max(1, world_size))",
            ),
        ),
        ("tests/test_preflight.py::test_the_margin_and_the_share_of_a_nodes_memory_decide_exactly",),
    ),
    Mutation(
        "compiled-names-kept",
        "rule buffers of a torch.compile'd model saved under '_orig_mod.' names (an eager resume finds none)",
        (
            (
                "fabric_tram/engine/checkpoint_state.py",
                'WRAPPER_SEGMENTS = ("_forward_module.", "_orig_mod.", "_checkpoint_wrapped_module.")',
                'WRAPPER_SEGMENTS = ("_forward_module.", "_checkpoint_wrapped_module.")',
            ),
        ),
        (
            "tests/test_checkpoint.py::test_rule_buffers_are_saved_under_the_model_states_names_whatever_wraps_the_model",
        ),
    ),
    Mutation(
        "shard-check-ignores-offsets",
        "the shard check reads each item's length, not where it ends (offset + length): a truncated shard passes",
        (
            (
                "fabric_tram/engine/checkpoint_files.py",
                "max(needed.get(info.relative_path, 0), info.offset + info.length)",
                "max(needed.get(info.relative_path, 0), info.length)",
            ),
        ),
        ("tests/test_checkpoint.py::test_a_shard_missing_only_its_last_byte_is_refused_and_a_complete_one_passes",),
    ),
    Mutation(
        "resume-ignores-the-base-optimizer",
        "a resume compares the update rule but not its base optimizer (adam's moments loaded into sgd)",
        (
            (
                "fabric_tram/engine/checkpoint_files.py",
                'for k, suffix in (("name", ""), ("base", "_base"))',
                'for k, suffix in (("name", ""),)',
            ),
        ),
        (
            "tests/test_checkpoint.py::test_a_resume_names_what_differs_the_rule_the_base_optimizer_or_the_examples_per_step",
        ),
    ),
    Mutation(
        "second-ctrl-c-says-nothing",
        "a second Ctrl-C ends the run without saying which checkpoint a resume starts from",
        (
            (
                "fabric_tram/engine/trainer.py",
                "        except KeyboardInterrupt:  # a second Ctrl-C",
                "        except ZeroDivisionError:  #",
            ),
        ),
        (
            "tests/test_stop_signals.py::test_a_second_ctrl_c_stops_at_once_and_says_which_checkpoint_a_resume_starts_from",
        ),
    ),
    Mutation(
        "contract-error-as-a-traceback",
        "a plugin that lacks a contract member ends in a traceback instead of one line",
        (("fabric_tram/engine/reporting.py", "    ContractError,  # a plugin's", "    # a plugin's"),),
        ("tests/test_bad_input.py::test_a_plugin_task_lacking_a_required_member_is_one_line_naming_each",),
    ),
    Mutation(
        "taken-default-port-kept",
        "fabric-tram run keeps the default port when another run holds it (torchrun's EADDRINUSE traceback)",
        (("fabric_tram/engine/launch.py", "    if given is None and nodes == 1:", "    if False:"),),
        (
            "tests/test_bad_input.py::test_fabric_tram_run_takes_a_free_port_for_a_default_that_is_taken_and_refuses_a_given_one",
        ),
    ),
    Mutation(
        "quiet-run-silent",
        "without a progress bar a run prints nothing until it ends (minutes of silence on real weights)",
        (
            (
                "fabric_tram/engine/monitor.py",
                "        elif self.plain and self.clock()",
                "        elif False and self.clock()",
            ),
        ),
        (
            "tests/test_engine_modes.py::test_without_a_progress_bar_rank_0_prints_a_plain_line_at_most_every_quiet_every_seconds",
        ),
    ),
    Mutation(
        "auto-micro-batch-the-smallest-that-fits",
        "micro_batch_size=auto keeps the first micro-batch that fits, not the largest",
        (
            (
                "fabric_tram/engine/batch_size.py",
                "            best, low = micro, middle + 1",
                "            best, low = micro if best is None else best, middle + 1",
            ),
        ),
        ("tests/test_batch_size.py::test_auto_takes_the_largest_divisor_that_fits_and_keeps_the_global_batch",),
    ),
    Mutation(
        "auto-micro-batch-without-the-margin",
        "micro_batch_size=auto lets the estimate take all the free memory (the preflight keeps 10% aside)",
        (("fabric_tram/engine/batch_size.py", "if seen[micro] <= MARGIN * free:", "if seen[micro] <= free:"),),
        ("tests/test_batch_size.py::test_auto_leaves_the_preflights_margin_free",),
    ),
    Mutation(
        "global-batch-accumulate-not-derived",
        "trainer.global_batch_size with an explicit micro-batch leaves accumulate as it was (another global batch)",
        (("fabric_tram/engine/batch_size.py", "        t.accumulate = follows\n", "        pass\n"),),
        ("tests/test_batch_size.py::test_a_global_batch_with_an_explicit_micro_batch_sets_accumulate",),
    ),
    Mutation(
        "tracking-on-every-rank",
        "every rank builds its own W&B and MLflow loggers (two tracked runs, colliding SQLite stores)",
        (
            (
                "fabric_tram/engine/tracking.py",
                '    if getattr(rank_zero_only, "rank", 0) != 0:\n        return []\n',
                "",
            ),
        ),
        ("tests/test_tracking.py::test_only_rank_0_builds_tracking_loggers",),
    ),
    Mutation(
        "resume-opens-a-new-tracked-run",
        "a resumed run starts a new W&B/MLflow run instead of continuing its own",
        (
            (
                "fabric_tram/engine/tracking.py",
                "return path.read_text().strip() if resuming and path.is_file() else None",
                "return None",
            ),
        ),
        (
            "tests/test_tracking.py::test_a_resume_gives_the_loggers_the_tracked_run_its_folder_keeps_and_a_new_run_none",
        ),
    ),
    Mutation(
        "sweep-runs-not-grouped",
        "a sweep's runs carry no W&B group",
        (("fabric_tram/engine/tracking.py", 'out.append(f"trainer.wandb.group={name}")', "pass"),),
        ("tests/test_tracking.py::test_a_sweep_gives_its_runs_the_sweeps_name_as_wandb_group_unless_one_is_set",),
    ),
    Mutation(
        "preflight-skipped-in-silence",
        "a run the estimator cannot size skips the memory preflight without saying so",
        (("fabric_tram/engine/setup.py", "        if skipped:\n            fabric.print(skipped)\n", ""),),
        ("tests/test_preflight.py::test_a_run_the_estimator_cannot_size_says_the_preflight_was_skipped_and_why",),
    ),
    Mutation(
        "setup-and-checkpoint-import-each-other",
        "engine/setup.py takes a helper from engine/checkpoint.py again, which imports setup's Run: a circle",
        (
            (
                "fabric_tram/engine/setup.py",
                "from fabric_tram.engine.checkpoint_files import latest_checkpoint\n",
                "from fabric_tram.engine.checkpoint import latest_checkpoint\n",
            ),
        ),
        ("tests/test_layers.py::test_no_two_modules_of_the_package_import_each_other",),
    ),
    Mutation(
        "shared-parts-not-restored",
        "a resume reads the sharded parts but not global.pt's (the rule's global state: TRAM's calibrated radius)",
        (
            (
                "fabric_tram/engine/checkpoint_files.py",
                '(SHARED, path / "global.pt", checked.shared)',
                '(SHARED, path / "global.pt", None)',
            ),
        ),  # fmt: skip
        ("tests/test_checkpoint.py::test_a_checkpoint_of_the_first_format_still_resumes",),
    ),
    Mutation(
        "rng-part-restored-into-nothing",
        "the per-rank part (each rank's RNG) is not restored on the same number of processes: dropout differs",
        (
            (
                "fabric_tram/engine/checkpoint_files.py",
                'global_rank}.pt", checked.per_rank)',
                'global_rank}.pt", None)',
            ),
        ),  # fmt: skip
        ("tests/test_checkpoint.py::test_stop_after_step_2_and_resume_equals_uninterrupted",),
    ),
    Mutation(
        "estimate-ignores-the-chunked-cross-entropy",
        "the estimate counts float32 logits and log-probabilities under task.cross_entropy=chunked too",
        (
            (
                "fabric_tram/engine/estimate.py",
                'loss_bytes = act_bytes if cross_entropy_of(config.task) == "chunked" else 2 * 4',
                "loss_bytes = 2 * 4",
            ),
        ),
        ("tests/test_estimate.py::test_the_chunked_cross_entropy_is_counted_at_its_logits_alone",),
    ),
)
