"""How quantization error accumulates along the sampling loop, per step, for one or more artifacts.

Two curves per artifact, over the sampler's time steps:
  - `trajectory_rmse[i]`: RMS of x_t(quantized loop) − x_t(FP32 loop) after step i, both loops from
    the same x_T (the error the loop has accumulated so far);
  - `eps_rmse[i]`: RMS of ε_quantized(x_t) − ε_FP32(x_t) on the FP32 trajectory's x_t (the error one
    step adds on its own, with the artifact's ε correction applied when it is on).
`plot_curves` draws them side by side (log scale) for a comparison such as static K=1 vs per-step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qexport_runtime.artifact import load_artifact
from qexport_runtime.sampler import Sampler, initial_noise


def error_curves(artifact_path, *, role: str | None = None, samples: int = 64, steps: int = 50,
                 scheduler: str = "ddim", seed: int = 0, correction: bool | None = None,
                 threads: int | None = None) -> dict:
    art = load_artifact(artifact_path)
    fp = Sampler(art, role="fp32", scheduler=scheduler, threads=threads, correction=False)
    q = Sampler(art, role=role, scheduler=scheduler, threads=threads, correction=correction)
    ref = fp.sample(steps, batch=samples, seed=seed, return_trajectory=True)
    res = q.sample(steps, batch=samples, seed=seed, return_trajectory=True)
    traj = np.sqrt(((res.trajectory - ref.trajectory) ** 2).reshape(len(ref.timesteps), -1).mean(axis=1))
    # single-step error on the FP32 trajectory: inputs are x_T, then the FP32 loop's x_t
    inputs = np.concatenate([initial_noise((1, samples, *art.manifest.sample_shape), seed), ref.trajectory[:-1]])
    eps = []
    for t, x in zip(ref.timesteps, inputs):
        e_fp = fp.session(x, int(t)).copy()
        e_q = q.session(x, int(t)).copy()
        if q.correction is not None:
            e_q, _ = q.correction.apply(e_q, int(t))
        eps.append(float(np.sqrt(((e_q - e_fp) ** 2).mean())))
    return dict(artifact=str(art.path), graph=q.graph_path.name, groups=art.manifest.groups,
                correction_applied=q.correction is not None, timesteps=ref.timesteps.tolist(),
                trajectory_rmse=traj.tolist(), eps_rmse=eps, final_rmse=float(traj[-1]), samples=samples,
                steps=steps, scheduler=scheduler, seed=seed)


def plot_curves(curves: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """One PNG: accumulated trajectory error (left) and single-step ε error (right) per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, c in curves.items():
        t = np.asarray(c["timesteps"])
        a.plot(np.arange(len(t)), c["trajectory_rmse"], label=label)
        b.plot(t, c["eps_rmse"], label=label)
    a.set(xlabel="sampling step (x_T → x_0)", ylabel="RMS of x_t(quantized) − x_t(FP32)", yscale="log",
          title="error accumulated along the loop")
    b.set(xlabel="time step t", ylabel="RMS of ε(quantized) − ε(FP32), same x_t", yscale="log",
          title="error added by one step")
    b.invert_xaxis()
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
