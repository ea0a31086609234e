# The inner loops that more than one op runs: one micro-kernel per job and instruction set, in one place.
#
#   * stream_dots: a few weight rows (float32, or bfloat16 widened exactly) dotted with a few float32 activation
#     rows, each weight byte read once. The memory-bound path of moe_experts (experts with few rows) and of
#     linear (decode), portable AVX-512 FMA.
#   * stream_dots_bf16: the same with bfloat16 activations and weights on vdpbf16ps (AVX512_BF16): both operands
#     in their stored layout (adjacent elements along the reduction dim are vdpbf16ps's pairs), nothing packed.
#     linear's decode path for a bf16 model, whose activations are bf16 already, so nothing is rounded.
#   * stream_dots_q8_0, q8_dequantize_row: Q8_0 weight rows (llama.cpp's blocks of 32 int8 and a float16 scale)
#     widened exactly and dotted with float32 activation rows (portable SIMD); dequantized into float32 rows for a
#     GEMM (MAX's float32 matmul). linear's and moe_experts' Q8_0 paths.
#   * stream_dots_q8_vnni, q8_quantize_activations: the same weight rows against activations quantized to int8
#     blocks of 32 (float32 scales) on vpdpbusd (AVX512_VNNI), exact int32 block sums: the Q8_0 streaming paths of
#     both ops where cpu_isa.use_vnni says yes. bf16 and Q8_0 weights stream 8 rows a pass, float32 4
#     (stream_rows_per_pass; the dispatchers split 8 in halves where 8 x 4 accumulators would not fit the registers).
#   * stream_dots_q8_lanes, q8_pack_lanes: the same int8 blocks with up to 16 activation rows in the vector lanes
#     (each weight dword broadcast; 8 lanes on ymm up to 8 rows, q8_lane_width): eight vpdpbusd per weight row and
#     block whatever the number of rows, so it beats stream_dots_q8_vnni from Q8_LANES_MIN_M rows. Q8LaneSlots holds
#     more rows in groups of 16, a slot each, and picks each group's lane width (`pack`, `dots`). linear's Q8_0
#     streaming path for batches of 6-16 rows, and moe_experts' for experts of 6-256 rows.
#   * dot_tile / dot_panel: the bf16-dot GEMM (vdpbf16ps), compute bound: MR weight rows read in place, a bf16
#     pair broadcast against MB activation rows packed [K/2][MB] (each op packs its own: moe_experts rounds float32
#     rows, linear copies bf16 ones). moe_experts' bf16 experts with many rows and linear's bf16 prefill.
#   * q8_dot_tile / q8_dot_panel: the same GEMM on Q8_0 weight rows (both ops' Q8_0 prefill): each K slice of a
#     task's rows is first widened into a scratch of bf16 pairs (int8 values are exact in bf16) with the blocks'
#     scales (q8_widen_slice); each block's 16 pairs then sum into fresh accumulators, scaled by its d and added,
#     so the weights are the dequantized ones exactly; only x is rounded to bf16. Q8_MR = 4 weight rows a tile
#     (the block sums need registers beside the accumulators). 2.0-2.3x the DEQUANT path it replaced, 0.86-0.92x
#     the bf16 weights' dot_panel (docs/perf-notes.md, "Q8_0 on the bf16-dot GEMM").
#   * amx_panel: the bf16 GEMM on AMX tiles (Intel Sapphire Rapids and later), the same operands as dot_panel:
#     weight rows in place as A tiles (each K slice first copied into 64-byte aligned tiles), dot_panel's packed
#     activation blocks as B tiles (16 tokens a tile, MB x 4 bytes between tile rows), 2 x 2 C tiles of fp32 held
#     over AMX_KC = 256 elements of K. linear's and moe_experts' bf16 GEMMs where cpu_isa.use_amx says yes.
#     AMX_KC and the ops' tasks were tuned on Hy3 shapes (docs/perf-notes.md, "AMX").
#   * silu, swiglu_row: the SwiGLU epilogue both ops' float32 matmul paths run.
# Callers choose between them at run time (cpu_isa.use_bf16_dot, use_amx, use_vnni); those only after they say yes.
# Measured numbers: the headers of moe_experts.mojo and linear.mojo; the history in docs/perf-notes.md.
from std.math import exp
from std.memory import bitcast
from std.utils import StaticTuple
from std.sys.intrinsics import prefetch, PrefetchOptions
from std.sys._assembly import inlined_assembly
from .cpu_isa import LANES, I32x, F32x, adjacent_bf16_pairs, bf16_bits_to_f32, dot_bf16_pairs, dot_u8_i8

comptime W = LANES  # float32 SIMD width
comptime PREFETCH_MIN_BYTES = 8192  # streaming, whole rows a pass: least distance (bytes) ahead (`stream_ahead`)
comptime PREFETCH_AHEAD = 2048  # streaming along a row (K slices): weight elements ahead of use
comptime PREFETCH_AHEAD_Q8 = 8192  # the same for Q8_0 rows, in bytes (perf-notes: "Q8_0 streaming: the prefetch")
comptime MAX_STREAM_ROWS = 4  # streaming: activation rows per pass (the register tile R)
comptime STREAM_NW = 4  # streaming float32 weights: weight rows per pass (the dots' NW; `stream_rows_per_pass`)
comptime STREAM_NW_COMPACT = 8  # the same for the compact weights, bf16 and Q8_0 (see stream_rows_per_pass)
comptime MB = 48  # bf16-dot GEMM: activation rows per packed block (NVMAX vectors)
comptime NVMAX = MB // W
comptime MR = 8  # bf16-dot GEMM: weight rows per micro-tile (MR x NVMAX accumulators)
comptime KC = 128  # bf16-dot GEMM: pairs per L1 slice (KC x MB x 4 bytes = 24 KiB)


@always_inline
def untracked[T: AnyType](p: Pointer[mut=True, T, _]) -> Pointer[mut=True, T, MutUntrackedOrigin]:
    """A pointer the ops' pass structs can hold: the buffers it points into outlive every pass."""
    return p.unsafe_origin_cast[MutUntrackedOrigin]()


@always_inline
def stream_rows_per_pass[wdt: DType]() -> Int:
    """Weight rows a streaming pass reads (the dots' NW) in linear and moe_experts, by weight dtype (uint8: Q8_0):
    STREAM_NW_COMPACT for bf16 and Q8_0, STREAM_NW for float32. Measured at M 1 (docs/perf-notes.md): 8 rows read
    1.2-1.4x the rate of 4 on vpdpbusd (Q8_0), 1.04-1.08x on vdpbf16ps at Hy3's shapes (bf16), level for float32
    and for bf16 widened into float32 FMAs. The dispatchers split a pass in halves at more than two activation
    rows, where 8 x 4 accumulators would not fit the registers."""
    return STREAM_NW if wdt == DType.float32 else STREAM_NW_COMPACT


def stream_ahead(pass_units: Int, unit_bytes: Int) -> Int:
    """How far ahead (in the weight pointer's units: elements, or bytes for Q8_0) the streaming dots prefetch each
    weight row, for callers whose passes read their rows whole and whose next pass reads the rows pass_units
    further on (the next group of rows of one matrix): the same position in the first pass at least
    PREFETCH_MIN_BYTES ahead. A fixed distance along the row instead lands inside the current pass on short rows
    (`small`'s K 1024: 2 of 4 prefetches wasted at 2048 elements) and leaves the next pass's lines to the hardware
    prefetcher. Callers that walk a row in K slices (linear with M > 4 on long rows) pass PREFETCH_AHEAD
    (PREFETCH_AHEAD_Q8 for Q8_0 rows), a distance along the row. Measured: docs/perf-notes.md, "prefetch"."""
    var pass_bytes = max(1, pass_units * unit_bytes)
    return (PREFETCH_MIN_BYTES + pass_bytes - 1) // pass_bytes * pass_units


@always_inline
def _first_half[NW: Int](rows: StaticTuple[Int, NW]) -> StaticTuple[Int, NW // 2]:
    var h = StaticTuple[Int, NW // 2](fill=0)
    comptime for v in range(NW // 2):
        h[v] = rows[v]
    return h


@always_inline
def _second_half[NW: Int](rows: StaticTuple[Int, NW]) -> StaticTuple[Int, NW - NW // 2]:
    var h = StaticTuple[Int, NW - NW // 2](fill=0)
    comptime for v in range(NW - NW // 2):
        h[v] = rows[NW // 2 + v]
    return h


@always_inline
def _joined[NW: Int](
    a: StaticTuple[SIMD[DType.float32, 4], NW // 2], c: StaticTuple[SIMD[DType.float32, 4], NW - NW // 2],
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    var out = StaticTuple[SIMD[DType.float32, 4], NW](fill=SIMD[DType.float32, 4](0))
    comptime for v in range(NW // 2):
        out[v] = a[v]
    comptime for v in range(NW - NW // 2):
        out[NW // 2 + v] = c[v]
    return out


@always_inline
def silu[n: Int](g: SIMD[DType.float32, n]) -> SIMD[DType.float32, n]:
    return g / (1.0 + exp(-g))


@always_inline
def swiglu_row(
    dst: Pointer[mut=True, Float32, MutUntrackedOrigin], gate: Pointer[mut=True, Float32, MutUntrackedOrigin],
    up: Pointer[mut=True, Float32, MutUntrackedOrigin], n: Int,
):
    """dst[i] = silu(gate[i]) * up[i] for i < n; dst may be gate (each element is read before it is written), and
    gate and up may be halves of one row: hence untracked pointers, which the aliasing check leaves alone."""
    var o = 0
    while o + W <= n:
        dst.unsafe_store(o, silu[W](gate.unsafe_load[width=W](o)) * up.unsafe_load[width=W](o))
        o += W
    for i in range(o, n):
        dst[unsafe_offset=i] = silu[1](gate[unsafe_offset=i]) * up[unsafe_offset=i]


@always_inline
def stream_dots[R: Int, NW: Int, wdt: DType](
    w: Pointer[Scalar[wdt], _], w_rows: StaticTuple[Int, NW], x: Pointer[Float32, _], x_stride: Int, n_rows: Int,
    K: Int, ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """Dot products of NW weight rows (at element offsets w_rows in w, each [K]: float32, or bfloat16 widened
    exactly) with n_rows <= R <= 4 activation rows (x, x + x_stride, ...). Each weight row is streamed once and
    each activation chunk is loaded once for all NW of them. R is the register tile: no FMA is spent on rows
    that are not there (rows n_rows..R-1 alias the last real one)."""
    var r = StaticTuple[Int, R](fill=0)  # activation row offsets
    comptime for j in range(1, R):
        r[j] = min(j, n_rows - 1) * x_stride
    var acc = StaticTuple[F32x, NW * R](fill=F32x(0))
    var i = 0
    while i + W <= K:
        var xv = StaticTuple[F32x, R](fill=F32x(0))
        comptime for j in range(R):
            xv[j] = x.unsafe_load[width=W](r[j] + i)
        comptime for v in range(NW):
            prefetch[PrefetchOptions().for_read().low_locality()](w.unsafe_offset(w_rows[v] + i + ahead))
            var a = w.unsafe_load[width=W](w_rows[v] + i).cast[DType.float32]()
            comptime for j in range(R):
                acc[v * R + j] = a.fma(xv[j], acc[v * R + j])
        i += W
    var out = StaticTuple[SIMD[DType.float32, 4], NW](fill=SIMD[DType.float32, 4](0))
    comptime for v in range(NW):
        comptime for j in range(R):
            out[v][j] = acc[v * R + j].reduce_add()
    while i < K:
        var xs = SIMD[DType.float32, 4](0)
        comptime for j in range(R):
            xs[j] = x[unsafe_offset=r[j] + i]
        comptime for v in range(NW):
            out[v] += w[unsafe_offset=w_rows[v] + i].cast[DType.float32]() * xs
        i += 1
    return out


@always_inline
def stream_dots[NW: Int, wdt: DType](
    w: Pointer[Scalar[wdt], _], w_rows: StaticTuple[Int, NW], x: Pointer[Float32, _], x_stride: Int, n_rows: Int,
    K: Int, ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """stream_dots with the smallest register tile that holds n_rows (1..MAX_STREAM_ROWS); more than 4 weight
    rows at more than two activation rows run as two halves (the accumulators would not fit the registers)."""
    if n_rows == 1:
        return stream_dots[1](w, w_rows, x, x_stride, n_rows, K, ahead)
    if n_rows == 2:
        return stream_dots[2](w, w_rows, x, x_stride, n_rows, K, ahead)
    comptime if NW > MAX_STREAM_ROWS:
        return _joined[NW](
            stream_dots[MAX_STREAM_ROWS](w, _first_half(w_rows), x, x_stride, n_rows, K, ahead),
            stream_dots[MAX_STREAM_ROWS](w, _second_half(w_rows), x, x_stride, n_rows, K, ahead))
    return stream_dots[MAX_STREAM_ROWS](w, w_rows, x, x_stride, n_rows, K, ahead)


@always_inline
def stream_dots_bf16[R: Int, NW: Int](
    w: Pointer[UInt16, _], w_rows: StaticTuple[Int, NW], x: Pointer[UInt16, _], x_stride: Int, n_rows: Int, K: Int,
    ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """stream_dots for bfloat16 weights and bfloat16 activations (both as bf16 bits) on vdpbf16ps: 32 elements
    of a weight row against 32 of each activation row per instruction, both in their stored layout. bf16 x bf16
    products are exact in float32, so only the order of the float32 sums differs from stream_dots. Only after
    use_bf16_dot(). Rows may start at any even byte address (unaligned loads)."""
    var r = StaticTuple[Int, R](fill=0)
    comptime for j in range(1, R):
        r[j] = min(j, n_rows - 1) * x_stride
    var acc = StaticTuple[F32x, NW * R](fill=F32x(0))
    var i = 0
    while i + 2 * W <= K:
        var xv = StaticTuple[I32x, R](fill=I32x(0))
        comptime for j in range(R):
            xv[j] = bitcast[DType.int32, W](x.unsafe_load[width=2 * W](r[j] + i))
        comptime for v in range(NW):
            prefetch[PrefetchOptions().for_read().low_locality()](w.unsafe_offset(w_rows[v] + i + ahead))
            var a = bitcast[DType.int32, W](w.unsafe_load[width=2 * W](w_rows[v] + i))
            comptime for j in range(R):
                acc[v * R + j] = dot_bf16_pairs(acc[v * R + j], a, xv[j])
        i += 2 * W
    var out = StaticTuple[SIMD[DType.float32, 4], NW](fill=SIMD[DType.float32, 4](0))
    comptime for v in range(NW):
        comptime for j in range(R):
            out[v][j] = acc[v * R + j].reduce_add()
    while i < K:
        var xs = SIMD[DType.float32, 4](0)
        comptime for j in range(R):
            xs[j] = bf16_bits_to_f32[1](x[unsafe_offset=r[j] + i])
        comptime for v in range(NW):
            out[v] += bf16_bits_to_f32[1](w[unsafe_offset=w_rows[v] + i]) * xs
        i += 1
    return out


@always_inline
def stream_dots_bf16[NW: Int](
    w: Pointer[UInt16, _], w_rows: StaticTuple[Int, NW], x: Pointer[UInt16, _], x_stride: Int, n_rows: Int, K: Int,
    ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """stream_dots_bf16 with the smallest register tile that holds n_rows (1..MAX_STREAM_ROWS), split as
    stream_dots' is."""
    if n_rows == 1:
        return stream_dots_bf16[1](w, w_rows, x, x_stride, n_rows, K, ahead)
    if n_rows == 2:
        return stream_dots_bf16[2](w, w_rows, x, x_stride, n_rows, K, ahead)
    comptime if NW > MAX_STREAM_ROWS:
        return _joined[NW](
            stream_dots_bf16[MAX_STREAM_ROWS](w, _first_half(w_rows), x, x_stride, n_rows, K, ahead),
            stream_dots_bf16[MAX_STREAM_ROWS](w, _second_half(w_rows), x, x_stride, n_rows, K, ahead))
    return stream_dots_bf16[MAX_STREAM_ROWS](w, w_rows, x, x_stride, n_rows, K, ahead)


comptime Q8_BLOCK = 32  # Q8_0: weights per block (hyv3_graph/q8_0.py has the format)
comptime Q8_BLOCK_BYTES = 34  # Q8_0: the float16 scale, then 32 int8
comptime BYTES_0X80 = Int32(-2139062144)  # 0x80 in every byte: xor with int8 makes it + 128 as uint8 (vpdpbusd)


@always_inline
def q8_row_bytes(K: Int) -> Int:
    """Bytes of a Q8_0 row of K weights (K a multiple of Q8_BLOCK)."""
    return K // Q8_BLOCK * Q8_BLOCK_BYTES


@always_inline
def q8_block[n: Int](blk: Pointer[UInt8, _], i: Int) -> SIMD[DType.float32, n]:
    """Weights i .. i + n of the Q8_0 block at blk (i + n <= 32), dequantized: d * q, exact in float32."""
    var d = _q8_scale(blk)
    return blk.unsafe_offset(2 + i).unsafe_bitcast[Int8]().unsafe_load[width=n](0).cast[DType.float32]() * d


def q8_dequantize_row(w: Pointer[UInt8, _], dst: Pointer[mut=True, Float32, _], K: Int):
    """dst[0 .. K) = the Q8_0 row at w, dequantized (float32, exact)."""
    for b in range(K // Q8_BLOCK):
        var blk = w.unsafe_offset(b * Q8_BLOCK_BYTES)
        dst.unsafe_store(b * Q8_BLOCK, q8_block[W](blk, 0))
        dst.unsafe_store(b * Q8_BLOCK + W, q8_block[W](blk, W))


@always_inline
def stream_dots_q8_0[R: Int, NW: Int](
    w: Pointer[UInt8, _], w_rows: StaticTuple[Int, NW], x: Pointer[Float32, _], x_stride: Int, n_rows: Int, K: Int,
    ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """stream_dots for Q8_0 weight rows (at byte offsets w_rows in w; K a multiple of 32): each block's int8 are
    widened and multiplied by its scale (exact in float32), then FMA'd into the float32 activation rows as
    stream_dots does, so the sums are those of stream_dots on the dequantized rows: the int8 bytes are read once,
    half of bf16's. Portable SIMD (any x86-64 with FMA)."""
    var r = StaticTuple[Int, R](fill=0)
    comptime for j in range(1, R):
        r[j] = min(j, n_rows - 1) * x_stride
    var acc = StaticTuple[F32x, NW * R](fill=F32x(0))
    var b = 0  # byte offset of the block in each row
    var i = 0
    while i < K:
        var x0 = StaticTuple[F32x, R](fill=F32x(0))
        var x1 = StaticTuple[F32x, R](fill=F32x(0))
        comptime for j in range(R):
            x0[j] = x.unsafe_load[width=W](r[j] + i)
            x1[j] = x.unsafe_load[width=W](r[j] + i + W)
        comptime for v in range(NW):
            var blk = w.unsafe_offset(w_rows[v] + b)
            prefetch[PrefetchOptions().for_read().low_locality()](blk.unsafe_offset(ahead))
            var a0 = q8_block[W](blk, 0)
            var a1 = q8_block[W](blk, W)
            comptime for j in range(R):
                acc[v * R + j] = a1.fma(x1[j], a0.fma(x0[j], acc[v * R + j]))
        i += Q8_BLOCK
        b += Q8_BLOCK_BYTES
    var out = StaticTuple[SIMD[DType.float32, 4], NW](fill=SIMD[DType.float32, 4](0))
    comptime for v in range(NW):
        comptime for j in range(R):
            out[v][j] = acc[v * R + j].reduce_add()
    return out


@always_inline
def stream_dots_q8_0[NW: Int](
    w: Pointer[UInt8, _], w_rows: StaticTuple[Int, NW], x: Pointer[Float32, _], x_stride: Int, n_rows: Int, K: Int,
    ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """stream_dots_q8_0 with the smallest register tile that holds n_rows (1..MAX_STREAM_ROWS). More than 4 weight
    rows (NW x R accumulators in zmm registers) with more than 2 activation rows: the weight rows in two halves,
    one after the other (each weight byte is still read once; the activations again, from L1)."""
    if n_rows == 1:
        return stream_dots_q8_0[1](w, w_rows, x, x_stride, n_rows, K, ahead)
    if n_rows == 2:
        return stream_dots_q8_0[2](w, w_rows, x, x_stride, n_rows, K, ahead)
    comptime if NW > MAX_STREAM_ROWS:
        return _joined[NW](
            stream_dots_q8_0[MAX_STREAM_ROWS](w, _first_half(w_rows), x, x_stride, n_rows, K, ahead),
            stream_dots_q8_0[MAX_STREAM_ROWS](w, _second_half(w_rows), x, x_stride, n_rows, K, ahead))
    return stream_dots_q8_0[MAX_STREAM_ROWS](w, w_rows, x, x_stride, n_rows, K, ahead)


comptime Q8_SCALE_LANES = 8  # int8 activations: each block's scale, repeated once per int32 lane of its products


@always_inline
def q8_activation_scales(K: Int) -> Int:
    """Floats of q8_quantize_activations' scales for a row of K (a multiple of 32): Q8_SCALE_LANES per block."""
    return K // Q8_BLOCK * Q8_SCALE_LANES


def q8_quantize_activations(x: Pointer[Float32, _], K: Int, xq: Pointer[mut=True, UInt8, _],
                            xs: Pointer[mut=True, Float32, _]):
    """A float32 activation row x [K] (K a multiple of 32) -> int8 blocks of 32 for stream_dots_q8_vnni: per block
    d = max |x| / 127 and q = round-half-even(x * (1 / d)) in [-127, 127] (float32 arithmetic; an all-zero block has
    d = 0, q = 0), stored as xq = q (int8 bits: vpdpbusd's signed operand) and xs = d repeated Q8_SCALE_LANES times.
    hyv3_graph/q8_0.py::quantize_activations is the same in numpy (the tests' reference)."""
    for b in range(K // Q8_BLOCK):
        var v0 = x.unsafe_load[width=W](b * Q8_BLOCK)
        var v1 = x.unsafe_load[width=W](b * Q8_BLOCK + W)
        var amax = max(abs(v0).reduce_max(), abs(v1).reduce_max())
        var d = amax / 127.0
        var inv = Float32(1.0) / d if d != 0 else Float32(0)
        var q0 = min(max(round(v0 * inv), -127.0), 127.0).cast[DType.int8]()
        var q1 = min(max(round(v1 * inv), -127.0), 127.0).cast[DType.int8]()
        xq.unsafe_bitcast[Int8]().unsafe_store(b * Q8_BLOCK, q0)
        xq.unsafe_bitcast[Int8]().unsafe_store(b * Q8_BLOCK + W, q1)
        xs.unsafe_store(b * Q8_SCALE_LANES, SIMD[DType.float32, Q8_SCALE_LANES](d))


@always_inline
def _q8_scale(blk: Pointer[UInt8, _]) -> Float32:
    """The float16 scale d of the Q8_0 block at blk, as float32."""
    return bitcast[DType.float16, 1](blk.unsafe_bitcast[UInt16]().unsafe_load[width=1](0)).cast[DType.float32]()


@always_inline
def _q8_pair_scales(blk: Pointer[UInt8, _]) -> F32x:
    """The scales of the Q8_0 block at blk (lanes 0-7) and of the next one (lanes 8-15), as float32: two float16
    broadcasts joined and widened in one vcvtph2ps (the two scalar conversions and their broadcasts cost twice the
    instructions, per weight row and pair of blocks)."""
    var h = blk.unsafe_bitcast[UInt16]()
    var d0 = SIMD[DType.uint16, W // 2](h.unsafe_load[width=1](0))
    var d1 = SIMD[DType.uint16, W // 2](h.unsafe_load[width=1](Q8_BLOCK_BYTES // 2))
    return bitcast[DType.float16, W](d0.join(d1)).cast[DType.float32]()


@always_inline
def stream_dots_q8_vnni[R: Int, NW: Int](
    w: Pointer[UInt8, _], w_rows: StaticTuple[Int, NW], xq: Pointer[UInt8, _], xs: Pointer[Float32, _],
    x_stride: Int, n_rows: Int, K: Int, ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """stream_dots_q8_0 on int8 activations (q8_quantize_activations: xq rows x_stride bytes apart, xs rows
    x_stride / 4 floats apart) with vpdpbusd: two Q8_0 blocks (64 weights) of a weight row against 64 activations
    per instruction, int32 sums per block, then scaled by d_w * d_x and summed in float32. vpdpbusd multiplies
    unsigned by signed bytes: the weights are its unsigned operand as w + 128 (one xor of the sign bits), x the
    signed one, so each block's int32 sum starts at -128 * sum(x): computed once per pair of blocks for each
    activation row and shared by all NW weight rows (per weight row and pair of blocks: two loads, an xor, the
    pair's scales in one conversion (_q8_pair_scales), then per activation row a vpdpbusd, a convert and two float
    ops). A last odd block runs on ymm. Only after use_vnni(). Measured: docs/perf-notes.md, "Q8_0"."""
    comptime B2 = 2 * Q8_BLOCK
    var r = StaticTuple[Int, R](fill=0)
    comptime for j in range(1, R):
        r[j] = min(j, n_rows - 1) * x_stride
    var acc = StaticTuple[F32x, NW * R](fill=F32x(0))
    var sign = I32x(BYTES_0X80)  # xor makes w + 128; dotted with x, 128 * sum(x) per lane
    var i = 0
    var b = 0  # byte offset of the block pair in each row
    while i + B2 <= K:
        var xv = StaticTuple[I32x, R](fill=I32x(0))
        var start = StaticTuple[I32x, R](fill=I32x(0))
        var sx = StaticTuple[F32x, R](fill=F32x(0))
        comptime for j in range(R):
            xv[j] = bitcast[DType.int32, W](xq.unsafe_load[width=B2](r[j] + i))
            start[j] = I32x(0) - dot_u8_i8[W](I32x(0), sign, xv[j])
            sx[j] = xs.unsafe_load[width=W](r[j] // 4 + i // 4)
        comptime for v in range(NW):
            var blk = w.unsafe_offset(w_rows[v] + b)
            prefetch[PrefetchOptions().for_read().low_locality()](blk.unsafe_offset(ahead))
            var lo = blk.unsafe_offset(2).unsafe_load[width=Q8_BLOCK](0)
            var hi = blk.unsafe_offset(Q8_BLOCK_BYTES + 2).unsafe_load[width=Q8_BLOCK](0)
            var wu = bitcast[DType.int32, W](lo.join(hi)) ^ sign
            var dw = _q8_pair_scales(blk)
            comptime for j in range(R):
                var isum = dot_u8_i8[W](start[j], wu, xv[j])
                acc[v * R + j] = isum.cast[DType.float32]().fma(dw * sx[j], acc[v * R + j])
        i += B2
        b += 2 * Q8_BLOCK_BYTES
    var out = StaticTuple[SIMD[DType.float32, 4], NW](fill=SIMD[DType.float32, 4](0))
    comptime for v in range(NW):
        comptime for j in range(R):
            out[v][j] = acc[v * R + j].reduce_add()
    if i < K:  # one block left
        comptime H = W // 2
        var sign_h = SIMD[DType.int32, H](BYTES_0X80)
        comptime for j in range(R):
            var xv = bitcast[DType.int32, H](xq.unsafe_load[width=Q8_BLOCK](r[j] + i))
            var start = SIMD[DType.int32, H](0) - dot_u8_i8[H](SIMD[DType.int32, H](0), sign_h, xv)
            var sx = xs.unsafe_load[width=H](r[j] // 4 + i // 4)
            comptime for v in range(NW):
                var blk = w.unsafe_offset(w_rows[v] + b)
                var wu = bitcast[DType.int32, H](blk.unsafe_offset(2).unsafe_load[width=Q8_BLOCK](0)) ^ sign_h
                var isum = dot_u8_i8[H](start, wu, xv)
                out[v][j] += (isum.cast[DType.float32]() * (sx * _q8_scale(blk))).reduce_add()
    return out


@always_inline
def stream_dots_q8_vnni[NW: Int](
    w: Pointer[UInt8, _], w_rows: StaticTuple[Int, NW], xq: Pointer[UInt8, _], xs: Pointer[Float32, _],
    x_stride: Int, n_rows: Int, K: Int, ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """stream_dots_q8_vnni with the smallest register tile that holds n_rows (1..MAX_STREAM_ROWS), split as
    stream_dots_q8_0's is."""
    if n_rows == 1:
        return stream_dots_q8_vnni[1](w, w_rows, xq, xs, x_stride, n_rows, K, ahead)
    if n_rows == 2:
        return stream_dots_q8_vnni[2](w, w_rows, xq, xs, x_stride, n_rows, K, ahead)
    comptime if NW > MAX_STREAM_ROWS:
        return _joined[NW](
            stream_dots_q8_vnni[MAX_STREAM_ROWS](w, _first_half(w_rows), xq, xs, x_stride, n_rows, K, ahead),
            stream_dots_q8_vnni[MAX_STREAM_ROWS](w, _second_half(w_rows), xq, xs, x_stride, n_rows, K, ahead))
    return stream_dots_q8_vnni[MAX_STREAM_ROWS](w, w_rows, xq, xs, x_stride, n_rows, K, ahead)


comptime Q8_LANES_MIN_M = 6  # linear takes the lanes layout from this many rows (up to W, one a lane)
comptime Q8_LANES_NARROW_M = W // 2  # up to this many rows the lanes are ymm (q8_lane_width)
comptime Q8_LANES_TILE = 4  # stream_dots_q8_lanes: weight rows per register tile (8 x vectors, 4 sums, 4 accumulators)


@always_inline
def q8_lane_width(rows: Int) -> Int:
    """Lanes of the lanes layout for `rows` activation rows: 8 (ymm) up to Q8_LANES_NARROW_M rows, else W (zmm).
    On Zen 4 a ymm vpdpbusd issues twice as often as a zmm one, so 8 lanes cost 0.66x of 16 per weight row and
    block (2.72 against 4.15 ns on one core) and lanes past the rows would be wasted work."""
    return Q8_LANES_NARROW_M if rows <= Q8_LANES_NARROW_M else W


def q8_pack_lanes[L: Int](xq: Pointer[UInt8, _], xs: Pointer[Float32, _], rows: Int, K: Int,
                          xl: Pointer[mut=True, Int32, _], xls: Pointer[mut=True, Float32, _],
                          xlc: Pointer[mut=True, Int32, _]):
    """rows (<= L) int8 activation rows of q8_quantize_activations (xq rows K bytes apart, xs rows
    q8_activation_scales(K) floats apart) -> stream_dots_q8_lanes' layout of L lanes, the rows in the lanes (0 past
    `rows`): xl [K / 4][L] int32, lane r = row r's 4 int8 at that dword (vpdpbusd's signed operand); xls [K / 32][L],
    lane r = row r's block scale; xlc [K / 32][L], lane r = -128 * the sum of row r's block, where each block's int32
    sums start (the weights are the unsigned operand as w + 128)."""
    comptime I32L = SIMD[DType.int32, L]
    var q = xq.unsafe_bitcast[Int32]()
    for d in range(K // 4):
        var v = I32L(0)
        for r in range(rows):
            v[r] = q[unsafe_offset=r * (K // 4) + d]
        xl.unsafe_store(d * L, v)
    comptime flip = I32L(BYTES_0X80)  # dotted with x: 128 * its sum per dword
    comptime DW = Q8_BLOCK // 4
    for b in range(K // Q8_BLOCK):
        var sv = SIMD[DType.float32, L](0)
        for r in range(rows):
            sv[r] = xs[unsafe_offset=r * q8_activation_scales(K) + b * Q8_SCALE_LANES]
        xls.unsafe_store(b * L, sv)
        var c = I32L(0)
        comptime for d in range(DW):
            c = dot_u8_i8[L](c, flip, xl.unsafe_load[width=L]((b * DW + d) * L))
        xlc.unsafe_store(b * L, I32L(0) - c)


@always_inline
def _stream_dots_q8_lanes_tile[NW: Int, L: Int](
    w: Pointer[UInt8, _], w_rows: StaticTuple[Int, NW], xl: Pointer[Int32, _], xls: Pointer[Float32, _],
    xlc: Pointer[Int32, _], K: Int, ahead: Int,
) -> StaticTuple[SIMD[DType.float32, L], NW]:
    """NW Q8_0 weight rows (byte offsets w_rows) . up to L int8 activation rows at once, the rows in the lanes
    (q8_pack_lanes[L]): lane r of result v is row r's dot with weight row v. Per weight row and block: eight
    vpdpbusd, each of one weight dword, broadcast and made unsigned (w + 128), against the block's eight activation
    vectors, from the block's -128 * sum(x) start; then one convert and one FMA by d_w * d_x. The NW rows' chains are
    interleaved, which hides vpdpbusd's latency. It costs the same whatever the number of rows, where
    stream_dots_q8_vnni's cost grows with each row: bound by the eight vpdpbusd (~4.15 ns a weight row and block on
    one Zen 4 core with 16 lanes, 2.72 with 8), it wins from Q8_LANES_MIN_M rows (docs/perf-notes.md, "Q8_0 with the
    activation rows in the lanes"). The int32 block sums are exact, so a row's result equals stream_dots_q8_vnni's
    up to float32 summation order."""
    comptime DW = Q8_BLOCK // 4  # int32 dwords of a block
    comptime I32L = SIMD[DType.int32, L]
    comptime F32L = SIMD[DType.float32, L]
    var flip = I32L(BYTES_0X80)  # w + 128 as unsigned bytes
    var acc = StaticTuple[F32L, NW](fill=F32L(0))
    for blk in range(K // Q8_BLOCK):
        var xv = StaticTuple[I32L, DW](fill=I32L(0))
        comptime for d in range(DW):
            xv[d] = xl.unsafe_load[width=L]((blk * DW + d) * L)
        var sums = StaticTuple[I32L, NW](fill=xlc.unsafe_load[width=L](blk * L))
        comptime for d in range(DW):
            comptime for v in range(NW):
                var q = w.unsafe_offset(w_rows[v] + blk * Q8_BLOCK_BYTES + 2).unsafe_bitcast[Int32]()
                sums[v] = dot_u8_i8[L](sums[v], I32L(q[unsafe_offset=d]) ^ flip, xv[d])
        var sx = xls.unsafe_load[width=L](blk * L)
        comptime for v in range(NW):
            var p = w.unsafe_offset(w_rows[v] + blk * Q8_BLOCK_BYTES)
            prefetch[PrefetchOptions().for_read().low_locality()](p.unsafe_offset(ahead))
            acc[v] = sums[v].cast[DType.float32]().fma(sx * _q8_scale(p), acc[v])
    return acc


@always_inline
def stream_dots_q8_lanes[NW: Int, L: Int](
    w: Pointer[UInt8, _], w_rows: StaticTuple[Int, NW], xl: Pointer[Int32, _], xls: Pointer[Float32, _],
    xlc: Pointer[Int32, _], K: Int, ahead: Int,
) -> StaticTuple[SIMD[DType.float32, L], NW]:
    """_stream_dots_q8_lanes_tile over NW weight rows (a multiple of Q8_LANES_TILE), Q8_LANES_TILE at a time: 4
    rows a tile ran 4.15 ns a weight row and block, 8 (register pressure) 4.43 (16 lanes; 8 lanes: 2.72 / 2.80)."""
    comptime assert NW % Q8_LANES_TILE == 0, "stream_dots_q8_lanes: whole tiles of weight rows"
    var out = StaticTuple[SIMD[DType.float32, L], NW](fill=SIMD[DType.float32, L](0))
    comptime for h in range(NW // Q8_LANES_TILE):
        var rows = StaticTuple[Int, Q8_LANES_TILE](fill=0)
        comptime for v in range(Q8_LANES_TILE):
            rows[v] = w_rows[h * Q8_LANES_TILE + v]
        var d = _stream_dots_q8_lanes_tile[Q8_LANES_TILE, L](w, rows, xl, xls, xlc, K, ahead)
        comptime for v in range(Q8_LANES_TILE):
            out[h * Q8_LANES_TILE + v] = d[v]
    return out


@always_inline
def q8_lane_groups(rows: Int) -> Int:
    """Groups of up to W activation rows, one lanes slot each (Q8LaneSlots), that `rows` rows take."""
    return (rows + W - 1) // W


@fieldwise_init
struct Q8LaneSlots(ImplicitlyCopyable, Movable):
    """int8 activation rows over K in the lanes layout, one group of up to W rows a slot: l [slots][K / 4][W] int32,
    ls [slots][K / 32][W] scales, lc [slots][K / 32][W] block starts (q8_pack_lanes). A group's lane width is
    q8_lane_width(its rows), so a group of up to Q8_LANES_NARROW_M rows fills its slot's first half in 8 lanes'
    layout. `pack` and `dots` pick the width from the group's rows: the one place that run-time choice is made."""
    var l: Pointer[mut=True, Int32, MutUntrackedOrigin]
    var ls: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var lc: Pointer[mut=True, Int32, MutUntrackedOrigin]
    var K: Int

    @staticmethod
    def ints(K: Int, slots: Int) -> Int:
        """int32 elements of l for `slots` slots over K."""
        return slots * (K // 4) * W

    @staticmethod
    def blocks(K: Int, slots: Int) -> Int:
        """Elements of ls (and of lc) for `slots` slots over K."""
        return slots * (K // Q8_BLOCK) * W

    def pack(self, slot0: Int, xq: Pointer[UInt8, _], xs: Pointer[Float32, _], rows: Int):
        """rows int8 activation rows (q8_quantize_activations: xq rows K bytes apart, xs rows q8_activation_scales(K)
        floats apart) into slots slot0 .. slot0 + q8_lane_groups(rows), W rows a group (the last one the rest)."""
        var K = self.K
        for g in range(q8_lane_groups(rows)):
            var ng = min(W, rows - g * W)
            var q = xq.unsafe_offset(g * W * K)
            var s = xs.unsafe_offset(g * W * q8_activation_scales(K))
            var slot = slot0 + g
            var l = self.l.unsafe_offset(Self.ints(K, slot))
            var ls = self.ls.unsafe_offset(Self.blocks(K, slot))
            var lc = self.lc.unsafe_offset(Self.blocks(K, slot))
            if q8_lane_width(ng) == Q8_LANES_NARROW_M:
                q8_pack_lanes[Q8_LANES_NARROW_M](q, s, ng, K, l, ls, lc)
            else:
                q8_pack_lanes[W](q, s, ng, K, l, ls, lc)

    @always_inline
    def dots[NW: Int](self, slot: Int, rows: Int, w: Pointer[UInt8, _], w_rows: StaticTuple[Int, NW],
                      ahead: Int) -> StaticTuple[F32x, NW]:
        """stream_dots_q8_lanes of NW Q8_0 weight rows (byte offsets w_rows) against the group of `rows` rows in
        `slot`, in its lane width: lane r of result v is row r's dot with weight row v (lanes from `rows` on: 0 or
        whatever the padding gives; callers store the first `rows`)."""
        var K = self.K
        var l = self.l.unsafe_offset(Self.ints(K, slot))
        var ls = self.ls.unsafe_offset(Self.blocks(K, slot))
        var lc = self.lc.unsafe_offset(Self.blocks(K, slot))
        if q8_lane_width(rows) == Q8_LANES_NARROW_M:
            var d = stream_dots_q8_lanes[NW, Q8_LANES_NARROW_M](w, w_rows, l, ls, lc, K, ahead)
            var out = StaticTuple[F32x, NW](fill=F32x(0))
            comptime for v in range(NW):
                out[v] = d[v].join(SIMD[DType.float32, Q8_LANES_NARROW_M](0))
            return out
        return stream_dots_q8_lanes[NW, W](w, w_rows, l, ls, lc, K, ahead)


@always_inline
def n_blocks(n: Int) -> Int:
    """Packed blocks of MB rows holding n activation rows (bf16-dot GEMM)."""
    return (n + MB - 1) // MB


@always_inline
def n_vec(n: Int, b: Int) -> Int:
    """Vectors of W rows that block b of n activation rows actually uses (the rest is padding)."""
    return (min(MB, n - b * MB) + W - 1) // W


def align64(address: Int) -> Int:
    """int32 elements to skip from address to the next 64-byte boundary: packed blocks load whole cache lines."""
    return ((64 - address % 64) % 64) // 4


@always_inline
def dot_tile[NV: Int](
    w: Pointer[Int32, _], rows: StaticTuple[Int, MR], xb: Pointer[Int32, _], kc: Int, c: Pointer[mut=True, Float32, _],
    first: Bool,
):
    """c [MR][MB] += MR weight rows (bf16 pairs at offsets rows[i]) . kc pairs of a packed activation block
    xb [kc][MB] (VNNI layout), for the block's first NV vectors of rows. The weight pair is broadcast and the
    activation rows are the lanes, so weights are read in their stored layout, never packed. first: the first K
    slice, so c holds nothing yet and the sums start from zero."""
    var acc = StaticTuple[F32x, MR * NV](fill=F32x(0))
    if not first:
        comptime for i in range(MR):
            comptime for j in range(NV):
                acc[i * NV + j] = c.unsafe_load[width=W](i * MB + j * W)
    for p in range(kc):
        var bv = StaticTuple[I32x, NV](fill=I32x(0))
        comptime for j in range(NV):
            bv[j] = xb.unsafe_load[width=W](p * MB + j * W)
        comptime for i in range(MR):
            var av = I32x(w[unsafe_offset=rows[i] + p])
            comptime for j in range(NV):
                acc[i * NV + j] = dot_bf16_pairs(acc[i * NV + j], av, bv[j])
    comptime for i in range(MR):
        comptime for j in range(NV):
            c.unsafe_store(i * MB + j * W, acc[i * NV + j])


def dot_panel(
    w: Pointer[Int32, _], row_offsets: Pointer[Int, _], groups: Int, xk: Pointer[Int32, _], n: Int, K2: Int,
    c: Pointer[mut=True, Float32, _],
):
    """c [groups][blocks][MR][MB] = (groups x MR weight rows) . (n packed activation rows), over K2 pairs.
    Blocked over KC pairs so that one activation block's slice (KC x MB pairs) stays in L1 while every
    group's weight rows (from L2) pass over it; c is re-read once per KC slice, which is cheap."""
    var blocks = n_blocks(n)
    for p0 in range(0, K2, KC):
        var kc = min(KC, K2 - p0)
        for b in range(blocks):
            var nv = n_vec(n, b)
            var xb = xk.unsafe_offset((b * K2 + p0) * MB)
            for g in range(groups):
                var rows = StaticTuple[Int, MR](fill=0)
                comptime for i in range(MR):
                    rows[i] = row_offsets[unsafe_offset=g * MR + i] + p0
                var cb = c.unsafe_offset((g * blocks + b) * MR * MB)
                if nv == 1:
                    dot_tile[1](w, rows, xb, kc, cb, p0 == 0)
                elif nv == 2:
                    dot_tile[2](w, rows, xb, kc, cb, p0 == 0)
                else:
                    dot_tile[NVMAX](w, rows, xb, kc, cb, p0 == 0)


# ---- Q8_0 weights on the bf16-dot GEMM: each block's int8 weights are exact bf16 values, its scale applied per block
comptime Q8_PAIRS = Q8_BLOCK // 2  # bf16 pairs of one Q8_0 block along K
comptime Q8_KC_BLOCKS = KC // Q8_PAIRS  # Q8_0 blocks in one KC slice (KC is a multiple of Q8_PAIRS)
comptime Q8_MR = MR // 2  # q8_dot_tile: weight rows per call (acc + block sums: 2 x Q8_MR x NVMAX = 24 zmm)


def q8_widen_slice(
    w: Pointer[UInt8, _], row_offsets: Pointer[Int, _], n_rows: Int, p0: Int, kc: Int,
    wk: Pointer[mut=True, Int32, _], ws: Pointer[mut=True, Float32, _],
):
    """q8_dot_panel's scratch for one K slice (pairs p0 .. p0 + kc, whole Q8_0 blocks): for each of n_rows Q8_0
    weight rows (byte offsets row_offsets[i] from w), wk[i * KC ..] = its int8 weights as bf16 pairs (exact: an
    integer of magnitude <= 128 has at most 8 significant bits, bf16's precision) and ws[i * Q8_KC_BLOCKS ..] = its
    blocks' scales as float32. Widening once per slice serves every packed activation block of the task."""
    var b0 = p0 // Q8_PAIRS
    for i in range(n_rows):
        var row = w.unsafe_offset(row_offsets[unsafe_offset=i] + b0 * Q8_BLOCK_BYTES)
        for b in range(kc // Q8_PAIRS):
            var blk = row.unsafe_offset(b * Q8_BLOCK_BYTES)
            ws[unsafe_offset=i * Q8_KC_BLOCKS + b] = _q8_scale(blk)
            var q = blk.unsafe_offset(2).unsafe_bitcast[Int8]().unsafe_load[width=Q8_BLOCK](0)
            wk.unsafe_store(i * KC + b * Q8_PAIRS, adjacent_bf16_pairs[Q8_PAIRS](q.cast[DType.float32]()))


@always_inline
def q8_dot_tile[NV: Int](
    wk: Pointer[Int32, _], ws: Pointer[Float32, _], xb: Pointer[Int32, _], kc: Int, c: Pointer[mut=True, Float32, _],
    first: Bool,
):
    """c [Q8_MR][MB] += Q8_MR Q8_0 weight rows (q8_widen_slice's scratch: wk rows KC pairs apart, ws rows
    Q8_KC_BLOCKS scales apart) . kc pairs of a packed activation block xb [kc][MB], for its first NV vectors of
    rows. Block by block: the 16 pairs of a Q8_0 block sum q * x on vdpbf16ps into fresh accumulators (each product
    exact in float32), which are then scaled by the block's d and added: d * sum(q * x), the dequantized weights'
    dot, not rounded to bf16. Half of dot_tile's MR rows, so that the block sums fit the registers beside c's."""
    var acc = StaticTuple[F32x, Q8_MR * NV](fill=F32x(0))
    if not first:
        comptime for i in range(Q8_MR):
            comptime for j in range(NV):
                acc[i * NV + j] = c.unsafe_load[width=W](i * MB + j * W)
    for blk in range(kc // Q8_PAIRS):
        var part = StaticTuple[F32x, Q8_MR * NV](fill=F32x(0))
        comptime for pp in range(Q8_PAIRS):
            var p = blk * Q8_PAIRS + pp
            var bv = StaticTuple[I32x, NV](fill=I32x(0))
            comptime for j in range(NV):
                bv[j] = xb.unsafe_load[width=W](p * MB + j * W)
            comptime for i in range(Q8_MR):
                var av = I32x(wk[unsafe_offset=i * KC + p])
                comptime for j in range(NV):
                    part[i * NV + j] = dot_bf16_pairs(part[i * NV + j], av, bv[j])
        comptime for i in range(Q8_MR):
            var d = F32x(ws[unsafe_offset=i * Q8_KC_BLOCKS + blk])
            comptime for j in range(NV):
                acc[i * NV + j] = part[i * NV + j].fma(d, acc[i * NV + j])
    comptime for i in range(Q8_MR):
        comptime for j in range(NV):
            c.unsafe_store(i * MB + j * W, acc[i * NV + j])


def q8_dot_panel(
    w: Pointer[UInt8, _], row_offsets: Pointer[Int, _], groups: Int, xk: Pointer[Int32, _], n: Int, K2: Int,
    c: Pointer[mut=True, Float32, _],
):
    """dot_panel for Q8_0 weight rows (row_offsets: bytes from w; K2 = K / 2, K a multiple of Q8_BLOCK): the same
    c [groups][blocks][MR][MB], task shape and KC slices, each slice's rows first widened by q8_widen_slice into a
    scratch of the call's (groups x MR rows x KC pairs, ~34 KiB), then q8_dot_tile on each half of every group's MR
    rows."""
    var wk_buf = List[Int32](unsafe_uninit_length=groups * MR * KC)  # every pair read is widened first
    var ws_buf = List[Float32](unsafe_uninit_length=groups * MR * Q8_KC_BLOCKS)
    var wk = wk_buf.unsafe_ptr()
    var ws = ws_buf.unsafe_ptr()
    var blocks = n_blocks(n)
    for p0 in range(0, K2, KC):
        var kc = min(KC, K2 - p0)
        q8_widen_slice(w, row_offsets, groups * MR, p0, kc, wk, ws)
        for b in range(blocks):
            var nv = n_vec(n, b)
            var xb = xk.unsafe_offset((b * K2 + p0) * MB)
            for h in range(groups * MR // Q8_MR):
                var wkh = wk.unsafe_offset(h * Q8_MR * KC)
                var wsh = ws.unsafe_offset(h * Q8_MR * Q8_KC_BLOCKS)
                var g = h * Q8_MR // MR
                var cb = c.unsafe_offset(((g * blocks + b) * MR + h * Q8_MR % MR) * MB)
                if nv == 1:
                    q8_dot_tile[1](wkh, wsh, xb, kc, cb, p0 == 0)
                elif nv == 2:
                    q8_dot_tile[2](wkh, wsh, xb, kc, cb, p0 == 0)
                else:
                    q8_dot_tile[NVMAX](wkh, wsh, xb, kc, cb, p0 == 0)
    _ = wk_buf^
    _ = ws_buf^


# ---- AMX bf16 tiles (cpu_isa.use_amx): the same packed activations as dot_panel, 16 tokens per B tile ----
comptime AMX_TILE = 16  # rows of an A tile (weight rows), columns of a B tile (tokens): C tiles 16 x 16 fp32
comptime AMX_STEP = 32  # bf16 elements of K per tile step (a 64-byte tile row)
comptime AMX_KC = 256  # K per slice (8 steps between C loads/stores): A and B slices stay in L1
comptime AMX_C_TILE = AMX_TILE * AMX_TILE  # fp32 elements of one C tile (1 KiB)


@always_inline
def amx_k_ok(K: Int) -> Bool:
    """The AMX GEMM needs whole tile steps along K (every Hy3 dim is a multiple of 32)."""
    return K > 0 and K % AMX_STEP == 0


@always_inline
def _tiles_step[NT: Int](a0: Int, a1: Int, lda: Int, b0: Int, b1: Int, ldb: Int):
    """One tile step: A0, A1 (16 weight rows each, lda bytes apart) x B0 (, B1) (16 pairs x 16 tokens, ldb bytes
    apart) into C tiles tmm0 = A0.B0, tmm1 = A0.B1, tmm2 = A1.B0, tmm3 = A1.B1 (AT&T order: B, A, C)."""
    inlined_assembly["tileloadd ($0,$1,1), %tmm4", NoneType, constraints="r,r,~{memory}"](a0, lda)
    inlined_assembly["tileloadd ($0,$1,1), %tmm5", NoneType, constraints="r,r,~{memory}"](a1, lda)
    inlined_assembly["tileloadd ($0,$1,1), %tmm6", NoneType, constraints="r,r,~{memory}"](b0, ldb)
    comptime if NT == 2:
        inlined_assembly["tileloadd ($0,$1,1), %tmm7", NoneType, constraints="r,r,~{memory}"](b1, ldb)
    inlined_assembly["tdpbf16ps %tmm6, %tmm4, %tmm0", NoneType, constraints="~{memory}"]()
    inlined_assembly["tdpbf16ps %tmm6, %tmm5, %tmm2", NoneType, constraints="~{memory}"]()
    comptime if NT == 2:
        inlined_assembly["tdpbf16ps %tmm7, %tmm4, %tmm1", NoneType, constraints="~{memory}"]()
        inlined_assembly["tdpbf16ps %tmm7, %tmm5, %tmm3", NoneType, constraints="~{memory}"]()


@always_inline
def _amx_block[NT: Int](
    a0: Int, a1: Int, lda: Int, a_step: Int, b0: Int, b1: Int, ldb: Int, steps: Int, c: Int, first: Bool,
):
    """C tiles at c (4 x 1 KiB: A0.B0, A0.B1, A1.B0, A1.B1; rows 64 bytes apart) += `steps` tile steps, A's tiles
    a_step bytes apart. first: the first K slice, so the tiles start from zero instead of c."""
    if first:
        inlined_assembly["tilezero %tmm0", NoneType, constraints="~{memory}"]()
        inlined_assembly["tilezero %tmm1", NoneType, constraints="~{memory}"]()
        inlined_assembly["tilezero %tmm2", NoneType, constraints="~{memory}"]()
        inlined_assembly["tilezero %tmm3", NoneType, constraints="~{memory}"]()
    else:
        inlined_assembly["tileloadd ($0,$1,1), %tmm0", NoneType, constraints="r,r,~{memory}"](c, 64)
        inlined_assembly["tileloadd ($0,$1,1), %tmm1", NoneType, constraints="r,r,~{memory}"](c + 1024, 64)
        inlined_assembly["tileloadd ($0,$1,1), %tmm2", NoneType, constraints="r,r,~{memory}"](c + 2048, 64)
        inlined_assembly["tileloadd ($0,$1,1), %tmm3", NoneType, constraints="r,r,~{memory}"](c + 3072, 64)
    for s in range(steps):
        _tiles_step[NT](a0 + a_step * s, a1 + a_step * s, lda, b0 + s * AMX_TILE * ldb, b1 + s * AMX_TILE * ldb, ldb)
    inlined_assembly["tilestored %tmm0, ($0,$1,1)", NoneType, constraints="r,r,~{memory}"](c, 64)
    inlined_assembly["tilestored %tmm1, ($0,$1,1)", NoneType, constraints="r,r,~{memory}"](c + 1024, 64)
    inlined_assembly["tilestored %tmm2, ($0,$1,1)", NoneType, constraints="r,r,~{memory}"](c + 2048, 64)
    inlined_assembly["tilestored %tmm3, ($0,$1,1)", NoneType, constraints="r,r,~{memory}"](c + 3072, 64)


@always_inline
def amx_c_tiles(n_rb: Int, n: Int) -> Int:
    """fp32 elements of amx_panel's c for n_rb row blocks and n tokens: 4 C tiles per row block and pair of
    16-token tiles (a lone last tile's pair is half unused)."""
    return n_rb * ((n + 2 * AMX_TILE - 1) // (2 * AMX_TILE)) * 4 * AMX_C_TILE


@always_inline
def amx_c_tile(n: Int, rb: Int, t: Int, half: Int) -> Int:
    """Offset (fp32 elements) in amx_panel's c of the C tile of row block rb, token tile t (tokens 16 t ..) and A
    half (0: A0's 16 rows, 1: A1's); the tile's element [i][j] is weight row i . token j."""
    var pairs = (n + 2 * AMX_TILE - 1) // (2 * AMX_TILE)
    return ((rb * pairs + t // 2) * 4 + half * 2 + t % 2) * AMX_C_TILE


@always_inline
def amx_pack_bytes(n_rb: Int) -> Int:
    """Bytes of amx_panel's A scratch for n_rb row blocks: one K slice of their rows, tile after tile."""
    return n_rb * 2 * (AMX_KC // AMX_STEP) * AMX_TILE * 64


@always_inline
def _amx_pack_a(a: Pointer[Int, _], lda: Int, n_rb: Int, k0: Int, steps: Int, ap: Int):
    """Copies K slice k0 of every row block's A0 and A1 rows into ap as whole tiles (16 rows x 64 bytes, 1 KiB,
    64-byte aligned): [row block][half][step][16][64 bytes]."""
    for h in range(2 * n_rb):
        var src = a[unsafe_offset=h] + 2 * k0
        for s in range(steps):
            var dst = ap + (h * steps + s) * AMX_TILE * 64
            for i in range(AMX_TILE):
                var v = Pointer[UInt8, MutUntrackedOrigin](unsafe_from_address=src + i * lda + 64 * s).unsafe_load[
                    width=64](0)
                Pointer[mut=True, UInt8, MutUntrackedOrigin](unsafe_from_address=dst + i * 64).unsafe_store(0, v)


def amx_panel(
    a: Pointer[Int, _], lda: Int, n_rb: Int, xk: Pointer[Int32, _], n: Int, K: Int, c: Pointer[mut=True, Float32, _],
    a_pack: Pointer[mut=True, UInt8, _],
):
    """c = (n_rb row blocks of 2 x 16 weight rows) . (n activation rows packed like dot_panel's: blocks [K/2][MB] of
    bf16 pairs) on AMX tiles, over K (amx_k_ok) in slices of AMX_KC. Row block rb's A0 and A1 rows start at the
    addresses a[2 rb], a[2 rb + 1], rows lda bytes apart (the weight's own rows). A B tile is 16 tokens of a packed
    block (ldb = MB pairs of 4 bytes), so the tokens go two tiles at a time (one at the end of an odd count).
    c: amx_c_tiles(n_rb, n) fp32, laid out as amx_c_tile says. a_pack: amx_pack_bytes(n_rb), 64-byte aligned:
    with more than two token tiles, each K slice of A is first copied there tile by tile, because a tile load
    from rows that are not 64-byte aligned (a checkpoint's tensors often are not) runs ~35% slower, and each
    copied tile is then loaded once per token pair. The caller has loaded the tile configuration
    (cpu_isa.amx_configure) on this thread."""
    var K2 = K // 2
    var ldb = MB * 4
    var block_bytes = K2 * ldb
    var n_tt = (n + AMX_TILE - 1) // AMX_TILE
    var xa = Int(xk)
    var pack = n_tt > 2
    var ap = Int(a_pack)
    for k0 in range(0, K, AMX_KC):
        var steps = min(AMX_KC, K - k0) // AMX_STEP
        var kb = (k0 // 2) * ldb
        if pack:
            _amx_pack_a(a, lda, n_rb, k0, steps, ap)
        for t in range(0, n_tt, 2):
            var b0 = xa + (t // 3) * block_bytes + (t % 3) * 64 + kb
            var b1 = xa + ((t + 1) // 3) * block_bytes + ((t + 1) % 3) * 64 + kb
            for rb in range(n_rb):
                var ct = Int(c) + amx_c_tile(n, rb, t, 0) * 4
                var a0 = a[unsafe_offset=2 * rb] + 2 * k0
                var a1 = a[unsafe_offset=2 * rb + 1] + 2 * k0
                var a_lda = lda
                var a_step = 64
                if pack:
                    a0 = ap + 2 * rb * steps * AMX_TILE * 64
                    a1 = a0 + steps * AMX_TILE * 64
                    a_lda = 64
                    a_step = AMX_TILE * 64
                if t + 1 < n_tt:
                    _amx_block[2](a0, a1, a_lda, a_step, b0, b1, ldb, steps, ct, k0 == 0)
                else:
                    _amx_block[1](a0, a1, a_lda, a_step, b0, b1, ldb, steps, ct, k0 == 0)


@always_inline
def amx_rows(w: Pointer[mut=True, UInt16, MutUntrackedOrigin], r0: Int, N: Int, K: Int,
             tail: Pointer[mut=True, UInt16, MutUntrackedOrigin]) -> Int:
    """The address of 16 bf16 weight rows r0 .. r0 + 15 (of N, each K long) for an A tile: w's own rows, or where
    they run past N, a copy of the rows left in `tail` (16 x K, zero past N), so a tile never reads past w."""
    if r0 + AMX_TILE <= N:
        return Int(w.unsafe_offset(r0 * K))
    for i in range(AMX_TILE):
        for k in range(K):
            tail[unsafe_offset=i * K + k] = w[unsafe_offset=(r0 + i) * K + k] if r0 + i < N else 0
    return Int(tail)


@always_inline
def transpose16(r: StaticTuple[F32x, AMX_TILE]) -> StaticTuple[F32x, AMX_TILE]:
    """16 x 16 float32 transpose in registers: four perfect shuffles (row i of each round interleaved with row
    i + 8), 64 two-source permutes; a quarter of the cost of gathering each column from memory."""
    var a = r
    comptime for _ in range(4):
        var n = StaticTuple[F32x, AMX_TILE](fill=F32x(0))
        comptime for i in range(8):
            var il = a[i].interleave(a[i + 8])
            n[2 * i] = il.slice[W, offset=0]()
            n[2 * i + 1] = il.slice[W, offset=W]()
        a = n
    return a


@always_inline
def amx_tile_by_token(c: Pointer[mut=True, Float32, MutUntrackedOrigin], n: Int, rb: Int, t: Int,
                      half: Int) -> StaticTuple[F32x, AMX_TILE]:
    """The C tile of row block rb, token tile t and A half `half` in amx_panel's c, transposed: element j holds
    token 16 t + j's 16 outputs (the transposed store's input)."""
    var tile = c.unsafe_offset(amx_c_tile(n, rb, t, half))
    var r = StaticTuple[F32x, AMX_TILE](fill=F32x(0))
    comptime for i in range(AMX_TILE):
        r[i] = tile.unsafe_load[width=W](i * W)
    return transpose16(r)
