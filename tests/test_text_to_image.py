"""Text-to-image: SD-layout pipeline folders load, convert to one artifact, and sample from a prompt
with the runtime alone — the same images diffusers' own StableDiffusionPipeline draws."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the toolchain extra")
pytest.importorskip("transformers", reason="needs the toolchain extra")
pytest.importorskip("onnxruntime_extensions", reason="the tokenizer graph needs onnxruntime-extensions")

from qexport.errors import QexportError  # noqa: E402

from .conftest import shipped_or_skip  # noqa: E402
from .test_runtime_without_torch import run_blocked  # noqa: E402


def test_missing_parts_are_named(tiny_text_pipeline_dir, tmp_path):
    from qexport.zoo.loading import load_model

    bad = tmp_path / "p"
    shutil.copytree(tiny_text_pipeline_dir, bad)
    shutil.rmtree(bad / "text_encoder")
    with pytest.raises(QexportError, match="lacks text_encoder/"):
        load_model(str(bad))
    with pytest.raises(QexportError, match="whole Stable Diffusion pipeline folder"):
        load_model(str(tiny_text_pipeline_dir / "unet"))


def test_pickle_text_encoder_refused(tiny_text_pipeline_dir, tmp_path):
    from qexport.zoo.loading import load_model

    bad = tmp_path / "p"
    shutil.copytree(tiny_text_pipeline_dir, bad)
    (bad / "text_encoder" / "model.safetensors").rename(bad / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(QexportError, match="pickle"):
        load_model(str(bad))


def test_artifact_holds_the_text_roles(t2i_artifact):
    import onnx

    from qexport_runtime.artifact import load_artifact

    m = load_artifact(t2i_artifact).manifest
    roles = {e.role for e in m.files.values()}
    assert {"tokenizer", "text-encoder", "vae-decoder", "int", "qdq", "fp32", "probes"} <= roles
    assert m.extra["text"]["image_shape"] == [1, 32, 32] and m.sample_shape == [4, 8, 8]
    assert [i.name for i in onnx.load(str(t2i_artifact / "unet_int.onnx")).graph.input] == \
        ["sample", "timestep", "encoder_hidden_states"]


def test_runtime_equals_diffusers_pipeline(tiny_text_pipeline_dir, t2i_artifact):
    """The runtime's FP32 path (tokenizer graph, text encoder, CFG, numpy DDIM, VAE) against diffusers'
    StableDiffusionPipeline from the same initial latents: a wrong token id, CFG order, scheduler
    offset or scaling factor would move the images by far more than the tolerance."""
    import torch
    from diffusers import StableDiffusionPipeline

    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.sampler import initial_noise
    from qexport_runtime.text2image import TextToImage

    prompts = ["the digit three", "a handwritten seven"]
    ours = TextToImage(load_artifact(t2i_artifact), role="fp32", threads=1).generate(prompts, guidance=3.0,
                                                                                      steps=6, batch=2, seed=5)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_text_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(initial_noise((2, 4, 8, 8), 5))
    ref = pipe(prompts, height=32, width=32, num_inference_steps=6, guidance_scale=3.0, latents=latents,
               output_type="np").images                                   # [B, H, W, C] in [0, 1]
    ref = ref.transpose(0, 3, 1, 2) * 2 - 1
    assert np.abs(ours.images - ref).max() < 2e-3, np.abs(ours.images - ref).max()
    other = TextToImage(load_artifact(t2i_artifact), role="fp32", threads=1).generate(
        prompts[::-1], guidance=3.0, steps=6, batch=2, seed=5)
    assert np.abs(other.images - ref).max() > 1e-2   # the prompts matter: the check above can fail


def test_prompt_to_png_without_torch_or_transformers(t2i_artifact, tmp_path):
    out = run_blocked(f"""
        import sys, json
        from qexport_runtime.__main__ import main
        rc = main(["sample", {str(t2i_artifact)!r}, "--prompt", "the digit four", "--guidance", "4", "--steps", "5",
                   "--batch", "2", "--seed", "1", "-o", {str(tmp_path / 'o')!r}])
        heavy = [m for m in ("torch", "diffusers", "onnx", "transformers") if m in sys.modules]
        print(json.dumps(dict(rc=rc, heavy=heavy)))
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"rc": 0' in out.stdout and '"heavy": []' in out.stdout
    images = np.load(tmp_path / "o" / "samples.npy")
    assert images.shape == (2, 1, 32, 32) and np.isfinite(images).all()
    assert (tmp_path / "o" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "o" / "sample.json").read_text())
    assert summary["check"]["ok"], summary["check"]
    assert summary["prompt"] == "the digit four" and summary["unet_step_ms_median"] > 0


def test_unconditional_options_refused(tiny_text_pipeline_dir, tmp_path):
    from qexport.export.pipeline import convert

    with pytest.raises(QexportError, match="not available for text-to-image"):
        convert(str(tiny_text_pipeline_dir), tmp_path / "x", pipeline_graph=True, progress=False)
    assert not (tmp_path / "x").exists()


def test_sampling_a_text_artifact_needs_a_prompt(t2i_artifact, tmp_path):
    from qexport_runtime.__main__ import main

    assert main(["sample", str(t2i_artifact), "-o", str(tmp_path / "o"), "--steps", "2"]) == 2


def test_shipped_text_model_fidelity_floor(tmp_path):
    """The shipped text model's W8A8 artifact keeps the FP32 model's prompt adherence (100 samples,
    10 prompts, CFG, DDIM-25): an untrained or broken U-Net draws the prompted digit ~10% of the time."""
    from qexport.eval.fidelity import FidelityConfig, evaluate
    from qexport.export.pipeline import convert

    shipped_or_skip("digits32-t2i")
    shipped_or_skip("digits16-classifier")
    art = convert("digits32-t2i", tmp_path / "w8", bits=8, progress=False)
    rep, _ = evaluate(art, FidelityConfig(samples=100, steps=25, batch=50), progress=False)
    print(f"\n{rep['isa']}: adherence int {rep['prompt_adherence']:.1%} fp32 {rep['prompt_adherence_fp32']:.1%}, "
          f"FD {rep['fd_to_fp32']:.3f} ({rep['fd_to_fp32_pct_floor']:.2f}% of floor), PSNR {rep['psnr_db']:.1f} dB")
    assert rep["check"]["ok"]
    assert rep["prompt_adherence_fp32"] >= 0.8
    assert rep["prompt_adherence"] >= rep["prompt_adherence_fp32"] - 0.05


def test_bench_reports_each_phase(t2i_artifact, capsys):
    from qexport_runtime.__main__ import main
    from qexport_runtime.bench import bench

    r = bench([str(t2i_artifact)], steps=3, threads=1, memory=False)
    assert r["kind"] == "text-to-image" and r["settings"]["cfg_batch"] == 2
    by = {x["role"]: x for x in r["results"]}
    assert set(by) == {"int", "fp32"} and by["int"]["check"]["ok"]
    for x in by.values():
        assert x["text_ms"] > 0 and x["unet_step_ms_median"] > 0 and x["vae_ms"] > 0
        assert x["generate_ms"] > 3 * x["unet_step_ms_median"]
    assert main(["bench", str(t2i_artifact), "--steps", "2", "--no-memory", "--threads", "1"]) == 0
    assert "VAE ms" in capsys.readouterr().out
