#!/usr/bin/env bash
# install_toolchain.sh - install the toolchain (qexport[toolchain]: convert / eval / bench) from
# a qexport checkout into a virtual environment, with the CPU build of torch at the version
# pyproject.toml pins. Dockerfile.toolchain runs it; CI runs it directly.
#
# Usage:
#   install_toolchain.sh [--venv DIR] [--python PY] [--torch-index URL] [--dry-run] SRC_DIR
#     SRC_DIR            the qexport checkout (holds pyproject.toml and qexport/)
#     --venv DIR         the virtual environment to create or reuse (default: /opt/venv)
#     --python PY        the interpreter that creates it (default: python3)
#     --torch-index URL  the index torch alone comes from (default: $TORCH_INDEX_URL, else
#                        https://download.pytorch.org/whl/cpu, PyTorch's CPU-only wheels; a plain
#                        `pip install torch` from PyPI is the CUDA build on x86-64, ~GBs).
#                        An empty URL uses pip's configured indexes (a machine with a local
#                        CPU wheel).
#     --dry-run          print the install commands instead of running them
#
# Exit status: 2 on bad arguments, 1 when an install step or the final check fails (torch at
# the pinned version and a CPU build, `qexport --version` runs).
set -euo pipefail

PROG=install_toolchain
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: error: %s; see the usage at the top of %s\n' "$PROG" "$1" "$0" >&2; exit 2; }

venv=/opt/venv python=python3 dry_run=0 src=
torch_index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
while (($#)); do
    case $1 in
        --venv) (($# >= 2)) || usage_error "--venv needs a directory"; venv=$2; shift 2 ;;
        --python) (($# >= 2)) || usage_error "--python needs an interpreter"; python=$2; shift 2 ;;
        --torch-index) (($# >= 2)) || usage_error "--torch-index needs a URL (or '')"; torch_index=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) usage_error "unknown option $1" ;;
        *) [[ -z $src ]] || usage_error "more than one SRC_DIR ($src, $1)"; src=$1; shift ;;
    esac
done
[[ -n $src ]] || usage_error "missing SRC_DIR (the qexport checkout)"
[[ -f $src/pyproject.toml && -f $src/qexport/cli/main.py ]] \
    || usage_error "$src is not a qexport checkout (needs pyproject.toml and qexport/cli/main.py)"
# The one pin, read where it is declared (tests/test_packaging.py keeps it exact).
torch_pin=$(grep -oE '"torch==[^"]+"' "$src/pyproject.toml" | tr -d '"' | head -1)
[[ -n $torch_pin ]] || die "no exact torch==VERSION pin in $src/pyproject.toml"
torch_version=${torch_pin#torch==}

py=$venv/bin/python
pip_install=("$py" -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore)
torch_cmd=("${pip_install[@]}" "$torch_pin")
[[ -n $torch_index ]] && torch_cmd+=(--index-url "$torch_index")
toolchain_cmd=("${pip_install[@]}" "${src}[toolchain]")

if ((dry_run)); then
    [[ -x $py ]] || printf '%q -m venv %q\n' "$python" "$venv"
    printf '%q ' "${torch_cmd[@]}"; echo
    printf '%q ' "${toolchain_cmd[@]}"; echo
    exit 0
fi

command -v "$python" >/dev/null || usage_error "no interpreter '$python' (pass --python)"
if [[ ! -x $py ]]; then
    "$python" -m venv "$venv" || die "'$python -m venv $venv' failed (on Debian: apt-get install python3-venv)"
fi
# torch first, alone from its index; the toolchain install then finds the pin satisfied.
"${torch_cmd[@]}" || die "pip install $torch_pin${torch_index:+ --index-url $torch_index} failed"
"${toolchain_cmd[@]}" || die "pip install ${src}[toolchain] into $venv failed"
"$py" - "$torch_version" <<'EOF' || die "the toolchain in $venv fails its install check (see above)"
import sys
import torch
want = sys.argv[1]
if torch.__version__.split("+")[0] != want:
    sys.exit(f"install_toolchain: error: torch {torch.__version__} installed, pyproject.toml pins {want}")
if torch.version.cuda is not None:
    sys.exit(f"install_toolchain: error: torch {torch.__version__} is a CUDA {torch.version.cuda} build, "
             "not the CPU one (install it from https://download.pytorch.org/whl/cpu)")
print(f"install_toolchain: ok: torch {torch.__version__} (CPU build)")
EOF
"$venv/bin/qexport" --version || die "$venv/bin/qexport --version fails"
