"""`qexport models`: list the shipped models (name, role, parameters, resolution, bytes)."""

from __future__ import annotations

import argparse
import json

from .base import Command


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _run(args: argparse.Namespace) -> int:
    from ..zoo.registry import SHIPPED

    rows = [dict(name=m.name, role=m.role, params=m.params(), resolution=m.resolution(), bytes=m.bytes(),
                 path=str(m.path), description=m.description) for m in SHIPPED if m.is_present()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24} {'role':<14} {'params':>10} {'res':>5} {'bytes':>11}  description")
    for r in rows:
        print(f"{r['name']:<24} {r['role']:<14} {r['params']:>10,} {r['resolution']:>3}px {r['bytes']:>11,}  "
              f"{r['description']}")
    missing = [m.name for m in SHIPPED if not m.is_present()]
    if missing:
        print(f"(not present in this install: {', '.join(missing)})")
    return 0


COMMAND = Command("models", "list the shipped models", _add, _run)
