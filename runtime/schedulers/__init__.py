"""Numpy schedulers, one file each, behind one interface (`set_timesteps`, `step`)."""

from .base import NoiseScheduleConfig, StepOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver import DPMSolverMultistepScheduler

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_scheduler(name: str, config: dict, **overrides):
    """Build scheduler `name` ('ddim', 'ddpm', 'dpmsolver++') from a diffusers scheduler config dict."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None
    return cls.from_config(config, **overrides)


__all__ = ["SCHEDULERS", "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
           "NoiseScheduleConfig", "StepOutput", "make_scheduler"]
