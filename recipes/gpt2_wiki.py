"""GPT-2 base fine-tuned on M2D2 Wikipedia Society and social sciences, evaluated on ten unseen Wikipedia domains
(paper section 4.2, Table 4).

    python recipes/gpt2_wiki.py optimizer.name=tram-prev          # or fabric run --devices N ...
    python recipes/gpt2_wiki.py --smoke                          # the same code path, tiny, on a CPU

Settings: recipes/_m2d2.py (gpt2_base_recipe). TRAM's radius: radius_scale=auto (calibrated over the first 20
steps to a median of radius_target 0.5; docs/algorithms.md, "TRAM's radius").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _m2d2 import WIKI_DOMAINS, gpt2_base_recipe, run_dir, smoke  # noqa: E402

from fabric_tram.cli import run_recipe  # noqa: E402

RECIPE = gpt2_base_recipe(WIKI_DOMAINS, run_dir("gpt2_wiki"))
SMOKE = smoke(run_dir("smoke/gpt2_wiki"))

if __name__ == "__main__":
    run_recipe(RECIPE, smoke=SMOKE)
