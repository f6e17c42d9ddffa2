"""Soak: a runtime-only process (numpy + onnxruntime, no torch) holds its memory over 5,000 U-Net
steps and over 200 session open/close cycles (the small shipped model; longer soaks belong in
`benchmarks/`). Resident memory is VmRSS from /proc/self/status, after a warm-up and at the end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SOAK = textwrap.dedent("""
    import gc, json, sys
    import numpy as np
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.sampler import Sampler
    from qexport_runtime.session import UNetSession

    def rss():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

    art = load_artifact(sys.argv[1])
    out = {}
    if sys.argv[2] == "steps":
        s = Sampler(art, threads=1)
        for i in range(10):                      # warm-up: 500 steps, the arena and buffers settle
            s.sample(50, batch=1, seed=i)
        gc.collect(); out["start"] = rss()
        for i in range(90):                      # 4,500 more: 5,000 steps in all
            s.sample(50, batch=1, seed=i)
        gc.collect(); out["end"] = rss()
    else:
        x = np.zeros((1, *art.manifest.sample_shape), np.float32)
        for i in range(200):
            s = UNetSession(art.graph("int"), threads=1)
            s(x, 500)
            del s
            gc.collect()
            if i == 19:
                out["start"] = rss()
        out["end"] = rss()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    pytest.importorskip("torch", reason="building the artifact needs the toolchain extra")
    from qexport.calibrate.api import CalibrationConfig
    from qexport.calibrate.sources import SourceConfig
    from qexport.export.pipeline import convert

    from .conftest import shipped_or_skip

    shipped_or_skip("digits16-ddpm-small")
    return convert("digits16-ddpm-small", tmp_path_factory.mktemp("soak") / "art", correction="off",
                   calibration=CalibrationConfig(source=SourceConfig(steps=10, samples=40, trajectories=4)),
                   progress=False)


@pytest.mark.parametrize("mode, what", [("steps", "5,000 U-Net steps"), ("sessions", "200 session open/close cycles")])
def test_runtime_process_holds_memory(small_artifact, mode, what):
    r = subprocess.run([sys.executable, "-c", SOAK, str(small_artifact), mode], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = m["end"] / m["start"] - 1
    print(f"\n{what}: VmRSS {m['start']:.1f} MB after warm-up → {m['end']:.1f} MB ({100 * growth:+.2f}%)")
    assert growth < 0.05
