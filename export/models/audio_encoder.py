"""The Wav2Lip-style AVE audio encoder (docs/REFERENCE.md section 4).

Key names equal `tests/data/reference/audio_encoder.state_dict.tsv` (prefix `audio_encoder.`).
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Conv2d (with bias) + BN as `conv_block.0/1`, then ReLU; residual blocks add their input
    before the ReLU. f32[N, cin, H, W] -> f32[N, cout, H', W'] (usual conv arithmetic)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class AudioEncoder(nn.Module):
    """Mel window -> 512-d audio feature (2,812,672 parameters).

    forward(mel: f32[N, 1, 80, 16]) -> f32[N, 512]. Spatial path 80x16 -> 27x16 (stride (3,1))
    -> 9x6 (stride 3) -> 3x3 (stride (3,2)) -> 1x1 (3x3 conv, pad 0) -> 1x1 (1x1 conv).
    """

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = nn.Sequential(
            ConvBlock(1, 32, 3, 1, 1),
            ConvBlock(32, 32, 3, 1, 1, residual=True),
            ConvBlock(32, 32, 3, 1, 1, residual=True),
            ConvBlock(32, 64, 3, (3, 1), 1),
            ConvBlock(64, 64, 3, 1, 1, residual=True),
            ConvBlock(64, 64, 3, 1, 1, residual=True),
            ConvBlock(64, 128, 3, 3, 1),
            ConvBlock(128, 128, 3, 1, 1, residual=True),
            ConvBlock(128, 128, 3, 1, 1, residual=True),
            ConvBlock(128, 256, 3, (3, 2), 1),
            ConvBlock(256, 256, 3, 1, 1, residual=True),
            ConvBlock(256, 512, 3, 1, 0),
            ConvBlock(512, 512, 1, 1, 0),
        )

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: f32[N, 1, 80, 16] (one 80-band x 16-frame window, docs/REFERENCE.md s.4)
        -> f32[N, 512] audio feature."""
        out = self.audio_encoder(mel)
        return out.flatten(1)
