"""Bimodal activations: which quantized tensors have two modes at some time steps, and whether
quantizers shaped for two modes beat the uniform one, in activation error and in image fidelity.

Every scheme is a codebook of 2^bits reconstruction levels per (site, time-step group) inside the
uniform table's own clipping range, so only where the levels sit changes:
  - `uniform`: the table's affine uint8 grid (what the integer graph runs);
  - `two-range`: sign/magnitude, half the levels on [lo, 0] and half on [0, hi] (deployable: the
    consumer of x is linear, so it runs as two integer GEMMs on x⁺ and x⁻, each with its own scale);
  - `valley-split`: the same with the split at the histogram's valley between the two modes;
  - `equal-mass`: the levels at equal-probability quantiles, i.e. the tensor reshaped to a uniform
    distribution by its CDF before a uniform quantizer (the "reshape, then quantize" idea);
  - `optimal-compander`: levels with density ∝ p(x)^(1/3), the MSE-optimal reshaping for fine
    quantization (Panter–Dite / Bennett): the most any reshaping transform can buy.
The two reshaping schemes are non-linear, so no integer GEMM can consume their codes directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..calibrate.report import BC_THRESHOLD, bimodality_coefficient, has_valley
from ..tables.schema import QuantTable
from ..tables.stats import ActivationStats

SCHEMES = ("uniform", "two-range", "valley-split", "equal-mass", "optimal-compander")
BIMODAL_SHARE = 0.1   # a site is bimodal when it is at ≥ 10% of the calibrated time steps (or over all t)


def bimodal_steps(stats: ActivationStats, s: int) -> np.ndarray:
    """Per calibrated time step: whether site `s`'s histogram has two modes (BC > 5/9 and a valley)."""
    centers = stats.bin_centers(s)
    return np.array([h.sum() > 3 and bimodality_coefficient(centers, h.astype(np.float64)) > BC_THRESHOLD
                     and has_valley(h) for h in stats.hist[s]])


def find_bimodal(stats: ActivationStats, table: QuantTable) -> list[dict]:
    """The table's quantized sites that are bimodal at ≥ BIMODAL_SHARE of the calibrated steps or over
    all steps merged, with the share and the time steps where they are."""
    rows = []
    for s, site in enumerate(stats.sites):
        if site not in table.sites:
            continue
        per_t = bimodal_steps(stats, s)
        merged = stats.hist[s].sum(axis=0).astype(np.float64)
        whole = bool(bimodality_coefficient(stats.bin_centers(s), merged) > BC_THRESHOLD and has_valley(merged))
        if whole or per_t.mean() >= BIMODAL_SHARE:
            rows.append(dict(site=site, share_of_steps=float(per_t.mean()), bimodal_over_all_t=whole,
                             timesteps=stats.timesteps[per_t].tolist()))
    return sorted(rows, key=lambda r: -r["share_of_steps"])


def _valley(centers: np.ndarray, h: np.ndarray, bins: int = 64) -> float:
    """Location of the deepest dip between the two largest peaks of a coarse histogram."""
    c = h.reshape(bins, -1).sum(axis=1) if len(h) % bins == 0 else h
    x = centers.reshape(len(c), -1).mean(axis=1)
    peaks = [i for i in range(len(c)) if c[i] > 0 and (i == 0 or c[i] >= c[i - 1]) and (i == len(c) - 1 or c[i] >= c[i + 1])]
    if len(peaks) < 2:
        return 0.0
    a, b = sorted(sorted(peaks, key=lambda i: -c[i])[:2])
    return float(x[a + int(np.argmin(c[a:b + 1]))])


def _split(lo: float, hi: float, at: float, n: int) -> np.ndarray:
    if not lo < at < hi:
        return np.linspace(lo, hi, n)
    return np.concatenate([np.linspace(lo, at, n // 2), np.linspace(at, hi, n // 2 + 1)[1:]])


def _quantiles(centers: np.ndarray, density: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    inside = (centers >= lo) & (centers <= hi) & (density > 0)
    if inside.sum() < 2:
        return np.linspace(lo, hi, n)
    x, d = centers[inside], density[inside]
    cdf = np.cumsum(d) / d.sum()
    return np.interp((np.arange(n) + 0.5) / n, cdf, x)


def codebook(scheme: str, centers: np.ndarray, hist: np.ndarray, scale: float, zero_point: int,
             bits: int = 8) -> np.ndarray:
    """The sorted reconstruction levels of `scheme` for one site and group (see the module docstring)."""
    n = 2 ** bits
    grid = (np.arange(n) - zero_point) * scale
    lo, hi = float(grid[0]), float(grid[-1])
    if scheme == "uniform":
        return grid
    if scheme == "two-range":
        return _split(lo, hi, 0.0, n)
    if scheme == "valley-split":
        return _split(lo, hi, _valley(centers, hist), n)
    if scheme == "equal-mass":
        return _quantiles(centers, hist, lo, hi, n)
    if scheme == "optimal-compander":
        return _quantiles(centers, np.cbrt(hist), lo, hi, n)
    raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


@dataclass
class Codebooks:
    """Levels per site and time-step group ([K, L] each) and the quantizer they make."""
    levels: dict[str, np.ndarray]
    group_of_t: np.ndarray

    @classmethod
    def build(cls, scheme: str, sites: list[str], stats: ActivationStats, table: QuantTable) -> "Codebooks":
        group_of_calibrated = table.group_of_t[stats.timesteps]
        levels = {}
        for site in sites:
            s, i = stats.site_index(site), table.site_index(site)
            rows = []
            for g in range(table.groups):
                h = stats.hist[s][group_of_calibrated == g].sum(axis=0).astype(np.float64)
                rows.append(codebook(scheme, stats.bin_centers(s), h, float(table.scale[g, i]),
                                     int(table.zero_point[g, i]), table.act_bits))
            levels[site] = np.stack(rows).astype(np.float32)
        return cls(levels, table.group_of_t)

    def quantizer(self, site: str):
        lv = torch.from_numpy(self.levels[site])
        mids = (lv[:, 1:] + lv[:, :-1]) / 2

        def q(x: torch.Tensor, t: int) -> torch.Tensor:
            g = int(self.group_of_t[t])
            return lv[g][torch.searchsorted(mids[g], x.contiguous())]

        return q

    def quantizers(self) -> dict:
        return {site: self.quantizer(site) for site in self.levels}


def activation_error(unet, scheduler_config: dict, sample_shape: tuple, books: dict[str, Codebooks],
                     steps: int = 50, batch: int = 16, seed: int = 1234) -> dict:
    """Per scheme and site: MSE of the quantized tensor against the FP32 one along FP32 DDIM
    trajectories, relative to the uniform scheme's (nothing is propagated: all schemes see the same
    tensors)."""
    from .activation_error import fp32_trajectory

    qs = {name: b.quantizers() for name, b in books.items()}
    err = {name: {site: 0.0 for site in b.levels} for name, b in books.items()}

    def observe(site, x, t):
        for name, per_site in qs.items():
            if site in per_site:
                err[name][site] += float(((per_site[site](x, t) - x) ** 2).mean())

    for _ in fp32_trajectory(unet, scheduler_config, sample_shape, observe, steps, batch, seed):
        pass
    base = err.get("uniform")
    return {name: {site: (e / base[site] if base and base[site] > 0 else e) for site, e in per.items()}
            for name, per in err.items()}


def simulated_images(unet, table: QuantTable, scheduler_config: dict, samples: int, steps: int,
                     seed: int = 0, batch: int = 128, quantizers: dict | None = None,
                     quantized: bool = True) -> np.ndarray:
    """DDIM samples (η = 0) of the FP32 model (`quantized=False`) or of its W/A simulation under
    `table`, with `quantizers` replacing the uniform one at their sites; batch i uses seed `seed + i`
    like the runtime's sampler, so sets from different schemes pair up image by image."""
    from contextlib import nullcontext

    from ..zoo.model_card import sample_torch
    from .simulate import simulated

    ctx = simulated(unet, table, quantizers=quantizers) if quantized else nullcontext()
    with ctx:
        return np.concatenate([sample_torch(unet, scheduler_config, min(batch, samples - start), steps, seed + i)
                               for i, start in enumerate(range(0, samples, batch))])


@dataclass(frozen=True, kw_only=True)
class BimodalConfig:
    samples: int = 256
    steps: int = 50
    seed: int = 0
    calibration: object = None   # CalibrationConfig; its table is forced to quantize every site


def study(model_id: str, cfg: BimodalConfig, extractor, progress: bool = False) -> dict:
    """Find the bimodal sites of MODEL_ID's W8A8 simulation with every site quantized (first/last
    layer and time branch included: the defaults keep some bimodal tensors in float), then measure
    each scheme's activation error there and the image fidelity of the whole simulated model with
    that scheme at the bimodal sites (and with them left in float, the most a scheme could gain)."""
    import dataclasses

    from ..calibrate.api import CalibrationConfig, calibrate
    from ..zoo.loading import load_model
    from .fidelity import PSNR_CAP_DB, bootstrap_fd_std
    from .metrics import frechet_distance, psnr

    model = load_model(model_id)
    cal = cfg.calibration or CalibrationConfig()
    cal = dataclasses.replace(cal, table=dataclasses.replace(cal.table, quantize_first_last=True,
                                                             quantize_time_branch=True))
    table, stats = calibrate(model, cal, progress=progress)
    found = find_bimodal(stats, table)
    sites = [r["site"] for r in found]
    result = dict(model_id=model_id, bimodal_sites=found, samples=cfg.samples, steps=cfg.steps, schemes={})
    if not sites:
        return result
    books = {name: Codebooks.build(name, sites, stats, table) for name in SCHEMES}
    rel = activation_error(model.unet, model.scheduler_config, model.sample_shape, books, steps=cfg.steps)
    run = dict(unet=model.unet, table=table, scheduler_config=model.scheduler_config,
               samples=cfg.samples, steps=cfg.steps, seed=cfg.seed)
    ref = simulated_images(**run, quantized=False)
    f_ref, l_ref = extractor.features(ref), extractor.labels(ref)
    floats = {site: (lambda x, t: x) for site in sites}
    for name, quantizers in [*((n, b.quantizers()) for n, b in books.items()), ("bimodal sites float", floats)]:
        images = simulated_images(**run, quantizers=quantizers)
        feats = extractor.features(images)
        result["schemes"][name] = dict(
            activation_mse_vs_uniform={s: round(v, 4) for s, v in rel[name].items()} if name in rel else None,
            fd_to_fp32=frechet_distance(feats, f_ref), fd_to_fp32_bootstrap_std=bootstrap_fd_std(feats, f_ref),
            label_agreement=None if l_ref is None else float((extractor.labels(images) == l_ref).mean()),
            psnr_db=float(np.minimum(psnr(images, ref), PSNR_CAP_DB).mean()))
    return result
