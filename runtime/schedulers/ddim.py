"""DDIM sampler in numpy (Song et al. 2021, "Denoising Diffusion Implicit Models").

Ported from diffusers.schedulers.scheduling_ddim.DDIMScheduler (set_timesteps / step), float32.

Notation (paper → code):
    ᾱ_t          -> alpha_prod_t
    x_t          -> sample
    ε_θ(x_t, t)  -> model_output (for prediction_type "epsilon")
    f_θ(x_t) = x̂_0 -> pred_original_sample
    σ_t(η)       -> std_dev_t
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import NoiseScheduleConfig, StepOutput, alphas_cumprod, predict_x0_eps, spaced_timesteps


@dataclass(frozen=True, kw_only=True)
class DDIMConfig(NoiseScheduleConfig):
    set_alpha_to_one: bool = True
    eta: float = 0.0


class DDIMScheduler:
    order = 1

    def __init__(self, config: DDIMConfig):
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray | None = None

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "DDIMScheduler":
        return cls(DDIMConfig.from_config(config, **overrides))

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.num_inference_steps = num_inference_steps
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None, rng: np.random.Generator | None = None,
             model_output_variance: float = 0.0) -> StepOutput:
        """One reverse step x_t → x_{t-1}. With η > 0 the added noise is `noise` (or drawn from `rng`),
        its variance lowered by what a known ε error of variance `model_output_variance` already adds."""
        if self.num_inference_steps is None:
            raise RuntimeError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                               "creating the scheduler")
        cfg = self.config
        # 1. get previous step value (=t-1)
        prev_timestep = timestep - cfg.num_train_timesteps // self.num_inference_steps
        # 2. compute alphas, betas
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        # 3. predicted original sample from the predicted noise, "predicted x_0" of formula (12)
        pred_original_sample, pred_epsilon = predict_x0_eps(model_output, sample, alpha_prod_t, cfg.prediction_type)
        # 4. clip "predicted x_0"
        if cfg.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -cfg.clip_sample_range, cfg.clip_sample_range)
        # 5. variance σ_t(η)², formula (16)
        variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = cfg.eta * variance ** 0.5
        # 6. "direction pointing to x_t" of formula (12)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * pred_epsilon
        # 7. x_{t-1} without the random noise, formula (12)
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
        if cfg.eta > 0:
            if noise is None:
                noise = (rng or np.random.default_rng()).standard_normal(sample.shape).astype(np.float32)
            if model_output_variance > 0 and cfg.prediction_type == "epsilon":
                c = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 - (alpha_prod_t_prev / alpha_prod_t * beta_prod_t) ** 0.5
                std_dev_t = max(std_dev_t ** 2 - c ** 2 * model_output_variance, 0.0) ** 0.5
            prev_sample = prev_sample + std_dev_t * noise
        return StepOutput(prev_sample.astype(np.float32), pred_original_sample.astype(np.float32))
