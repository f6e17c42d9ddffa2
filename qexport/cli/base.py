"""What a subcommand is: a name, a one-line help, `add_arguments(parser)` and `run(args) -> int`.

Modules defining commands import nothing heavy at top level, so `qexport --help` stays instant
and runtime-only commands work in an install without torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
