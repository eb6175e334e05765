"""Calibration data: read from an .npz keyed by input name, an .npy for a single-input model, a
folder of images, or any object with `get_next() -> dict | None` (onnxruntime's
CalibrationDataReader protocol); checked against the model's inputs; split into a search part and
a held-out part."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import OnnxLowrankError, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SYNTHETIC_SAMPLES = 64


class CalibrationError(OnnxLowrankError):
    """Calibration data that does not fit the model."""


@dataclass(frozen=True)
class ImageOptions:
    """How a folder of images becomes model inputs: the shorter side resized to size / crop, the
    centre size x size cropped, pixel values times `scale`, then (x - mean) / std per channel."""

    size: int | None = None          # None: the model input's own spatial size
    crop: float = 0.875              # ImageNet evaluation: resize to 256, crop 224
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"             # or NHWC


@dataclass
class InputSpec:
    name: str
    shape: tuple            # ints, or str/None for dynamic dims
    dtype: np.dtype


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        t = inp.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
        specs.append(InputSpec(inp.name, dims, helper.tensor_dtype_to_np_dtype(t.elem_type)))
    return specs


@dataclass
class CalibrationSet:
    """Samples along the first axis of every array. An array of the model input's own rank has
    them along the input's batch axis; an array of one more dimension holds one whole model
    input per sample (a state `[2, 1, 128]`, a scalar sample rate, a whole sequence): such a
    model takes one sample per run. `run_batch` is the most samples one run takes (1 then, or a
    batch the model fixes; None: any)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    synthetic: bool = False
    indices: np.ndarray = field(default=None)  # positions in the set it was taken from
    whole: frozenset[str] = frozenset()        # inputs given one whole model input per sample
    run_batch: int | None = None
    groups: np.ndarray | None = None           # per sample, its source (photo, file, speaker) as an
    #                                            integer code; None: the samples are independent

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = np.arange(len(self))

    def __len__(self) -> int:
        first = next(iter(self.inputs.values()))
        return first.shape[0] if first.ndim else 0

    def take(self, idx: np.ndarray) -> "CalibrationSet":
        labels = None if self.labels is None else self.labels[idx]
        groups = None if self.groups is None else self.groups[idx]
        return CalibrationSet({k: v[idx] for k, v in self.inputs.items()}, labels, self.source,
                              self.synthetic, self.indices[idx], self.whole, self.run_batch, groups)

    def group_codes(self) -> np.ndarray:
        """Per sample, its group: the groups given, or each sample its own."""
        return np.arange(len(self)) if self.groups is None else self.groups

    def split(self, share: float, seed: int) -> tuple["CalibrationSet", "CalibrationSet"]:
        """Two disjoint parts, the second about `share` of the samples, drawn with `seed`; every
        group wholly on one side (whole groups are drawn until the second part has its share)."""
        first, second = self.split_positions(share, seed)
        return self.take(first), self.take(second)

    def split_positions(self, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """`split`, as the positions of each part in this set."""
        n = len(self)
        if n < 2:
            raise CalibrationError(f"calibration data has {n} sample; at least 2 are needed "
                                   "(a search part and a held-out part)")
        codes = self.group_codes()
        unique = np.unique(codes)
        if len(unique) < 2:
            raise CalibrationError(f"the calibration samples come from {len(unique)} group (--groups); at least 2 "
                                   "are needed (a search part and a held-out part)")
        order = np.random.default_rng(seed).permutation(unique)
        sizes = np.bincount(np.searchsorted(unique, codes), minlength=len(unique))[np.searchsorted(unique, order)]
        want = min(max(1, round(n * share)), n - 1)
        # the fewest whole groups that reach the share, never all of them
        count = min(int(np.searchsorted(np.cumsum(sizes), want)) + 1, len(unique) - 1)
        second = np.isin(codes, order[:count])
        return np.flatnonzero(~second), np.flatnonzero(second)

    def batch_for(self, size: int) -> int:
        """The samples one run takes when `size` are asked for."""
        return size if self.run_batch is None else self.run_batch

    def batches(self, size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Feeds in the batches the model accepts (about `size` samples, or its fixed batch), with
        how many samples each holds: a fixed batch's last run is filled up by repeating its last
        sample, whose outputs `join` drops."""
        step = self.batch_for(size)
        n = len(self)
        for start in range(0, n, step):
            count = min(step, n - start)
            take = np.arange(start, start + step).clip(max=n - 1) if self.run_batch else np.arange(start, start + count)
            yield {k: np.asarray(v[take[0]]) if k in self.whole else v[take] for k, v in self.inputs.items()}, count

    def own(self, value: np.ndarray, count: int) -> np.ndarray:
        """A run's value (samples along axis 0) without the repeats that filled up a fixed batch's
        last run (`batches`): those are not counted twice."""
        return value[:count] if self.run_batch and count < self.run_batch and not self.whole else value

    def join(self, runs: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """One output over the set from its values per run (with each run's sample count):
        stacked when each run is one whole sample, else joined along the batch axis."""
        if self.whole:
            return np.stack([value for value, _ in runs])
        return np.concatenate([value[:count] if value.ndim else value for value, count in runs])

    def sample_feed(self, count: int = 1) -> dict[str, np.ndarray]:
        """One run's feed of the first sample `count` times (or as often as the model's fixed batch
        takes): the costs are counted at one, layers are timed at --latency-batch."""
        return next(self.take(np.zeros(count, dtype=int)).batches(count))[0]


def token_mask(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """A transformer's attention mask, (batch, sequence) of 0 / 1 (Hugging Face's `attention_mask`,
    which every BERT-style export takes): where it is 0 the position is padding."""
    for name, value in feed.items():
        if "mask" in name.lower() and value.ndim == 2 and np.isin(value, (0, 1)).all():
            return value.astype(bool)
    return None


def without_padding(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """A (batch, sequence, features...) output with its padding positions (mask 0) set to zero
    (a 2-D output is per sample, not per token, whatever its width). What a model computes there
    is thrown away downstream (pooling, token heads read real tokens only), so it must not count
    in the drop: zero in the original and in every candidate, it adds none."""
    if mask is None or output.ndim < 3 or output.shape[:2] != mask.shape or mask.all():
        return output
    out = output.copy()
    out[~mask] = 0
    return out


def input_layout(model: onnx.ModelProto, data: CalibrationSet | None = None) -> dict[str, dict]:
    """Per input: the shape the model declares, which of its dims are static, and how the
    calibration arrays give it (for the report and `inspect`; None: not given)."""
    def given(name: str) -> str:
        if data is None:
            return "not given"
        return "one whole input per sample" if name in data.whole else "samples along axis 0"

    return {s.name: {"declared": [d if isinstance(d, int) else (d or "?") for d in s.shape],
                     "static": [isinstance(d, int) and d > 0 for d in s.shape], "given": given(s.name)}
            for s in model_inputs(model)}


def load_calibration(source: Any, model: onnx.ModelProto, labels: Any = None,
                     image: ImageOptions = ImageOptions(), seed: int = 0, groups: Any = None) -> CalibrationSet:
    """Calibration inputs for `model` from `source` (None: synthetic), checked against the model's
    inputs. `labels`: an .npy path, the name of a key in the .npz source, or an array; `groups`
    (each sample's source: photo, file, speaker, document) likewise."""
    specs = model_inputs(model)
    if not specs:
        raise CalibrationError("the model has no inputs to feed (none, or only initializers): it computes a "
                               "constant; there is nothing to compress against")
    if source is None:
        data = synthetic(specs, seed)
    elif hasattr(source, "get_next"):
        data = _from_reader(source)
    else:
        path = Path(os.fspath(source))
        if not path.exists():
            raise CalibrationError(f"{path}: no such file or folder")
        if path.is_dir():
            data = _from_images(path, specs, image)
        elif path.suffix == ".npz":
            data = _from_npz(path, specs, labels, groups)
        elif path.suffix == ".npy":
            data = _from_npy(path, specs)
        else:
            raise CalibrationError(f"{path}: calibration data must be .npz, .npy or a folder of images")
    if labels is not None and not (isinstance(labels, str) and data.labels is not None):
        data.labels = _side_array(labels, "labels")
    if groups is not None and not (isinstance(groups, str) and data.groups is not None):
        data.groups = _group_codes(_side_array(groups, "groups"), groups)
    _check(data, specs)
    return data


def synthetic(specs: Sequence[InputSpec], seed: int) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        dims = list(spec.shape)
        if any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
            raise CalibrationError(f"input {spec.name!r} has dynamic dimensions {spec.shape}: "
                                   "synthetic data needs static ones; give --calib")
        inputs[spec.name] = rng.standard_normal([SYNTHETIC_SAMPLES] + dims[1:]).astype(spec.dtype)
    return CalibrationSet(inputs, None, "synthetic N(0, 1) inputs", synthetic=True)


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Any failure to read a user's numpy file is theirs to fix: numpy, zipfile, zlib and the header
    parser each raise their own exceptions on a damaged one."""
    try:
        yield
    except CalibrationError:
        raise
    except Exception as e:
        reason = "holds Python objects (pickled), not numeric arrays" if "allow_pickle" in str(e) else (
            f"cannot read {what}: {first_line(e) if str(e).strip() else 'empty or truncated'}")
        raise CalibrationError(f"{path}: {reason}") from None


def _load(path: Path, kind: type, what: str) -> Any:
    """np.load of an .npz (kind NpzFile) or .npy (kind ndarray), refusing pickled objects and a
    file whose content is the other kind."""
    with _reading(path, what):
        loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, kind):
        if isinstance(loaded, np.lib.npyio.NpzFile):
            loaded.close()
        want = "an .npz archive" if kind is np.lib.npyio.NpzFile else "a single .npy array"
        raise CalibrationError(f"{path}: not {want}, whatever its suffix says")
    return loaded


def _from_npz(path: Path, specs, labels, groups=None) -> CalibrationSet:
    with _load(path, np.lib.npyio.NpzFile, "calibration data") as npz:
        keys = set(npz.files)
        label_key, group_key = (k if isinstance(k, str) and not k.endswith(".npy") else None for k in (labels, groups))
        names = {s.name for s in specs}
        missing = names - keys
        if missing:
            raise CalibrationError(f"{path}: no array for model input(s) {', '.join(sorted(missing))}; "
                                   f"the file has {', '.join(sorted(keys)) or 'nothing'}")
        for what, key in (("labels", label_key), ("groups", group_key)):
            if key is not None and key not in keys:
                raise CalibrationError(f"{path}: no {what} key {key!r}; the file has {', '.join(sorted(keys))}")
        with _reading(path, "an array"):  # the members are read here: a damaged one fails now
            inputs = {n: npz[n] for n in names}
            data = CalibrationSet(inputs, npz[label_key] if label_key else None, str(path),
                                  groups=_group_codes(npz[group_key], path) if group_key else None)
    return data


def _from_npy(path: Path, specs) -> CalibrationSet:
    if len(specs) != 1:
        raise CalibrationError(f"{path}: an .npy holds one array but the model has {len(specs)} inputs; use .npz")
    return CalibrationSet({specs[0].name: _load(path, np.ndarray, "calibration data")}, None, str(path))


def _from_reader(reader) -> CalibrationSet:
    chunks: dict[str, list[np.ndarray]] = {}
    while True:
        item = reader.get_next()
        if item is None:
            break
        for k, v in item.items():
            chunks.setdefault(k, []).append(np.asarray(v))
    if not chunks:
        raise CalibrationError("the calibration reader returned no data")
    try:
        inputs = {k: np.concatenate(v) for k, v in chunks.items()}
    except ValueError as e:
        raise CalibrationError(f"the calibration reader's batches do not stack: {e}") from None
    return CalibrationSet(inputs, None, type(reader).__name__)


def _from_images(folder: Path, specs, options: ImageOptions) -> CalibrationSet:
    from PIL import Image, UnidentifiedImageError

    if len(specs) != 1:
        raise CalibrationError(f"{folder}: a folder of images feeds a single-input model; this one has {len(specs)}")
    spec = specs[0]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    nchw = options.layout.upper() == "NCHW"
    dims = spec.shape[1:]
    channels = dims[0] if nchw else dims[-1]
    size = options.size or (dims[1] if nchw else dims[0])
    if not isinstance(size, int) or not isinstance(channels, int):
        raise CalibrationError(f"input {spec.name!r} {spec.shape}: give the image size for dynamic inputs")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB" if channels == 3 else "L")
                short = round(size / options.crop)
                w, h = im.size
                scale = short / min(w, h)
                im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32)
        except (UnidentifiedImageError, OSError) as e:
            raise CalibrationError(f"{f}: cannot read the image: {e}") from None
        arr = arr.reshape(size, size, channels) * options.scale
        mean = np.asarray(options.mean[:channels], np.float32)
        std = np.asarray(options.std[:channels], np.float32)
        arr = (arr - mean) / std
        images.append(arr.transpose(2, 0, 1) if nchw else arr)
    return CalibrationSet({spec.name: np.stack(images).astype(spec.dtype)}, None, str(folder))


def _side_array(source, what: str) -> np.ndarray:
    """`--labels` or `--groups` given apart from the calibration data: an array, or an .npy path."""
    if isinstance(source, np.ndarray):
        return source
    return _load(Path(os.fspath(source)), np.ndarray, what)


def _group_codes(array: np.ndarray, where) -> np.ndarray:
    """One group per sample, any names (integers, strings) as codes 0..groups-1."""
    array = np.asarray(array)
    if array.ndim != 1:
        raise CalibrationError(f"{where}: groups must be one name per sample (1-D); got shape {array.shape}")
    if array.dtype.kind not in "iuUSb":
        raise CalibrationError(f"{where}: groups must be integers or strings; got {array.dtype}")
    return np.unique(array, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _check(data: CalibrationSet, specs: Sequence[InputSpec]) -> None:
    names = {s.name for s in specs}
    extra = set(data.inputs) - names
    if extra:
        raise CalibrationError(f"calibration data has array(s) {', '.join(sorted(extra))} that are not model "
                               f"inputs ({', '.join(sorted(names))})")
    for name, array in data.inputs.items():
        if array.ndim == 0:
            raise CalibrationError(f"input {name!r}: calibration array is a scalar; it needs the samples "
                                   "along its first axis")
    counts = {k: len(v) for k, v in data.inputs.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationError(f"calibration arrays hold different numbers of samples: {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise CalibrationError("calibration data holds no samples")
    whole, fixed = set(), {}
    for spec in specs:
        array = data.inputs[spec.name]
        if array.ndim == len(spec.shape) + 1:  # one whole model input per sample
            whole.add(spec.name)
            want = spec.shape
            got = array.shape[1:]
        elif array.ndim == len(spec.shape):     # samples along the input's batch axis
            want, got = spec.shape[1:], array.shape[1:]
            if isinstance(spec.shape[0], int) and spec.shape[0] > 0:
                fixed[spec.name] = spec.shape[0]
        else:
            raise CalibrationError(f"input {spec.name!r}: calibration array has shape {array.shape}, the model "
                                   f"wants {len(spec.shape)} dims {spec.shape} (samples along its first axis), "
                                   f"or {len(spec.shape) + 1} for one whole input per sample")
        for i, (g, w) in enumerate(zip(got, want), start=array.ndim - len(want)):
            if isinstance(w, int) and w > 0 and g != w:
                raise CalibrationError(f"input {spec.name!r}: calibration array has shape {array.shape}, "
                                       f"the model wants {spec.shape} (dim {i} differs)")
        if array.dtype != spec.dtype:
            if not (np.issubdtype(array.dtype, np.number) and np.can_cast(array.dtype, spec.dtype, "same_kind")):
                raise CalibrationError(f"input {spec.name!r}: calibration array is {array.dtype}, "
                                       f"the model wants {spec.dtype}")
            data.inputs[spec.name] = array.astype(spec.dtype)
        if np.issubdtype(spec.dtype, np.floating) and not np.all(np.isfinite(data.inputs[spec.name])):
            raise CalibrationError(f"input {spec.name!r}: calibration array contains NaN or Inf")
    data.whole, data.run_batch = frozenset(whole), _run_batch(whole, fixed)
    if data.labels is not None:
        if data.labels.ndim != 1:
            raise CalibrationError(f"labels must be one class index per sample (1-D); got shape {data.labels.shape}")
        if len(data.labels) != n:
            raise CalibrationError(f"{len(data.labels)} labels for {n} calibration samples")
        if not np.issubdtype(data.labels.dtype, np.integer):
            raise CalibrationError(f"labels must be integers (class indices); got {data.labels.dtype}")
    if data.groups is not None and len(data.groups) != n:
        raise CalibrationError(f"{len(data.groups)} groups for {n} calibration samples")


def _run_batch(whole: set[str], fixed: dict[str, int]) -> int | None:
    """The samples one run takes: 1 when an input is one whole sample, a batch the model's
    inputs fix, or None (any)."""
    batches = set(fixed.values()) | ({1} if whole else set())
    if len(batches) > 1:
        raise CalibrationError(f"the inputs want different batches: {fixed}"
                               + (f" and one sample per run for {', '.join(sorted(whole))}" if whole else ""))
    return batches.pop() if batches else None
