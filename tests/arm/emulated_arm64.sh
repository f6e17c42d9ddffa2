#!/usr/bin/env bash
# emulated_arm64.sh - an emulated arm64 (aarch64) Debian for running the device-side code
# (numpy + onnxruntime) as it would run on a Raspberry Pi / ARM board, on an x86-64 host.
#
# How: `debootstrap --foreign` builds a minimal arm64 Debian (same release as the host) in
# CACHE_DIR/rootfs; every arm64 program is then run with `proot -q qemu-aarch64-static`
# (user-mode emulation: no binfmt_misc, no privileges beyond ptrace needed). A venv at
# /opt/venv inside the rootfs holds numpy and onnxruntime, installed from aarch64 wheels
# that the host's pip pre-downloads into CACHE_DIR/wheels (pip under emulation is slow).
#
# Usage:
#   emulated_arm64.sh setup CACHE_DIR
#       Idempotent. Installs host packages (debootstrap qemu-user-static proot) if missing,
#       builds the rootfs and the venv unless already complete. ~10 min the first time,
#       ~1 s afterwards.
#   emulated_arm64.sh run CACHE_DIR BIND_DIR [BIND_DIR...] -- CMD...
#       Runs CMD (e.g. `python -m pytest ...` or `python script.py`) inside the rootfs with
#       each BIND_DIR bind-mounted at its own path; working dir is the first BIND_DIR.
#       `python` is /opt/venv/bin/python. The environment is cleared (host PYTHONPATH, PIP_*
#       etc. would break things); pass variables with `-- env NAME=VALUE python ...`.
#       Exit status is CMD's.
#   emulated_arm64.sh check CACHE_DIR
#       Prints arch, numpy and onnxruntime versions and the time of `import onnxruntime`
#       under emulation, runs a tiny int8 ONNX model inside and compares with the host.
#
# Environment:
#   HOST_PYTHON  host python (default: python3). Its onnxruntime version is the one installed
#                in the rootfs (if an aarch64 wheel exists); `check` needs onnx + onnxruntime.
#   ARM_MIRROR   Debian mirror URL (default: read from the host's apt sources).
#   ARM_CPU      CPU model qemu emulates (QEMU_CPU), e.g. cortex-a72 (Raspberry Pi 4: no
#                dotprod/i8mm, so onnxruntime takes the same int8 kernels as on a Pi 4) or
#                cortex-a76 (Pi 5). Default: qemu's "max" (dotprod, i8mm, SVE...).
#
# Exit status: 2 with a one-line "emulation not possible: ..." when this host cannot emulate
# (a test may skip on 2); 1 on other errors.
#
# Pitfalls (measured): `qemu-aarch64-static -L ROOTFS` instead of proot, or binding the
# host's /sys, make `import onnxruntime` crash; pip's `--platform manylinux2014_aarch64`
# silently resolves onnxruntime 1.16.3, so manylinux_2_28_aarch64 is used. Debian's proot
# 5.1.0 does not know statx/faccessat2 (see ENOSYS_WRAPPER). In Docker, debootstrap makes
# /proc a symlink and stage 2 would mount proc/sysfs for real (see build_rootfs).
# Emulated compute is slow: small conv nets ran 140-350x slower than native here.
set -euo pipefail

PROG=emulated_arm64
HOST_PYTHON=${HOST_PYTHON:-python3}
HOST_PY3=$(command -v /usr/bin/python3 python3 | head -1 || true) # runs the seccomp wrapper below
T0=$SECONDS
GUEST_PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

exec 3>&2 # progress lines go to the original stderr even when a step's output is redirected
log() { printf '[%s +%4ds] %s\n' "$PROG" "$((SECONDS - T0))" "$*" >&3; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
impossible() { printf '%s: emulation not possible: %s\n' "$PROG" "$*" >&2; exit 2; }

# step "message" cmd... : run a command, logging how long it took.
step() {
    local msg=$1 t=$SECONDS rc=0; shift
    log "$msg ..."
    "$@" || rc=$?
    if ((rc)); then log "$msg: FAILED (exit $rc) after $((SECONDS - t))s"; return "$rc"; fi
    log "$msg: done in $((SECONDS - t))s"
}

# ---------------------------------------------------------------- host side

host_codename() {
    # shellcheck disable=SC1091
    (. /etc/os-release && echo "${VERSION_CODENAME:-}")
}

# The Debian mirror the host's apt uses for the release itself (not -security/-updates),
# read from one-line (*.list) and deb822 (*.sources) files.
detect_mirror() {
    local codename=$1 f url
    if [[ -n ${ARM_MIRROR:-} ]]; then echo "$ARM_MIRROR"; return; fi
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        url=$(awk -v c="$codename" '
            $1 == "deb" { i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == c) { print $i; exit } }' "$f")
        if [[ -n $url ]]; then echo "$url"; return; fi
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        url=$(awk -v c="$codename" 'BEGIN { RS = ""; FS = "\n" }
            { types = ""; uris = ""; suites = ""; enabled = "yes"
              for (i = 1; i <= NF; i++) {
                  line = $i; key = line; sub(/:.*/, "", key); sub(/^[^:]*:[ \t]*/, "", line)
                  if (key == "Types") types = " " line " "
                  else if (key == "URIs") uris = line
                  else if (key == "Suites") suites = " " line " "
                  else if (key == "Enabled") enabled = line }
              if (types ~ / deb / && suites ~ (" " c " ") && enabled != "no") {
                  split(uris, u, /[ \t]+/); print u[1]; exit } }' "$f")
        if [[ -n $url ]]; then echo "$url"; return; fi
    done
    return 1
}

ensure_host_tools() {
    [[ $(uname -s) == Linux ]] || impossible "host is $(uname -s), not Linux"
    [[ $(uname -m) == x86_64 ]] || impossible "host arch $(uname -m) is not x86_64"
    [[ -n $HOST_PY3 ]] || impossible "no python3 on the host (needed for the seccomp wrapper)"
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    command -v proot >/dev/null || missing+=(proot)
    if ((${#missing[@]})); then
        command -v apt-get >/dev/null || impossible "missing ${missing[*]} and no apt-get"
        [[ $(id -u) == 0 ]] || impossible "missing ${missing[*]} and not root to apt-get install them"
        step "apt-get install ${missing[*]}" apt_install "${missing[@]}"
    fi
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || impossible "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
        || impossible "apt-get install $* failed"
}

# ---------------------------------------------------------------- running arm64 code

# proot 5.1.0 (the one Debian ships) predates the statx, faccessat2, openat2 and execveat
# syscalls: it passes their paths through untranslated, so inside the rootfs `ls`/`stat`
# would show the HOST's files and dash's `[ -x FILE ]` would test the host's. This host-side
# wrapper installs a seccomp filter making those syscalls fail with ENOSYS, upon which qemu
# and glibc fall back to fstatat/faccessat, which proot translates. Then it execs its args.
ENOSYS_WRAPPER='
import ctypes, os, struct, sys
NRS = [332, 439, 437, 322]  # x86_64: statx, faccessat2, openat2, execveat
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
ALLOW, ENOSYS = 0x7FFF0000, 0x00050000 | 38
ins = [(LD_ABS, 0, 0, 4), (JEQ, 0, len(NRS) + 1, 0xC000003E), (LD_ABS, 0, 0, 0)]
ins += [(JEQ, len(NRS) - i, 0, nr) for i, nr in enumerate(NRS)]
ins += [(RET, 0, 0, ALLOW), (RET, 0, 0, ENOSYS)]
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in ins))
prog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(ins), ctypes.addressof(code)))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, prog, 0, 0):  # NO_NEW_PRIVS, SECCOMP
    sys.exit("seccomp filter: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
'

# emu ROOTFS WORKDIR [proot options...] -- CMD... : run CMD inside the rootfs, clean env.
# Binds only /proc and /dev from the host: binding the host's /sys makes onnxruntime crash.
# Without any /sys, onnxruntime's cpuinfo prints "Error in cpuinfo: failed to parse the list
# of possible processors" on every import, so the two CPU lists it reads are faked
# (0-N, N+1 = host CPUs: qemu-user runs guest threads on host threads).
emu() {
    local rootfs=$1 workdir=$2; shift 2
    local opts=()
    while (($#)) && [[ $1 != -- ]]; do opts+=("$1"); shift; done
    shift # the --
    local cpus want f
    cpus=$(dirname "$rootfs")/sys-cpu want="0-$(($(nproc) - 1))"
    mkdir -p "$cpus"
    for f in possible present; do
        if [[ $(cat "$cpus/$f" 2>/dev/null) != "$want" ]]; then
            echo "$want" >"$cpus/$f.$$" && mv -f "$cpus/$f.$$" "$cpus/$f"
        fi
        opts+=(-b "$cpus/$f:/sys/devices/system/cpu/$f")
    done
    env -i PATH="$GUEST_PATH" HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
        TMPDIR=/tmp PROOT_TMP_DIR="${PROOT_TMP_DIR:-/tmp}" ${ARM_CPU:+QEMU_CPU="$ARM_CPU"} \
        "$HOST_PY3" -c "$ENOSYS_WRAPPER" \
        "$(command -v proot)" -q "$(command -v qemu-aarch64-static)" \
        -r "$rootfs" -b /proc -b /dev "${opts[@]}" -w "$workdir" "$@"
}

# ---------------------------------------------------------------- setup

build_rootfs() {
    local rootfs=$1 codename mirror keyring=()
    codename=$(host_codename)
    [[ -n $codename ]] || impossible "cannot tell the host's Debian release from /etc/os-release"
    mirror=$(detect_mirror "$codename") || impossible "no apt source for '$codename' in /etc/apt (set ARM_MIRROR)"
    [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] \
        && keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    # --foreign: the host cannot exec arm64 binaries (no binfmt), so the second stage runs
    # under proot + qemu below.
    step "debootstrap stage 1 ($codename arm64 from $mirror)" \
        debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,python3-venv \
        "${keyring[@]}" "$codename" "$rootfs" "$mirror" >"$rootfs.debootstrap.log" 2>&1 \
        || die "debootstrap stage 1 failed, see $rootfs.debootstrap.log"
    # In a Docker container stage 1 makes /proc a symlink to the host's /proc (it loops
    # with proot's -b /proc), and stage 2 would mount proc and sysfs for real (reaching the
    # host's mounts through proot). proot already provides /proc and /dev: mount nothing.
    if [[ -L $rootfs/proc ]]; then rm -f "$rootfs/proc" && mkdir "$rootfs/proc"; fi
    printf '%s\n' "# added by $0: proot provides /proc and /dev" \
        'setup_proc () { :; }' 'setup_dynamic_devices () { :; }' >>"$rootfs/debootstrap/functions"
    step "debootstrap stage 2 (emulated)" \
        emu "$rootfs" / -0 -- /debootstrap/debootstrap --second-stage \
        >>"$rootfs.debootstrap.log" 2>&1 \
        || die "debootstrap stage 2 failed, see $rootfs.debootstrap.log"
    rm -f "$rootfs"/var/cache/apt/archives/*.deb # the downloaded packages (~40 MB)
    date -u +%FT%TZ >"$rootfs/.${PROG}.rootfs-complete"
}

# pip_download DEST PYVER SPEC... : fetch aarch64 wheels (and their dependencies) on the host.
pip_download() {
    local dest=$1 pyver=$2; shift 2
    local py=$HOST_PYTHON
    "$py" -m pip --version >/dev/null 2>&1 || py=python3
    "$py" -m pip download --quiet --dest "$dest" --only-binary=:all: \
        --platform manylinux_2_28_aarch64 --implementation cp \
        --python-version "$pyver" --abi "cp${pyver/./}" "$@"
}

# host_version MODULE : the module's version in HOST_PYTHON, or nothing.
host_version() {
    "$HOST_PYTHON" -c "import $1; print($1.__version__)" 2>/dev/null || true
}

build_venv() {
    local cache=$1 rootfs=$1/rootfs wheels=$1/wheels pyver ort np ort_spec np_spec
    pyver=$(basename "$(readlink -f "$rootfs/usr/bin/python3")") # python3.11
    pyver=${pyver#python}
    [[ $pyver =~ ^3\.[0-9]+$ ]] || die "cannot tell the rootfs's python version ($pyver)"
    ort=$(host_version onnxruntime)
    np=$(host_version numpy)
    mkdir -p "$wheels"
    log "rootfs python $pyver; host onnxruntime ${ort:-none}, numpy ${np:-none}"
    # Same versions as the host when aarch64 wheels exist for them, else the newest.
    ort_spec=onnxruntime np_spec=numpy
    if [[ -n $ort ]] && pip_download "$wheels" "$pyver" "onnxruntime==$ort" 2>/dev/null; then
        ort_spec="onnxruntime==$ort"
    fi
    if [[ -n $np ]] && pip_download "$wheels" "$pyver" "numpy==$np" "$ort_spec" 2>/dev/null; then
        np_spec="numpy==$np"
    fi
    step "pip download $ort_spec $np_spec (aarch64, cp${pyver/./})" \
        pip_download "$wheels" "$pyver" "$ort_spec" "$np_spec" \
        || die "pip download of aarch64 wheels failed"
    rm -rf "$rootfs/opt/venv"
    step "create venv /opt/venv (emulated)" \
        emu "$rootfs" / -- /usr/bin/python3 -m venv /opt/venv
    step "pip install $ort_spec $np_spec (emulated, from local wheels)" \
        emu "$rootfs" / -b "$wheels:/wheels" -- /opt/venv/bin/python -m pip install \
        --quiet --no-index --find-links /wheels --disable-pip-version-check "$ort_spec" "$np_spec"
    emu "$rootfs" / -- /opt/venv/bin/python -c \
        'import numpy, onnxruntime; print("numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__)' \
        >"$rootfs/opt/venv/.${PROG}.venv-complete" \
        || die "import numpy, onnxruntime fails in the emulated venv"
    echo "host_onnxruntime ${ort:-none}" >>"$rootfs/opt/venv/.${PROG}.venv-complete"
}

cmd_setup() {
    local cache=${1:?usage: setup CACHE_DIR}
    mkdir -p "$cache"
    cache=$(cd "$cache" && pwd)
    local rootfs=$cache/rootfs
    ensure_host_tools
    if [[ ! -f $rootfs/.${PROG}.rootfs-complete ]]; then
        build_rootfs "$rootfs"
    else
        log "rootfs already complete: $rootfs"
    fi
    # Smoke test of the emulation itself (ptrace may be forbidden in some containers).
    emu "$rootfs" / -- /bin/true 2>/dev/null \
        || impossible "proot -q qemu-aarch64-static cannot run /bin/true in $rootfs (ptrace blocked?)"
    local marker=$rootfs/opt/venv/.${PROG}.venv-complete ort
    ort=$(host_version onnxruntime)
    # Rebuild the venv only if it is incomplete, or HOST_PYTHON has an onnxruntime version
    # other than the one it was built for (no onnxruntime on the host: keep what is there).
    if [[ -f $marker ]] && { [[ -z $ort ]] || grep -qx "host_onnxruntime $ort" "$marker"; }; then
        log "venv already complete: $(head -1 "$marker")"
    else
        build_venv "$cache"
        log "venv ready: $(head -1 "$marker")"
    fi
    log "setup complete in $((SECONDS - T0))s; cache $(du -sh "$cache" 2>/dev/null | cut -f1) at $cache"
}

# ---------------------------------------------------------------- run / check

require_ready() {
    local rootfs=$1/rootfs
    [[ -f $rootfs/opt/venv/.${PROG}.venv-complete ]] \
        || die "$1 is not set up: run '$0 setup $1' first"
    command -v proot >/dev/null && command -v qemu-aarch64-static >/dev/null \
        || die "proot / qemu-aarch64-static missing: run '$0 setup $1' first"
}

cmd_run() {
    local cache=${1:?usage: run CACHE_DIR BIND_DIR [BIND_DIR...] -- CMD...}; shift
    cache=$(cd "$cache" && pwd)
    require_ready "$cache"
    local binds=() dirs=() d
    while (($#)) && [[ $1 != -- ]]; do
        d=$(cd "$1" 2>/dev/null && pwd) || die "no such directory: $1"
        dirs+=("$d") binds+=(-b "$d")
        shift
    done
    (($# >= 2)) && ((${#dirs[@]})) || die "usage: run CACHE_DIR BIND_DIR [BIND_DIR...] -- CMD..."
    shift # the --
    emu "$cache/rootfs" "${dirs[0]}" "${binds[@]}" -- "$@"
}

cmd_check() {
    local cache=${1:?usage: check CACHE_DIR}
    cache=$(cd "$cache" && pwd)
    require_ready "$cache"
    "$HOST_PYTHON" -c 'import onnx, onnxruntime, numpy' 2>/dev/null \
        || die "HOST_PYTHON=$HOST_PYTHON lacks onnx/onnxruntime/numpy (set HOST_PYTHON)"
    CHECK_TMP=$(mktemp -d "${TMPDIR:-/tmp}/${PROG}.check.XXXXXX")
    trap 'rm -rf "$CHECK_TMP"' EXIT
    local tmp=$CHECK_TMP

    # Host: a tiny model exercising int8 kernels (QuantizeLinear -> QLinearConv u8s8 ->
    # DequantizeLinear) and a float path (MatMul + Add + Relu); its input and host output.
    "$HOST_PYTHON" - "$tmp" <<'EOF'
import sys, numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto as T
d = sys.argv[1]
rng = np.random.default_rng(0)
w = rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8)
m = rng.standard_normal((16, 16)).astype(np.float32)
inits = [numpy_helper.from_array(a, n) for a, n in [
    (np.float32(0.02), "xs"), (np.uint8(128), "xz"), (w, "w"), (np.float32(0.01), "ws"),
    (np.int8(0), "wz"), (np.float32(0.05), "ys"), (np.uint8(128), "yz"), (m, "m"),
    (np.full(16, 0.1, np.float32), "b")]]
nodes = [
    helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
    helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"],
                     pads=[1, 1, 1, 1]),
    helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["yd"]),
    helper.make_node("MatMul", ["yd", "m"], ["mm"]),
    helper.make_node("Add", ["mm", "b"], ["ab"]),
    helper.make_node("Relu", ["ab"], ["y"]),
]
g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                      [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 16, 16])], inits)
model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, f"{d}/tiny.onnx")
x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
np.save(f"{d}/x.npy", x)
s = ort.InferenceSession(f"{d}/tiny.onnx", providers=["CPUExecutionProvider"])
np.save(f"{d}/host_y.npy", s.run(None, {"x": x})[0])
print(f"host: onnxruntime {ort.__version__}, numpy {np.__version__}")
EOF

    cat >"$tmp/guest.py" <<'EOF'
import platform, sys, time
t = time.perf_counter(); import numpy as np; t_np = time.perf_counter() - t
t = time.perf_counter(); import onnxruntime as ort; t_ort = time.perf_counter() - t
import os
print(f"guest: cpu {os.environ.get('QEMU_CPU', 'max')}, machine {platform.machine()}, python {platform.python_version()}, "
      f"numpy {np.__version__}, onnxruntime {ort.__version__}")
print(f"guest: import numpy {t_np:.1f}s, import onnxruntime {t_ort:.1f}s (emulated)")
t = time.perf_counter()
s = ort.InferenceSession("tiny.onnx", providers=["CPUExecutionProvider"])
y = s.run(None, {"x": np.load("x.npy")})[0]
print(f"guest: session + run {time.perf_counter() - t:.1f}s")
h = np.load("host_y.npy")
diff = float(np.abs(y - h).max())
print(f"compare: max |arm64 - host| = {diff:.3g}, exactly equal: {bool(np.array_equal(y, h))}")
assert platform.machine() == "aarch64", platform.machine()
# One int8 output step (0.05) through MatMul could differ if kernels round differently.
ok = np.allclose(y, h, rtol=1e-4, atol=1e-4)
print("check: OK" if ok else "check: MISMATCH")
sys.exit(0 if ok else 1)
EOF
    local t=$SECONDS
    cmd_run "$cache" "$tmp" -- python guest.py
    log "check done in $((SECONDS - t))s"
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        setup) cmd_setup "$@" ;;
        run) cmd_run "$@" ;;
        check) cmd_check "$@" ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 1 ;;
    esac
}

main "$@"
