"""Planted bugs in the step around a rule (fabric_tram/optim/step.py, update_rule.py, weights.py): normalisation,
clipping, the non-finite guard, host synchronisations, multi-tensor groups, what memory a step holds."""

from __future__ import annotations

from .mutation import CLOSED_FORM, Mutation

MUTATIONS = (  # fmt: skip
    Mutation(
        "no-clipping",
        "gradient clipping never applied",
        (
            (
                "fabric_tram/optim/step.py",
                "                    torch._foreach_mul_(group[0], factor.to(group[0][0].dtype))",
                "                    pass",
            ),
        ),
        (CLOSED_FORM + "::test_gradient_clipping_of_the_final_gradient",),
    ),
    Mutation(
        "trainer-norm-of-one-parameter",
        "the trainer's step context handed a partial parameter list: clipping and the norm see one tensor",
        (("fabric_tram/engine/trainer.py", "        params=run.rule.params,", "        params=run.rule.params[:1],"),),
        ("tests/test_engine_modes.py::test_trainer_clips_the_final_gradient_to_grad_clip",),
    ),
    Mutation(
        "weights-detached-per-tensor",
        "each walk of the parameters detaches every tensor again (an operator per tensor, per walk, per step)",
        (
            (
                "fabric_tram/optim/weights.py",
                "    return [local(p) for p in params]",
                "    return [local(p).detach() for p in params]",
            ),
        ),
        ("tests/test_step_speed.py::test_per_parameter_work_runs_as_many_host_operators_for_10_or_100_tensors",),
    ),
    Mutation(
        "momentum-copied-per-tensor",
        "the momentum direction's float32 copies made a tensor at a time",
        (
            (
                "fabric_tram/optim/momentum.py",
                "    if all(v.dtype in (torch.float32, torch.float64) for v in moments):",
                "    if False:",
            ),
        ),
        ("tests/test_step_speed.py::test_per_parameter_work_runs_as_many_host_operators_for_10_or_100_tensors",),
    ),
    Mutation(
        "norm-in-grad-mode",
        "the gradient norm reaches every shard with grad enabled (an autograd function per DTensor, every step)",
        (("fabric_tram/distributed.py", "@torch.no_grad()\ndef sum_of_squares(", "def sum_of_squares("),),
        ("tests/test_step_speed.py::test_a_sharded_step_reaches_its_shards_without_an_autograd_function_per_tensor",),
    ),
    Mutation(
        "restore-in-grad-mode",
        "the restore point written back with grad enabled (each shard reached through an autograd function)",
        (
            (
                "fabric_tram/optim/weights.py",
                "@torch.no_grad()\ndef locals_of(params)",
                "def locals_of(params)",
            ),
            (
                "fabric_tram/optim/weights.py",
                "    return [local(p) for p in params]",
                "    return [local(p).detach() for p in params]",
            ),
        ),
        ("tests/test_step_speed.py::test_a_sharded_step_reaches_its_shards_without_an_autograd_function_per_tensor",),
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
