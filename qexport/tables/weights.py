"""Weight quantization: per-output-channel symmetric int8 / int4 with MSE-optimal clipping.

For each output channel the clipping ratio α (grid over [0.3, 1]) minimizing ‖w − Q(w)‖² sets
`scale = α · max|w| / qmax` (qmax = 127 or 7); Q rounds to nearest and clips to [−qmax, qmax].
"""

from __future__ import annotations

import numpy as np


def weight_scales(w: np.ndarray, bits: int, mse: bool = True, grid: int = 71) -> np.ndarray:
    """Per-output-channel (axis 0) scales of a float weight array."""
    if bits not in (4, 8):
        raise ValueError(f"weight bits must be 4 or 8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.maximum(np.abs(flat).max(axis=1), 1e-12)
    if not mse:
        return (amax / qmax).astype(np.float32)
    alphas = np.linspace(0.3, 1.0, grid)
    scales = alphas[:, None] * amax[None, :] / qmax                     # [A, C]
    q = np.clip(np.round(flat[None] / scales[:, :, None]), -qmax, qmax)  # [A, C, K]
    err = ((flat[None] - q * scales[:, :, None]) ** 2).sum(axis=2)       # [A, C]
    return scales[np.argmin(err, axis=0), np.arange(flat.shape[0])].astype(np.float32)


def quantize_weight(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Integer weights (int8 array; int4 values lie in [−7, 7]) for per-axis-0 `scale`."""
    qmax = 2 ** (bits - 1) - 1
    s = scale.reshape(-1, *([1] * (w.ndim - 1)))
    return np.clip(np.round(w / s), -qmax, qmax).astype(np.int8)
