"""Generate the bundled image sample (``image-sample/``): 3 classes of simple drawings, in mixed modes and sizes.

    python fabric_tram/assets/data/build_image_sample.py

``circle``, ``square`` and ``stripes``, 8 training, 2 validation and 2 test images each, drawn with Pillow from a
fixed seed. The modes and sizes vary on purpose (RGB, greyscale "L", "RGBA" with transparency, palette "P"; 32×32,
40×28, 24×24) so that every run through the sample exercises the conversion to RGB and the resize.
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "image-sample"
SPLITS = {"train": 8, "validation": 2, "test": 2}
MODES = ("RGB", "L", "RGBA", "P")
SIZES = ((32, 32), (40, 28), (24, 24))


def draw(kind: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", size, tuple(rng.randrange(0, 90) for _ in range(3)))
    pen = ImageDraw.Draw(image)
    color = tuple(rng.randrange(150, 256) for _ in range(3))
    w, h = size
    x, y = rng.randrange(0, w // 3), rng.randrange(0, h // 3)
    if kind == "circle":
        pen.ellipse((x, y, x + w // 2, y + h // 2), fill=color)
    elif kind == "square":
        pen.rectangle((x, y, x + w // 2, y + h // 2), fill=color)
    else:
        for left in range(rng.randrange(0, 4), w, 6):
            pen.rectangle((left, 0, left + 2, h), fill=color)
    return image


if __name__ == "__main__":
    rng = random.Random(0)
    n = 0
    for split, count in SPLITS.items():
        for kind in ("circle", "square", "stripes"):
            (HERE / split / kind).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = draw(kind, SIZES[n % len(SIZES)], rng)
                mode = MODES[n % len(MODES)]
                if mode == "RGBA":
                    image = image.convert("RGBA")
                    image.putalpha(200)
                elif mode == "P":
                    image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
                else:
                    image = image.convert(mode)
                image.save(HERE / split / kind / f"{i:02d}.png")
                n += 1
    print(f"wrote {n} images into {HERE}")
