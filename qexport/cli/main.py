"""Entry point of the `qexport` console script: builds the parser from the subcommand list and
turns user errors (`QexportError`, `ArtifactError`, bad values, usage, a full disk) into one line on
stderr with exit code 2 (130 on Ctrl-C), with the traceback only under `-v` / `--debug`."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import signal
import sys

from .. import __version__
from qexport_runtime.artifact import ArtifactError
from qexport_runtime.oneline_argparse import OneLineParser

from ..errors import QexportError, on_interrupt

# The fixed list of subcommands, in the order the data flows.
SUBCOMMANDS = ("models", "calibrate", "inspect", "convert", "eval", "compare", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qexport",
        description="Quantize diffusion U-Nets with per-time-step scales and export integer ONNX.")
    parser.add_argument("--version", action="version", version=f"qexport {__version__}")
    parser.add_argument("-v", "--verbose", "--debug", action="store_true",
                        help="debug logging, and tracebacks instead of one-line errors")
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
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit then fails a write (EFBIG) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGINT, on_interrupt)
    try:
        return int(args._run(args) or 0)
    except (QexportError, ArtifactError, ValueError) as e:
        if args.verbose:
            raise
        print(f"qexport {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qexport {args.command}: interrupted; nothing was written (a previous output is intact)",
              file=sys.stderr)
        return 130
    except OSError as e:
        if args.verbose:
            raise
        print(f"qexport {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name in ("torch", "diffusers", "onnx", "safetensors", "scipy", "matplotlib"):
            print(f"qexport {args.command}: error: this command needs the toolchain ({e.name} is not installed); "
                  f"install it with: pip install 'qexport[toolchain]'", file=sys.stderr)
            return 2
        raise


def os_error_line(e: OSError) -> str:
    """One line for an OSError, naming the file and the fix."""
    what = f"{e.strerror or type(e).__name__}" + (f": {e.filename}" if e.filename else "")
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"{what}; free disk space or raise the file-size limit (no partial artifact was left)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}; choose a location you can write to (-o)"
    return f"{what}; check the path"


if __name__ == "__main__":
    sys.exit(main())
