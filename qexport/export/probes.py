"""Golden probes for the load-time self-check: `(sample, t)` pairs from the FP32 graph's own DDIM
trajectories, with the float-emulated QDQ graph's and the FP32 graph's outputs (runtime.probes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qexport_runtime.probes import Probes
from qexport_runtime.sampler import initial_noise
from qexport_runtime.schedulers import make_scheduler
from qexport_runtime.session import UNetSession

STEPS = 20
PICK = (0, 5, 10, 15, 18)   # of DDIM-20: t = 950, 700, 450, 200, 50 for T = 1000
BATCH, SEED = 2, 424242


def make_probes(qdq: Path, fp32: Path, scheduler_config: dict, sample_shape: tuple,
                threads: int | None = None, guided: tuple[np.ndarray, float] | None = None) -> Probes:
    """`guided=(context [2·BATCH, L, D] = [uncond; cond], guidance)` for a text-conditioned U-Net: the
    trajectories are CFG-guided and each probe is the CFG batch `[x; x]` the sampler feeds."""
    reference, emulated = UNetSession(fp32, threads), UNetSession(qdq, threads, emulate=True)
    sched = make_scheduler("ddim", scheduler_config)
    sched.set_timesteps(STEPS)
    x = initial_noise((BATCH, *sample_shape), SEED)
    context, guidance = guided if guided is not None else (None, 1.0)
    sample, timestep, golden, out = [], [], [], []
    for i, t in enumerate(sched.timesteps[:max(PICK) + 1]):
        xin = x if context is None else np.concatenate([x, x])
        eps = np.array(reference(xin, int(t), context))
        if i in PICK:
            sample.append(xin)
            timestep.append(int(t))
            golden.append(np.array(emulated(xin, int(t), context)))
            out.append(eps)
        if context is not None:
            eps = eps[:BATCH] + guidance * (eps[BATCH:] - eps[:BATCH])
        x = sched.step(eps, int(t), x).prev_sample
    return Probes(sample=np.stack(sample).astype(np.float32), timestep=np.array(timestep, np.int64),
                  golden=np.stack(golden).astype(np.float32), fp32=np.stack(out).astype(np.float32),
                  context=None if context is None else np.stack([context] * len(sample)).astype(np.float32))
