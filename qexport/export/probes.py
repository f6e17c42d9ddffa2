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
                threads: int | None = None) -> Probes:
    reference, emulated = UNetSession(fp32, threads), UNetSession(qdq, threads, emulate=True)
    sched = make_scheduler("ddim", scheduler_config)
    sched.set_timesteps(STEPS)
    x = initial_noise((BATCH, *sample_shape), SEED)
    sample, timestep, golden, out = [], [], [], []
    for i, t in enumerate(sched.timesteps[:max(PICK) + 1]):
        eps = np.array(reference(x, int(t)))
        if i in PICK:
            sample.append(x)
            timestep.append(int(t))
            golden.append(np.array(emulated(x, int(t))))
            out.append(eps)
        x = sched.step(eps, int(t), x).prev_sample
    return Probes(sample=np.stack(sample).astype(np.float32), timestep=np.array(timestep, np.int64),
                  golden=np.stack(golden).astype(np.float32), fp32=np.stack(out).astype(np.float32))
