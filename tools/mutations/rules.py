"""Planted bugs in what an update rule computes (fabric_tram/optim): its geometry, target, objective, noise, momentum
direction and base optimizer."""

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
        "kl-value-from-gradient-sign",
        "a KL value read off its weighted gradient (g_c = -w p for trpo/mesa) with the gradient's sign lost",
        (
            (
                "fabric_tram/optim/divergences.py",
                "return v_sign * g_sign * torch.dot(weighted.reshape(-1), delta.reshape(-1))",
                "return v_sign * torch.dot(weighted.reshape(-1), delta.reshape(-1))",
            ),
        ),
        ("tests/test_divergences.py::test_chunked_kl_through_one_branch_matches_autograd",),
    ),
    Mutation(
        "kl-value-cancels",
        "the KL value summed as Σ p log p − Σ p log q (two numbers near the entropy whose difference is the KL)",
        (
            (
                "fabric_tram/optim/divergences.py",
                "return v_sign * _weighted_dot(v, delta, w)",
                "return v_sign * (_weighted_dot(v, delta - v.log(), w) + _weighted_dot(v, v.log(), w))",
            ),
        ),
        ("tests/test_divergences.py::test_float32_value_of_close_distributions_keeps_its_precision",),
    ),
    Mutation(
        "kl-masked-rows-weigh-one",
        "the KL value summed as if no row were masked (the unweighted dot products with a mask)",
        (("fabric_tram/optim/divergences.py", "tuple(normalized), mask is None", "tuple(normalized), True"),),
        ("tests/test_divergences.py::test_kl_variants_match_torch_and_ignore_masked_positions",),
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
        "sgd-fused-on-sharded-parameters",
        "SGD takes its fused kernel on FSDP2's DTensors too (torch has no sharding rule for it: the first step fails)",
        (("fabric_tram/optim/base.py", "**implementation(params, sharded=False),", "**implementation(params),"),),
        ("tests/test_base_optimizers.py::test_on_fsdp2s_sharded_parameters_sgd_steps_unfused_and_adam_fused",),
    ),
    Mutation(
        "cpu-base-optimizer-not-fused",
        "the base optimizer on a CPU is torch's per-tensor default (4-7x slower step) instead of its fused kernels",
        (("fabric_tram/optim/base.py", 'frozenset({"cuda", "cpu"})', 'frozenset({"cuda"})'),),
        ("tests/test_base_optimizers.py",),
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
)
