"""DPM-Solver++(2M) in numpy (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling").

Ported from diffusers.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler with
algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero".

Notation (paper → code):
    α_t, σ_t      -> alpha_t, sigma_t  (σ_t/α_t = sigmas[i])
    λ_t = log(α_t/σ_t) -> lambda_t;  h = λ_t − λ_s
    x_θ(x_t, t)   -> data prediction (converted model output)
    D0, D1        -> the multistep first and second differences, Algorithm 2
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import NoiseScheduleConfig, StepOutput, alphas_cumprod, predict_x0_eps


@dataclass(frozen=True, kw_only=True)
class DPMSolverConfig(NoiseScheduleConfig):
    timestep_spacing: str = "linspace"
    clip_sample: bool = False  # DPM-Solver++ uses thresholding, not clipping; not applied here


class DPMSolverMultistepScheduler:
    order = 2

    def __init__(self, config: DPMSolverConfig):
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray | None = None

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "DPMSolverMultistepScheduler":
        return cls(DPMSolverConfig.from_config(config, **overrides))

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg, T, n = self.config, self.config.num_train_timesteps, num_inference_steps
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps={n} must be between 1 and num_train_timesteps={T}")
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].copy().astype(np.int64) + cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            ts = np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} is not supported")
        ac = self.alphas_cumprod  # float32, as diffusers computes the sigmas
        all_sigmas = ((1 - ac) / ac) ** 0.5
        sigmas = np.interp(ts, np.arange(len(all_sigmas)), all_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # final_sigmas_type="zero"
        self.timesteps = ts
        self.num_inference_steps = len(ts)
        self.model_outputs: list[np.ndarray | None] = [None, None]
        self.lower_order_nums = 0
        self.step_index: int | None = None

    @staticmethod
    def _alpha_sigma(sigma):
        alpha_t = 1.0 / (sigma ** 2 + 1) ** 0.5
        return alpha_t, sigma * alpha_t

    def _lambda(self, i: int):
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        with np.errstate(divide="ignore"):
            return alpha, sigma, np.log(alpha) - np.log(sigma)

    def _first_order(self, x0: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self.step_index
        alpha_t, sigma_t, lambda_t = self._lambda(i + 1)
        _, sigma_s, lambda_s = self._lambda(i)
        h = lambda_t - lambda_s
        # DPM-Solver++ first order = DDIM in data prediction, eq. (5)
        return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * x0

    def _second_order(self, sample: np.ndarray) -> np.ndarray:
        i = self.step_index
        alpha_t, sigma_t, lambda_t = self._lambda(i + 1)
        _, sigma_s0, lambda_s0 = self._lambda(i)
        _, _, lambda_s1 = self._lambda(i - 1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        # multistep second-order update, Algorithm 2 ("midpoint" form)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1)

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None, rng: np.random.Generator | None = None) -> StepOutput:
        """One multistep update. Deterministic (`noise`/`rng` are accepted for a uniform interface)."""
        if self.num_inference_steps is None:
            raise RuntimeError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                               "creating the scheduler")
        if self.step_index is None:
            self.step_index = int(np.flatnonzero(self.timesteps == timestep)[0])
        n = len(self.timesteps)
        lower_order_final = self.step_index == n - 1  # final sigma is zero: always first order at the end
        # convert the model output to a data prediction x_θ, eq. (4)
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[self.step_index])
        if self.config.prediction_type == "epsilon":
            x0 = (sample - sigma_s * model_output) / alpha_s
        else:
            x0, _ = predict_x0_eps(model_output, sample, alpha_s ** 2, self.config.prediction_type)
        self.model_outputs = [self.model_outputs[-1], x0]
        if self.lower_order_nums < 1 or lower_order_final:
            prev = self._first_order(x0, sample)
        else:
            prev = self._second_order(sample)
        if self.lower_order_nums < 2:
            self.lower_order_nums += 1
        self.step_index += 1
        return StepOutput(prev.astype(np.float32), x0.astype(np.float32))
