"""Learned weight rounding (AdaRound-style): which integer, floor or ceil of `w / scale`, each weight gets.

This module owns the choice of integer weights for the bit-widths in `RoundingConfig.bits` (int4 by
default); scales stay the table's. The result goes into `QuantTable.weight_int`:

    ints = learn_weight_rounding(model, table)            # model: a LoadedModel
    table = dataclasses.replace(table, weight_int=ints)

Method, per Conv2d / Linear, in forward order (Nagel et al. 2020, "Up or Down?"):
  - calibration data: `samples` (t, x_t) pairs picked at random from every step of seeded FP32
    DDIM trajectories (`CalibrationSource`), run through the U-Net as one batch (per-sample t);
  - objective: ‖W x − W̃ x̃‖² over all calibration rows (every spatial position), where x is the
    layer's FP32 input and x̃ its input in the partly quantized model (`sequential`: preceding layers
    use their learned / table integer weights; `quant_inputs`: activations are also fake-quantized
    with the table's per-time-step parameters). It is quadratic in W̃, so it is evaluated exactly
    from accumulated second moments (H = x̃ᵀx̃ and the cross term), not by mini-batches;
  - W̃ = s · clip(⌊w/s⌋ + h(V), −qmax, qmax) with the rectified sigmoid h, V initialised so h equals
    the fractional part; Adam on objective / objective(round-to-nearest) + λ·mean(1 − |2h − 1|^β),
    β annealed 20 → 2 after a warm-up without regulariser; hard result ⌊w/s⌋ + [h ≥ 0.5];
  - a layer keeps round-to-nearest if the learned integers do not lower its objective.
The U-Net's float weights are restored on exit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..tables.schema import QuantTable
from ..zoo.guidance import inner_unet
from .sources import CalibrationSource, SourceConfig

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1      # rectified sigmoid stretch (AdaRound)


@dataclass(frozen=True, kw_only=True)
class RoundingConfig:
    bits: tuple[int, ...] = (4,)     # weight bit-widths whose rounding is learned (others keep the table's)
    samples: int = 512               # calibration (t, x_t) pairs, spread evenly over the steps
    trajectories: int = 32           # FP32 trajectories the pairs are drawn from
    steps: int = 50                  # sampling steps of those trajectories
    scheduler: str = "ddim"
    seed: int = 0
    iters: int = 500                 # Adam iterations per layer (each on the whole calibration set)
    lr: float = 0.1                  # Adam on V
    reg: float = 10.0                # λ: regulariser weight; the objective is normalised to 1 at nearest
    warmup: float = 0.2              # share of iterations without regulariser
    beta: tuple[float, float] = (20.0, 2.0)   # β annealed linearly from first to second after warm-up
    sequential: bool = True          # x̃ from the already-quantized preceding layers (else FP32 inputs)
    quant_inputs: bool = True        # x̃ also has fake-quantized activations (table's parameters), as deployed
    chunk: int = 64                  # images per chunk when accumulating second moments (memory)
    threads: int | None = 1          # torch threads during the run (None: leave as is). One by default: the
                                     # per-layer problems are small, and with 2 threads on 2 busy cores
                                     # OpenMP waits made runs ~10× slower (measured)

    def __post_init__(self):
        if not self.bits or any(b not in (4, 8) for b in self.bits):
            raise ValueError(f"bits must be a non-empty subset of (4, 8), got {self.bits}")
        if self.samples < 1 or self.iters < 1 or self.chunk < 1:
            raise ValueError("samples, iters and chunk must be positive")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.quant_inputs and not self.sequential:
            raise ValueError("quant_inputs needs sequential=True")


# -- one layer --------------------------------------------------------------------------------------

def _layer_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input rows of `mod` as [rows, groups, K] (K = in_channels/groups · kernel area), matching the
    weight reshaped to [groups, out/groups, K]."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1])
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    xp = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(xp, mod.kernel_size, dilation=mod.dilation, stride=mod.stride)  # [N, C·kh·kw, L]
    n, ck, L = cols.shape
    return cols.permute(0, 2, 1).reshape(n * L, mod.groups, ck // mod.groups)


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    return w.reshape(groups, w.shape[0] // groups, -1)


class LayerMoments:
    """Second moments of one layer's inputs that make ‖x Wᵀ − x̃ W̃ᵀ‖² exact for any W̃:
    with Δ = W̃ − W and d = x − x̃, the sum over rows is Σ Δ⊙(ΔH) − 2 Σ Δ⊙M + c, H = x̃ᵀx̃,
    M = (x̃ᵀ d Wᵀ)ᵀ, c = ‖d Wᵀ‖²."""

    def __init__(self, mod: nn.Module, weight: torch.Tensor):
        self.mod = mod
        self.groups = 1 if isinstance(mod, nn.Linear) else mod.groups
        self.w = _grouped(weight.detach().double(), self.groups)             # [g, O, K]
        g, o, k = self.w.shape
        self.H = torch.zeros(g, k, k, dtype=torch.float64)
        self.M = torch.zeros(g, o, k, dtype=torch.float64)
        self.c = 0.0
        self.rows = 0

    def add(self, x_q: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Accumulate a chunk: `x_q` the input the quantized layer sees, `x_fp` the FP32 input (None: same)."""
        rq = _layer_rows(self.mod, x_q.float()).transpose(0, 1)             # [g, R, K]
        self.H += (rq.transpose(1, 2) @ rq).double()      # float32 products per chunk, float64 sums
        self.rows += rq.shape[1]
        if x_fp is not None:
            d = _layer_rows(self.mod, x_fp.float()).transpose(0, 1) - rq     # [g, R, K]
            dw = d @ self.w.float().transpose(1, 2)                         # [g, R, O]
            self.M += (dw.transpose(1, 2) @ rq).double()
            self.c += float((dw.double() ** 2).sum())

    def objective(self, w_q: torch.Tensor) -> float:
        """Mean over rows of ‖x Wᵀ − x̃ W̃ᵀ‖² for dequantized weights `w_q` (module layout)."""
        delta = _grouped(w_q.double(), self.groups) - self.w
        return float(((delta * (delta @ self.H - 2 * self.M)).sum() + self.c) / max(self.rows, 1))


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def round_layer(weight: torch.Tensor, scale: np.ndarray, bits: int, moments: LayerMoments,
                cfg: RoundingConfig = RoundingConfig()) -> tuple[np.ndarray, dict]:
    """Learn the rounding of one layer's `weight` (module layout) for per-output-channel `scale`,
    minimizing `moments`' objective. Returns (int8 integers, info with objectives before/after)."""
    t0 = time.time()
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    s = torch.from_numpy(np.asarray(scale, np.float32)).reshape(-1, *([1] * (w.ndim - 1)))
    g = moments.groups
    floor = torch.floor(w / s)
    frac = (w / s - floor).clamp(0, 1)
    movable = _grouped((frac > 0).float(), g)      # an exact integer has floor = ceil: it stays put
    nearest = torch.clamp(torch.round(w / s), -qmax, qmax)
    obj_nearest = moments.objective(nearest * s)
    norm = max(obj_nearest, 1e-30) * moments.rows

    H = moments.H.float()
    M2 = (2 * moments.M).float()
    W = moments.w.float()
    sg = _grouped(s.expand_as(w), g)
    fg = _grouped(floor, g)
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    V = torch.log(p / (1 - p)).reshape(fg.shape).clone().requires_grad_(True)
    opt = torch.optim.Adam([V], lr=cfg.lr)
    warm = int(cfg.warmup * cfg.iters)
    b0, b1 = cfg.beta
    with torch.enable_grad():
        for it in range(cfg.iters):
            h = _rect_sigmoid(V) * movable
            wq = sg * torch.clamp(fg + h, -qmax, qmax)
            delta = wq - W
            with torch.no_grad():
                grad_rec = 2 * (delta @ H) - M2            # ∂/∂Δ of Σ Δ⊙(ΔH) − 2 Σ Δ⊙M  (H symmetric)
            loss = (delta * grad_rec).sum() / norm           # surrogate with the exact gradient, one matmul
            if it >= warm:
                beta = b0 + (b1 - b0) * (it - warm) / max(cfg.iters - warm - 1, 1)
                loss = loss + cfg.reg * (1 - (2 * h - 1).abs().pow(beta)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        hard = torch.clamp(fg + (_rect_sigmoid(V) >= 0.5).float() * movable, -qmax, qmax).reshape(w.shape)
    obj_learned = moments.objective(hard * s)
    kept = obj_learned <= obj_nearest
    ints = hard if kept else nearest
    info = dict(nearest=obj_nearest, learned=obj_learned, kept_learned=kept,
                changed=float((ints != nearest).float().mean()), seconds=round(time.time() - t0, 3))
    return ints.to(torch.int8).numpy(), info


# -- the whole U-Net --------------------------------------------------------------------------------

def calibration_batch(scheduler_config: dict, sample_shape: tuple, cfg: RoundingConfig,
                      forward) -> tuple[torch.Tensor, torch.Tensor]:
    """`cfg.samples` (x_t, t) pairs: FP32 trajectories (`forward(x, t)` → ε), about samples/steps
    random trajectories kept at each step. Returns (x [N, C, H, W], t [N] int64)."""
    src = CalibrationSource(scheduler_config, sample_shape,
                            SourceConfig(strategy="all", trajectories=cfg.trajectories, steps=cfg.steps,
                                         scheduler=cfg.scheduler, seed=cfg.seed))
    n = len(src.timesteps)
    rng = np.random.default_rng(cfg.seed + 7919)
    per_step = np.full(n, cfg.samples // n)
    per_step[rng.permutation(n)[: cfg.samples % n]] += 1
    per_step = np.minimum(per_step, cfg.trajectories)
    xs, ts = [], []
    with torch.no_grad():
        for (t, x), k in zip(src.run(lambda x, t, keep: forward(x, t)), per_step):
            pick = np.sort(rng.choice(x.shape[0], size=int(k), replace=False))
            xs.append(x[pick])
            ts.append(np.full(int(k), t, dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ts))


class _Stop(Exception):
    pass


def _per_sample_fake_quant(table: QuantTable, t: torch.Tensor):
    """A tap function fake-quantizing every site with the parameters of each sample's own time step
    (the batch mixes time steps; `simulated` assumes one t per batch)."""
    from ..eval.simulate import fake_quant

    groups = torch.from_numpy(table.group_of_t[t.numpy()].astype(np.int64))
    scale = torch.from_numpy(table.scale.astype(np.float32))[groups]        # [N, S]
    zp = torch.from_numpy(table.zero_point.astype(np.float32))[groups]
    index = {s: i for i, s in enumerate(table.sites)}
    n = t.shape[0]

    def fn(site: str, x: torch.Tensor) -> torch.Tensor:
        i = index.get(site)
        if i is None:
            return x
        rep = x.shape[0] // n          # attention operands are [batch·heads, ...], batch-major
        shape = (-1, *([1] * (x.ndim - 1)))
        sc = scale[:, i].repeat_interleave(rep).reshape(shape)
        z = zp[:, i].repeat_interleave(rep).reshape(shape)
        return fake_quant(x, sc, z, table.act_bits)

    return fn


def _chunks(x: torch.Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield x[i:i + size]


def learn_rounding(unet: nn.Module, table: QuantTable, cfg: RoundingConfig = RoundingConfig(), *,
                   scheduler_config: dict, sample_shape: tuple, progress: bool = True,
                   report: dict | None = None) -> dict[str, np.ndarray]:
    """Learned integer weights (int8 arrays, module layout) of every Conv2d / Linear of `unet` whose
    `table.weight_bits` is in `cfg.bits`; see the module docstring. `report`, if given, receives per
    module {nearest, learned: objective values, kept_learned, changed: share of weights off
    round-to-nearest, seconds} plus "_total" {seconds, samples}."""
    t_start = time.time()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mods = dict(inner_unet(unet).named_modules())
    quantized = {n: m for n, m in mods.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n in table.weight_scale}
    targets = {n: m for n, m in quantized.items() if int(table.weight_bits[n]) in cfg.bits}
    saved = {n: m.weight.data for n, m in quantized.items()}
    result: dict[str, np.ndarray] = {}
    report = report if report is not None else {}

    def dequant(name: str, ints: np.ndarray) -> torch.Tensor:
        s = table.weight_scale[name].reshape(-1, *([1] * (ints.ndim - 1)))
        return torch.from_numpy(ints.astype(np.float32) * s)

    handles: list = []
    try:
        if not targets:
            return result
        x, t = calibration_batch(scheduler_config, sample_shape, cfg, lambda x, t: unet(x, t).sample)
        fp_inputs: dict[str, torch.Tensor] = {}
        if cfg.sequential:   # FP32 inputs of every target, same rows as the learning pass
            def keep_input(mod, args, name):
                fp_inputs.setdefault(name, args[0].detach().clone())
            handles = [m.register_forward_pre_hook(partial(keep_input, name=n)) for n, m in targets.items()]
            try:
                with torch.no_grad():
                    unet(x, t)
            finally:
                for h in handles:
                    h.remove()
                handles = []
            for n, m in quantized.items():   # layers not learned run with the table's integers
                if n not in targets:
                    m.weight.data = dequant(n, table.int_weight(n, saved[n].numpy()))

        bar = tqdm(total=len(targets), desc="learn rounding", disable=not progress, leave=False)

        def learn(mod, args, name):
            if name in result:
                return
            moments = LayerMoments(mod, saved[name])
            x_fp = fp_inputs.pop(name, None)
            for i, xq in enumerate(_chunks(args[0].detach(), cfg.chunk)):
                moments.add(xq, None if x_fp is None else x_fp[i * cfg.chunk:(i + 1) * cfg.chunk])
            bits = int(table.weight_bits[name])
            ints, info = round_layer(saved[name], table.weight_scale[name], bits, moments, cfg)
            result[name] = ints
            report[name] = info
            if cfg.sequential:
                mod.weight.data = dequant(name, ints)
            bar.set_postfix_str(f"{name} {info['learned'] / max(info['nearest'], 1e-30):.2f}×")
            bar.update(1)
            if len(result) == len(targets):
                raise _Stop

        if cfg.quant_inputs:
            from ..zoo.taps import install_taps

            handles = install_taps(unet, _per_sample_fake_quant(table, t))
        handles += [m.register_forward_pre_hook(partial(learn, name=n)) for n, m in targets.items()]
        try:
            with torch.no_grad():
                unet(x, t)
        except _Stop:
            pass
        bar.close()
        missing = set(targets) - set(result)
        if missing:
            log.warning("learned rounding: %d modules were not called in forward, left to the table: %s",
                        len(missing), sorted(missing))
        report["_total"] = dict(seconds=round(time.time() - t_start, 2), samples=int(x.shape[0]))
        return result
    finally:
        if handles:
            from ..zoo.taps import remove_taps

            remove_taps(handles)
        for n, w in saved.items():
            quantized[n].weight.data = w
        torch.set_num_threads(threads)


def learn_weight_rounding(model, table: QuantTable, cfg: RoundingConfig = RoundingConfig(),
                          progress: bool = True, report: dict | None = None) -> dict[str, np.ndarray]:
    """`learn_rounding` for a `LoadedModel` (`qexport.zoo.loading`)."""
    return learn_rounding(model.denoiser(), table, cfg, scheduler_config=model.scheduler_config,
                          sample_shape=model.sample_shape, progress=progress, report=report)
