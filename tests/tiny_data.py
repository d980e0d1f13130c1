"""Tiny generated image datasets shared by the CLI, jobs and Ray end-to-end tests."""
from __future__ import annotations

from pathlib import Path

CLASSES = ["cat", "dog", "fox"]

# A 1-block ViT for 3-channel 32x32 images: builds and calibrates in a second.
TINY_RECIPE = {
    "name": "tiny_w8a8",
    "model": {"name": "quantcore/vit_fmnist", "num_classes": 3, "in_chans": 3, "img_size": 32,
              "kwargs": {"patch_size": 8, "depth": 1}},
    "placement": {"family": "vit", "mode": "ft1"},
    "calibration": {"method": "mse", "num_batches": 2, "batch_size": 4},
}


def make_images(root: Path, splits: tuple[tuple[str, int], ...] = (("train", 6), ("val", 4))) -> Path:
    """ImageNet-style folders of 32x32 JPEGs whose brightness depends on the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in splits:
        for ci, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((32, 32, 3)) * 80 + ci * 80).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{c}_{i}.jpg", quality=90)
    return root
