"""--quantize int8: onnxruntime's quantizer applied to the model as it is written (int8.py)."""
