"""Activation quantization error along FP32 trajectories: for every site and step, the MSE between
the FP32 tensor and its quantize→dequantize under a table. Nothing is propagated (each site's tap
returns the FP32 tensor), so different tables (or quantizers, `fp32_trajectory`) are compared on
exactly the same tensors."""

from __future__ import annotations

import numpy as np
import torch

from qexport_runtime.sampler import initial_noise
from qexport_runtime.schedulers import make_scheduler

from ..tables.schema import QuantTable
from ..zoo.taps import install_taps, remove_taps
from .simulate import fake_quant


def fp32_trajectory(unet, scheduler_config: dict, sample_shape: tuple, observe, steps: int = 50, batch: int = 16,
                    seed: int = 1234, scheduler: str = "ddim"):
    """Run one FP32 sampling trajectory with `observe(site, x, t)` called on every site's tensor (the
    tensor itself flows on unchanged); yields each time step after its U-Net call."""
    sched = make_scheduler(scheduler, scheduler_config)
    sched.set_timesteps(steps)
    x = initial_noise((batch, *sample_shape), seed)
    state = {"t": 0}

    def tap(site, v):
        observe(site, v, state["t"])
        return v

    handles = install_taps(unet, tap)
    try:
        with torch.no_grad():
            for t in sched.timesteps:
                state["t"] = int(t)
                eps = unet(torch.from_numpy(x), torch.tensor([int(t)])).sample.numpy()
                yield int(t)
                x = sched.step(eps, int(t), x).prev_sample
    finally:
        remove_taps(handles)


def activation_quant_mse(unet, scheduler_config: dict, sample_shape: tuple, tables: dict[str, QuantTable],
                         steps: int = 50, batch: int = 16, seed: int = 1234, scheduler: str = "ddim") -> dict:
    """For each named table: `{"total", "per_step", "timesteps", "per_site"}` where each site's MSE is
    divided by the square of its global observed range (so sites weigh equally) and summed."""
    first = next(iter(tables.values()))
    for n, tab in tables.items():
        if tab.sites != first.sites:
            raise ValueError(f"table {n!r} quantizes other sites than {next(iter(tables))!r}; compare tables "
                             f"built with the same float modules")
    norm = {s: max(float(first.t_max[i].max() - first.t_min[i].min()), 1e-12) ** 2 for i, s in enumerate(first.sites)}
    index = {s: i for i, s in enumerate(first.sites)}
    names = list(tables)
    per_step = {n: [] for n in names}
    per_site = {n: dict.fromkeys(first.sites, 0.0) for n in names}
    acc = dict.fromkeys(names, 0.0)

    def observe(site, x, t):
        i = index.get(site)
        if i is not None:
            for n in names:
                scale, zp = tables[n].params_at(t)
                e = float(((x - fake_quant(x, float(scale[i]), int(zp[i]), tables[n].act_bits)) ** 2).mean()) / norm[site]
                per_site[n][site] += e
                acc[n] += e

    timesteps = []
    for t in fp32_trajectory(unet, scheduler_config, sample_shape, observe, steps, batch, seed, scheduler):
        timesteps.append(t)
        for n in names:
            per_step[n].append(acc[n])
            acc[n] = 0.0
    return {n: dict(total=float(np.sum(per_step[n])), per_step=per_step[n], timesteps=timesteps,
                    per_site=per_site[n]) for n in names}
