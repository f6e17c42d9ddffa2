"""Simulated (fake) quantization in torch with a `QuantTable`: the reference the ONNX graphs are
checked against, and the tool for measuring activation quantization error along trajectories.

`simulated(unet, table, weights=True)` is a context manager: inside it, every site's tensor is
quantized/dequantized with the table's parameters for the current time step (set by
`sim.set_timestep(t)` or automatically from the `timestep` argument of the forward), and Conv/Linear
weights are replaced by their dequantized integer weights (float16-rounded for the float t-only
branch, as the exported graphs store it; its time_emb_proj outputs rounded to the graphs' int8
table) and, with activations quantized too, a Conv2d's bias by its
int32 rounding at scale x_scale · w_scale of the current time-step group (what QLinearConv adds). `on_site(site, x, xq)` observes both; `quantizers`
maps sites to other quantizers `fn(x, t) -> xq` that replace the table's uniform one there.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..tables.schema import QuantTable
from ..tables.weights import weight_scales
from ..zoo.cost import time_embedding_dim
from ..zoo.guidance import inner_unet
from ..zoo.taps import install_taps, remove_taps


def fake_quant(x: torch.Tensor, scale: float, zero_point: int, bits: int = 8) -> torch.Tensor:
    """Unsigned affine quantize → dequantize, rounding half to even like ONNX QuantizeLinear."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 2 ** bits - 1)
    return (q - zero_point) * scale


class _Sim:
    def __init__(self, table: QuantTable, on_site=None, quantizers: dict | None = None):
        self.table, self.on_site, self.quantizers = table, on_site, quantizers or {}
        self.index = {s: i for i, s in enumerate(table.sites)}
        self.t = 0
        self.biases: dict[nn.Module, torch.Tensor] = {}   # module -> [K, C] bias per group
        self.group = None

    def set_timestep(self, t: int) -> None:
        self.t = int(t)
        g = int(self.table.group_of_t[self.t])
        if g != self.group:
            for m, per_group in self.biases.items():
                m.bias.data = per_group[g]
            self.group = g

    def integer_bias(self, name: str, m: nn.Module) -> None:
        """Give Conv2d `name` (input site `name`) the bias QLinearConv adds in every group."""
        i = self.index[name]
        b = m.bias.detach().double().numpy()
        scale = self.table.scale[:, i].astype(np.float32)[:, None] * self.table.weight_scale[name].astype(np.float32)
        q = np.clip(np.round(b[None, :] / scale), -2 ** 31, 2 ** 31 - 1)
        self.biases[m] = torch.from_numpy((q.astype(np.int32) * scale).astype(np.float32))

    def __call__(self, site: str, x: torch.Tensor) -> torch.Tensor:
        i = self.index.get(site)
        if i is None:
            return x
        if site in self.quantizers:
            xq = self.quantizers[site](x, self.t)
        else:
            scale, zp = self.table.params_at(self.t)
            xq = fake_quant(x, float(scale[i]), int(zp[i]), self.table.act_bits)
        if self.on_site is not None:
            self.on_site(site, x, xq)
        return xq


def _projection_table_hooks(unet: nn.Module, table: QuantTable) -> list:
    """Every float time_emb_proj's output rounded as the graphs' int8 [T, ΣC] table stores it: one symmetric
    scale per channel, its largest |value| over t / 127 (export.passes.tabulate_time_embedding)."""
    projections = {name: m for name, m in unet.named_modules()
                   if name.endswith("time_emb_proj") and isinstance(m, nn.Linear) and table.half_precision(name)}
    if not projections or not table.time_projection_table(time_embedding_dim(unet)):
        return []
    with torch.no_grad():
        t = torch.arange(table.num_train_timesteps)
        silu = nn.functional.silu(unet.time_embedding(unet.time_proj(t).to(unet.dtype)).half().float())
    hooks = []
    for m in projections.values():
        with torch.no_grad():
            scale = torch.from_numpy(weight_scales(m(silu).numpy().T, 8, mse=False))   # the export's rule
        hooks.append(m.register_forward_hook(
            lambda mod, a, out, s=scale: torch.clamp(torch.round(out / s), -127, 127) * s))
    return hooks


@contextmanager
def simulated(unet: nn.Module, table: QuantTable, weights: bool = True, activations: bool = True, on_site=None,
              quantizers: dict | None = None):
    sim = _Sim(table, on_site, quantizers)
    saved, saved_bias = {}, {}
    if weights:
        for name, m in inner_unet(unet).named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name in table.weight_scale:
                w = m.weight.detach().numpy()
                s = table.weight_scale[name]
                q = table.int_weight(name, w).astype(np.float32)
                saved[name] = m.weight.data.clone()
                m.weight.data = torch.from_numpy(q * s.reshape(-1, *([1] * (w.ndim - 1))))
                if activations and isinstance(m, nn.Conv2d) and m.bias is not None and name in sim.index:
                    saved_bias[name] = m.bias.data.clone()
                    sim.integer_bias(name, m)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and table.half_precision(name):
                saved[name] = m.weight.data.clone()
                m.weight.data = m.weight.data.half().float()
    time_embedding = getattr(inner_unet(unet), "time_embedding", None)
    tabulated = weights and table.time_embedding_table and time_embedding is not None
    # before the taps: the projections' scales come from a [T, D] forward no site observer should see
    handles = _projection_table_hooks(inner_unet(unet), table) if tabulated else []
    handles += install_taps(unet, sim if activations else None)
    if tabulated:   # the graphs' float16 lookup table
        handles.append(time_embedding.register_forward_hook(lambda m, a, out: out.half().float()))

    def pre(mod, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            sim.set_timestep(int(torch.as_tensor(t).reshape(-1)[0]))

    handles.append(unet.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield sim
    finally:
        remove_taps(handles)
        mods = dict(inner_unet(unet).named_modules())
        for name, w in saved.items():
            mods[name].weight.data = w
        for name, b in saved_bias.items():
            mods[name].bias.data = b
