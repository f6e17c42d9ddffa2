"""Pictures and summaries of calibration statistics (`qexport inspect`).

  - `range_heatmap.png`: observed range width of every site (rows) at every calibrated t (columns),
    normalized per site, so what varies over t stands out;
  - `histograms.png`: histograms at four time steps of the most time-varying and most bimodal sites;
  - `bimodality.json`: per site, the bimodality coefficient BC = (g² + 1) / (κ + 3(n−1)²/((n−2)(n−3)))
    (g skewness, κ excess kurtosis, from the histograms; Pfister et al. 2013). BC > 5/9 (the value of
    a uniform distribution) suggests two modes; very skewed unimodal shapes can also exceed it, so the
    valley test (a bin minimum between two peaks holding ≥ 5% of mass each) is reported beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..tables.stats import ActivationStats

BC_THRESHOLD = 5 / 9


def moments(values: np.ndarray, counts: np.ndarray) -> tuple[float, float, float]:
    n = counts.sum()
    mu = (values * counts).sum() / n
    d = values - mu
    var = (d ** 2 * counts).sum() / n
    if var <= 0:
        return float(mu), 0.0, 0.0
    skew = (d ** 3 * counts).sum() / n / var ** 1.5
    kurt = (d ** 4 * counts).sum() / n / var ** 2 - 3.0
    return float(mu), float(skew), float(kurt)


def bimodality_coefficient(values: np.ndarray, counts: np.ndarray) -> float:
    n = float(counts.sum())
    _, g, k = moments(values, counts)
    corr = 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)) if n > 3 else 3.0
    return float((g ** 2 + 1) / (k + corr))


def has_valley(counts: np.ndarray, bins: int = 64, mass: float = 0.05) -> bool:
    """Two peaks separated by a dip to < half the smaller peak, each side holding ≥ `mass` of the total."""
    c = counts.reshape(bins, -1).sum(axis=1) if len(counts) % bins == 0 else counts
    total = c.sum()
    cum = np.cumsum(c) / max(total, 1)
    for i in range(1, len(c) - 1):
        if mass <= cum[i] <= 1 - mass:
            left, right = c[:i].max(), c[i + 1:].max()
            if c[i] < 0.5 * min(left, right):
                return True
    return False


def bimodality(stats: ActivationStats) -> list[dict]:
    rows = []
    for s, site in enumerate(stats.sites):
        merged = stats.hist[s].sum(axis=0).astype(np.float64)
        bc = bimodality_coefficient(stats.bin_centers(s), merged)
        per_t = [bimodality_coefficient(stats.bin_centers(s), h.astype(np.float64)) for h in stats.hist[s]
                 if h.sum() > 3]
        rows.append(dict(site=site, bc_all_t=round(bc, 4), bc_max_over_t=round(max(per_t), 4) if per_t else None,
                         valley=has_valley(merged), bimodal=bool(bc > BC_THRESHOLD and has_valley(merged))))
    return sorted(rows, key=lambda r: -r["bc_all_t"])


def range_heatmap(stats: ActivationStats, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = np.maximum(stats.max - stats.min, 1e-12)
    norm = width / width.max(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(12, max(6, 0.14 * len(stats.sites))))
    im = ax.imshow(norm, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(stats.sites)))
    ax.set_yticklabels(stats.sites, fontsize=5)
    step = max(1, len(stats.timesteps) // 12)
    ax.set_xticks(range(0, len(stats.timesteps), step))
    ax.set_xticklabels(stats.timesteps[::step])
    ax.set_xlabel("training time step t (calibrated steps)")
    ax.set_title("activation range width (max − min) per site, normalized to each site's widest t")
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def histograms(stats: ActivationStats, sites: list[str], path: Path, n_t: int = 4) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = np.linspace(0, len(stats.timesteps) - 1, n_t).round().astype(int)
    fig, axes = plt.subplots(len(sites), 1, figsize=(8, 2.2 * len(sites)), squeeze=False)
    for ax, site in zip(axes[:, 0], sites):
        s = stats.site_index(site)
        c = stats.bin_centers(s)
        for i in picks:
            h = stats.hist[s, i]
            h = h.reshape(256, -1).sum(axis=1) if len(h) % 256 == 0 else h
            cc = c.reshape(256, -1).mean(axis=1) if len(c) % 256 == 0 else c
            ax.plot(cc, h / max(h.sum(), 1), label=f"t={stats.timesteps[i]}")
        ax.set_yscale("log")
        ax.set_title(site, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(stats: ActivationStats, variation: list[dict], out: Path, n_sites: int = 6) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    bim = bimodality(stats)
    range_heatmap(stats, out / "range_heatmap.png")
    chosen = [r["site"] for r in variation[: n_sites // 2]]
    chosen += [r["site"] for r in bim if r["bimodal"] and r["site"] not in chosen][: n_sites - len(chosen)]
    histograms(stats, chosen, out / "histograms.png")
    (out / "bimodality.json").write_text(json.dumps(bim, indent=2))
    (out / "range_variation.json").write_text(json.dumps(variation, indent=2))
    return dict(heatmap=str(out / "range_heatmap.png"), histograms=str(out / "histograms.png"),
                bimodal=[r["site"] for r in bim if r["bimodal"]], histogram_sites=chosen)
