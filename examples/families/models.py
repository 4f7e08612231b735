"""One small model per family, for export and serving tests.

Each ``build_<family>()`` returns a real architecture (MONAI's where it has
one) at a tiny width, initialised from a fixed seed: random but the same
every time. They are untrained; only ``examples/ultrasound_unet`` is trained.
Inputs are 64x64 unless noted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks import nets
from torch import nn

SEED = 0


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return make().eval()


# --- CNN segmentation (MONAI): 1 channel in, 2 classes out (softmax) --------------------


def build_unet() -> nn.Module:
    return _seeded(
        lambda: nets.UNet(
            spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1
        )
    )


def build_attention_unet() -> nn.Module:
    return _seeded(
        lambda: nets.AttentionUnet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2))
    )


def build_segresnet() -> nn.Module:
    return _seeded(
        lambda: nets.SegResNet(
            spatial_dims=2, in_channels=1, out_channels=2, init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1)
        )
    )


# --- Classification (3 views) -----------------------------------------------------------


def build_resnet_classifier() -> nn.Module:
    """MONAI ResNet (basic blocks, one per stage) -> (B, 3) logits."""
    return _seeded(
        lambda: nets.ResNet(
            block="basic",
            layers=(1, 1, 1, 1),
            block_inplanes=(8, 16, 32, 64),
            spatial_dims=2,
            n_input_channels=1,
            num_classes=3,
        )
    )


class ViTClassifier(nn.Module):
    """MONAI ViT returning only the class logits (it also returns every block's tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = nets.ViT(
            in_channels=1,
            img_size=(64, 64),
            patch_size=(16, 16),
            hidden_size=48,
            mlp_dim=96,
            num_layers=2,
            num_heads=4,
            classification=True,
            num_classes=3,
            spatial_dims=2,
            post_activation=None,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.vit(image)[0]
        return logits


def build_vit_classifier() -> nn.Module:
    return _seeded(ViTClassifier)


# --- Transformer segmentation -----------------------------------------------------------


def build_unetr() -> nn.Module:
    """MONAI UNETR (ViT encoder, 12 thin blocks, CNN decoder) -> (B, 2, 64, 64)."""
    return _seeded(
        lambda: nets.UNETR(
            in_channels=1,
            out_channels=2,
            img_size=(64, 64),
            feature_size=8,
            hidden_size=48,
            mlp_dim=96,
            num_heads=4,
            spatial_dims=2,
        )
    )


# --- Single-stage detection -------------------------------------------------------------


class TinyDetector(nn.Module):
    """Anchor-free, FCOS-style: each cell of a stride-8 grid predicts class logits and its
    distances to the box's four sides. Boxes are decoded in the graph, as x_min, y_min,
    x_max, y_max in input pixels; score filtering and NMS are the runtime's.
    Returns boxes (B, N, 4) and class logits (B, N, classes)."""

    def __init__(self, classes: int = 2, width: int = 16, stride: int = 8) -> None:
        super().__init__()
        self.stride = stride
        self.backbone = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classes = nn.Conv2d(2 * width, classes, 1)
        self.distances = nn.Conv2d(2 * width, 4, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(image)
        height, width = features.shape[2], features.shape[3]
        ys = (torch.arange(height, dtype=image.dtype) + 0.5) * self.stride
        xs = (torch.arange(width, dtype=image.dtype) + 0.5) * self.stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        # Distances in units of the stride, kept positive and bounded.
        left, top, right, bottom = (torch.exp(self.distances(features).clamp(max=3.0)) * self.stride).unbind(1)
        boxes = torch.stack([cx - left, cy - top, cx + right, cy + bottom], dim=-1).flatten(1, 2)
        logits = self.classes(features).flatten(2).transpose(1, 2)
        return boxes, logits


def build_detector() -> nn.Module:
    return _seeded(TinyDetector)


# --- Recurrent tracker ------------------------------------------------------------------


class ConvGRUTracker(nn.Module):
    """A convolutional GRU over a stride-4 encoding: it keeps the target between frames.
    Inputs: image (B, 1, 64, 64), hidden (B, 8, 16, 16). Returns the target's mask logits
    (B, 1, 64, 64) and the next hidden state."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, hidden, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)
        )
        self.gates = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1)
        self.candidate = nn.Conv2d(2 * hidden, hidden, 3, padding=1)
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=4.0, mode="bilinear", align_corners=False), nn.Conv2d(hidden, 1, 3, padding=1)
        )

    def forward(self, image: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = torch.relu(self.encoder(image))
        update, reset = torch.sigmoid(self.gates(torch.cat([encoded, hidden], dim=1))).chunk(2, dim=1)
        proposal = torch.tanh(self.candidate(torch.cat([encoded, reset * hidden], dim=1)))
        new_hidden = (1.0 - update) * hidden + update * proposal
        return self.decoder(new_hidden), new_hidden


def build_tracker() -> nn.Module:
    return _seeded(ConvGRUTracker)


# --- Autoencoder (anomaly) --------------------------------------------------------------


def build_autoencoder() -> nn.Module:
    """MONAI AutoEncoder: reconstructs its (B, 1, 64, 64) input; export appends the error map."""
    return _seeded(
        lambda: nets.AutoEncoder(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16, 32), strides=(2, 2, 2))
    )


# --- Image-to-image ---------------------------------------------------------------------


class SuperResolution(nn.Module):
    """ESPCN (Shi et al. 2016): features at low resolution, then a sub-pixel shuffle.
    (B, 1, 64, 64) in [0, 1] -> (B, 1, 128, 128) in [0, 1]."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2),
            nn.Tanh(),
            nn.Conv2d(16, 8, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, factor * factor, 3, padding=1),
            nn.PixelShuffle(factor),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(image))


def build_super_resolution() -> nn.Module:
    return _seeded(SuperResolution)


# --- Registration / motion --------------------------------------------------------------


class MotionNet(nn.Module):
    """MONAI LocalNet on the two frames side by side -> displacement (B, 2, 64, 64) in pixels.
    Inputs: the current frame (moving), then the previous one (fixed)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nets.LocalNet(
            spatial_dims=2,
            in_channels=2,
            num_channel_initial=8,
            extract_levels=(0, 1, 2),
            out_channels=2,
            out_activation=None,
        )

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        field: torch.Tensor = self.net(torch.cat([moving, fixed], dim=1))
        return field


def build_registration() -> nn.Module:
    return _seeded(MotionNet)


# --- Real models with other shapes of input and output ----------------------------------


def build_var_autoencoder() -> nn.Module:
    """MONAI VarAutoEncoder: returns (reconstruction, mu, logvar, z); export keeps the reconstruction
    (``--output 0``) and appends the error map (task ``anomaly``)."""
    return _seeded(
        lambda: nets.VarAutoEncoder(
            spatial_dims=2, in_shape=(1, 64, 64), out_channels=1, latent_size=8, channels=(8, 16, 32), strides=(2, 2, 2)
        )
    )


def build_swin_unetr() -> nn.Module:
    """MONAI SwinUNETR, 2D, a thin Swin encoder (one block per stage) -> (B, 2, 64, 64)."""
    return _seeded(
        lambda: nets.SwinUNETR(
            in_channels=1,
            out_channels=2,
            feature_size=12,
            spatial_dims=2,
            depths=(1, 1, 1, 1),
            num_heads=(3, 3, 3, 3),
            window_size=4,
        )
    )


FEATURE_CHANNELS = 5


def build_multichannel_unet() -> nn.Module:
    """MONAI UNet on a 5-channel input (co-registered MR channels, or image plus feature maps)
    -> (B, 2, 64, 64)."""
    return _seeded(
        lambda: nets.UNet(
            spatial_dims=2,
            in_channels=FEATURE_CHANNELS,
            out_channels=2,
            channels=(8, 16, 32),
            strides=(2, 2),
            num_res_units=1,
        )
    )


# --- The gate's tolerance: a correct FP32 graph with large logits, and a defective one ----------


class _LogitScale(nn.Module):
    """A fixed scale on the logits: an untrained network's are near 0, a trained one's reach tens."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale  # type: ignore[no-any-return]


def build_dynunet_deep_supervision() -> nn.Module:
    """MONAI's DynUNet as it is usually trained: deep supervision with two heads (at export, in eval
    mode, it answers with its main head), its logits at a trained network's scale (tens). FP32
    rounding alone moves them by more than 1e-3: a correct graph an absolute limit alone refuses."""
    return _seeded(
        lambda: _LogitScale(
            nets.DynUNet(
                spatial_dims=2,
                in_channels=1,
                out_channels=2,
                kernel_size=[3, 3, 3, 3],
                strides=[1, 2, 2, 2],
                upsample_kernel_size=[2, 2, 2],
                filters=[8, 16, 32, 64],
                deep_supervision=True,
                deep_supr_num=2,
            ),
            200.0,
        )
    )


class _ShiftedWhenExported(nn.Module):
    """A wrongly exported op in miniature: the graph's outputs are 1 % larger than PyTorch's."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out * 1.01 if torch.onnx.is_in_onnx_export() else out


def build_defective_unet() -> nn.Module:
    return _ShiftedWhenExported(build_unet()).eval()


# --- Fusion: a 3-channel frame (64x64) and a 1-channel frame of another source (32x32) ---------


class TwoSourceNet(nn.Module):
    """Segmentation logits from an RGB frame and a gray frame of another source at half its size."""

    def __init__(self) -> None:
        super().__init__()
        self.rgb = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, frame: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(self.other(other), scale_factor=2.0, mode="bilinear", align_corners=False)
        logits: torch.Tensor = self.head(torch.cat([torch.relu(self.rgb(frame)), torch.relu(up)], dim=1))
        return logits


def build_two_source() -> nn.Module:
    return _seeded(TwoSourceNet)


# --- Image with a 1-D signal window (ultrasound gated by ECG) ---------------------------------------


class ImageAndSignalNet(nn.Module):
    """Scores of two classes from a gray frame and a window of one ECG lead (1 x samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.signal = nn.Conv1d(1, 4, 9, stride=4, padding=4)
        self.head = nn.Linear(8, 2)

    def forward(self, frame: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        seen = torch.relu(self.image(frame)).mean(dim=(2, 3))
        heard = torch.tanh(self.signal(signal)).mean(dim=2)
        logits: torch.Tensor = self.head(torch.cat([seen, heard], dim=1))
        return logits


def build_image_and_signal() -> nn.Module:
    return _seeded(ImageAndSignalNet)
