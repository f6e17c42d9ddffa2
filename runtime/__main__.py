"""`python -m qexport_runtime`: the device-side command line (numpy + onnxruntime only).

    python -m qexport_runtime sample ARTIFACT --steps 50 --batch 16 -o out/
    python -m qexport_runtime sample T2I_ARTIFACT --prompt "a handwritten seven" --guidance 4 --steps 25 -o out/
    python -m qexport_runtime bench ARTIFACT [ARTIFACT ...] --steps 20 --batch 1 --threads 4 --json bench.json
    python -m qexport_runtime check ARTIFACT [--json check.json]
    python -m qexport_runtime generate ARTIFACT --steps 20 --batch 4 [--png] -o out/   (one-call graph)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .artifact import ArtifactError, load_artifact
from .cpu import kernel_path
from .oneline_argparse import OneLineParser
from .images import grid, write_png
from .schedulers import SCHEDULERS
from .session import WAIT_POLICIES, WAIT_POLICY_ENV, wait_policy


def _sample(args: argparse.Namespace) -> int:
    from .sampler import Sampler

    art = load_artifact(args.artifact)
    if args.prompt is not None or "text" in art.manifest.extra:
        return _sample_text(args, art)
    sampler = Sampler(art, role=args.graph, scheduler=args.scheduler, threads=args.threads,
                      correction={"auto": None, "on": True, "off": False}[args.correction], strict=args.strict,
                      trusted=args.trust_artifact)
    res = sampler.sample(args.steps, batch=args.batch, seed=args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", res.images)
    write_png(out / "samples.png", grid(res.images, scale=args.scale))
    summary = dict(artifact=str(art.path), graph=sampler.graph_path.name, scheduler=args.scheduler,
                   correction_applied=sampler.correction is not None,
                   steps=args.steps, batch=args.batch, seed=args.seed,
                   step_ms_median=float(np.median(res.step_seconds) * 1e3),
                   threads_used=sampler.session.threads_for(args.batch),
                   shards=sampler.session.plan_for(args.batch).shards, wait_policy=wait_policy(),
                   loop_seconds=res.loop_seconds, python_overhead=res.python_overhead,
                   cpu=kernel_path().to_dict(), check=sampler.check.to_dict() if sampler.check else None)
    (out / "sample.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out/'samples.png'} and {out/'samples.npy'} ({args.batch} images, {args.steps} steps, "
          f"{summary['step_ms_median']:.1f} ms/step, graph {sampler.graph_path.name})")
    return 0


def _sample_text(args: argparse.Namespace, art) -> int:
    from .text2image import TextToImage

    if args.prompt is None:
        raise ArtifactError(f"artifact {art.path} is text-to-image: pass --prompt \"…\" (and --guidance, "
                            f"--negative-prompt)")
    if args.correction == "on":
        raise ArtifactError("the ε correction is not available for text-to-image artifacts; drop --correction on")
    t2i = TextToImage(art, threads=args.threads, role=args.graph, strict=args.strict, trusted=args.trust_artifact)
    res = t2i.generate(args.prompt, args.negative_prompt, args.guidance, steps=args.steps, batch=args.batch,
                       seed=args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", res.images)
    write_png(out / "samples.png", grid(res.images, scale=args.scale))
    steps_ms = float(np.median(res.timings["unet_steps"]) * 1e3)
    summary = dict(artifact=str(art.path), graph=t2i.sampler.graph_path.name, prompt=args.prompt,
                   negative_prompt=args.negative_prompt, guidance=args.guidance or t2i.info["guidance"],
                   steps=args.steps, batch=args.batch, seed=args.seed, scheduler="ddim",
                   text_ms=res.timings["text"] * 1e3, unet_step_ms_median=steps_ms, vae_ms=res.timings["vae"] * 1e3,
                   total_seconds=res.timings["total"], cpu=kernel_path().to_dict(),
                   check=t2i.check.to_dict() if t2i.check else None)
    (out / "sample.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out/'samples.png'} and {out/'samples.npy'} ({args.batch} images of {args.prompt!r}, "
          f"{args.steps} steps, guidance {summary['guidance']}, {steps_ms:.1f} ms/U-Net step, graph "
          f"{t2i.sampler.graph_path.name})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .pipeline import PipelineSession

    art = load_artifact(args.artifact)
    session = PipelineSession(art, png=args.png, threads=args.threads)
    res = session.generate(args.steps, batch=args.batch, seed=args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", res.images)
    if res.png is not None:
        (out / "image0.png").write_bytes(res.png)
    summary = dict(artifact=str(art.path), graph=session.path.name, steps=args.steps, batch=args.batch, seed=args.seed,
                   seconds=res.seconds, load_ms=session.load_ms, png="image0.png" if res.png is not None else None,
                   cpu=kernel_path().to_dict())
    (out / "generate.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out/'images.npy'}" + (f" and {out/'image0.png'}" if res.png is not None else "")
          + f" ({args.batch} images, {args.steps} steps in one call, {res.seconds:.2f} s, graph {session.path.name})")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .probes import self_check
    from .session import UNetSession

    art = load_artifact(args.artifact)
    path = kernel_path()
    print(f"CPU: {path.isa} [{', '.join(path.features) or 'no flags'}; from {path.source}]")
    print(f"int8 kernel path: {path.u8s8}" + (" (saturating)" if path.saturates else ""))
    sat = art.manifest.extra.get("saturation")
    if sat:
        print(f"artifact weights: {sat['encoding']}, {sat['unsafe_pairs']} unsafe pairs, largest same-sign pair "
              f"{sat['max_same_sign_pair']} (limit {sat['limit']})")
    role = args.graph or next((r for r in art.graph_roles if r != "fp32"), "fp32")
    result = self_check(art, UNetSession(art.graph(role), threads=args.threads, trusted=args.trust_artifact))
    if result is None:
        raise ArtifactError(f"artifact {art.path} has no golden probes; re-convert it with this qexport to check it")
    print(result.table())
    print(f"verdict ({result.graph}): {result.verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=path.to_dict(), check=result.to_dict()), indent=2))
    return 0 if result.ok else 1


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench, table

    roles = args.graphs.split(",") if args.graphs else None
    report = bench(args.artifacts, roles=roles, steps=args.steps, batch=args.batch, threads=args.threads,
                   scheduler=args.scheduler, memory=not args.no_memory, strict=args.strict,
                   trusted=args.trust_artifact)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-artifact", action="store_true",
                   help="the artifact comes from a trusted source: allow .ort graphs (saved runtime optimizations)")


def add_threads_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--wait-policy", choices=WAIT_POLICIES, default=None,
                   help="how idle onnxruntime threads wait: passive blocks (the default), active spins while a step "
                        f"runs (faster where nothing else runs; sets {WAIT_POLICY_ENV})")


def use_wait_policy(args: argparse.Namespace) -> None:
    """--wait-policy, for every session this command makes (it outranks the environment's)."""
    if getattr(args, "wait_policy", None):
        os.environ[WAIT_POLICY_ENV] = args.wait_policy


def add_bench_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--batch", type=int, default=1)
    add_threads_arguments(b)
    b.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    b.add_argument("--graphs", help="comma-separated roles to run (default: int or qdq, fp32, and fp32@all: the FP32 graph at "
                   "onnxruntime's default optimization level)")
    b.add_argument("--json", help="write the report here")
    b.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    b.add_argument("--strict", action="store_true", help="refuse a graph that fails its load-time self-check")
    add_trust_argument(b)
    b.set_defaults(func=_bench)


def add_generation_arguments(p: argparse.ArgumentParser, output_help: str, batch: int) -> None:
    """ARTIFACT, -o, --steps, --batch, --seed: what `sample` and `generate` both take."""
    p.add_argument("artifact")
    p.add_argument("-o", "--output", required=True, help=output_help)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m qexport_runtime", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="generate images from an artifact")
    add_generation_arguments(s, "folder for samples.png, samples.npy, sample.json", batch=16)
    s.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    s.add_argument("--graph", default=None, help="graph role to run (int, qdq, fp32); default: fastest present")
    add_threads_arguments(s)
    s.add_argument("--correction", choices=["auto", "on", "off"], default="auto",
                   help="the artifact's per-step ε correction: auto = as the artifact says (default)")
    s.add_argument("--scale", type=int, default=4, help="pixel upscaling of the PNG grid")
    s.add_argument("--prompt", default=None, help="text-to-image artifacts: what to draw")
    s.add_argument("--negative-prompt", default="", help="text-to-image: the unconditional half of CFG (default: empty)")
    s.add_argument("--guidance", type=float, default=None,
                   help="text-to-image: classifier-free guidance scale (default: the artifact's)")
    s.add_argument("--strict", action="store_true",
                   help="refuse to sample when the integer graph fails its load-time self-check on this CPU")
    add_trust_argument(s)
    s.set_defaults(func=_sample)
    c = sub.add_parser("check", help="this CPU's int8 kernel path and the artifact's golden-probe self-check "
                                     "(exit 1 when the integer graph deviates)")
    c.add_argument("artifact")
    c.add_argument("--graph", default=None, help="graph role to check (default: the integer graph)")
    add_threads_arguments(c)
    c.add_argument("--json", help="write the result here")
    add_trust_argument(c)
    c.set_defaults(func=_check)
    g = sub.add_parser("generate", help="images from the artifact's one-call pipeline graph (convert --pipeline-graph)")
    add_generation_arguments(g, "folder for images.npy (and image0.png), generate.json", batch=1)
    add_threads_arguments(g)
    g.add_argument("--png", action="store_true", help="use the PNG variant (needs onnxruntime-extensions)")
    g.set_defaults(func=_generate)
    add_bench_arguments(sub.add_parser("bench", help="latency, memory and size of an artifact's graphs"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        use_wait_policy(args)
        return args.func(args)
    except (ArtifactError, ValueError) as e:
        if args.debug:
            raise
        print(f"qexport_runtime {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qexport_runtime {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if args.debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"qexport_runtime {args.command}: error: {e.strerror or type(e).__name__}{where}; check the path, "
              f"its permissions and free space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
