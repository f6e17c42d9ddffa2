"""ONNX export of the text-to-image side parts: CLIP text encoder, VAE decoder, and its static int8.

A Stable-Diffusion-style pipeline folder has, besides the U-Net, a `text_encoder/` (transformers
`CLIPTextModel`) and a `vae/` (diffusers `AutoencoderKL`). These functions write them with the same
interfaces as optimum's `text_encoder/model.onnx` and `vae_decoder/model.onnx`:

- `export_text_encoder(text_encoder, path, max_length)`: input `input_ids` int64 [batch, max_length],
  outputs `last_hidden_state` float32 [batch, max_length, hidden] (the U-Net's
  `encoder_hidden_states`) and `pooler_output` float32 [batch, hidden] (the state at the EOS token).
- `export_vae_decoder(vae, path)`: input `latent_sample` float32 [batch, C, h, w], output `sample`
  float32 [batch, out_channels, H, W]; it is `vae.decode(z).sample` (post_quant_conv + decoder), so
  the caller divides the U-Net's latents by `vae.config.scaling_factor` first.
- `quantize_vae_decoder_static(fp32_path, out_path, calibration_latents)`: the decoder as a static
  int8 QDQ graph made by onnxruntime's `quantize_static` (see its docstring for the options).

The batch dimension is dynamic in every graph. Export uses the TorchScript exporter (`dynamo=False`)
as qexport.export.to_onnx does.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
OPSET = 17


class _TextEncoderWrapper(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _VaeDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=True).sample


def _export(module: nn.Module, args: tuple, path: str | Path, opset: int, input_names: list[str],
            output_names: list[str], dynamic_axes: dict) -> None:
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    log.debug("exported %s", path)


def export_text_encoder(text_encoder: nn.Module, path: str | Path, max_length: int, opset: int = OPSET) -> None:
    """Export a transformers `CLIPTextModel` (eval mode): `input_ids` int64 [batch, max_length] ->
    `last_hidden_state` [batch, max_length, hidden], `pooler_output` [batch, hidden]."""
    n_pos = text_encoder.config.max_position_embeddings
    if not 0 < max_length <= n_pos:
        raise ValueError(f"max_length {max_length} must be in 1..{n_pos} (the model's max_position_embeddings)")
    text_encoder.eval()
    ids = torch.randint(0, text_encoder.config.vocab_size, (2, max_length), dtype=torch.int64)
    ids[:, -1] = text_encoder.config.eos_token_id
    _export(_TextEncoderWrapper(text_encoder), (ids,), path, opset, ["input_ids"],
            ["last_hidden_state", "pooler_output"],
            {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}})


def vae_latent_shape(vae: nn.Module) -> tuple[int, int, int]:
    """(latent channels, h, w) of `vae`: sample_size / 2**(number of down blocks - 1)."""
    c = vae.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    f = 2 ** (len(c.block_out_channels) - 1)
    return c.latent_channels, size // f, size // f


def export_vae_decoder(vae: nn.Module, path: str | Path, opset: int = OPSET) -> None:
    """Export the decoder half of a diffusers `AutoencoderKL` (eval mode): `latent_sample` [batch, C, h, w]
    (latents already divided by scaling_factor) -> `sample` [batch, out_channels, H, W]."""
    vae.eval()
    z = torch.randn(2, *vae_latent_shape(vae))
    _export(_VaeDecoderWrapper(vae), (z,), path, opset, ["latent_sample"], ["sample"],
            {"latent_sample": {0: "batch"}, "sample": {0: "batch"}})


class _LatentReader:
    """onnxruntime CalibrationDataReader over `latents` [N, C, h, w] in batches."""

    def __init__(self, latents: np.ndarray, batch: int = 16):
        self._batches = [np.ascontiguousarray(latents[i:i + batch], dtype=np.float32)
                         for i in range(0, len(latents), batch)]
        self._it = iter(self._batches)

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {"latent_sample": b}

    def rewind(self):
        self._it = iter(self._batches)


# The decoder's first convolutions (post_quant_conv, then decoder.conv_in: they see the latents
# themselves) and its last (decoder.conv_out: writes the pixels); names as export_vae_decoder writes them.
FLOAT_CONVS = ("/post_quant_conv/Conv", "/decoder/conv_in/Conv", "/decoder/conv_out/Conv")


def quantize_vae_decoder_static(fp32_path: str | Path, out_path: str | Path, calibration_latents: np.ndarray,
                                keep_first_last_float: bool = True) -> None:
    """Static int8 QDQ quantization of an exported VAE decoder (`export_vae_decoder`), calibrated (MinMax)
    on `calibration_latents` [N, C, h, w] (the decoder's own input: latents / scaling_factor).

    Options, and why (figures: int8 vs FP32 decoder PSNR on the latents of 256 held-out digits, the
    digits32-t2i VAE, calibrated on 128 other digits, ORT 1.32 on an AVX2 host without VNNI; "emulated"
    = the same QDQ graph run as float math on dequantized values, what VNNI / AMX / arm64 kernels give):

    - `QuantFormat.QDQ`, uint8 activations (asymmetric, `ActivationSymmetric=False`: SiLU and
      GroupNorm outputs are far from symmetric) and int8 weights, symmetric (`WeightSymmetric=True`,
      zero point 0) per output channel (`per_channel=True`): ORT's recommended CPU layout, fused into
      integer kernels (u8s8 on x86) when the session is created.
    - `reduce_range=True`: weights in 7 bits ([-64, 64]); it affects weights only, activations keep the
      full uint8 range. On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) MLAS multiplies uint8
      activations by int8 weights with VPMADDUBSW, which adds the products of two consecutive weights
      into a *saturating* int16; with |w| <= 64 a pair is at most 255 * 128 = 32640 < 32767, so the
      integer kernels are exact on every CPU. Measured: 8-bit weights give 48.6 dB emulated but 38.7 dB
      on this host's integer kernels (45.6 / 31.6 dB with every Conv quantized); 7-bit weights give
      48.1 dB on both. ORT's other remedy, the session option `session.x64quantprecision=1` (u8u8
      kernels; 48.6 dB here), belongs to whoever runs the graph, not to the graph: a caller that forgets
      it gets the saturated result silently, and ORT applies it only to some constant-weight kernels.
      So the graph is made safe by itself, for 0.4 dB.
    - `op_types_to_quantize=["Conv", "MatMul"]`: the compute. Quantizing every op ORT can (Add, Mul of
      the SiLUs, InstanceNormalization, Resize, ...) adds QDQ pairs that cost accuracy (41.5 vs 43.7 dB,
      first/last layers quantized in both) and size (+41%), and on a barely trained VAE gave a graph that
      ORT failed to load at ORT_ENABLE_EXTENDED.
    - `keep_first_last_float`: the convolutions in `FLOAT_CONVS` stay FP32 (43.7 -> 48.1 dB for 0.6% of
      the MACs), as qexport does for the U-Net's conv_in / conv_out.
    - MinMax calibration: Percentile (99.999%) gained 0.7 dB (with first/last quantized) for 2.5x the
      calibration time; not worth it next to the first/last choice.
    - The graph first goes through `quant_pre_process` (symbolic shape inference, ORT's basic fusions
      folding the export's shape arithmetic), as the ORT quantization docs recommend (same accuracy,
      a 6% smaller file).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        exclude = []
        if keep_first_last_float:
            convs = {n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"}
            exclude = [n for n in FLOAT_CONVS if n in convs]
            if len(exclude) != len(FLOAT_CONVS):
                raise ValueError(f"{fp32_path}: not a graph from export_vae_decoder (no Conv nodes "
                                 f"{sorted(set(FLOAT_CONVS) - convs)})")
        quantize_static(
            str(pre), str(out_path), _LatentReader(calibration_latents),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul"], nodes_to_exclude=exclude,
            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    log.debug("quantized %s -> %s", fp32_path, out_path)
