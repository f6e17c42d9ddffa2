"""Artifacts are untrusted input for the runtime: corrupt or truncated graphs, hashes that differ,
missing files, names and symlinks leading outside the folder, external data outside it, malformed
manifests (and 600 seeded random mutations of a real one), time steps and shapes the graph does not
take. None may crash with a traceback or read a file outside the artifact folder."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qexport_runtime.artifact import MANIFEST, ArtifactError, file_entry, load_artifact

onnx = pytest.importorskip("onnx", reason="crafting malicious graphs needs onnx")


@pytest.fixture
def artifact(tiny_artifact):
    return tiny_artifact  # conftest: the tiny U-Net converted with the defaults


def sample_cli(art: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qexport_runtime", "sample", str(art), "--steps", "2", "--batch", "1",
                           "-o", str(out)], capture_output=True, text=True, timeout=120)


def refused(r: subprocess.CompletedProcess, match: str) -> None:
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err


def rehash(art: Path, name: str) -> None:
    m = json.loads((art / MANIFEST).read_text())
    e = file_entry(art / name, m["files"][name]["role"])
    m["files"][name].update(sha256=e.sha256, bytes=e.bytes)
    (art / MANIFEST).write_text(json.dumps(m))


def manifest_edit(art: Path, fn) -> None:
    m = json.loads((art / MANIFEST).read_text())
    fn(m)
    (art / MANIFEST).write_text(json.dumps(m))


def test_truncated_graph_with_matching_hash(artifact, tmp_path):
    a = shutil.copytree(artifact, tmp_path / "a")
    data = (a / "unet_int.onnx").read_bytes()
    (a / "unet_int.onnx").write_bytes(data[: len(data) // 3])
    rehash(a, "unet_int.onnx")
    refused(sample_cli(a, tmp_path / "o"), "onnxruntime cannot load this graph")


def test_corrupt_graph_fails_its_hash(artifact, tmp_path):
    a = shutil.copytree(artifact, tmp_path / "a")
    with open(a / "unet_int.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 16)
    refused(sample_cli(a, tmp_path / "o"), "does not match its sha256")


def test_missing_file(artifact, tmp_path):
    a = shutil.copytree(artifact, tmp_path / "a")
    (a / "unet_int.onnx").unlink()
    refused(sample_cli(a, tmp_path / "o"), "missing")


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/hostname", "sub/../../outside.onnx", "C:evil.onnx"])
def test_file_names_outside_the_folder(artifact, tmp_path, name):
    a = shutil.copytree(artifact, tmp_path / "a")
    (tmp_path / "outside.onnx").write_bytes((a / "unet_int.onnx").read_bytes())
    manifest_edit(a, lambda m: m["files"].__setitem__(name, m["files"].pop("unet_int.onnx")))
    refused(sample_cli(a, tmp_path / "o"), "outside the artifact folder")


def test_symlink_leading_outside(artifact, tmp_path):
    a = shutil.copytree(artifact, tmp_path / "a")
    shutil.move(a / "unet_int.onnx", tmp_path / "elsewhere.onnx")
    os.symlink(tmp_path / "elsewhere.onnx", a / "unet_int.onnx")
    refused(sample_cli(a, tmp_path / "o"), "symlink")


def test_external_data_outside_the_folder(artifact, tmp_path):
    """A graph whose initializer points at a file beside the artifact: onnxruntime must not read it."""
    a = shutil.copytree(artifact, tmp_path / "a")
    (tmp_path / "secret.bin").write_bytes(os.urandom(1 << 16))
    m = onnx.load(str(a / "unet_int.onnx"))
    t = max(m.graph.initializer, key=lambda i: len(i.raw_data))
    n = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", str(n))):
        e = t.external_data.add()
        e.key, e.value = k, v
    onnx.save(m, str(a / "unet_int.onnx"))
    rehash(a, "unet_int.onnx")
    refused(sample_cli(a, tmp_path / "o"), "escapes model directory")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format="qexport-artifact/9"), "is not 'qexport-artifact/1'"),
    (lambda m: m.update(sample_shape="16x16"), "sample_shape"),
    (lambda m: m.update(groups=[8]), "'groups' must be a int"),
    (lambda m: m.pop("files"), "missing keys ['files']"),
    (lambda m: m.update(surprise=1), "unknown keys ['surprise']"),
    (lambda m: m["files"]["unet_int.onnx"].update(bytes="many"), "is not {sha256, bytes, role}"),
    (lambda m: m["scheduler"].update(prediction_type="flow"), "scheduler config"),
])
def test_malformed_manifest(artifact, tmp_path, edit, match):
    a = shutil.copytree(artifact, tmp_path / "a")
    manifest_edit(a, edit)
    refused(sample_cli(a, tmp_path / "o"), match)


def test_time_step_and_shape_the_graph_does_not_take(artifact):
    from qexport_runtime.session import UNetSession

    art = load_artifact(artifact)
    s = UNetSession(art.graph("int"), num_train_timesteps=art.manifest.num_train_timesteps)
    x = np.zeros((1, *art.manifest.sample_shape), np.float32)
    for t in (-1, 1000, 10 ** 9):
        with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
            s(x, t)
    for shape in [(1, 2, 16, 16), (1, 1, 32, 32), (0, 1, 16, 16), (16, 16)]:
        with pytest.raises(ValueError, match="does not fit"):
            s(np.zeros(shape, np.float32), 10)


def _mutate(m: dict, rng: random.Random) -> dict:
    """1–3 random edits of a manifest: keys dropped or retyped, file entries and names broken,
    nested fields (scheduler, extra, shapes) given hostile values."""
    m = copy.deepcopy(m)
    junk = [None, -1, 0, 2 ** 63, 1e308, float("nan"), True, "", "x" * 300, "../../etc/passwd", "/etc/passwd",
            [], [1, 2, 3], {}, {"a": {"b": []}}, "qexport-artifact/1", [16, 16, 1], [0, 16, 16]]
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        if op == 0 and m:                                        # drop a top-level key
            m.pop(rng.choice(sorted(m)))
        elif op == 1 and m:                                      # retype a top-level key
            m[rng.choice(sorted(m))] = rng.choice(junk)
        elif op == 2 and isinstance(m.get("files"), dict) and m["files"]:   # rename a file entry
            name = rng.choice(sorted(m["files"]))
            new = rng.choice(["../" + name, "/tmp/" + name, "a/../../" + name, name + "\0", "", name.upper(),
                              "sub/" + name, "..", "."])
            m["files"][new] = m["files"].pop(name)
        elif op == 3 and isinstance(m.get("files"), dict) and m["files"]:   # break a file entry
            e = m["files"][rng.choice(sorted(m["files"]))]
            if isinstance(e, dict) and e:
                e[rng.choice(sorted(e) + ["extra"])] = rng.choice(junk + ["probes", "int", "correction", "f" * 64])
        elif op == 4 and isinstance(m.get("scheduler"), dict):  # hostile scheduler values
            m["scheduler"][rng.choice(["num_train_timesteps", "beta_start", "beta_end", "prediction_type",
                                       "beta_schedule", "timestep_spacing", "trained_betas", "steps_offset",
                                       "clip_sample_range"])] = rng.choice(junk)
        elif op == 5 and isinstance(m.get("extra"), dict):      # hostile extra
            m["extra"][rng.choice(["saturation", "correction", "probes", "tables"])] = rng.choice(junk)
        elif op == 6:                                            # shapes and counts
            m[rng.choice(["sample_shape", "num_train_timesteps", "groups", "bits"])] = rng.choice(junk)
    return m


def test_fuzzed_manifests_never_crash_or_read_outside(artifact, tmp_path):
    """600 seeded mutations: each either loads and samples, or fails with ArtifactError/ValueError
    (one line in the CLI); no other exception, and no file outside the folder is opened."""
    from qexport_runtime.sampler import Sampler

    a = shutil.copytree(artifact, tmp_path / "a")
    original = json.loads((a / MANIFEST).read_text())
    root = a.resolve()
    opened_outside: list[str] = []
    active = [True]

    def audit(event, args):
        if active[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            p = Path(os.fsdecode(args[0])).resolve()
            if p.is_relative_to(tmp_path.resolve()) and not p.is_relative_to(root):
                opened_outside.append(str(p))

    (tmp_path / "outside.onnx").write_bytes((a / "unet_int.onnx").read_bytes())   # bait for '../' names
    sys.addaudithook(audit)
    rng = random.Random(12345)
    outcomes = {"loaded_and_sampled": 0, "refused": 0}
    try:
        for i in range(600):
            m = _mutate(original, rng)
            (a / MANIFEST).write_text(json.dumps(m))
            try:
                art = load_artifact(a)
                Sampler(art, check=True).sample(2, batch=1, seed=i)
                outcomes["loaded_and_sampled"] += 1
            except (ArtifactError, ValueError):
                outcomes["refused"] += 1
    finally:
        active[0] = False
    print(f"\n600 mutated manifests: {outcomes}")
    assert not opened_outside, opened_outside[:5]
    assert outcomes["refused"] >= 300 and sum(outcomes.values()) == 600


def test_ort_format_graph_needs_trust(artifact, tmp_path):
    """An `.ort` graph can carry saved runtime optimizations: refused unless --trust-artifact."""
    import onnxruntime as ort

    a = shutil.copytree(artifact, tmp_path / "a")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(a / "unet_int.ort")
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(a / "unet_int.onnx"), so)
    manifest_edit(a, lambda m: m["files"].update({"unet_int.ort": dict(
        file_entry(a / "unet_int.ort", "int").__dict__)}) or m["files"].pop("unet_int.onnx"))
    (a / "unet_int.onnx").unlink()
    refused(sample_cli(a, tmp_path / "o"), "--trust-artifact")
    r = subprocess.run([sys.executable, "-m", "qexport_runtime", "sample", str(a), "--steps", "2", "--batch", "1",
                        "--trust-artifact", "-o", str(tmp_path / "o2")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o2" / "sample.json").read_text())["graph"] == "unet_int.ort"
