"""Planted bugs in what feeds the engine and reads its output: data, tasks, the loss, contracts, the registry,
the command line, recipes, analysis and benchmark tools."""

from __future__ import annotations

from .mutation import Mutation

MUTATIONS = (  # fmt: skip
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
        "generate-hides-special-tokens",
        "fabric-tram generate prints the text without its special tokens (where it stopped is invisible)",
        (
            (
                "fabric_tram/cli/commands.py",
                "decode(ids, skip_special_tokens=False)",
                "decode(ids, skip_special_tokens=True)",
            ),
        ),
        ("tests/test_export.py::test_generate_stops_on_the_end_token_and_prints_it",),
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
        "bench-trainer-model-another-vocabulary",
        "the benchmarks' trainer model takes its vocabulary from the tokenizer, not the size (another output head "
        "than the bare loop's)",
        (("fabric_tram/bench/common.py", 'f"model.vocab_size={vocab}", ', ""),),
        ("tests/test_benchmarks.py::test_the_trainer_and_the_bare_loop_run_one_model_at_every_size",),
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
        "optimizer-kind-unchecked",
        "a base optimizer registered with a config that has a base field (a rule in disguise) is accepted",
        (("fabric_tram/contracts.py", 'if kind == "base optimizer" and "base" in fields:', "if False:"),),
        (
            "tests/test_registry_config.py::test_the_optimizer_registry_knows_each_entrys_kind_and_refuses_a_config_that_says_otherwise",
        ),
    ),
    Mutation(
        "chunked-cross-entropy-saves-float32-logits",
        "the chunked cross-entropy saves a float32 copy of bf16 logits for its backward (the memory it exists to save)",
        (
            (
                "fabric_tram/loss.py",
                "ctx.save_for_backward(logits, safe, valid, lse)",
                "ctx.save_for_backward(logits.to(dtype), safe, valid, lse)",
            ),
        ),
        ("tests/test_estimate.py::test_what_each_cross_entropy_saves_for_its_backward_is_what_the_estimate_counts",),
    ),
)
