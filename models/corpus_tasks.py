"""Each corpus model's own task, as a drop: what its users would measure, beside the converter's
default metric (benchmarks/zoo.py shows both on unseen inputs). Each is a user metric of the
form --metric takes, `fn(reference, outputs) -> drop`: the original's outputs and the
candidate's on the same samples, lists of arrays, samples along axis 0."""

from __future__ import annotations

import numpy as np

DB_THRESHOLD = 0.3     # PP-OCR's DBNet binarizes its probability map at 0.3 (det_db_thresh)
FRAME_THRESHOLD = 0.3  # basic-pitch's frame threshold
SPEECH_THRESHOLD = 0.5  # silero-vad's default threshold


def text_region_drop(reference, outputs) -> float:
    """1 - IoU of the text regions: the probability maps binarized at DB_THRESHOLD, over all
    samples and pixels."""
    a, b = reference[0] > DB_THRESHOLD, outputs[0] > DB_THRESHOLD
    union = np.sum(a | b)
    return float(1.0 - np.sum(a & b) / union) if union else 0.0


def ctc_strings(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding (PP-OCR's): the best class per step, repeats merged, blanks (0) dropped."""
    best = probs.argmax(-1)
    out = []
    for row in best:
        merged = [c for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        out.append(tuple(int(c) for c in merged))
    return out


def text_string_drop(reference, outputs) -> float:
    """The share of text lines whose decoded string changes."""
    a, b = ctc_strings(reference[0]), ctc_strings(outputs[0])
    return float(np.mean([x != y for x, y in zip(a, b)]))


def top1_drop(reference, outputs) -> float:
    """The share of samples whose top-1 class changes."""
    return float(np.mean(reference[0].argmax(-1) != outputs[0].argmax(-1)))


def note_frames_drop(reference, outputs) -> float:
    """1 - F1 of the 88-key activations over FRAME_THRESHOLD, the worse of the two 88-key heads
    (notes and onsets)."""
    f1s = []
    for r, o in zip(reference, outputs):
        if r.shape[-1] != 88:
            continue
        a, b = r > FRAME_THRESHOLD, o > FRAME_THRESHOLD
        f1s.append(2 * np.sum(a & b) / max(np.sum(a) + np.sum(b), 1))
    return float(1.0 - min(f1s))


def speech_decision_drop(reference, outputs) -> float:
    """The share of speech / no-speech decisions (the first output, the speech probability, over
    SPEECH_THRESHOLD) that change."""
    return float(np.mean((reference[0] > SPEECH_THRESHOLD) != (outputs[0] > SPEECH_THRESHOLD)))


TASKS = {
    "ocr_det": ("text-region IoU", text_region_drop),
    "ocr_rec": ("decoded strings", text_string_drop),
    "ocr_cls": ("top-1", top1_drop),
    "orientation": ("top-1", top1_drop),
    "magika": ("top-1", top1_drop),
    "basic_pitch": ("note frames F1", note_frames_drop),
}
for _key in ("silero_vad", "silero_16k_op15", "silero_op18_ifless", "silero_half", "silero_16k_sequence",
             "silero_openvino_16k"):
    TASKS[_key] = ("speech decisions", speech_decision_drop)
