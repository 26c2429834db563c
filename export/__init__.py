"""The offline side: PyTorch models, checkpoint loading, ONNX export, the Triton model
repository writer and the avatar-package builder. Only `export.models`, `export.checkpoint` and
`export.onnx_export` import torch; the CLI modules import them when a command runs."""
