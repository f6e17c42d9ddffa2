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


# --- the text-to-image model: 32x32 digits, an 8x8x4 latent space, a small CLIP text encoder ---

T2I_RESOLUTION = 32
T2I_MAX_TOKENS = 16


def t2i_vae_config() -> dict:
    """`AutoencoderKL` config: 32x32x1 images <-> 8x8x4 latents (two 2x downsamplings)."""
    return dict(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=T2I_RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
    )


def t2i_text_config(vocab_size: int, bos: int, eos: int) -> dict:
    """`CLIPTextConfig` of the small text encoder (2 layers, width 64, 16 positions)."""
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=T2I_MAX_TOKENS, projection_dim=64,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_act="quick_gelu")


def t2i_unet_config() -> dict:
    """`UNet2DConditionModel` config: cross-attention at 8x8 and in the 4x4 mid block, SD-style."""
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8,
    )


def t2i_scheduler_config() -> dict:
    """Stable Diffusion's noise schedule (T=1000, scaled-linear betas 0.00085 ... 0.012)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
