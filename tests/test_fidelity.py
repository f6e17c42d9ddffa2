"""Fidelity: the metrics (Fréchet distance, PSNR, SSIM), the ε correction fit and its use in the
sampler, error-accumulation curves and `qexport eval` end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest

from qexport_runtime.correction import Correction, fit_step
from qexport_runtime.schedulers import make_scheduler

from .conftest import SCHED


def test_frechet_distance_of_a_set_with_itself_is_zero_and_matches_the_closed_form():
    from qexport.eval.metrics import FeatureStats, frechet_distance

    rng = np.random.default_rng(0)
    f = rng.standard_normal((400, 16))
    f[:, 3] = 0.0                      # a dead ReLU feature: singular covariance
    assert frechet_distance(f, f) < 1e-9
    # two Gaussians with known parameters: FD = |Δμ|² + Σ (σ_a − σ_b)² for diagonal covariances
    a = FeatureStats(np.zeros(4), np.diag([1.0, 4.0, 9.0, 1.0]), 0)
    b = FeatureStats(np.ones(4), np.diag([4.0, 1.0, 1.0, 1.0]), 0)
    assert frechet_distance(a, b) == pytest.approx(4 + 1 + 1 + 4 + 0, rel=1e-9)


def test_fd_psnr_ssim_worsen_monotonically_as_samples_are_perturbed():
    """On the shipped classifier's features of real digits: more noise, larger FD, lower PSNR/SSIM."""
    pytest.importorskip("torch", reason="the digits classifier needs the toolchain extra")
    from qexport.eval.features import load_extractor
    from qexport.eval.metrics import frechet_distance, psnr, ssim
    from qexport.zoo.data import load_digits16

    from .conftest import shipped_or_skip

    shipped_or_skip("digits16-classifier")
    x = load_digits16("test")[0][:512]
    ext = load_extractor("digits16-classifier")
    base = ext.features(x)
    rng = np.random.default_rng(1)
    fds, psnrs, ssims = [], [], []
    for sigma in (0.0, 0.05, 0.1, 0.2, 0.4):
        y = np.clip(x + sigma * rng.standard_normal(x.shape).astype(np.float32), -1, 1)
        fds.append(frechet_distance(ext.features(y), base))
        psnrs.append(np.minimum(psnr(y, x), 100).mean())
        ssims.append(ssim(y, x).mean())
    assert fds[0] < 1e-6 and all(b > a for a, b in zip(fds, fds[1:])), fds
    assert all(b < a for a, b in zip(psnrs, psnrs[1:])), psnrs
    assert ssims[0] == pytest.approx(1.0) and all(b < a for a, b in zip(ssims, ssims[1:])), ssims


def test_ssim_matches_a_direct_window_by_window_computation():
    from qexport.eval.metrics import ssim

    rng = np.random.default_rng(2)
    a = rng.uniform(-1, 1, (2, 1, 12, 12))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), -1, 1)
    c1, c2, w = 0.02 ** 2, 0.06 ** 2, 7
    for n in range(2):
        vals = []
        for i in range(12 - w + 1):
            for j in range(12 - w + 1):
                p, q = a[n, 0, i:i + w, j:j + w].ravel(), b[n, 0, i:i + w, j:j + w].ravel()
                cov = np.cov(p, q)
                vals.append((2 * p.mean() * q.mean() + c1) * (2 * cov[0, 1] + c2)
                            / ((p.mean() ** 2 + q.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2)))
        assert ssim(a, b)[n] == pytest.approx(np.mean(vals), rel=1e-9)


def test_correction_fit_recovers_known_k_and_b():
    rng = np.random.default_rng(3)
    ts, ks, bs = [], [], []
    for t, k, b in [(10, 0.05, (0.02, -0.01)), (500, -0.03, (0.0, 0.03)), (990, 0.1, (-0.04, 0.0))]:
        eps = rng.standard_normal((64, 2, 8, 8))
        q = (1 + k) * eps + np.array(b).reshape(1, 2, 1, 1) + 0.01 * rng.standard_normal(eps.shape)
        k_hat, b_hat, var = fit_step(eps, q)
        assert k_hat == pytest.approx(k, abs=2e-3)
        np.testing.assert_allclose(b_hat, b, atol=2e-3)
        assert var == pytest.approx(1e-4, rel=0.1)
        ts.append(t), ks.append(k_hat), bs.append(b_hat)
        # applying the fit undoes the correlated part: what is left is the residual only
        c = Correction(np.array([t]), np.array([k_hat]), np.array([b_hat]), np.array([var]))
        fixed, left = c.apply(q.astype(np.float32), t)
        assert np.sqrt(((fixed - eps) ** 2).mean()) < 0.0105
        assert left == pytest.approx(var / (1 + k_hat) ** 2)
    c = Correction(np.array(ts), np.array(ks), np.array(bs), np.array([1e-4] * 3))
    assert c.at(255)[0] == pytest.approx((ks[0] + ks[1]) / 2, rel=1e-6)   # linear in t between fits


def test_correction_round_trips_through_json(tmp_path):
    c = Correction(np.array([0, 500]), np.array([0.1, -0.2]), np.array([[0.01], [0.02]]), np.array([1e-4, 2e-4]),
                   enabled=False, fit=dict(heldout_gain=-0.01))
    c.save(tmp_path / "c.json")
    d = Correction.load(tmp_path / "c.json")
    assert not d.enabled and d.fit["heldout_gain"] == -0.01
    np.testing.assert_allclose(d.bias, c.bias)


@pytest.mark.parametrize("name,overrides", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_step_absorbs_the_residual_variance(name, overrides):
    """ε carrying an error of variance v plus the step's lowered noise gives x_{t-1} the variance
    the exact ε and the full noise give (clip_sample off, so the step is linear in ε)."""
    sched = make_scheduler(name, {**SCHED, "clip_sample": False}, **overrides)
    sched.set_timesteps(50)
    t = int(sched.timesteps[20])
    x, eps = np.zeros((20000, 1, 1, 1), np.float32), np.zeros((20000, 1, 1, 1), np.float32)
    zero = np.zeros_like(x)
    c = float(sched.step(eps + 1, t, x, noise=zero).prev_sample.flat[0] - sched.step(eps, t, x, noise=zero).prev_sample.flat[0])
    exact = sched.step(eps, t, x, rng=np.random.default_rng(5)).prev_sample.var()
    v = 0.5 * exact / c ** 2            # the ε error carries half of the step's noise variance
    noisy = eps + np.sqrt(v) * np.random.default_rng(4).standard_normal(eps.shape).astype(np.float32)
    absorbed = sched.step(noisy, t, x, rng=np.random.default_rng(5), model_output_variance=v).prev_sample.var()
    not_absorbed = sched.step(noisy, t, x, rng=np.random.default_rng(5)).prev_sample.var()
    assert absorbed == pytest.approx(exact, rel=0.03)
    assert not_absorbed == pytest.approx(1.5 * exact, rel=0.03)


@pytest.fixture(scope="module")
def small_artifact(tiny_pipeline_dir, tmp_path_factory):
    pytest.importorskip("torch", reason="convert needs the toolchain extra")
    from qexport.calibrate.api import CalibrationConfig
    from qexport.calibrate.sources import SourceConfig
    from qexport.export.pipeline import convert
    from qexport.tables.build import TableConfig

    cal = CalibrationConfig(source=SourceConfig(steps=10, samples=60, trajectories=6), table=TableConfig(groups=2))
    out = tmp_path_factory.mktemp("fid") / "art"
    return convert(str(tiny_pipeline_dir), out, calibration=cal, correction="on", progress=False)


def test_convert_stores_a_correction_that_the_sampler_applies(small_artifact):
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.correction import load_correction
    from qexport_runtime.sampler import Sampler

    art = load_artifact(small_artifact)
    assert art.manifest.files_with_role("correction") == ["correction.json"]
    c = load_correction(art)
    assert c.enabled and len(c.timesteps) == 50 and art.manifest.extra["correction"]["enabled"]
    on = Sampler(art, role="int", correction=True)
    off = Sampler(art, role="int", correction=False)
    assert on.correction is not None and off.correction is None
    assert Sampler(art, role="fp32").correction is None            # never applied to the FP32 graph
    a, b = on.sample(5, batch=2, seed=0).images, off.sample(5, batch=2, seed=0).images
    assert np.abs(a - b).max() > 0


def test_error_curves_are_zero_for_fp32_against_itself_and_positive_for_int(small_artifact):
    from qexport.eval.accumulation import error_curves

    c = error_curves(small_artifact, role="int", samples=4, steps=5)
    assert len(c["trajectory_rmse"]) == len(c["eps_rmse"]) == 5
    assert min(c["eps_rmse"]) > 0 and c["final_rmse"] > 0
    same = error_curves(small_artifact, role="fp32", samples=4, steps=5)
    assert max(same["trajectory_rmse"]) == 0 and max(same["eps_rmse"]) == 0


def fake_extractor():
    """A feature extractor for 16×16 inputs that needs no shipped model: pooled pixels, sign labels."""
    class Pooled:
        name, real_stats = "pooled", None

        def features(self, x):
            return x.reshape(len(x), 4, 4, 4, 4).mean(axis=(2, 4)).reshape(len(x), -1)

        def labels(self, x):
            return (x.mean(axis=(1, 2, 3)) > 0).astype(int)
    return Pooled()


def test_cli_eval_reports_every_metric(small_artifact, tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "qexport.cli.main", "eval", str(small_artifact), "--samples", "24",
                        "--steps", "4", "--batch", "12", "--features", "tests.test_fidelity:fake_extractor",
                        "--json", str(out), "--png", str(tmp_path / "pair.png"), "--curves", str(tmp_path / "c.png")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    for key in ("fd_to_fp32", "seed_floor", "fd_to_fp32_pct_floor", "label_agreement", "psnr_db", "ssim"):
        assert rep[key] is not None and np.isfinite(rep[key]), key
    assert rep["fd_to_fp32_pct_floor"] == pytest.approx(100 * rep["fd_to_fp32"] / rep["seed_floor"])
    assert rep["fd_to_real"] is None            # this extractor has no real-data statistics
    assert (tmp_path / "pair.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "qexport.cli.main", "eval", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


def test_correction_work_is_bounded_for_large_models():
    """plan_work: the shipped-size model keeps the full fit and decision; a cifar-size U-Net (12.4 GOP per
    call) drops to 20 steps and the floors, near the budget instead of 18 times over it."""
    from qexport.export.correction import CorrectionConfig, plan_work

    cfg = CorrectionConfig()
    small = plan_work(cfg, 0.131)
    assert (small.trajectories, small.steps, small.heldout) == (cfg.trajectories, cfg.steps, cfg.heldout)
    big = plan_work(cfg, 12.44)
    full = plan_work(dataclasses_replace(cfg, work_gop=1e12), 12.44)
    assert full.work_gop > 15 * cfg.work_gop
    assert big.steps == cfg.min_steps and big.trajectories >= cfg.min_trajectories and big.heldout >= cfg.min_heldout
    assert big.work_gop <= 1.05 * cfg.work_gop


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_gain_interval_brackets_the_gain_and_narrows_with_seeds():
    from qexport.export.correction import gain_interval, pooled_gain

    rng = np.random.default_rng(1)
    for n, width in ((16, None), (256, None)):
        raw = rng.gamma(4.0, 1.0, n)
        cor = raw * rng.normal(0.8, 0.1, n) ** 2           # ~20% lower RMS per seed
        lo, hi = gain_interval(raw, cor, 0.95)
        assert lo < pooled_gain(raw, cor) < hi
        assert gain_interval(raw, cor, 0.95) == (lo, hi)   # deterministic: artifacts stay reproducible
        if n == 16:
            w16 = hi - lo
    assert hi - lo < w16 / 2


def test_convert_records_the_decisions_seeds_and_interval(small_artifact):
    from qexport_runtime.artifact import load_artifact

    fit = load_artifact(small_artifact).manifest.extra["correction"]
    lo, hi = fit["heldout_gain_interval"]
    assert lo <= fit["heldout_gain"] <= hi and fit["confidence"] == 0.95
    assert 16 <= fit["heldout_seeds"] <= 128 and fit["decided_early"] == (fit["heldout_seeds"] < 128)
    assert fit["work_gop"] > 0
