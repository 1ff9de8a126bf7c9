"""Shared by the M2D2 recipes (paper section 4.2, appendices B.4 and C.2): domains and the smoke setting."""

from fabric_tram.data.m2d2 import S2ORC, WIKI

S2ORC_DOMAINS = list(S2ORC.values())  # Math (math_l1) first: the training domain
WIKI_DOMAINS = list(WIKI.values())  # Society and social sciences first: the training domain


def m2d2_task(domains: list[str]) -> dict:
    return {
        "name": "lm",
        "data_dir": "hf://machelreid/m2d2",
        "doc_format": "lines",
        "block_size": 1024,
        "train_domains": domains[:1],
        "eval_domains": domains,
    }


def run_dir(recipe: str) -> str:
    """Each update rule and seed in its own folder: ``fabric-tram report runs/<recipe>-*`` puts them side by side."""
    return f"runs/{recipe}-{{optimizer.name}}-seed{{trainer.seed}}"


def smoke(run_dir: str) -> dict:
    """Tiny preset on the bundled sample corpus, a few steps; every other setting (strategy, precision,
    update rule, evaluation, best-checkpoint selection) stays the recipe's own."""
    return {
        "model": {"pretrained": None, "preset": "tiny"},
        "task": {
            "data_dir": "sample",
            "doc_format": "paragraphs",
            "block_size": 64,
            "train_domains": ["licenses"],
            "eval_domains": [],
        },
        "schedule": {"warmup_steps": 2},
        "trainer": {
            "run_dir": run_dir,
            "max_steps": 4,
            "micro_batch_size": 2,
            "eval_every": 2,
            "save_every": 2,
            "eval_batches": 2,
            "progress_bar": False,
        },
    }


def gpt2_base_recipe(domains: list[str], run_dir: str) -> dict:
    """GPT-2 base, one GPU: 16 blocks of 1024 tokens per step, 50k steps, Adam (0.9, 0.99), lr 2e-5, polynomial
    decay after 10k warm-up steps, the best in-domain validation checkpoint evaluated on test (paper B.4)."""
    return {
        "model": {"name": "gpt2", "pretrained": "gpt2"},
        "task": m2d2_task(domains),
        "optimizer": {"name": "adam", "lr": 2e-5, "betas": [0.9, 0.99]},
        "schedule": {"name": "polynomial", "warmup_steps": 10_000},
        "trainer": {
            "run_dir": run_dir,
            "strategy": "auto",
            "precision": "bf16-mixed",
            "micro_batch_size": 16,
            "accumulate": 1,
            "max_steps": 50_000,
            "eval_every": 5_000,
            "save_every": 5_000,
            "eval_splits": ["validation", "test"],
            "select_best": True,
            "keep_last": 2,
        },
    }
