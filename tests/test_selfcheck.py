"""The runtime's load-time self-check: `python -m qexport_runtime check`, the sampler's warning and
`--strict` refusal when the integer graph deviates from its golden probes, untrusted probe files, and
the CPU feature detection it reports."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qexport_runtime.artifact import MANIFEST, file_entry
from qexport_runtime.cpu import kernel_path
from qexport_runtime.probes import PROBES_FILE


@pytest.fixture
def artifact(tiny_artifact):
    return tiny_artifact  # conftest: the tiny U-Net converted with the defaults


def runtime(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qexport_runtime", *args], capture_output=True, text=True, timeout=300)


def tampered(src: Path, dst: Path, edit) -> Path:
    """A copy of the artifact whose probes file was changed by `edit(dict of arrays)` and re-hashed
    in the manifest (as an attacker or a bad copy tool could)."""
    shutil.copytree(src, dst)
    with np.load(dst / PROBES_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    with open(dst / PROBES_FILE, "wb") as f:
        np.savez(f, **arrays)
    m = json.loads((dst / MANIFEST).read_text())
    e = file_entry(dst / PROBES_FILE, "probes")
    m["files"][PROBES_FILE] = dict(sha256=e.sha256, bytes=e.bytes, role=e.role)
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def test_check_reports_isa_and_passes(artifact, tmp_path):
    r = runtime("check", str(artifact), "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    assert f"CPU: {kernel_path().isa}" in r.stdout and "verdict (unet_int.onnx): ok" in r.stdout
    rep = json.loads((tmp_path / "c.json").read_text())
    assert rep["cpu"]["isa"] == kernel_path().isa and rep["check"]["ok"]
    assert len(rep["check"]["timesteps"]) == 5 and max(rep["check"]["excess"]) <= rep["check"]["excess_tol"]
    m = json.loads((artifact / MANIFEST).read_text())
    assert m["extra"]["saturation"]["unsafe_pairs"] == 0 and m["files"][PROBES_FILE]["role"] == "probes"


def test_deviating_graph_warns_refuses_with_strict_and_fails_check(artifact, tmp_path):
    """Golden outputs moved far from what the graph computes stand in for a CPU whose kernels are
    wrong: the check exits 1, sampling warns once on stderr, and --strict refuses with one line."""
    def shift(a):
        a["golden"] = a["fp32"] + 0.001 * (a["golden"] - a["fp32"])   # a near-perfect emulation …
    bad = tampered(artifact, tmp_path / "bad", shift)                   # … the real graph then looks far off
    r = runtime("check", str(bad))
    assert r.returncode == 1 and "DEVIATES" in r.stdout
    r = runtime("sample", str(bad), "--steps", "2", "--batch", "1", "-o", str(tmp_path / "out"))
    assert r.returncode == 0 and r.stderr.count("warning:") == 1 and "DEVIATES" in r.stderr
    summary = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert summary["check"]["ok"] is False and summary["cpu"]["isa"] == kernel_path().isa
    assert summary["threads_used"] >= 1
    r = runtime("sample", str(bad), "--steps", "2", "--batch", "1", "--strict", "-o", str(tmp_path / "out2"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "DEVIATES" in r.stderr
    assert not (tmp_path / "out2").exists()
    r = runtime("bench", str(bad), "--steps", "2", "--no-memory", "--strict")
    assert r.returncode == 2 and "DEVIATES" in r.stderr


def test_check_runs_one_sample_at_a_time_with_the_batched_verdict(artifact):
    """The check never calls the session above batch 1 (a B=1 loop's arena stays B=1), and its figures
    are those of a call at the probes' own batch."""
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.probes import _rms, check_session, load_probes
    from qexport_runtime.session import UNetSession

    art = load_artifact(artifact)
    inner = UNetSession(art.graph("int"), threads=1)

    class Recording:
        def __init__(self):
            self.path, self.batches = inner.path, []

        def __call__(self, x, t, c=None):
            self.batches.append(len(x))
            return inner(x, t, c)

    probes = load_probes(art)
    rec = Recording()
    rows = check_session(art, rec, probes)
    assert probes.sample.shape[1] > 1 and set(rec.batches) == {1}
    assert len(rec.batches) == probes.sample.shape[0] * probes.sample.shape[1]
    batched = [np.array(inner(x, int(t))) for x, t in zip(probes.sample, probes.timestep)]
    expect = [_rms(y - f) / max(_rms(g - f), 1e-12) - 1 for y, g, f in zip(batched, probes.golden, probes.fp32)]
    assert rows.ok and np.allclose(rows.excess, expect, rtol=0, atol=1e-6)


def test_malformed_probes_are_refused(artifact, tmp_path):
    def reshape(a):
        a["golden"] = a["golden"][:, :, :, :2]
    r = runtime("check", str(tampered(artifact, tmp_path / "shape", reshape)))
    assert r.returncode == 2 and "wrong shape" in r.stderr and "Traceback" not in r.stderr

    def time_outside(a):
        a["timestep"] = a["timestep"] + 10_000
    r = runtime("check", str(tampered(artifact, tmp_path / "t", time_outside)))
    assert r.returncode == 2 and "time steps" in r.stderr

    def pickled(a):
        a["sample"] = np.array([object()], dtype=object)
    r = runtime("check", str(tampered(artifact, tmp_path / "p", pickled)))   # a pickle is never loaded
    assert r.returncode == 2 and "not a valid probes file" in r.stderr


def test_cpu_features_agree_with_proc_cpuinfo():
    path = kernel_path()
    if platform.machine() != "x86_64":
        pytest.skip(f"x86 CPUID check; this host is {platform.machine()}")
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    assert path.source == "cpuid"
    assert ("avx512_vnni" in flags) == ("avx512_vnni" in path.features)
    assert ("avx2" in flags) == ("avx2" in path.features)
    assert path.saturates == ("VPMADDUBSW" in path.u8s8)
