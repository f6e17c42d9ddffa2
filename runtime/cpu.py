"""This CPU's integer-kernel features (AVX2 / AVX-512 / VNNI / NEON / dotprod / i8mm) and the int8
GEMM path ONNX Runtime's MLAS takes on it, with whether that path can saturate.

x86 features come from the CPUID instruction itself (run through ctypes), as MLAS reads them, so an
emulated CPU (`qemu-x86_64 -cpu Haswell`) reports what it emulates; `/proc/cpuinfo` is the fallback.
arm64 features come from the kernel's hardware capabilities (`getauxval`), likewise per emulated CPU.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from dataclasses import asdict, dataclass

# x86-64 SysV: cpuid(leaf=edi, subleaf=esi, out=rdx) → out[0..3] = eax, ebx, ecx, edx
_CPUID = bytes.fromhex("53" "89f8" "89f1" "4989d0" "0fa2" "418900" "41895804" "41894808" "4189500c" "5b" "c3")


@dataclass(frozen=True)
class KernelPath:
    isa: str            # e.g. "x86_64 AVX2", "x86_64 AVX-512 VNNI", "arm64 NEON dotprod"
    features: tuple     # the flags found, lowercase
    u8s8: str           # how MLAS multiplies uint8 activations by int8 weights here
    saturates: bool     # whether a pair of u8·s8 products is summed into a saturating int16
    source: str         # "cpuid", "/proc/cpuinfo", "hwcap"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        return d


def _x86_cpuid() -> dict[str, bool] | None:
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):  # W^X policies forbid executable pages
        return None
    buf.write(_CPUID)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(addr)
    out = (ctypes.c_uint32 * 4)()

    def regs(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
        fn(leaf, sub, out)
        return tuple(out)

    max_leaf = regs(0)[0]
    _, _, ecx1, _ = regs(1)
    eax7_1 = regs(7, 1)[0] if max_leaf >= 7 else 0
    _, ebx7, ecx7, edx7 = regs(7, 0) if max_leaf >= 7 else (0, 0, 0, 0)
    flags = dict(avx=ecx1 >> 28 & 1, avx2=ebx7 >> 5 & 1, avx512f=ebx7 >> 16 & 1, avx512bw=ebx7 >> 30 & 1,
                 avx512_vnni=ecx7 >> 11 & 1, avx_vnni=eax7_1 >> 4 & 1, amx_int8=edx7 >> 25 & 1)
    return {k: bool(v) for k, v in flags.items()}


def _proc_cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _arm_hwcaps() -> dict[str, bool] | None:
    try:
        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        hwcap, hwcap2 = libc.getauxval(16), libc.getauxval(26)  # AT_HWCAP, AT_HWCAP2
    except (OSError, AttributeError):
        return None
    return dict(asimd=bool(hwcap >> 1 & 1), asimddp=bool(hwcap >> 20 & 1), i8mm=bool(hwcap2 >> 13 & 1))


def kernel_path() -> KernelPath:
    """What this CPU's int8 kernels are (see module docstring)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        f, source = _x86_cpuid(), "cpuid"
        if f is None:
            flags, source = _proc_cpuinfo_flags(), "/proc/cpuinfo"
            f = {k: k in flags for k in ("avx", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")}
        have = tuple(k for k, v in f.items() if v)
        if f["amx_int8"] or f["avx512_vnni"] or f["avx_vnni"]:
            name = "AMX" if f["amx_int8"] else ("AVX-512 VNNI" if f["avx512_vnni"] else "AVX-VNNI")
            return KernelPath(f"x86_64 {name}", have, "VPDPBUSD: 32-bit accumulation", False, source)
        if f["avx512bw"] or f["avx2"]:
            name = "AVX-512 (no VNNI)" if f["avx512bw"] else "AVX2"
            return KernelPath(f"x86_64 {name}", have, "VPMADDUBSW: pairs summed in saturating int16", True, source)
        return KernelPath("x86_64 SSE", have, "SSE: 16-bit widening (not measured)", False, source)
    if machine in ("aarch64", "arm64"):
        f, source = _arm_hwcaps(), "hwcap"
        if f is None:
            flags, source = _proc_cpuinfo_flags(), "/proc/cpuinfo"
            f = {k: k in flags for k in ("asimd", "asimddp", "i8mm")}
        have = tuple(k for k, v in f.items() if v)
        name = "i8mm" if f["i8mm"] else ("dotprod" if f["asimddp"] else "NEON")
        how = {"i8mm": "SMMLA/USMMLA", "dotprod": "SDOT/UDOT", "NEON": "UMULL/UADALP"}[name]
        return KernelPath(f"arm64 {name}", have, f"{how}: 32-bit accumulation", False, source)
    return KernelPath(machine, (), "unknown", False, "none")
