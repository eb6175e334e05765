"""onnxruntime: sessions and running models over data (sessions.py), and latency measured in it
(latency.py)."""
