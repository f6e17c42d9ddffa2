"""docs/errors.md stays true: every message fragment it lists is still printed by the source."""

import argparse
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_documented_message_exists_in_the_source():
    doc = (REPO / "docs" / "errors.md").read_text()
    source = "\n".join(p.read_text() for d in ("qexport", "runtime") for p in (REPO / d).rglob("*.py"))
    source += Path(argparse.__file__).read_text()          # usage errors are argparse's own words
    flat = re.sub(r'"\s*\n\s*f?"', "", source)            # join implicitly concatenated f-string lines
    rows = [line.split("|")[2] for line in doc.splitlines() if line.startswith("| ") and "---" not in line
            and not line.startswith("| situation")]
    fragments = [f for row in rows for f in re.findall(r"`([^`]+)`", row)]
    assert len(fragments) >= 40
    missing = [f for f in fragments if f not in flat]
    assert not missing, missing
