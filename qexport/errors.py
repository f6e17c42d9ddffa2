"""The one exception type users see: `QexportError` carries a one-line message naming the problem
and the fix. The CLI prints it (no traceback) and exits non-zero."""


class QexportError(Exception):
    """A user-facing error: bad input, a missing file, an unreachable hub. One line, with the fix."""
