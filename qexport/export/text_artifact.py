"""The text-to-image roles of an artifact: tokenizer graph, text encoder and VAE decoder.

A text-to-image artifact holds, beside the U-Net graphs (which take `encoder_hidden_states`):
  - `tokenizer.onnx` (role `tokenizer`): prompt strings → CLIP token ids, onnxruntime-extensions'
    `CLIPTokenizer` op with the pipeline's own vocabulary (qexport.export.tokenizer_graph);
  - `text_encoder.onnx` (role `text-encoder`, FP32): token ids → the U-Net's text embeddings;
  - `vae_decoder.onnx` (role `vae-decoder`): latents / scaling_factor → images in [-1, 1], static
    int8 by default (`vae_bits`; the FP32 decoder stays as `vae_decoder_fp32.onnx`, role
    `vae-decoder-fp32`, the FP32 reference pipeline's), chosen by measurement (qexport.export.text_parts);
and `manifest.extra["text"]` says how to run them: token count, hidden size, default guidance,
the VAE scaling factor, the image shape and the CFG probes' prompts.
"""

from __future__ import annotations


import numpy as np
import torch

from ..zoo.loading import LoadedModel
from .artifact import ArtifactWriter

TOKENIZER_FILE = "tokenizer.onnx"
TEXT_ENCODER_FILE = "text_encoder.onnx"
VAE_DECODER_FILE = "vae_decoder.onnx"
PROBE_PROMPTS = ("the digit zero", "a handwritten seven")


def probe_context(model: LoadedModel) -> np.ndarray:
    """`[2·2, L, D]` CFG context of the golden probes: two unconditional rows, then two prompts."""
    from ..zoo.prompts import EMPTY_PROMPT
    from ..zoo.text_pipeline import encode

    cond = encode(model.text, list(PROBE_PROMPTS))
    uncond = encode(model.text, [EMPTY_PROMPT]).expand(len(PROBE_PROMPTS), -1, -1)
    return torch.cat([uncond, cond]).numpy().astype(np.float32)


def calibration_latents(model: LoadedModel, n: int = 64, steps: int = 25, seed: int = 0) -> np.ndarray:
    """Final latents of guided FP32 trajectories over the calibration prompts (already divided by the
    VAE scaling factor): what the VAE decoder sees in deployment."""
    from ..zoo.model_card import sample_torch

    z = sample_torch(model.denoiser(), model.scheduler_config, n, steps=steps, seed=seed)
    return (z / model.text.scaling_factor).astype(np.float32)


def write_text_roles(model: LoadedModel, w: ArtifactWriter, vae_bits: int = 8) -> dict:
    """Write the three text-to-image graphs into the artifact; return `manifest.extra["text"]`."""
    from .text_parts import export_text_encoder, export_vae_decoder, quantize_vae_decoder_static
    from .tokenizer_graph import build_tokenizer_graph
    import onnx

    text = model.text
    onnx.save(build_tokenizer_graph(text.tokenizer_dir, text.max_length), str(w.add(TOKENIZER_FILE, "tokenizer")))
    export_text_encoder(text.text_encoder, w.dir / TEXT_ENCODER_FILE, text.max_length)
    w.add(TEXT_ENCODER_FILE, "text-encoder")
    if vae_bits == 8:
        fp32 = w.dir / "vae_decoder_fp32.onnx"
        export_vae_decoder(text.vae, fp32)
        quantize_vae_decoder_static(fp32, w.dir / VAE_DECODER_FILE, calibration_latents(model))
        w.add(fp32.name, "vae-decoder-fp32")
    else:
        export_vae_decoder(text.vae, w.dir / VAE_DECODER_FILE)
    w.add(VAE_DECODER_FILE, "vae-decoder")
    vc = text.vae.config
    down = 2 ** (len(vc.block_out_channels) - 1)
    c, h, wd = model.sample_shape
    return dict(tokenizer=TOKENIZER_FILE, text_encoder=TEXT_ENCODER_FILE, vae_decoder=VAE_DECODER_FILE,
                vae_bits=vae_bits, max_length=text.max_length, hidden_size=text.hidden_size,
                guidance=text.guidance, scaling_factor=text.scaling_factor,
                image_shape=[int(vc.out_channels), h * down, wd * down], empty_prompt="",
                probe_prompts=list(PROBE_PROMPTS))
