"""Quantize or scale down: hardware efficiency (RQ1) and quality (RQ2) of the FP32 and integer
variants of a big U-Net, its scaled-down sibling and a distilled student, measured in one run.

Every variant is a graph of an artifact written by `convert` (FP32 graphs from the W8 artifacts):
its step latency at each batch is measured with all variants interleaved step by step in one
sampling loop (`runtime.bench.bench_graphs`), its peak RSS in a fresh process, its multiply-
accumulates counted from the graph (and checked against the torch model's count), its achieved
operations per second against the machine's own int8 or FP32 GEMM peak. Quality is judged as
`qexport eval` does, against the big FP32 model's images from the same seeds (FD to FP32, label
agreement, PSNR / SSIM), plus the FD to the real data, which also compares models that were never
meant to draw the same digit from the same noise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str
    model: str   # "big" | "small" | "distilled"
    bits: int    # 32 (the FP32 graph) | 8 | 4 (weights; activations are 8-bit)

    @property
    def role(self) -> str:
        return "fp32" if self.bits == 32 else "int"

    @property
    def artifact_bits(self) -> int:   # FP32 graphs are taken from the W8 artifact
        return 8 if self.bits == 32 else self.bits


VARIANTS = (
    Variant("fp32-big", "big", 32), Variant("fp32-small", "small", 32), Variant("fp32-distilled", "distilled", 32),
    Variant("w8a8-big", "big", 8), Variant("w4a8-big", "big", 4), Variant("w8a8-small", "small", 8),
    Variant("w8a8-distilled", "distilled", 8),
)
BASELINE = "fp32-big"


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """What `compare` measures. `steps` is the sampling step count of the quality sets and of the
    benchmark loop (per-image latency = that loop / batch); `quality=False` measures efficiency
    only (for random-weight models) and then converts skip the quality-only work (ε correction,
    learned rounding), which changes no graph's structure or speed. `quick`: a reduced run."""
    big: str = "digits16-ddpm"
    small: str = "digits16-ddpm-small"
    distilled: str | None = "digits16-ddpm-distilled"
    samples: int = 512
    steps: int = 50
    threads: int | None = None
    seed: int = 0
    quality: bool = True
    features: str = "digits16-classifier"
    real_stats: str | None = None   # .npz of the real data's feature mu / sigma (default: the extractor's own)
    quick: bool = False
    bimodal: bool = True     # the bimodal-activation study on BIG (with quality only)

    def __post_init__(self):
        if self.samples < 2 or self.steps < 1 or self.seed < 0:
            raise ValueError(f"--samples must be ≥ 2, --steps ≥ 1 and --seed ≥ 0 (got {self.samples}, {self.steps}, "
                             f"{self.seed})")

    def models(self) -> dict[str, str]:
        return {k: v for k, v in (("big", self.big), ("small", self.small), ("distilled", self.distilled)) if v}

    def variants(self) -> list[Variant]:
        return [v for v in VARIANTS if v.model in self.models()]

    def calibration(self):
        from ..calibrate.api import CalibrationConfig
        from ..calibrate.sources import SourceConfig

        # quick: 64 (t, x_t) pairs over at most 10 steps (no more steps than the run samples with), 8 per step at most
        return CalibrationConfig(source=SourceConfig(samples=64, trajectories=8, steps=min(10, self.steps))) \
            if self.quick else None

    def convert_config(self, bits: int):
        from ..export.pipeline import ConvertConfig

        lean = self.quick or not self.quality
        return ConvertConfig(bits=bits, calibration=self.calibration(), threads=self.threads,
                             correction="off" if lean else "auto", rounding="nearest" if lean else None)

    def bimodal_config(self):
        from .bimodal import BimodalConfig

        return BimodalConfig(samples=min(self.samples, 256), steps=min(self.steps, 20), seed=self.seed,
                             calibration=self.calibration())


def run_compare(cfg: CompareConfig, out: str | Path, progress: bool = True) -> dict:
    """Convert, measure and report; writes `compare.json`, `compare.md` and `pareto.png` under `out`."""
    from qexport_runtime.bench import machine_info

    from ..export.pipeline import convert
    from ..tables.schema import QuantTable
    from ..zoo.cost import time_embedding_dim, time_embedding_ops, unet_ops
    from ..zoo.loading import load_model
    from .efficiency import gemm_peak

    t0 = time.perf_counter()
    extractor = quality_extractor(cfg) if cfg.quality else None   # a bad --features fails before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = cfg.models()
    info = {}
    for key, model_id in models.items():
        m = load_model(model_id)
        info[key] = dict(model_id=model_id, params=sum(p.numel() for p in m.unet.parameters()),
                         macs_torch=int(unet_ops(m.unet, m.sample_shape) / 2), sample_shape=tuple(m.sample_shape),
                         time_embedding_macs=int(time_embedding_ops(m.unet) / 2),
                         time_branch_macs=int(time_embedding_ops(m.unet, projections=True) / 2),
                         time_embedding_dim=time_embedding_dim(m.unet))
    if len({i["sample_shape"] for i in info.values()}) != 1:
        raise ValueError(f"the models' sample shapes differ ({ {k: i['sample_shape'] for k, i in info.items()} }); "
                         f"compare models of one resolution and channel count")
    artifacts = {}
    for key, bits in sorted({(v.model, v.artifact_bits) for v in cfg.variants()}):
        log.info("converting %s (%s) at W%dA8", key, models[key], bits)
        artifacts[key, bits] = convert(models[key], out / "artifacts" / f"{key}-w{bits}", cfg.convert_config(bits),
                                       overwrite=True, progress=progress)
    rows = {v.name: dict(name=v.name, model=v.model, model_id=models[v.model], bits=v.bits, role=v.role,
                         artifact=str(artifacts[v.model, v.artifact_bits]), params=info[v.model]["params"],
                         macs_torch=info[v.model]["macs_torch"]) for v in cfg.variants()}
    for r in rows.values():   # torch's count of what the graph runs: a time-embedding table skips the time MLP,
        table = QuantTable.load(r["artifact"]) if r["bits"] != 32 else None   # a projection table the projections too
        if table is not None and table.time_embedding_table:
            i = info[r["model"]]
            r["macs_torch"] -= i["time_branch_macs" if table.time_projection_table(i["time_embedding_dim"])
                                 else "time_embedding_macs"]
    peak = gemm_peak(cfg.threads)
    _efficiency(rows, cfg, info["big"]["sample_shape"], peak)
    seed_floor, bimodal = None, None
    if cfg.quality:
        seed_floor = _quality(rows, cfg, artifacts[("big", 8)], extractor, progress)
        if cfg.bimodal:
            from .bimodal import study

            log.info("bimodal-activation study on %s", cfg.big)
            bimodal = study(cfg.big, cfg.bimodal_config(), extractor, progress)
    variants = list(rows.values())
    report = dict(machine=machine_info(), gemm_peak=peak, seconds=round(time.perf_counter() - t0, 1),
                  settings=dict(dataclasses.asdict(cfg), batches=[1, 8], interleaved=True,
                                baseline=BASELINE, quality_reference=f"{BASELINE} images, same seeds"),
                  seed_floor=seed_floor, variants=variants, answers=answers(variants, cfg.quality, seed_floor),
                  bimodal=bimodal)
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(markdown(report))
    plot_pareto(report, out / "pareto.png")
    return report


def _efficiency(rows: dict, cfg: CompareConfig, sample_shape: tuple, peak: dict) -> None:
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.bench import bench_graphs

    from .efficiency import achieved_gops, graph_macs, is_integer_op

    graphs = [(name, r["artifact"], r["role"]) for name, r in rows.items()]
    for batch in (1, 8):
        rep = bench_graphs(graphs, steps=cfg.steps, batch=batch, threads=cfg.threads, memory=True)
        for res in rep["results"]:
            r = rows[res["name"]]
            r[f"step_ms_b{batch}"] = res["step_ms_median"]
            r[f"step_ms_p90_b{batch}"] = res["step_ms_p90"]
            r[f"image_ms_b{batch}"] = res["image_ms"]
            r["peak_rss_mb" if batch == 1 else "peak_rss_mb_b8"] = res["peak_rss_mb"]
            r["bytes"] = res["bytes"]
            if res["check"] is not None:
                r["check"] = res["check"]["verdict"]
    for r in rows.values():
        macs = graph_macs(load_artifact(r["artifact"]).graph(r["role"]), sample_shape)
        r["macs_per_step"] = macs["total"]
        r["int8_mac_share"] = sum(v for k, v in macs["by_op"].items() if is_integer_op(k)) / macs["total"]
        kind = "fp32" if r["bits"] == 32 else "int8"
        for batch in (1, 8):
            gops = achieved_gops(r["macs_per_step"], batch, r[f"step_ms_b{batch}"])
            r[f"achieved_gops_b{batch}"] = gops
            r[f"peak_share_b{batch}"] = gops / peak[f"{kind}_gops"]
    base = rows[BASELINE]
    for r in rows.values():
        for batch in (1, 8):
            r[f"speedup_b{batch}"] = base[f"step_ms_b{batch}"] / r[f"step_ms_b{batch}"]


def quality_extractor(cfg: CompareConfig):
    """The feature extractor of the quality figures; it must carry the real data's statistics."""
    from ..errors import QexportError
    from .features import load_extractor

    extractor = load_extractor(cfg.features, cfg.real_stats)
    if getattr(extractor, "real_stats", None) is None:
        raise QexportError(f"feature extractor {cfg.features!r} has no real-data statistics for FD to real; pass "
                           f"--real-stats FILE.npz (mu and sigma of the real data's features) or --no-quality")
    return extractor


def _quality(rows: dict, cfg: CompareConfig, big_w8: Path, extractor, progress: bool) -> float:
    from qexport_runtime.artifact import load_artifact

    from .fidelity import FidelityConfig, compare, fp32_reference, sample_set

    fcfg = FidelityConfig(samples=cfg.samples, steps=cfg.steps, seed=cfg.seed, threads=cfg.threads)
    ref = fp32_reference(load_artifact(big_w8), fcfg, extractor, progress)
    for name, r in rows.items():
        if name == BASELINE:
            images = ref.images
        else:
            images, _ = sample_set(load_artifact(r["artifact"]), r["role"], fcfg, cfg.seed, desc=name,
                                   progress=progress)
        m = compare(images, ref, extractor)
        r.update({k: m[k] for k in ("fd_to_fp32", "fd_to_fp32_pct_floor", "fd_to_real", "label_agreement",
                                    "psnr_db", "ssim")})
    return ref.seed_floor


def answers(variants: list[dict], quality: bool, seed_floor: float | None) -> dict:
    """RQ1 and RQ2 answered in sentences from the measured figures, each against the research notes'
    expectation (quantization wins on efficiency, scaling down on quality)."""
    v = {r["name"]: r for r in variants}
    big, q8, small = v[BASELINE], v.get("w8a8-big"), v.get("fp32-small")

    def eff(r):
        return (f"{r['speedup_b1']:.2f}× (B=1) / {r['speedup_b8']:.2f}× (B=8) the FP32 big model's step speed, "
                f"{big['bytes'] / r['bytes']:.1f}× smaller graph, peak RSS {r['peak_rss_mb']:.0f} MB vs "
                f"{big['peak_rss_mb']:.0f} MB, {r['macs_per_step'] / 1e6:.1f} M MAC per step")

    rq1 = []
    if q8 and small:
        speed = {b: "quantization" if q8[f"speedup_b{b}"] > small[f"speedup_b{b}"] else "scaling down" for b in (1, 8)}
        verdict = ("holds" if set(speed.values()) == {"quantization"} else
                   "does not hold" if set(speed.values()) == {"scaling down"} else "holds only in part")
        rq1.append(f"Expectation: quantization wins on efficiency. Measured, it {verdict}: W8A8 makes the big model "
                   f"{q8['speedup_b1']:.2f}× (B=1) / {q8['speedup_b8']:.2f}× (B=8) faster per step, the "
                   f"{big['params'] / small['params']:.1f}× smaller FP32 model (MACs ÷"
                   f"{big['macs_per_step'] / small['macs_per_step']:.1f}) {small['speedup_b1']:.2f}× / "
                   f"{small['speedup_b8']:.2f}×, so "
                   + (f"{speed[1]} wins at both batch sizes" if speed[1] == speed[8] else
                      f"{speed[1]} wins at B=1 and {speed[8]} at B=8") + ". The graph files: "
                   f"W8A8 {big['bytes'] / q8['bytes']:.1f}× smaller, the small FP32 model "
                   f"{big['bytes'] / small['bytes']:.1f}× smaller. W8A8 big reaches {q8['peak_share_b8']:.0%} of "
                   f"the int8 GEMM peak at B=8, FP32 big {big['peak_share_b8']:.0%} and FP32 small "
                   f"{small['peak_share_b8']:.0%} of the FP32 peak: the fewer MACs a step has, the more of it is "
                   f"per-operator overhead that neither lever removes.")
    rq1 += [f"{name}: {eff(v[name])}." for name in ("w8a8-big", "w4a8-big", "fp32-small", "w8a8-small",
                                                    "fp32-distilled", "w8a8-distilled") if name in v]
    out = dict(rq1=" ".join(rq1))
    if not quality:
        out["rq2"] = "not measured: random weights make image quality meaningless."
        return out
    rq2 = []
    if q8 and small:
        cheaper = "quantization" if q8["fd_to_real"] - big["fd_to_real"] < small["fd_to_real"] - big["fd_to_real"] \
            else "scaling down"
        rq2.append(f"Expectation: scaling down wins on quality. Measured, it "
                   f"{'holds' if cheaper == 'scaling down' else 'does not hold'}: {cheaper} costs less. W8A8 big moves "
                   f"FD to the real digits by {q8['fd_to_real'] - big['fd_to_real']:+.2f} (FP32 big "
                   f"{big['fd_to_real']:.2f}) and stays at {q8['fd_to_fp32_pct_floor']:.1f}% of the seed floor "
                   f"({seed_floor:.2f}) from FP32 big's own images; the scaled-down FP32 model moves it by "
                   f"{small['fd_to_real'] - big['fd_to_real']:+.2f}.")
        if "fp32-distilled" in v:
            d = v["fp32-distilled"]
            rq2.append(f"Distillation recovers {(small['fd_to_real'] - d['fd_to_real']):.2f} of that "
                       f"({d['fd_to_real'] - big['fd_to_real']:+.2f} vs FP32 big) at the same size and speed.")
    for name in ("w8a8-big", "w4a8-big", "fp32-small", "fp32-distilled", "w8a8-small", "w8a8-distilled"):
        if name in v:
            r = v[name]
            rq2.append(f"{name}: FD to FP32 big {r['fd_to_fp32']:.2f} ({r['fd_to_fp32_pct_floor']:.0f}% of the floor), "
                       f"{_pct(r['label_agreement'])} same label, {r['psnr_db']:.1f} dB, FD to real "
                       f"{r['fd_to_real'] - big['fd_to_real']:+.2f} vs FP32 big.")
    out["rq2"] = " ".join(rq2)
    return out


def _pct(v: float | None) -> str:
    """A share as a percentage; n/a where the feature extractor gives no labels."""
    return "n/a" if v is None else f"{v:.1%}"


def markdown(report: dict) -> str:
    mi, s = report["machine"], report["settings"]
    peak = report["gemm_peak"]
    lines = [f"# Quantize or scale down? ({mi['cpu']}, {mi['isa']}, int8 path {mi['int8_kernel_path']}, "
             f"{mi['cores']} cores, onnxruntime {mi['onnxruntime']})", "",
             f"Models: big `{s['big']}`, small `{s['small']}`, distilled `{s['distilled']}`; threads "
             f"{s['threads'] or 'onnxruntime default'}; {s['steps']} DDIM steps; {s['samples']} samples per quality set, "
             f"seed {s['seed']}{'; quick run' if s['quick'] else ''}. GEMM peak through onnxruntime: int8 "
             f"{peak['int8_gops']:.0f} GOP/s, fp32 {peak['fp32_gops']:.0f} GFLOP/s. Latencies are medians of one "
             f"interleaved run; ×: speed-up over `{BASELINE}` in that run. MACs per step per sample counted from the "
             f"graph (the torch model's count beside it).", "",
             "| variant | params | bits | step ms B=1 | step ms B=8 | × B=1 | × B=8 | ms/img B=8 | peak RSS MB | bytes | "
             "MAC/step (graph / torch) | int8 MAC | GOP/s B=8 | % peak B=8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        bits = "FP32" if r["bits"] == 32 else f"W{r['bits']}A8"
        lines.append(f"| {r['name']} | {r['params']:,} | {bits} | "
                     f"{r['step_ms_b1']:.2f} | {r['step_ms_b8']:.2f} | {r['speedup_b1']:.2f} | {r['speedup_b8']:.2f} | "
                     f"{r['image_ms_b8']:.1f} | {r['peak_rss_mb']:.0f} | {r['bytes']:,} | "
                     f"{r['macs_per_step'] / 1e6:.2f} M / {r['macs_torch'] / 1e6:.2f} M | {r['int8_mac_share']:.0%} | "
                     f"{r['achieved_gops_b8']:.0f} | {r['peak_share_b8']:.0%} |")
    if report["seed_floor"] is not None:
        lines += ["", f"Quality against `{BASELINE}`'s images from the same seeds (seed floor FD "
                      f"{report['seed_floor']:.3f}: FP32 big vs itself from other seeds), and against the real digits:", "",
                  "| variant | FD to FP32 big | % of floor | FD to real | label agreement | PSNR dB | SSIM | self-check |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["variants"]:
            lines.append(f"| {r['name']} | {r['fd_to_fp32']:.3f} | {r['fd_to_fp32_pct_floor']:.1f}% | "
                         f"{r['fd_to_real']:.3f} | {_pct(r['label_agreement'])} | {min(r['psnr_db'], 100):.1f} | "
                         f"{r['ssim']:.4f} | {r.get('check', '–')} |")
    lines += ["", "## RQ1: hardware efficiency", "", report["answers"]["rq1"], "",
              "## RQ2: quality", "", report["answers"]["rq2"], ""]
    if report.get("bimodal"):
        lines += bimodal_markdown(report["bimodal"])
    return "\n".join(lines)


def bimodal_markdown(b: dict) -> list[str]:
    lines = ["## Bimodal activations", "",
             f"`{b['model_id']}` with every site quantized at W8A8 (first/last layer and time branch included); "
             f"bimodal: two modes (BC > 5/9 and a valley) at ≥ 10% of the calibrated steps or over all steps.", "",
             "| site | share of steps bimodal | over all t |", "|---|---|---|"]
    lines += [f"| `{r['site']}` | {r['share_of_steps']:.0%} | {'yes' if r['bimodal_over_all_t'] else 'no'} |"
              for r in b["bimodal_sites"]]
    if not b["schemes"]:
        return lines + ["", "No bimodal site: nothing to reshape.", ""]
    lines += ["", f"Each scheme at the bimodal sites only, every other site uniform (torch simulation, {b['samples']} "
                  f"samples, DDIM-{b['steps']}, against the FP32 model's images from the same seeds). Activation MSE "
                  "relative to the uniform quantizer on the same FP32 tensors: geometric mean (min – max) over the sites.",
              "", "| scheme | activation MSE vs uniform | FD to FP32 (± bootstrap std) | label agreement | PSNR dB |",
              "|---|---|---|---|---|"]
    for name, r in b["schemes"].items():
        a = np.array(list((r["activation_mse_vs_uniform"] or {}).values()), dtype=np.float64)
        mse = f"{np.exp(np.log(a).mean()):.2f} ({a.min():.2f} – {a.max():.2f})" if a.size else "0 (float)"
        lines.append(f"| {name} | {mse} | {r['fd_to_fp32']:.3f} ± {r['fd_to_fp32_bootstrap_std']:.3f} | "
                     f"{_pct(r['label_agreement'])} | {r['psnr_db']:.2f} |")
    lines += ["", bimodal_answer(b), ""]
    return lines


def bimodal_answer(b: dict) -> str:
    """What the study's numbers say, in sentences: where the modes are, what each scheme does to the
    activation error, and whether any image difference exceeds two bootstrap standard deviations."""
    s = b["schemes"]
    uni, flt = s["uniform"], s["bimodal sites float"]
    sites = [r["site"] for r in b["bimodal_sites"]]
    t_only = [x for x in sites if "time_emb" in x]
    mse = {n: np.array(list(r["activation_mse_vs_uniform"].values())) for n, r in s.items()
           if r["activation_mse_vs_uniform"] and n != "uniform"}
    gm = {n: float(np.exp(np.log(a).mean())) for n, a in mse.items()}
    out = [f"{len(t_only)} of the {len(sites)} bimodal sites lie in the time branch, whose values at a step are one "
           f"vector shared by the whole batch (the sinusoidal embedding's cos/sin values pile up at ±1); qexport's "
           f"defaults keep that branch in float."]
    out.append("Activation MSE against the uniform quantizer, geometric mean over the sites: "
               + ", ".join(f"{n} {gm[n]:.2f}× (best site {mse[n].min():.2f}×)" for n in gm) + ". "
               "With the clipping range fixed, a uniform quantizer's error is step²/12 wherever the mass sits; "
               "halving one side's levels (two-range, valley-split) coarsens the side that holds the large "
               "values, and levels placed by the calibration histogram (equal-mass, optimal-compander) fit the "
               "histogram merged over a time-step group, not the step at hand, so they win at some sites and "
               "lose badly at others.")
    worst = max(abs(r["fd_to_fp32"] - uni["fd_to_fp32"]) / max(np.hypot(r["fd_to_fp32_bootstrap_std"],
                                                                       uni["fd_to_fp32_bootstrap_std"]), 1e-12)
                for n, r in s.items() if n != "uniform")
    out.append(f"Images: FD to FP32 {uni['fd_to_fp32']:.2f} ± {uni['fd_to_fp32_bootstrap_std']:.2f} (uniform); "
               f"the largest difference of any scheme, or of leaving these sites in float (the most any quantizer "
               f"there could gain: {flt['fd_to_fp32']:.2f}, {flt['psnr_db']:.2f} dB vs {uni['psnr_db']:.2f}), is "
               f"{worst:.1f} combined bootstrap std"
               + (" — within noise: these sites carry too little of the image error for any quantizer there to "
                  "matter, which is why reshaping them gained nothing." if worst < 2 else
                  " — beyond noise: the rows above rank the schemes."))
    return " ".join(out)


def plot_pareto(report: dict, path: Path) -> None:
    """With quality: per-image latency and peak memory against FD to real. Without: per-image latency
    against graph size and peak memory (both levers on efficiency axes only). Every variant labelled,
    the Pareto front (lower is better on both axes) in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["variants"]
    ms = ("image_ms_b8", "ms per image (B=8, whole loop)")
    if report["seed_floor"] is not None:
        panels = [(ms, ("fd_to_real", "FD to real digits (lower is better)")),
                  (("peak_rss_mb", "peak RSS MB (B=1, fresh process)"), ("fd_to_real", "FD to real digits (lower is better)"))]
    else:
        panels = [(("bytes", "graph MB"), ms), (("peak_rss_mb", "peak RSS MB (B=1, fresh process)"), ms)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, ((x_key, x_label), (y_key, y_label)) in zip(axes, panels):
        unit = {"bytes": 1e6}
        pts = np.array([[r[x_key] / unit.get(x_key, 1), r[y_key]] for r in rows], dtype=np.float64)
        front = [i for i, p in enumerate(pts) if not any((q <= p).all() and (q < p).any() for q in pts)]
        for i, r in enumerate(rows):
            ax.scatter(*pts[i], s=60, marker="o" if r["bits"] == 32 else "s",
                       color="tab:red" if i in front else "tab:blue", zorder=3)
            ax.annotate(r["name"], pts[i], textcoords="offset points", xytext=(5, 4 - 10 * (r["bits"] == 4)),
                        fontsize=8)
        order = sorted(front, key=lambda i: pts[i, 0])
        ax.plot(pts[order, 0], pts[order, 1], "r--", lw=1, label="Pareto front")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    mi = report["machine"]
    fig.suptitle(f"Quantize or scale down ({mi['isa']}, {mi['cores']} cores; circles FP32, squares integer)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
