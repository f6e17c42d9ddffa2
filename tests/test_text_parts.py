"""Text-to-image side parts: the CLIP text encoder and VAE decoder exports match PyTorch, and the
static int8 VAE decoder stays close to the FP32 one on latents of real digits."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs the toolchain extra")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402

from qexport.export.text_parts import (export_text_encoder, export_vae_decoder,  # noqa: E402
                                       quantize_vae_decoder_static, vae_latent_shape)
from qexport.zoo.architectures import T2I_MAX_TOKENS, t2i_text_config, t2i_vae_config  # noqa: E402

T2I_DIR = Path(__file__).resolve().parents[1] / "qexport" / "zoo" / "shipped" / "digits32-t2i"
# int8 decoder vs FP32 decoder on 256 held-out digits: measured 48.1 dB (AVX2 host, ORT 1.32). Below
# the floor: 8-bit weights on an AVX2 host (u8s8 saturation) 38.7 dB, random decoder weights 4.9 dB,
# the right decoder on other digits' latents 11.7 dB.
PSNR_FLOOR_DB = 44.0
EXPORT_TOL = 1e-4


def _session(path, optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * np.log10(4.0 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="module")
def t2i_dir() -> Path:
    """The shipped text-to-image pipeline folder, once its VAE stage has been trained."""
    if _trained("vae") is None:
        pytest.skip(f"{T2I_DIR.name}: vae/diffusion_pytorch_model.safetensors not present yet "
                    "(train it with python -m qexport.zoo.train_t2i)")
    return T2I_DIR


def _trained(part: str) -> Path | None:
    d = T2I_DIR / part
    name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return d if (d / name).is_file() else None


@pytest.fixture(scope="module")
def text_encoder():
    """The shipped model's text encoder when trained, else a random one of the same architecture."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.set_num_threads(1)
    d = _trained("text_encoder")
    if d is not None:
        return "shipped", CLIPTextModel.from_pretrained(d).eval()
    torch.manual_seed(0)
    return "random", CLIPTextModel(CLIPTextConfig(**t2i_text_config(583, 581, 582))).eval()


@pytest.fixture(scope="module")
def vae():
    """The shipped model's VAE when trained, else a random one of the same architecture."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    d = _trained("vae")
    if d is not None:
        return "shipped", AutoencoderKL.from_pretrained(d).eval()
    torch.manual_seed(0)
    return "random", AutoencoderKL(**t2i_vae_config()).eval()


@pytest.fixture(scope="module")
def vae_decoder_onnx(vae, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae") / "vae_decoder.onnx"
    export_vae_decoder(vae[1], path)
    return path


def test_text_encoder_export_matches_torch(text_encoder, tmp_path):
    source, te = text_encoder
    path = tmp_path / "text_encoder.onnx"
    export_text_encoder(te, path, max_length=T2I_MAX_TOKENS)
    s = _session(path)
    assert [(i.name, i.type, i.shape) for i in s.get_inputs()] == \
        [("input_ids", "tensor(int64)", ["batch", T2I_MAX_TOKENS])]
    assert [o.name for o in s.get_outputs()] == ["last_hidden_state", "pooler_output"]
    gen = torch.Generator().manual_seed(1)
    eos = te.config.eos_token_id
    for batch in (1, 3):
        ids = torch.randint(0, te.config.vocab_size, (batch, T2I_MAX_TOKENS), generator=gen)
        ids[:, 0] = te.config.bos_token_id
        ids[0, 4:] = eos                                   # a padded prompt: EOS at 4, padding after
        with torch.no_grad():
            ref = te(input_ids=ids)
        hidden, pooled = s.run(None, {"input_ids": ids.numpy()})
        assert hidden.shape == (batch, T2I_MAX_TOKENS, te.config.hidden_size)
        assert pooled.shape == (batch, te.config.hidden_size)
        d_h = float(np.abs(hidden - ref.last_hidden_state.numpy()).max())
        d_p = float(np.abs(pooled - ref.pooler_output.numpy()).max())
        print(f"text encoder ({source} weights) batch {batch}: max |diff| last_hidden_state {d_h:.2e}, "
              f"pooler_output {d_p:.2e}")
        assert d_h < EXPORT_TOL and d_p < EXPORT_TOL


def test_text_encoder_rejects_too_long_max_length(text_encoder, tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        export_text_encoder(text_encoder[1], tmp_path / "te.onnx", max_length=T2I_MAX_TOKENS + 1)


def test_vae_decoder_export_matches_torch(vae, vae_decoder_onnx):
    source, vae = vae
    s = _session(vae_decoder_onnx)
    c, h, w = vae_latent_shape(vae)
    assert (c, h, w) == (4, 8, 8)
    assert [(i.name, i.shape) for i in s.get_inputs()] == [("latent_sample", ["batch", c, h, w])]
    assert [o.name for o in s.get_outputs()] == ["sample"]
    gen = torch.Generator().manual_seed(2)
    for batch in (1, 3):
        z = torch.randn(batch, c, h, w, generator=gen)
        with torch.no_grad():
            ref = vae.decode(z).sample.numpy()
        out = s.run(None, {"latent_sample": z.numpy()})[0]
        assert out.shape == (batch, vae.config.out_channels, 32, 32)
        d = float(np.abs(out - ref).max())
        print(f"VAE decoder ({source} weights) batch {batch}: max |diff| {d:.2e}")
        assert d < EXPORT_TOL


def test_int8_vae_decoder_psnr(t2i_dir, vae, vae_decoder_onnx, tmp_path):
    """Static int8 decoder vs the FP32 decoder (both ONNX, this CPU's default kernels) on the latents of
    256 held-out digits; calibrated on the latents of 128 other held-out digits."""
    from qexport.zoo.data import load_digits

    assert vae[0] == "shipped"
    vae = vae[1]
    x_test, _ = load_digits(32, "test")
    with torch.no_grad():
        z_all = vae.encode(torch.from_numpy(x_test[:384])).latent_dist.mean.numpy()
    z, z_cal = z_all[:256], z_all[256:]                     # evaluate on 256 digits, calibrate on 128 others
    fp32, int8 = vae_decoder_onnx, tmp_path / "vae_decoder.int8.onnx"
    quantize_vae_decoder_static(fp32, int8, z_cal)

    ref = _session(fp32).run(None, {"latent_sample": z})[0]
    s8 = _session(int8)
    out = s8.run(None, {"latent_sample": z})[0]
    psnr = _psnr(out, ref)
    # the same graph as float math on the dequantized values (no integer kernels: what a CPU without
    # u8s8 saturation computes)
    emulated = _session(int8, optimize=False).run(None, {"latent_sample": z})[0]
    psnr_emulated = _psnr(emulated, ref)
    psnr_images = _psnr(ref, x_test[:256])
    sizes = fp32.stat().st_size, int8.stat().st_size
    print(f"int8 VAE decoder: PSNR vs FP32 decoder {psnr:.2f} dB on 256 test digits (as float math on "
          f"dequantized values: {psnr_emulated:.2f} dB; FP32 decoder vs the digits: {psnr_images:.2f} dB); "
          f"size FP32 {sizes[0]} B, int8 {sizes[1]} B (x{sizes[0] / sizes[1]:.2f} smaller)")
    assert psnr > PSNR_FLOOR_DB
    assert abs(psnr - psnr_emulated) < 0.5, "this CPU's integer kernels disagree with the QDQ math (saturation?)"

    # the floor discriminates: the int8 decoder on other digits' latents is far below it
    wrong = s8.run(None, {"latent_sample": np.roll(z, 1, axis=0)})[0]
    assert _psnr(wrong, ref) < PSNR_FLOOR_DB - 10

    # a real QDQ graph: integer weights, and 7-bit ones (safe from u8s8 saturation on x86 without VNNI)
    m = onnx.load(str(int8))
    q = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    n_conv = sum(n.op_type == "Conv" for n in m.graph.node)
    assert len(q) >= n_conv - 3 > 0                        # 3 convolutions stay FP32
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in q) <= 64
