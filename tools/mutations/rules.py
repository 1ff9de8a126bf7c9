"""Planted bugs in the update rules (fabric_tram/optim): geometry, radius, schedules, the step."""

from __future__ import annotations

from .mutation import CLOSED_FORM, Mutation

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
        ("tests/test_radius.py::test_a_radius_restored_from_its_state_continues_as_the_uninterrupted_one",),
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
                "        return self.geometry is not None and perturbs(step, self.ascent_every)",
                "        self.seen = getattr(self, 'seen', 0) + 1\n"
                "        return self.geometry is not None and perturbs(self.seen, self.ascent_every)",
            ),
        ),
        ("tests/test_ascent_schedule.py::test_the_ascent_phase_is_a_function_of_the_step_so_a_resumed_run_keeps_it",),
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
        "unread-d-taken-between-ascents",
        "a step between perturbations takes its scheduled d though a later one overwrites it unread (the target "
        "forward paid for nothing)",
        (
            (
                "fabric_tram/optim/radius.py",
                "    if not scheduled(step) or perturbs(step, ascent_every):",
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
                "    return not any(scheduled(t) for t in range(step + 1, "
                "next_perturbing_step(step, ascent_every) + 1))",
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
        "ascent-gradients-held-through-the-descent",
        "the ascent gradients (where e was formed) stay referenced through the descent pass: two gradient-sized "
        "buffers at once",
        (
            (
                "fabric_tram/optim/update_rule.py",
                "                del parts  # e was formed in the ascent gradients' memory: freed before the descent "
                "makes its own\n",
                "",
            ),
        ),
        ("tests/test_step_speed.py::test_the_ascent_gradients_are_freed_before_the_descent_pass_makes_its_own",),
    ),
    Mutation(
        "momentum-copies-held-through-the-pass",
        "along the momentum, the copies of v that e was formed in stay referenced through the step's pass",
        (("fabric_tram/optim/update_rule.py", "                del parts, vectors\n", ""),),
        ("tests/test_step_speed.py::test_along_the_momentum_the_copies_e_is_formed_in_are_freed_before_the_pass",),
    ),
)
