"""ViT-B/16 from ImageNet fine-tuned on CIFAR-100 (paper section 4.1, appendix B.3, Table 3).

    python recipes/vit_cifar100.py optimizer.name=tram-x trainer.seed=1       # the paper averages 5 runs
    python recipes/vit_cifar100.py --smoke                                     # tiny ViT, bundled images, CPU
    OMP_NUM_THREADS=1 fabric run --devices 2 --accelerator cpu recipes/vit_cifar100.py --smoke trainer.strategy=fsdp
    fabric-tram report runs/vit_cifar100-* runs/vit_cars-* runs/vit_flowers-*  # Table 3 with 95% CIs

Settings (recipes/_vit.py): google/vit-base-patch16-224 with a new 100-way head, its processor's size, mean and
std; SGD at 5e-4 with cosine decay and no warm-up for 200 epochs (Kim et al. 2022, section 5.1, as the paper
follows it); 128 images per step; the final checkpoint scored on the test split. Data: uoft-cs/cifar100 (the hub
id the paper's `cifar100` now resolves to; 50,000 train / 10,000 test images, the `fine_label` column).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _vit import vit_recipe, vit_smoke  # noqa: E402

from fabric_tram.cli import run_recipe  # noqa: E402

RECIPE = vit_recipe("vit_cifar100", "uoft-cs/cifar100", 100, 50_000, image_key="img", label_key="fine_label",
                    dataset_name="CIFAR-100")  # fmt: skip
SMOKE = vit_smoke("vit_cifar100")

if __name__ == "__main__":
    run_recipe(RECIPE, smoke=SMOKE)
