"""MODEL_ID resolution: shipped name, local model folder, pipeline folder, Hub id, and the errors."""

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="loading needs the toolchain extra")

from qexport.errors import QexportError  # noqa: E402
from qexport.zoo.loading import load_model, resolve_model_folder  # noqa: E402
from qexport.zoo.registry import MAIN_MODEL  # noqa: E402

from .conftest import shipped_or_skip  # noqa: E402


def test_shipped_name():
    shipped_or_skip(MAIN_MODEL)
    m = load_model(MAIN_MODEL)
    assert m.kind == "shipped" and m.num_train_timesteps == 1000
    assert m.sample_shape == (1, 16, 16)
    assert len(m.weights_sha256) == 64


def test_pipeline_folder(tiny_pipeline_dir):
    m = load_model(str(tiny_pipeline_dir))
    assert m.kind == "local" and type(m.unet).__name__ == "UNet2DModel"
    assert m.scheduler_config["num_train_timesteps"] == 1000


def test_model_folder(tiny_unet_dir):
    m = load_model(str(tiny_unet_dir))
    assert m.kind == "local" and m.sample_shape == (1, 16, 16)


def test_missing_path():
    with pytest.raises(QexportError, match="does not exist"):
        load_model("./no/such/model")


def test_missing_scheduler_config(tiny_pipeline_dir, tmp_path):
    d = tmp_path / "unet_only"
    shutil.copytree(tiny_pipeline_dir / "unet", d)
    with pytest.raises(QexportError, match="scheduler"):
        load_model(str(d))


def test_pickle_weights_need_opt_in(tiny_unet_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_unet_dir, d)
    sd = load_file(str(d / "diffusion_pytorch_model.safetensors"))
    (d / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(sd, d / "diffusion_pytorch_model.bin")
    with pytest.raises(QexportError, match="pickle"):
        load_model(str(d))
    assert load_model(str(d), allow_pickle=True).kind == "local"


def test_hub_id_offline_fails_with_one_clear_line(tmp_path):
    # A fresh process, an empty Hub cache and offline mode: the real snapshot_download path runs
    # and must fail with qexport's message, not a traceback.
    code = ("from qexport.zoo.loading import load_model\n"
            "from qexport.errors import QexportError\n"
            "try:\n    load_model('google/ddpm-cifar10-32')\n"
            "except QexportError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    line = out.stdout.strip()
    assert line.startswith("ERR could not fetch 'google/ddpm-cifar10-32'"), out.stdout + out.stderr
    assert "local folder" in line and "\n" not in line


def test_hub_id_resolves_through_snapshot_download(monkeypatch, tiny_pipeline_dir):
    """The Hub branch hands the downloaded snapshot folder to the local loader."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, cache_dir=None):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(tiny_pipeline_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder, kind = resolve_model_folder("someone/some-ddpm")
    assert (folder, kind) == (tiny_pipeline_dir, "hub")
    assert calls and "unet/*.safetensors" in calls[0][1] and not any(p.endswith(".bin") for p in calls[0][1])
