"""The device side imports and samples in a process where torch, diffusers and onnx cannot be imported."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'diffusers', 'onnx', 'safetensors', 'transformers'):
                raise ImportError(f'{name} is blocked in this test')
    sys.meta_path.insert(0, Block())
""")


def run_blocked(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def test_blocker_really_blocks():
    out = run_blocked("import torch")
    assert out.returncode != 0 and "blocked" in out.stderr


@pytest.fixture(scope="module")
def fp32_artifact(tiny_pipeline_dir, tmp_path_factory):
    pytest.importorskip("torch", reason="building the artifact needs the toolchain extra")
    from qexport.export.pipeline import export_fp32_artifact

    return export_fp32_artifact(str(tiny_pipeline_dir), tmp_path_factory.mktemp("art") / "fp32")


def test_runtime_samples_without_torch(fp32_artifact, tmp_path):
    out = run_blocked(f"""
        import sys, json
        import qexport_runtime
        from qexport_runtime.artifact import load_artifact
        from qexport_runtime.sampler import Sampler
        from qexport_runtime.__main__ import main
        art = load_artifact({str(fp32_artifact)!r})
        res = Sampler(art, scheduler="ddim", threads=1).sample(num_steps=5, batch=2, seed=3)
        assert res.images.shape == (2, 1, 16, 16), res.images.shape
        rc = main(["sample", {str(fp32_artifact)!r}, "-o", {str(tmp_path / 'smp')!r}, "--steps", "4",
                   "--batch", "3", "--scheduler", "dpmsolver++"])
        assert rc == 0
        heavy = [m for m in ("torch", "diffusers", "onnx") if m in sys.modules]
        print(json.dumps(dict(ok=True, heavy=heavy, mean=float(abs(res.images).mean()))))
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"ok": true' in out.stdout and '"heavy": []' in out.stdout
    assert (tmp_path / "smp" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.load(tmp_path / "smp" / "samples.npy").shape == (3, 1, 16, 16)


def test_runtime_refuses_tampered_artifact(fp32_artifact, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(fp32_artifact, bad)
    with open(bad / "unet_fp32.onnx", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    out = run_blocked(f"""
        from qexport_runtime.__main__ import main
        raise SystemExit(main(["sample", {str(bad)!r}, "-o", {str(tmp_path / 'x')!r}]))
    """)
    assert out.returncode == 2
    assert "sha256" in out.stderr and out.stderr.strip().count("\n") == 0
