"""Fit the per-time-step ε correction (runtime.correction) on the exported integer graph.

Both graphs run, through onnxruntime, on the same x_t taken from FP32 trajectories (time-step-aware
calibration data, seeded apart from the activation calibration). Per step, `fit_step` regresses the
integer graph's error on the FP32 prediction. Whether the sampler applies it by default is decided
on held-out seeds by what users see: the integer sampling loop's final images with and without the
correction against the FP32 loop's (RMS); on only if the correction lowers that error. (The per-step
held-out ε error is reported too; at 8 bits it barely moves, while the images still improve.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qexport_runtime.correction import Correction, fit_step
from qexport_runtime.sampler import denoise_step, initial_noise
from qexport_runtime.schedulers import make_scheduler
from qexport_runtime.session import UNetSession


@dataclass(frozen=True, kw_only=True)
class CorrectionConfig:
    trajectories: int = 96      # fitted on the first 2/3, the default decided on the last 1/3
    scheduler: str = "ddim"
    steps: int = 50
    seed: int = 7_000
    heldout: int = 128          # held-out seeds whose final images decide the default
    min_gain: float = 0.05      # relative reduction of their RMS error needed to enable it by default
                                # (at W8 its effect is within ±10% either way: noise; at W4, 20-30%)


def paired_predictions(int_graph: Path, fp32_graph: Path, scheduler_config: dict, sample_shape,
                       cfg: CorrectionConfig, threads: int | None = None, progress: bool = True):
    """Yield `(t, eps_fp32, eps_int)` along FP32 trajectories (both graphs see the FP32 x_t)."""
    from tqdm import tqdm

    q, f = UNetSession(int_graph, threads=threads), UNetSession(fp32_graph, threads=threads)
    sched = make_scheduler(cfg.scheduler, scheduler_config)
    sched.set_timesteps(cfg.steps)
    x = initial_noise((cfg.trajectories, *sample_shape), cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1_000_003)
    for t in tqdm(sched.timesteps, desc="fit correction", disable=not progress, leave=False):
        eps = f(x, int(t)).copy()
        yield int(t), eps, q(x, int(t)).copy()
        x = sched.step(eps, int(t), x, rng=rng).prev_sample


def fit_correction(int_graph: Path, fp32_graph: Path, scheduler_config: dict, sample_shape,
                   cfg: CorrectionConfig = CorrectionConfig(), threads: int | None = None,
                   progress: bool = True) -> Correction:
    n_fit = max(2, cfg.trajectories * 2 // 3)
    ts, ks, bs, vs, raw, cor = [], [], [], [], [], []
    for t, ef, eq in paired_predictions(int_graph, fp32_graph, scheduler_config, sample_shape, cfg, threads,
                                        progress):
        k, b, _ = fit_step(ef[:n_fit], eq[:n_fit])
        shape = (1, -1) + (1,) * (ef.ndim - 2)
        held_f, held_q = ef[n_fit:], eq[n_fit:]
        raw.append(float(((held_q - held_f) ** 2).mean()))
        cor.append(float((((held_q - b.reshape(shape)) / (1 + k) - held_f) ** 2).mean()))
        k, b, v = fit_step(ef, eq)   # the stored fit uses every trajectory
        ts.append(t), ks.append(k), bs.append(b), vs.append(v)
    order = np.argsort(ts)
    corr = Correction(np.asarray(ts)[order], np.asarray(ks)[order], np.asarray(bs)[order], np.asarray(vs)[order])
    img_raw, img_cor = final_image_error(int_graph, fp32_graph, scheduler_config, sample_shape, corr, cfg, threads)
    gain = 1.0 - img_cor / max(img_raw, 1e-30)
    fit = dict(trajectories=cfg.trajectories, scheduler=cfg.scheduler, steps=cfg.steps, seed=cfg.seed,
               heldout_eps_mse=float(np.mean(raw)), heldout_eps_mse_corrected=float(np.mean(cor)),
               heldout_seeds=cfg.heldout, heldout_image_rmse=img_raw, heldout_image_rmse_corrected=img_cor,
               heldout_gain=gain, min_gain=cfg.min_gain)
    return dataclasses.replace(corr, enabled=bool(gain >= cfg.min_gain), fit=fit)


def final_image_error(int_graph: Path, fp32_graph: Path, scheduler_config: dict, sample_shape,
                      corr: Correction, cfg: CorrectionConfig, threads: int | None = None) -> tuple[float, float]:
    """RMS of the integer loop's final images vs the FP32 loop's, without and with `corr`, on
    `cfg.heldout` seeds disjoint from the fitting trajectories."""
    sessions = [UNetSession(fp32_graph, threads=threads), UNetSession(int_graph, threads=threads)]
    finals = []
    for k, use in ((0, False), (1, False), (1, True)):
        sched = make_scheduler(cfg.scheduler, scheduler_config)
        sched.set_timesteps(cfg.steps)
        x = initial_noise((cfg.heldout, *sample_shape), cfg.seed + 1)
        rng = np.random.default_rng(cfg.seed + 2)
        for t in sched.timesteps:
            x = denoise_step(sched, sessions[k](x, int(t)), int(t), x, rng, corr if use else None)
        finals.append(x)
    rms = [float(np.sqrt(((f - finals[0]) ** 2).mean())) for f in finals[1:]]
    return rms[0], rms[1]
