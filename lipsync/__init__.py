"""Shared core of the lip-sync serving system.

`lipsync` holds what both the offline side (`export/`) and the online side (`gateway/`) use:
repository paths, logging setup, the frame math, the audio features, the avatar-package format
and the local CPU Triton launcher. Nothing here imports torch.
"""
__version__ = "0.1.0"
