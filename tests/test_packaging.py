"""pyproject.toml names every package folder, and the runtime's declared dependencies stay light."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for init in list((ROOT / "qexport").rglob("__init__.py")) + list((ROOT / "runtime").rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT).parts
        name = ("qexport_runtime",) + rel[1:] if rel[0] == "runtime" else rel
        found.add(".".join(name))
    assert found == listed, f"unlisted: {found - listed}, stale: {listed - found}"


def test_base_dependencies_are_runtime_only():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert names <= {"numpy", "onnxruntime", "tqdm"}, names


def test_torch_pinned_exactly():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "torch==2.13.0" in extras["toolchain"]
