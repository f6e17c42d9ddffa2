"""An argparse parser whose usage errors are one line naming the fix (`--help`), exit 2; both
command lines (`qexport`, `python -m qexport_runtime`) use it."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")
