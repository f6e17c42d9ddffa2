"""How the quantize-or-scale-down answer moves with size: `qexport compare`'s efficiency table for
a random-weight U-Net with google/ddpm-cifar10-32's config (35.7M parameters) and its scaled-down
sibling at half the channel width (random weights: image quality means nothing there, so it is not
measured).

    python benchmarks/bench_compare_size.py [--steps 20] [--threads N] [--out benchmarks/results/compare_cifar]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR10_CONFIG, build_cifar_config_unet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    from qexport.eval.compare import CompareConfig, markdown, run_compare

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the interleaved benchmark loop")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qexport-bench")
    p.add_argument("--out", type=Path, default=RESULTS / "compare_cifar")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    big = build_cifar_config_unet(args.cache / "ddpm-cifar10-config")
    half = dict(CIFAR10_CONFIG, block_out_channels=tuple(c // 2 for c in CIFAR10_CONFIG["block_out_channels"]))
    small = build_cifar_config_unet(args.cache / "ddpm-cifar10-config-half", config=half)
    cfg = CompareConfig(big=str(big), small=str(small), distilled=None, steps=args.steps, threads=args.threads,
                        quality=False)
    report = run_compare(cfg, args.out, progress=sys.stderr.isatty())
    print(markdown(report))


if __name__ == "__main__":
    main()
