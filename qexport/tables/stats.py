"""`ActivationStats`: what the calibrator hands to the table builder — per-site, per-time-step
minimum, maximum and histogram of every quantized activation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ActivationStats:
    """Per-site, per-time-step statistics. Arrays are indexed `[site, t_index]` (`hist`: `[site, t_index, bin]`);
    `timesteps` is ascending."""

    sites: tuple[str, ...]
    timesteps: np.ndarray     # [n] int64, ascending
    samples: np.ndarray       # [n] images observed per time step
    numel: np.ndarray         # [S, n] values observed
    min: np.ndarray           # [S, n]
    max: np.ndarray           # [S, n]
    hist: np.ndarray          # [S, n, bins] float32 counts over [hist_lo[s], hist_hi[s]]
    hist_lo: np.ndarray       # [S]
    hist_hi: np.ndarray       # [S]
    seconds: float = 0.0

    @property
    def bins(self) -> int:
        return self.hist.shape[-1]

    def bin_centers(self, s: int) -> np.ndarray:
        edges = np.linspace(self.hist_lo[s], self.hist_hi[s], self.bins + 1)
        return 0.5 * (edges[1:] + edges[:-1])

    def site_index(self, site: str) -> int:
        return self.sites.index(site)
