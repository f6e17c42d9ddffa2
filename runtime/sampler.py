"""The integer sampling loop: artifact graph + numpy scheduler → images.

`Sampler(artifact, role=None, scheduler="ddim", threads=None)`, then
`sample(num_steps, batch, seed)` returns `SampleResult(images [B, C, H, W] float32 in [-1, 1],
timesteps, seconds per step)`. The initial noise is numpy's `default_rng(seed)`, so a seed gives the
same x_T on every device; any step count works (the graph takes the raw training time step).
`correction`: None applies the artifact's fitted ε correction (runtime.correction) to quantized
graphs when the artifact enables it; True requires it; False turns it off. `check` runs the
artifact's golden probes once through a quantized graph (runtime.probes) and warns when this CPU's
integer kernels deviate; `strict` refuses instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .artifact import Artifact, ArtifactError
from .correction import load_correction
from .probes import self_check
from .schedulers import make_scheduler
from .session import UNetSession


@dataclass
class SampleResult:
    images: np.ndarray
    timesteps: np.ndarray
    step_seconds: list
    loop_seconds: float

    @property
    def python_overhead(self) -> float:
        """Share of the loop spent outside onnxruntime calls (scheduler math, bookkeeping)."""
        return max(0.0, 1.0 - sum(self.step_seconds) / self.loop_seconds) if self.loop_seconds else 0.0


def initial_noise(shape: tuple, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def absorb(sched, residual_var: float) -> dict:
    """Step keyword that lets a stochastic scheduler absorb the residual ε variance into its noise."""
    stochastic = getattr(sched.config, "eta", 1.0) > 0 and "model_output_variance" in sched.step.__code__.co_varnames
    return dict(model_output_variance=residual_var) if stochastic else {}


def denoise_step(sched, eps: np.ndarray, t: int, x: np.ndarray, rng: np.random.Generator,
                 correction=None) -> np.ndarray:
    """x_t → x_{t-1} from the graph's ε, through the artifact's ε correction when one is given."""
    if correction is None:
        return sched.step(eps, t, x, rng=rng).prev_sample
    eps, residual_var = correction.apply(eps, t)
    return sched.step(eps, t, x, rng=rng, **absorb(sched, residual_var)).prev_sample


class Sampler:
    def __init__(self, artifact: Artifact, role: str | None = None, scheduler: str = "ddim",
                 threads: int | None = None, correction: bool | None = None, check: bool = True,
                 strict: bool = False, trusted: bool = False, **scheduler_overrides):
        self.artifact = artifact
        self.graph_path = artifact.graph(role)
        quantized = artifact.manifest.files[self.graph_path.name].role != "fp32"
        fitted = load_correction(artifact) if quantized else None
        if correction and fitted is None:
            raise ArtifactError(f"artifact {artifact.path} has no ε correction for graph {self.graph_path.name}; "
                                f"convert with --correction or sample without it")
        self.correction = fitted if (correction or (correction is None and fitted is not None and fitted.enabled)) \
            else None
        try:  # the scheduler config comes from the (untrusted) manifest
            make_scheduler(scheduler, artifact.manifest.scheduler, **scheduler_overrides)
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise ArtifactError(f"artifact {artifact.path}: its scheduler config does not make a {scheduler} "
                                f"scheduler ({type(e).__name__}: {str(e)[:120]}); re-export the artifact") from None
        self.session = UNetSession(self.graph_path, threads=threads, trusted=trusted,
                                   num_train_timesteps=artifact.manifest.num_train_timesteps)
        self.check = self_check(artifact, self.session, strict) if (check or strict) and quantized else None
        self.scheduler_name = scheduler
        self.scheduler_overrides = scheduler_overrides

    def sample(self, num_steps: int = 50, batch: int = 1, seed: int = 0, return_trajectory: bool = False,
               context: np.ndarray | None = None, guidance: float = 1.0) -> SampleResult:
        """`context` ([2·batch, L, D] = [uncond; cond] text embeddings) samples a text-conditioned U-Net
        with classifier-free guidance: one graph call per step on the CFG batch `[x; x]`, then
        ε = ε_u + guidance·(ε_c − ε_u)."""
        m = self.artifact.manifest
        if not 1 <= num_steps <= m.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {m.num_train_timesteps}] (the model's training time steps), "
                             f"got {num_steps}")
        if batch < 1 or seed < 0:
            raise ValueError(f"batch must be ≥ 1 and seed ≥ 0, got batch {batch}, seed {seed}")
        sched = make_scheduler(self.scheduler_name, m.scheduler, **self.scheduler_overrides)
        sched.set_timesteps(num_steps)
        x = initial_noise((batch, *m.sample_shape), seed)
        rng = np.random.default_rng(seed + 1_000_003)  # step noise for stochastic samplers
        step_s, traj = [], []
        t_loop = time.perf_counter()
        if context is not None and context.shape[0] != 2 * batch:
            raise ValueError(f"context has {context.shape[0]} rows; classifier-free guidance needs 2·batch = "
                             f"{2 * batch} ([uncond; cond])")
        for t in sched.timesteps:
            t0 = time.perf_counter()
            if context is None:
                eps = self.session(x, int(t))
            else:
                eps2 = self.session(np.concatenate([x, x]), int(t), context)
                eps = eps2[:batch] + np.float32(guidance) * (eps2[batch:] - eps2[:batch])
            step_s.append(time.perf_counter() - t0)
            x = denoise_step(sched, eps, int(t), x, rng, self.correction)
            if return_trajectory:
                traj.append(x.copy())
        loop = time.perf_counter() - t_loop
        res = SampleResult(x, sched.timesteps.copy(), step_s, loop)
        if return_trajectory:
            res.trajectory = np.stack(traj)
        return res

