"""What every numpy scheduler shares: the noise-schedule config (diffusers' field names), the beta
schedules, and the `StepOutput` returned by `step`.

Interface of a scheduler: `Scheduler.from_config(dict)` → `set_timesteps(n)` fills `timesteps`
(raw training time steps, int64, descending) → `step(model_output, timestep, sample, noise=None)`
returns `StepOutput(prev_sample, pred_original_sample)`. Arrays are numpy, shapes `[B, C, H, W]`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepOutput:
    """`prev_sample`: x_{t-1}, the next loop input. `pred_original_sample`: the model's x_0 estimate."""

    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True, kw_only=True)
class NoiseScheduleConfig:
    """The fields of a diffusers scheduler config that the numpy schedulers read (same names)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        """Refuse what no numpy scheduler here can honour, with the fix (configs are untrusted input)."""
        T = self.num_train_timesteps
        if not isinstance(T, int) or isinstance(T, bool) or not 1 <= T <= 1 << 20:
            raise ValueError(f"num_train_timesteps must be an integer in [1, 2^20], got {T!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} cannot be sampled; it must be one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not implemented; use one of "
                             f"{', '.join(BETA_SCHEDULES)} or trained_betas")
        if self.trained_betas is not None and len(self.trained_betas) != T:
            raise ValueError(f"trained_betas has {len(self.trained_betas)} values, num_train_timesteps is {T}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not supported; use one of "
                             f"{', '.join(SPACINGS)}")
        for name in ("beta_start", "beta_end", "clip_sample_range"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        betas = self.trained_betas if self.trained_betas is not None else (self.beta_start, self.beta_end)
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas):
            raise ValueError("betas (beta_start, beta_end or trained_betas) must lie in (0, 1)")
        if not isinstance(self.steps_offset, int) or not 0 <= self.steps_offset < T:
            raise ValueError(f"steps_offset must be an integer in [0, {T}), got {self.steps_offset!r}")

    @classmethod
    def from_config(cls, config: dict, **overrides):
        """Build from a diffusers `scheduler_config.json` dict; keys this class does not use are
        ignored (they belong to other schedulers), `overrides` win."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in {**config, **overrides}.items() if k in names}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(kw["trained_betas"])
        return cls(**kw)


def make_betas(cfg: NoiseScheduleConfig) -> np.ndarray:
    """Betas as diffusers computes them (float32)."""
    T = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, dtype=np.float32)
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float32)
    if cfg.beta_schedule == "scaled_linear":  # latent diffusion
        return (np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=np.float32) ** 2).astype(np.float32)
    if cfg.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal, improved DDPM, eq. (17)
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                        dtype=np.float32)
    raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not implemented; use one of {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod(cfg: NoiseScheduleConfig) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float32 as in diffusers."""
    return np.cumprod(1.0 - make_betas(cfg), axis=0, dtype=np.float32)


def spaced_timesteps(cfg: NoiseScheduleConfig, n: int) -> np.ndarray:
    """Descending inference time steps for DDPM/DDIM under `cfg.timestep_spacing` (diffusers' rules)."""
    T = cfg.num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n} must be between 1 and num_train_timesteps={T}")
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} is not supported; use 'linspace', "
                     f"'leading' or 'trailing'")


def predict_x0_eps(model_output: np.ndarray, sample: np.ndarray, alpha_prod_t, prediction_type: str):
    """(x̂_0, ε̂) from the model output, DDIM paper eq. (12) notation."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod_t ** 0.5 * model_output) / beta_prod_t ** 0.5
    if prediction_type == "v_prediction":
        return (alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output,
                alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample)
    raise ValueError(f"prediction_type {prediction_type!r} must be 'epsilon', 'sample' or 'v_prediction'")
