"""Scale check: convert a random-weight pipeline with BK-SDM-Tiny's U-Net (0.32 B parameters) and measure cost and speed.

    python benchmarks/bench_sd_scale.py [--threads 2] [--reps 7] [--samples 32 --trajectories 4 --steps 8]
    python benchmarks/bench_sd_scale.py --small --threads 1 --results /tmp/sd-small   # quick end-to-end check
    python benchmarks/bench_sd_scale.py --workdir W ...; later: --workdir W --retime   # re-time W's artifact only

Builds, in a temporary folder, a Stable-Diffusion-layout pipeline from random weights: a U-Net with
nota-ai/bk-sdm-tiny's `UNet2DConditionModel` config at 32x32 latents (SD-v1.4's U-Net without its
mid block, one ResNet/attention layer per stage, three stages; 323,384,964 parameters, the
published count), a 2-layer CLIPTextModel of width 768 and 77 positions with the CLIP-format BPE
tokenizer of qexport.zoo.bpe, a small AutoencoderKL (4 latent channels, 3 downsamplings: 32x32
latents <-> 256x256 images) and SD's DDIM schedule. `--small` shrinks the U-Net widths to
(32, 64, 128) and the text width to 64 to check this script quickly.

Then, each in its own process (so peak RSS is that process's high-water mark, from wait4's
ru_maxrss): `qexport convert` at W8A8 with a reduced calibration set, `qexport calibrate` with the
same set (calibration-only cost) and a bare `load_model` (the floor both start from). Records
wall time, peak RSS, artifact bytes per file, and whether any ONNX file uses external data.
Finally times one U-Net step of `unet_int.onnx`, `unet_fp32.onnx` and `unet_qdq.onnx` at the CFG
batch B=2 (median of `--reps` interleaved runs after one warm-up), and each graph's peak RSS in a
fresh process that loads it and runs it three times.

Writes benchmarks/results/sd_scale.json and sd_scale.md (or into `--results`). The weights are
random: no quality figure is meaningful here, only cost, memory and speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QEXPORT, interleaved, machine_info, run_measured  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROTOBUF_LIMIT = 2 ** 31    # a serialized ModelProto must stay below 2 GiB; larger graphs need external data
RSS_LIMIT_GB = 16.0         # acceptance criterion for the convert process

# nota-ai/bk-sdm-tiny unet/config.json (diffusers defaults elsewhere: act silu, norm groups 32,
# flip_sin_to_cos, freq_shift 0); sample_size 32 = 256x256 images instead of its 64 (512x512).
# `attention_head_dim: 8` in SD-1.x configs is the number of heads (diffusers' historical naming).
BK_SDM_TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    mid_block_type=None, layers_per_block=1, cross_attention_dim=768, attention_head_dim=8)
BK_SDM_TINY_UNET_PARAMS = 323_384_964   # nota-ai/bk-sdm-tiny's unet safetensors ("0.33B-param U-Net")
SMALL_UNET = {**BK_SDM_TINY_UNET, "block_out_channels": (32, 64, 128), "cross_attention_dim": 64}
MAX_TOKENS = 77
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32)


def text_config(vocab_size: int, bos: int, eos: int, width: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                num_attention_heads=max(1, width // 64), max_position_embeddings=MAX_TOKENS, projection_dim=width,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_act="quick_gelu")


def nparams(m) -> int:
    return int(sum(p.numel() for p in m.parameters()))


def build_pipeline(out: Path, unet_cfg: dict, seed: int = 0) -> dict:
    """Save the random-weight pipeline folder; return parameter counts and the U-Net's FLOPs per sample."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from qexport.zoo import bpe, prompts
    from qexport.zoo.architectures import t2i_scheduler_config

    torch.manual_seed(seed)
    vocab, merges = bpe.learn(prompts.corpus(), 200)
    bpe.save(out / "tokenizer", vocab, merges, MAX_TOKENS)
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    width = unet_cfg["cross_attention_dim"]
    unet = UNet2DConditionModel(**unet_cfg).eval()
    text = CLIPTextModel(CLIPTextConfig(**text_config(len(tok), tok.bos_token_id, tok.eos_token_id, width))).eval()
    vae = AutoencoderKL(**VAE).eval()
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text, tokenizer=tok,
                                   scheduler=DDIMScheduler.from_config(t2i_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    s = unet_cfg["sample_size"]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:   # conv, linear and attention matmuls (2 per MAC)
        unet(torch.zeros(1, 4, s, s), torch.tensor([500]), encoder_hidden_states=torch.zeros(1, MAX_TOKENS, width))
    info = dict(unet=nparams(unet), text_encoder=nparams(text), vae=nparams(vae), vae_decoder=nparams(vae.decoder),
                unet_gflop_per_sample=fc.get_total_flops() / 1e9)
    info["whole_pipeline"] = info["unet"] + info["text_encoder"] + info["vae"]
    del pipe, unet, text, vae
    gc.collect()
    return info


LOAD_ONLY = [sys.executable, "-c", "import sys; from qexport.zoo.loading import load_model; load_model(sys.argv[1])"]


def artifact_files(art: Path) -> dict:
    """Bytes per file, and per ONNX file whether it stores initializers as external data."""
    import onnx

    files = {}
    for p in sorted(art.iterdir()):
        if not p.is_file():
            continue
        e = dict(bytes=p.stat().st_size)
        if p.suffix == ".onnx":
            m = onnx.load(str(p), load_external_data=False)
            ext = sorted({d.value for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                          for d in t.external_data if d.key == "location"})
            e.update(external_data=bool(ext), external_files=ext, initializers=len(m.graph.initializer),
                     nodes=len(m.graph.node), over_protobuf_limit=p.stat().st_size >= PROTOBUF_LIMIT)
            del m
        files[p.name] = e
    return files


_PEAK_CODE = r"""
import json, sys, numpy as np
from qexport_runtime.bench import vm_hwm_mb
base = vm_hwm_mb()
from qexport_runtime.session import UNetSession
s = UNetSession(sys.argv[1], threads=int(sys.argv[2]))
rng = np.random.default_rng(0)
x = rng.standard_normal((2, *s.sample_dims[1:])).astype(np.float32)
c = rng.standard_normal((2, *s.context_dims[1:])).astype(np.float32)
for _ in range(3):
    s(x, 500, c)
print(json.dumps(dict(peak_rss_mb=vm_hwm_mb(), after_imports_mb=base, load_ms=s.load_ms)))
"""


def graph_peak(path: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK_CODE, str(path), str(threads)], capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: round(v, 1) for k, v in r.items()}


def bench_latency(art: Path, graphs: list[str], threads: int, reps: int) -> dict:
    """Median ms per U-Net call at B=2 (the CFG batch), graphs interleaved call by call."""
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.probes import self_check
    from qexport_runtime.session import UNetSession

    a = load_artifact(art)
    sessions = {g: UNetSession(art / f"unet_{g}.onnx", threads=threads) for g in graphs}
    s0 = sessions[graphs[0]]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *s0.sample_dims[1:])).astype(np.float32)
    c = rng.standard_normal((2, *s0.context_dims[1:])).astype(np.float32)
    outs = {}

    def call(g):
        def f():
            outs[g] = sessions[g](x, 500, c).copy()
        return f

    times = interleaved({g: call(g) for g in graphs}, reps=reps, warmup=1)
    res = {}
    for g in graphs:
        ms = np.array(times[g]) * 1e3
        res[g] = dict(ms_median=round(float(np.median(ms)), 1), ms_min=round(float(ms.min()), 1),
                      ms_max=round(float(ms.max()), 1), runs=len(ms), load_ms=round(sessions[g].load_ms),
                      finite=bool(np.isfinite(outs[g]).all()))
    ref = outs["fp32"]
    for g in graphs:   # agreement on one random input: a sanity check that the graphs compute the same
        res[g]["rel_rms_vs_fp32"] = float(np.sqrt(np.mean((outs[g] - ref) ** 2) / np.mean(ref ** 2)))
    for g in graphs:
        if g != "fp32":
            try:
                chk = self_check(a, sessions[g])
                res[g]["probe_check"] = chk.to_dict().get("verdict") if chk is not None else None
            except Exception as e:  # noqa: BLE001  (a report, not a gate)
                res[g]["probe_check"] = f"failed: {type(e).__name__}: {e}"
    res["int_over_fp32"] = round(res["int"]["ms_median"] / res["fp32"]["ms_median"], 3)
    res["fp32_over_int_speedup"] = round(res["fp32"]["ms_median"] / res["int"]["ms_median"], 3)
    return res


def fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def markdown(r: dict) -> str:
    p, c, m = r["params"], r["processes"], r["machine"]
    cal = r["calibration"]
    used = f" ({cal['samples_used']} (t, x_t) pairs used)" if cal.get("samples_used") is not None else ""
    L = [f"# Stable-Diffusion-scale conversion ({r['config']})", "",
         "**Random weights: no quality figure means anything here.** This measures cost, memory and speed only; "
         "the int-vs-FP32 output difference below is a sanity check of the graphs, not a quality measure.", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, ISA `{m['isa']}` (int8 path: {m['int8_kernel_path']}), "
         f"onnxruntime {m['onnxruntime']}. Threads: {r['threads']} (torch, onnxruntime).", "",
         "## Model", "",
         f"U-Net: {r['unet_description']}, **{p['unet']:,} parameters** "
         f"({'= ' if p['unet'] == BK_SDM_TINY_UNET_PARAMS else '≠ '}nota-ai/bk-sdm-tiny's {BK_SDM_TINY_UNET_PARAMS:,}), "
         f"{p['unet_gflop_per_sample']:.1f} GFLOP per sample at {r['latent']} latents.  ",
         f"Text encoder: random CLIPTextModel, 2 layers, width {r['text_width']}, 77 positions "
         f"({p['text_encoder']:,} parameters). VAE: random AutoencoderKL (32, 64, 64, 64), 4 latent channels, "
         f"{r['image']} images ({p['vae']:,} parameters); artifact VAE decoder "
         f"{ {8: 'static int8', 32: 'FP32'}.get(r.get('vae_bits'), '?') } (`--vae-bits {r.get('vae_bits', '?')}`). "
         "Scheduler: DDIM, SD's schedule.", "",
         f"Calibration set: --samples {cal['samples']}{used} from {cal['trajectories']} CFG-guided trajectories "
         f"of {cal['steps']} DDIM steps (strategy uniform, method mse), W8A8 — reduced from the defaults "
         f"(1024 / 32 / 50).", "",
         "## Conversion (each a separate process; peak RSS = that process's ru_maxrss)", "",
         "Wall time depends on what else runs on the machine; CPU is the process's user + system seconds.", "",
         "| process | wall | CPU | peak RSS | result |", "|---|---:|---:|---:|---|"]
    for name, e in c.items():
        ok = "ok" if e["returncode"] == 0 else f"**failed (rc {e['returncode']})**"
        L.append(f"| {name} | {e['wall_s']:.1f} s | {e['cpu_s']:.0f} s | {fmt_mb(e['peak_rss_mb'])} | {ok} |")
    conv = c["convert"]
    L += ["", f"Convert peak RSS {fmt_mb(conv['peak_rss_mb'])}: "
              f"{'**meets**' if conv['peak_rss_mb'] / 1024 < RSS_LIMIT_GB else '**FAILS**'} the < {RSS_LIMIT_GB:.0f} GB "
              f"criterion.", ""]
    if r.get("artifact"):
        files = r["artifact"]["files"]
        L += ["## Artifact", "", "| file | bytes | external data |", "|---|---:|---|"]
        for n, e in files.items():
            ext = ("yes: " + ", ".join(e["external_files"])) if e.get("external_data") else ("no" if "external_data" in e else "")
            L.append(f"| {n} | {e['bytes']:,} | {ext} |")
        L += [f"| **total** | **{r['artifact']['total_bytes']:,}** | |", "",
              r["artifact"]["external_data_note"], ""]
    if r.get("latency"):
        lat = r["latency"]
        busy = ("" if max(lat.get("load_avg_1min_before_after", [0])) <= r["threads"] + 0.5 else
                f" (more than the {r['threads']} threads used: other processes competed, so absolute times are "
                "inflated; the interleaved ratio much less so)")
        L += [f"## U-Net step latency, B=2 (CFG batch), threads={r['threads']}",
              "", f"Median of {lat['fp32']['runs']} runs after one warm-up, graphs interleaved call by call; "
              "peak RSS of a fresh process that loads the graph and runs it 3 times. Measured "
              f"{lat.get('measured_at_utc', '?')} UTC, 1-min load average before/after "
              f"{lat.get('load_avg_1min_before_after', '?')} on {m['cores']} cores{busy}.", "",
              "| graph | ms/step (median) | min–max | vs FP32 | peak RSS | load | rel. RMS vs FP32 | probe check |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
        for g in r["graphs"]:
            e = lat[g]
            L.append(f"| unet_{g}.onnx | {e['ms_median']:.0f} | {e['ms_min']:.0f}–{e['ms_max']:.0f} | "
                     f"{e['ms_median'] / lat['fp32']['ms_median']:.2f}x | {fmt_mb(r['graph_peak_rss'][g]['peak_rss_mb'])} | "
                     f"{e['load_ms'] / 1e3:.1f} s | {e['rel_rms_vs_fp32']:.3g} | {e.get('probe_check') or ''} |")
        L += ["", f"int / FP32 time ratio: **{lat['int_over_fp32']:.2f}** "
                  f"(FP32 / int = {lat['fp32_over_int_speedup']:.2f}x).", ""]
    if r.get("notes"):
        L += ["## Notes", ""] + [f"- {x}" for x in r["notes"]] + [""]
    if r.get("problems"):
        L += ["## Problems", ""] + [f"- {x}" for x in r["problems"]] + [""]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="shrunk U-Net (32, 64, 128), text width 64: a quick check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7, help="timed runs per graph (after one warm-up)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--trajectories", type=int, default=4,
                    help="trajectories per batch; at most this many samples per step are kept")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--vae-bits", type=int, choices=[8, 32], default=None,
                    help="convert's --vae-bits (default: qexport's default). At this scale the int8 decoder's "
                         "calibration (64 guided FP32 trajectories of 25 steps, one batch) dominates convert time")
    ap.add_argument("--no-qdq", action="store_true", help="time only the int and FP32 graphs")
    ap.add_argument("--no-calibrate", action="store_true", help="skip the calibration-only process")
    ap.add_argument("--workdir", default=None, help="keep the pipeline and artifact here (default: a temp folder)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--retime", action="store_true",
                    help="only re-time the artifact in --workdir and update the results file's latency figures")
    a = ap.parse_args()
    if a.retime:
        if not a.workdir:
            ap.error("--retime needs the --workdir of an earlier run")
        out = Path(a.results)
        r = json.loads((out / "sd_scale.json").read_text())
        r["threads"] = a.threads
        time_graphs(r, Path(a.workdir) / "artifact", a)
        write(r, out)
        return

    import torch

    torch.set_num_threads(a.threads)
    unet_cfg = SMALL_UNET if a.small else BK_SDM_TINY_UNET
    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="sd-scale-")
        work = Path(tmp.name)
    folder, art, tables = work / "pipeline", work / "artifact", work / "tables"
    cal = dict(samples=a.samples, trajectories=a.trajectories, steps=a.steps)
    cal_args = ["--samples", str(a.samples), "--trajectories", str(a.trajectories), "--steps", str(a.steps)]
    s = unet_cfg["sample_size"]
    r = dict(config="shrunk check config (--small)" if a.small else "BK-SDM-Tiny U-Net config",
             unet_description=("UNet2DConditionModel, BK-SDM-Tiny layout, widths (32, 64, 128), cross-attention 64"
                               if a.small else "UNet2DConditionModel with nota-ai/bk-sdm-tiny's config "
                               "(320, 640, 1280; 3 cross-attention stages; 1 layer per block; no mid block; 8 heads)"),
             unet_config={k: list(v) if isinstance(v, tuple) else v for k, v in unet_cfg.items()},
             latent=f"4x{s}x{s}", image=f"3x{8 * s}x{8 * s}", text_width=unet_cfg["cross_attention_dim"],
             threads=a.threads, calibration=cal, machine=machine_info(), problems=[])
    print(f"building the random pipeline in {folder} …", flush=True)
    t0 = time.perf_counter()
    r["params"] = build_pipeline(folder, unet_cfg)
    r["build_s"] = round(time.perf_counter() - t0, 1)
    print(f"  U-Net {r['params']['unet']:,} parameters ({r['params']['unet_gflop_per_sample']:.1f} GFLOP/sample); "
          f"built in {r['build_s']} s", flush=True)

    r["processes"] = {}
    steps = [("load_model only", LOAD_ONLY + [str(folder)], work / "load.log")]
    if not a.no_calibrate:
        steps.append(("calibrate", QEXPORT + ["calibrate", str(folder), "-o", str(tables), "--overwrite", *cal_args],
                      work / "calibrate.log"))
    steps.append(("convert", QEXPORT + ["convert", str(folder), "-o", str(art), "--bits", "8", "--overwrite",
                                        "--threads", str(a.threads), *cal_args,
                                        *(["--vae-bits", str(a.vae_bits)] if a.vae_bits else [])], work / "convert.log"))
    for name, cmd, log in steps:
        print(f"running {name} …", flush=True)
        e = r["processes"][name] = run_measured(cmd, log, a.threads)
        print(f"  {name}: rc {e['returncode']}, {e['wall_s']} s, peak RSS {fmt_mb(e['peak_rss_mb'])}", flush=True)
        if e["returncode"] != 0:
            r["problems"].append(f"`{name}` failed (rc {e['returncode']}): " + " / ".join(e["error_tail"][-3:]))
            print("\n".join(e["error_tail"]), file=sys.stderr)
    conv = r["processes"]["convert"]
    if conv["peak_rss_mb"] / 1024 >= RSS_LIMIT_GB:
        r["problems"].append(f"convert peak RSS {fmt_mb(conv['peak_rss_mb'])} is not below {RSS_LIMIT_GB:.0f} GB")

    if conv["returncode"] == 0:
        files = artifact_files(art)
        onnx_files = {n: e for n, e in files.items() if n.endswith(".onnx")}
        biggest = max(onnx_files, key=lambda n: onnx_files[n]["bytes"])
        uses = [n for n, e in onnx_files.items() if e["external_data"]]
        need = [n for n, e in onnx_files.items() if e["over_protobuf_limit"]]
        note = (f"External data: {', '.join(uses) if uses else 'no ONNX file uses it'}; "
                f"{'none needed it' if not need else 'needed by ' + ', '.join(need)} (largest graph {biggest}, "
                f"{onnx_files[biggest]['bytes'] / 2 ** 30:.2f} GiB of the 2 GiB protobuf limit).")
        tj = json.loads((art / "tables.json").read_text()).get("calibration", {})
        r["calibration"]["samples_used"] = tj.get("samples")
        r["vae_bits"] = json.loads((art / "manifest.json").read_text())["extra"]["text"]["vae_bits"]
        r["artifact"] = dict(files=files, total_bytes=sum(e["bytes"] for e in files.values()),
                             external_data_used=uses, external_data_needed=need, external_data_note=note)
        print(note, flush=True)
        time_graphs(r, art, a)

    write(r, Path(a.results))
    if tmp is not None:
        tmp.cleanup()


def time_graphs(r: dict, art: Path, a) -> None:
    """Latency and per-graph peak RSS of the artifact's U-Net graphs into `r`, with the machine's load
    average around the timing (other processes on the machine slow every graph, interleaving keeps
    the ratio fair but not the absolute times)."""
    graphs = ["int", "fp32"] + ([] if a.no_qdq else ["qdq"])
    r["graphs"] = graphs
    print("timing U-Net steps at B=2 …", flush=True)
    before = os.getloadavg()
    r["latency"] = bench_latency(art, graphs, a.threads, a.reps)
    r["latency"]["load_avg_1min_before_after"] = [round(before[0], 2), round(os.getloadavg()[0], 2)]
    r["latency"]["measured_at_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    gc.collect()
    print("peak RSS per graph …", flush=True)
    r["graph_peak_rss"] = {g: graph_peak(art / f"unet_{g}.onnx", a.threads) for g in graphs}
    for g in graphs:
        print(f"  {g}: {r['latency'][g]['ms_median']:.1f} ms/step, "
              f"peak {fmt_mb(r['graph_peak_rss'][g]['peak_rss_mb'])}", flush=True)
    print(f"  int / fp32 = {r['latency']['int_over_fp32']:.3f}; load average {r['latency']['load_avg_1min_before_after']}",
          flush=True)


def write(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sd_scale.json").write_text(json.dumps(r, indent=2))
    (out / "sd_scale.md").write_text(markdown(r))
    print(f"wrote {out / 'sd_scale.json'} and {out / 'sd_scale.md'}")


if __name__ == "__main__":
    main()
