"""Shared pieces of the benchmark scripts: interleaved timing, fresh-process peak memory,
the GEMM peak microbenchmark, and the ddpm-cifar10-config U-Net built from its config (random weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qexport.eval.efficiency import gemm_peak, gemm_probes, peak_of  # noqa: F401  (re-exported for the scripts)
from qexport.zoo.cost import unet_ops  # noqa: F401  (re-exported for the scripts)
from qexport_runtime.bench import interleaved, machine_info  # noqa: F401  (re-exported for the scripts)

CIFAR10_CONFIG = dict(  # google/ddpm-cifar10-32's UNet2DModel config (35.7M parameters)
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, attention_head_dim=None, dropout=0.0,
)
CIFAR10_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=True, variance_type="fixed_large")


def build_cifar_config_unet(folder: Path, seed: int = 0, config: dict | None = None) -> Path:
    """A diffusers pipeline folder holding a random-weight U-Net with ddpm-cifar10-32's config (or `config`)."""
    if (folder / "unet" / "diffusion_pytorch_model.safetensors").exists():
        return folder
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    DDPMPipeline(unet=UNet2DModel(**(config or CIFAR10_CONFIG)), scheduler=DDPMScheduler(**CIFAR10_SCHEDULER)).save_pretrained(
        folder, safe_serialization=True)
    return folder


# the start of each measured child process: its imports path and hwm() in MB
_CHILD_PRELUDE = r"""
import json, sys, numpy as np
sys.path[:0] = {paths!r}
def hwm():  # VmHWM: this process's high-water mark (reset by exec, unlike ru_maxrss)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
"""

_RSS_CODE = _CHILD_PRELUDE + r"""
from qexport_runtime.session import UNetSession
base = hwm()
s = UNetSession({path!r}, threads={threads}, optimization={optimization!r})
x = np.random.default_rng(0).standard_normal({shape!r}).astype(np.float32)
for _ in range(3):
    s(x, 500)
peak = hwm()
print(json.dumps(dict(peak_rss_mb=peak, baseline_mb=base, delta_mb=peak - base)))
"""


_SAMPLING_RSS_CODE = _CHILD_PRELUDE + r"""
from qexport_runtime.artifact import load_artifact
from qexport_runtime.sampler import Sampler
s = Sampler(load_artifact({artifact!r}), role={role!r}, threads={threads})
s.sample({steps}, batch={batch}, seed=0)
print(json.dumps(dict(peak_rss_mb=hwm())))
"""


def sampling_rss(artifact: str, role: str, batch: int, threads: int, steps: int = 20) -> dict:
    """High-water mark of a fresh process that samples as `python -m qexport_runtime sample` does: the
    artifact verified and loaded, the self-check of a quantized graph, `steps` DDIM steps at `batch`."""
    code = _SAMPLING_RSS_CODE.format(paths=sys.path, artifact=str(artifact), role=role, threads=threads,
                                     steps=steps, batch=batch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss(path: str, shape: tuple, threads: int, optimization: str = "extended") -> dict:
    """High-water mark of a fresh process that loads the graph and runs it 3 times."""
    code = _RSS_CODE.format(paths=sys.path, path=str(path), threads=threads, shape=tuple(shape),
                            optimization=optimization)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_measured(cmd: list[str], log: Path, threads: int) -> dict:
    """Run `cmd` as a child process; its wall time and peak RSS (ru_maxrss from wait4: the child's own
    high-water mark, not this process's)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    r = dict(cmd=" ".join(cmd[1:] if cmd[0] == sys.executable else cmd), returncode=p.returncode,
             wall_s=round(wall, 2), peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
             cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
             load_avg_1min_before_after=[round(load0, 2), round(os.getloadavg()[0], 2)])
    if p.returncode != 0:
        r["error_tail"] = log.read_text(errors="replace").strip().splitlines()[-25:]
    return r


QEXPORT = [sys.executable, "-c", "import sys; from qexport.cli.main import main; sys.exit(main())", "-v"]  # -v: tracebacks in the log
