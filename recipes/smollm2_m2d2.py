"""SmolLM2-360M fine-tuned on M2D2 S2ORC Math, evaluated on ten unseen S2ORC domains: the paper's Table 4 setting
(section 4.2, appendix B.4) with a Llama-architecture model in place of GPT-2 base.

    python recipes/smollm2_m2d2.py optimizer.name=tram-prev        # or fabric run --devices N ... strategy=fsdp
    python recipes/smollm2_m2d2.py --smoke                         # the same code path, tiny, on a CPU

Settings: GPT-2 base's (recipes/_m2d2.py, gpt2_base_recipe: 16 blocks of 1024 tokens per step, 50k steps, Adam
(0.9, 0.99), lr 2e-5, polynomial decay after 10k warm-up steps, bf16, the best in-domain validation checkpoint
scored on test), the checkpoint HuggingFaceTB/SmolLM2-360M with its own tokenizer.json (both from the hub, or
folders: model.pretrained=DIR task.tokenizer=DIR). TRAM's radius: radius_scale=auto (docs/algorithms.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _m2d2 import S2ORC_DOMAINS, gpt2_base_recipe, run_dir, smoke  # noqa: E402

from fabric_tram.cli import run_recipe  # noqa: E402
from fabric_tram.config import merge  # noqa: E402

HUB_ID = "HuggingFaceTB/SmolLM2-360M"
RECIPE = merge(
    gpt2_base_recipe(S2ORC_DOMAINS, run_dir("smollm2_m2d2")),
    {"model": {"name": "llama", "pretrained": HUB_ID}, "task": {"tokenizer": HUB_ID}},
)
# the tiny Llama preset has GPT-2's vocabulary size, so the bundled GPT-2 tokenizer fits it
SMOKE = merge(smoke(run_dir("smoke/smollm2_m2d2")), {"task": {"tokenizer": "gpt2"}})

if __name__ == "__main__":
    run_recipe(RECIPE, smoke=SMOKE)
