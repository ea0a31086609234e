"""What `kernels/cpu_isa.mojo` decides at run time, seen from Python: whether the ops' AVX512_BF16 paths run here.

The moe_experts op's bf16-dot GEMM and the attention op's bf16-cache decode items use vdpbf16ps after cpuid says
the CPU has it; HYV3_PORTABLE_KERNELS=1 (read on every call) forces the portable float32 paths instead, as on a
CPU without it. Tests use both to cover each path on one machine.
"""

from __future__ import annotations

import os

PORTABLE_ENV = "HYV3_PORTABLE_KERNELS"


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
