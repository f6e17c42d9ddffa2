"""Wait-policy benchmark: intra-op threads that block (passive) against threads that spin during a call (active).

    python benchmarks/bench_wait_policy.py ART[:ROLE[@LEVEL]] ... [--batch 1 8] [--rounds 30] [--threads 2]

For every graph (default roles of each artifact: int, fp32, fp32@all), one session per
QEXPORT_WAIT_POLICY at a fixed thread count, all timed interleaved in one process: on an idle machine,
then beside one busy process (a Python loop on one core, as another app would be). Also the CPU time
of 20 calls 50 ms apart per policy (do the cores sleep between steps?). Writes
benchmarks/results/wait_policy<TAG>.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("passive", "active")
BUSY = "while True:\n    pass\n"   # another app on one core; killed when the timing is done


def graphs(items: list[str]) -> list[tuple[str, Path, str]]:
    """(name, graph path, optimization level) for each ART[:ROLE[@LEVEL]]."""
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.bench import role_and_level

    out = []
    for item in items:
        folder, _, spec = item.partition(":")
        art = load_artifact(folder)
        for s in spec.split(",") if spec else ["int", "fp32", "fp32@all"]:
            role, level = role_and_level(s)
            out.append((f"{Path(folder).name}:{s}", art.graph(role), level))
    return out


def sessions(found: list[tuple[str, Path, str]], threads: int) -> dict[tuple[str, str], object]:
    from qexport_runtime.session import WAIT_POLICY_ENV, UNetSession

    before = os.environ.get(WAIT_POLICY_ENV)
    made = {}
    try:
        for policy in POLICIES:   # read when each session's options are made
            os.environ[WAIT_POLICY_ENV] = policy
            for name, path, level in found:
                made[(name, policy)] = UNetSession(path, threads=threads, optimization=level)
    finally:
        if before is None:
            del os.environ[WAIT_POLICY_ENV]
        else:
            os.environ[WAIT_POLICY_ENV] = before
    return made


def timed(made: dict, batch: int, rounds: int) -> dict[str, float]:
    rng, t = np.random.default_rng(0), itertools.count()
    xs = {tuple(s.sample_dims[1:]) for s in made.values()}
    xs = {d: rng.standard_normal((batch, *d)).astype(np.float32) for d in xs}
    calls = {f"{n}|{p}": (lambda s=s: s(xs[tuple(s.sample_dims[1:])], 999 - next(t) % 1000))
             for (n, p), s in made.items()}
    return {k: float(np.median(v)) * 1e3 for k, v in interleaved(calls, rounds).items()}


def idle_cpu(session, calls: int = 20, gap_s: float = 0.05) -> dict:
    x = np.random.default_rng(0).standard_normal((1, *session.sample_dims[1:])).astype(np.float32)
    session(x, 500)
    r0, busy = resource.getrusage(resource.RUSAGE_SELF), 0.0
    for i in range(calls):
        t0 = time.perf_counter()
        session(x, 900 - i)
        busy += time.perf_counter() - t0
        time.sleep(gap_s)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return dict(calls_ms=busy * 1e3, cpu_ms=(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) * 1e3,
                calls=calls, gap_ms=gap_s * 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+", help="ART[:ROLE[@LEVEL],...] (default roles int, fp32, fp32@all)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--busy-rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the result files (wait_policy<TAG>.json/.md)")
    args = p.parse_args()

    found = graphs(args.artifacts)
    made = sessions(found, args.threads)
    result = dict(machine=machine_info(), threads=args.threads, rounds=args.rounds, busy_rounds=args.busy_rounds,
                  graphs=[dict(name=n, file=str(f), optimization=lvl) for n, f, lvl in found], idle={}, busy={})
    for b in args.batch:
        result["idle"][str(b)] = timed(made, b, args.rounds)
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(0.5)
        result["busy"]["1"] = timed(made, 1, args.busy_rounds)
    finally:
        busy.kill()
        busy.wait()
    result["cpu_between_calls"] = {pol: idle_cpu(made[(found[0][0], pol)]) for pol in POLICIES}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"wait_policy{args.tag}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / f"wait_policy{args.tag}.md").write_text(md)
    print(md)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Wait policy ({m['cpu']}, int8 path {m['isa']}, {r['threads']} threads, onnxruntime {m['onnxruntime']})",
             "", f"Median ms per call, interleaved: {r['rounds']} rounds idle, {r['busy_rounds']} beside one busy "
             "process. × = passive / active (above 1: spinning is faster).", "",
             "| graph | machine | B | passive ms | active ms | × |", "|---|---|---|---|---|---|"]
    for where in ("idle", "busy"):
        for b, times in r[where].items():
            for g in r["graphs"]:
                pa, ac = times[f"{g['name']}|passive"], times[f"{g['name']}|active"]
                lines.append(f"| {g['name']} | {where} | {b} | {pa:.2f} | {ac:.2f} | {pa / ac:.2f} |")
    lines += ["", f"CPU time of {r['graphs'][0]['name']}, 20 calls 50 ms apart (B=1):", ""]
    for pol, c in r["cpu_between_calls"].items():
        lines.append(f"- {pol}: {c['cpu_ms']:.0f} ms of CPU for {c['calls_ms']:.0f} ms of calls")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
