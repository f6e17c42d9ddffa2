"""Parity of the numpy schedulers with diffusers' own, step by step over whole trajectories."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity needs diffusers/torch (toolchain extra)")
diffusers = pytest.importorskip("diffusers")

from qexport_runtime.schedulers import make_scheduler  # noqa: E402

CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
              prediction_type="epsilon", clip_sample=True, variance_type="fixed_small")


_AC = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def _fake_model(x: np.ndarray, t: int) -> np.ndarray:
    """The optimal ε-prediction for data ~ N(0, 0.5²), plus a small nonlinearity: trajectories stay
    O(1) like a trained model's, so an absolute tolerance of 1e-5 means float32-level agreement."""
    a = _AC[t]
    return (np.sqrt(1 - a) * x / (0.25 * a + 1 - a) + 0.05 * np.tanh(3 * x)).astype(np.float32)


def _trajectory_parity(name, ref_cls, n_steps, step_kwargs, extra_cfg=None):
    cfg = {**CONFIG, **(extra_cfg or {})}
    ours = make_scheduler(name, cfg)
    ref = ref_cls.from_config(cfg)
    ours.set_timesteps(n_steps)
    ref.set_timesteps(n_steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(0)
    x_ours = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    x_ref = torch.from_numpy(x_ours.copy())
    worst = 0.0
    for i, t in enumerate(ours.timesteps):
        noise = rng.standard_normal(x_ours.shape).astype(np.float32)
        out_ours = ours.step(_fake_model(x_ours, int(t)), int(t), x_ours, noise=noise)
        kw = step_kwargs(noise)
        out_ref = ref.step(torch.from_numpy(_fake_model(x_ref.numpy(), int(t))), int(t), x_ref, **kw)
        # feed each side its own output: errors would accumulate over the trajectory
        diff = np.abs(out_ours.prev_sample - out_ref.prev_sample.numpy()).max()
        worst = max(worst, float(diff))
        x_ours, x_ref = out_ours.prev_sample, out_ref.prev_sample
    assert worst <= 1e-5, f"{name}: max abs diff {worst:.2e} over {n_steps} steps"


@pytest.mark.parametrize("n_steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_parity(n_steps, eta, spacing):
    def kw(noise):
        return dict(eta=eta, variance_noise=torch.from_numpy(noise))

    _trajectory_parity("ddim", diffusers.DDIMScheduler, n_steps, kw,
                       extra_cfg={"timestep_spacing": spacing} if eta == 0 else {"timestep_spacing": spacing, "eta": eta})


@pytest.mark.parametrize("n_steps", [20, 100])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "fixed_small_log"])
def test_ddpm_parity(n_steps, variance_type, monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as mod

    box = {}  # diffusers' DDPM draws its noise with randn_tensor: make it draw ours
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **_: torch.from_numpy(box["noise"]))

    def kw(noise):
        box["noise"] = noise
        return {}

    _trajectory_parity("ddpm", diffusers.DDPMScheduler, n_steps, kw, {"variance_type": variance_type})


@pytest.mark.parametrize("n_steps", [10, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmsolver_parity(n_steps, prediction_type):
    _trajectory_parity("dpmsolver++", diffusers.DPMSolverMultistepScheduler, n_steps, lambda noise: {},
                       {"prediction_type": prediction_type})


def test_step_before_set_timesteps_raises():
    s = make_scheduler("ddim", CONFIG)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(np.zeros((1, 1, 2, 2), np.float32), 999, np.zeros((1, 1, 2, 2), np.float32))


def test_unknown_scheduler_and_schedule():
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("euler", CONFIG)
    with pytest.raises(ValueError, match="beta_schedule"):
        make_scheduler("ddim", {**CONFIG, "beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type 'flow'"):   # refused when built, not mid-loop
        make_scheduler("ddpm", {**CONFIG, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_scheduler("ddim", {**CONFIG, "num_train_timesteps": "1000"})
