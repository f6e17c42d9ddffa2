"""DDPM ancestral sampler in numpy (Ho et al. 2020, "Denoising Diffusion Probabilistic Models").

Ported from diffusers.schedulers.scheduling_ddpm.DDPMScheduler (set_timesteps / step), float32.

Notation (paper → code):
    ᾱ_t          -> alpha_prod_t,   β_t = 1 - ᾱ_t/ᾱ_{t-1} -> current_beta_t
    x̂_0          -> pred_original_sample
    μ̃_t(x_t, x̂_0) (formula 7) -> pred_prev_sample
    β̃_t (formula 7)           -> variance ("fixed_small"); β_t for "fixed_large"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import NoiseScheduleConfig, StepOutput, alphas_cumprod, predict_x0_eps, spaced_timesteps


@dataclass(frozen=True, kw_only=True)
class DDPMConfig(NoiseScheduleConfig):
    variance_type: str = "fixed_small"


class DDPMScheduler:
    order = 1

    def __init__(self, config: DDPMConfig):
        if config.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
            raise NotImplementedError(f"variance_type {config.variance_type!r} is not supported by the numpy "
                                      f"DDPM (learned variances need a second model output)")
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(config.num_train_timesteps)[::-1].copy().astype(np.int64)

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "DDPMScheduler":
        return cls(DDPMConfig.from_config(config, **overrides))

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.num_inference_steps = num_inference_steps
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)

    def previous_timestep(self, timestep: int) -> int:
        if self.num_inference_steps is None:
            return timestep - 1
        idx = int(np.flatnonzero(self.timesteps == timestep)[0])
        return -1 if idx == len(self.timesteps) - 1 else int(self.timesteps[idx + 1])

    def _variance(self, t: int) -> np.float32:
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1.0)
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        # β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t, formula (7); clamped so log() is defined
        variance = max((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, np.float32(1e-20))
        vt = self.config.variance_type
        if vt == "fixed_small_log":
            return np.exp(0.5 * np.log(variance))
        if vt == "fixed_large":
            return current_beta_t
        if vt == "fixed_large_log":
            return np.log(current_beta_t)
        return variance

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None, rng: np.random.Generator | None = None,
             model_output_variance: float = 0.0) -> StepOutput:
        """One ancestral step x_t → x_{t-1}; the noise is `noise` (or drawn from `rng`) when t > 0.

        `model_output_variance`: variance of a known random error in an ε prediction (a quantized
        model's residual noise); the step's noise variance is lowered by what that error already
        adds to x_{t-1} (never below zero), as PTQD does."""
        cfg = self.config
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        # 1. compute alphas, betas
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1.0)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        # 2. predicted original sample, formula (15)
        pred_original_sample, _ = predict_x0_eps(model_output, sample, alpha_prod_t, cfg.prediction_type)
        # 3. clip predicted x_0
        if cfg.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -cfg.clip_sample_range, cfg.clip_sample_range)
        # 4. coefficients of x_0 and x_t in μ̃_t, formula (7)
        pred_original_sample_coeff = alpha_prod_t_prev ** 0.5 * current_beta_t / beta_prod_t
        current_sample_coeff = current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t
        # 5. μ̃_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
        # 6. add noise σ_t z
        if t > 0:
            if noise is None:
                noise = (rng or np.random.default_rng()).standard_normal(sample.shape).astype(np.float32)
            if cfg.variance_type == "fixed_small_log":
                std = self._variance(t)
            else:
                std = self._variance(t) ** 0.5
            if model_output_variance > 0 and cfg.prediction_type == "epsilon":
                # x_{t-1} moves by c·δ for an error δ in ε: c = coeff(x_0) · ∂x̂_0/∂ε
                c = pred_original_sample_coeff * beta_prod_t ** 0.5 / alpha_prod_t ** 0.5
                std = max(std ** 2 - c ** 2 * model_output_variance, 0.0) ** 0.5
            pred_prev_sample = pred_prev_sample + std * noise
        return StepOutput(pred_prev_sample.astype(np.float32), pred_original_sample.astype(np.float32))
