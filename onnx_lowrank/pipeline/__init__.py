"""The conversion, stage by stage: compress() (stages.py) loads and prepares the model,
calibrates, decomposes every layer, searches, and decides on the held-out part what is written
(verify.py), with fine-tuning rounds (finetune_rounds.py); the report of it all (report.py)."""

from .stages import compress, compress_file, finetune_file

__all__ = ["compress", "compress_file", "finetune_file"]
