# Ragged causal GQA attention over MAX's paged KV cache, fused with everything between the QKV projection
# and the attention output: per-head q/k RMSNorm, NeoX RoPE, the in-place K/V store, flash attention.
#
# Reference (the spec): hyv3_graph/kernels/attention.py::attention_reference (float64, full history)
# Wrapper:              hyv3_graph/kernels/attention.py::attention       (MAX peer: attention_builtin)
# Fuzz test:            tests/test_attention.py        Bench: bench/cases/attention.py (`attention` cases)
# History (variants measured, kept or not): docs/perf-notes.md, "attention".
#
# Contract. Inputs: qkv [T, (Hq + 2 Hkv) D] (the raw projection, q heads then k heads then v heads), q_norm and
# k_norm [D], freqs_cis [P, D] float32 ((cos, sin) interleaved per frequency), input_row_offsets [B + 1], and
# the cache exactly as MAX lays it out: blocks [pages, 2, layers, page_size, Hkv, D] (written in place),
# cache_lengths [B], lookup_table [B, cols] (page ids), layer [1]. Output [T, Hq, D]. Parameters: eps (both
# norms) and scale (0 means 1/sqrt(D)). The cache, qkv and output share one dtype (float32 or bfloat16);
# norms, softmax and accumulation are float32. New token i of sequence b sits at position
# cache_lengths[b] + i and attends to keys 0 .. that position. Bad page ids or positions past the pages or
# the rope table raise before anything is read or written.
#
# Design, and why:
#   * Norm + RoPE + K/V store (pass 1, parallel over tokens): only this op knows each token's position
#     (cache length + index in its ragged sequence), so RoPE and the store belong here; the norms ride
#     along on the same read of qkv. Q leaves pass 1 normed, rotated and pre-scaled, in float32.
#   * Attention (pass 2) cuts every sequence into query tiles of QT = ROWS / G queries, so a tile's queries
#     x the G query heads of one kv head form R = QT * G rows that share each K/V row read (GQA without
#     repeating K/V). Keys go by in tiles with an online softmax (running max and sum in float32): no [L, L]
#     matrix exists, keys past a tile's last query are never visited, and only key tiles that cross the
#     diagonal are masked.
#   * Wide tiles (R > NR: prefill) are work items (sequence, query tile, kv head), longest first, taken by
#     whichever core is free (work_queue.mojo). Rows are the SIMD lanes: Q is packed transposed, Qp [D][Rp], so
#     S^T = K Q^T is a register-blocked broadcast-FMA micro-kernel (a K element times a vector of 16 rows), the
#     softmax's max and sum over keys are lane-wise (no horizontal reductions), and P V accumulates into
#     O^T [D][Rp] the same way. A float32 cache's full K/V tiles that lie within one page are read in place
#     (rows Hkv * D apart); the others (bf16, crossing a page, a sequence's last partial tile) are widened once
#     into a dense float32 scratch.
#   * Narrow tiles (R <= NR: decode, the last queries of a prefill) do few FLOPs per K/V byte. Their work items
#     are (sequence, query tile, chunk of KCHUNK keys) over all kv heads, so a long sequence still spreads over
#     every core; K and V are read once, straight from the cache, head by head: that head's NR query rows stay
#     in L1 while its K rows go by (token by token over all heads would keep all of Hy3's Q, 32 KiB, hot: the
#     whole L1). Each (tile of KTN keys, kv head) pass prefetches into L2 the rows of the pass PFH later, so
#     prefetches spread over the whole tile. The online softmax keeps the rows in the lanes ([KTN][NR] scores);
#     each chunk leaves a partial (max, sum, O) and the last of a query tile's chunks to finish combines them.
#   * bfloat16 cache on a CPU with AVX512_BF16 (cpuid at run time, cpu_isa.mojo; HYV3_PORTABLE_KERNELS=1 forces
#     the float32 path): narrow items compute on bf16 pairs with vdpbf16ps, half the multiply instructions.
#     Pass 1 also rounds Q to bf16, paired along D against K as stored; each tile's probabilities are rounded
#     to bf16 and paired along keys, against V rows interleaved two keys at a time. Wide items stay float32.
#   * Decode is compute bound on a 2-core machine like ours, not memory bound: G = 8 query heads per kv head
#     make 4 FLOPs per float32 K/V byte, about the machine's own balance.
#
# Code map: `Attention.execute` validates the inputs, runs pass 1 (`_prepare_token`, parallel over tokens), plans
# the work items, then runs pass 2: `_attend_wide` and `_attend_narrow` (whose last chunk per query tile calls
# `_combine_narrow`). The passes read the call's state from small structs (`_Shape`, `_Ragged`, `_Paged`,
# `_Queries`, `_Projection`, `_NarrowItems`).
#
# Today's numbers (`python -m bench`, bench/results/latest.md, 2026-12-02, 2-core AMD EPYC family 26 (Zen 5)):
# prefill [1, 37, 300, 1024] fp32 103 ms (181 GFLOP/s, 89% of the fp32 GEMM probe, 3.4x MAX); prefill over
# caches 427 ms (3.0x MAX); decode of 16 sequences (caches 100..4000) fp32 10.7 ms = 25 GB/s of K/V (5.9x MAX),
# bf16 cache 7.4 ms (69x MAX).
import extensibility
from extensibility import InputTensor, OutputTensor, _MutableInputTensor
from max.gpu.host import DeviceContext
from std.math import exp, sqrt
from std.memory import bitcast
from std.utils import StaticTuple
from .cpu_isa import (LANES, I32x, adjacent_bf16_pairs, dot_bf16_pairs, from_f32, narrow_row, round_to_bf16,
                      use_bf16_dot, widen_row)
from .microkernels import untracked
from .work_queue import parallelize_dynamic, parallelize_sized, sort_codes_by_cost
from std.atomic import Atomic
from std.sys import size_of
from std.sys.intrinsics import prefetch, PrefetchOptions

comptime W = LANES  # SIMD lanes = rows per vector
comptime F32x = SIMD[DType.float32, W]
comptime KT = 32  # keys per wide tile
comptime KTN = 32  # keys per narrow tile (the header says how it and PFH were chosen)
comptime ROWS = 64  # target rows (queries x heads of one kv head) per work item
comptime NV = 4  # row vectors per micro-kernel block
comptime NJ = 4  # keys per S micro-kernel block
comptime ND = 4  # head dims per P V micro-kernel block
comptime NR = 8  # items with at most this many rows (decode: one query x G heads) take the narrow path
comptime KCHUNK = 512  # keys per narrow item: a long decode splits over the cores, partial softmaxes combined
comptime PFH = 2  # a narrow (tile, kv head) pass prefetches the K/V rows of the pass this many later


@always_inline
def _axpy(y: Pointer[mut=True, Float32, _], a: Float32, x: Pointer[Float32, _], n: Int):
    var i = 0
    while i + W <= n:
        y.unsafe_store(i, x.unsafe_load[width=W](i).fma(F32x(a), y.unsafe_load[width=W](i)))
        i += W
    while i < n:
        y[unsafe_offset=i] = y[unsafe_offset=i] + a * x[unsafe_offset=i]
        i += 1


@always_inline
def _norm_rope[dt: DType](
    dst: Pointer[mut=True, Float32, _], src: Pointer[Scalar[dt], _], gamma: Pointer[Scalar[dt], _],
    cs: Pointer[Float32, _], x: Pointer[mut=True, Float32, _], D: Int, eps: Float32, mul: Float32,
):
    """dst = rope(rms_norm(src) * gamma) * mul, HF order; cs = this position's freqs_cis row, x = [D] scratch."""
    widen_row(x, src, D)
    var ssv = F32x(0)
    var i = 0
    while i + W <= D:
        var v = x.unsafe_load[width=W](i)
        ssv = v.fma(v, ssv)
        i += W
    var ss = ssv.reduce_add()
    while i < D:
        ss += x[unsafe_offset=i] * x[unsafe_offset=i]
        i += 1
    var inv = 1.0 / sqrt(ss / Float32(D) + eps)
    i = 0
    while i + W <= D:
        x.unsafe_store(i, x.unsafe_load[width=W](i) * inv * gamma.unsafe_load[width=W](i).cast[DType.float32]())
        i += W
    while i < D:
        x[unsafe_offset=i] = x[unsafe_offset=i] * inv * gamma[unsafe_offset=i].cast[DType.float32]()
        i += 1
    var half = D // 2
    i = 0
    while i + W <= half:
        var a = x.unsafe_load[width=W](i)
        var b = x.unsafe_load[width=W](half + i)
        var c, s = cs.unsafe_load[width=2 * W](2 * i).deinterleave()  # (cos, sin) pairs
        dst.unsafe_store(i, (a * c - b * s) * mul)
        dst.unsafe_store(half + i, (b * c + a * s) * mul)
        i += W
    while i < half:
        var c = cs[unsafe_offset=2 * i]
        var s = cs[unsafe_offset=2 * i + 1]
        var a = x[unsafe_offset=i]
        var b = x[unsafe_offset=half + i]
        dst[unsafe_offset=i] = (a * c - b * s) * mul
        dst[unsafe_offset=half + i] = (b * c + a * s) * mul
        i += 1


@always_inline
def _scores[nv: Int](
    s: Pointer[mut=True, Float32, _], q: Pointer[Float32, _], k: Pointer[Float32, _], D: Int, Rp: Int, ks: Int,
):
    """S^T[j][rows] = sum_d K[j, d] * Qp[d][rows] for NJ keys x nv row vectors; s, q, k start at the block, K rows
    are ks apart."""
    var acc = StaticTuple[F32x, NJ * nv](fill=F32x(0))
    for d in range(D):
        var qv = StaticTuple[F32x, nv](fill=F32x(0))
        comptime for v in range(nv):
            qv[v] = q.unsafe_load[width=W](d * Rp + v * W)
        comptime for j in range(NJ):
            var kb = F32x(k[unsafe_offset=j * ks + d])
            comptime for v in range(nv):
                acc[j * nv + v] = kb.fma(qv[v], acc[j * nv + v])
    comptime for j in range(NJ):
        comptime for v in range(nv):
            s.unsafe_store(j * Rp + v * W, acc[j * nv + v])


@always_inline
def _accumulate_pv[nd: Int, nv: Int](
    o: Pointer[mut=True, Float32, _], p: Pointer[Float32, _], v: Pointer[Float32, _], alpha: Pointer[Float32, _],
    D: Int, Rp: Int, nk: Int, vs: Int,
):
    """O^T[d][rows] = O^T[d][rows] * alpha + sum_j V[j, d] * P^T[j][rows] for nd dims x nv row vectors; V rows are
    vs apart."""
    var acc = StaticTuple[F32x, nd * nv](fill=F32x(0))
    comptime for v in range(nv):
        var a = alpha.unsafe_load[width=W](v * W)
        comptime for i in range(nd):
            acc[i * nv + v] = o.unsafe_load[width=W](i * Rp + v * W) * a
    for j in range(nk):
        var pv = StaticTuple[F32x, nv](fill=F32x(0))
        comptime for vv in range(nv):
            pv[vv] = p.unsafe_load[width=W](j * Rp + vv * W)
        comptime for i in range(nd):
            var vb = F32x(v[unsafe_offset=j * vs + i])
            comptime for vv in range(nv):
                acc[i * nv + vv] = vb.fma(pv[vv], acc[i * nv + vv])
    comptime for i in range(nd):
        comptime for vv in range(nv):
            o.unsafe_store(i * Rp + vv * W, acc[i * nv + vv])


@always_inline
def _lane_sums(acc: StaticTuple[F32x, W]) -> F32x:
    """Lane l = the sum of acc[l]'s lanes: a transpose-add tree of 45 ops instead of 16 reductions' 128. Its first two
    levels stay within 128-bit lanes (unpack, shufps: cheap shuffles), the last two move 128-bit blocks."""
    comptime assert W == 16, "_lane_sums is written for 16 lanes"
    # Level 1: pairs (a, b) -> per 128-bit block j: [a_j0 + a_j2, b_j0 + b_j2, a_j1 + a_j3, b_j1 + b_j3]
    var l1 = StaticTuple[F32x, 8](fill=F32x(0))
    comptime for i in range(8):
        var a = acc[2 * i]
        var b = acc[2 * i + 1]
        l1[i] = (a.shuffle[0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29](b)
                 + a.shuffle[2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31](b))
    # Level 2: -> per 128-bit block j: the block-j sums of acc[4i], acc[4i + 1], acc[4i + 2], acc[4i + 3]
    var l2 = StaticTuple[F32x, 4](fill=F32x(0))
    comptime for i in range(4):
        var c = l1[2 * i]
        var d = l1[2 * i + 1]
        l2[i] = (c.shuffle[0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29](d)
                 + c.shuffle[2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31](d))
    # Levels 3 and 4: sum the four 128-bit blocks of l2[m] into block m of the result
    var v01 = (l2[0].shuffle[0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23](l2[1])
               + l2[0].shuffle[8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31](l2[1]))
    var v23 = (l2[2].shuffle[0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23](l2[3])
               + l2[2].shuffle[8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31](l2[3]))
    return (v01.shuffle[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27](v23)
            + v01.shuffle[4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31](v23))


@always_inline
def _dots_rows2[dt: DType](
    q: Pointer[Float32, _], rows: StaticTuple[Int, NR], k0: Pointer[Scalar[dt], _], k1: Pointer[Scalar[dt], _], D: Int,
) -> F32x:
    """Scores of two K rows (read once, straight from the cache) against NR query rows q + rows[r]: lane
    t * NR + r is K row t . query row r. Each query chunk is loaded once for both keys."""
    comptime assert 2 * NR == W, "two keys' NR scores fill one vector"
    var acc = StaticTuple[F32x, W](fill=F32x(0))
    var i = 0
    while i + W <= D:
        var ka = k0.unsafe_load[width=W](i).cast[DType.float32]()
        var kb = k1.unsafe_load[width=W](i).cast[DType.float32]()
        comptime for r in range(NR):
            var qv = q.unsafe_load[width=W](rows[r] + i)
            acc[r] = qv.fma(ka, acc[r])
            acc[NR + r] = qv.fma(kb, acc[NR + r])
        i += W
    var out = _lane_sums(acc)
    while i < D:
        var ka = k0[unsafe_offset=i].cast[DType.float32]()
        var kb = k1[unsafe_offset=i].cast[DType.float32]()
        comptime for r in range(NR):
            var qd = q[unsafe_offset=rows[r] + i]
            out[r] += qd * ka
            out[NR + r] += qd * kb
        i += 1
    return out


@always_inline
def _dots_rows2_bf16(
    q: Pointer[Int32, _], rows: StaticTuple[Int, NR], k0: Pointer[Int32, _], k1: Pointer[Int32, _], D2: Int,
) -> F32x:
    """_dots_rows2 for a bfloat16 cache on AVX512_BF16: the query rows (rows[r] as in _dots_rows2, float offsets; q
    holds them rounded to bf16 pairs) and the two K rows as stored are D2 bf16 pairs each (D2 a multiple of W), one
    vdpbf16ps per 16 pairs and row."""
    var pair_rows = StaticTuple[Int, NR](fill=0)
    comptime for r in range(NR):
        pair_rows[r] = rows[r] // 2
    var acc = StaticTuple[F32x, W](fill=F32x(0))
    for i in range(0, D2, W):
        var ka = k0.unsafe_load[width=W](i)
        var kb = k1.unsafe_load[width=W](i)
        comptime for r in range(NR):
            var qv = q.unsafe_load[width=W](pair_rows[r] + i)
            acc[r] = dot_bf16_pairs(acc[r], qv, ka)
            acc[NR + r] = dot_bf16_pairs(acc[NR + r], qv, kb)
    return _lane_sums(acc)


@always_inline
def _cache_offset(lut_row: Pointer[Scalar[DType.uint32], _], pos: Int, page: Int, s_page: Int, s_tok: Int) -> Int:
    """Element offset in the cache of one sequence's position pos (its page from the lookup table row)."""
    return Int(lut_row[unsafe_offset=pos // page]) * s_page + (pos % page) * s_tok


@always_inline
def _tile_offsets(
    dst: Pointer[mut=True, Int, _], lut_row: Pointer[Scalar[DType.uint32], _], k0: Int, n: Int, page: Int,
    s_page: Int, s_tok: Int, base: Int,
):
    """Element offsets in the cache of keys k0 .. k0 + n - 1 of one sequence (base: layer and head): one page
    lookup per page, then a token stride per key."""
    var j = 0
    while j < n:
        var pos = k0 + j
        var at = _cache_offset(lut_row, pos, page, s_page, s_tok) + base
        for _ in range(min(page - pos % page, n - j)):
            dst[unsafe_offset=j] = at
            at += s_tok
            j += 1


@always_inline
def _later_pass(g: Int, Hkv: Int, s_head: Int, keys_left: Int) -> StaticTuple[Int, 3]:
    """The narrow (tile, kv head) pass PFH after kv head g's pass of the current tile, which g's pass prefetches:
    its first key's index from the current tile's, its element shift from head g's rows, and its number of keys
    (keys_left: keys from the current tile's first to the item's end)."""
    var at = (g + PFH) // Hkv * KTN
    return StaticTuple[Int, 3](at, ((g + PFH) % Hkv - g) * s_head, min(KTN, keys_left - at))


@always_inline
def _prefetch_rows[dt: DType](base: Pointer[Scalar[dt], _], shift: Int, n: Int):
    """Prefetches n contiguous elements at base + shift into L2 (not L1: rows one token stride apart share
    L1 sets and would evict each other)."""
    comptime per_line = 64 // size_of[dt]()
    var at = base.unsafe_offset(shift)
    for i in range(0, n, per_line):
        prefetch[PrefetchOptions().for_read().medium_locality()](at.unsafe_offset(i))


@always_inline
def _accumulate_rows[dt: DType, nv: Int](
    o: Pointer[mut=True, Float32, _], p: Pointer[Float32, _], alpha: SIMD[DType.float32, NR],
    vbase: Pointer[Scalar[dt], _], voffs: Pointer[Int, _], nk: Int, D: Int, pf_at: Int, pf_shift: Int, n_pf: Int,
    first: Bool,
):
    """O[r][d : d + nv W] = O * alpha[r] + sum_j P[j][r] V_j[d : d + nv W] for NR rows; each V chunk read once.
    The same chunk of n_pf V rows of a later pass (offsets voffs[pf_at:] + pf_shift) is prefetched along the way.
    The first tile starts from zero and never reads O (uninitialised until then)."""
    var acc = StaticTuple[F32x, NR * nv](fill=F32x(0))
    if not first:
        comptime for r in range(NR):
            comptime for v in range(nv):
                acc[r * nv + v] = o.unsafe_load[width=W](r * D + v * W) * alpha[r]
    for j in range(nk):
        var row = vbase.unsafe_offset(voffs[unsafe_offset=j])
        if j < n_pf:
            _prefetch_rows(vbase, voffs[unsafe_offset=pf_at + j] + pf_shift, nv * W)
        var vv = StaticTuple[F32x, nv](fill=F32x(0))
        comptime for v in range(nv):
            vv[v] = row.unsafe_load[width=W](v * W).cast[DType.float32]()
        comptime for r in range(NR):
            var pb = F32x(p[unsafe_offset=j * NR + r])
            comptime for v in range(nv):
                acc[r * nv + v] = pb.fma(vv[v], acc[r * nv + v])
    comptime for r in range(NR):
        comptime for v in range(nv):
            o.unsafe_store(r * D + v * W, acc[r * nv + v])


@always_inline
def _accumulate_rows_bf16(
    o: Pointer[mut=True, Float32, _], pp: Pointer[Int32, _], alpha: SIMD[DType.float32, NR], vbase: Pointer[UInt16, _],
    voffs: Pointer[Int, _], nk: Int, D: Int, pf_at: Int, pf_shift: Int, n_pf: Int, first: Bool,
):
    """_accumulate_rows[nv=2] for a bfloat16 cache on AVX512_BF16, two keys per vdpbf16ps: pp [KTN / 2][NR] holds
    (P[2i][r], P[2i + 1][r]) as bf16 pairs, and each key pair's V chunk is interleaved into (V_2i[d], V_2i+1[d])
    pairs, so each FMA of the float32 path becomes half a vdpbf16ps. A missing last key aliases the one before it
    (its P is 0)."""
    var acc = StaticTuple[F32x, NR * 2](fill=F32x(0))
    if not first:
        comptime for r in range(NR):
            comptime for v in range(2):
                acc[r * 2 + v] = o.unsafe_load[width=W](r * D + v * W) * alpha[r]
    for jp in range((nk + 1) // 2):
        var j0 = 2 * jp
        var a = vbase.unsafe_offset(voffs[unsafe_offset=j0]).unsafe_load[width=2 * W]()
        var b = vbase.unsafe_offset(voffs[unsafe_offset=min(j0 + 1, nk - 1)]).unsafe_load[width=2 * W]()
        comptime for t in range(2):
            if j0 + t < n_pf:
                _prefetch_rows(vbase, voffs[unsafe_offset=pf_at + j0 + t] + pf_shift, 2 * W)
        var pairs = a.interleave(b)
        var lo = bitcast[DType.int32, W](pairs.slice[2 * W]())
        var hi = bitcast[DType.int32, W](pairs.slice[2 * W, offset = 2 * W]())
        comptime for r in range(NR):
            var pb = I32x(pp[unsafe_offset=jp * NR + r])
            acc[r * 2] = dot_bf16_pairs(acc[r * 2], pb, lo)
            acc[r * 2 + 1] = dot_bf16_pairs(acc[r * 2 + 1], pb, hi)
    comptime for r in range(NR):
        comptime for v in range(2):
            o.unsafe_store(r * D + v * W, acc[r * 2 + v])



# The call's state, grouped by what it describes. Each pass below is a function of the groups it reads, so the
# parallel loops in `execute` are one-line closures over a few small structs. Pointers are untracked: the
# buffers they point into (the op's tensors and execute's scratch Lists) outlive every pass.
@fieldwise_init
struct _Shape(ImplicitlyCopyable, Movable):
    """Heads, head dim and the query tiling: T new tokens, Hq = G x Hkv heads of D (D2 bf16 pairs), QT queries
    per tile."""
    var T: Int
    var Hq: Int
    var Hkv: Int
    var D: Int
    var G: Int
    var QT: Int
    var D2: Int


@fieldwise_init
struct _Ragged(ImplicitlyCopyable, Movable):
    """The ragged batch: row offsets [B + 1], cache lengths [B], page table [B, lut_s] and each new token's
    sequence [T]."""
    var offp: Pointer[mut=True, UInt32, MutUntrackedOrigin]
    var clp: Pointer[mut=True, UInt32, MutUntrackedOrigin]
    var lutp: Pointer[mut=True, UInt32, MutUntrackedOrigin]
    var lut_s: Int
    var tsp: Pointer[mut=True, Int, MutUntrackedOrigin]


@fieldwise_init
struct _Paged[dt: DType](ImplicitlyCopyable, Movable):
    """This layer's view of MAX's paged blocks [pages, 2, layers, page, Hkv, D]: base and strides."""
    var bp: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin]
    var page: Int
    var s_page: Int
    var s_kind: Int
    var kv_base: Int
    var s_tok: Int
    var s_head: Int


@fieldwise_init
struct _Queries(ImplicitlyCopyable, Movable):
    """Q as pass 1 leaves it: normed, rotated and pre-scaled float32 [T, Hq, D]; with `dot` also as bf16 pairs
    [T, Hq, D2] for the narrow items' vdpbf16ps path."""
    var qsp: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var qbp: Pointer[mut=True, Int32, MutUntrackedOrigin]
    var dot: Bool


@fieldwise_init
struct _Projection[dt: DType](ImplicitlyCopyable, Movable):
    """Pass 1's inputs: the qkv rows, the q/k norm weights, the rope table, the Q scale, per-token scratch."""
    var qkvp: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin]
    var qkv_s: Int
    var qnp: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin]
    var knp: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin]
    var fp: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var fs: Int
    var xsp: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var ksp: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var q_mul: Float32


@fieldwise_init
struct _NarrowItems(ImplicitlyCopyable, Movable):
    """The narrow items (sequence nbp, first query nqp, first key nkp; nop: the order they run in), their query
    tiles (tfp: a tile's first item, ntp: an item's tile, tdp: chunks finished), and each item's partial
    softmax: O [Hkv][NR][D] at pop, max and sum [Hkv][2][NR] at pmp."""
    var nbp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var nqp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var nkp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var nop: Pointer[mut=True, Int, MutUntrackedOrigin]
    var tfp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var ntp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var tdp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var pop: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var pmp: Pointer[mut=True, Float32, MutUntrackedOrigin]


@always_inline
def _prepare_token[dt: DType, eps: Float32](
    sh: _Shape, rg: _Ragged, pc: _Paged[dt], qr: _Queries, pj: _Projection[dt], t: Int
):
    """Pass 1 for new token t: q -> Q (normed, rotated, times scale; as bf16 pairs too with `dot`);
    k (normed, rotated) and v -> the cache."""
    var Hq = sh.Hq
    var Hkv = sh.Hkv
    var D = sh.D
    var D2 = sh.D2
    var offp = rg.offp
    var clp = rg.clp
    var lutp = rg.lutp
    var lut_s = rg.lut_s
    var tsp = rg.tsp
    var bp = pc.bp
    var page = pc.page
    var s_page = pc.s_page
    var s_kind = pc.s_kind
    var kv_base = pc.kv_base
    var s_tok = pc.s_tok
    var s_head = pc.s_head
    var qsp = qr.qsp
    var qbp = qr.qbp
    var dot = qr.dot
    var qkvp = pj.qkvp
    var qkv_s = pj.qkv_s
    var qnp = pj.qnp
    var knp = pj.knp
    var fp = pj.fp
    var fs = pj.fs
    var xsp = pj.xsp
    var ksp = pj.ksp
    var q_mul = pj.q_mul
    var b = tsp[unsafe_offset=t]
    var pos = Int(clp[unsafe_offset=b]) + t - Int(offp[unsafe_offset=b])
    var cs = fp.unsafe_offset(pos * fs)
    var row = qkvp.unsafe_offset(t * qkv_s)
    var x = xsp.unsafe_offset(t * D)
    var kr = ksp.unsafe_offset(t * D)
    for h in range(Hq):
        var q = qsp.unsafe_offset((t * Hq + h) * D)
        _norm_rope(q, row.unsafe_offset(h * D), qnp, cs, x, D, eps, q_mul)
        if dot:
            var qb = qbp.unsafe_offset((t * Hq + h) * D2)
            for i in range(0, D2, W):
                qb.unsafe_store(i, adjacent_bf16_pairs[W](q.unsafe_load[width=2 * W](2 * i)))
    var slot = bp.unsafe_offset(_cache_offset(lutp.unsafe_offset(b * lut_s), pos, page, s_page, s_tok) + kv_base)
    for h in range(Hkv):
        _norm_rope(kr, row.unsafe_offset((Hq + h) * D), knp, cs, x, D, eps, 1.0)
        narrow_row(slot.unsafe_offset(h * s_head), kr, D)
        var v = row.unsafe_offset((Hq + Hkv + h) * D)
        var vdst = slot.unsafe_offset(s_kind + h * s_head)
        for d in range(D):
            vdst[unsafe_offset=d] = v[unsafe_offset=d]


@always_inline
def _combine_narrow[dt: DType](
    sh: _Shape, rg: _Ragged, nw: _NarrowItems, outp: Pointer[mut=True, Scalar[dt], MutUntrackedOrigin], tile: Int
):
    """Combines a narrow query tile's chunks: out = sum_c e^(m_c - M) O_c / sum_c e^(m_c - M) l_c."""
    var Hq = sh.Hq
    var Hkv = sh.Hkv
    var D = sh.D
    var G = sh.G
    var QT = sh.QT
    var offp = rg.offp
    var nbp = nw.nbp
    var nqp = nw.nqp
    var tfp = nw.tfp
    var pop = nw.pop
    var pmp = nw.pmp
    var first = tfp[unsafe_offset=tile]
    var last = tfp[unsafe_offset=tile + 1]
    var b = nbp[unsafe_offset=first]
    var tok0 = Int(offp[unsafe_offset=b]) + nqp[unsafe_offset=first]
    var R = min(QT, Int(offp[unsafe_offset=b + 1]) - tok0) * G
    var w_buf = List[Float32](length=last - first, fill=0)  # e^(m_c - M) per chunk
    var o_buf = List[Float32](length=D, fill=0)
    var wp = w_buf.unsafe_ptr()
    var acc = o_buf.unsafe_ptr()
    for g in range(Hkv):
        for r in range(R):
            var M = Float32.MIN
            for c in range(first, last):
                M = max(M, pmp[unsafe_offset=(c * Hkv + g) * 2 * NR + r])
            var total = Float32(0)
            for c in range(first, last):
                var w = exp(pmp[unsafe_offset=(c * Hkv + g) * 2 * NR + r] - M)
                wp[unsafe_offset=c - first] = w
                total += w * pmp[unsafe_offset=(c * Hkv + g) * 2 * NR + NR + r]
            for dd in range(D):
                acc[unsafe_offset=dd] = 0
            for c in range(first, last):
                _axpy(acc, wp[unsafe_offset=c - first] / total, pop.unsafe_offset(((c * Hkv + g) * NR + r) * D), D)
            narrow_row(outp.unsafe_offset(((tok0 + r // G) * Hq + g * G + r % G) * D), acc, D)


@always_inline
def _attend_narrow[dt: DType](
    sh: _Shape, rg: _Ragged, pc: _Paged[dt], qr: _Queries, nw: _NarrowItems,
    outp: Pointer[mut=True, Scalar[dt], MutUntrackedOrigin], slot: Int,
):
    """Pass 2, the narrow item run `slot`-th: its chunk of KCHUNK keys for all kv heads, leaving a partial
    softmax; the last of its query tile's chunks to finish combines them."""
    var Hq = sh.Hq
    var Hkv = sh.Hkv
    var D = sh.D
    var G = sh.G
    var QT = sh.QT
    var D2 = sh.D2
    var offp = rg.offp
    var clp = rg.clp
    var lutp = rg.lutp
    var lut_s = rg.lut_s
    var bp = pc.bp
    var page = pc.page
    var s_page = pc.s_page
    var s_kind = pc.s_kind
    var kv_base = pc.kv_base
    var s_tok = pc.s_tok
    var s_head = pc.s_head
    var qsp = qr.qsp
    var qbp = qr.qbp
    var dot = qr.dot
    var nbp = nw.nbp
    var nqp = nw.nqp
    var nkp = nw.nkp
    var nop = nw.nop
    var tfp = nw.tfp
    var ntp = nw.ntp
    var tdp = nw.tdp
    var pop = nw.pop
    var pmp = nw.pmp
    var item = nop[unsafe_offset=slot]
    var b = nbp[unsafe_offset=item]
    var q0 = nqp[unsafe_offset=item]
    var k_lo = nkp[unsafe_offset=item]
    var tok0 = Int(offp[unsafe_offset=b]) + q0
    var n_q = min(QT, Int(offp[unsafe_offset=b + 1]) - tok0)
    var R = n_q * G
    var first_pos = Int(clp[unsafe_offset=b]) + q0
    var k_hi = min(first_pos + n_q, k_lo + KCHUNK)
    var rows = StaticTuple[Int, NR](fill=0)  # kv head 0's rows; rows past R repeat the last one
    var qpos = SIMD[DType.float32, NR](0)
    for r in range(NR):
        var rr = min(r, R - 1)
        rows[r] = ((tok0 + rr // G) * Hq + rr % G) * D
        qpos[r] = Float32(first_pos + rr // G)
    var s_buf = List[Float32](length=Hkv * KTN * NR, fill=0)  # scores, then probabilities [Hkv][KTN][NR]
    var p_pairs = List[Int32](length=KTN // 2 * NR, fill=0)  # dot: one head's probabilities as bf16 key pairs
    var ppp = p_pairs.unsafe_ptr()
    var off_buf = List[Int](length=KCHUNK, fill=0)  # cache offset of each key's token (layer included)
    var sp = s_buf.unsafe_ptr()
    var tile_max = List[Float32](length=Hkv * W, fill=0)  # per kv head: the score pass's max per row
    var tmp = tile_max.unsafe_ptr()
    var o_all = pop.unsafe_offset(item * Hkv * NR * D)  # this item's O [Hkv][NR][D]
    var ml = pmp.unsafe_offset(item * Hkv * NR * 2)  # per kv head: max [NR], then sum [NR]
    for g in range(Hkv):
        ml.unsafe_store(g * 2 * NR, SIMD[DType.float32, NR](Float32.MIN))
    _tile_offsets(off_buf.unsafe_ptr(), lutp.unsafe_offset(b * lut_s), k_lo, k_hi - k_lo, page, s_page, s_tok,
                  kv_base)
    for p in range(PFH):  # the first PFH (tile, kv head) passes; each pass prefetches the one PFH later
        var t_at = p // Hkv * KTN
        for j in range(t_at, min(t_at + KTN, k_hi - k_lo)):
            _prefetch_rows(bp, off_buf[j] + p % Hkv * s_head, D)
            _prefetch_rows(bp, off_buf[j] + s_kind + p % Hkv * s_head, D)
    for k0 in range(k_lo, k_hi, KTN):
        var nk = min(KTN, k_hi - k0)
        var tof = off_buf.unsafe_ptr().unsafe_offset(k0 - k_lo)
        var first = k0 == k_lo  # the item's first tile stores its O instead of accumulating into it
        # Scores, kv head by kv head, so that the head's NR query rows (NR x D floats) stay in L1 while
        # the tile's K rows of that head go by; meanwhile the K rows of the pass PFH later are
        # prefetched (its V rows during P V).
        # Keys past a row's position, and the alias of an odd tile's last pair, score -inf; only a tile
        # that holds such keys is masked.
        var masked = nk % 2 == 1 or k0 + nk - 1 > first_pos
        var kpos = SIMD[DType.float32, NR](Float32(k0)).join(SIMD[DType.float32, NR](Float32(k0 + 1)))
        var qpos2 = qpos.join(qpos)
        for g in range(Hkv):
            var pf = _later_pass(g, Hkv, s_head, k_hi - k0)
            var qrows = StaticTuple[Int, NR](fill=0)
            comptime for r in range(NR):
                qrows[r] = rows[r] + g * G * D
            var kg = bp.unsafe_offset(g * s_head)
            var mx2 = F32x(Float32.MIN)  # the tile's max per row, two keys' halves
            for j in range(0, nk, 2):  # key pairs; past nk the second key aliases the first (masked)
                comptime for t in range(2):
                    if j + t < pf[2]:
                        _prefetch_rows(kg, tof[unsafe_offset=pf[0] + j + t] + pf[1], D)
                var k0 = kg.unsafe_offset(tof[unsafe_offset=j])
                var k1 = kg.unsafe_offset(tof[unsafe_offset=min(j + 1, nk - 1)])
                var sc: F32x
                if dot:
                    sc = _dots_rows2_bf16(
                        qbp, qrows, k0.unsafe_bitcast[Int32](), k1.unsafe_bitcast[Int32](), D2)
                else:
                    sc = _dots_rows2(qsp, qrows, k0, k1, D)
                if masked:
                    var key = kpos + F32x(Float32(j))
                    sc = (key.le(qpos2) & key.lt(F32x(Float32(k_hi)))).select(sc, F32x(Float32.MIN))
                sp.unsafe_store((g * KTN + j) * NR, sc)
                mx2 = max(mx2, sc)
            tmp.unsafe_store(g * W, mx2)
        # Online softmax with the rows in the lanes ([KTN][NR] per kv head, two keys per vector): the
        # max and sum over keys are lane-wise.
        for g in range(Hkv):
            var sg = sp.unsafe_offset(g * KTN * NR)
            var m = ml.unsafe_load[width=NR](g * 2 * NR)
            var l = ml.unsafe_load[width=NR](g * 2 * NR + NR)
            var mx2 = tmp.unsafe_load[width=W](g * W)
            var mx = max(m, max(mx2.slice[NR](), mx2.slice[NR, offset=NR]()))
            var shift = mx.gt(SIMD[DType.float32, NR](Float32.MIN)).select(mx, 0)  # no key yet: p = 0
            var shift2 = shift.join(shift)
            var total2 = F32x(0)
            for j in range(0, nk, 2):
                var pv = exp(sg.unsafe_load[width=W](j * NR) - shift2)
                sg.unsafe_store(j * NR, pv)
                total2 += pv
            var alpha = exp(m - shift)
            ml.unsafe_store(g * 2 * NR, mx)
            ml.unsafe_store(g * 2 * NR + NR, l * alpha + total2.slice[NR]() + total2.slice[NR, offset=NR]())
            var og = o_all.unsafe_offset(g * NR * D)
            var vrow = bp.unsafe_offset(s_kind + g * s_head)
            var pf = _later_pass(g, Hkv, s_head, k_hi - k0)
            if dot:
                for j in range(0, nk, 2):  # lane r: (P[j][r], P[j + 1][r]) as one bf16 pair
                    var p16 = round_to_bf16[W](sg.unsafe_load[width=W](j * NR))
                    ppp.unsafe_store(j // 2 * NR, bitcast[DType.int32, NR](
                        p16.slice[NR]().interleave(p16.slice[NR, offset=NR]())))
                for d in range(0, D, 2 * W):
                    _accumulate_rows_bf16(og.unsafe_offset(d), ppp, alpha,
                                          vrow.unsafe_bitcast[UInt16]().unsafe_offset(d), tof, nk, D,
                                          pf[0], pf[1], pf[2], first)
                continue
            var d = 0
            while d + 3 * W <= D:
                _accumulate_rows[nv=3](og.unsafe_offset(d), sg, alpha, vrow.unsafe_offset(d), tof, nk, D,
                                       pf[0], pf[1], pf[2], first)
                d += 3 * W
            while d + 2 * W <= D:
                _accumulate_rows[nv=2](og.unsafe_offset(d), sg, alpha, vrow.unsafe_offset(d), tof, nk, D,
                                       pf[0], pf[1], pf[2], first)
                d += 2 * W
            while d + W <= D:
                _accumulate_rows[nv=1](og.unsafe_offset(d), sg, alpha, vrow.unsafe_offset(d), tof, nk, D,
                                       pf[0], pf[1], pf[2], first)
                d += W
            for dd in range(d, D):  # head dims past the last full vector
                for r in range(NR):
                    var acc = Float32(0) if first else og[unsafe_offset=r * D + dd] * alpha[r]
                    for j in range(nk):
                        acc += sg[unsafe_offset=j * NR + r] * vrow[unsafe_offset=tof[unsafe_offset=j] + dd].cast[DType.float32]()
                    og[unsafe_offset=r * D + dd] = acc
    # The last of the tile's chunks to finish combines them (the atomic add orders the other chunks'
    # writes before it).
    var tile = ntp[unsafe_offset=item]
    var n_chunks = tfp[unsafe_offset=tile + 1] - tfp[unsafe_offset=tile]
    if Atomic.fetch_add(tdp.unsafe_offset(tile), 1) == n_chunks - 1:
        _combine_narrow(sh, rg, nw, outp, tile)


@always_inline
def _attend_wide[dt: DType](
    sh: _Shape, rg: _Ragged, pc: _Paged[dt], qr: _Queries, itp: Pointer[mut=True, Int, MutUntrackedOrigin],
    outp: Pointer[mut=True, Scalar[dt], MutUntrackedOrigin], item: Int,
):
    """Pass 2, wide item `item` (coded (sequence, query tile, kv head)): flash attention over its keys, the
    rows in the SIMD lanes."""
    var T = sh.T
    var Hq = sh.Hq
    var Hkv = sh.Hkv
    var D = sh.D
    var G = sh.G
    var QT = sh.QT
    var offp = rg.offp
    var clp = rg.clp
    var lutp = rg.lutp
    var lut_s = rg.lut_s
    var bp = pc.bp
    var page = pc.page
    var s_page = pc.s_page
    var s_kind = pc.s_kind
    var kv_base = pc.kv_base
    var s_tok = pc.s_tok
    var s_head = pc.s_head
    var qsp = qr.qsp
    var code = itp[unsafe_offset=item]
    var g = code % Hkv
    var q0 = (code // Hkv) % T
    var b = code // (Hkv * T)
    var c = Int(clp[unsafe_offset=b])
    var tok0 = Int(offp[unsafe_offset=b]) + q0
    var n_q = min(QT, Int(offp[unsafe_offset=b + 1]) - tok0)
    var R = n_q * G
    var Rp = (R + W - 1) // W * W
    var first_pos = c + q0
    var kend = first_pos + n_q  # keys 0 .. kend-1 are visible to some row of this item

    # Scratch per item, one List per role: the micro-kernels take them as distinct (non-aliasing) pointers.
    var q_buf = List[Float32](length=D * Rp, fill=0)
    var o_buf = List[Float32](length=D * Rp, fill=0)
    var s_buf = List[Float32](length=KT * Rp, fill=0)
    var k_buf = List[Float32](length=KT * D, fill=0)
    var v_buf = List[Float32](length=KT * D, fill=0)
    var row_buf = List[Float32](length=3 * Rp, fill=0)
    var a_buf = List[Float32](length=Rp, fill=0)
    var qp = q_buf.unsafe_ptr()  # Qp  [D][Rp]
    var op = o_buf.unsafe_ptr()  # O^T [D][Rp]
    var sp = s_buf.unsafe_ptr()  # S^T, then P^T [KT][Rp]
    var kp = k_buf.unsafe_ptr()  # K tile [KT][D]
    var vp = v_buf.unsafe_ptr()  # V tile [KT][D]
    var mp = row_buf.unsafe_ptr()  # running max [Rp]
    var lp = mp.unsafe_offset(Rp)  # running sum [Rp]
    var pp = lp.unsafe_offset(Rp)  # query position per row [Rp]
    var ap = a_buf.unsafe_ptr()  # this tile's rescale factor [Rp]
    for r in range(Rp):
        var rr = min(r, R - 1)  # padded rows repeat the last real row's position (their Q is zero)
        pp[unsafe_offset=r] = Float32(first_pos + rr // G)
        mp[unsafe_offset=r] = Float32.MIN
    for r in range(R):
        var src = qsp.unsafe_offset(((tok0 + r // G) * Hq + g * G + r % G) * D)
        for d in range(D):
            qp[unsafe_offset=d * Rp + r] = src[unsafe_offset=d]

    var nvec = Rp // W
    for k0 in range(0, kend, KT):
        var nk = min(KT, kend - k0)
        # The tile's K and V rows, ks apart: in place where the cache is float32 and the tile in one page.
        var kt = kp.unsafe_origin_cast[MutUntrackedOrigin]()
        var vt = vp.unsafe_origin_cast[MutUntrackedOrigin]()
        var ks = D
        if dt == DType.float32 and nk == KT and k0 % page + KT <= page:
            var at = bp.unsafe_offset(_cache_offset(lutp.unsafe_offset(b * lut_s), k0, page, s_page, s_tok)
                                      + kv_base + g * s_head)
            kt = at.unsafe_bitcast[Float32]()
            vt = at.unsafe_offset(s_kind).unsafe_bitcast[Float32]()
            ks = s_tok
        else:
            for j in range(nk):  # rows past nk keep stale values: their scores are never read
                var at = bp.unsafe_offset(_cache_offset(lutp.unsafe_offset(b * lut_s), k0 + j, page, s_page, s_tok)
                                          + kv_base + g * s_head)
                widen_row(kp.unsafe_offset(j * D), at, D)
                widen_row(vp.unsafe_offset(j * D), at.unsafe_offset(s_kind), D)
        # S^T = K Qp
        var v0 = 0
        while v0 + NV <= nvec:
            for j0 in range(0, KT, NJ):
                _scores[NV](sp.unsafe_offset(j0 * Rp + v0 * W), qp.unsafe_offset(v0 * W), kt.unsafe_offset(j0 * ks), D, Rp, ks)
            v0 += NV
        while v0 < nvec:
            for j0 in range(0, KT, NJ):
                _scores[1](sp.unsafe_offset(j0 * Rp + v0 * W), qp.unsafe_offset(v0 * W), kt.unsafe_offset(j0 * ks), D, Rp, ks)
            v0 += 1
        # Online softmax, lane-wise over rows; mask only where the tile crosses the diagonal.
        var masked = k0 + KT - 1 > first_pos
        for v in range(nvec):
            var qpos = pp.unsafe_load[width=W](v * W)
            var m_old = mp.unsafe_load[width=W](v * W)
            var m_new = m_old
            for j in range(nk):
                var s = sp.unsafe_load[width=W](j * Rp + v * W)
                if masked:
                    s = F32x(Float32(k0 + j)).le(qpos).select(s, F32x(Float32.MIN))
                    sp.unsafe_store(j * Rp + v * W, s)
                m_new = max(m_new, s)
            var total = F32x(0)
            for j in range(KT):
                var p = F32x(0)
                if j < nk:
                    p = exp(sp.unsafe_load[width=W](j * Rp + v * W) - m_new)
                sp.unsafe_store(j * Rp + v * W, p)
                total += p
            var alpha = exp(m_old - m_new)
            ap.unsafe_store(v * W, alpha)
            mp.unsafe_store(v * W, m_new)
            lp.unsafe_store(v * W, lp.unsafe_load[width=W](v * W) * alpha + total)
        # O^T = O^T * alpha + V^T P^T
        var d0 = 0
        while d0 < D:
            var v1 = 0
            while v1 < nvec:
                var o = op.unsafe_offset(d0 * Rp + v1 * W)
                var p = sp.unsafe_offset(v1 * W)
                var a = ap.unsafe_offset(v1 * W)
                if d0 + ND <= D and v1 + NV <= nvec:
                    _accumulate_pv[ND, NV](o, p, vt.unsafe_offset(d0), a, D, Rp, nk, ks)
                    v1 += NV
                elif d0 + ND <= D:
                    _accumulate_pv[ND, 1](o, p, vt.unsafe_offset(d0), a, D, Rp, nk, ks)
                    v1 += 1
                else:
                    for dd in range(d0, D):
                        _accumulate_pv[1, 1](op.unsafe_offset(dd * Rp + v1 * W), p, vt.unsafe_offset(dd), a, D, Rp, nk, ks)
                    v1 += 1
            d0 += ND

    for r in range(R):
        var inv = 1.0 / lp[unsafe_offset=r]
        var dst = outp.unsafe_offset(((tok0 + r // G) * Hq + g * G + r % G) * D)
        for d in range(D):
            dst[unsafe_offset=d] = from_f32[dt, 1](op[unsafe_offset=d * Rp + r] * inv)


@extensibility.register("attention")
struct Attention:
    @staticmethod
    def execute[
        target: StaticString, eps: Float32, scale: Float32,
    ](
        output: OutputTensor[rank=3, ...],
        blocks: _MutableInputTensor[dtype = output.dtype, rank=6, ...],
        qkv: InputTensor[dtype = output.dtype, rank=2, ...],
        q_norm: InputTensor[dtype = output.dtype, rank=1, ...],
        k_norm: InputTensor[dtype = output.dtype, rank=1, ...],
        freqs_cis: InputTensor[dtype = DType.float32, rank=2, ...],
        row_offsets: InputTensor[dtype = DType.uint32, rank=1, ...],
        cache_lengths: InputTensor[dtype = DType.uint32, rank=1, ...],
        lookup_table: InputTensor[dtype = DType.uint32, rank=2, ...],
        layer: InputTensor[dtype = DType.uint32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime assert target == "cpu", "attention: CPU-only kernel"
        comptime dt = output.dtype
        var T = qkv.dim_size(0)
        var n_pages = blocks.dim_size(0)
        var n_layers = blocks.dim_size(2)
        var page = blocks.dim_size(3)
        var Hkv = blocks.dim_size(4)
        var D = blocks.dim_size(5)
        var Hq = output.dim_size(1)
        var B = row_offsets.dim_size(0) - 1
        var P = freqs_cis.dim_size(0)
        if blocks.dim_size(1) != 2 or D % 2 != 0 or Hkv == 0 or Hq % Hkv != 0:
            raise Error("attention: blocks must be [pages, 2, layers, page, Hkv, D] with even D and Hq % Hkv == 0")
        if qkv.dim_size(1) != (Hq + 2 * Hkv) * D or output.dim_size(0) != T or output.dim_size(2) != D:
            raise Error("attention: qkv must be [T, (Hq + 2 Hkv) D] and the output [T, Hq, D]")
        if q_norm.dim_size(0) != D or k_norm.dim_size(0) != D or freqs_cis.dim_size(1) != D:
            raise Error("attention: q_norm, k_norm and freqs_cis rows must have head_dim entries")
        if B < 0 or cache_lengths.dim_size(0) != B or lookup_table.dim_size(0) != B:
            raise Error("attention: row offsets, cache lengths and lookup table disagree on the batch size")
        if (blocks.stride_length(5) != 1 or qkv.stride_length(1) != 1 or qkv.stride_length(0) != qkv.dim_size(1)
                or output.stride_length(2) != 1 or output.stride_length(1) != D or output.stride_length(0) != Hq * D
                or freqs_cis.stride_length(1) != 1 or lookup_table.stride_length(1) != 1):
            raise Error("attention: expected contiguous tensors")
        var li = Int(layer.unsafe_ptr()[unsafe_offset=0])
        if li >= n_layers:
            raise Error("attention: layer ", li, " out of range (", n_layers, " layers)")
        var offp = row_offsets.unsafe_ptr()
        var clp = cache_lengths.unsafe_ptr()
        var lutp = lookup_table.unsafe_ptr()
        var lut_s = lookup_table.stride_length(0)
        var cols = lookup_table.dim_size(1)
        if Int(offp[unsafe_offset=0]) != 0 or Int(offp[unsafe_offset=B]) != T:
            raise Error("attention: input_row_offsets must run from 0 to T")
        for b in range(B):
            var n = Int(offp[unsafe_offset=b + 1]) - Int(offp[unsafe_offset=b])
            var total = Int(clp[unsafe_offset=b]) + n
            if offp[unsafe_offset=b + 1] < offp[unsafe_offset=b]:
                raise Error("attention: input_row_offsets must be non-decreasing")
            if total > cols * page or (n > 0 and total > P):
                raise Error("attention: sequence ", b, " reaches position ", total, " past its pages or the rope table")
            for c in range((total + page - 1) // page):
                if Int(lutp[unsafe_offset=b * lut_s + c]) >= n_pages:
                    raise Error("attention: page id out of range in the lookup table")
        if T == 0:
            return

        var G = Hq // Hkv
        var q_mul = scale if scale != 0 else 1.0 / sqrt(Float32(D))  # 0: the default 1/sqrt(D), D known only now
        var bp = blocks.unsafe_ptr()
        var s_page = blocks.stride_length(0)
        var s_kind = blocks.stride_length(1)
        var kv_base = li * blocks.stride_length(2)
        var s_tok = blocks.stride_length(3)
        var s_head = blocks.stride_length(4)
        var qkvp = qkv.unsafe_ptr()
        var qkv_s = qkv.stride_length(0)
        var qnp = q_norm.unsafe_ptr()
        var knp = k_norm.unsafe_ptr()
        var fp = freqs_cis.unsafe_ptr()
        var fs = freqs_cis.stride_length(0)
        var outp = output.unsafe_ptr()

        var tok_seq = List[Int](length=T, fill=0)
        for b in range(B):
            for t in range(Int(offp[unsafe_offset=b]), Int(offp[unsafe_offset=b + 1])):
                tok_seq[t] = b
        var tsp = tok_seq.unsafe_ptr()

        # Pass 1: per token, q -> Qs (normed, rotated, times scale); k (normed, rotated) and v -> the cache.
        var qs = List[Float32](length=T * Hq * D, fill=0)
        var qsp = qs.unsafe_ptr()
        # bfloat16 cache on a CPU with AVX512_BF16: narrow items compute on bf16 pairs (see the header), so Q is also
        # kept rounded to bf16, as pairs [T, Hq, D / 2].
        var dot = dt == DType.bfloat16 and D % (2 * W) == 0 and use_bf16_dot()
        var D2 = D // 2
        var q_pairs = List[Int32](length=T * Hq * D2 if dot else 0, fill=0)
        var qbp = q_pairs.unsafe_ptr()
        var x_scratch = List[Float32](length=T * D, fill=0)  # per token: the head being normed
        var k_scratch = List[Float32](length=T * D, fill=0)  # per token: a finished K head before its store
        var xsp = x_scratch.unsafe_ptr()
        var ksp = k_scratch.unsafe_ptr()

        var shape = _Shape(T, Hq, Hkv, D, G, max(1, ROWS // G), D2)
        var ragged = _Ragged(untracked(offp), untracked(clp), untracked(lutp), lut_s, untracked(tsp))
        var paged = _Paged[dt](untracked(bp), page, s_page, s_kind, kv_base, s_tok, s_head)
        var queries = _Queries(untracked(qsp), untracked(qbp), dot)
        var proj = _Projection[dt](untracked(qkvp), qkv_s, untracked(qnp), untracked(knp), untracked(fp), fs,
                                   untracked(xsp), untracked(ksp), q_mul)

        def prepare(t: Int) {var shape, var ragged, var paged, var queries, var proj}:
            _prepare_token[dt, eps](shape, ragged, paged, queries, proj, t)


        parallelize_sized(prepare, T, T * qkv_s * 8)  # a decode step's one token runs inline

        # Pass 2, wide items: (sequence, query tile, kv head), longest key ranges first for load balance.
        # Query tiles of at most NR rows per kv head (decode steps, the last queries of a sequence) go to the
        # narrow items instead: (sequence, query tile, chunk of KCHUNK keys), all kv heads at once.
        var QT = max(1, ROWS // G)
        var items = List[Int]()  # sort key: (keys visited, descending) then the item's code (b, q0, g)
        var n_codes = B * T * Hkv
        var max_keys = P + 1  # keys visited never exceed the rope table
        var n_b = List[Int]()  # narrow items: sequence, first query, first key; and where each tile's chunks start
        var n_q0 = List[Int]()
        var n_k0 = List[Int]()
        var tile_first = List[Int]()
        var n_tile = List[Int]()  # the query tile of each narrow item
        var n_order = List[Int]()  # narrow items, full chunks first, then the partial ones longest first
        var kv_bytes = 0  # the cache rows the items read (a short decode context runs inline)
        for b in range(B):
            var n = Int(offp[unsafe_offset=b + 1]) - Int(offp[unsafe_offset=b])
            kv_bytes += (Int(clp[unsafe_offset=b]) + n) * Hkv * 2 * D * size_of[dt]()
            for q0 in range(0, n, QT):
                var keys = Int(clp[unsafe_offset=b]) + min(n, q0 + QT)
                if min(QT, n - q0) * G <= NR:
                    tile_first.append(len(n_b))
                    for k0 in range(0, keys, KCHUNK):
                        n_tile.append(len(tile_first) - 1)
                        n_b.append(b)
                        n_q0.append(q0)
                        n_k0.append(k0)
                        n_order.append(KCHUNK - min(KCHUNK, keys - k0))  # keys short of a full chunk
                    continue
                for g in range(Hkv):
                    items.append((max_keys - keys) * n_codes + (b * T + q0) * Hkv + g)
        sort_codes_by_cost(items, n_codes)
        var n_items = len(items)
        var itp = items.unsafe_ptr()
        var n_narrow = len(n_b)
        var n_tiles = len(tile_first)
        tile_first.append(n_narrow)
        # The cores take narrow items longest first, so they finish together: decode16 fp32 ~2% faster (10.66 ->
        # 10.48 ms, 11.58 -> 11.32 ms, same process, alternating order, with the per-page offsets of _tile_offsets).
        for i in range(n_narrow):
            n_order[i] = n_order[i] * n_narrow + i
        sort_codes_by_cost(n_order, n_narrow)
        var nop = n_order.unsafe_ptr()
        var nbp = n_b.unsafe_ptr()
        var nqp = n_q0.unsafe_ptr()
        var nkp = n_k0.unsafe_ptr()
        var tfp = tile_first.unsafe_ptr()
        var ntp = n_tile.unsafe_ptr()
        var tile_done = List[Int](length=n_tiles, fill=0)  # chunks of each tile finished so far
        var tdp = tile_done.unsafe_ptr()
        # Each narrow item's partial result per (kv head, row): running max, running sum, unnormalised O.
        var part_o = List[Float32](unsafe_uninit_length=n_narrow * Hkv * NR * D)  # items' first tiles write it
        var part_ml = List[Float32](length=n_narrow * Hkv * NR * 2, fill=0)
        var pop = part_o.unsafe_ptr()
        var pmp = part_ml.unsafe_ptr()

        var narrow = _NarrowItems(untracked(nbp), untracked(nqp), untracked(nkp), untracked(nop), untracked(tfp),
                                  untracked(ntp), untracked(tdp), untracked(pop), untracked(pmp))
        var out_ptr = untracked(outp)
        var items_ptr = untracked(itp)

        def attend_narrow(slot: Int) {var shape, var ragged, var paged, var queries, var narrow, var out_ptr}:
            _attend_narrow[dt](shape, ragged, paged, queries, narrow, out_ptr, slot)

        def attend(item: Int) {var shape, var ragged, var paged, var queries, var items_ptr, var out_ptr}:
            _attend_wide[dt](shape, ragged, paged, queries, items_ptr, out_ptr, item)

        parallelize_dynamic(attend, n_items, kv_bytes)
        parallelize_dynamic(attend_narrow, n_narrow, kv_bytes)

        # The structs hold untracked pointers into these Lists: they must live until every pass has run.
        _ = tok_seq^
        _ = qs^
        _ = q_pairs^
        _ = x_scratch^
        _ = k_scratch^
        _ = items^
        _ = n_b^
        _ = n_q0^
        _ = n_k0^
        _ = n_order^
        _ = tile_first^
        _ = n_tile^
        _ = tile_done^
        _ = part_o^
        _ = part_ml^
