"""Learned weight rounding: the exact layer objective, better-than-nearest reconstruction, integer
validity, untouched float weights, determinism, and `weight_int` in table files."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="learned rounding needs the toolchain extra")
F = torch.nn.functional

from qexport.calibrate.api import CalibrationConfig, calibrate  # noqa: E402
from qexport.calibrate.rounding import (LayerMoments, RoundingConfig, learn_rounding,  # noqa: E402
                                        learn_weight_rounding, round_layer)
from qexport.calibrate.sources import SourceConfig  # noqa: E402
from qexport.tables.build import TableConfig  # noqa: E402
from qexport.tables.schema import QuantTable  # noqa: E402
from qexport.tables.weights import quantize_weight, weight_scales  # noqa: E402
from qexport.zoo.loading import load_model  # noqa: E402

FAST = RoundingConfig(samples=12, trajectories=3, steps=4, iters=40, chunk=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one torch thread is as fast, and immune to OpenMP spinning on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smooth_images(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    """Spatially and cross-channel correlated inputs (blurred noise mixed across channels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="circular"), 5, stride=1)
    mix = torch.eye(c) + 0.8 * torch.randn(c, c, generator=g) / c ** 0.5
    return torch.einsum("dc,nchw->ndhw", mix, x)


def layer_error(mod, w_q, x_q, x_fp) -> float:
    """Mean over output rows (positions) of ‖W x − W̃ x̃‖², computed directly."""
    if isinstance(mod, torch.nn.Linear):
        ref, out = F.linear(x_fp, mod.weight), F.linear(x_q, w_q)
        return float(((ref - out) ** 2).sum() / ref.reshape(-1, ref.shape[-1]).shape[0])
    kw = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
    ref, out = F.conv2d(x_fp, mod.weight, **kw), F.conv2d(x_q, w_q, **kw)
    return float(((ref - out) ** 2).sum() / (ref.shape[0] * ref.shape[2] * ref.shape[3]))


@pytest.mark.parametrize("kind", ["conv", "conv-stride2-groups2", "linear"])
def test_moments_give_the_exact_layer_objective(kind):
    torch.manual_seed(0)
    if kind == "linear":
        mod = torch.nn.Linear(12, 6)
        x = torch.randn(5, 7, 12)
    else:
        mod = torch.nn.Conv2d(8, 6, 3, padding=1, **({} if kind == "conv" else dict(stride=2, groups=2)))
        x = smooth_images(5, 8, 9, seed=1)
    x_q = x + 0.05 * torch.randn_like(x)           # quantized-model input ≠ FP32 input (sequential case)
    w_q = mod.weight + 0.02 * torch.randn_like(mod.weight)
    m = LayerMoments(mod, mod.weight)
    for i in range(0, 5, 2):                        # chunked accumulation
        m.add(x_q[i:i + 2], x[i:i + 2])
    with torch.no_grad():
        assert m.objective(w_q) == pytest.approx(layer_error(mod, w_q, x_q, x), rel=1e-4)
        same = LayerMoments(mod, mod.weight)
        same.add(x)
        assert same.objective(w_q) == pytest.approx(layer_error(mod, w_q, x, x), rel=1e-4)


def test_learned_rounding_beats_nearest_on_correlated_conv_inputs():
    torch.manual_seed(0)
    mod = torch.nn.Conv2d(16, 8, 3, padding=1)
    x = smooth_images(32, 16, 12, seed=2)
    w = mod.weight.detach()
    scale = weight_scales(w.numpy(), 4)
    m = LayerMoments(mod, w)
    m.add(x)
    ints, info = round_layer(w, scale, 4, m, RoundingConfig(iters=300))
    s = torch.from_numpy(scale).reshape(-1, 1, 1, 1)
    nearest = torch.from_numpy(quantize_weight(w.numpy(), scale, 4).astype(np.float32)) * s
    learned = torch.from_numpy(ints.astype(np.float32)) * s
    with torch.no_grad():
        e_near, e_learn = layer_error(mod, nearest, x, x), layer_error(mod, learned, x, x)
    assert info["kept_learned"] and e_learn < 0.7 * e_near, (e_near, e_learn)
    assert info["learned"] == pytest.approx(e_learn, rel=1e-4)


@pytest.fixture(scope="module")
def tiny_w4(tiny_pipeline_dir):
    model = load_model(str(tiny_pipeline_dir))
    cfg = CalibrationConfig(source=SourceConfig(steps=6, samples=24, trajectories=4),
                            table=TableConfig(weight_bits=4, groups=2))
    table, _ = calibrate(model, cfg, progress=False)
    return model, table


def check_ints(model, table, ints, bits=(4,)):
    mods = dict(model.unet.named_modules())
    expected = {n for n, b in table.weight_bits.items() if b in bits}
    assert set(ints) == expected and expected
    for name, q in ints.items():
        w = mods[name].weight.detach().numpy()
        qmax = 2 ** (table.weight_bits[name] - 1) - 1
        r = w / table.weight_scale[name].reshape(-1, *([1] * (w.ndim - 1)))
        lo, hi = np.clip(np.floor(r), -qmax, qmax), np.clip(np.ceil(r), -qmax, qmax)
        assert q.dtype == np.int8 and q.shape == w.shape
        assert np.all((q == lo) | (q == hi)), name
        assert np.abs(q).max() <= qmax


@pytest.mark.parametrize("variant", [dict(), dict(quant_inputs=False), dict(sequential=False, quant_inputs=False)])
def test_unet_integers_are_floor_or_ceil_and_weights_restored(tiny_w4, variant):
    model, table = tiny_w4
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    report = {}
    ints = learn_weight_rounding(model, table, dataclasses.replace(FAST, **variant), progress=False, report=report)
    check_ints(model, table, ints)
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # per layer, on its own calibration objective, never worse than round-to-nearest
    assert all(r["learned"] <= r["nearest"] * (1 + 1e-9) or not r["kept_learned"]
               for k, r in report.items() if k != "_total")
    assert any(r["changed"] > 0 for k, r in report.items() if k != "_total")


def test_deterministic_and_restores_weights_on_error(tiny_w4):
    model, table = tiny_w4
    a = learn_weight_rounding(model, table, FAST, progress=False)
    b = learn_weight_rounding(model, table, FAST, progress=False)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    calls = []

    def fail_midway(mod, args):   # the learning pass fails after earlier layers were swapped in
        calls.append(1)
        if len(calls) > 2:          # two forwards pass (trajectories, FP32 inputs); the third fails
            raise RuntimeError("boom")

    mid = dict(model.unet.named_modules())["mid_block.resnets.0.conv2"]
    h = mid.register_forward_pre_hook(fail_midway)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            learn_rounding(model.unet, table, dataclasses.replace(FAST, steps=1, samples=2), progress=False,
                           scheduler_config=model.scheduler_config, sample_shape=model.sample_shape)
    finally:
        h.remove()
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


def test_only_requested_bits_are_learned(tiny_w4):
    model, table = tiny_w4
    assert learn_weight_rounding(model, table, dataclasses.replace(FAST, bits=(8,), iters=5),
                                 progress=False).keys() == {n for n, b in table.weight_bits.items() if b == 8}


def test_table_files_round_trip_weight_int(tiny_w4, tmp_path):
    model, table = tiny_w4
    ints = learn_weight_rounding(model, table, dataclasses.replace(FAST, iters=10), progress=False)
    learned = dataclasses.replace(table, weight_int=ints)
    learned.save(tmp_path)
    loaded = QuantTable.load(tmp_path)
    assert loaded.weight_int.keys() == ints.keys()
    mods = dict(model.unet.named_modules())
    for k, v in ints.items():
        assert loaded.weight_int[k].dtype == np.int8 and np.array_equal(loaded.weight_int[k], v)
        w = mods[k].weight.detach().numpy()
        assert np.array_equal(loaded.int_weight(k, w), v)
    assert loaded.digest() == learned.digest() != table.digest()
