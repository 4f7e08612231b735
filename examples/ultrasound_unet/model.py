"""A small U-Net that segments lesions in B-mode ultrasound frames.

The example model of edgescope: trained on simulated frames
(``edgescope.runtime.sources.synthetic``), exported to a bundle, and served by
the runtime. Input ``(N, 1, 256, 256)`` float32 in [0, 1]; output
``(N, 1, 256, 256)`` logits, where the runtime applies a sigmoid and
``THRESHOLD``.

Only Conv, BatchNorm, ReLU, MaxPool and ConvTranspose are used and nothing
depends on the data, so the graph exports to ONNX (and from there to
TensorRT) as is.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

INPUT_SIZE = 256
"""Side of the square model input, in pixels."""
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SCALE = 1.0 / 255.0
"""uint8 gray level -> [0, 1]."""
THRESHOLD = 0.5
"""Probability above which a pixel is lesion."""
BASE_WIDTH = 8
"""Channels at full resolution; each level down doubles them."""
LEVELS = 4
"""Resolutions, the full one included (three poolings)."""


def preprocess(gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """A uint8 ``(H, W)`` frame -> the model's ``(1, 256, 256)`` float32 input."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W) image, got {gray.dtype} {gray.shape}")
    # INTER_AREA averages when shrinking: no aliasing of the speckle.
    small = cv2.resize(gray, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
    return (small.astype(np.float32) * np.float32(SCALE))[None]


def postprocess(logits: npt.NDArray[np.float32], height: int, width: int) -> npt.NDArray[np.uint8]:
    """``(256, 256)`` logits -> uint8 0/1 lesion mask at the frame's size.

    Logits are resized bilinearly and cut at the logit of ``THRESHOLD``, which
    is the same as thresholding the sigmoid's probability.
    """
    if logits.shape != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"expected ({INPUT_SIZE}, {INPUT_SIZE}) logits, got {logits.shape}")
    full = cv2.resize(logits.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    cut = float(np.log(THRESHOLD / (1.0 - THRESHOLD)))
    return (full > cut).astype(np.uint8)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``levels`` resolutions, ``base`` channels at the top."""

    def __init__(self, base: int = BASE_WIDTH, levels: int = LEVELS) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        c_in = 1
        for width in widths:
            self.down.append(_block(c_in, width))
            c_in = width
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.merge.append(_block(width * 2, width))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        out: torch.Tensor = self.head(x)
        return out


def build() -> nn.Module:
    """A fresh, untrained example model."""
    return UNet()
