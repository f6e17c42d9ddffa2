"""Shared fixtures: a tiny random U-Net saved in diffusers layouts, and the shipped main model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCHED = dict(_class_name="DDPMScheduler", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
             beta_schedule="linear", prediction_type="epsilon", clip_sample=True, variance_type="fixed_small")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A random 16x16 digits-architecture U-Net (width 8) saved as a diffusers pipeline folder."""
    torch = pytest.importorskip("torch", reason="needs the toolchain extra")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from qexport.zoo.architectures import digits_unet_config

    torch.manual_seed(0)
    cfg = {**digits_unet_config(8), "norm_num_groups": 4}
    pipe = DDPMPipeline(unet=UNet2DModel(**cfg), scheduler=DDPMScheduler.from_config(SCHED))
    out = tmp_path_factory.mktemp("tiny") / "pipeline"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_unet_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The same U-Net as a single model folder with scheduler_config.json beside config.json."""
    import shutil

    out = tmp_path_factory.mktemp("tiny") / "unet"
    shutil.copytree(tiny_pipeline_dir / "unet", out)
    (out / "scheduler_config.json").write_text(json.dumps(SCHED))
    return out


def shipped_or_skip(name: str):
    from qexport.zoo.registry import get_shipped

    m = get_shipped(name)
    if m is None or not m.is_present():
        pytest.skip(f"shipped model {name} is not present (train it with python -m qexport.zoo.train)")
    return m


@pytest.fixture(scope="session")
def tiny_artifact(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny U-Net converted with the defaults (reduced calibration, no ε correction): an artifact for
    runtime tests that need a real one quickly. Tests copy it before changing it."""
    pytest.importorskip("torch", reason="building the artifact needs the toolchain extra")
    from qexport.calibrate.api import CalibrationConfig
    from qexport.calibrate.sources import SourceConfig
    from qexport.export.pipeline import convert

    return convert(str(tiny_pipeline_dir), tmp_path_factory.mktemp("tiny-art") / "art", correction="off",
                   calibration=CalibrationConfig(source=SourceConfig(steps=10, samples=40, trajectories=4)),
                   progress=False)


@pytest.fixture(scope="session")
def tiny_text_pipeline_dir(tmp_path_factory) -> Path:
    """A random Stable-Diffusion-layout pipeline (the shipped text-to-image architecture, untrained)."""
    torch = pytest.importorskip("torch", reason="needs the toolchain extra")
    pytest.importorskip("transformers", reason="needs the toolchain extra")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from qexport.zoo import bpe, prompts
    from qexport.zoo.architectures import (T2I_MAX_TOKENS, t2i_scheduler_config, t2i_text_config, t2i_unet_config,
                                           t2i_vae_config)

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-t2i") / "pipeline"
    vocab, merges = bpe.learn(prompts.corpus(), 200)
    bpe.save(out / "tokenizer", vocab, merges, T2I_MAX_TOKENS)
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**t2i_vae_config()), unet=UNet2DConditionModel(**t2i_unet_config()),
        text_encoder=CLIPTextModel(CLIPTextConfig(**t2i_text_config(len(tok), tok.bos_token_id, tok.eos_token_id))),
        tokenizer=tok, scheduler=DDIMScheduler.from_config(t2i_scheduler_config()), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def t2i_artifact(tiny_text_pipeline_dir, tmp_path_factory):
    """The random text pipeline converted at W8A8 with a small calibration set (shared by the text tests)."""
    pytest.importorskip("onnxruntime_extensions", reason="the tokenizer graph needs onnxruntime-extensions")
    from qexport.calibrate.api import CalibrationConfig
    from qexport.calibrate.sources import SourceConfig
    from qexport.export.pipeline import ConvertConfig, convert

    # FP32 VAE decoder: the random VAE saturates most pixels, and its int8 copy would turn a single int8
    # rounding flip of the U-Net into image differences as large as another prompt's (tests/test_optimum_layout.py
    # compares end to end); the int8 VAE default is exercised on the shipped model's converts.
    cal = CalibrationConfig(source=SourceConfig(samples=64, trajectories=4, steps=8))
    return convert(str(tiny_text_pipeline_dir), tmp_path_factory.mktemp("t2i") / "w8",
                   ConvertConfig(bits=8, calibration=cal, vae_bits=32), progress=False)
