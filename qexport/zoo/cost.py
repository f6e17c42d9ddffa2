"""Operations per U-Net call: 2 × the multiply-accumulates of its Conv2d, Linear and attention matmuls."""

from __future__ import annotations

from .taps import install_taps, remove_taps


def unet_ops(unet, sample_shape: tuple) -> float:
    """Operations (2 × multiply-accumulates) of Conv2d, Linear and attention matmuls for one sample
    (equal to torch.utils.flop_counter's count: tests/test_bench.py); sizes work such as the ε-correction fit."""
    import torch

    macs = [0]
    seen = {}

    def tap(site, x):
        if site.endswith((".qk.a", ".qk.b", ".pv.a", ".pv.b")):
            seen[site] = x.shape
            if site.endswith(".qk.b"):
                a = seen[site[:-1] + "a"]
                macs[0] += a[0] * a[1] * a[2] * x.shape[1]
            if site.endswith(".pv.b"):
                a = seen[site[:-1] + "a"]
                macs[0] += a[0] * a[1] * a[2] * x.shape[2]
        return x

    def conv_hook(m, args, out):
        w = m.weight
        macs[0] += out.numel() * (w.numel() // w.shape[0])

    # taps first: install_taps runs a probing forward pass of its own, which must not be counted
    handles = install_taps(unet, tap)
    macs[0] = 0
    hooks = [m.register_forward_hook(conv_hook) for m in unet.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            unet(torch.zeros(1, *sample_shape), torch.tensor([500]))
    finally:
        remove_taps(handles)
        for h in hooks:
            h.remove()
    return 2.0 * macs[0]


def _time_linears(unet, projections: bool = False) -> list:
    """The time MLP's Linears (`time_embedding`), and with `projections` every ResNet's `time_emb_proj`;
    [] without a time MLP."""
    import torch

    from .guidance import inner_unet

    unet = inner_unet(unet)
    emb = getattr(unet, "time_embedding", None)
    if emb is None:
        return []
    linears = [m for m in emb.modules() if isinstance(m, torch.nn.Linear)]
    if projections:
        linears += [m for name, m in unet.named_modules() if name.endswith("time_emb_proj") and isinstance(m, torch.nn.Linear)]
    return linears


def time_embedding_dim(unet) -> int:
    """Width D of the time MLP's output (`time_embedding`'s last Linear), 0 without one."""
    linears = _time_linears(unet)
    return linears[-1].out_features if linears else 0


def time_embedding_ops(unet, projections: bool = False) -> float:
    """Operations (2 × MAC) of the time MLP (`time_embedding`'s Linears) for one sample: what a graph whose
    time embedding is a lookup table (export.passes.tabulate_time_embedding) no longer computes per step;
    with `projections`, also every ResNet's `time_emb_proj` (looked up too: tables' time_projection_table)."""
    return 2.0 * sum(m.in_features * m.out_features for m in _time_linears(unet, projections))
