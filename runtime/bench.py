"""The device-side benchmark: sampling-loop latency, load time, peak memory and size per graph.

For every artifact and graph role asked for (default: the artifact's integer graph and its FP32
reference), sessions are created in this process and the sampling loop is run with all graphs
*interleaved step by step* (so a noisy machine slows them alike); after a warm-up, per-step
latency (median, p90), per-image latency and the Python loop overhead are recorded. Peak resident
memory is the high-water mark (VmHWM) of a fresh process per graph that loads it and runs the loop.
Quantized graphs first run the artifact's golden-probe self-check (runtime.probes): the report names
this CPU's int8 kernel path and each graph's verdict, and `strict` refuses a deviating graph.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .artifact import load_artifact
from .cpu import kernel_path
from .probes import self_check
from .sampler import initial_noise
from .schedulers import make_scheduler
from .session import UNetSession, wait_policy


def machine_info() -> dict:
    import onnxruntime as ort

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    path = kernel_path()
    return dict(cpu=cpu, arch=platform.machine(), cores=os.cpu_count(), onnxruntime=ort.__version__,
                providers=ort.get_available_providers(), python=platform.python_version(), isa=path.isa,
                int8_kernel_path=path.u8s8, int8_path_saturates=path.saturates, wait_policy=wait_policy())


def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Call every fn in turn, `reps` rounds (after `warmup` rounds); returns seconds per call per name."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return out


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _in_fresh_process(call: str) -> float:
    """Run `qexport_runtime.bench.<call>` (which returns a float) in a new Python process."""
    code = f"import json; from qexport_runtime import bench; print(json.dumps(bench.{call}))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([p for p in sys.path if p])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def fresh_process_peak(graph: Path, shape: tuple, steps: int, threads: int | None,
                       optimization: str = "extended") -> float:
    return _in_fresh_process(f"_peak_child({str(graph)!r}, {tuple(shape)!r}, {steps}, {threads!r}, {optimization!r})")


def _peak_child(graph: str, shape: tuple, steps: int, threads: int | None, optimization: str = "extended") -> float:
    s = UNetSession(graph, threads=threads, optimization=optimization)
    x = initial_noise(shape, 0)
    for t in np.linspace(999, 0, steps).astype(int):
        s(x, int(t))
    return vm_hwm_mb()


def bench(artifacts: list[str], roles: list[str] | None = None, **options) -> dict:
    """Bench `roles` (default: the fastest quantized graph and the FP32 reference, the latter both at the
    runtime's level and at onnxruntime's default `fp32@all`) of every artifact; `options` as for
    `bench_graphs` (text-to-image artifacts: `bench_text_to_image`)."""
    if any("text" in load_artifact(a, verify=False).manifest.extra for a in artifacts):
        if len(artifacts) != 1:
            raise ValueError("bench one text-to-image artifact at a time")
        options.pop("scheduler", None)
        return bench_text_to_image(artifacts[0], roles, **options)
    graphs = []
    for a in artifacts:
        art = load_artifact(a)
        want = roles or [next(r for r in ("int", "qdq") if art.manifest.files_with_role(r)), "fp32", "fp32@all"]
        graphs += [(f"{Path(a).name}:{role}", a, role) for role in want]
    return bench_graphs(graphs, **options)


def role_and_level(spec: str) -> tuple[str, str]:
    """`fp32@all` → ("fp32", "all"): a graph role and onnxruntime's optimization level (default "extended")."""
    role, _, level = spec.partition("@")
    return role, level or "extended"


def bench_graphs(graphs: list[tuple[str, str | Path, str]], steps: int = 20, batch: int = 1,
                 threads: int | None = None, warmup: int = 3, scheduler: str = "ddim", memory: bool = True,
                 strict: bool = False, trusted: bool = False) -> dict:
    """Bench named graphs `(name, artifact folder, role)` of artifacts with the same sample shape,
    interleaved step by step through one sampling loop each. A role may name onnxruntime's optimization
    level after an `@` (`fp32@all`: onnxruntime's own default, NCHWc float convolutions on x86); the
    speed-up is against the fastest FP32 entry, so the reference is the best FP32 session measured."""
    entries, arts = [], {}
    for name, a, spec in graphs:
        role, level = role_and_level(spec)
        if str(a) not in arts:
            arts[str(a)] = load_artifact(a)
        art = arts[str(a)]
        path = art.graph(role)
        session = UNetSession(path, threads=threads, trusted=trusted, optimization=level)
        check = self_check(art, session, strict) if role != "fp32" else None
        entries.append(dict(name=name, file=str(path), role=role, optimization=level, art=art,
                            session=session, check=check.to_dict() if check else None))
    m = entries[0]["art"].manifest
    shape = (batch, *m.sample_shape)
    sched = make_scheduler(scheduler, m.scheduler)
    sched.set_timesteps(steps)
    xs = {e["name"]: initial_noise(shape, 0) for e in entries}
    for e in entries:
        for _ in range(warmup):
            e["session"](xs[e["name"]], int(sched.timesteps[0]))
    per = {e["name"]: [] for e in entries}
    loop = {e["name"]: 0.0 for e in entries}
    scheds = {e["name"]: make_scheduler(scheduler, e["art"].manifest.scheduler) for e in entries}
    for s in scheds.values():
        s.set_timesteps(steps)
    for t in sched.timesteps:
        for e in entries:
            n = e["name"]
            t0 = time.perf_counter()
            eps = e["session"](xs[n], int(t))
            t1 = time.perf_counter()
            xs[n] = scheds[n].step(eps, int(t), xs[n]).prev_sample
            per[n].append(t1 - t0)
            loop[n] += time.perf_counter() - t0
    fp32_med = min((np.median(per[e["name"]]) for e in entries if e["role"] == "fp32"), default=None)
    results = []
    for e in entries:
        n = e["name"]
        med = float(np.median(per[n]))
        results.append(dict(
            name=n, file=e["file"], role=e["role"], optimization=e["optimization"], step_ms_median=med * 1e3,
            step_ms_p90=float(np.percentile(per[n], 90)) * 1e3, image_ms=loop[n] / batch * 1e3,
            load_ms=e["session"].load_ms, threads_used=e["session"].threads_for(batch),
            shards=e["session"].plan_for(batch).shards,
            peak_rss_mb=fresh_process_peak(Path(e["file"]), shape, min(steps, 5), threads,
                                           e["optimization"]) if memory else None,
            bytes=Path(e["file"]).stat().st_size,
            loop_overhead_pct=100 * (1 - sum(per[n]) / loop[n]),
            speedup_vs_fp32=float(fp32_med / med) if fp32_med else None, check=e["check"]))
    return dict(machine=machine_info(), settings=dict(steps=steps, batch=batch, threads=threads, warmup=warmup,
                                                      scheduler=scheduler, interleaved=True), results=results)


def table(report: dict) -> str:
    if report.get("kind") == "text-to-image":
        return text_table(report)
    mi, st = report["machine"], report["settings"]
    lines = [f"{mi['cpu']} ({mi['arch']}, {mi['cores']} cores), onnxruntime {mi['onnxruntime']}; "
             f"{st['steps']} {st['scheduler']} steps, batch {st['batch']}, threads {st['threads'] or 'auto'}; "
             f"int8 path {mi['isa']}; threads wait {mi.get('wait_policy', 'passive')}",
             f"{'graph':<34} {'step ms':>8} {'p90':>8} {'ms/img':>9} {'load ms':>8} {'peak MB':>8} {'MB file':>8} "
             f"{'loop %':>6} {'x fp32':>7} {'thr':>3} check",
             "(x fp32: against the fastest FP32 row; @all = onnxruntime's default optimization level; thr: "
             "intra-op threads run, 'all' = every core; 1x2: the batch in two shards at once, one thread each)"]
    for r in report["results"]:
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        sp = f"{r['speedup_vs_fp32']:.2f}" if r["speedup_vs_fp32"] else "-"
        thr = f"{r.get('threads_used') or 'all'}" + (f"x{r['shards']}" if r.get("shards", 1) > 1 else "")
        lines.append(f"{r['name']:<34} {r['step_ms_median']:>8.2f} {r['step_ms_p90']:>8.2f} {r['image_ms']:>9.1f} "
                     f"{r['load_ms']:>8.0f} {rss:>8} {r['bytes'] / 1e6:>8.2f} {r['loop_overhead_pct']:>6.1f} {sp:>7} "
                     f"{thr:>3} "
                     f"{'-' if r.get('check') is None else ('ok' if r['check']['ok'] else 'DEVIATES')}")
    return "\n".join(lines)


PROMPT = "a handwritten seven"


def bench_text_to_image(artifact: str, roles: list[str] | None = None, steps: int = 25, batch: int = 1,
                        threads: int | None = None, reps: int = 3, memory: bool = True, strict: bool = False,
                        trusted: bool = False) -> dict:
    """Prompt → image, phase by phase: text encoder (tokenizer included, once per prompt), U-Net step
    (one call on the CFG batch 2·batch), VAE decoder, whole generation; U-Net graphs `roles` (default: the
    integer graph and FP32) run interleaved generation by generation. Peak RSS: a fresh process per role
    that loads the pipeline and generates once."""
    from .text2image import TextToImage

    art = load_artifact(artifact)
    roles = roles or [next(r for r in ("int", "qdq") if art.manifest.files_with_role(r)), "fp32"]
    pipes = {r: TextToImage(art, threads=threads, role=r, check=r != "fp32", strict=strict, trusted=trusted)
             for r in roles}
    for p in pipes.values():
        p.generate(PROMPT, steps=2, batch=batch)               # warm-up
    runs = {r: [] for r in roles}
    for i in range(reps):
        for r, p in pipes.items():
            runs[r].append(p.generate(PROMPT, steps=steps, batch=batch, seed=i).timings)
    fp32_step = np.median([s for t in runs.get("fp32", []) for s in t["unet_steps"]]) if "fp32" in runs else None
    results = []
    for r in roles:
        ts = runs[r]
        step = float(np.median([s for t in ts for s in t["unet_steps"]]))
        path = pipes[r].sampler.graph_path
        results.append(dict(
            name=f"{Path(artifact).name}:{r}", role=r, file=str(path), bytes=path.stat().st_size,
            text_ms=1e3 * float(np.median([t["text"] for t in ts])), unet_step_ms_median=1e3 * step,
            vae_ms=1e3 * float(np.median([t["vae"] for t in ts])),
            generate_ms=1e3 * float(np.median([t["total"] for t in ts])),
            unet_speedup_vs_fp32=float(fp32_step / step) if fp32_step else None,
            peak_rss_mb=_text_peak(artifact, r, steps, batch, threads) if memory else None,
            check=pipes[r].check.to_dict() if pipes[r].check else None))
    return dict(machine=machine_info(), kind="text-to-image",
                settings=dict(steps=steps, batch=batch, cfg_batch=2 * batch, threads=threads, reps=reps,
                              prompt=PROMPT, scheduler="ddim", interleaved=True), results=results)


def _text_peak(artifact: str, role: str, steps: int, batch: int, threads: int | None) -> float:
    return _in_fresh_process(f"_text_peak_child({artifact!r}, {role!r}, {steps}, {batch}, {threads!r})")


def _text_peak_child(artifact: str, role: str, steps: int, batch: int, threads: int | None) -> float:
    from .text2image import TextToImage

    TextToImage(load_artifact(artifact), threads=threads, role=role, check=False).generate(
        PROMPT, steps=min(steps, 5), batch=batch)
    return vm_hwm_mb()


def text_table(report: dict) -> str:
    mi, st = report["machine"], report["settings"]
    lines = [f"{mi['cpu']} ({mi['arch']}, {mi['cores']} cores), onnxruntime {mi['onnxruntime']}; text-to-image, "
             f"{st['steps']} DDIM steps, batch {st['batch']} (CFG batch {st['cfg_batch']}), threads {st['threads']}; "
             f"int8 path {mi['isa']}",
             f"{'U-Net graph':<28} {'text ms':>8} {'step ms':>8} {'VAE ms':>8} {'image ms':>9} {'peak MB':>8} "
             f"{'x fp32':>7} check"]
    for r in report["results"]:
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        sp = f"{r['unet_speedup_vs_fp32']:.2f}" if r["unet_speedup_vs_fp32"] else "-"
        lines.append(f"{r['name']:<28} {r['text_ms']:>8.2f} {r['unet_step_ms_median']:>8.2f} {r['vae_ms']:>8.2f} "
                     f"{r['generate_ms']:>9.1f} {rss:>8} {sp:>7} "
                     f"{'-' if r.get('check') is None else ('ok' if r['check']['ok'] else 'DEVIATES')}")
    return "\n".join(lines)
