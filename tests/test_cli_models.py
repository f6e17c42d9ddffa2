"""`qexport --help` and `qexport models [--json]`."""

import json
import subprocess
import sys

from qexport.zoo.registry import SHIPPED

from .conftest import shipped_or_skip


def qexport(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qexport.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_subcommands():
    out = qexport("--help")
    assert out.returncode == 0
    assert "models" in out.stdout


def test_models_json_lists_all_roles():
    for m in SHIPPED:
        shipped_or_skip(m.name)
    out = qexport("models", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["role"] for r in rows} == {"main", "scaled-down", "distilled", "classifier", "text-to-image"}
    for r in rows:
        assert r["params"] > 10_000 and r["bytes"] > 4 * r["params"] * 0.9  # float32 weights
        assert set(r) >= {"name", "role", "params", "bytes"}
    main, small, student = (next(r for r in rows if r["role"] == k) for k in ("main", "scaled-down", "distilled"))
    assert small["params"] < main["params"] / 2
    assert student["params"] == small["params"]   # the same architecture, trained another way
    t2i = next(r for r in rows if r["role"] == "text-to-image")
    assert t2i["resolution"] == 32   # the image side (its latents are 8x8)


def test_models_table():
    shipped_or_skip(SHIPPED[0].name)
    out = qexport("models")
    assert out.returncode == 0 and SHIPPED[0].name in out.stdout and "params" in out.stdout
