"""Deployment: strip and export a plain ONNX model, checked against PyTorch with onnxruntime."""
