"""Range methods: one histogram (+ observed min/max) → the clipping range [lo, hi] of a quantizer.

  - `minmax`      the observed range;
  - `percentile`  the `percentile` / `100 − percentile` quantiles of the histogram;
  - `mse`         the observed range shrunk by the ratio α (geometric grid) that minimizes the
                  expected quantization MSE under the histogram.
Each method has one frozen, keyword-only config with its defaults defined once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("minmax", "percentile", "mse")


@dataclass(frozen=True, kw_only=True)
class RangeConfig:
    method: str = "mse"
    bits: int = 8
    percentile: float = 99.99     # percentile method: upper quantile (the lower one is 100 − p)
    mse_grid: int = 100           # mse method: candidates α, geometric in [mse_min_ratio, 1]
    mse_min_ratio: float = 0.01

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown range method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")


def affine_params(lo: np.ndarray, hi: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned affine quantizer covering [min(lo, 0), max(hi, 0)]: (scale, zero_point in [0, 2^bits − 1])."""
    qmax = 2 ** bits - 1
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    scale = np.maximum((hi - lo) / qmax, 1e-12)
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    return scale.astype(np.float32), zp.astype(np.int64)


def shared_zero_point_params(lo: np.ndarray, hi: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-group scales `[K, S]` with ONE zero point per site (`[S]`, broadcast to `[K, S]`).

    The zero point comes from the union of the groups' ranges; each group then takes the smallest
    scale whose grid [−zp·s, (qmax − zp)·s] still covers its own range. Integer kernels keep their
    fast path with a constant zero point; the price is resolution when a group's range is lopsided
    differently from the union's."""
    qmax = 2 ** bits - 1
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    _, zp = affine_params(lo.min(axis=0), hi.max(axis=0), bits)
    zp = np.broadcast_to(zp, lo.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(zp < qmax, hi / (qmax - zp), 0.0)
        down = np.where(zp > 0, -lo / zp, 0.0)
    scale = np.maximum(np.maximum(up, down), 1e-12)
    return scale.astype(np.float32), zp.astype(np.int64).copy()


def quant_mse(values: np.ndarray, counts: np.ndarray, lo, hi, bits: int = 8) -> np.ndarray:
    """Expected squared error of the affine quantizer(s) [lo, hi] (scalars or `[M]`) on a histogram."""
    lo = np.atleast_1d(np.asarray(lo, dtype=np.float64))[:, None]
    hi = np.atleast_1d(np.asarray(hi, dtype=np.float64))[:, None]
    scale, zp = affine_params(lo, hi, bits)
    scale = scale.astype(np.float64)
    q = np.clip(np.round(values[None, :] / scale) + zp, 0, 2 ** bits - 1)
    err = (values[None, :] - (q - zp) * scale) ** 2
    return (err * counts[None, :]).sum(axis=1) / max(float(counts.sum()), 1.0)


def range_from_hist(counts: np.ndarray, centers: np.ndarray, lo_obs: float, hi_obs: float,
                    cfg: RangeConfig) -> tuple[float, float]:
    """The clipping range [lo, hi] for one histogram (see module docstring)."""
    if cfg.method == "minmax" or counts.sum() == 0:
        return float(lo_obs), float(hi_obs)
    if cfg.method == "percentile":
        cdf = np.cumsum(counts) / counts.sum()
        hi = centers[min(np.searchsorted(cdf, cfg.percentile / 100.0), len(centers) - 1)]
        lo = centers[min(np.searchsorted(cdf, 1.0 - cfg.percentile / 100.0), len(centers) - 1)]
        return float(max(lo, lo_obs)), float(min(hi, hi_obs))
    alphas = np.geomspace(cfg.mse_min_ratio, 1.0, cfg.mse_grid)
    mask = counts > 0
    err = quant_mse(centers[mask], counts[mask], alphas * lo_obs, alphas * hi_obs, cfg.bits)
    a = alphas[int(np.argmin(err))]
    return float(a * lo_obs), float(a * hi_obs)
