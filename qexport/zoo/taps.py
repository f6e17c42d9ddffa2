"""Tap points: the tensors qexport quantizes, named by *site*, marked the same way for calibration,
simulation and export.

A site is a string naming one quantized activation tensor:
  - `<module>`                  the input of a Conv2d / Linear (e.g. `down_blocks.0.resnets.0.conv1`);
  - `<module>.part<k>`          part k of a skip concatenation that feeds a Conv2d (split quantization);
  - `<module>.out`              the output of a Conv2d *with* its bias (QLinearConv adds an int32
                                bias inside the integer kernel), of a Linear *before* its bias
                                (QLinearMatMul has none: the float bias is added after dequantizing);
  - `<attn>.qk.a` / `<attn>.qk.b`  the operands of Q·Kᵀ (query already multiplied by the softmax scale);
  - `<attn>.pv.a` / `<attn>.pv.b`  the operands of softmax(·)·V;
  - `<attn>.qk.out` / `<attn>.pv.out`  the products.

`install_taps(unet, fn)` makes every site call `fn(site, tensor) -> tensor` during forward: an
observer records statistics, a fake-quantizer rounds, the exporter marks the ONNX graph.
`remove_taps(handles)` undoes it.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from .guidance import dummy_context, inner_unet

TapFn = Callable[[str, torch.Tensor], torch.Tensor]


class TapAttnProcessor:
    """diffusers' classic attention (AttnProcessor) with explicit matmuls and tap points on their operands."""

    def __init__(self, name: str, fn: TapFn | None):
        self.name, self.fn = name, fn

    def _tap(self, suffix: str, x: torch.Tensor) -> torch.Tensor:
        return self.fn(f"{self.name}.{suffix}", x) if self.fn is not None else x

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, seq_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        q = self._tap("qk.a", query * attn.scale)
        kt = self._tap("qk.b", key).transpose(-1, -2)
        scores = self._tap("qk.out", torch.matmul(q, kt))
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self._tap("pv.a", scores.softmax(dim=-1))
        hidden_states = self._tap("pv.out", torch.matmul(probs, self._tap("pv.b", value)))
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def probe_structure(unet: nn.Module) -> tuple[dict[str, list[int]], set[str]]:
    """One dry forward that finds (1) the channel sizes of the skip concatenations feeding each
    up-path ResNet's 1x1 shortcut conv, `{"up_blocks.0.resnets.0.conv_shortcut": [c_hidden, c_skip]}`
    (diffusers concatenates `[hidden_states, res_hidden_states]` inside the up block), and (2) the
    Conv/Linear modules whose output *is* the model's output (their `.out` is not a site: the
    model's result stays float)."""
    unet = inner_unet(unet)
    splits: dict[str, list[int]] = {}
    outputs: dict[int, str] = {}
    if not hasattr(unet, "config"):
        return splits, set()
    handles = []
    for bname, block in unet.named_modules():
        if isinstance(block, (nn.Conv2d, nn.Linear)):
            handles.append(block.register_forward_hook(
                lambda m, a, out, name=bname: outputs.__setitem__(id(out), name)))
        if not bname.startswith("up_blocks.") or bname.count(".") != 1 or not hasattr(block, "resnets"):
            continue

        def pre_hook(mod, args, kwargs, bname=bname):
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            for j, resnet in enumerate(mod.resnets):
                if getattr(resnet, "conv_shortcut", None) is not None and res is not None:
                    skip = res[-1 - j].shape[1]
                    splits[f"{bname}.resnets.{j}.conv_shortcut"] = [resnet.in_channels - skip, skip]

        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        c = unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        with torch.no_grad():
            result = unet(torch.zeros(1, c.in_channels, size, size), torch.tensor([0]), **dummy_context(unet))
    finally:
        for h in handles:
            h.remove()
    final = getattr(result, "sample", result)
    return splits, {outputs[id(final)]} if id(final) in outputs else set()


def install_taps(unet: nn.Module, fn: TapFn | None) -> list:
    """Route every site of `unet` through `fn` (see the module docstring). Returns hook handles."""
    from diffusers.models.attention_processor import Attention

    unet = inner_unet(unet)
    splits, final = probe_structure(unet)
    handles = []
    for name, mod in unet.named_modules():
        if isinstance(mod, Attention):
            mod.set_processor(TapAttnProcessor(name, fn))
            handles.append(("attn", mod))
        elif isinstance(mod, (nn.Conv2d, nn.Linear)) and fn is not None:
            parts = splits.get(name)

            def hook(m, args, name=name, parts=parts):
                x = args[0]
                if parts:
                    xs = torch.split(x, parts, dim=1)
                    x = torch.cat([fn(f"{name}.part{k}", p) for k, p in enumerate(xs)], dim=1)
                else:
                    x = fn(name, x)
                return (x, *args[1:])

            handles.append(mod.register_forward_pre_hook(hook))
            if name not in final:
                handles.append(mod.register_forward_hook(partial(_out_hook, fn=fn, site=f"{name}.out")))
    return handles


def _out_hook(mod, args, out, fn, site):
    if mod.bias is None or isinstance(mod, nn.Conv2d):
        return fn(site, out)
    return fn(site, out - mod.bias) + mod.bias


def remove_taps(handles: list) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    for h in handles:
        if isinstance(h, tuple):
            h[1].set_processor(AttnProcessor())
        else:
            h.remove()


def conv_linear_sites(unet: nn.Module) -> list[str]:
    """Module names of every Conv2d / Linear (their input is a site, or split into `.part<k>` sites)."""
    return [n for n, m in inner_unet(unet).named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
