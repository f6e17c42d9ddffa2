"""Per-time-step correction of a quantized noise prediction (PTQD-style), applied by the sampler.

The quantization error of ε splits into a part correlated with ε and a residual:
ε_int ≈ (1 + k_t)·ε_fp + b_t + r_t, with k_t a scalar, b_t one bias per channel and r_t of variance
σ²_t. The sampler replaces ε_int by ε̂ = (ε_int − b_t) / (1 + k_t); the residual left in ε̂ has
variance σ²_t / (1 + k_t)², which stochastic samplers (DDPM, DDIM with η > 0) take out of the noise
they add at that step. The fitted values live in the artifact's `correction.json` (manifest role
`correction`), one row per calibrated time step; other time steps interpolate linearly in t.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import ArtifactError

CORRECTION_FILE = "correction.json"
CORRECTION_FORMAT = "qexport-correction/1"


@dataclass(frozen=True)
class Correction:
    timesteps: np.ndarray       # [n] ascending raw time steps where it was fitted
    k: np.ndarray               # [n]
    bias: np.ndarray            # [n, C]
    residual_var: np.ndarray    # [n] variance of r_t (per element)
    enabled: bool = True        # whether the sampler applies it by default
    fit: dict = field(default_factory=dict)   # how it was fitted and what it measured

    def at(self, t: int) -> tuple[float, np.ndarray, float]:
        """(k_t, b_t [C], σ²_t) at raw time step t, interpolated linearly between fitted steps."""
        ts = self.timesteps.astype(np.float64)
        k = float(np.interp(t, ts, self.k))
        b = np.array([np.interp(t, ts, self.bias[:, c]) for c in range(self.bias.shape[1])], np.float32)
        return k, b, float(np.interp(t, ts, self.residual_var))

    def apply(self, eps: np.ndarray, t: int) -> tuple[np.ndarray, float]:
        """Corrected ε̂ `[B, C, ...]` and the variance of the residual it still carries."""
        k, b, var = self.at(t)
        shape = (1, -1) + (1,) * (eps.ndim - 2)
        return ((eps - b.reshape(shape)) / (1.0 + k)).astype(np.float32), var / (1.0 + k) ** 2

    def to_json(self) -> str:
        d = dict(format=CORRECTION_FORMAT, enabled=self.enabled, timesteps=self.timesteps.tolist(),
                 k=self.k.tolist(), bias=self.bias.tolist(), residual_var=self.residual_var.tolist(), fit=self.fit)
        return json.dumps(d, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Correction":
        d = json.loads(Path(path).read_text())
        if d.get("format") != CORRECTION_FORMAT:
            raise ValueError(f"{path}: format {d.get('format')!r} is not {CORRECTION_FORMAT!r}; re-export the artifact")
        ts = np.asarray(d["timesteps"], np.int64)
        order = np.argsort(ts)
        return cls(ts[order], np.asarray(d["k"], np.float64)[order], np.asarray(d["bias"], np.float64)[order],
                   np.asarray(d["residual_var"], np.float64)[order], bool(d.get("enabled", True)), d.get("fit", {}))


def fit_step(eps_fp: np.ndarray, eps_q: np.ndarray) -> tuple[float, np.ndarray, float]:
    """Least-squares k, per-channel b and residual variance of eps_q − eps_fp = k·eps_fp + b + r
    over one time step's samples `[N, C, ...]`."""
    f = eps_fp.astype(np.float64)
    d = eps_q.astype(np.float64) - f
    axes = tuple(i for i in range(f.ndim) if i != 1)
    fc = f - f.mean(axis=axes, keepdims=True)          # channel-centred, so b absorbs channel means
    dc = d - d.mean(axis=axes, keepdims=True)
    k = float((fc * dc).sum() / max((fc * fc).sum(), 1e-30))
    b = (d - k * f).mean(axis=axes)
    shape = (1, -1) + (1,) * (f.ndim - 2)
    r = d - k * f - b.reshape(shape)
    return k, b, float(r.var())


def load_correction(artifact) -> Correction | None:
    """The artifact's correction, or None if it declares none."""
    names = artifact.manifest.files_with_role("correction")
    if not names:
        return None
    try:
        return Correction.load(artifact.path / names[0])
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, AttributeError) as e:
        raise ArtifactError(f"{artifact.path / names[0]} is not a valid correction file ({type(e).__name__}); "
                            f"re-export the artifact") from None


__all__ = ["Correction", "CORRECTION_FILE", "fit_step", "load_correction"]
