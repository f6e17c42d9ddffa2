"""Entry point of the `qexport` console script: builds the parser from the subcommand list and
turns `QexportError` into one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from qexport_runtime.artifact import ArtifactError

from ..errors import QexportError

# The fixed list of subcommands, in the order the data flows.
SUBCOMMANDS = ("models", "calibrate", "inspect", "convert", "eval", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qexport",
        description="Quantize diffusion U-Nets with per-time-step scales and export integer ONNX.")
    parser.add_argument("--version", action="version", version=f"qexport {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        cmd = importlib.import_module(f".{name}", __package__).COMMAND
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except (QexportError, ArtifactError) as e:
        print(f"qexport {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name in ("torch", "diffusers", "onnx", "safetensors", "scipy", "matplotlib"):
            print(f"qexport {args.command}: error: this command needs the toolchain ({e.name} is not installed); "
                  f"install it with: pip install 'qexport[toolchain]'", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
