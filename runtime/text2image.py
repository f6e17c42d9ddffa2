"""Prompt → image with a text-to-image artifact: tokenizer, text encoder, guided integer U-Net, VAE.

`TextToImage(artifact, threads=None, role=None)` loads the artifact's tokenizer graph
(onnxruntime-extensions), text encoder, U-Net graph (via `Sampler`, so the golden-probe self-check
runs as for any artifact) and VAE decoder (with `role="fp32"`, the FP32 one when the artifact's
default VAE decoder is int8: the whole FP32 reference pipeline). `generate(prompt, negative_prompt="", guidance=None,
steps=25, batch=1, seed=0)` embeds the prompt once, runs classifier-free guidance as one CFG-batch
U-Net call per step and decodes: `Generation(images [B, C, H, W] in [-1, 1], latents, timings)`.
Needs numpy, onnxruntime and onnxruntime-extensions only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from .artifact import Artifact, ArtifactError
from .sampler import Sampler
from .session import open_session, session_options
from .tokenizer import PromptTokenizer

MAX_PROMPT_CHARS = 10_000


@dataclass
class Generation:
    images: np.ndarray          # [B, C, H, W] float32 in [-1, 1]
    latents: np.ndarray         # [B, c, h, w] the U-Net's final sample (before 1/scaling_factor)
    timings: dict = field(default_factory=dict)   # seconds: text, unet_steps (list), vae, total


def _session(path, threads) -> ort.InferenceSession:
    return open_session(path, session_options(threads))


def text_info(artifact: Artifact) -> dict:
    """The manifest's text section, checked (artifacts are untrusted)."""
    t = artifact.manifest.extra.get("text")
    if not isinstance(t, dict):
        raise ArtifactError(f"artifact {artifact.path} is not a text-to-image artifact (no text encoder); "
                            f"sample it without --prompt")
    for key, kind in (("max_length", int), ("hidden_size", int), ("guidance", float), ("scaling_factor", float),
                      ("image_shape", list)):
        v = t.get(key)
        if not isinstance(v, (int, float) if kind is float else kind) or isinstance(v, bool):
            raise ArtifactError(f"artifact {artifact.path}: manifest text.{key} is missing or not a {kind.__name__}; "
                                f"re-export the artifact")
    if not (0 < t["max_length"] <= 4096 and 0 < t["hidden_size"] <= 1 << 16 and np.isfinite(t["scaling_factor"])
            and t["scaling_factor"] > 0 and np.isfinite(t["guidance"])):
        raise ArtifactError(f"artifact {artifact.path}: manifest text fields are out of range; re-export the artifact")
    for role in ("tokenizer", "text-encoder", "vae-decoder"):
        if not artifact.manifest.files_with_role(role):
            raise ArtifactError(f"artifact {artifact.path} has no {role} graph; re-export it with this qexport")
    return t


class TextToImage:
    def __init__(self, artifact: Artifact, threads: int | None = None, role: str | None = None,
                 check: bool = True, strict: bool = False, trusted: bool = False):
        self.artifact = artifact
        self.info = text_info(artifact)
        m = artifact.manifest
        self.tokenizer = PromptTokenizer(artifact.path / m.files_with_role("tokenizer")[0])
        self.text_encoder = _session(artifact.path / m.files_with_role("text-encoder")[0], threads)
        # the FP32 reference pipeline decodes with the FP32 VAE when the artifact's default one is int8
        vae_role = "vae-decoder-fp32" if role == "fp32" and m.files_with_role("vae-decoder-fp32") else "vae-decoder"
        self.vae = _session(artifact.path / m.files_with_role(vae_role)[0], threads)
        self.sampler = Sampler(artifact, role=role, threads=threads, correction=False, check=check, strict=strict,
                               trusted=trusted)

    @property
    def check(self):
        return self.sampler.check

    def embed(self, prompts: list[str]) -> np.ndarray:
        """`[P, L, D]` text embeddings of `prompts` (the text encoder's last hidden state)."""
        for p in prompts:
            if not isinstance(p, str) or len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"a prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
        ids = self.tokenizer(prompts)
        return self.text_encoder.run(None, {"input_ids": ids})[0].astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = (latents / np.float32(self.info["scaling_factor"])).astype(np.float32)
        return np.clip(self.vae.run(None, {"latent_sample": z})[0], -1.0, 1.0)

    def generate(self, prompt: str | list[str], negative_prompt: str = "", guidance: float | None = None,
                 steps: int = 25, batch: int = 1, seed: int = 0) -> Generation:
        """`prompt` (one string for the whole batch, or one per image) → images; see the module docstring."""
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for a batch of {batch}; pass one prompt or one per image")
        g = float(self.info["guidance"] if guidance is None else guidance)
        if not np.isfinite(g) or g < 0:
            raise ValueError(f"guidance must be a finite number ≥ 0, got {guidance}")
        t0 = time.perf_counter()
        unique = sorted(set(prompts))
        emb = self.embed([negative_prompt, *unique])       # each distinct prompt embedded once
        row = {p: i + 1 for i, p in enumerate(unique)}
        context = np.concatenate([np.repeat(emb[:1], batch, axis=0), emb[[row[p] for p in prompts]]])
        t_text = time.perf_counter() - t0
        res = self.sampler.sample(steps, batch, seed, context=context, guidance=g)
        t1 = time.perf_counter()
        images = self.decode(res.images)
        t_vae = time.perf_counter() - t1
        return Generation(images, res.images, dict(text=t_text, unet_steps=res.step_seconds, vae=t_vae,
                                                   total=time.perf_counter() - t0))
