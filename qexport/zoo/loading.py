"""Resolve a MODEL_ID to a loaded diffusers U-Net plus its scheduler config.

A MODEL_ID is, in this order:
  (a) a shipped model name (`qexport models` lists them);
  (b) a local folder: a diffusers model folder (`config.json` + weights + `scheduler_config.json`)
      or a whole pipeline folder with `unet/` and `scheduler/` subfolders — for a text-to-image
      (Stable-Diffusion-style) pipeline also `text_encoder/`, `tokenizer/` and `vae/`
      (qexport.zoo.text_pipeline);
  (c) a Hugging Face Hub id (`google/ddpm-cifar10-32`), downloaded with `huggingface_hub`.
Weights are read from safetensors only, unless the caller explicitly allows pickle (`.bin`) files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qexport_runtime.artifact import sha256_file

from ..errors import QexportError
from .registry import get_shipped

WEIGHTS_SAFE = "diffusion_pytorch_model.safetensors"
WEIGHTS_PICKLE = "diffusion_pytorch_model.bin"
HUB_PATTERNS = ["model_index.json", "*.json", "unet/*.json", "unet/*.safetensors", "scheduler/*.json",
                "text_encoder/*.json", "text_encoder/*.safetensors", "tokenizer/*", "vae/*.json", "vae/*.safetensors",
                "*.safetensors"]


@dataclass
class LoadedModel:
    """A U-Net ready for calibration/export, with where it came from."""

    unet: Any  # a diffusers ModelMixin (UNet2DModel, later UNet2DConditionModel)
    scheduler_config: dict
    model_id: str
    kind: str  # "shipped" | "local" | "hub"
    folder: Path
    weights_sha256: str
    extra: dict = field(default_factory=dict)
    text: Any = None  # qexport.zoo.text_pipeline.TextParts for a text-to-image pipeline

    @property
    def conditioned(self) -> bool:
        return self.text is not None

    @property
    def context_shape(self) -> tuple[int, int] | None:
        """`(tokens, hidden)` of the U-Net's `encoder_hidden_states`, None when unconditional."""
        return (self.text.max_length, self.text.hidden_size) if self.text is not None else None

    def denoiser(self, prompts: list[str] | None = None, guidance: float | None = None):
        """What sampling calls as `f(x, t).sample`: the U-Net itself, or for a text-to-image model a
        `GuidedUNet` over `prompts` (default: the calibration prompts) at `guidance` (default: the model's)."""
        if self.text is None:
            return self.unet
        from .guidance import GuidedUNet
        from .prompts import EMPTY_PROMPT, calibration_prompts
        from .text_pipeline import encode

        cond = encode(self.text, prompts if prompts is not None else calibration_prompts())
        return GuidedUNet(self.unet, cond, encode(self.text, [EMPTY_PROMPT]),
                          self.text.guidance if guidance is None else guidance)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, size, size)


def resolve_model_folder(model_id: str, *, cache_dir: str | None = None) -> tuple[Path, str]:
    """Return `(folder, kind)` for MODEL_ID without loading any weights."""
    shipped = get_shipped(model_id)
    if shipped is not None:
        if not shipped.is_present():
            raise QexportError(f"shipped model {model_id!r} has no weights in {shipped.path}; "
                               f"reinstall qexport or retrain it with `python -m qexport.zoo.train`")
        return shipped.path, "shipped"
    p = Path(model_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise QexportError(f"{model_id!r} is a file; pass the folder that holds config.json "
                               f"(or a pipeline folder with unet/ and scheduler/)")
        return p, "local"
    if _looks_like_path(model_id):
        raise QexportError(f"model folder {model_id!r} does not exist; pass an existing folder, "
                           f"a shipped model name (see `qexport models`) or a Hub id")
    return _download_from_hub(model_id, cache_dir), "hub"


def load_model(model_id: str, *, allow_pickle: bool = False, cache_dir: str | None = None) -> LoadedModel:
    """Load MODEL_ID's U-Net (eval mode, float32) and its scheduler config. See the module docstring."""
    folder, kind = resolve_model_folder(model_id, cache_dir=cache_dir)
    unet_dir, sched_file = _locate_parts(folder)
    weights = _pick_weights(unet_dir, allow_pickle)
    config = json.loads((unet_dir / "config.json").read_text())
    from .text_pipeline import is_text_pipeline, load_text_parts

    text_pipeline = unet_dir != folder and is_text_pipeline(folder)
    cls = _model_class(config, unet_dir, text_pipeline)
    scheduler_config = _scheduler_config(sched_file)
    text = load_text_parts(folder, allow_pickle) if text_pipeline else None
    try:
        unet = cls.from_pretrained(str(unet_dir), use_safetensors=weights.suffix == ".safetensors",
                                   low_cpu_mem_usage=False)
    except (ValueError, RuntimeError, OSError, TypeError, KeyError) as e:  # shapes vs config, truncated file …
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise QexportError(f"cannot load the U-Net in {unet_dir} ({reason}); its weights and config.json must "
                           f"come from the same model") from None
    unet = unet.float().eval().requires_grad_(False)
    return LoadedModel(unet=unet, scheduler_config=scheduler_config, model_id=model_id, kind=kind,
                       folder=folder, weights_sha256=sha256_file(weights), text=text)


def _looks_like_path(model_id: str) -> bool:
    return (model_id.startswith((".", "/", "~")) or "\\" in model_id or model_id.count("/") > 1
            or model_id.endswith("/"))


def _locate_parts(folder: Path) -> tuple[Path, Path]:
    if (folder / "unet").is_dir():  # a pipeline folder
        unet_dir = folder / "unet"
        sched = folder / "scheduler" / "scheduler_config.json"
    else:
        unet_dir = folder
        sched = folder / "scheduler_config.json"
    if not (unet_dir / "config.json").exists():
        if (folder / "model_index.json").exists():
            raise QexportError(f"pipeline folder {folder} has no unet/ with a config.json; qexport needs the "
                               f"pipeline's U-Net (copy the whole pipeline folder)")
        raise QexportError(f"no config.json in {unet_dir}; pass a diffusers model folder or a pipeline "
                           f"folder with unet/ and scheduler/ subfolders")
    if unet_dir == folder and '"UNet2DConditionModel"' in (unet_dir / "config.json").read_text(errors="replace"):
        _model_class({"_class_name": "UNet2DConditionModel"}, unet_dir, text_pipeline=False)   # raises: need the pipeline
    if not sched.exists():
        raise QexportError(f"no scheduler config at {sched}; add the diffusers scheduler_config.json the "
                           f"model was trained with (it sets num_train_timesteps and the betas)")
    return unet_dir, sched


# diffusers schedulers that share the DDPM noise schedule the numpy samplers implement
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler",
                     "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                     "UniPCMultistepScheduler", "DEISMultistepScheduler", "HeunDiscreteScheduler")


def _scheduler_config(sched_file: Path) -> dict:
    from qexport_runtime.schedulers.base import NoiseScheduleConfig

    try:
        config = json.loads(sched_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QexportError(f"{sched_file} is not valid JSON; it must be a diffusers scheduler config") from None
    if not isinstance(config, dict) or "num_train_timesteps" not in config:
        raise QexportError(f"{sched_file} has no num_train_timesteps; it must be a diffusers scheduler config")
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULER_CLASSES:
        raise QexportError(f"{sched_file} names scheduler class {name!r}, whose noise schedule qexport's samplers "
                           f"do not implement; use a DDPM-family scheduler config ({', '.join(SCHEDULER_CLASSES[:3])}, …)")
    try:
        NoiseScheduleConfig.from_config(config)
    except (ValueError, TypeError) as e:
        raise QexportError(f"{sched_file}: {e}") from None
    return config


def _pick_weights(unet_dir: Path, allow_pickle: bool) -> Path:
    safe, pickle = unet_dir / WEIGHTS_SAFE, unet_dir / WEIGHTS_PICKLE
    if safe.exists():
        return safe
    if pickle.exists():
        if not allow_pickle:
            raise QexportError(f"{unet_dir} has only pickle weights ({WEIGHTS_PICKLE}), which can run code "
                               f"when loaded; convert them to safetensors or pass --allow-pickle if you trust them")
        return pickle
    raise QexportError(f"no weights in {unet_dir}; expected {WEIGHTS_SAFE}")


def _model_class(config: dict, unet_dir: Path, text_pipeline: bool = False):
    import diffusers

    name = config.get("_class_name", "UNet2DModel")
    if name == "UNet2DModel":
        return diffusers.UNet2DModel
    if name == "UNet2DConditionModel":
        if not text_pipeline:
            raise QexportError(f"{unet_dir} is a text-conditioned UNet2DConditionModel; pass the whole Stable "
                               f"Diffusion pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, "
                               f"vae/, scheduler/), not the unet/ folder alone")
        return diffusers.UNet2DConditionModel
    if name.startswith("UNet"):
        raise QexportError(f"{unet_dir}/config.json names {name!r}; qexport converts UNet2DModel and text-"
                           f"conditioned UNet2DConditionModel denoisers (1-D/3-D U-Nets are not supported)")
    raise QexportError(f"{unet_dir}/config.json names class {name!r}, which is not a diffusers U-Net "
                       f"(transformer denoisers and VAEs are not supported); pass a UNet2DModel folder")


def _download_from_hub(model_id: str, cache_dir: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(model_id, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown id, auth: all end the same way for the user
        reason = type(e).__name__
        raise QexportError(f"could not fetch {model_id!r} from the Hugging Face Hub ({reason}); if you are "
                           f"offline, download it on another machine and pass the local folder instead, "
                           f"e.g. `qexport convert ./ddpm-cifar10-32`") from None
    return Path(path)


def load_classifier(name: str = "digits16-classifier"):
    """The shipped feature classifier (eval mode) and its real-data feature statistics
    `{"mu": [D], "sigma": [D, D], "n": int}`."""
    import numpy as np
    from safetensors.torch import load_file

    from .architectures import DigitClassifier

    shipped = get_shipped(name)
    if shipped is None or not shipped.is_present():
        raise QexportError(f"classifier {name!r} is not shipped in this install; retrain it with "
                           f"`python -m qexport.zoo.train classifier --out qexport/zoo/shipped/{name}`")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(shipped.path / "model.safetensors")))
    stats = dict(np.load(shipped.path / "real_stats.npz"))
    return model.eval().requires_grad_(False), stats
