"""Data in and models in and out: data sources and ONNX."""
