"""Statistics → `QuantTable`: per-time-step ranges, the K-group partition, scales/zero points, weights.

Steps: (1) each calibrated time step's range by the chosen method on its own histogram; (2) the
K-group partition of the time-step axis (tables.grouping); (3) each group's range by the method on
the group's merged histogram, → uint8 scale / zero point; (4) weight scales per output channel
(saturation-safe at 8 bits: tables.weights).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from qexport_runtime.session import physical_cores

from .grouping import group_of_t, partition, segment_costs
from .ranges import RangeConfig, affine_params, range_from_hist, shared_zero_point_params
from .schema import QuantTable, is_time_branch
from .stats import ActivationStats
from .weights import saturation_safe_scales, weight_scales


@dataclass(frozen=True, kw_only=True)
class TableConfig:
    groups: int = 8
    range: RangeConfig = RangeConfig()
    weight_bits: int = 8
    weight_mse: bool | None = None   # MSE-optimal weight clipping; None: at 4 bits only (at 8 bits the
                                     # clipped outliers cost more along the sampling loop than rounding saves)
    first_last_8bit: bool = True     # keep conv_in / conv_out weights at 8 bits when weight_bits=4
    quantize_first_last: bool = False  # False: conv_in / conv_out stay float (8-bit x_t alone was 55% of the
                                       # W8A8 ε error; the two are a negligible share of the MACs)
    quantize_time_branch: bool = False  # False: the t-only branch (time MLP, every time_emb_proj) stays float:
                                        # it depends on t alone, its ranges move most with t, and it is a
                                        # handful of [1, C] products (export.passes.batch_time_projections)
    tabulate_time_embedding: bool = True  # with the time branch float: the time MLP's output is looked up by t
                                          # from a float16 [T, D] table (export.passes.tabulate_time_embedding)
    tabulate_time_projections: str = "auto"  # with it: every ResNet's time_emb_proj output too, from one int8
                                             # [T, ΣC] table, one scale per channel (same pass): "auto" where that
                                             # table is no larger than the float16 weights it replaces (T ≤ 2·D),
                                             # "always", "never"
    zero_point: str = "shared"       # "shared": one zero point per site (fast integer kernels); "per-group"
    split_concat: bool = True        # quantize each part of a skip concatenation with its own range
    saturation_safe: bool = True     # integer weights no CPU kernel can saturate (tables.weights.saturation_safe)
    matmul_outputs: str = "float"    # "float": a Linear's or an attention matmul's product is not quantized (the
                                     # integer graph runs MatMulIntegerToFloat, which adds the bias in float);
                                     # "quantized": it is (QLinearMatMul, standard ONNX; quantize_static's default)
    fixed_range_below: float = 3.0   # a Conv's input whose group ranges differ in width by at most this ratio
                                     # gets one range for every t (their union): its int32 bias is then a
                                     # constant, and ONNX Runtime runs that conv through its fused symmetric
                                     # kernel instead of im2col + GEMM + requantize (fix_conv_input_ranges).
                                     # Measured (README): the shipped model's conv inputs vary ×1.07–2.37 and
                                     # fixing them all leaves its fidelity within noise; 1 = all looked up by t

    def __post_init__(self):
        if self.groups < 1:
            raise ValueError(f"groups must be ≥ 1, got {self.groups}")
        if self.zero_point not in ("shared", "per-group"):
            raise ValueError(f"zero_point must be 'shared' or 'per-group', got {self.zero_point!r}")
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 4 or 8, got {self.weight_bits}")
        if self.matmul_outputs not in ("float", "quantized"):
            raise ValueError(f"matmul_outputs must be 'float' or 'quantized', got {self.matmul_outputs!r}")
        if not self.fixed_range_below >= 1.0:
            raise ValueError(f"fixed_range_below is a ratio of range widths, ≥ 1 (1 = off), got {self.fixed_range_below}")


def _each(fn, items) -> list:
    """`[fn(i) for i in items]` on one thread per core: the work is numpy array loops, which release
    the GIL (the cifar config's table: ×1.6 on 2 cores). Results keep their order, so the table is the same."""
    items = list(items)
    workers = min(len(items), physical_cores())
    if workers <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def per_step_ranges(stats: ActivationStats, cfg: RangeConfig) -> tuple[np.ndarray, np.ndarray]:
    def site(s):
        c = stats.bin_centers(s)
        return [range_from_hist(stats.hist[s, i], c, stats.min[s, i], stats.max[s, i], cfg)
                for i in range(stats.min.shape[1])]

    r = np.array(_each(site, range(stats.min.shape[0])), dtype=np.float64).reshape(*stats.min.shape, 2)
    return r[..., 0], r[..., 1]


def build_table(stats: ActivationStats, num_train_timesteps: int, weights: dict[str, np.ndarray],
                cfg: TableConfig, calibration: dict | None = None,
                first_last: tuple[str, ...] = ("conv_in", "conv_out")) -> QuantTable:
    """See module docstring. `weights`: module name → float weight array (output channels first)."""
    lo_t, hi_t = per_step_ranges(stats, cfg.range)
    cost = segment_costs(lo_t, hi_t, stats.samples.astype(np.float64))
    group = partition(cost, cfg.groups)
    K = int(group.max()) + 1
    S = len(stats.sites)
    members = [group == g for g in range(K)]

    def site(s):
        return [range_from_hist(stats.hist[s, m].sum(axis=0), stats.bin_centers(s), stats.min[s, m].min(),
                                stats.max[s, m].max(), cfg.range) for m in members]

    r = np.array(_each(site, range(S)), dtype=np.float64)          # [S, K, 2]
    lo, hi = r[..., 0].T.astype(np.float32), r[..., 1].T.astype(np.float32)
    if not cfg.split_concat:
        lo, hi = union_concat_parts(stats.sites, lo, hi)
    if cfg.fixed_range_below > 1.0:
        lo, hi = fix_conv_input_ranges(stats.sites, weights, lo, hi, cfg.fixed_range_below)
    if cfg.zero_point == "shared":
        scale, zp = shared_zero_point_params(lo, hi, cfg.range.bits)
    else:
        scale, zp = affine_params(lo, hi, cfg.range.bits)
    float_modules = () if cfg.quantize_first_last else tuple(first_last)
    if not cfg.quantize_time_branch:
        float_modules += tuple(sorted(m for m in weights if is_time_branch(m)))
    weights_all, weights = weights, {m: w for m, w in weights.items() if m not in float_modules}
    wbits = {m: (8 if (m in first_last and cfg.first_last_8bit) else cfg.weight_bits) for m in weights}
    wscale = {m: weight_scales(w, wbits[m], cfg.weight_mse if cfg.weight_mse is not None else wbits[m] == 4)
              for m, w in weights.items()}
    if cfg.saturation_safe:  # 4-bit pairs (|q| ≤ 7) can never overflow
        safe = _each(lambda m: saturation_safe_scales(weights[m], wscale[m]) if wbits[m] == 8 else wscale[m], wscale)
        wscale = dict(zip(wscale, safe))
    calib = dict(calibration or {})
    calib.update(table=dict(groups_requested=cfg.groups, range=asdict(cfg.range), weight_bits=cfg.weight_bits,
                            weight_mse=cfg.weight_mse, first_last_8bit=cfg.first_last_8bit,
                            quantize_first_last=cfg.quantize_first_last,
                            quantize_time_branch=cfg.quantize_time_branch,
                            tabulate_time_embedding=cfg.tabulate_time_embedding and not cfg.quantize_time_branch,
                            tabulate_time_projections=cfg.tabulate_time_projections if cfg.tabulate_time_embedding
                            and not cfg.quantize_time_branch else "never",
                            zero_point=cfg.zero_point, split_concat=cfg.split_concat,
                            saturation_safe=cfg.saturation_safe, matmul_outputs=cfg.matmul_outputs,
                            fixed_range_below=cfg.fixed_range_below))
    products = matmul_products(stats.sites, weights_all) if cfg.matmul_outputs == "float" else set()
    keep = [i for i, site in enumerate(stats.sites) if site not in products and not any(
        site == m or site.startswith(m + ".") for m in float_modules)]
    return QuantTable(sites=tuple(stats.sites[i] for i in keep),
                      group_of_t=group_of_t(stats.timesteps, group, num_train_timesteps),
                      range_lo=lo[:, keep], range_hi=hi[:, keep], scale=scale[:, keep], zero_point=zp[:, keep],
                      act_bits=cfg.range.bits, method=cfg.range.method, weight_scale=wscale, weight_bits=wbits,
                      calibration=calib, timesteps=stats.timesteps, t_min=stats.min[keep].astype(np.float32),
                      t_max=stats.max[keep].astype(np.float32), saturation_safe=cfg.saturation_safe,
                      float_modules=float_modules)


def matmul_products(sites, weights: dict[str, np.ndarray]) -> set[str]:
    """The sites that are matrix products: a Linear's `.out` (2-D weight) and an attention block's
    `qk.out` / `pv.out` (tables with `matmul_outputs="float"` leave them unquantized)."""
    return {s for s in sites if s.endswith((".qk.out", ".pv.out"))
            or (s.endswith(".out") and getattr(weights.get(s[:-len(".out")]), "ndim", 0) == 2)}


def fix_conv_input_ranges(sites, weights: dict[str, np.ndarray], lo: np.ndarray, hi: np.ndarray,
                          below: float) -> tuple[np.ndarray, np.ndarray]:
    """Give a Conv's input site (the site named as the module, 4-D weight) the union of its groups'
    ranges when their widths differ by at most `below` (max/min): one constant scale for all t."""
    lo, hi = lo.copy(), hi.copy()
    width = np.maximum(hi - lo, 1e-12)
    for i, s in enumerate(sites):
        if getattr(weights.get(s), "ndim", 0) == 4 and width[:, i].max() / width[:, i].min() <= below:
            lo[:, i], hi[:, i] = lo[:, i].min(), hi[:, i].max()
    return lo, hi


def union_concat_parts(sites, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give every `<module>.part<k>` site the union of its module's part ranges: one range for the
    whole concatenation, as a quantizer without split quantization has."""
    lo, hi = lo.copy(), hi.copy()
    modules: dict[str, list[int]] = {}
    for i, s in enumerate(sites):
        if ".part" in s:
            modules.setdefault(s.rsplit(".part", 1)[0], []).append(i)
    for idx in modules.values():
        lo[:, idx] = lo[:, idx].min(axis=1, keepdims=True)
        hi[:, idx] = hi[:, idx].max(axis=1, keepdims=True)
    return lo, hi


def range_variation(sites, timesteps: np.ndarray, t_min: np.ndarray, t_max: np.ndarray) -> list[dict]:
    """Per site: how much the observed range width (max − min) varies over the calibrated time steps
    (ratio of its largest to its smallest value), most varying first."""
    width = np.maximum(t_max - t_min, 1e-12)
    rows = []
    for i, s in enumerate(sites):
        w = width[i]
        rows.append(dict(site=s, width_min=float(w.min()), width_max=float(w.max()),
                         ratio_max_over_min=float(w.max() / w.min()),
                         t_at_max=int(timesteps[w.argmax()]), t_at_min=int(timesteps[w.argmin()])))
    return sorted(rows, key=lambda r: -r["ratio_max_over_min"])
