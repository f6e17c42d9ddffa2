"""Streaming activation statistics per site and per time step (two passes over a CalibrationSource).

Pass 1 records min and max per (site, t); pass 2 histograms every (site, t)
over the site's global [min, max] with `bins` bins, so histograms of different time steps add up
(grouping merges them by summing). Memory is `sites × time steps × bins`, independent of the number
of samples.
"""

from __future__ import annotations

import logging
import time
import numpy as np
import torch
from tqdm import tqdm

from ..errors import QexportError
from ..tables.stats import ActivationStats
from ..zoo.taps import install_taps, remove_taps
from .sources import CalibrationSource

log = logging.getLogger(__name__)


def collect_statistics(model: torch.nn.Module, source: CalibrationSource, bins: int = 2048,
                       progress: bool = True) -> ActivationStats:
    """Run `source`'s trajectories through `model` twice (ranges, then histograms); see module docstring."""
    t_start = time.time()
    order = np.argsort(source.timesteps)            # ascending t
    t_index_of = {int(t): int(i) for i, t in zip(np.argsort(order), source.timesteps)}
    n = len(source.timesteps)
    sites: dict[str, int] = {}
    acc: dict[str, list] = {}

    def ranges_update(site, ti, x):
        if site not in sites:
            sites[site] = len(sites)
            acc[site] = [np.zeros(n), np.full(n, np.inf), np.full(n, -np.inf)]
        a = acc[site]
        lo_, hi_ = torch.aminmax(x)
        if not (torch.isfinite(lo_) and torch.isfinite(hi_)):
            raise QexportError(f"calibration met {'NaN' if torch.isnan(x).any() else 'inf'} values in {site} at time "
                               f"step t={int(source.timesteps[order][ti])}; the model's weights or inputs overflow "
                               f"there — check the checkpoint (it must sample finite images in FP32)")
        a[0][ti] += x.numel()
        a[1][ti] = min(a[1][ti], float(lo_))
        a[2][ti] = max(a[2][ti], float(hi_))

    _run_pass(model, source, ranges_update, t_index_of, "calibrate: ranges" if progress else None)
    names = tuple(sites)
    numel, mn, mx = (np.stack([acc[s][k] for s in names]) for k in range(3))
    lo = np.minimum(mn.min(axis=1), 0.0)
    hi = np.maximum(mx.max(axis=1), 0.0)
    hi = np.where(hi - lo <= 0, lo + 1e-8, hi)
    hist = np.zeros((len(names), n, bins), dtype=np.float32)
    idx = {s: i for i, s in enumerate(names)}

    def hist_update(site, ti, x):
        i = idx[site]
        h = torch.histc(x.float(), bins=bins, min=float(lo[i]), max=float(hi[i]))
        hist[i, ti] += h.numpy()

    _run_pass(model, source, hist_update, t_index_of, "calibrate: histograms" if progress else None)
    samples = np.zeros(n, dtype=np.int64)
    for t, k in zip(source.timesteps, source.counts):
        samples[t_index_of[int(t)]] += int(k)
    return ActivationStats(sites=names, timesteps=np.sort(source.timesteps), samples=samples, numel=numel,
                           min=mn, max=mx, hist=hist, hist_lo=lo, hist_hi=hi,
                           seconds=time.time() - t_start)


def _run_pass(model, source: CalibrationSource, update, t_index_of: dict, desc: str | None) -> None:
    state = {"ti": 0, "keep": 0}

    def tap(site, x):
        k = state["keep"]
        if k:
            # attention operands are [batch·heads, ...]: keep the rows of the first k images
            rows = x.shape[0] // state["batch"] * k
            update(site, state["ti"], x.detach()[:rows])
        return x

    def forward(sample: torch.Tensor, t: int, keep: int) -> torch.Tensor:
        state.update(ti=t_index_of[t], keep=keep, batch=sample.shape[0])
        with torch.no_grad():
            out = model(sample, torch.tensor([t], dtype=torch.int64)).sample
        if not torch.isfinite(out).all():
            raise QexportError(f"the FP32 model's own output is not finite (NaN/inf) at time step t={t}; the "
                               f"checkpoint is broken — qexport can only quantize a model that samples in FP32")
        return out

    handles = install_taps(model, tap)
    try:
        for _ in tqdm(source.run(forward), total=len(source), desc=desc, disable=desc is None, leave=False):
            pass
    finally:
        remove_taps(handles)
