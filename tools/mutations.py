"""The bugs tools/mutation_check.py plants, one at a time: each an exact edit (its original text must occur once
in the code) and the tests that must then fail. Add one with every test that guards something new."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str  # the bug it plants
    edits: tuple[tuple[str, str, str], ...]  # (file, original text, planted text)
    tests: tuple[str, ...]  # pytest node ids or files that must fail


CLOSED_FORM = "tests/test_rules_closed_form.py"
MUTATIONS = (  # fmt: skip
    Mutation(
        "mesa-ema-decay",
        "MESA's EMA update with 1 - decay in place of decay",
        (("fabric_tram/optim/weights.py", "keep, take = decay, 1.0 - decay", "keep, take = 1.0 - decay, decay"),),
        (CLOSED_FORM + "::test_regularisers_three_steps",),
    ),
    Mutation(
        "no-clipping",
        "gradient clipping never applied",
        (
            (
                "fabric_tram/optim/step.py",
                "                torch._foreach_mul_(group[0], factor.to(group[0][0].dtype))",
                "                pass",
            ),
        ),
        (CLOSED_FORM + "::test_gradient_clipping_of_the_final_gradient",),
    ),
    Mutation(
        "clip-the-ascent-gradient",
        "clipping applied at another point of the step: to the ascent gradient, not the final one",
        (
            (
                "fabric_tram/optim/update_rule.py",
                "        if ascending:\n            radius = self.radius(ctx, d)",
                "        if ascending:\n            ctx.clip_gradients()\n            radius = self.radius(ctx, d)",
            ),
            (
                "fabric_tram/optim/update_rule.py",
                "        stats.update(ctx.clip_and_step(ascent.loss))",
                "        ctx.grad_clip = 0.0 if self.geometry is not None else ctx.grad_clip\n"
                "        stats.update(ctx.clip_and_step(ascent.loss))",
            ),
        ),
        (CLOSED_FORM + "::test_gradient_clipping_of_the_final_gradient",),
    ),
    Mutation(
        "asam-original-inverted",
        "asam_like_original: T on the parameters not named 'weight'",
        (
            (
                "fabric_tram/optim/geometry.py",
                '[not original or "weight" in name for name in names]',
                '[not original or "weight" not in name for name in names]',
            ),
        ),
        (CLOSED_FORM + "::test_asam_like_original_scales_only_the_parameters_named_weight",),
    ),
    Mutation(
        "r3f-not-detached",
        "R3F's noised branch not detached from the clean embedding lookup",
        (
            (
                "fabric_tram/optim/objectives.py",
                "noise.applied(fw.step, batch, detach=True)",
                "noise.applied(fw.step, batch, detach=False)",
            ),
        ),
        (CLOSED_FORM + "::test_r3f_noised_branch_starts_from_the_detached_lookup",),
    ),
    Mutation(
        "noise-follows-padding",
        "input noise that depends on the batch's padded length",
        (
            (
                "fabric_tram/optim/noise.py",
                "bits = splitmix64(keys + (counter + 1) * _int64(_GOLDEN))",
                "bits = splitmix64(keys + (counter + length) * _int64(_GOLDEN))",
            ),
        ),
        ("tests/test_noise.py",),
    ),
    Mutation(
        "noise-ignores-step",
        "input noise that does not depend on the step",
        (
            (
                "fabric_tram/optim/noise.py",
                "splitmix64(_int64(self.seed * _GOLDEN + step * _MIX1)",
                "splitmix64(_int64(self.seed * _GOLDEN + 0 * _MIX1)",
            ),
        ),
        ("tests/test_noise.py",),
    ),
    Mutation(
        "m-sharpness-global-normalisation",
        "m-sharpness's per-rank normalisation replaced by the global one",
        (("fabric_tram/optim/step.py", "        if per_rank:  # no averaging", "        if False:  # no averaging"),),
        ("tests/test_step_contract.py",),
    ),
    Mutation(
        "forget-world-size",
        "the backward scale without the factor W (DDP/FSDP average gradients: g / W)",
        (
            (
                "fabric_tram/optim/step.py",
                "return self.world_size / self.n_global.clamp(min=1)",
                "return 1.0 / self.n_global.clamp(min=1)",
            ),
        ),
        ("tests/test_step_contract.py",),
    ),
    Mutation(
        "e-without-gradient",
        "the published code's e = d T² / ‖T g‖, without the gradient factor",
        (
            (
                "fabric_tram/optim/geometry.py",
                "    def finish(self, weights, grads, index):\n        self._times_t(weights, grads, index)  # T² g",
                "    def finish(self, weights, grads, index):\n"
                "        torch._foreach_copy_(grads, torch._foreach_add(torch._foreach_abs(weights), self.eta))  # T\n"
                "        self._times_t(weights, grads, index)  # T², no g",
            ),
        ),
        (CLOSED_FORM,),
    ),
    Mutation(
        "no-restore",
        "the perturbation is never undone",
        (
            (
                "fabric_tram/optim/weights.py",
                "    finally:\n        restore_weights(params, backup)",
                "    finally:\n        pass",
            ),
        ),
        (CLOSED_FORM + "::test_restore_is_bit_exact",),
    ),
    Mutation(
        "previous-iterate-frozen",
        "trpo's previous iterate never advances (stays θ_0)",
        (
            (
                "fabric_tram/optim/targets.py",
                "        if not (self.is_restore_point and restored):  # a step that did not perturb",
                "        if False:  # a step that did not perturb",
            ),
        ),
        (CLOSED_FORM + "::test_regularisers_three_steps",),
    ),
    Mutation(
        "rule-state-not-loaded",
        "a checkpoint's rule state is not copied into the buffers",
        (("fabric_tram/optim/weights.py", "            b.copy_(s)", "            pass"),),
        (CLOSED_FORM + "::test_loading_a_rules_state_replaces_its_buffers",),
    ),
    Mutation(
        "dropout-not-replayed",
        "the target forward draws its own dropout masks instead of the ascent pass's",
        (
            (
                "fabric_tram/optim/targets.py",
                'return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], '
                "device_type=device.type)",
                "return contextlib.nullcontext()",
            ),
        ),
        ("tests/test_rules_engine.py::test_target_forward_replays_the_dropout_masks",),
    ),
    Mutation(
        "per-micro-batch-mean",
        "each micro-batch normalised by its own count (the classic accumulation mistake)",
        (
            (
                "fabric_tram/optim/step.py",
                "self.fabric.backward(total * self._scale(per_rank).to(total.dtype))",
                "self.fabric.backward(total / out_count / len(self.micro_batches))",
            ),
            (
                "fabric_tram/optim/step.py",
                "                self._count_targets(out, k)\n",
                "                self._count_targets(out, k)\n                out_count = float(out.count)\n",
            ),
        ),
        ("tests/test_accumulation.py::test_accumulation_matches_one_big_batch",),
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
        "non-finite-gradient-applied",
        "a non-finite gradient reaches the weights",
        (("fabric_tram/optim/step.py", "if finite or self.scaler is not None:", "if True:"),),
        ("tests/test_bad_input.py::test_a_non_finite_gradient_with_a_finite_loss_never_reaches_the_weights",),
    ),
    Mutation(
        "host-sync-per-micro-batch",
        "the backward's scale read on the host (a device-to-host wait per micro-batch)",
        (
            (
                "fabric_tram/optim/step.py",
                "return self.world_size / self.n_global.clamp(min=1)",
                "return torch.tensor(self.world_size / float(self.n_global.clamp(min=1)))",
            ),
        ),
        ("tests/test_step_speed.py::test_a_step_waits_on_the_device_only_for_its_skip_decisions",),
    ),
    Mutation(
        "per-parameter-copies",
        "weight copies as a Python loop over parameters (a kernel per tensor on a GPU)",
        (
            (
                "fabric_tram/optim/weights.py",
                "        torch._foreach_copy_(t, s)",
                "        [x.copy_(y) for x, y in zip(t, s, strict=True)]",
            ),
        ),
        ("tests/test_step_speed.py::test_per_parameter_work_launches_as_many_kernels_for_10_or_100_tensors",),
    ),
    Mutation(
        "radius-mean-not-median",
        "TRAM's calibration divides by the mean of d instead of its median (an outlier then sets the scale)",
        (
            (
                "fabric_tram/optim/radius.py",
                "median = torch.nanmedian(self.samples)",
                "median = torch.nanmean(self.samples)",
            ),
        ),
        (
            "tests/test_radius.py::test_calibration_climbs_the_target_then_fixes_the_scale_from_the_median_of_positive_d",
        ),
    ),
    Mutation(
        "radius-state-not-restored",
        "a resumed TRAM run forgets its calibrated scale and the radius it was reusing",
        (
            (
                "fabric_tram/optim/radius.py",
                'self.samples, self.scale, self.last = (on_device(state[k]) for k in ("samples", "scale", "last"))',
                "pass",
            ),
        ),
        ("tests/test_radius.py::test_resume_mid_and_after_calibration_continues_exactly[4]",),  # after calibration
    ),
    Mutation(
        "radius-every-schedule-shifted",
        "radius_every measures d one step late after calibration (the first calibrated step reuses a stale radius)",
        (
            (
                "fabric_tram/optim/radius.py",
                "        return (t - calibrated_after - 1) % every == 0",
                "        return (t - calibrated_after) % every == 0",
            ),
        ),
        ("tests/test_radius.py::test_measurement_schedule_of_radius_every",),
    ),
    Mutation(
        "llama3-frequencies-unscaled",
        "Llama 3's rope_scaling read but its frequency stretch never applied",
        (("fabric_tram/models/llama.py", "        inv_freq = llama3_frequencies(inv_freq, scaling)", "        pass"),),
        ("tests/test_llama.py::test_llama3_rope_scaling_matches_transformers_past_the_original_context",),
    ),
    Mutation(
        "gguf-rows-left-permuted",
        "GGUF query/key rows kept in llama.cpp's interleaved order",
        (
            (
                "fabric_tram/models/gguf.py",
                "            weights = unpermute_rotary_rows(weights, heads[kind])",
                "            pass",
            ),
        ),
        ("tests/test_gguf.py::test_a_gguf_llama_converts_to_a_folder_both_loaders_read_identically",),
    ),
    Mutation(
        "roberta-positions-ignore-padding",
        "RoBERTa positions counted over every slot, padding included (left padding shifts them)",
        (
            (
                "fabric_tram/models/encoder.py",
                '        return torch.cumsum(keep, dim=1) * keep + self.sizes["pad_token_id"]',
                '        return torch.arange(1, keep.shape[1] + 1).expand_as(keep) + self.sizes["pad_token_id"]',
            ),
        ),
        ("tests/test_encoder.py::test_hidden_states_and_logits_match_transformers",),
    ),
    Mutation(
        "cka-uncentred",
        "CKA's cross products left uncentred (an offset in the representations changes the similarity)",
        (("fabric_tram/analysis/cka.py", "cxy = self.xy - torch.outer(self.sx, self.sy) / n", "cxy = self.xy"),),
        ("tests/test_analysis_tools.py::test_streamed_cka_equals_the_direct_formula_batch_by_batch",),
    ),
    Mutation(
        "sharpness-leaves-the-box",
        "ε-sharpness ascent never projected back onto the ε-box",
        (
            (
                "fabric_tram/analysis/sharpness.py",
                "            _clamp_to_box(params, origin, epsilon)",
                "            pass",
            ),
        ),
        ("tests/test_analysis_tools.py::test_epsilon_sharpness_finds_the_closed_form_maximum_of_a_quadratic",),
    ),
    Mutation(
        "augmentation-ignores-the-step",
        "every epoch crops and flips an image the same way (the augmentation drawn from the image alone)",
        (("fabric_tram/data/images.py", "manual_seed(step * 1_000_003 + index)", "manual_seed(index)"),),
        ("tests/test_images.py::test_training_augmentation_is_drawn_per_step_and_image_evaluation_is_not_augmented",),
    ),
    Mutation(
        "workers-see-other-steps",
        "background batch workers build the steps shifted by one",
        (("fabric_tram/engine/batches.py", "sampler=range(first - 1, last)", "sampler=range(first, last + 1)"),),
        ("tests/test_images.py::test_epochs_workers_accumulation_and_mid_epoch_resume_change_nothing",),
    ),
    Mutation(
        "accuracy-counts-padding-examples",
        "evaluation counts the zero-weight padding examples of a rank that ran out as correct or wrong",
        (
            (
                "fabric_tram/tasks/classification.py",
                '    return {"correct": ((out.logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()}',
                '    return {"correct": (out.logits.argmax(-1) == labels.clamp(min=0)).sum()}',
            ),
        ),
        ("tests/test_encoder.py::test_accuracy_leaves_out_padding_examples",),
    ),
    Mutation(
        "processor-by-hub-id-ignored",
        "task.processor=OWNER/NAME is not fetched from the hub (its size, mean and std never read)",
        (("fabric_tram/data/images.py", "    if is_hub_id(source):", "    if False:"),),
        ("tests/test_images.py::test_processor_settings_come_from_a_hub_id_and_a_missing_source_is_refused",),
    ),
    Mutation(
        "vision-rules-wrap-adam",
        "the vision recipes leave optimizer.base out: a rule named on the command line wraps Adam, not SGD",
        (
            (
                "recipes/_vit.py",
                '"optimizer": {"name": "sgd", "base": "sgd", "lr": 5e-4}',
                '"optimizer": {"name": "sgd", "lr": 5e-4}',
            ),
        ),
        ("tests/test_recipes.py::test_vision_recipe_settings_and_smoke",),
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
        "classification-loss-in-float32",
        "the classifiers' loss rounds float64 logits to float32 (64-true runs then train on float32-rounded losses)",
        (
            (
                "fabric_tram/tasks/classification.py",
                'return cross_entropy_sum(self.logits(model, batch, **forward_kwargs), batch["labels"])',
                'return cross_entropy_sum(self.logits(model, batch, **forward_kwargs).float(), batch["labels"])',
            ),
        ),
        ("tests/test_images.py::test_epochs_workers_accumulation_and_mid_epoch_resume_change_nothing",),
    ),
    Mutation(
        "head-pad-in-front",
        "the GPU head's zero rows placed before the vocabulary, so the kept logits are shifted by the pad",
        (("fabric_tram/models/head.py", "F.pad(weight, (0, 0, 0, pad))", "F.pad(weight, (0, 0, pad, 0))"),),
        ("tests/test_head.py::test_the_padded_head_gives_the_unpadded_logits_and_gradients",),
    ),
    Mutation(
        "tram-cap-ignored-after-calibration",
        "TRAM's radius leaves the cap (max_radius, radius_target by default) once calibration has ended",
        (
            (
                "fabric_tram/optim/radius.py",
                "by default)\n        return self.last if self.max_radius is None else "
                "torch.clamp(self.last, max=self.max_radius)",
                "by default)\n        return self.last",
            ),
        ),
        (
            "tests/test_radius.py::test_the_default_cap_is_radius_target_under_auto_and_holds_on_every_step_after_calibration",
            "tests/test_radius.py::test_tram_init_drifting_stays_inside_the_cap_and_the_run_says_it_behaved_as_asam",
        ),
    ),
    Mutation(
        "tram-cap-ignored-while-calibrating",
        "a max_radius below radius_target ignored on the calibration steps",
        (
            (
                "fabric_tram/optim/radius.py",
                "like every other\n            return self.target if self.max_radius is None else "
                "min(self.target, self.max_radius)",
                "like every other\n            return self.target",
            ),
        ),
        ("tests/test_radius.py::test_a_cap_below_radius_target_holds_while_calibrating_too",),
    ),
    Mutation(
        "tram-window-from-step-one",
        "the calibration window opens at step 1 whatever the warm-up (calibration_start ignored)",
        (("fabric_tram/optim/radius.py", "index = step - self.start - 1", "index = step - 1"),),
        ("tests/test_radius.py::test_the_window_opens_after_calibration_start_and_ignores_d_before_it",),
    ),
    Mutation(
        "group-boundary-tensor-dropped",
        "the last tensor of each multi-tensor group left out of every multi-tensor operation",
        (
            (
                "fabric_tram/optim/weights.py",
                "            yield tuple(lst[start:i] for lst in lists)",
                "            yield tuple(lst[start : i - 1] for lst in lists)",
            ),
        ),
        (
            "tests/test_ascent.py::test_groups_cover_every_tensor_once_in_order_within_the_byte_limit",
            "tests/test_ascent.py::test_every_rule_steps_the_same_in_one_multi_tensor_group_and_in_many",
        ),
    ),
    Mutation(
        "asam-original-t-by-position",
        "asam_like_original's T chosen by a tensor's position in its group instead of its parameter index",
        (
            (
                "fabric_tram/optim/geometry.py",
                "on = [j for j, i in enumerate(index) if self.scaled[i]]",
                "on = [j for j, i in enumerate(index) if self.scaled[j]]",
            ),
        ),
        ("tests/test_ascent.py::test_asams_perturbation_is_t_squared_g_by_parameter_whatever_the_groups",),
    ),
    Mutation(
        "ascent-gradients-still-scaled",
        "under an fp16 loss scaler, e formed from the ascent gradients before they are unscaled",
        (("fabric_tram/optim/geometry.py", "        torch._foreach_div_(grads, loss_scale)", "        pass"),),
        ("tests/test_ascent.py::test_an_fp16_loss_scale_changes_nothing_in_e_or_the_logged_norms",),
    ),
    Mutation(
        "adamw-coupled",
        "optimizer.name=adamw builds Adam with coupled L2 weight decay",
        (("fabric_tram/optim/base.py", "    return torch.optim.AdamW(", "    return torch.optim.Adam("),),
        ("tests/test_base_optimizers.py",),
    ),
    Mutation(
        "same-shuffle-every-epoch",
        "the training data shuffled in the same order every epoch",
        (
            (
                "fabric_tram/data/batching.py",
                "generator=torch.Generator().manual_seed(self.seed + epoch)",
                "generator=torch.Generator().manual_seed(self.seed)",
            ),
        ),
        ("tests/test_data.py::test_each_epoch_is_a_new_order_of_every_example_and_the_seed_fixes_it",),
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
        "in-domain-loss-per-domain",
        "the in-domain validation loss (best checkpoint, sweep) a mean over domains instead of over targets",
        (
            (
                "fabric_tram/loss.py",
                'return sum(metrics[d]["loss"] * counts[d] for d in names) / max(total, 1e-12)',
                'return sum(metrics[d]["loss"] for d in names) / len(names)',
            ),
        ),
        (
            "tests/test_sweep.py::test_the_in_domain_loss_that_picks_checkpoints_and_settings_is_per_target_not_per_domain",
        ),
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
        "finished-run-reused-unchecked",
        "the demo reuses a finished run folder without checking that it holds this run (a smoke in the table)",
        (
            (
                "recipes/demo.py",
                "                refuse_another_run(run_dir, resolve(merge(base, settings)))  # the same run, "
                "or a clear stop",
                "                pass",
            ),
        ),
        ("tests/test_demo.py::test_a_finished_run_of_other_settings_is_never_reused",),
    ),
    Mutation(
        "eval-batches-per-process",
        "trainer.eval_batches counted per process: 2 processes score twice the examples of 1",
        (
            (
                "fabric_tram/data/batching.py",
                "min(num_examples, max_batches * batch_size)",
                "min(num_examples, max_batches * batch_size * world_size)",
            ),
        ),
        ("tests/test_data.py::test_eval_batches_is_a_global_count_the_same_examples_whatever_the_processes",),
    ),
    Mutation(
        "no-preflight",
        "the memory preflight never runs: a run too big for the machine starts and is killed minutes later",
        (("fabric_tram/engine/setup.py", "    if training and t.preflight:", "    if False:"),),
        ("tests/test_preflight.py::test_a_run_that_fits_starts_and_preflight_false_starts_anyway",),
    ),
    Mutation(
        "r3f-backward-counted-once",
        "a backward through r3f's two graphs counted as one backward (FLOPs, MFU and the estimator a third low)",
        (
            (
                "fabric_tram/optim/step.py",
                '            self.counts["backward"] += graphs',
                '            self.counts["backward"] += 1',
            ),
        ),
        ("tests/test_step_contract.py::test_passes_count_every_forward_over_the_micro_batches",),
    ),
    Mutation(
        "resume-ignores-the-global-batch",
        "a checkpoint resumed with another number of examples per step (the data position then shifts)",
        (("fabric_tram/engine/checkpoint_files.py", "    if saved is None or saved == global_batch:", "    if True:"),),
        (
            "tests/test_checkpoint.py::test_resume_with_another_split_of_the_same_global_batch_and_refuse_another_global_batch",
        ),
    ),
    Mutation(
        "data-position-per-rank",
        "the data position counted in per-rank examples: 2 processes would read other examples than 1",
        (
            (
                "fabric_tram/data/batching.py",
                "start = step * self.global_batch_size + self.rank * per_rank",
                "start = step * per_rank + self.rank * per_rank",
            ),
        ),
        ("tests/test_data.py::test_step_sampler_splits_the_same_examples_whatever_the_layout",),
    ),
    Mutation(
        "checkpoint-shards-unchecked",
        "a truncated shard of a distributed checkpoint passes the checks (resume=auto cannot fall back past it)",
        (("fabric_tram/engine/checkpoint_files.py", "    if state.is_dir():\n        check_shard_files(state)", ""),),
        ("tests/test_checkpoint.py::test_a_damaged_checkpoint_named_for_resume_is_a_clear_error",),
    ),
    Mutation(
        "export-drops-an-untied-head",
        "a Llama with untied embeddings exported without its lm_head (transformers would start a random one)",
        (
            (
                "fabric_tram/models/llama.py",
                'if not (c.tie_word_embeddings and k == "lm_head.weight")',
                'if k != "lm_head.weight"',
            ),
        ),
        ("tests/test_export.py::test_every_family_exports_to_a_folder_transformers_loads_with_our_logits",),
    ),
    Mutation(
        "gpt2-export-conv1d-untransposed",
        "GPT-2 exported with nn.Linear weights where Hugging Face's Conv1D expects them transposed",
        (
            (
                "fabric_tram/models/gpt2.py",
                "k: (v.t() if k.endswith(HF_CONV1D) else v).contiguous()",
                "k: v.contiguous()",
            ),
        ),
        ("tests/test_export.py::test_every_family_exports_to_a_folder_transformers_loads_with_our_logits",),
    ),
    Mutation(
        "kv-cache-positions-restart",
        "with a KV cache each new token takes position 0 again (GPT-2's learned positions)",
        (("fabric_tram/models/gpt2.py", "start = 0 if cache is None else cache.length", "start = 0"),),
        ("tests/test_export.py::test_greedy_generation_through_the_kv_cache_equals_transformers_generate",),
    ),
    Mutation(
        "rules-touch-frozen-parameters",
        "an update rule takes every parameter, frozen ones (LoRA's base weights) included",
        (
            (
                "fabric_tram/optim/update_rule.py",
                "named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]",
                "named = list(model.named_parameters())",
            ),
        ),
        ("tests/test_lora.py::test_rule_state_and_the_estimate_are_adapter_sized",),
    ),
    Mutation(
        "lora-base-left-trainable",
        "LoRA adapters added but the base weights left trainable",
        (
            (
                "fabric_tram/models/lora.py",
                'param.requires_grad_(".lora_A." in name or ".lora_B." in name or in_saved_module(',
                "param.requires_grad_(True or in_saved_module(",
            ),
        ),
        ("tests/test_lora.py::test_only_the_adapters_train_and_unknown_module_names_are_refused",),
    ),
    Mutation(
        "hf-noise-hook-on-the-wrong-module",
        "an hf model's input noise hooked on its output embeddings (the head) instead of its input embeddings",
        (
            (
                "fabric_tram/models/hf.py",
                "hook = self.input_embedding.register_forward_hook(",
                "hook = self.hf.get_output_embeddings().register_forward_hook(",
            ),
        ),
        ("tests/test_hf_model.py::test_noise_reaches_the_hf_embeddings_and_is_removed_after_the_forward",),
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
        "registry-skips-the-contract-check",
        "a registered model or task is not checked against contracts.py",
        (
            (
                "fabric_tram/registry.py",
                "                self._check(name, target, kind, config)",
                "                pass",
            ),
        ),
        ("tests/test_contracts.py",),
    ),
    Mutation(
        "rule-declares-other-passes-than-its-docs",
        "r3f declared with one backward in its class while the docs and every count say two",
        (
            (
                "fabric_tram/optim/rules.py",
                "passes, divergence_gradients, graphs_per_pass = Passes(2, 0, 2), 2, 2",
                "passes, divergence_gradients, graphs_per_pass = Passes(2, 0, 1), 2, 2",
            ),
        ),
        (
            "tests/test_registry_config.py::test_the_docs_tables_and_descriptions_give_each_rule_the_passes_and_state_its_class_declares",
        ),
    ),
    Mutation(
        "m2d2-unpacked-by-every-rank",
        "every rank downloads and unpacks an M2D2 domain, not the first under the lock",
        (
            (
                "fabric_tram/data/m2d2.py",
                'if not (target / ".complete").is_file():  # the first unpacks',
                "if True:  # the first unpacks",
            ),
        ),
        ("tests/test_data.py::test_m2d2_domain_unpacked_once_when_ranks_ask_together",),
    ),
    Mutation(
        "export-std-is-the-mean",
        "an exported image processor's image_std written from the mean",
        (
            (
                "fabric_tram/tasks/export_files.py",
                '"image_std": list(settings["std"]),',
                '"image_std": list(settings["mean"]),',
            ),
        ),
        ("tests/test_export.py::test_an_image_run_exports_the_processor_and_labels_it_trained_with_field_by_field",),
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
        "nucleus-drops-the-crossing-token",
        "top-p keeps only the tokens whose cumulative probability stays below top_p (not the one that reaches it)",
        (
            (
                "fabric_tram/models/generate.py",
                "keep = sorted_probs.cumsum(-1) - sorted_probs < top_p",
                "keep = sorted_probs.cumsum(-1) < top_p",
            ),
        ),
        ("tests/test_export.py::test_the_nucleus_keeps_the_most_probable_tokens_up_to_the_first_that_reaches_top_p",),
    ),
    Mutation(
        "generate-runs-past-the-end-token",
        "generation never stops at an end-of-sequence token",
        (("fabric_tram/models/generate.py", "if token in eos_ids or cache.length", "if cache.length"),),
        (
            "tests/test_export.py::test_sampling_draws_only_from_the_nucleus_and_generation_stops_after_an_end_token",
            "tests/test_export.py::test_generate_stops_on_the_end_token_and_prints_it",
        ),
    ),
    Mutation(
        "generate-hides-special-tokens",
        "fabric-tram generate prints the text without its special tokens (where it stopped is invisible)",
        (("fabric_tram/cli.py", "decode(ids, skip_special_tokens=False)", "decode(ids, skip_special_tokens=True)"),),
        ("tests/test_export.py::test_generate_stops_on_the_end_token_and_prints_it",),
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
        "export-tied-head-twice",
        "an hf model's tied lm_head written a second time (transformers' save_pretrained writes it once)",
        (("fabric_tram/models/hf.py", "if tensor.numel() and where in seen:", "if False:"),),
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
        "modules-to-save-top-level-only",
        "modules_to_save matched against a parameter's top-level module only (hf.classifier, pooler.dense missed)",
        (
            (
                "fabric_tram/models/lora.py",
                'path = "." + parameter.rpartition(".")[0] + "."',
                'path = "." + parameter.split(".")[0] + "."',
            ),
        ),
        ("tests/test_lora.py::test_modules_to_save_train_in_full_at_any_depth_and_nothing_else",),
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
            "tests/test_checkpoint.py::test_meta_json_holds_each_field_resume_and_export_read_and_resume_compares_rule_and_base",
        ),
    ),
    Mutation(
        "contract-member-present-is-enough",
        "a required task member is accepted when present, callable or not",
        (
            (
                "fabric_tram/contracts.py",
                "return [name for name in required if not callable(getattr(cls, name, None))]",
                "return [name for name in required if not hasattr(cls, name)]",
            ),
        ),
        ("tests/test_contracts.py::test_a_task_whose_required_member_is_no_method_is_refused",),
    ),
    Mutation(
        "block-class-tuple-unchecked",
        "a block_class tuple is accepted whatever it holds (a class name in it fails at FSDP wrapping)",
        (
            (
                "fabric_tram/contracts.py",
                "(isinstance(blocks, tuple) and all(isinstance(b, type) for b in blocks))",
                "isinstance(blocks, tuple)",
            ),
        ),
        ("tests/test_contracts.py::test_a_model_whose_block_class_tuple_holds_a_name_is_refused",),
    ),
    Mutation(
        "hf-pickled-weights-reach-transformers",
        "model.name=hf hands a folder of pytorch_model.bin to transformers (its traceback, not our one line)",
        (
            (
                "fabric_tram/models/hf.py",
                "        safetensors_files(folder)  # pickled weights only",
                "        # pickled",
            ),
        ),
        ("tests/test_bad_input.py::test_a_checkpoint_folder_with_only_pickled_weights_is_one_line",),
    ),
    Mutation(
        "hf-head-that-does-not-fit-the-task",
        "model.head=causal-lm accepted on the nli task (it fails at the first step on mismatched batch sizes)",
        (("fabric_tram/models/hf.py", "elif needed is not None and self.head != needed:", "elif False:"),),
        ("tests/test_hf_model.py::test_the_auto_class_follows_the_task_and_a_wrong_head_is_a_clear_error",),
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
        "bench-trainer-model-another-vocabulary",
        "the benchmarks' trainer model takes its vocabulary from the tokenizer, not the size (another output head "
        "than the bare loop's)",
        (("fabric_tram/bench/common.py", 'f"model.vocab_size={vocab}", ', ""),),
        ("tests/test_benchmarks.py::test_the_trainer_and_the_bare_loop_run_one_model_at_every_size",),
    ),
    Mutation(
        "all-finite-ignores-numbers",
        "the finiteness check reads the tensors but not the Python numbers among the values (a float radius)",
        (
            (
                "fabric_tram/optim/step.py",
                "    return math.isfinite(float(total)) and numbers_finite\n",
                "    return math.isfinite(float(total))\n",
            ),
        ),
        ("tests/test_step_contract.py::test_all_finite_is_false_for_any_non_finite_value_among_tensors_and_numbers",),
    ),
    Mutation(
        "ascent-phase-counted-from-the-resume",
        "ascent_every's phase counted from the steps this process ran, not from the step (a resume shifts it)",
        (
            (
                "fabric_tram/optim/update_rule.py",
                "        return self.geometry is not None and (step - 1) % self.ascent_every == 0",
                "        self.seen = getattr(self, 'seen', 0) + 1\n"
                "        return self.geometry is not None and (self.seen - 1) % self.ascent_every == 0",
            ),
        ),
        (
            # k = 3, stopped at step 2: the only variant whose phase a resume at step 2 would shift
            "tests/test_ascent_schedule.py::test_a_schedule_is_the_same_with_accumulation_and_after_a_resume_mid_schedule"
            "[tram-prev-every-3]",
        ),
    ),
    Mutation(
        "previous-iterate-stale-between-ascents",
        "tram-prev's previous iterate not stored on the steps between perturbations (ascent_every)",
        (
            (
                "fabric_tram/optim/targets.py",
                "if not (self.is_restore_point and restored):",
                "if not self.is_restore_point:",
            ),
        ),
        (
            "tests/test_ascent_schedule.py::test_tram_prev_between_perturbations_keeps_its_previous_iterate_and_takes_"
            "only_the_d_it_reads[2-1-5-takes_d0]",
        ),
    ),
    Mutation(
        "chunked-ce-padding-has-gradient",
        "the chunked cross-entropy's backward forgets the padding mask: padded positions get softmax − one-hot",
        (
            (
                "fabric_tram/loss.py",
                "            p *= (valid[rows].to(p.dtype) * grad_total.to(p.dtype))[:, None]",
                "            p *= grad_total.to(p.dtype)",
            ),
        ),
        ("tests/test_chunked_cross_entropy.py::test_chunked_cross_entropy_equals_the_plain_one_in_float64[5]",),
    ),
    Mutation(
        "chunked-ce-last-chunk-dropped",
        "the chunked cross-entropy's forward stops before a last, shorter chunk",
        (
            (
                "fabric_tram/loss.py",
                "        for s in range(0, logits.size(0), chunk):\n            x = logits[s : s + chunk].to(dtype)",
                "        for s in range(0, logits.size(0) - chunk + 1, chunk):\n"
                "            x = logits[s : s + chunk].to(dtype)",
            ),
        ),
        ("tests/test_chunked_cross_entropy.py::test_chunked_cross_entropy_equals_the_plain_one_in_float64[5]",),
    ),
    Mutation(
        "task-cross-entropy-ignored",
        "the language-modelling task computes the plain cross-entropy whatever task.cross_entropy says",
        (
            (
                "fabric_tram/tasks/language_modeling.py",
                "        loss = CROSS_ENTROPY[self.config.cross_entropy]",
                "        loss = cross_entropy_sum",
            ),
        ),
        (
            "tests/test_chunked_cross_entropy.py::test_the_language_modelling_task_uses_the_cross_entropy_its_config_names",
        ),
    ),
    Mutation(
        "unread-d-taken-between-ascents",
        "a step between perturbations takes its scheduled d though a later one overwrites it unread (the target "
        "forward paid for nothing)",
        (
            (
                "fabric_tram/optim/radius.py",
                "    if not scheduled(step) or (step - 1) % ascent_every == 0:",
                "    if True:",
            ),
        ),
        (
            "tests/test_ascent_schedule.py::test_tram_prev_between_perturbations_keeps_its_previous_iterate_and_takes_"
            "only_the_d_it_reads[2-1-5-takes_d0]",
        ),
    ),
    Mutation(
        "read-d-skipped-between-ascents",
        "a step between perturbations skips a d that the next perturbing step reads (the radius of an older step)",
        (
            (
                "fabric_tram/optim/radius.py",
                "    return not any(scheduled(t) for t in range(step + 1, next_ascent + 1))",
                "    return False",
            ),
        ),
        (
            "tests/test_ascent_schedule.py::test_tram_prev_between_perturbations_keeps_its_previous_iterate_and_takes_"
            "only_the_d_it_reads[4-3-13-takes_d1]",
        ),
    ),
    Mutation(
        "momentum-direction-up-the-momentum",
        "the momentum direction moves the weights along +v (up the accumulated gradient), not the paper's -v",
        (
            (
                "fabric_tram/optim/update_rule.py",
                "self.params, -radius / (norm + EPS))",
                "self.params, radius / (norm + EPS))",
            ),
        ),
        ("tests/test_ascent_schedule.py::test_the_momentum_direction_moves_against_v_before_the_base_step_updates_it",),
    ),
    Mutation(
        "momentum-base-step-from-the-moved-weights",
        "along the momentum the base step is taken from θ + e (the weights never restored before it)",
        (
            (
                "fabric_tram/optim/update_rule.py",
                "        with perturbed(self.params, self.backup):  # backup ← θ here",
                "        with torch.enable_grad():  # backup ← θ here",
            ),
        ),
        ("tests/test_ascent_schedule.py::test_the_momentum_direction_moves_against_v_before_the_base_step_updates_it",),
    ),
    Mutation(
        "momentum-from-the-second-moment",
        "Adam's momentum direction read from exp_avg_sq instead of its first moment exp_avg",
        (("fabric_tram/optim/momentum.py", '    "Adam": "exp_avg",', '    "Adam": "exp_avg_sq",'),),
        ("tests/test_ascent_schedule.py::test_asam_along_adams_first_moment",),
    ),
    Mutation(
        "lora-without-a-default",
        "an empty model.lora.target_modules adapts nothing instead of peft's default for the architecture",
        (
            (
                "fabric_tram/models/lora.py",
                "targets = list(lora.target_modules) or default_target_modules(model, linear)",
                "targets = list(lora.target_modules) or ['lm_head']",
            ),
        ),
        ("tests/test_lora.py::test_lora_without_target_modules_adapts_pefts_default_for_the_architecture",),
    ),
    Mutation(
        "hf-lora-default-of-another-architecture",
        "an hf model's default LoRA targets read for llama whatever its model type",
        (
            (
                "fabric_tram/models/hf.py",
                "return DEFAULTS.get(self.hf.config.model_type)",
                'return DEFAULTS.get("llama")',
            ),
        ),
        ("tests/test_lora.py::test_lora_without_target_modules_adapts_pefts_default_for_the_architecture",),
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
            "tests/test_tracking.py::test_both_backends_hold_the_config_and_every_metric_at_its_step_and_a_resume_continues_one_run",
        ),
    ),
    Mutation(
        "sweep-runs-not-grouped",
        "a sweep's runs carry no W&B group",
        (("fabric_tram/engine/tracking.py", 'out.append(f"trainer.wandb.group={name}")', "pass"),),
        ("tests/test_tracking.py::test_a_sweep_groups_its_runs",),
    ),
    Mutation(
        "optimizer-kind-unchecked",
        "a base optimizer registered with a config that has a base field (a rule in disguise) is accepted",
        (("fabric_tram/contracts.py", 'if kind == "base optimizer" and "base" in fields:', "if False:"),),
        (
            "tests/test_registry_config.py::test_the_optimizer_registry_knows_each_entrys_kind_and_refuses_a_config_that_says_otherwise",
        ),
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
)
