"""Planted bugs in the model families (fabric_tram/models): hf models, LoRA, llama, encoder, ViT."""

from __future__ import annotations

from .mutation import Mutation

MUTATIONS = (  # fmt: skip
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
        "head-pad-in-front",
        "the GPU head's zero rows placed before the vocabulary, so the kept logits are shifted by the pad",
        (("fabric_tram/models/head.py", "F.pad(weight, (0, 0, 0, pad))", "F.pad(weight, (0, 0, pad, 0))"),),
        ("tests/test_head.py::test_the_padded_head_gives_the_unpadded_logits_and_gradients",),
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
        "export-tied-head-twice",
        "an hf model's tied lm_head written a second time (transformers' save_pretrained writes it once)",
        (("fabric_tram/models/hf.py", "if tensor.numel() and where in seen:", "if False:"),),
        (
            "tests/test_export.py::test_a_hugging_face_causal_lm_run_generates_and_exports_with_its_base_ids_and_one_tied_head",
        ),
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
        "hf-pickled-weights-reach-transformers",
        "model.name=hf hands a folder of pytorch_model.bin to transformers (its traceback, not our one line)",
        (
            (
                "fabric_tram/models/hf.py",
                "        safetensors_files(folder)  # pickled weights only",
                "        # pickled",
            ),
        ),
        ("tests/test_bad_input.py::test_a_checkpoint_folder_with_only_pickled_weights_is_one_line[hf]",),
    ),
    Mutation(
        "hf-head-that-does-not-fit-the-task",
        "model.head=causal-lm accepted on the nli task (it fails at the first step on mismatched batch sizes)",
        (("fabric_tram/models/hf.py", "elif needed is not None and self.head != needed:", "elif False:"),),
        ("tests/test_hf_model.py::test_the_auto_class_follows_the_task_and_a_wrong_head_is_a_clear_error",),
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
        "causal-attention-by-a-mask-tensor",
        "the decoders' causal attention given as a lower-triangular mask tensor (a GPU can then not take "
        "FlashAttention), not by is_causal",
        (
            (
                "fabric_tram/models/kv_cache.py",
                "    return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, "
                "is_causal=causal, **kwargs)",
                "    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril() if causal "
                "else None\n"
                "    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, "
                "dropout_p=dropout_p, **kwargs)",
            ),
        ),
        ("tests/test_attention_kernels.py::test_the_decoders_attend_causally_by_flag_with_no_mask",),
    ),
    Mutation(
        "encoder-attention-ignores-padding",
        "the encoder's attention called without its padding mask (padded positions attended to)",
        (
            (
                "fabric_tram/models/encoder.py",
                "y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)",
                "y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)",
            ),
        ),
        ("tests/test_attention_kernels.py::test_the_encoder_hands_its_padding_mask_to_the_kernel",),
    ),
    Mutation(
        "hf-attention-eager-by-default",
        "model.name=hf loads transformers models with eager attention unless told otherwise (no fused kernel)",
        (
            (
                "fabric_tram/models/hf.py",
                '        kwargs["attn_implementation"] = config.attn_implementation\n',
                '        kwargs["attn_implementation"] = config.attn_implementation\n'
                '    else:\n        kwargs["attn_implementation"] = "eager"\n',
            ),
        ),
        (
            "tests/test_attention_kernels.py::test_a_transformers_model_runs_transformers_sdpa_attention_unless_told_otherwise",
        ),
    ),
)
