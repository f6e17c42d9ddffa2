"""Load-time self-check: the artifact's golden probes run through a quantized graph on this CPU
(`self_check(artifact, session)`: what the sampler, `bench` and `check` call once per session).

`probes.npz` (manifest role `probes`) holds a few `(sample, t)` pairs from the FP32 model's own
sampling trajectories with two references computed at convert time: `golden`, the QDQ graph run
with every ONNX Runtime optimization off (float-emulated integer math, the same on every CPU), and
`fp32`, the FP32 graph. On a device the graph's output `y` is judged per probe by

  - excess  = rms(y − fp32) / rms(golden − fp32) − 1: how much more error than quantization itself
    gives (a saturating kernel path measured +400…+800 %; correct ones −2…+6 %), within `EXCESS_TOL`;
  - deviation = rms(y − golden) / rms(golden − fp32): the distance to the emulation, within
    `DEVIATION_TOL` = 2. Correct kernels still round a few values the other way, which GroupNorm
    spreads over a whole sample: two equally good but independent quantizations of the same model
    sit √2 ≈ 1.41 apart in these units, and up to 1.02 was measured on correct paths; the saturating
    AVX2 path measured 8.
"""

from __future__ import annotations

import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact, ArtifactError
from .cpu import kernel_path

PROBES_FILE = "probes.npz"
ARRAYS = ("sample", "timestep", "golden", "fp32")
EXCESS_TOL = 0.20
DEVIATION_TOL = 2.0


@dataclass(frozen=True)
class Probes:
    sample: np.ndarray    # [P, B, C, H, W] float32
    timestep: np.ndarray  # [P] int64
    golden: np.ndarray    # [P, B, C, H, W]: the float-emulated QDQ graph's output
    fp32: np.ndarray      # [P, B, C, H, W]: the FP32 graph's output
    context: np.ndarray | None = None  # [P, B, L, D]: encoder_hidden_states of a text-conditioned U-Net

    def save(self, path: Path) -> None:
        """An `.npz` with fixed zip entry times, so the same probes give the same bytes (np.savez
        stamps the current time into every entry)."""
        import io

        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for k in ARRAYS + (("context",) if self.context is not None else ()):
                buf = io.BytesIO()
                np.save(buf, getattr(self, k), allow_pickle=False)
                z.writestr(zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def load_probes(artifact: Artifact) -> Probes | None:
    """The artifact's probes, or None when it has none. The file is untrusted: no pickles, shapes checked."""
    names = artifact.manifest.files_with_role("probes")
    if not names:
        return None
    path = artifact.path / names[0]
    try:
        with np.load(path, allow_pickle=False) as z:
            p = Probes(**{k: np.asarray(z[k]) for k in ARRAYS},
                       context=np.asarray(z["context"]) if "context" in z.files else None)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path} is not a valid probes file ({type(e).__name__}); re-export the artifact") \
            from None
    shape = (len(p.timestep), -1, *artifact.manifest.sample_shape)
    ok = p.timestep.ndim == 1 and all(a.ndim == len(shape) and a.shape[0] == shape[0] and a.shape[2:] == shape[2:]
                                      and a.shape == p.sample.shape and a.dtype == np.float32
                                      for a in (p.sample, p.golden, p.fp32))
    if p.context is not None:
        ok = ok and p.context.ndim == 4 and p.context.shape[:2] == p.sample.shape[:2] and p.context.dtype == np.float32
    if not ok or not np.all((p.timestep >= 0) & (p.timestep < artifact.manifest.num_train_timesteps)):
        raise ArtifactError(f"{path} has probe arrays of the wrong shape or time steps; re-export the artifact")
    return p


@dataclass(frozen=True)
class CheckResult:
    graph: str
    isa: str
    kernel_path: str
    path_saturates: bool
    artifact_saturation_safe: bool | None
    timesteps: list
    excess: list
    deviation: list
    ok: bool

    @property
    def verdict(self) -> str:
        if self.ok:
            return "ok: the integer graph matches its float emulation on this CPU"
        return (f"DEVIATES on {self.isa}: up to {max(self.excess):+.0%} more error than quantization itself "
                f"(tolerance {EXCESS_TOL:+.0%}); run the fp32 graph (--graph fp32) or re-convert with this qexport")

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict, "excess_tol": EXCESS_TOL, "deviation_tol": DEVIATION_TOL}

    def table(self) -> str:
        lines = [f"{'t':>5} {'excess':>8} {'deviation':>10}"]
        lines += [f"{t:>5} {e:>+8.1%} {d:>10.2f}" for t, e, d in zip(self.timesteps, self.excess, self.deviation)]
        return "\n".join(lines)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def check_session(artifact: Artifact, session, probes: Probes) -> CheckResult:
    """Run every probe through `session` (a UNetSession) and judge it (module docstring).

    Each probe's samples go through one at a time: a call at the probes' batch would grow
    onnxruntime's arena to that batch before a B=1 loop starts (cifar config: the B=1 sampling
    process's peak RSS 119.7 → 113.0 MB). A sample's output does not depend on the batch it runs in
    (same excess figures there to every printed digit)."""
    excess, deviation = [], []
    contexts = probes.context if probes.context is not None else [None] * len(probes.timestep)
    for x, t, gold, fp, c in zip(probes.sample, probes.timestep, probes.golden, probes.fp32, contexts):
        y = np.concatenate([np.array(session(x[i:i + 1], int(t), None if c is None else c[i:i + 1]))
                            for i in range(len(x))])
        qerr = max(_rms(gold - fp), 1e-12)
        excess.append(_rms(y - fp) / qerr - 1)
        deviation.append(_rms(y - gold) / qerr)
    path = kernel_path()
    sat = artifact.manifest.extra.get("saturation")
    safe = sat.get("unsafe_pairs") if isinstance(sat, dict) else None
    safe = safe if isinstance(safe, int) else None
    ok = bool(np.all(np.isfinite(excess)) and max(excess) <= EXCESS_TOL and max(deviation) <= DEVIATION_TOL)
    return CheckResult(graph=session.path.name, isa=path.isa, kernel_path=path.u8s8, path_saturates=path.saturates,
                       artifact_saturation_safe=None if safe is None else safe == 0,
                       timesteps=[int(t) for t in probes.timestep], excess=[float(e) for e in excess],
                       deviation=[float(d) for d in deviation], ok=ok)


def self_check(artifact: Artifact, session, strict: bool = False) -> CheckResult | None:
    """The golden-probe check of a quantized graph's session (None: the artifact has no probes).
    Deviation warns on stderr, or raises ArtifactError with `strict`."""
    probes = load_probes(artifact)
    if probes is None:
        return None
    result = check_session(artifact, session, probes)
    if not result.ok:
        if strict:
            raise ArtifactError(f"{session.path.name}: {result.verdict}")
        print(f"qexport_runtime: warning: {session.path.name}: {result.verdict}", file=sys.stderr)
    return result
