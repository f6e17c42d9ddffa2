"""Classifier-free guidance around a text-conditioned U-Net, callable like an unconditional one.

`GuidedUNet(unet, cond, uncond, guidance)(sample, t).sample` runs the CFG batch — the unconditional
and the conditional half, `[x; x]` with `[uncond; cond]` text embeddings — through the U-Net and
returns ε_u + g·(ε_c − ε_u). Image i of a batch gets prompt `i % P` of the `P` prompt embeddings, so
any batch size works. Calibration, simulation and the activation-error studies call a U-Net as
`unet(x, t)`: given a `GuidedUNet` they run guided trajectories with no change, and they observe
both CFG halves. Structure functions (taps, weights, first/last layers) act on `.unet`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GuidedOutput:
    sample: torch.Tensor


class GuidedUNet(nn.Module):
    cfg_halves = 2

    def __init__(self, unet: nn.Module, cond: torch.Tensor, uncond: torch.Tensor, guidance: float):
        super().__init__()
        self.unet = unet
        self.register_buffer("cond", cond, persistent=False)      # [P, L, D]
        self.register_buffer("uncond", uncond, persistent=False)  # [1, L, D]
        self.guidance = float(guidance)

    @property
    def config(self):
        return self.unet.config

    def contexts(self, n: int) -> torch.Tensor:
        """`[2n, L, D]`: n unconditional rows, then the n images' prompt rows."""
        idx = torch.arange(n) % self.cond.shape[0]
        return torch.cat([self.uncond.expand(n, -1, -1), self.cond[idx]])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> GuidedOutput:
        n = sample.shape[0]
        timestep = timestep.repeat(2) if timestep.numel() > 1 else timestep   # per-image time steps
        eps = self.unet(torch.cat([sample, sample]), timestep, encoder_hidden_states=self.contexts(n)).sample
        eps_u, eps_c = eps[:n], eps[n:]
        return GuidedOutput(eps_u + self.guidance * (eps_c - eps_u))


def inner_unet(model: nn.Module) -> nn.Module:
    """The U-Net whose modules carry the sites (the model itself unless it is a `GuidedUNet`)."""
    return model.unet if isinstance(model, GuidedUNet) else model


def cfg_halves(model: nn.Module) -> int:
    """How many copies of the outer batch the U-Net sees per call (2 under CFG, else 1)."""
    return GuidedUNet.cfg_halves if isinstance(model, GuidedUNet) else 1


def dummy_context(unet: nn.Module, batch: int = 1, length: int = 1) -> dict:
    """`encoder_hidden_states` for a dry forward of a cross-attention U-Net, `{}` for others."""
    dim = getattr(unet.config, "cross_attention_dim", None)
    if dim is None:
        return {}
    dim = dim if isinstance(dim, int) else dim[0]
    return dict(encoder_hidden_states=torch.zeros(batch, length, dim))
