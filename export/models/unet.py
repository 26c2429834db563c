"""The SyncTalk_2D "unet_328" network, with its three audio branches (docs/REFERENCE.md section 1).

The module tree reproduces the key names of real SyncTalk_2D checkpoints exactly (listed in
`tests/data/reference/unet_328_{ave,hubert,wenet}.state_dict.tsv`), so a trained checkpoint loads
with `strict=True`. Tensor layout is NCHW float32 throughout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipsync.contract import AUDIO_MODES, WINDOW_ROWS, AudioMode

AUDIO_BRANCH_SHAPES: dict[str, tuple[int, int, int]] = {
    "ave": (32, 16, 16),
    "hubert": (32, 32, 32),
    "wenet": (256, 16, 32),
}
"""Per mode, the (C, H, W) the audio branch takes (docs/REFERENCE.md section 1)."""

AUDIO_WINDOW_SHAPES: dict[str, tuple[int, int]] = {
    mode: (WINDOW_ROWS, (c * h * w) // WINDOW_ROWS)
    for mode, (c, h, w) in AUDIO_BRANCH_SHAPES.items()
}
"""Per mode, the (rows, row width) of the audio window: ave (16, 512), hubert (16, 2048),
wenet (16, 8192), with `lipsync.contract.WINDOW_ROWS` rows. A window reshaped row-major gives
`AUDIO_BRANCH_SHAPES[mode]`; the `ave` one is the contract's `UNET_AUDIO`."""


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, BN, ReLU, 3x3 depthwise, BN, ReLU, 1x1 project, BN.

    `conv` is an `nn.Sequential` whose indices 0..7 give the checkpoint keys
    (`conv.0` expand conv, `conv.1` BN, `conv.3` depthwise, `conv.4` BN, `conv.6` project,
    `conv.7` BN). No activation at the end; the input is added only when `use_res`.

    Shapes: f32[N, inp, H, W] -> f32[N, oup, H/stride, W/stride].
    """

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int | tuple[int, int],
        use_res: bool,
        expand: int = 2,
    ) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res = use_res
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class DoubleConvDW(nn.Module):
    """IR(in -> out, stride, no residual) then IR(out -> out, 1, residual), as `double_conv`.

    Shapes: f32[N, in_ch, H, W] -> f32[N, out_ch, H/stride, W/stride].
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            InvertedResidual(in_ch, out_ch, stride=stride, use_res=False),
            InvertedResidual(out_ch, out_ch, stride=1, use_res=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class InConv(nn.Module):
    """Input stem: IR(in -> out, stride 1, no residual) as `inconv.0`. f32[N,6,H,W] -> [N,32,H,W]."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.inconv = nn.Sequential(InvertedResidual(in_ch, out_ch, stride=1, use_res=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inconv(x)


class Down(nn.Module):
    """Encoder stage: DoubleConvDW with stride 2 (no max-pool), kept as `maxpool_conv.0`.

    Shapes: f32[N, in_ch, H, W] -> f32[N, out_ch, H/2, W/2].
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(DoubleConvDW(in_ch, out_ch, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Decoder stage: bilinear x2 upsample (align_corners=True), pad to the skip's size,
    concat [upsampled, skip] on channels, DoubleConvDW stride 1 (docs/REFERENCE.md section 1).

    Shapes: x f32[N, C1, H, W], skip f32[N, C2, 2H, 2W] -> f32[N, out_ch, 2H, 2W],
    with C1 + C2 = in_ch.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConvDW(in_ch, out_ch, stride=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        diff_y = skip.shape[2] - x.shape[2]
        diff_x = skip.shape[3] - x.shape[3]
        if diff_y or diff_x:
            x = F.pad(x, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x, skip], dim=1))


class OutConv(nn.Module):
    """1x1 conv with bias, `conv`. f32[N, in_ch, H, W] -> f32[N, out_ch, H, W] (logits)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AudioBranch(nn.Module):
    """The `audio_model` of unet_328: audio window -> f32[N, 512, 10, 10].

    Per mode (docs/REFERENCE.md section 1), input f32[N, C, H, W] = `AUDIO_BRANCH_SHAPES[mode]`:
    - ave    [N, 32, 16, 16]:  conv1 IR(32->64), conv2 IR(64->128), conv3 3x3 128->256 s1;
    - hubert [N, 32, 32, 32]:  as ave but conv3 stride 2 (32 -> 16);
    - wenet  [N, 256, 16, 32]: conv1/conv2 IR(256, residual), conv3 3x3 256->256 stride (1, 2).
    Then BN+ReLU, conv4 IR(256, residual), conv5 3x3 256->512 stride 2 pad 3 (16 -> 10) + BN +
    ReLU, conv6/conv7 IR(512, residual).
    """

    def __init__(self, mode: AudioMode) -> None:
        super().__init__()
        if mode == "wenet":
            self.conv1 = InvertedResidual(256, 256, stride=1, use_res=True)
            self.conv2 = InvertedResidual(256, 256, stride=1, use_res=True)
            self.conv3 = nn.Conv2d(256, 256, kernel_size=3, stride=(1, 2), padding=1)
        else:
            self.conv1 = InvertedResidual(32, 64, stride=1, use_res=False)
            self.conv2 = InvertedResidual(64, 128, stride=1, use_res=False)
            stride = (2, 2) if mode == "hubert" else (1, 1)
            self.conv3 = nn.Conv2d(128, 256, kernel_size=3, stride=stride, padding=1)
        self.bn3 = nn.BatchNorm2d(256)
        self.conv4 = InvertedResidual(256, 256, stride=1, use_res=True)
        self.conv5 = nn.Conv2d(256, 512, kernel_size=3, stride=2, padding=3)
        self.bn5 = nn.BatchNorm2d(512)
        self.relu = nn.ReLU()
        self.conv6 = InvertedResidual(512, 512, stride=1, use_res=True)
        self.conv7 = InvertedResidual(512, 512, stride=1, use_res=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.conv4(x)
        x = self.relu(self.bn5(self.conv5(x)))
        return self.conv7(self.conv6(x))


class UNet328(nn.Module):
    """SyncTalk_2D unet_328 (docs/REFERENCE.md section 1): 12,186,935 parameters in mode `ave`.

    forward(x, audio):
    - x: f32[N, 6, 320, 320], channels [reference BGR, masked BGR], values in [0, 1];
    - audio: f32[N, C, H, W] = `AUDIO_BRANCH_SHAPES[mode]` (ave [N, 32, 16, 16]);
    - returns f32[N, 3, 320, 320] BGR in [0, 1] (sigmoid).

    Raises ValueError for an unknown mode.
    """

    def __init__(self, mode: AudioMode = "ave") -> None:
        super().__init__()
        if mode not in AUDIO_MODES:
            raise ValueError(f"unknown audio mode {mode!r}; expected one of {AUDIO_MODES}")
        self.mode: AudioMode = mode
        self.audio_model = AudioBranch(mode)
        self.fuse_conv = nn.Sequential(
            DoubleConvDW(1024, 512, stride=1),
            DoubleConvDW(512, 256, stride=1),
        )
        self.inc = InConv(6, 32)
        self.down1 = Down(32, 32)
        self.down2 = Down(32, 64)
        self.down3 = Down(64, 128)
        self.down4 = Down(128, 256)
        self.down5 = Down(256, 512)
        self.up1 = Up(512, 128)
        self.up2 = Up(256, 64)
        self.up3 = Up(128, 32)
        self.up4 = Up(64, 32)
        self.up5 = Up(64, 16)
        self.outc = OutConv(16, 3)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """x: f32[N, 6, 320, 320] ([reference, masked] BGR in [0, 1]); audio: f32 of the
        branch shape (`AUDIO_BRANCH_SHAPES[mode]`, e.g. [N, 32, 16, 16] for ave)
        -> f32[N, 3, 320, 320] BGR in [0, 1] (sigmoid). docs/REFERENCE.md s.1."""
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x6 = self.down5(x5)
        a = self.audio_model(audio)
        y = self.fuse_conv(torch.cat([x6, a], dim=1))
        y = self.up1(y, x5)
        y = self.up2(y, x4)
        y = self.up3(y, x3)
        y = self.up4(y, x2)
        y = self.up5(y, x1)
        return torch.sigmoid(self.outc(y))
