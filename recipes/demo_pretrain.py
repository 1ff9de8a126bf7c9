"""Pre-train the demo's small GPT-2 on the mixture of the bundled demo domains, then export it (Hugging Face
layout) to fabric_tram/assets/models/demo-gpt2, where `model.pretrained=bundled:demo-gpt2` finds it.

    python recipes/demo_pretrain.py                # ~1.3M parameters, a few minutes on 2 CPU cores

This is the command that made the bundled checkpoint; TRAM is about fine-tuning a *pre-trained* model, so the
demo (recipes/demo.py) starts from it.
"""

import sys
from pathlib import Path

from fabric_tram.cli import run_recipe
from fabric_tram.data.tokenizer import end_of_text_id
from fabric_tram.models.hf_folder import save_hf_folder

EXPORT = Path(__file__).resolve().parents[1] / "fabric_tram" / "assets" / "models" / "demo-gpt2"

RECIPE = {
    "model": {
        "name": "gpt2",
        "preset": "tiny",
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "n_positions": 128,
        "vocab_size": 4096,
        "dropout": 0.1,
    },
    "task": {"name": "lm", "data_dir": "demo", "tokenizer": "demo", "block_size": 128},
    "optimizer": {"name": "adam", "lr": 3e-3, "betas": [0.9, 0.99]},
    "schedule": {"name": "cosine", "warmup_steps": 100, "end_factor": 0.05},
    "trainer": {
        "run_dir": "runs/demo_pretrain",
        "max_steps": 2000,
        "micro_batch_size": 16,
        "precision": "32-true",
        "eval_every": 500,
        "eval_batches": 16,
        "save_every": 500,
        "keep_last": 1,
        "seed": 1234,
    },
}
SMOKE = {
    "trainer": {
        "run_dir": "runs/smoke/demo_pretrain",
        "max_steps": 3,
        "eval_every": 0,
        "save_every": 0,
        "eval_batches": 1,
    }
}

if __name__ == "__main__":
    smoke = "--smoke" in sys.argv
    run = run_recipe(RECIPE, smoke=SMOKE)
    if not smoke:
        module = getattr(run.model, "module", run.model)
        eot = end_of_text_id("demo")
        save_hf_folder(module, EXPORT, extra_config={"bos_token_id": eot, "eos_token_id": eot})
        print(f"exported to {EXPORT}")
