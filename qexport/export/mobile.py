"""ORT-format (`.ort`) copies of an artifact's graphs and the operator config for a reduced ONNX Runtime build.

`to_ort(graphs, out_dir, target)` runs onnxruntime's own converter
(`onnxruntime.tools.convert_onnx_models_to_ort`, optimization style Fixed) on the given `.onnx` files
and returns the `.ort` paths and the `required_operators.config` that
`build.sh --minimal_build --include_ops_by_config` takes. The optimization level is `extended`, the
level the runtime's sessions use (the `all` level's channels-last rewrite measured slower here);
`target="arm"` keeps int8 QDQ activations as ORT does for ARM, `amd64` lets them become uint8.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

TARGETS = ("arm", "amd64")
LEVEL_ENV = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"
LEVEL = "extended"
CONFIG_NAME = "required_operators.config"


@contextlib.contextmanager
def _level(level: str):
    old = os.environ.get(LEVEL_ENV)
    os.environ[LEVEL_ENV] = level
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LEVEL_ENV, None)
        else:
            os.environ[LEVEL_ENV] = old


def config_name(level: str = LEVEL) -> str:
    return CONFIG_NAME if level == "all" else CONFIG_NAME.replace(".config", f".{level}.config")


def to_ort(graphs: list[Path], out_dir: Path, target: str, extra_files: list[Path] = ()) -> tuple[list[Path], Path]:
    """`.ort` files for `graphs` (written to out_dir, same stem) and one operator config covering all of them.
    `extra_files` (e.g. external weights) are copied beside the graphs for the conversion only."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if target not in TARGETS:
        raise ValueError(f"--mobile must be one of {', '.join(TARGETS)}, got {target!r}")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        for f in list(graphs) + list(extra_files):
            shutil.copy2(f, src / f.name)
        quiet = logging.getLogger("ort_format_model.utils")
        old_level = quiet.level
        quiet.setLevel(logging.WARNING)
        with _level(LEVEL), contextlib.redirect_stdout(io.StringIO()):  # the converter prints every step
            convert_onnx_models_to_ort(src, output_dir=dst, optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform=target)
        quiet.setLevel(old_level)
        suffix = f".{LEVEL}.ort"
        written = []
        for g in graphs:
            made = dst / (g.stem + suffix)
            if not made.is_file():
                raise RuntimeError(f"onnxruntime's converter wrote no {made.name} for {g.name}")
            target_path = out_dir / (g.stem + ".ort")
            shutil.move(made, target_path)
            written.append(target_path)
        config = out_dir / CONFIG_NAME
        body = [ln for ln in (dst / config_name()).read_text().splitlines() if not ln.startswith("#")]
        header = ["# onnxruntime operators used by: " + ", ".join(p.name for p in written),
                  f"# (optimization level {LEVEL}, target {target}); for build.sh --include_ops_by_config"]
        config.write_text("\n".join(header + body) + "\n")
    return written, config


def config_ops(config: Path) -> dict[str, set[str]]:
    """{domain: {op, …}} from a required-operators config (`domain;opset;Op1,Op2` lines)."""
    ops: dict[str, set[str]] = {}
    for line in Path(config).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, _opset, names = line.split(";", 2)
        ops.setdefault(domain, set()).update(n.strip() for n in names.split(",") if n.strip())
    return ops
