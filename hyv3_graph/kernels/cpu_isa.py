"""What `kernels/cpu_isa.mojo` decides at run time, seen from Python: which of the ops' machine-specific paths run.

The moe_experts op's bf16-dot GEMM and the attention op's bf16-cache decode items use vdpbf16ps after cpuid says
the CPU has it; the bf16 GEMMs of linear and moe_experts use AMX tiles where cpuid reports AMX-BF16 and Linux
grants the tile state; the Q8_0 streaming paths use vpdpbusd where cpuid reports AVX512_VNNI.
HYV3_PORTABLE_KERNELS=1 (read on every call) forces the portable float32 paths instead, as on a CPU without any of
them; HYV3_DISABLE_AMX=1 the vdpbf16ps GEMMs where AMX would run. Tests use them to cover each path on one machine.
"""

from __future__ import annotations

import os

PORTABLE_ENV = "HYV3_PORTABLE_KERNELS"
DISABLE_AMX_ENV = "HYV3_DISABLE_AMX"  # the AVX512_BF16 GEMMs instead of AMX (to test both on one machine)
AMX_K_STEP = 32  # kernels/microkernels.mojo: the AMX GEMMs need K (H, I) a multiple of one tile step
REQUIRE_AMX_ENV = "HYV3_REQUIRE_AMX"  # tests fail, rather than skip, where the AMX paths cannot run


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def cpu_has_avx512_bf16() -> bool:
    """The CPU has AVX512_BF16 (the ops ask cpuid; Linux lists the same bit in /proc/cpuinfo)."""
    return "avx512_bf16" in cpu_flags()


def bf16_dot_available() -> bool:
    """Whether the ops' vdpbf16ps paths run here: the CPU has AVX512_BF16 and the portable paths are not forced."""
    return cpu_has_avx512_bf16() and os.environ.get(PORTABLE_ENV) != "1"


def cpu_has_avx512_vnni() -> bool:
    """The CPU has AVX512_VNNI (vpdpbusd: the Q8_0 streaming paths' int8 dot products)."""
    return "avx512_vnni" in cpu_flags()


def vnni_available() -> bool:
    """Whether the Q8_0 streaming paths run vpdpbusd on int8-quantized activations here (AVX512_VNNI, the portable
    paths not forced); otherwise they widen the int8 weights against float32 activations."""
    return cpu_has_avx512_vnni() and os.environ.get(PORTABLE_ENV) != "1"


def cpu_has_amx_bf16() -> bool:
    """The CPU has AMX tiles with bf16 dot products (cpuid leaf 7: AMX-TILE and AMX-BF16)."""
    return {"amx_tile", "amx_bf16"} <= cpu_flags()


def amx_permitted() -> bool:
    """Linux grants this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA), as the ops ask."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(158, 0x1023, 18) == 0


def amx_available() -> bool:
    """Whether the ops' AMX GEMM paths run here: AMX-BF16 granted, neither the portable paths nor
    HYV3_DISABLE_AMX=1 asked for."""
    return (bf16_dot_available() and os.environ.get(DISABLE_AMX_ENV) != "1" and cpu_has_amx_bf16()
            and amx_permitted())


def amx_required() -> bool:
    """HYV3_REQUIRE_AMX=1: an AMX test that cannot run fails instead of skipping."""
    return os.environ.get(REQUIRE_AMX_ENV) == "1"
