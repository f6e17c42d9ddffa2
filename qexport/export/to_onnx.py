"""FP32 export of a diffusers U-Net to ONNX, with every quantization site marked.

`export_marked(unet, path)` writes a graph with inputs `sample [batch, C, H, W]` (float32) and
`timestep [1]` (int64, the raw training time step) and output `noise_pred`. Each site (see
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

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample


def export_marked(unet: nn.Module, path: str | Path, opset: int = OPSET) -> None:
    """Export `unet` (eval mode) with `qexport.Tap` markers at every site, batch dimension dynamic."""
    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    sample = torch.randn(2, c.in_channels, size, size)
    timestep = torch.tensor([500], dtype=torch.int64)
    handles = install_taps(unet, lambda site, x: _TapMark.apply(x, site))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _UNetWrapper(unet), (sample, timestep), str(path), dynamo=False, opset_version=opset,
                input_names=["sample", "timestep"], output_names=["noise_pred"],
                dynamic_axes={"sample": {0: "batch"}, "noise_pred": {0: "batch"}},
                custom_opsets={TAP_DOMAIN: 1}, do_constant_folding=True)
    finally:
        remove_taps(handles)
    log.debug("exported %s", path)
