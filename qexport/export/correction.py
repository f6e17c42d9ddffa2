"""Fit the per-time-step ε correction (runtime.correction) on the exported integer graph.

Both graphs run, through onnxruntime, on the same x_t taken from FP32 trajectories (time-step-aware
calibration data, seeded apart from the activation calibration). Per step, `fit_step` regresses the
integer graph's error on the FP32 prediction. Whether the sampler applies it by default is decided
on held-out seeds by what users see: the integer sampling loop's final images with and without the
correction against the FP32 loop's (RMS); on only if the correction lowers that error. (The per-step
held-out ε error is reported too; at 8 bits it barely moves, while the images still improve.)

The work is bounded: for a model whose trajectories and held-out loops would cost more than
`work_gop` U-Net operations, `plan_work` takes fewer steps, trajectories and seeds (down to floors),
and the held-out decision runs sequentially, stopping once its bootstrap interval is clear of the
threshold; the manifest records the seeds used, the gain and its interval (the decision's power).
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
    trajectories: int = 96      # fitted on the first 2/3, the per-step held-out ε error on the last 1/3
    scheduler: str = "ddim"
    steps: int = 50
    seed: int = 7_000
    heldout: int = 128          # at most this many held-out seeds decide the default
    min_gain: float = 0.05      # relative reduction of their RMS error needed to enable it by default
                                # (at W8 its effect is within ±10% either way: noise; at W4, 20-30%)
    work_gop: float = 10_000    # U-Net operations (GOP) the fit and the decision may spend (the cifar config:
                                # 75 s on 2 cores of an AVX2 Zen 3)
    min_trajectories: int = 8   # floors when a large model's work must shrink
    min_steps: int = 20
    min_heldout: int = 8
    chunk: int = 16             # held-out seeds per round of the sequential decision
    confidence: float = 0.95    # the decision stops early once this bootstrap interval excludes min_gain


@dataclass(frozen=True)
class CorrectionPlan:
    """How much of CorrectionConfig a model of `gop` operations per U-Net call can afford."""
    trajectories: int
    steps: int
    heldout: int
    gop: float | None

    @property
    def work_gop(self) -> float:   # fit: FP32 + int per trajectory step; decision: FP32 + 2 int loops per seed
        return (self.gop or 0.0) * self.steps * (2 * self.trajectories + 3 * self.heldout)


def plan_work(cfg: CorrectionConfig, gop: float | None) -> CorrectionPlan:
    """The full configuration if it fits `cfg.work_gop`; otherwise fewer steps (down to min_steps), then
    fewer trajectories and held-out seeds (2 : 3 of the budget, down to their floors)."""
    full = CorrectionPlan(cfg.trajectories, cfg.steps, cfg.heldout, gop)
    if gop is None or full.work_gop <= cfg.work_gop:
        return full
    steps = cfg.steps
    if CorrectionPlan(cfg.min_trajectories, steps, cfg.min_heldout, gop).work_gop > cfg.work_gop:
        steps = min(cfg.steps, cfg.min_steps)
    per = gop * steps
    traj = int(np.clip(0.4 * cfg.work_gop / (2 * per), cfg.min_trajectories, cfg.trajectories))
    held = int(np.clip(0.6 * cfg.work_gop / (3 * per), cfg.min_heldout, cfg.heldout))
    held = max(cfg.min_heldout, held // cfg.chunk * cfg.chunk) if held >= cfg.chunk else held
    return CorrectionPlan(traj, steps, held, gop)


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
                   progress: bool = True, gop: float | None = None) -> Correction:
    """Fit on FP32 trajectories and decide the default on held-out seeds; `gop` (operations per U-Net
    call, qexport.zoo.cost.unet_ops / 1e9) bounds the work by cfg.work_gop (see plan_work)."""
    plan = plan_work(cfg, gop)
    cfg = dataclasses.replace(cfg, trajectories=plan.trajectories, steps=plan.steps, heldout=plan.heldout)
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
    d = decide(int_graph, fp32_graph, scheduler_config, sample_shape, corr, cfg, threads, progress)
    fit = dict(trajectories=cfg.trajectories, scheduler=cfg.scheduler, steps=cfg.steps, seed=cfg.seed,
               heldout_eps_mse=float(np.mean(raw)), heldout_eps_mse_corrected=float(np.mean(cor)),
               heldout_seeds=d.seeds, heldout_image_rmse=d.rmse_raw, heldout_image_rmse_corrected=d.rmse_corrected,
               heldout_gain=d.gain, heldout_gain_interval=list(d.interval), confidence=cfg.confidence,
               decided_early=d.early, min_gain=cfg.min_gain, work_gop=round(plan.work_gop, 1))
    return dataclasses.replace(corr, enabled=bool(d.gain >= cfg.min_gain), fit=fit)


@dataclass(frozen=True)
class Decision:
    seeds: int
    rmse_raw: float
    rmse_corrected: float
    gain: float
    interval: tuple[float, float]   # bootstrap interval of the gain over seeds at cfg.confidence
    early: bool                     # stopped before cfg.heldout seeds because the interval excluded min_gain


def pooled_gain(sse_raw: np.ndarray, sse_cor: np.ndarray) -> float:
    return float(1.0 - np.sqrt(sse_cor.sum() / max(sse_raw.sum(), 1e-30)))


def gain_interval(sse_raw: np.ndarray, sse_cor: np.ndarray, confidence: float, resamples: int = 2000) -> tuple:
    """Percentile bootstrap over seeds (fixed seed: the same data give the same interval)."""
    idx = np.random.default_rng(0).integers(0, len(sse_raw), (resamples, len(sse_raw)))
    g = 1.0 - np.sqrt(sse_cor[idx].sum(1) / np.maximum(sse_raw[idx].sum(1), 1e-30))
    a = (1 - confidence) / 2
    return float(np.quantile(g, a)), float(np.quantile(g, 1 - a))


def decide(int_graph: Path, fp32_graph: Path, scheduler_config: dict, sample_shape, corr: Correction,
           cfg: CorrectionConfig, threads: int | None = None, progress: bool = False) -> Decision:
    """Final-image error of the integer loop vs the FP32 loop, without and with `corr`, on held-out seeds
    (disjoint from the fitting trajectories), `cfg.chunk` seeds at a time: stops once the bootstrap
    interval of the gain lies wholly above or below `cfg.min_gain` (at least `cfg.min_heldout` seeds)
    or after `cfg.heldout` seeds."""
    from tqdm import tqdm

    sessions = [UNetSession(fp32_graph, threads=threads), UNetSession(int_graph, threads=threads)]
    noise = initial_noise((cfg.heldout, *sample_shape), cfg.seed + 1)
    raw, cor = [], []
    bar = tqdm(total=cfg.heldout, desc="decide correction", disable=not progress, leave=False)
    early = False
    for lo in range(0, cfg.heldout, cfg.chunk):
        finals = []
        for k, use in ((0, False), (1, False), (1, True)):
            sched = make_scheduler(cfg.scheduler, scheduler_config)
            sched.set_timesteps(cfg.steps)
            x = noise[lo:lo + cfg.chunk].copy()
            rng = np.random.default_rng(cfg.seed + 2 + lo)
            for t in sched.timesteps:
                x = denoise_step(sched, sessions[k](x, int(t)), int(t), x, rng, corr if use else None)
            finals.append(x)
        axes = tuple(range(1, finals[0].ndim))
        raw += list(((finals[1] - finals[0]).astype(np.float64) ** 2).sum(axes))
        cor += list(((finals[2] - finals[0]).astype(np.float64) ** 2).sum(axes))
        bar.update(len(finals[0]))
        n = len(raw)
        if n >= cfg.min_heldout and n < cfg.heldout:
            lo_g, hi_g = gain_interval(np.array(raw), np.array(cor), cfg.confidence)
            if lo_g > cfg.min_gain or hi_g < cfg.min_gain:
                early = True
                break
    bar.close()
    r, c = np.array(raw), np.array(cor)
    size = len(r) * int(np.prod(sample_shape))
    return Decision(len(r), float(np.sqrt(r.sum() / size)), float(np.sqrt(c.sum() / size)), pooled_gain(r, c),
                    gain_interval(r, c, cfg.confidence), early)
