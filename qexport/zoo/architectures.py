"""Architectures of the shipped models: the digits U-Net family and the feature classifier.

The U-Net is a diffusers `UNet2DModel` with what real diffusion U-Nets have: ResNet blocks with a
time embedding, GroupNorm + SiLU, self-attention at 8x8 (and in the mid block), and skip
concatenations in the up path. `width` scales every channel count: the main model uses 32, its
scaled-down sibling 16 (a quarter of the parameters).
"""

from __future__ import annotations

import torch
from torch import nn

MAIN_WIDTH = 32
SCALED_DOWN_WIDTH = 16


def digits_unet_config(width: int = MAIN_WIDTH, resolution: int = 16) -> dict:
    """The `UNet2DModel` config of the digits U-Net with base channel count `width`."""
    return dict(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
    )


def digits_scheduler_config() -> dict:
    """The `DDPMScheduler` config the digits models are trained with (T=1000, linear betas)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
        variance_type="fixed_small",
    )


class DigitClassifier(nn.Module):
    """A small CNN for 16x16 digits in [-1, 1]. `features()` returns the 128-d penultimate layer
    used by the Fréchet-distance metrics; `forward()` returns logits."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(64 * 16, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
