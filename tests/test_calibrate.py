"""Calibrator: sources, observers, range methods, grouping, weights, table files, and the shipped model."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="calibration needs the toolchain extra")

from qexport.calibrate.api import CalibrationConfig, calibrate  # noqa: E402
from qexport.calibrate.observers import collect_statistics  # noqa: E402
from qexport.calibrate.sources import CalibrationSource, SourceConfig, samples_per_step  # noqa: E402
from qexport.errors import QexportError  # noqa: E402
from qexport.tables.build import TableConfig, build_table  # noqa: E402
from qexport.tables.grouping import partition  # noqa: E402
from qexport.tables.ranges import RangeConfig, quant_mse, range_from_hist  # noqa: E402
from qexport.tables.schema import QuantTable  # noqa: E402
from qexport.tables.weights import quantize_weight, weight_scales  # noqa: E402
from qexport.zoo.loading import load_model  # noqa: E402

from .conftest import SCHED, shipped_or_skip  # noqa: E402

FAST = SourceConfig(steps=10, samples=80, trajectories=8)


def amplitude(t: int) -> float:
    return 0.5 + 3.0 * (t / 1000) ** 2


class ScaledByT(torch.nn.Module):
    """A hand-built 'U-Net' whose conv input spans exactly [−a(t), a(t)] (known function of t)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        self.config = SimpleNamespace(sample_size=4, in_channels=1)

    def forward(self, sample, timestep):
        a = amplitude(int(timestep.reshape(-1)[0]))
        ramp = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4).expand(sample.shape[0], 1, 4, 4)
        self.conv(ramp * a)
        return SimpleNamespace(sample=torch.zeros_like(sample))


def test_known_function_of_t_is_recovered():
    src = CalibrationSource(SCHED, (1, 4, 4), SourceConfig(strategy="all", steps=20, trajectories=2))
    stats = collect_statistics(ScaledByT(), src, bins=256, progress=False)
    expected = np.array([amplitude(int(t)) for t in stats.timesteps])
    i = stats.site_index("conv")
    np.testing.assert_allclose(stats.max[i], expected, rtol=1e-6)
    np.testing.assert_allclose(stats.min[i], -expected, rtol=1e-6)
    cfg = TableConfig(groups=20, range=RangeConfig(method="minmax"))
    table = build_table(stats, 1000, {}, cfg)
    for t, a in zip(stats.timesteps, expected):  # fully per-step table: each step gets its own range
        g = table.group_of_t[t]
        assert table.range_hi[g, 0] == pytest.approx(a, rel=1e-6)
        assert table.range_lo[g, 0] == pytest.approx(-a, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_stats(tiny_pipeline_dir):
    model = load_model(str(tiny_pipeline_dir))
    table, stats = calibrate(model, CalibrationConfig(source=FAST, table=TableConfig(groups=1, range=RangeConfig(
        method="minmax"))), progress=False)
    return model, table, stats


def test_k1_table_equals_global_range(tiny_stats):
    _, table, stats = tiny_stats
    assert table.groups == 1 and set(table.group_of_t.tolist()) == {0}
    keep = [stats.sites.index(s) for s in table.sites]  # conv_in / conv_out stay float: no sites
    np.testing.assert_allclose(table.range_lo[0], stats.min[keep].min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(table.range_hi[0], stats.max[keep].max(axis=1), rtol=1e-6)


def test_sites_cover_convs_linears_attention_and_split_concats(tiny_stats):
    model, table, _ = tiny_stats
    sites = set(table.sites)
    convs = [n for n, m in model.unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for n in convs:
        assert (n in sites or f"{n}.part0" in sites) != (n in table.float_modules), n
    # the default: first and last layers, and the t-only branch (time MLP, time_emb_proj), stay float
    from qexport.tables.schema import is_time_branch

    assert [m for m in table.float_modules if not is_time_branch(m)] == ["conv_in", "conv_out"]
    assert {m for m in table.float_modules if is_time_branch(m)} == {n for n in convs if is_time_branch(n)}
    assert any(s.endswith(".qk.a") for s in sites) and any(s.endswith(".pv.b") for s in sites)
    split = [s for s in sites if s.endswith(".part1")]
    assert split and all("up_blocks" in s and "conv_shortcut" in s for s in split)


@pytest.mark.parametrize("k", [1, 3, 10, 1000])
def test_group_of_t_covers_all_timesteps(tiny_stats, k):
    model, _, stats = tiny_stats
    table = build_table(stats, 1000, {}, TableConfig(groups=k, range=RangeConfig(method="minmax")))
    g = table.group_of_t
    assert g.shape == (1000,) and g.min() == 0 and g.max() == table.groups - 1
    assert table.groups == min(k, len(stats.timesteps))
    assert np.all(np.diff(g) >= 0), "groups are contiguous in t"
    assert set(np.unique(g)) == set(range(table.groups))


def test_partition_is_optimal_on_a_small_case():
    rng = np.random.default_rng(0)
    cost = np.triu(rng.random((6, 6)) + np.arange(6)[None, :] * 0.1)
    cost[np.tril_indices(6, -1)] = np.inf
    group = partition(cost, 3)
    import itertools

    def total(cuts):
        bounds = [0, *cuts, 6]
        return sum(cost[a, b - 1] for a, b in zip(bounds[:-1], bounds[1:]))

    best = min(itertools.combinations(range(1, 6), 2), key=total)
    found = tuple(np.flatnonzero(np.diff(group)) + 1)
    assert total(found) == pytest.approx(total(best))


def test_uniform_and_ndtc_shapes():
    ts = np.arange(0, 1000, 20)[::-1]  # DDIM-50 time steps
    u = samples_per_step(SourceConfig(strategy="uniform", samples=1000, trajectories=1000), ts, 1000)
    assert u.sum() == 1000 and u.max() - u.min() <= 1
    n = samples_per_step(SourceConfig(strategy="ndtc", samples=4000, trajectories=4000), ts, 1000)
    t_mean = (n * ts).sum() / n.sum()
    assert t_mean < 400, f"NDTC should skew toward t→0, mean t = {t_mean:.0f}"
    low, high = n[ts < 333].sum(), n[ts >= 667].sum()
    assert low > 3 * high
    mode_t = ts[np.argmax(n)]
    assert 100 <= mode_t <= 400, mode_t   # peak near the configured mean 0.25·T
    a = samples_per_step(SourceConfig(strategy="all", trajectories=7), ts, 1000)
    assert np.all(a == 7)


def test_source_runs_only_the_trajectories_it_observes():
    """Uniform 30 samples over 10 steps keep 3 a step: 3 of 8 trajectories run, and what the observer
    sees is what the first 3 of all 8 would have shown (DDIM is deterministic, rows independent)."""
    def forward(log):
        def f(x, t, keep):
            log.append(x.shape[0])
            return torch.tanh(x) * (t / 1000.0)
        return f

    seen, full = [], []
    few = CalibrationSource(SCHED, (1, 4, 4), SourceConfig(samples=30, steps=10, trajectories=8))
    assert few.batch == 3 and few.num_samples == 30
    every = CalibrationSource(SCHED, (1, 4, 4), SourceConfig(strategy="all", steps=10, trajectories=8))
    assert every.batch == 8
    got = list(few.run(forward(seen)))
    ref = list(every.run(forward(full)))
    assert seen == [3] * 10 and full == [8] * 10
    for (t, x), (t_ref, x_ref) in zip(got, ref):
        assert t == t_ref and x.shape[0] == 3
        np.testing.assert_array_equal(x, x_ref[:3])


def test_histogram_matches_histc_but_for_edge_rounding():
    """The observers' bincount histogram keeps every element (the maximum in the top bin) and agrees
    with torch.histc except for elements within float rounding of a bin edge (one bin over)."""
    from qexport.calibrate.observers import histogram

    rng = np.random.default_rng(3)
    for scale, n in ((1.0, 200_000), (40.0, 50_000), (1e-3, 10_000)):
        x = torch.from_numpy((rng.standard_t(3, n) * scale).astype(np.float32))
        lo, hi = float(x.min()), float(x.max())
        h = histogram(x, lo, hi, 2048)
        ref = torch.histc(x, 2048, lo, hi).numpy()
        assert h.sum() == n and h[-1] >= 1 and h[0] >= 1
        moved = np.abs(np.cumsum(h) - np.cumsum(ref)).max()
        assert moved <= max(2, n * 1e-3), moved
    const = torch.full((7,), 2.5)
    assert histogram(const, 2.5, 2.5 + 1e-8, 16)[0] == 7
    assert histogram(torch.full((3,), 3e9), 3e9, 3e9, 16)[0] == 3   # lo + 1e-8 == lo at this magnitude


def test_mse_range_clips_rare_outliers():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(1_000_000), np.full(5, 60.0), np.full(5, -60.0)])
    counts, edges = np.histogram(x, bins=8192)
    counts = counts.astype(float)
    centers = 0.5 * (edges[1:] + edges[:-1])

    def err(lo, hi, bits):
        return quant_mse(centers, counts, lo, hi, bits)[0]

    # 4 bits: clipping the rare outliers wins by far
    lo, hi = range_from_hist(counts, centers, x.min(), x.max(), RangeConfig(method="mse", bits=4))
    assert hi < 10 and lo > -10
    assert err(lo, hi, 4) < 0.1 * err(x.min(), x.max(), 4)
    # 8 bits: the search is never worse than min/max or a percentile range
    lo8, hi8 = range_from_hist(counts, centers, x.min(), x.max(), RangeConfig(method="mse"))
    plo, phi = range_from_hist(counts, centers, x.min(), x.max(), RangeConfig(method="percentile", percentile=99.9))
    assert err(lo8, hi8, 8) <= min(err(x.min(), x.max(), 8), err(plo, phi, 8))
    assert np.mean(x > phi) == pytest.approx(0.001, abs=0.0003)
    assert np.mean(x < plo) == pytest.approx(0.001, abs=0.0003)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_scales_mse_beats_absmax(bits):
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=(16, 8, 3, 3)).astype(np.float32)
    s_mse, s_max = weight_scales(w, bits, mse=True), weight_scales(w, bits, mse=False)
    err = lambda s: ((w - quantize_weight(w, s, bits) * s.reshape(-1, 1, 1, 1)) ** 2).sum()  # noqa: E731
    assert err(s_mse) < err(s_max)
    q = quantize_weight(w, s_mse, bits)
    assert q.min() >= -(2 ** (bits - 1) - 1) and q.max() <= 2 ** (bits - 1) - 1


def test_first_last_layers_stay_8bit(tiny_stats):
    model, _, stats = tiny_stats
    from qexport.calibrate.api import unet_weights

    table = build_table(stats, 1000, unet_weights(model.unet),
                        TableConfig(groups=2, weight_bits=4, quantize_first_last=True))
    assert table.weight_bits["conv_in"] == 8 and table.weight_bits["conv_out"] == 8
    assert table.weight_bits["down_blocks.0.resnets.0.conv1"] == 4


def test_table_files_roundtrip_and_tamper(tiny_stats, tmp_path):
    _, table, _ = tiny_stats
    table.save(tmp_path / "t")
    back = QuantTable.load(tmp_path / "t")
    assert back.digest() == table.digest() and back.sites == table.sites
    index = json.loads((tmp_path / "t" / "tables.json").read_text())
    assert {"sites", "groups", "method", "act_bits", "weight_bits", "calibration"} <= set(index)
    index["sha256"] = "0" * 64
    (tmp_path / "t" / "tables.json").write_text(json.dumps(index))
    with pytest.raises(QexportError, match="sha256"):
        QuantTable.load(tmp_path / "t")


def test_config_rejects_unknown_keys():
    with pytest.raises(QexportError, match="unknown SourceConfig keys"):
        CalibrationConfig.from_dict({"source": {"stratgy": "uniform"}})
    with pytest.raises(QexportError, match="unknown RangeConfig keys"):
        CalibrationConfig.from_dict({"table": {"range": {"methd": "mse"}}})
    cfg = CalibrationConfig.from_dict({"source": {"steps": 7}, "table": {"groups": 3, "range": {"method": "minmax"}}})
    assert cfg.source.steps == 7 and cfg.table.groups == 3 and cfg.table.range.method == "minmax"


def test_per_step_tables_beat_static_on_shipped_model():
    """A real measurement: activation quantization MSE summed over a held-out trajectory (another
    seed than calibration), per-time-step tables (K=8) vs one static range (K=1)."""
    from qexport.eval.activation_error import activation_quant_mse
    from qexport.zoo.registry import MAIN_MODEL

    shipped_or_skip(MAIN_MODEL)
    model = load_model(MAIN_MODEL)
    cfg = CalibrationConfig(source=SourceConfig(steps=20, samples=320, trajectories=16),
                            table=TableConfig(groups=1, range=RangeConfig(method="minmax")))
    _, stats = calibrate(model, cfg, progress=False)
    table1 = build_table(stats, 1000, {}, TableConfig(groups=1, range=RangeConfig(method="minmax")))
    table8 = build_table(stats, 1000, {}, TableConfig(groups=8, range=RangeConfig(method="minmax")))
    res = activation_quant_mse(model.unet, model.scheduler_config, model.sample_shape,
                               {"k1": table1, "k8": table8}, steps=20, batch=8, seed=99)
    assert res["k8"]["total"] < 0.9 * res["k1"]["total"], (res["k8"]["total"], res["k1"]["total"])


def test_one_pass_histograms_match_two_pass_histograms_on_the_global_grid(tiny_stats):
    """The single calibration pass re-bins each step's own-range histogram onto the site's global grid:
    per (site, t) it keeps the mass and moves it by at most about one global bin."""
    import torch

    from qexport.calibrate.observers import rebin

    _, _, stats = tiny_stats
    assert np.allclose(stats.hist.sum(axis=2), stats.numel, rtol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = torch.from_numpy(rng.normal(rng.uniform(-1, 1), rng.uniform(0.01, 1), 20000).astype(np.float32))
        lo, hi = float(x.min()), float(x.max())
        glo, ghi = lo - 3.0, hi + 2.0
        direct = torch.histc(x, 2048, glo, ghi).numpy()
        via = rebin(torch.histc(x, 2048, lo, hi).numpy().astype(np.float64), lo, hi, glo, ghi)
        assert via.sum() == pytest.approx(direct.sum())
        width = (ghi - glo) / 2048
        cdf_err = np.abs(np.cumsum(via) - np.cumsum(direct)).max()
        assert cdf_err <= x.numel() * 0.01   # ≤ 1% of the mass displaced, and only within one bin
        centers = glo + width * (np.arange(2048) + 0.5)
        assert abs((via * centers).sum() / via.sum() - (direct * centers).sum() / direct.sum()) < width
