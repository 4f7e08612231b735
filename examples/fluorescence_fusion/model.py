"""A small two-branch network that fuses white-light and NIR fluorescence endoscopy.

Trained on simulated frames only (``synthetic:endoscopy`` and
``synthetic:fluorescence`` with the same seed, at the same times); not a
clinical model.

**Target, "perfused tissue":** tissue perfused with ICG that the surgeon can
see in the white-light image: it glows in NIR, lies inside the field of view,
is not behind the instrument and is not under specular glare. Neither camera
shows this alone: perfusion is invisible in white light; glare does not reach
the NIR camera (its filter blocks reflected light), and the NIR frame is half
the size and blurred by scattering, so the instrument's edge is only sharp in
white light.

Inputs (float32): ``white`` ``(N, 3, 256, 256)`` RGB / 255 (mean 0, std 1),
the frame stretched to 256x256; ``nir`` ``(N, 1, 128, 128)`` gray / 255,
stretched to 128x128. Output ``logits`` ``(N, 1, 256, 256)``; the runtime
applies a sigmoid and ``THRESHOLD``.

Only Conv, BatchNorm, ReLU, concatenation and upsampling by a fixed factor
are used, and nothing depends on the data, so the graph exports to ONNX
(``torch.onnx.export(dynamo=True)``, dynamic batch) as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WHITE_SIZE = 256
NIR_SIZE = 128
INPUT_NAMES = ("white", "nir")
OUTPUT_NAME = "logits"
SCALE = 1.0 / 255.0
"""uint8 level -> [0, 1], for both inputs."""
THRESHOLD = 0.5
"""Probability above which a pixel is perfused tissue."""


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FusionNet(nn.Module):
    """White branch at 1, 1/2, 1/4 of 256; NIR branch at 1, 1/2 of 128; fused at 64x64, decoded to 256x256.

    Narrow at full resolution (where it only has to place edges) so it trains on two CPU cores.
    """

    def __init__(self) -> None:
        super().__init__()
        self.white_full = _conv(3, 8)
        self.white_half = nn.Sequential(_conv(8, 16, stride=2), _conv(16, 16))
        self.white_quarter = nn.Sequential(_conv(16, 32, stride=2), _conv(32, 32))
        self.nir_full = _conv(1, 8)
        self.nir_half = nn.Sequential(_conv(8, 16, stride=2), _conv(16, 16))
        # Dilated convolutions see the glow around a pixel: scattering spreads it over several pixels.
        self.fuse = nn.Sequential(_conv(48, 32), _conv(32, 32, dilation=2), _conv(32, 16, dilation=4))
        self.up_half = _conv(16 + 16 + 8, 16)
        self.up_full = nn.Sequential(_conv(16 + 8, 8), nn.Conv2d(8, 1, 1))

    def forward(self, white: torch.Tensor, nir: torch.Tensor) -> torch.Tensor:
        w1 = self.white_full(white)  # 256
        w2 = self.white_half(w1)  # 128
        w4 = self.white_quarter(w2)  # 64
        n1 = self.nir_full(nir)  # 128
        n2 = self.nir_half(n1)  # 64
        x = self.fuse(torch.cat([w4, n2], dim=1))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.up_half(torch.cat([x, w2, n1], dim=1))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        out: torch.Tensor = self.up_full(torch.cat([x, w1], dim=1))
        return out


def build() -> nn.Module:
    """The untrained network (load ``weights.pt`` into it)."""
    return FusionNet()
