"""How a text-conditioned U-Net's quantization should treat the CFG halves and cross-attention, measured.

Along the same classifier-free-guided FP32 trajectories (the calibration prompts, the model's
guidance), `cfg_half_statistics` records activation statistics of the unconditional and of the
conditional half separately. From them:
  - `range_difference`: per site, how far the two halves' ranges differ (ratio of range widths,
    median and extreme over the time steps) — what `qexport inspect` prints for a text model;
  - `guided_error`: the guided ε error of simulated-quantization variants against FP32, on FP32
    guided trajectories of the evaluation prompts (every step's x_t is the FP32 one, so variants are
    compared on identical inputs): one table for both halves (what `convert` builds), one table per
    half, cross-attention K/V operands kept float, softmax probabilities at 16 bits;
  - `cfg_call_speed`: one CFG-batch call (B = 2n) vs two calls (n each) of an artifact's U-Net graph,
    interleaved.
`study(model, ...)` runs all of it and returns one JSON-ready dict.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from qexport_runtime.sampler import initial_noise
from qexport_runtime.schedulers import make_scheduler

from ..calibrate.api import CalibrationConfig, first_last_layers, unet_weights
from ..calibrate.observers import collect_statistics
from ..calibrate.sources import CalibrationSource
from ..tables.build import build_table
from ..tables.schema import QuantTable
from ..tables.stats import ActivationStats
from .simulate import fake_quant, simulated

HALVES = ("uncond", "cond")


def cfg_half_statistics(model, cfg: CalibrationConfig, progress: bool = False) -> dict[str, ActivationStats]:
    """`{"both", "uncond", "cond"}` statistics along the same guided calibration trajectories."""
    source = CalibrationSource(model.scheduler_config, model.sample_shape, cfg.source)
    den = model.denoiser()
    out = {"both": collect_statistics(den, source, bins=cfg.bins, progress=progress)}
    for h, name in enumerate(HALVES):
        out[name] = collect_statistics(den, source, bins=cfg.bins, progress=progress, half=h)
    return out


def tables_from(model, stats: dict[str, ActivationStats], cfg: CalibrationConfig) -> dict[str, QuantTable]:
    weights, first_last = unet_weights(model.unet), first_last_layers(model.unet)
    return {k: build_table(s, model.num_train_timesteps, weights, cfg.table, {"half": k}, first_last=first_last)
            for k, s in stats.items()}


def range_difference(uncond: ActivationStats, cond: ActivationStats, top: int = 12) -> list[dict]:
    """Per site: cond/uncond range-width ratio over the time steps (median, max of |log|), largest first."""
    idx = {s: i for i, s in enumerate(cond.sites)}
    rows = []
    for i, s in enumerate(uncond.sites):
        j = idx.get(s)
        if j is None:
            continue
        wu = np.maximum(uncond.max[i] - uncond.min[i], 1e-12)
        wc = np.maximum(cond.max[j] - cond.min[j], 1e-12)
        r = wc / wu
        k = int(np.abs(np.log(r)).argmax())
        rows.append(dict(site=s, ratio_median=float(np.median(r)), ratio_extreme=float(r[k]),
                         t_at_extreme=int(uncond.timesteps[k])))
    rows.sort(key=lambda r: -abs(np.log(r["ratio_extreme"])))
    return rows[:top] if top else rows


def _per_half(tables: dict[str, QuantTable]):
    """Quantizer for every site: the uncond rows with the uncond table, the cond rows with the cond one."""
    tu, tc = tables["uncond"], tables["cond"]

    def make(i):
        def q(x, t):
            su, zu = tu.params_at(t)
            sc, zc = tc.params_at(t)
            h = x.reshape(2, -1, *x.shape[1:])
            return torch.cat([fake_quant(h[0], float(su[i]), int(zu[i]), tu.act_bits),
                              fake_quant(h[1], float(sc[i]), int(zc[i]), tc.act_bits)]).reshape(x.shape)
        return q
    return {s: make(i) for i, s in enumerate(tu.sites)}


def _float_sites(table: QuantTable, pattern) -> dict:
    return {s: (lambda x, t: x) for s in table.sites if pattern(s)}


def _bits16(table: QuantTable, pattern) -> dict:
    def make(i):
        def q(x, t):
            s8, z8 = table.params_at(t)
            lo, hi = (0 - int(z8[i])) * float(s8[i]), (255 - int(z8[i])) * float(s8[i])
            s = (hi - lo) / 65535
            return fake_quant(x, s, int(round(-lo / s)), 16)
        return q
    return {s: make(i) for i, s in enumerate(table.sites) if pattern(s)}


def cross_kv(site: str) -> bool:
    """Cross-attention sites that depend on the prompt only: the K/V projections' inputs and outputs
    and the K, V operands of the attention products."""
    return ".attn2." in site and any(k in site for k in (".to_k", ".to_v", ".qk.b", ".pv.b"))


def variants(tables: dict[str, QuantTable]) -> dict[str, tuple[QuantTable, dict]]:
    joint = tables["both"]
    return {
        "one table for both CFG halves (default)": (joint, {}),
        "one table per CFG half": (joint, _per_half(tables)),
        "cross-attention K/V float": (joint, _float_sites(joint, cross_kv)),
        "softmax probabilities 16-bit": (joint, _bits16(joint, lambda s: s.endswith(".pv.a"))),
        "all attention operands float": (joint, _float_sites(joint, lambda s: ".qk." in s or ".pv." in s)),
    }


def guided_error(model, named: dict[str, tuple[QuantTable, dict]], prompts: list[str], steps: int = 25,
                 seed: int = 4321, guidance: float | None = None) -> dict:
    """Per variant: relative RMS of the guided ε against FP32 at each step of FP32 guided trajectories."""
    den = model.denoiser(prompts, guidance)
    sched = make_scheduler("ddim", model.scheduler_config)
    sched.set_timesteps(steps)
    x = initial_noise((len(prompts), *model.sample_shape), seed)
    err = {k: [] for k in named}
    ts = []
    with torch.no_grad():
        for t in sched.timesteps:
            xt, tt = torch.from_numpy(x), torch.tensor([int(t)])
            eps = den(xt, tt).sample
            for k, (table, quantizers) in named.items():
                with simulated(den, table, quantizers=quantizers):
                    e = den(xt, tt).sample
                err[k].append(float((e - eps).pow(2).mean().sqrt() / eps.pow(2).mean().sqrt()))
            ts.append(int(t))
            x = sched.step(eps.numpy(), int(t), x).prev_sample
    return dict(timesteps=ts, per_step=err, mean={k: float(np.mean(v)) for k, v in err.items()})


def cfg_call_speed(graph_path, sample_shape, context_shape, n: int = 1, repeats: int = 30,
                   threads: int | None = None) -> dict:
    """ms per guided step: one call on the CFG batch [2n] vs two calls of n, interleaved."""
    from qexport_runtime.session import UNetSession

    one, two = UNetSession(graph_path, threads), UNetSession(graph_path, threads)
    rng = np.random.default_rng(0)
    x2 = rng.standard_normal((2 * n, *sample_shape)).astype(np.float32)
    c2 = rng.standard_normal((2 * n, *context_shape)).astype(np.float32)
    a, b = [], []
    for r in range(repeats + 3):
        t0 = time.perf_counter()
        one(x2, 500, c2)
        t1 = time.perf_counter()
        two(x2[:n], 500, c2[:n])
        two(x2[n:], 500, c2[n:])
        t2 = time.perf_counter()
        if r >= 3:
            a.append(t1 - t0)
            b.append(t2 - t1)
    return dict(batch=n, one_call_ms=1e3 * float(np.median(a)), two_calls_ms=1e3 * float(np.median(b)),
                two_over_one=float(np.median(b) / np.median(a)))


def study(model, cfg: CalibrationConfig = CalibrationConfig(), steps: int = 25, graph_path=None,
          threads: int | None = None, progress: bool = False) -> dict:
    from ..zoo.prompts import eval_prompts

    t0 = time.time()
    stats = cfg_half_statistics(model, cfg, progress)
    tables = tables_from(model, stats, cfg)
    prompts = [p for p in eval_prompts() for _ in range(2)]
    out = dict(calibration=dataclasses.asdict(cfg), guidance=model.text.guidance, steps=steps,
               prompts=len(prompts), range_difference=range_difference(stats["uncond"], stats["cond"]),
               guided_error=guided_error(model, variants(tables), prompts, steps))
    if graph_path is not None:
        out["cfg_call_speed"] = [cfg_call_speed(graph_path, model.sample_shape, model.context_shape, n, threads=threads)
                                 for n in (1, 4)]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def format_study(r: dict) -> str:
    lines = ["cond/uncond range width ratio (CFG halves, same guided trajectories), most different sites:",
             f"  {'site':<70} {'median':>7} {'extreme':>8} {'at t':>5}"]
    lines += [f"  {d['site']:<70} {d['ratio_median']:>7.2f} {d['ratio_extreme']:>8.2f} {d['t_at_extreme']:>5}"
              for d in r["range_difference"]]
    lines += ["", f"guided ε error vs FP32 (relative RMS, mean over DDIM-{r['steps']} steps, {r['prompts']} prompts):"]
    base = r["guided_error"]["mean"]["one table for both CFG halves (default)"]
    lines += [f"  {k:<42} {v:.4f}  ({100 * (v / base - 1):+.1f}%)" for k, v in r["guided_error"]["mean"].items()]
    for s in r.get("cfg_call_speed", []):
        lines.append(f"  CFG batch {2 * s['batch']}: one call {s['one_call_ms']:.2f} ms, two calls of {s['batch']} "
                     f"{s['two_calls_ms']:.2f} ms (×{s['two_over_one']:.2f})")
    return "\n".join(lines)
