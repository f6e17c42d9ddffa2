"""The one exception type users see: `QexportError` carries a one-line message naming the problem
and the fix. The CLI prints it (no traceback) and exits non-zero. `interrupted` remembers a Ctrl-C
even where Python swallowed its KeyboardInterrupt (raised inside a `__del__` or a callback), so
writers can refuse to commit an output the user asked to stop."""

import threading

interrupted = threading.Event()


def on_interrupt(signum, frame) -> None:
    """SIGINT handler: remember the interrupt, then raise KeyboardInterrupt as Python's default does."""
    interrupted.set()
    raise KeyboardInterrupt


class QexportError(Exception):
    """A user-facing error: bad input, a missing file, an unreachable hub. One line, with the fix."""
