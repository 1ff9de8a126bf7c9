"""ViT-B/16 from ImageNet fine-tuned on Stanford Cars (paper section 4.1, appendix B.3, Table 3).

    python recipes/vit_cars.py optimizer.name=tram-x trainer.seed=1       # the paper averages 5 runs
    python recipes/vit_cars.py --smoke                                     # tiny ViT, bundled images, CPU

Settings (recipes/_vit.py): google/vit-base-patch16-224 with a new 196-way head; SGD at 5e-4, cosine decay, no
warm-up, 200 epochs (Kim et al. 2022, section 5.1, as the paper follows it); 128 images per step; the final
checkpoint scored on the test split. Data: Multimodal-Fatima/StanfordCars_train, the hub dataset appendix A names,
with its default train/test partitions (8,144 training images); its image and label columns are found by type.
If a copy of it has no `test` split, point task.test_split and task.validation_split at the one it has.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _vit import vit_recipe, vit_smoke  # noqa: E402

from fabric_tram.cli import run_recipe  # noqa: E402

RECIPE = vit_recipe("vit_cars", "Multimodal-Fatima/StanfordCars_train", 196, 8_144, dataset_name="Cars")
SMOKE = vit_smoke("vit_cars")

if __name__ == "__main__":
    run_recipe(RECIPE, smoke=SMOKE)
