"""The bundled default: a tiny GPT-2 on the sample corpus shipped with fabric_tram (minutes on a laptop CPU).

python recipes/tiny_sample.py                                  # 1 process
fabric-tram train recipes/tiny_sample.py optimizer.lr=3e-4     # the same, through the CLI
OMP_NUM_THREADS=1 fabric run --devices 2 recipes/tiny_sample.py trainer.strategy=fsdp
"""

from fabric_tram.cli import run_recipe

RECIPE = {
    "model": {"name": "gpt2", "preset": "tiny"},
    "task": {"name": "lm", "data_dir": "sample", "block_size": 64},
    "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99]},
    "schedule": {"name": "polynomial", "warmup_steps": 10},
    "trainer": {
        "run_dir": "runs/tiny_sample-{optimizer.name}-seed{trainer.seed}",
        "max_steps": 60,
        "micro_batch_size": 8,
        "accumulate": 2,
        "precision": "32-true",
        "eval_every": 20,
        "eval_batches": 8,
        "save_every": 20,
    },
}

if __name__ == "__main__":
    run_recipe(RECIPE)
