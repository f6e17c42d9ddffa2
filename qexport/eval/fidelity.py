"""Image fidelity of an artifact's quantized graph against its own FP32 graph ("FID to FP32").

Both graphs sample with the runtime's sampler from identical seeds; the sets are compared by the
Fréchet distance of extractor features (`fd_to_fp32`), by pairwise PSNR / SSIM and by the share of
samples whose predicted label matches the FP32 sample's. `seed_floor` is the Fréchet distance
between two FP32 sets drawn from different seeds, i.e. how much resampling alone moves the metric;
`fd_to_fp32_pct_floor` = 100 · fd_to_fp32 / seed_floor. The FP32 side (`Reference`) depends only
on the model and the sampling settings, so comparisons of many artifacts compute it once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from qexport_runtime.artifact import Artifact, load_artifact
from qexport_runtime.cpu import kernel_path
from qexport_runtime.sampler import Sampler

from .features import FeatureExtractor, load_extractor
from .metrics import FeatureStats, frechet_distance, psnr, ssim

FLOOR_SEED_OFFSET = 1_000_000   # the second FP32 set's seeds: disjoint from the compared sets'
PSNR_CAP_DB = 100.0             # identical images count as 100 dB in the mean (not +inf)


@dataclass(frozen=True, kw_only=True)
class FidelityConfig:
    samples: int = 512
    steps: int = 50
    scheduler: str = "ddim"
    seed: int = 0
    batch: int = 128
    threads: int | None = None
    role: str | None = None          # quantized graph to judge (default: the fastest present)
    correction: bool | None = None   # None: the artifact's default
    guidance: float | None = None    # text-to-image: CFG scale (None: the artifact's default)

    def __post_init__(self):
        if self.samples < 2 or self.steps < 1 or self.batch < 1 or self.seed < 0:
            raise ValueError(f"--samples must be ≥ 2, --steps and batch ≥ 1, --seed ≥ 0 (got {self.samples}, "
                             f"{self.steps}, {self.batch}, {self.seed})")


def sample_set(artifact: Artifact, role: str | None, cfg: FidelityConfig, seed: int,
               correction: bool | None = None, desc: str = "", progress: bool = True) -> tuple[np.ndarray, Sampler]:
    """`cfg.samples` images in batches (batch i uses seed `seed + i`, the same for every graph), and
    the sampler (whether it applied the ε correction, its self-check on this CPU)."""
    from tqdm import tqdm

    if is_text_to_image(artifact):
        return _text_sample_set(artifact, role, cfg, seed, desc, progress)
    sampler = Sampler(artifact, role=role, scheduler=cfg.scheduler, threads=cfg.threads,
                      correction=False if role == "fp32" else correction)
    out = []
    for i, start in enumerate(tqdm(range(0, cfg.samples, cfg.batch), desc=desc, disable=not progress, leave=False)):
        n = min(cfg.batch, cfg.samples - start)
        out.append(sampler.sample(cfg.steps, batch=n, seed=seed + i).images.copy())
    return np.concatenate(out), sampler


def is_text_to_image(artifact: Artifact) -> bool:
    return "text" in artifact.manifest.extra


def prompt_classes(n: int) -> tuple[list[str], np.ndarray]:
    """Text-to-image evaluation: image j is drawn from evaluation prompt j mod 10 (class j mod 10)."""
    from ..zoo.prompts import eval_prompts

    prompts = eval_prompts()
    classes = np.arange(n) % len(prompts)
    return [prompts[c] for c in classes], classes


def _text_sample_set(artifact: Artifact, role: str | None, cfg: FidelityConfig, seed: int, desc: str,
                     progress: bool):
    """Decoded images of the evaluation prompts under CFG (batch i: seed `seed + i`), and the sampler."""
    from tqdm import tqdm

    from qexport_runtime.text2image import TextToImage

    if cfg.scheduler != "ddim":
        raise ValueError("text-to-image artifacts are evaluated with the ddim scheduler")
    t2i = TextToImage(artifact, threads=cfg.threads, role=role)
    prompts, _ = prompt_classes(cfg.samples)
    out = []
    for i, start in enumerate(tqdm(range(0, cfg.samples, cfg.batch), desc=desc, disable=not progress, leave=False)):
        n = min(cfg.batch, cfg.samples - start)
        out.append(t2i.generate(prompts[start:start + n], guidance=cfg.guidance, steps=cfg.steps, batch=n,
                                seed=seed + i).images.copy())
    return np.concatenate(out), t2i.sampler


@dataclass
class Reference:
    """The FP32 side of a comparison: its samples, a second FP32 set from other seeds, their features."""
    images: np.ndarray
    floor_images: np.ndarray
    features: np.ndarray
    floor_features: np.ndarray
    labels: np.ndarray | None
    seed_floor: float
    fp32_sha256: str
    config: FidelityConfig

    def matches(self, artifact: Artifact, cfg: FidelityConfig) -> bool:
        same = (cfg.samples, cfg.steps, cfg.scheduler, cfg.seed) == \
            (self.config.samples, self.config.steps, self.config.scheduler, self.config.seed)
        return same and _fp32_sha(artifact) == self.fp32_sha256


def _fp32_sha(artifact: Artifact) -> str:
    return next(e.sha256 for e in artifact.manifest.files.values() if e.role == "fp32")


def fp32_reference(artifact: Artifact, cfg: FidelityConfig, extractor: FeatureExtractor,
                   progress: bool = True) -> Reference:
    images, _ = sample_set(artifact, "fp32", cfg, cfg.seed, desc="fp32 samples", progress=progress)
    floor, _ = sample_set(artifact, "fp32", cfg, cfg.seed + FLOOR_SEED_OFFSET, desc="fp32 floor", progress=progress)
    f, ff = extractor.features(images), extractor.features(floor)
    return Reference(images, floor, f, ff, extractor.labels(images), frechet_distance(f, ff), _fp32_sha(artifact), cfg)


def compare(images: np.ndarray, ref: Reference, extractor: FeatureExtractor) -> dict:
    """The metrics of a quantized set against the reference (same seeds, same order)."""
    feats = extractor.features(images)
    fd = frechet_distance(feats, ref.features)
    labels = extractor.labels(images)
    p = np.minimum(psnr(images, ref.images), PSNR_CAP_DB)
    real = extractor.real_stats
    return dict(fd_to_fp32=fd, fd_to_fp32_bootstrap_std=bootstrap_fd_std(feats, ref.features),
                seed_floor=ref.seed_floor, fd_to_fp32_pct_floor=100.0 * fd / ref.seed_floor,
                fd_to_real=frechet_distance(FeatureStats.of(feats), real) if real is not None else None,
                fd_fp32_to_real=frechet_distance(FeatureStats.of(ref.features), real) if real is not None else None,
                label_agreement=float((labels == ref.labels).mean()) if labels is not None else None,
                psnr_db=float(p.mean()), ssim=float(ssim(images, ref.images).mean()),
                pixel_rmse=float(np.sqrt(((images - ref.images) ** 2).mean())))


def bootstrap_fd_std(a: np.ndarray, b: np.ndarray, rounds: int = 20, seed: int = 0) -> float:
    """Standard deviation of the paired-set Fréchet distance over bootstrap resamples of the sample
    pairs: how far apart two rows of a comparison must be to mean anything."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(rounds):
        i = rng.integers(0, len(a), len(a))
        vals.append(frechet_distance(a[i], b[i]))
    return float(np.std(vals))


def evaluate(artifact_path, cfg: FidelityConfig = FidelityConfig(), extractor: FeatureExtractor | None = None,
             reference: Reference | None = None, progress: bool = True) -> tuple[dict, Reference]:
    """Sample the artifact's quantized graph and FP32 graph, return (report, reusable reference)."""
    t0 = time.perf_counter()
    artifact = load_artifact(artifact_path)
    extractor = extractor or load_extractor()
    if reference is None or not reference.matches(artifact, cfg):
        reference = fp32_reference(artifact, cfg, extractor, progress)
    sampler_role = cfg.role or next(r for r in ("int", "qdq", "static-group") if artifact.manifest.files_with_role(r))
    images, sampler = sample_set(artifact, sampler_role, cfg, cfg.seed, cfg.correction,
                                 desc=f"{sampler_role} samples", progress=progress)
    m = artifact.manifest
    path = kernel_path()
    report = dict(artifact=str(artifact.path), graph=artifact.graph(sampler_role).name, method=m.method,
                  bits=m.bits, groups=m.groups, correction_applied=sampler.correction is not None,
                  isa=path.isa, int8_kernel_path=path.u8s8,
                  check=sampler.check.to_dict() if sampler.check else None, extractor=extractor.name,
                  **compare(images, reference, extractor), samples=cfg.samples, steps=cfg.steps,
                  scheduler=cfg.scheduler, seed=cfg.seed, seconds=round(time.perf_counter() - t0, 1),
                  config=asdict(cfg))
    if is_text_to_image(artifact) and reference.labels is not None:
        _, classes = prompt_classes(cfg.samples)
        report["prompt_adherence"] = float((extractor.labels(images) == classes).mean())
        report["prompt_adherence_fp32"] = float((reference.labels == classes).mean())
        report["guidance"] = cfg.guidance if cfg.guidance is not None else artifact.manifest.extra["text"]["guidance"]
    report["_images"] = images
    return report, reference


METRIC_ROWS = (("fd_to_fp32", "FD to FP32", "{:.4f}"), ("fd_to_fp32_bootstrap_std", "  ± bootstrap std", "{:.4f}"),
               ("seed_floor", "seed floor (FP32 vs FP32)", "{:.3f}"),
               ("fd_to_fp32_pct_floor", "FD to FP32, % of floor", "{:.2f}%"), ("fd_to_real", "FD to real", "{:.3f}"),
               ("fd_fp32_to_real", "FD FP32 to real", "{:.3f}"), ("label_agreement", "label agreement", "{:.2%}"),
               ("psnr_db", "PSNR vs FP32 (dB)", "{:.2f}"), ("ssim", "SSIM vs FP32", "{:.4f}"),
               ("prompt_adherence", "prompt adherence", "{:.2%}"), ("prompt_adherence_fp32", "prompt adherence FP32",
                                                                    "{:.2%}"))


def format_report(r: dict) -> str:
    lines = [f"{r['artifact']} ({r['graph']}, W{r['bits']['weights']}A{r['bits']['activations']}, {r['groups']} groups, "
             f"correction {'on' if r['correction_applied'] else 'off'}): {r['samples']} samples, "
             f"{r['scheduler']}-{r['steps']}, features {r['extractor']}",
             f"  int8 kernels: {r['isa']} ({r['int8_kernel_path']}); self-check: "
             f"{'none (no probes)' if r.get('check') is None else r['check']['verdict']}"]
    for key, label, fmt in METRIC_ROWS:
        if key.startswith("prompt_adherence") and key not in r:
            continue
        v = r.get(key)
        lines.append(f"  {label:<26} {'n/a' if v is None else fmt.format(v)}")
    return "\n".join(lines)
