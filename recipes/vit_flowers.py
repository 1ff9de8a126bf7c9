"""ViT-B/16 from ImageNet fine-tuned on Oxford Flowers (paper section 4.1, appendix B.3, Table 3).

    python recipes/vit_flowers.py optimizer.name=tram-x trainer.seed=1       # the paper averages 5 runs
    python recipes/vit_flowers.py --smoke                                     # tiny ViT, bundled images, CPU

Settings (recipes/_vit.py): google/vit-base-patch16-224 with a new 102-way head; SGD at 5e-4, cosine decay, no
warm-up, 200 epochs (Kim et al. 2022, section 5.1, as the paper follows it); 128 images per step; the final
checkpoint scored on the test split. Data: nelorth/oxford-flowers (appendix A's hub dataset) with its default
train/test partitions; its `image` and `label` columns.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _vit import vit_recipe, vit_smoke  # noqa: E402

from fabric_tram.cli import run_recipe  # noqa: E402

RECIPE = vit_recipe("vit_flowers", "nelorth/oxford-flowers", 102, 7_169, dataset_name="Flowers")
SMOKE = vit_smoke("vit_flowers")

if __name__ == "__main__":
    run_recipe(RECIPE, smoke=SMOKE)
