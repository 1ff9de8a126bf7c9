"""GPT-2 base fine-tuned on M2D2 Wikipedia Society and social sciences, evaluated on ten unseen Wikipedia domains (paper section 4.2, Table 4).

One GPU: 16 blocks of 1024 tokens per step, 50k steps, Adam (0.9, 0.99), lr 2e-5, polynomial decay after 10k
warm-up steps, the checkpoint with the lowest in-domain validation loss evaluated on test.

    python recipes/gpt2_wiki.py optimizer.name=tram-prev          # or fabric run --devices N ...
    python recipes/gpt2_wiki.py --smoke                          # the same code path, tiny, on a CPU

radius_scale = 1: d is the per-token KL (ALGORITHMS.md); see recipes/gpt2xl_s2orc.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _m2d2 import WIKI_DOMAINS, m2d2_task, smoke  # noqa: E402

from fabric_tram.cli import run_recipe  # noqa: E402

RECIPE = {
    "model": {"name": "gpt2", "pretrained": "gpt2"},
    "task": m2d2_task(WIKI_DOMAINS),
    "optimizer": {"name": "adam", "lr": 2e-5, "betas": [0.9, 0.99]},
    "schedule": {"name": "polynomial", "warmup_steps": 10_000},
    "trainer": {"run_dir": "runs/gpt2_wiki", "strategy": "auto", "precision": "bf16-mixed", "micro_batch_size": 16,
                "accumulate": 1, "max_steps": 50_000, "eval_every": 5_000, "save_every": 5_000,
                "eval_splits": ["validation", "test"], "select_best": True, "keep_last": 2},
}
SMOKE = smoke("runs/smoke/gpt2_wiki")

if __name__ == "__main__":
    run_recipe(RECIPE, smoke=SMOKE)
