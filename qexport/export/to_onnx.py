"""FP32 export of a diffusers U-Net to ONNX, with every quantization site marked.

`export_marked(unet, path)` writes a graph with inputs `sample [batch, C, H, W]` (float32) and
`timestep [1]` (int64, the raw training time step) — and, for a text-conditioned U-Net,
`encoder_hidden_states [batch, L, D]` (float32; `context_shape=(L, D)`) — and output `noise_pred`. Each site (see
qexport.zoo.taps) appears as a `qexport.Tap` node carrying the site name in its `site` attribute;
the passes in qexport.export.passes replace them (by nothing for the FP32 reference graph, by a
QuantizeLinear/DequantizeLinear pair or an integer operator for the quantized graphs).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..zoo.guidance import inner_unet
from ..zoo.taps import install_taps, remove_taps

log = logging.getLogger(__name__)
TAP_DOMAIN = "qexport"
TAP_OP = "Tap"
OPSET = 17


class _TapMark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, site: str):
        return x

    @staticmethod
    def symbolic(g, x, site: str):
        return g.op(f"{TAP_DOMAIN}::{TAP_OP}", x, site_s=site).setType(x.type())


class _UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        if context:
            return self.unet(sample, timestep, encoder_hidden_states=context[0]).sample
        return self.unet(sample, timestep).sample


def export_marked(unet: nn.Module, path: str | Path, opset: int = OPSET,
                  context_shape: tuple[int, int] | None = None) -> None:
    """Export `unet` (eval mode) with `qexport.Tap` markers at every site, batch dimension dynamic;
    `context_shape` adds the `encoder_hidden_states` input of a text-conditioned U-Net."""
    unet = inner_unet(unet)
    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    args = (torch.randn(2, c.in_channels, size, size), torch.tensor([500], dtype=torch.int64))
    names, axes = ["sample", "timestep"], {"sample": {0: "batch"}, "noise_pred": {0: "batch"}}
    if context_shape is not None:
        args += (torch.randn(2, *context_shape),)
        names.append("encoder_hidden_states")
        axes["encoder_hidden_states"] = {0: "batch"}
    handles = install_taps(unet, lambda site, x: _TapMark.apply(x, site))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _UNetWrapper(unet), args, str(path), dynamo=False, opset_version=opset,
                input_names=names, output_names=["noise_pred"], dynamic_axes=axes,
                custom_opsets={TAP_DOMAIN: 1}, do_constant_folding=True)
    finally:
        remove_taps(handles)
    log.debug("exported %s", path)
