"""Calibration sets: which (time step, x_t) pairs the FP32 model is observed on.

The FP32 model samples real trajectories with the runtime's own numpy scheduler (so calibration
sees exactly the deployment time steps), seeded; a strategy decides how many samples each step
contributes:
  - `all`      every step of every trajectory;
  - `uniform`  the same number of samples at every step (Q-Diffusion's time-step-aware set);
  - `ndtc`     time steps drawn from a normal distribution skewed toward t → 0 (PTQ4DM's
               Normally Distributed Time-step Calibration), snapped to the schedule's steps.
A `CalibrationSource` can be iterated several times and yields the same data each time (trajectories
are regenerated from the seed, so memory does not grow with the number of samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from qexport_runtime.sampler import initial_noise
from qexport_runtime.schedulers import make_scheduler

STRATEGIES = ("uniform", "ndtc", "all")


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    strategy: str = "uniform"
    samples: int = 1024          # (t, image) pairs in total (ignored by `all`)
    trajectories: int = 32       # trajectories sampled in one batch (`all` keeps all of them at every step);
                                 # only as many run as the largest number any step keeps
    scheduler: str = "ddim"
    steps: int = 50
    seed: int = 0
    ndtc_mean: float = 0.25      # NDTC: mean of t / T
    ndtc_std: float = 0.25       # NDTC: standard deviation of t / T

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.samples < 1 or self.trajectories < 1 or self.steps < 1:
            raise ValueError(f"--samples, --trajectories and --steps must be ≥ 1, got {self.samples}, "
                             f"{self.trajectories}, {self.steps}")
        if self.seed < 0:
            raise ValueError(f"--seed must be ≥ 0, got {self.seed}")


def samples_per_step(cfg: SourceConfig, timesteps: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """How many of the batch's samples each step of `timesteps` contributes (≤ cfg.trajectories)."""
    n = len(timesteps)
    if cfg.strategy == "all":
        return np.full(n, cfg.trajectories, dtype=np.int64)
    if cfg.strategy == "uniform":
        counts = np.full(n, cfg.samples // n, dtype=np.int64)
        counts[: cfg.samples % n] += 1
    else:  # ndtc: draw t ~ N(mean·T, std·T), keep draws inside [0, T), snap to the nearest step
        rng = np.random.default_rng(cfg.seed + 17)
        T = num_train_timesteps
        draws = rng.normal(cfg.ndtc_mean * T, cfg.ndtc_std * T, size=cfg.samples * 4)
        draws = draws[(draws >= 0) & (draws < T)][: cfg.samples]
        nearest = np.abs(draws[:, None] - timesteps[None, :].astype(np.float64)).argmin(axis=1)
        counts = np.bincount(nearest, minlength=n).astype(np.int64)
    return np.minimum(counts, cfg.trajectories)


class CalibrationSource:
    """`(t, x_t [b, C, H, W] float32)` pairs along FP32 trajectories; see the module docstring."""

    def __init__(self, scheduler_config: dict, sample_shape: tuple, cfg: SourceConfig):
        self.scheduler_config, self.sample_shape, self.cfg = scheduler_config, sample_shape, cfg
        sched = make_scheduler(cfg.scheduler, scheduler_config)
        sched.set_timesteps(cfg.steps)
        self.timesteps = sched.timesteps.copy()
        self.counts = samples_per_step(cfg, self.timesteps, int(scheduler_config["num_train_timesteps"]))

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def batch(self) -> int:
        """Trajectories actually run: the observer keeps the first k of the batch, so rows beyond the
        largest k would be computed and never seen (uniform, 1024 samples over 50 steps: 21 of 32)."""
        return int(min(self.cfg.trajectories, max(int(self.counts.max(initial=0)), 1)))

    def run(self, forward: Callable[..., torch.Tensor]) -> Iterator[tuple[int, np.ndarray]]:
        """Sample the trajectories, calling `forward(x_t, t, keep=k)` once per step (the observer
        records the first k samples); yields `(t, x_t[:k])`."""
        cfg = self.cfg
        sched = make_scheduler(cfg.scheduler, self.scheduler_config)
        sched.set_timesteps(cfg.steps)
        x = initial_noise((self.batch, *self.sample_shape), cfg.seed)
        rng = np.random.default_rng(cfg.seed + 1_000_003)
        for t, k in zip(sched.timesteps, self.counts):
            # the observed forward is the trajectory's own forward: keep the first k samples of the batch
            eps = forward(torch.from_numpy(x), int(t), keep=int(k)).numpy()
            yield int(t), x[:k]
            x = sched.step(eps, int(t), x, rng=rng).prev_sample
