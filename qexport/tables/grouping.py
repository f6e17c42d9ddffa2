"""Time-step grouping: split the calibrated time steps into K contiguous groups that share one range.

Cost of a group for one site: (samples in the group) × (width of the group's range / width of the
site's global range)², i.e. the relative quantization-noise power of using one range for all its
time steps; summed over sites. Dynamic programming finds the K-partition of minimum total cost.
`group_of_t` then maps every training time step in [0, T) to the group of the nearest calibrated
time step, so time steps no calibration sample visited take the nearest calibrated group.
"""

from __future__ import annotations

import numpy as np


def segment_costs(lo: np.ndarray, hi: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """`cost[i, j]` of one group holding calibrated time steps i..j (ascending); `lo`, `hi`: `[S, n]`."""
    S, n = lo.shape
    norm = np.maximum(hi.max(axis=1) - lo.min(axis=1), 1e-12)[:, None]
    cost = np.full((n, n), np.inf)
    wsum = np.concatenate([[0.0], np.cumsum(weight)])
    for i in range(n):
        run_lo = np.minimum.accumulate(lo[:, i:], axis=1)
        run_hi = np.maximum.accumulate(hi[:, i:], axis=1)
        rel = (((run_hi - run_lo) / norm) ** 2).sum(axis=0)   # [n - i]
        cost[i, i:] = rel * (wsum[i + 1:] - wsum[i])
    return cost


def partition(cost: np.ndarray, k: int) -> np.ndarray:
    """Optimal split of n ordered items into min(k, n) contiguous groups: returns `group[n]`."""
    n = cost.shape[0]
    k = max(1, min(k, n))
    best = np.full((k + 1, n + 1), np.inf)
    arg = np.zeros((k + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for g in range(1, k + 1):
        for j in range(g, n + 1):            # first j items in g groups; last group is i..j-1
            cand = best[g - 1, g - 1:j] + cost[g - 1:j, j - 1]
            m = int(np.argmin(cand))
            best[g, j], arg[g, j] = cand[m], m + g - 1
    group = np.empty(n, dtype=np.int64)
    j = n
    for g in range(k, 0, -1):
        i = arg[g, j]
        group[i:j] = g - 1
        j = i
    return group


def group_of_t(calibrated_t: np.ndarray, group: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """`[T]` group index of every training time step: the group of the nearest calibrated step."""
    t = np.arange(num_train_timesteps)
    nearest = np.abs(t[:, None] - calibrated_t[None, :]).argmin(axis=1)
    return group[nearest].astype(np.int32)
