#!/usr/bin/env bash
# entrypoint.sh - the images' entry point: checks the command line, then runs the runtime
# (`python -m qexport_runtime`) or the toolchain (`qexport`). Both images use it; CI runs it
# directly against a venv (tests/test_docker_scripts.py).
#
# Usage:
#   entrypoint.sh sample|check|bench ARTIFACT... [OPTIONS]   the runtime (both images)
#   entrypoint.sh convert|eval|calibrate|inspect|models ...  the toolchain (toolchain image)
#   entrypoint.sh help                                       this text
#   entrypoint.sh PROGRAM [ARGS...]                          any program on PATH (bash, python)
#
# Every ARTIFACT of sample/check/bench must be a folder with manifest.json; a missing one is a
# one-line error (exit 2) that, inside a container, names the mount to add.
#
# Environment:
#   QEXPORT_PYTHON   the interpreter (default: python3 on PATH; the images put /opt/venv/bin first)
#   QEXPORT_THREADS  ONNX Runtime threads for sample/check/bench when --threads is not given
#                    (default: the runtime's own, one per core it sees)
set -euo pipefail

PROG=qexport-entrypoint
PYTHON=${QEXPORT_PYTHON:-python3}

fail() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

in_container() { [[ -f /.dockerenv || -f /run/.containerenv || -n ${container:-} ]]; }

# Checks a runtime command line with the runtime's own parser (so options and positionals are
# told apart exactly as the CLI does): every ARTIFACT must be a folder with manifest.json.
# argv[1] is a hint appended to a missing-folder error.
# shellcheck disable=SC2016 # Python source: nothing in it is for the shell to expand
CHECK_ARTIFACTS='
import os, sys
try:
    from qexport_runtime.__main__ import build_parser
except ImportError as e:
    print(f"qexport-entrypoint: error: {sys.executable} cannot import qexport_runtime ({e}); "
          "install it with docker/install_runtime.sh", file=sys.stderr)
    sys.exit(2)
hint, argv = sys.argv[1], sys.argv[2:]
args = build_parser().parse_args(argv)
for p in getattr(args, "artifacts", None) or [args.artifact]:
    if not os.path.exists(p):
        problem = f"artifact folder not found: {p}{hint}"
    elif not os.path.isdir(p):
        problem = f"{p} is not a folder; an artifact is a folder with manifest.json"
    elif not os.access(p, os.R_OK | os.X_OK):
        st = os.stat(p)
        problem = (f"cannot read {p} as uid {os.getuid()} (mode {st.st_mode & 0o777:o}, owner uid {st.st_uid}); "
                   "run as its owner (docker run --user \"$(id -u):$(id -g)\") or chmod -R a+rX it")
    elif not os.path.isfile(os.path.join(p, "manifest.json")):
        problem = f"{p} has no manifest.json; is it an artifact folder? (qexport convert writes them)"
    else:
        continue
    print(f"qexport-entrypoint: error: {problem}", file=sys.stderr)
    sys.exit(2)
'

run_runtime() {
    local args=("$@") a want_help=0 has_threads=0
    command -v "$PYTHON" >/dev/null || fail "no interpreter '$PYTHON' (set QEXPORT_PYTHON)"
    for a in "${args[@]}"; do
        case $a in
            -h | --help) want_help=1 ;;
            --threads | --threads=*) has_threads=1 ;;
        esac
    done
    if [[ -n ${QEXPORT_THREADS:-} ]] && ((!has_threads)); then
        [[ $QEXPORT_THREADS =~ ^[1-9][0-9]*$ ]] || fail "QEXPORT_THREADS=$QEXPORT_THREADS is not a positive integer"
        args+=(--threads "$QEXPORT_THREADS")
    fi
    if ((!want_help)); then
        local hint=""
        in_container && hint=" (mount the host folder: docker run -v \"\$PWD/artifacts:/artifacts\" ..., then pass /artifacts/NAME)"
        # A usage error is already one line from the runtime's parser: its status is passed on.
        "$PYTHON" -c "$CHECK_ARTIFACTS" "$hint" "${args[@]}" || exit $?
    fi
    exec "$PYTHON" -m qexport_runtime "${args[@]}"
}

run_toolchain() {
    command -v "$PYTHON" >/dev/null || fail "no interpreter '$PYTHON' (set QEXPORT_PYTHON)"
    "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("torch") and u.find_spec("qexport")))' \
        || fail "'$1' needs the toolchain (torch + qexport), which this environment lacks; use the" \
                "qexport-toolchain image or docker/install_toolchain.sh (the runtime image runs sample/check/bench)"
    exec "$PYTHON" -c 'import sys; from qexport.cli.main import main; sys.exit(main())' "$@"
}

main() {
    (($#)) || fail "no command; expected sample, check, bench, convert, eval, ... (see 'help')"
    case $1 in
        help | -h | --help) usage ;;
        sample | check | bench) run_runtime "$@" ;;
        convert | eval | calibrate | inspect | models) run_toolchain "$@" ;;
        -*) fail "unknown option $1; expected a command first (see 'help')" ;;
        *)
            command -v "$1" >/dev/null \
                || fail "unknown command '$1'; expected sample, check, bench, convert, eval, calibrate, inspect, models, help, or a program on PATH"
            exec "$@" ;;
    esac
}

main "$@"
