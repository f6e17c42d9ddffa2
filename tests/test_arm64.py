"""The runtime in an emulated aarch64 Debian (proot + qemu-user-static), as on a Raspberry Pi 4
(`ARM_CPU=cortex-a72`: NEON without dot product) and a current core (qemu's `max`: dotprod, i8mm):
the shipped W8A8 artifact's integer graph passes its golden-probe self-check there (runtime.probes:
no more than 20% extra error over quantization itself), and its outputs agree with this x86 host's
integer graph within the same tolerance.

The rootfs is cached between runs (QEXPORT_ARM_CACHE, default ~/.cache/qexport/arm64); the first
setup takes ~10 minutes. Where emulation is impossible the test is skipped with the reason.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "arm" / "emulated_arm64.sh"
CACHE = Path(os.environ.get("QEXPORT_ARM_CACHE", Path.home() / ".cache" / "qexport" / "arm64"))

# Runs on both sides: the integer graph's outputs on the artifact's probes, and the self-check.
PROBE_RUN = textwrap.dedent("""
    import json, platform, sys, numpy as np
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.probes import load_probes
    from qexport_runtime.probes import self_check
    from qexport_runtime.session import UNetSession
    art = load_artifact(sys.argv[1])
    s = UNetSession(art.graph("int"), threads=2)
    p = load_probes(art)
    np.save(sys.argv[2], np.stack([np.array(s(x, int(t))) for x, t in zip(p.sample, p.timestep)]))
    print(json.dumps(dict(machine=platform.machine(), check=self_check(art, s).to_dict())))
""")


@pytest.fixture(scope="module")
def arm_setup():
    t0 = time.time()
    env = {**os.environ, "HOST_PYTHON": sys.executable}
    setup = subprocess.run(["bash", str(SCRIPT), "setup", str(CACHE)], capture_output=True, text=True, env=env)
    if setup.returncode == 2:
        pytest.skip(f"emulated arm64 unavailable: {setup.stderr.strip().splitlines()[-1]}")
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    return time.time() - t0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    pytest.importorskip("torch", reason="building the artifact needs the toolchain extra")
    from qexport.calibrate.api import CalibrationConfig
    from qexport.calibrate.sources import SourceConfig
    from qexport.export.pipeline import convert
    from qexport.zoo.registry import MAIN_MODEL

    from .conftest import shipped_or_skip

    shipped_or_skip(MAIN_MODEL)
    tmp = tmp_path_factory.mktemp("arm")
    art = convert(MAIN_MODEL, tmp / "art", calibration=CalibrationConfig(
        source=SourceConfig(steps=20, samples=160, trajectories=8)), correction="off", progress=False)
    (tmp / "probe_run.py").write_text(PROBE_RUN)
    (tmp / "qexport_runtime").symlink_to(REPO / "runtime")
    host = subprocess.run([sys.executable, str(tmp / "probe_run.py"), str(art), str(tmp / "x86.npy")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp)})
    assert host.returncode == 0, host.stderr
    return tmp, art, json.loads(host.stdout.strip().splitlines()[-1])


@pytest.mark.arm
@pytest.mark.parametrize("cpu", ["cortex-a72", "max"])
def test_int8_artifact_on_emulated_arm64(arm_setup, artifact, cpu):
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.probes import DEVIATION_TOL, EXCESS_TOL, load_probes

    tmp, art, host = artifact
    out = tmp / f"arm-{cpu}.npy"
    t1 = time.time()
    arm = subprocess.run(["bash", str(SCRIPT), "run", str(CACHE), str(tmp), str(REPO), "--", "env",
                          f"PYTHONPATH={tmp}", "python", str(tmp / "probe_run.py"), str(art), str(out)],
                         capture_output=True, text=True, env={**os.environ, "ARM_CPU": cpu})
    run_s = time.time() - t1
    assert arm.returncode == 0, arm.stdout[-2000:] + arm.stderr[-2000:]
    rep = json.loads(arm.stdout.strip().splitlines()[-1])
    check = rep["check"]
    p = load_probes(load_artifact(art))
    a, b = np.load(out), np.load(tmp / "x86.npy")
    rms = lambda v: np.sqrt(np.mean(np.square(v, dtype=np.float64), axis=tuple(range(1, v.ndim))))  # noqa: E731
    qerr = rms(p.golden - p.fp32)
    vs_x86 = rms(a - b) / qerr                          # distance between the two CPUs' integer graphs
    excess_vs_x86 = rms(a - p.fp32) / rms(b - p.fp32) - 1
    print(f"\narm64 ({cpu}: {check['isa']}), setup {arm_setup:.0f} s, run {run_s:.0f} s; host {host['check']['isa']}\n"
          f"  excess vs emulation {np.round(check['excess'], 3)}; arm − x86 {np.round(vs_x86, 2)} of the quant. error, "
          f"error vs x86's {np.round(excess_vs_x86, 3)}")
    assert rep["machine"] == "aarch64"
    assert check["isa"] == {"cortex-a72": "arm64 NEON", "max": "arm64 i8mm"}[cpu]   # read from hwcaps
    assert check["ok"], check["verdict"]
    assert np.all(vs_x86 <= DEVIATION_TOL) and np.all(np.abs(excess_vs_x86) <= EXCESS_TOL)
