import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
if "FABRIC_TRAM_CACHE" not in os.environ:  # token caches of the test corpora stay out of the user's home
    import tempfile

    os.environ["FABRIC_TRAM_CACHE"] = tempfile.mkdtemp(prefix="fabric_tram_cache_")
import torch  # noqa: E402

torch.set_num_threads(1)

WORDS = (
    "the model keeps its weights flat and its representations close to pre-training while it learns a new "
    "domain of text from scientific papers and encyclopedia articles about language and society"
).split()


def write_corpus(root: Path, domains=("alpha", "beta"), docs=(40, 12, 12), seed=0, min_words=3, max_words=60) -> Path:
    """A small corpus of documents of very unequal lengths (so padded batches have unequal target counts)."""
    rng = random.Random(seed)
    for domain in domains:
        folder = root / domain
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in zip(("train", "validation", "test"), docs, strict=True):
            texts = [
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + f" {domain}."
                for _ in range(n)
            ]
            (folder / f"{split}.txt").write_text("\n\n".join(texts) + "\n")
    return root


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "data")
