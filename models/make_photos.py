"""Copy the real photographs bundled with scikit-image into models/photos/ as RGB PNGs.

    .venv/bin/python models/make_photos.py

Needs only the image files of scikit-image (pip install --no-deps scikit-image==0.26.0); skimage
itself is never imported, so its dependencies need not be installed. The files are read with PIL.

Kept: ordinary camera photos of everyday scenes and objects, the kind of input an ImageNet
classifier expects. Grayscale photos are kept too and written as 3 equal channels. Each file is
written at its own resolution; resizing and cropping is the reader's job. Left out (see SKIPPED):
drawings and test patterns, microscope/medical/telescope images, tiny or non-image files, and
the right half of the motorcycle stereo pair (nearly the same picture as the left half).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

PHOTO_DIR = Path(__file__).with_name("photos")

# file in skimage/data -> what it shows
PHOTOS = {
    "astronaut.png": "colour portrait of Eileen Collins in a space suit",
    "chelsea.png": "colour photo of a cat",
    "coffee.png": "colour photo of an espresso cup",
    "motorcycle_left.png": "colour photo of a motorcycle in a garage",
    "rocket.jpg": "colour photo of a rocket on the launch pad",
    "camera.png": "grayscale photo of a man with a camera on a tripod",
    "coins.png": "grayscale photo of Greek coins",
    "clock_motion.png": "grayscale photo of a wall clock, motion blurred",
    "brick.png": "grayscale photo of a brick wall (perspective-corrected crop)",
    "grass.png": "grayscale photo of grass (crop)",
    "gravel.png": "grayscale photo of gravel (crop)",
    "page.png": "grayscale photo of a printed page, uneven lighting",
    "text.png": "grayscale photo of handwriting on paper",
}

SKIPPED = {
    "motorcycle_right.png": "other half of the stereo pair: near duplicate of motorcycle_left",
    "moon.png": "telescope image of the lunar surface, low contrast",
    "hubble_deep_field.jpg": "telescope image of galaxies on black",
    "cell.png": "microscope image",
    "ihc.png": "microscope image (stained tissue)",
    "retina.jpg": "medical fundus image",
    "microaneurysms.png": "medical, 102x102 grayscale",
    "horse.png": "binary drawing (silhouette)",
    "logo.png": "drawing",
    "color.png": "synthetic colour wheel",
    "phantom.png": "synthetic Shepp-Logan phantom",
    "chessboard_GRAY.png": "synthetic pattern",
    "chessboard_RGB.png": "synthetic pattern",
    "no_time_for_that_tiny.gif": "14x25 animation",
    "multipage.tif": "10x15 test file",
    "multipage_rgb.tif": "test file PIL cannot read",
    "lfw_subset.npy": "not an image file (25x25 faces as an array)",
    "motorcycle_disp.npz": "not an image file (disparity map)",
}


def skimage_data_dir() -> Path:
    # find_spec locates the package without importing it (importing it needs lazy_loader, scipy...,
    # which --no-deps leaves out).
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps scikit-image==0.26.0 first")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def write_photos(out_dir: Path = PHOTO_DIR) -> list[Path]:
    """Write every photo in PHOTOS to out_dir as <stem>.png (RGB); return the paths written."""
    src = skimage_data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PHOTOS:
        out = out_dir / (Path(name).stem + ".png")
        # PNG even for rocket.jpg: lossless, so re-running never degrades the picture.
        with Image.open(src / name) as img:
            img.convert("RGB").save(out)
        written.append(out)
    return written


def main() -> None:
    for path in write_photos():
        with Image.open(path) as img:
            print(f"wrote {path} {img.size[0]}x{img.size[1]}")
    print(f"{len(PHOTOS)} photos in {PHOTO_DIR}")


if __name__ == "__main__":
    main()
