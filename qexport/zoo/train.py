"""Training scripts for the shipped models (deterministic seeds, resumable checkpoints).

    python -m qexport.zoo.train ddpm --width 32 --steps 3500 --out qexport/zoo/shipped/digits16-ddpm
    python -m qexport.zoo.train ddpm --width 16 --steps 3500 --out qexport/zoo/shipped/digits16-ddpm-small
    python -m qexport.zoo.train ddpm --width 16 --steps 3500 --teacher qexport/zoo/shipped/digits16-ddpm \
        --out qexport/zoo/shipped/digits16-ddpm-distilled
    python -m qexport.zoo.train classifier --out qexport/zoo/shipped/digits16-classifier

The DDPM writes a diffusers pipeline folder (`model_index.json`, `unet/`, `scheduler/`) holding the
EMA weights. With `--teacher` it is a distilled student: the same recipe and the same noisy inputs
x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε of the training digits, but the regression target is the teacher's noise
prediction at (x_t, t) instead of ε, so the student learns the teacher's function across time steps.
The classifier writes `model.safetensors`, `config.json` and the real-data feature statistics
`real_stats.npz`. Each writes `training.json` (steps, seconds, losses, parameters).
Checkpoints go to `<out>/../.checkpoints/<name>.pt` every `--ckpt-every` steps (git-ignored) and are
resumed automatically, so a session that ends mid-training loses little.
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

from .architectures import DigitClassifier, digits_scheduler_config, digits_unet_config
from .data import load_digits16

log = logging.getLogger(__name__)


def _checkpoint_path(out: Path) -> Path:
    return out.parent / ".checkpoints" / f"{out.name}.pt"


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_ddpm(out: Path, width: int, steps: int, batch: int, lr: float, ema_decay: float,
               seed: int, ckpt_every: int, teacher: Path | None = None) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    teacher_unet = None
    if teacher is not None:
        teacher_unet = UNet2DModel.from_pretrained(Path(teacher) / "unet").eval().requires_grad_(False)
    x_train, _ = load_digits16("train")
    data = torch.from_numpy(x_train)
    unet = UNet2DModel(**digits_unet_config(width))
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler(**digits_scheduler_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    step, losses, seconds = 0, [], 0.0
    ckpt = _checkpoint_path(out)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"]); ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]); gen.set_state(state["gen"])
        step, losses, seconds = state["step"], state["losses"], state["seconds"]
        log.info("resumed %s at step %d", ckpt, step)
    alphas = sched.alphas_cumprod
    bar = tqdm(total=steps, initial=step, desc=f"ddpm w{width}" + (" distilled" if teacher else ""))
    t0 = time.time() - seconds
    while step < steps:
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:  # linear warm-up over the first 100 steps
            g["lr"] = lr * min(1.0, (step + 1) / 100)
        if teacher_unet is None:
            target = noise
        else:
            with torch.no_grad():
                target = teacher_unet(xt, t).sample
        loss = F.mse_loss(unet(xt, t).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(float(loss))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if step % ckpt_every == 0 or step == steps:
            _save_checkpoint(ckpt, dict(unet=unet.state_dict(), ema=ema.state_dict(),
                                        opt=opt.state_dict(), gen=gen.get_state(), step=step,
                                        losses=losses, seconds=time.time() - t0))
    bar.close()
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=ema, scheduler=sched).save_pretrained(out, safe_serialization=True)
    n_params = sum(p.numel() for p in ema.parameters())
    record = dict(kind="ddpm" if teacher is None else "ddpm-distilled", width=width, steps=steps, batch=batch,
                  lr=lr, ema_decay=ema_decay,
                  seed=seed, seconds=round(seconds, 1), threads=torch.get_num_threads(),
                  **({} if teacher is None else dict(teacher=Path(teacher).name,
                                                     teacher_params=sum(p.numel() for p in teacher_unet.parameters()))),
                  params=n_params, final_loss_mean100=float(np.mean(losses[-100:])),
                  loss_curve=[float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)])
    (out / "training.json").write_text(json.dumps(record, indent=2))
    log.info("wrote %s (%d params, %.0f s)", out, n_params, seconds)


def train_classifier(out: Path, epochs: int, batch: int, lr: float, seed: int) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    x_tr, y_tr = (torch.from_numpy(a) for a in load_digits16("train"))
    x_te, y_te = (torch.from_numpy(a) for a in load_digits16("test"))
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in tqdm(range(epochs), desc="classifier"):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(perm), batch):
            xb, yb = x_tr[perm[i:i + batch]], y_tr[perm[i:i + batch]]
            # random shifts of up to 1 pixel and a little noise: generated digits are not centred exactly
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            xb = (xb + 0.05 * torch.randn(xb.shape, generator=gen)).clamp(-1, 1)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
        x_all, _ = load_digits16("all")
        feats = model.features(torch.from_numpy(x_all)).double().numpy()
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"architecture": "DigitClassifier", "num_classes": 10,
                                                 "feature_dim": DigitClassifier.feature_dim,
                                                 "resolution": 16}, indent=2))
    np.savez(out / "real_stats.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), n=len(feats))
    n_params = sum(p.numel() for p in model.parameters())
    record = dict(kind="classifier", epochs=epochs, batch=batch, lr=lr, seed=seed,
                  seconds=round(time.time() - t0, 1), params=n_params, heldout_accuracy=acc,
                  heldout_size=len(y_te))
    (out / "training.json").write_text(json.dumps(record, indent=2))
    log.info("classifier held-out accuracy %.4f", acc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qexport.zoo.train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    d = sub.add_parser("ddpm", help="train a digits DDPM U-Net")
    d.add_argument("--width", type=int, default=32)
    d.add_argument("--steps", type=int, default=3000)
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--ema-decay", type=float, default=0.999)
    d.add_argument("--ckpt-every", type=int, default=250)
    d.add_argument("--teacher", type=Path, default=None,
                   help="a trained digits DDPM folder: distil it (regress its noise predictions) instead of ε")
    c = sub.add_parser("classifier", help="train the digit feature classifier")
    c.add_argument("--epochs", type=int, default=15)
    c.add_argument("--batch", type=int, default=64)
    c.add_argument("--lr", type=float, default=2e-3)
    for s in (d, c):
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    if a.kind == "ddpm":
        train_ddpm(a.out, a.width, a.steps, a.batch, a.lr, a.ema_decay, a.seed, a.ckpt_every, a.teacher)
    else:
        train_classifier(a.out, a.epochs, a.batch, a.lr, a.seed)


if __name__ == "__main__":
    main()
