"""Samples → a PNG grid, written with zlib only (no imaging library on the device side)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """[-1, 1] float `[B, C, H, W]` → uint8 `[B, H, W, C]`."""
    x = np.clip((samples + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def grid(samples: np.ndarray, cols: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile `[B, C, H, W]` samples into one uint8 image `[rows*(H+pad), cols*(W+pad), C]`."""
    imgs = to_uint8(samples)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, c = imgs.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = imgs[i]
    return out


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 `[H, W]`, `[H, W, 1]` or `[H, W, 3]` array as PNG."""
    if image.ndim == 2:
        image = image[:, :, None]
    h, w, c = image.shape
    color = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
