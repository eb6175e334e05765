"""The commands beside convert: `bench` (bench.py) and `inspect` (inspection.py)."""
