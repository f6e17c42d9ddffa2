"""The text side of a Stable-Diffusion-style pipeline folder: tokenizer, CLIP text encoder, VAE.

`load_text_parts(folder)` reads `tokenizer/` (CLIP BPE `vocab.json` + `merges.txt`),
`text_encoder/` (transformers `CLIPTextModel`) and `vae/` (diffusers `AutoencoderKL`), safetensors
only unless pickle is allowed, with a one-line error naming any missing part. `encode(parts, prompts)`
gives the U-Net's `encoder_hidden_states` (the encoder's last hidden state, as Stable Diffusion).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import QexportError

PARTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
DEFAULT_GUIDANCE = 4.0


@dataclass
class TextParts:
    tokenizer: Any          # transformers.CLIPTokenizer
    tokenizer_dir: Path
    text_encoder: Any       # transformers.CLIPTextModel (eval, float32)
    vae: Any                # diffusers.AutoencoderKL (eval, float32)
    max_length: int
    guidance: float = DEFAULT_GUIDANCE

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def is_text_pipeline(folder: Path) -> bool:
    """A pipeline folder whose U-Net is text-conditioned (model_index.json names a text encoder)."""
    index = folder / "model_index.json"
    if not index.exists():
        return False
    try:
        return "text_encoder" in json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QexportError(f"{index} is not valid JSON; it must be a diffusers model_index.json") from None


def _weights(part_dir: Path, safe: str, pickle: str, allow_pickle: bool) -> bool:
    if (part_dir / safe).exists():
        return True
    if (part_dir / pickle).exists():
        if not allow_pickle:
            raise QexportError(f"{part_dir} has only pickle weights ({pickle}), which can run code when loaded; "
                               f"convert them to safetensors or pass --allow-pickle if you trust them")
        return False
    raise QexportError(f"no weights in {part_dir}; expected {safe}")


def load_text_parts(folder: Path, allow_pickle: bool = False) -> TextParts:
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise QexportError(f"text-to-image pipeline folder {folder} lacks {', '.join(p + '/' for p in missing)}; "
                           f"a Stable Diffusion pipeline folder needs {', '.join(p + '/' for p in PARTS)}")
    tok_dir = folder / "tokenizer"
    for f in ("vocab.json", "merges.txt"):
        if not (tok_dir / f).exists():
            raise QexportError(f"{tok_dir} has no {f}; qexport needs a CLIP BPE tokenizer (vocab.json + merges.txt)")
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()      # its per-tensor loading bar and notes are not the user's concern
    hf_logging.disable_progress_bar()

    te_safe = _weights(folder / "text_encoder", "model.safetensors", "pytorch_model.bin", allow_pickle)
    vae_safe = _weights(folder / "vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                        allow_pickle)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        text = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), use_safetensors=te_safe)
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), use_safetensors=vae_safe, low_cpu_mem_usage=False)
    except (ValueError, RuntimeError, OSError, TypeError, KeyError) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise QexportError(f"cannot load the text encoder / tokenizer / VAE of {folder} ({reason}); copy the "
                           f"whole pipeline folder again") from None
    max_length = min(int(tokenizer.model_max_length), int(text.config.max_position_embeddings))
    guidance = DEFAULT_GUIDANCE
    card = folder / "qexport.json"   # optional: defaults the model's authors recommend
    if card.exists():
        guidance = float(json.loads(card.read_text()).get("guidance", guidance))
    return TextParts(tokenizer, tok_dir, text.float().eval().requires_grad_(False),
                     vae.float().eval().requires_grad_(False), max_length, guidance)


def tokenize(parts: TextParts, prompts: list[str]) -> torch.Tensor:
    return parts.tokenizer(prompts, padding="max_length", max_length=parts.max_length, truncation=True,
                           return_tensors="pt").input_ids


def encode(parts: TextParts, prompts: list[str]) -> torch.Tensor:
    """`[P, L, D]` text embeddings (the encoder's last hidden state)."""
    with torch.no_grad():
        return parts.text_encoder(tokenize(parts, prompts)).last_hidden_state
