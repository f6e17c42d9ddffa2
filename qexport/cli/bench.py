"""`qexport bench ARTIFACT ...`: the runtime's benchmark (works in a runtime-only install too)."""

from __future__ import annotations

import argparse

from qexport_runtime.__main__ import add_bench_arguments, use_wait_policy

from .base import Command


def _run(args: argparse.Namespace) -> int:
    use_wait_policy(args)
    return args.func(args)


def _add(p: argparse.ArgumentParser) -> None:
    add_bench_arguments(p)


COMMAND = Command("bench", "measure step latency, load time, peak memory and size of artifact graphs", _add, _run)
