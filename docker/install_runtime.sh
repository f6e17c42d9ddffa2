#!/usr/bin/env bash
# install_runtime.sh - install the device-side runtime (package qexport_runtime: numpy +
# onnxruntime + tqdm, never torch) from a qexport checkout into a virtual environment.
# Dockerfile.runtime runs it; CI runs it directly (tests/test_docker_scripts.py).
#
# Usage:
#   install_runtime.sh [--venv DIR] [--python PY] [--extensions] [--no-pip] SRC_DIR
#     SRC_DIR       the qexport checkout (holds pyproject.toml and runtime/)
#     --venv DIR    the virtual environment to create or reuse (default: /opt/venv)
#     --python PY   the interpreter that creates it (default: python3)
#     --extensions  also install onnxruntime-extensions (optional custom operators)
#     --no-pip      uninstall pip and setuptools from the venv afterwards (slimmer image)
#
# pip reads its usual configuration (PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf), so an offline
# machine can point it at a local wheel folder. Exit status: 2 on bad arguments, 1 when an
# install step or the final check (imports work, torch absent) fails.
set -euo pipefail

PROG=install_runtime
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit "${2:-1}"; }
usage_error() { printf '%s: error: %s; see the usage at the top of %s\n' "$PROG" "$1" "$0" >&2; exit 2; }

venv=/opt/venv python=python3 extensions=0 strip_pip=0 src=
while (($#)); do
    case $1 in
        --venv) (($# >= 2)) || usage_error "--venv needs a directory"; venv=$2; shift 2 ;;
        --python) (($# >= 2)) || usage_error "--python needs an interpreter"; python=$2; shift 2 ;;
        --extensions) extensions=1; shift ;;
        --no-pip) strip_pip=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) usage_error "unknown option $1" ;;
        *) [[ -z $src ]] || usage_error "more than one SRC_DIR ($src, $1)"; src=$1; shift ;;
    esac
done
[[ -n $src ]] || usage_error "missing SRC_DIR (the qexport checkout)"
[[ -f $src/pyproject.toml && -f $src/runtime/__main__.py ]] \
    || usage_error "$src is not a qexport checkout (needs pyproject.toml and runtime/__main__.py)"
command -v "$python" >/dev/null || usage_error "no interpreter '$python' (pass --python)"

if [[ ! -x $venv/bin/python ]]; then
    "$python" -m venv "$venv" || die "'$python -m venv $venv' failed (on Debian: apt-get install python3-venv)"
fi
py=$venv/bin/python
pkgs=("$src")
((extensions)) && pkgs+=(onnxruntime-extensions)
# --no-cache-dir: no wheel cache left in the image.
"$py" -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore "${pkgs[@]}" \
    || die "pip install ${pkgs[*]} into $venv failed"
if ((strip_pip)); then
    "$py" -m pip uninstall -y -q --root-user-action=ignore pip setuptools >/dev/null \
        || die "could not uninstall pip/setuptools from $venv"
fi
# The runtime must import, and the toolchain's heavy dependencies must be absent.
"$py" - "$extensions" <<'EOF' || die "the runtime in $venv fails its install check (see above)"
import importlib.util, sys
import numpy, onnxruntime, qexport_runtime.__main__  # noqa: F401
heavy = [m for m in ("torch", "diffusers", "onnx") if importlib.util.find_spec(m) is not None]
if heavy:
    sys.exit(f"install_runtime: error: {', '.join(heavy)} importable in the runtime environment")
extra = ""
if sys.argv[1] == "1":
    import onnxruntime_extensions
    extra = f", onnxruntime-extensions {onnxruntime_extensions.__version__}"
print(f"install_runtime: ok: python {sys.version.split()[0]}, numpy {numpy.__version__}, "
      f"onnxruntime {onnxruntime.__version__}{extra}; no torch")
EOF
