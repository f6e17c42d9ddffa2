"""Image-set and image-pair metrics in numpy: Fréchet distance of feature sets, PSNR and SSIM.

`frechet_distance(a, b)` takes two feature sets `[N, D]` (or their `FeatureStats`) and returns
‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½), the FID formula (Heusel et al. 2017) on whatever
features the extractor gives. `psnr` and `ssim` compare images in [-1, 1] pairwise (SSIM as
Wang et al. 2004 with a 7×7 uniform window and sample covariances, the scikit-image defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureStats:
    mu: np.ndarray       # [D]
    sigma: np.ndarray    # [D, D]
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStats":
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need a [N ≥ 2, D] feature array, got shape {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), len(f))


def _stats(x) -> FeatureStats:
    return x if isinstance(x, FeatureStats) else FeatureStats.of(x)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a, b) -> float:
    """Fréchet distance between two Gaussians fitted to feature sets (arrays `[N, D]` or `FeatureStats`).

    Tr (Σ_a Σ_b)^½ is computed as Tr (Σ_a^½ Σ_b Σ_a^½)^½ (same eigenvalues, but symmetric), which
    stays exact when the covariances are singular (e.g. features that are always 0 after a ReLU)."""
    sa, sb = _stats(a), _stats(b)
    diff = sa.mu - sb.mu
    ra = _psd_sqrt(np.asarray(sa.sigma, np.float64))
    inner = ra @ np.asarray(sb.sigma, np.float64) @ ra
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    fd = diff @ diff + np.trace(sa.sigma) + np.trace(sb.sigma) - 2 * tr_covmean
    return float(max(fd, 0.0))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> np.ndarray:
    """Per-image PSNR in dB of `a` vs reference `b` (`[N, ...]`); identical images give +inf."""
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range ** 2 / mse)


def _box(x: np.ndarray, win: int) -> np.ndarray:
    """Mean over every full `win × win` window of the last two axes ('valid' positions only)."""
    c = np.cumsum(np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]), axis=-1), axis=-2)
    s = c[..., win:, win:] - c[..., :-win, win:] - c[..., win:, :-win] + c[..., :-win, :-win]
    return s / (win * win)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 2.0, win: int = 7) -> np.ndarray:
    """Per-image mean SSIM of `a` vs `b` (`[N, C, H, W]`), averaged over channels and window positions."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two [N, C, H, W] arrays of one shape, got {a.shape} and {b.shape}")
    if min(a.shape[-2:]) < win:
        raise ValueError(f"images {a.shape[-2:]} are smaller than the {win}×{win} SSIM window")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    norm = win * win / (win * win - 1)   # sample covariance
    ma, mb = _box(a, win), _box(b, win)
    va = norm * (_box(a * a, win) - ma * ma)
    vb = norm * (_box(b * b, win) - mb * mb)
    cov = norm * (_box(a * b, win) - ma * mb)
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return s.reshape(len(a), -1).mean(axis=1)
