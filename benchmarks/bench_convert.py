"""Convert-time check: `qexport convert` of the cifar-config U-Net with default options, timed per stage.

    python benchmarks/bench_convert.py [--bits 8] [--runs 1] [--tag _avx2_zen3]

Builds (once, in --cache) a diffusers pipeline folder holding a random-weight U-Net with
google/ddpm-cifar10-32's config (35.7 M parameters), then runs the default `qexport convert` on it in a
child process per run: wall time, CPU time and peak RSS (the child's own, from wait4), and the
seconds of each stage that convert logs (calibration, export, probes, ε correction), plus the ε
correction's plan and decision from the artifact (trajectories, steps, held-out seeds, gain and its
interval). The goal is 6 minutes on 2 cores; the figures hold for the ISA named in the result.
Writes benchmarks/results/convert_bench<TAG>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QEXPORT, build_cifar_config_unet, machine_info, run_measured  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_S = 360.0
STAGES = re.compile(r"convert took (\d+) s \((.*)\)")


def stages(log: Path) -> dict:
    """`{stage: seconds}` from convert's one-line stage summary."""
    m = STAGES.search(log.read_text(errors="replace"))
    if not m:
        return {}
    return {name.strip(): float(sec) for name, sec in re.findall(r"([^,]+?) (\d+) s", m.group(2))}


def one_run(model: Path, bits: int, threads: int, workdir: Path, i: int) -> dict:
    out, log = workdir / f"run{i}", workdir / f"run{i}.log"
    r = run_measured([*QEXPORT, "convert", str(model), "--bits", str(bits), "-o", str(out)], log, threads)
    if r["returncode"] != 0:
        raise SystemExit(f"qexport convert failed (exit {r['returncode']}); see {log}:\n" + "\n".join(r["error_tail"]))
    r["stages_s"] = stages(log)
    if not r["stages_s"]:
        raise SystemExit(f"no 'convert took … (stages)' line in {log}: convert's stage summary changed; update STAGES")
    corr = json.loads((out / "correction.json").read_text())
    fit = corr.get("fit", {})
    r["correction"] = {k: fit.get(k) for k in ("trajectories", "steps", "heldout_seeds", "heldout_gain",
                                                "heldout_gain_interval", "decided_early", "work_gop")}
    r["correction"]["enabled"] = corr.get("enabled")
    return r


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Convert time, cifar-config U-Net, W{res['bits']}A8 ({m.get('cpu', '?')}, int8 path "
             f"{m.get('isa', '?')}, {res['threads']} threads)", "",
             f"Goal: ≤ {GOAL_S / 60:.0f} min wall on 2 cores.", "",
             "| run | wall | CPU | peak RSS | stages | ε correction plan → decision | goal |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(res["runs"], 1):
        st = ", ".join(f"{k} {v:.0f} s" for k, v in r["stages_s"].items())
        c = r["correction"]
        lo, hi = c["heldout_gain_interval"] or (float("nan"), float("nan"))
        plan = (f"{c['trajectories']} traj × {c['steps']} steps, {c['heldout_seeds']} seeds → gain "
                f"{100 * c['heldout_gain']:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}], {'on' if c['enabled'] else 'off'}")
        wall = r["wall_s"]
        lines.append(f"| {i} | {int(wall // 60)} min {wall % 60:.0f} s | {r['cpu_s']:.0f} s | {r['peak_rss_mb']:.0f} MB "
                     f"| {st} | {plan} | {'met' if wall <= GOAL_S else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, choices=[4, 8], default=8)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qexport-bench")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the result files (convert_bench<TAG>.json/.md)")
    a = p.parse_args()
    model = build_cifar_config_unet(a.cache / "ddpm-cifar10-config")
    res = dict(machine=machine_info(), bits=a.bits, threads=a.threads, goal_s=GOAL_S, runs=[])
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            res["runs"].append(one_run(model, a.bits, a.threads, Path(tmp), i))
            print(f"run {i + 1}: {res['runs'][-1]['wall_s']:.0f} s", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"convert_bench{a.tag}.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (a.out / f"convert_bench{a.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
