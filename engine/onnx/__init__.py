"""ONNX in and out: export, import and the conformance runner."""
