"""Weight quantization: per-output-channel symmetric int8 / int4 with MSE-optimal clipping, encoded
so that no CPU's integer kernel can saturate.

For each output channel the clipping ratio α (grid over [0.3, 1]) minimizing ‖w − Q(w)‖² sets
`scale = α · max|w| / qmax` (qmax = 127 or 7); Q rounds to nearest and clips to [−qmax, qmax].

Saturation safety: ONNX Runtime's x86 u8s8 kernels on AVX2 and AVX-512 without VNNI (VPMADDUBSW)
add the products of two *consecutive input weights* with uint8 activations into a saturating int16.
Consecutive means along the GEMM's K axis as MLAS packs it: for a Conv `[O, I, kh, kw]` the order is
(kh, kw, I) with the input channel fastest, for a Linear `[O, I]` the input index (measured under
`qemu-x86_64 -cpu Haswell` for odd and even I, 1×1 and 3×3 kernels). With activations up to 255 a
pair of same-sign weights overflows when |a| + |b| > 128 (255·128 = 32640 ≤ 32767); opposite signs
cannot. `saturation_safe` moves each such pair onto |a| + |b| = 128 with the least squared error —
a few pairs per layer instead of a whole bit on every weight (7-bit) or slower u8u8 kernels.
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


PAIR_LIMIT = 128  # |a| + |b| of a same-sign pair: 255 · 128 = 32640 fits int16


def k_pairs(q: np.ndarray) -> np.ndarray:
    """`[O, I, *k]` → `[O, K/2, 2]`: weights in MLAS's K order (kernel taps outer, input channel
    inner), consecutive pairs; an odd K gets a zero partner, as MLAS pads it."""
    flat = np.moveaxis(q, 1, -1).reshape(q.shape[0], -1)
    if flat.shape[1] % 2:
        flat = np.concatenate([flat, np.zeros((flat.shape[0], 1), flat.dtype)], axis=1)
    return flat.reshape(flat.shape[0], -1, 2)


def unsafe_pairs(q: np.ndarray) -> np.ndarray:
    """Boolean `[O, K/2]`: pairs whose products can saturate an int16 (same sign, |a| + |b| > 128)."""
    return _unsafe(k_pairs(q.astype(np.int32)))


def _unsafe(p: np.ndarray) -> np.ndarray:
    """The unsafe-pair mask of `[O, K/2, 2]` integer-valued pairs (any numeric dtype)."""
    a, b = p[..., 0], p[..., 1]
    return (a * b > 0) & (np.abs(a) + np.abs(b) > PAIR_LIMIT)


def _safe_pairs(qp: np.ndarray, up: np.ndarray) -> int:
    """Move, in place, every unsafe pair of the integer-valued `qp` (`[O, K/2, 2]`, any numeric dtype) onto
    |a| + |b| = 128, choosing the split closest to the unrounded pair `up` (same shape; taken clipped to
    ±127). Returns the pairs moved."""
    o, j = np.nonzero(_unsafe(qp))
    if not len(o):
        return 0
    sign = np.sign(qp[o, j, 0])
    ua, ub = (np.abs(np.clip(up[o, j, i].astype(np.float64), -127, 127)) for i in (0, 1))
    ma = ua - (ua + ub - PAIR_LIMIT) / 2                   # the L2 projection onto |a| + |b| = 128
    best = None
    for ra in (np.floor(ma), np.ceil(ma)):
        ra = np.clip(ra, PAIR_LIMIT - 127, 127)
        err = (ua - ra) ** 2 + (ub - (PAIR_LIMIT - ra)) ** 2
        best = (ra, err) if best is None else (np.where(err < best[1], ra, best[0]), np.minimum(err, best[1]))
    qp[o, j, 0] = sign * best[0]
    qp[o, j, 1] = sign * (PAIR_LIMIT - best[0])
    return len(o)


def saturation_safe(q: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer weights `q` (`[O, I, *k]`, int8) with every unsafe pair moved to |a| + |b| = 128,
    choosing the split closest to the unrounded `target` (= w / scale). Returns (weights, pairs moved)."""
    qp = k_pairs(q.astype(np.int32))
    n = _safe_pairs(qp, k_pairs(target))
    if not n:
        return q, 0
    O, I, k = q.shape[0], q.shape[1], q.shape[2:]
    K = I * int(np.prod(k, dtype=np.int64))
    flat = qp.reshape(O, -1)[:, :K].reshape(O, *k, I)
    return np.moveaxis(flat, -1, 1).astype(np.int8), n


def saturation_safe_scales(w: np.ndarray, scale: np.ndarray, grid: int = 26) -> np.ndarray:
    """Per output channel, the scale in [scale, 2·scale] whose saturation-safe integers (rounded,
    then unsafe pairs moved) reconstruct `w` with the least squared error. At 2·scale every |q| ≤ 64,
    so no pair can overflow (7-bit); most channels keep a factor near 1 and move a few pairs. The
    search runs in MLAS's pair order throughout (a padded zero partner adds no error)."""
    wp = k_pairs(w.astype(np.float64))
    s = scale.reshape(-1, 1, 1).astype(np.float64)
    u, q = np.empty_like(wp), np.empty_like(wp)
    best_err, best_c = None, None
    for c in np.linspace(1.0, 2.0, grid):
        np.divide(wp, s * c, out=u)
        np.clip(np.round(u, out=q), -127, 127, out=q)      # integers held in float64 (exact)
        _safe_pairs(q, u)
        np.subtract(u, q, out=q)
        err = np.einsum("ok,ok->o", q.reshape(len(q), -1), q.reshape(len(q), -1)) * c ** 2
        if best_err is None:
            best_err, best_c = err, np.full_like(err, c)
        else:
            better = err < best_err
            best_err, best_c = np.where(better, err, best_err), np.where(better, c, best_c)
    return (scale * best_c).astype(np.float32)
