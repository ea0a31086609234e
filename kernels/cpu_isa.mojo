# Machine-specific instructions, chosen at run time: MAX compiles our kernels for the build machine's CPU
# model (rocketlake on the Intel hosts, znver4/znver5 on the AMD ones, znver3 on an AVX2-only Zen 3), not for every
# CPU the same code may meet, and its bf16 intrinsics crash the compile where the target lacks them. So the
# instructions go in as inline assembly, which assembles for any x86-64 target, and execute only after cpuid says
# the CPU has them. A target without AVX-512 has no zmm registers to give the asm ("could not allocate output
# register" on every compile), so there the zmm asm is not emitted and use_bf16_dot() is False.
# The same holds for AVX512_VNNI (vpdpbusd: use_vnni, dot_u8_i8), which the Q8_0 streaming paths use.
# HYV3_PORTABLE_KERNELS=1 forces the portable SIMD paths, HYV3_DISABLE_AMX=1 the AVX512_BF16 ones where AMX
# would run (both read on every call: tests flip them in-process to reach every path on one machine).
# cpuid itself runs once per process (`_cpu_features`, a process-wide global): in the VMs here it traps to the
# hypervisor and costs ~3.9 us, and every op asked for one to three of them per call (measured: docs/perf-notes.md,
# "fixed cost of an op call").
#
# AMX (Intel Sapphire Rapids and later): the tile registers are off until the process asks Linux for them
# (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA); the permission is per process, so any thread may ask, and asking
# again is harmless. The tile configuration is per thread: every task that uses tiles loads it first
# (amx_configure). One configuration serves every user: all eight tiles 16 rows x 64 bytes.
from std.sys._assembly import inlined_assembly
from std.sys.info import CompilationTarget
from std.memory import bitcast
from std.os import getenv
from std.ffi import _Global, external_call

comptime LANES = 16  # 32-bit lanes of a 512-bit vector: the width every kernel's SIMD code is written for
comptime I32x = SIMD[DType.int32, LANES]
comptime F32x = SIMD[DType.float32, LANES]


def portable_only() -> Bool:
    return getenv("HYV3_PORTABLE_KERNELS") == "1"


comptime _AVX512_BF16 = 1
comptime _AVX512_VNNI = 2
comptime _AMX_BF16 = 4  # AMX-BF16 and AMX-TILE


def _probe_cpu_features() -> Int:
    """The _AVX512_BF16 | _AVX512_VNNI | _AMX_BF16 bits this CPU reports: cpuid leaf 7 subleaf 1 EAX bit 5
    (AVX512_BF16), subleaf 0 ECX bit 11 (AVX512_VNNI), subleaf 0 EDX bits 22 and 24 (AMX-BF16, AMX-TILE). Each asm
    puts ecx back to its input (the subleaf), which the compiler assumes unchanged."""
    comptime C = "={eax},{eax},{ecx},~{ebx},~{edx}"
    var eax1 = inlined_assembly["cpuid\n\txorl %ecx, %ecx\n\tincl %ecx", Int32, constraints=C](Int32(7), Int32(1))
    var ecx0 = inlined_assembly["cpuid\n\tmovl %ecx, %eax\n\txorl %ecx, %ecx", Int32, constraints=C](Int32(7), Int32(0))
    var edx0 = inlined_assembly["cpuid\n\tmovl %edx, %eax\n\txorl %ecx, %ecx", Int32, constraints=C](Int32(7), Int32(0))
    var bits = 0
    if (eax1 >> 5) & 1 == 1:
        bits |= _AVX512_BF16
    if (ecx0 >> 11) & 1 == 1:
        bits |= _AVX512_VNNI
    if (edx0 >> 22) & 1 == 1 and (edx0 >> 24) & 1 == 1:
        bits |= _AMX_BF16
    return bits


comptime _cpu_features = _Global["HYV3_CPU_FEATURES", _probe_cpu_features]


def _has(feature: Int) -> Bool:
    """Whether the CPU reports `feature` (cpuid read on the first call of the process)."""
    try:
        return _cpu_features.get_or_create_ptr()[] & feature != 0
    except:
        return False


def has_avx512_bf16() -> Bool:
    """AVX512_BF16 (vdpbf16ps, vcvtneps2bf16)."""
    return _has(_AVX512_BF16)


def use_bf16_dot() -> Bool:
    return CompilationTarget.has_avx512f() and has_avx512_bf16() and not portable_only()


def has_avx512_vnni() -> Bool:
    """AVX512_VNNI (vpdpbusd)."""
    return _has(_AVX512_VNNI)


def use_vnni() -> Bool:
    """The Q8_0 streaming paths run vpdpbusd on int8-quantized activations: the CPU has AVX512_VNNI and the portable
    paths are not asked for."""
    return CompilationTarget.has_avx512f() and has_avx512_vnni() and not portable_only()


def has_amx_bf16() -> Bool:
    """AMX-BF16 and AMX-TILE."""
    return _has(_AMX_BF16)


def amx_permitted() -> Bool:
    """Asks Linux for the tile data state (syscall arch_prctl = 158, ARCH_REQ_XCOMP_PERM = 0x1023,
    XFEATURE_XTILEDATA = 18); False where the kernel refuses (no AMX, or an OS that does not enable it)."""
    return external_call["syscall", Int64](Int64(158), Int64(0x1023), Int64(18)) == 0


def use_amx() -> Bool:
    """The AMX bf16 GEMM runs: the CPU has it, the OS grants it, and neither the portable paths nor
    HYV3_DISABLE_AMX=1 are asked for. Only after use_bf16_dot() (AMX CPUs have AVX512_BF16: the epilogues use it)."""
    return use_bf16_dot() and getenv("HYV3_DISABLE_AMX") != "1" and has_amx_bf16() and amx_permitted()


def amx_configure():
    """Loads this thread's tile configuration: palette 1, tiles 0..7 of 16 rows x 64 bytes (16 fp32 or 32 bf16 a
    row). Loading it also zeroes every tile."""
    var cfg = SIMD[DType.uint8, 64](0)
    cfg[0] = 1
    comptime for t in range(8):
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = 16
    var buf = List[UInt8](length=64, fill=0)
    buf.unsafe_ptr().unsafe_store(0, cfg)
    inlined_assembly["ldtilecfg ($0)", NoneType, constraints="r,~{memory}"](Int(buf.unsafe_ptr()))
    _ = buf^


def amx_release():
    """Returns the tiles to their initial state (so the thread's saved state shrinks again)."""
    inlined_assembly["tilerelease", NoneType, constraints="~{memory}"]()


@always_inline
def dot_bf16_pairs(acc: F32x, a: I32x, b: I32x) -> F32x:
    """vdpbf16ps: acc[i] += a.bf16[2i] * b.bf16[2i] + a.bf16[2i+1] * b.bf16[2i+1], fp32 accumulation.
    Only after use_bf16_dot(). Operands travel as int32 lanes (bf16 vectors find no register class)."""
    comptime if CompilationTarget.has_avx512f():
        return inlined_assembly["vdpbf16ps $2, $1, $0", F32x, constraints="=v,v,v,0"](a, b, acc)
    else:  # no zmm registers in this target (never reached: use_bf16_dot() is False): the same sums in SIMD
        var hi = I32x(-65536)  # 0xFFFF0000
        return (acc + bitcast[DType.float32, 16](a << 16) * bitcast[DType.float32, 16](b << 16)
                + bitcast[DType.float32, 16](a & hi) * bitcast[DType.float32, 16](b & hi))


@always_inline
def dot_u8_i8[n: Int](
    acc: SIMD[DType.int32, n], u: SIMD[DType.int32, n], s: SIMD[DType.int32, n],
) -> SIMD[DType.int32, n]:
    """vpdpbusd: acc[i] += sum over j < 4 of u.uint8[4i + j] * s.int8[4i + j], int32 (n = 16: zmm, 8: ymm). Only
    after use_vnni(). Bytes travel as int32 lanes."""
    comptime if CompilationTarget.has_avx512f():
        return inlined_assembly["vpdpbusd $2, $1, $0", SIMD[DType.int32, n], constraints="=v,v,v,0"](u, s, acc)
    else:  # no zmm registers in this target (never reached: use_vnni() is False): the same sums in SIMD
        var p = bitcast[DType.uint8, 4 * n](u).cast[DType.int32]() * bitcast[DType.int8, 4 * n](s).cast[DType.int32]()
        var pairs = p.deinterleave()
        var quads = (pairs[0] + pairs[1]).deinterleave()
        return acc + rebind[SIMD[DType.int32, n]](quads[0] + quads[1])


@always_inline
def round_to_bf16[n: Int](v: SIMD[DType.float32, n]) -> SIMD[DType.uint16, n]:
    """Float32 -> bf16 bits, round to nearest even (NaN payloads aside). The compiler's own bf16 cast is a
    libcall per element on targets without AVX512_BF16."""
    var u = bitcast[DType.uint32, n](v)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).cast[DType.uint16]()


@always_inline
def from_f32[dt: DType, n: Int](v: SIMD[DType.float32, n]) -> SIMD[dt, n]:
    """Float32 -> dt (float32 or bfloat16: rounded to nearest even by round_to_bf16)."""
    comptime if dt == DType.bfloat16:
        return bitcast[dt, n](round_to_bf16[n](v))
    else:
        return v.cast[dt]()


@always_inline
def widen_row[dt: DType](dst: Pointer[mut=True, Float32, _], src: Pointer[Scalar[dt], _], n: Int):
    """dst[0 .. n) = src's float32 or bf16 values as float32 (exact)."""
    var i = 0
    while i + LANES <= n:
        dst.unsafe_store(i, src.unsafe_load[width=LANES](i).cast[DType.float32]())
        i += LANES
    while i < n:
        dst[unsafe_offset=i] = src[unsafe_offset=i].cast[DType.float32]()
        i += 1


@always_inline
def narrow_row[dt: DType](dst: Pointer[mut=True, Scalar[dt], _], src: Pointer[Float32, _], n: Int):
    """dst[0 .. n) = src's float32 values as dt (from_f32: bf16 rounded to nearest even)."""
    var i = 0
    while i + LANES <= n:
        dst.unsafe_store(i, from_f32[dt, LANES](src.unsafe_load[width=LANES](i)))
        i += LANES
    while i < n:
        dst[unsafe_offset=i] = from_f32[dt, 1](src[unsafe_offset=i])
        i += 1


@always_inline
def bf16_bits_to_f32[n: Int](bits: SIMD[DType.uint16, n]) -> SIMD[DType.float32, n]:
    """bf16 bits -> float32 (exact): a shift."""
    return bitcast[DType.float32, n](bits.cast[DType.uint32]() << 16)


@always_inline
def adjacent_bf16_pairs[n: Int](v: SIMD[DType.float32, 2 * n]) -> SIMD[DType.int32, n]:
    """2n consecutive float32 -> n bf16 pairs (v[2i] in the low half of lane i): vdpbf16ps's layout along a row."""
    return bitcast[DType.int32, n](round_to_bf16[2 * n](v))


@always_inline
def bf16_pairs(lo: F32x, hi: F32x) -> I32x:
    """Two float32 vectors -> one vector of bf16 pairs (lo in the low half of each lane), vdpbf16ps's layout."""
    var l = round_to_bf16[16](lo).cast[DType.uint32]()
    var h = round_to_bf16[16](hi).cast[DType.uint32]()
    return bitcast[DType.int32, 16](l | (h << 16))
