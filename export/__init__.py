"""The offline side: PyTorch models, checkpoint loading, ONNX export, Triton model repository,
TensorRT plan building, and the avatar-package builder. Imports torch lazily per module."""
