"""The registry of shipped models: names, roles, folders, and their sizes read without torch.

Shipped models live under `qexport/zoo/shipped/<name>/` and are installed as package data.
Parameter counts come from the safetensors headers (plain JSON), so `qexport models` is instant
and needs no torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "shipped"
MAIN_MODEL = "digits16-ddpm"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class ShippedModel:
    name: str
    role: str  # "main" | "scaled-down" | "distilled" | "classifier" | "text-to-image"
    description: str

    @property
    def path(self) -> Path:
        return SHIPPED_DIR / self.name

    def weight_files(self) -> list[Path]:
        return sorted(self.path.rglob("*.safetensors"))

    def params(self) -> int:
        return sum(_safetensors_numel(f) for f in self.weight_files())

    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files())

    def resolution(self) -> int:
        """Image side in pixels (for a latent model: the VAE's image size, not the latent's)."""
        cfg = self.path / "vae" / "config.json"
        if not cfg.exists():
            cfg = self.path / "unet" / "config.json"
        if not cfg.exists():
            cfg = self.path / "config.json"
        c = json.loads(cfg.read_text())
        return int(c.get("sample_size", c.get("resolution", 0)))

    def is_present(self) -> bool:
        return bool(self.weight_files())


SHIPPED: tuple[ShippedModel, ...] = (
    ShippedModel(MAIN_MODEL, "main", "DDPM U-Net (1.1M params) on 16x16 MNIST digits, T=1000"),
    ShippedModel("digits16-ddpm-small", "scaled-down", "the main DDPM at half the channel width, same recipe"),
    ShippedModel("digits16-ddpm-distilled", "distilled",
                 "the half-width U-Net trained to match the main DDPM's noise predictions (distilled student)"),
    ShippedModel("digits16-classifier", "classifier", "digit CNN; its 128-d features feed the Fréchet distances"),
    ShippedModel("digits32-t2i", "text-to-image",
                 "latent text-to-image pipeline (SD layout: CLIP BPE tokenizer, CLIPTextModel, UNet2DConditionModel "
                 "with cross-attention, AutoencoderKL) drawing 32x32 digits from prompts"),
)


def get_shipped(name: str) -> ShippedModel | None:
    return next((m for m in SHIPPED if m.name == name), None)


def _safetensors_numel(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        numel = 1
        for d in info["shape"]:
            numel *= d
        total += numel
    return total
