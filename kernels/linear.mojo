# Dense linear layers on the CPU: y [M, N] = x [M, K] . w[N, K]^T (op `linear`) and the fused SwiGLU
# y [M, I] = silu(x . gate^T) * (x . up^T) (op `linear_swiglu`, gate and up [I, K] as two tensors, as the
# checkpoint stores them: no concatenated copy). x, w and y share one dtype, float32 or bfloat16 (the model's);
# float32 accumulation; a bf16 y is rounded once, to nearest even. Deterministic bit for bit, whatever the thread
# count. Every dense projection of the model goes through it with --kernels custom: qkv, o_proj, layer 0's MLP,
# the shared expert, lm_head and the router. MAX's own CPU matmul reads bf16 weights at ~2 GB/s.
# `linear_q8_0` / `linear_swiglu_q8_0`: the same with Q8_0 weights (llama.cpp's blocks of 32 int8 along K with a
# float16 scale, uint8 [N, K / 32 * 34], hyv3_graph/q8_0.py; K a multiple of 32, else an error): y = x .
# dequantize(w)^T, x and y float32 or bfloat16, the weights dequantized exactly into float32 (d * q fits it);
# on AVX512_VNNI the streaming path (M <= 16) takes x's int8 blocks (q8_0.quantize_activations) instead of x.
#
# Reference (the spec): hyv3_graph/kernels/linear.py::linear_reference (float64)
# Wrapper:              hyv3_graph/kernels/linear.py::linear, linear_swiglu (a uint8 weight takes the Q8_0 op)
# Fuzz test:            tests/test_linear.py     Bench: bench/cases/linear.py (`linear` cases, `q8_0` rows)
# History (variants measured, kept or not): docs/perf-notes.md, "linear".
#
# Design, and why (one path per call, chosen from M, the dtype, K and cpuid; `linear_path` in the wrapper mirrors it):
#   * STREAM (M <= STREAM_MAX_M: decode, small batches): memory bound. Each weight row is read exactly once and
#     each of its chunks feeds the FMAs of up to 4 activation rows (microkernels.stream_dots*: register tiles of 1,
#     2 or 4 rows); larger M loops over the rows in fours while the weight rows are in L1/L2. Tasks are ~1 MiB of
#     weight rows, taken by whichever core is free (work_queue.mojo). A pass reads its weight rows whole (at M > 4 while
#     the x rows fit 256 KiB, else in K slices of 2048: `_stream_k_slice`), and each row is prefetched at the same
#     position in the first later pass at least 8 KiB on
#     (microkernels.stream_ahead): on `small`'s short rows (K 1024) a distance along the row landed inside the
#     current pass. bf16 on a CPU with AVX512_BF16:
#     vdpbf16ps straight on the stored bf16 x and w (no conversion: bf16 products are exact in float32);
#     otherwise the weights are widened exactly and x is float32 (a bf16 x is widened once per call). A pass reads
#     microkernels.stream_rows_per_pass rows: 4 float32, 8 bf16 (1.04-1.08x the rate of 4 at M 1 on Hy3's shapes)
#     except at M > 4, where 8 rows' K slices (32 KiB) fall out of L1 before the next group of x rows rereads them
#     (4 rows; docs/perf-notes.md, "bf16 streaming: 8 rows a pass").
#   * AMX (bf16, M > STREAM_MAX_M, K a multiple of 32, AMX-BF16 granted by Linux; cpu_isa.use_amx): compute bound,
#     on the tile unit (microkernels.amx_panel: 2 x 2 C tiles of 16 x 16 fp32, tdpbf16ps). The weight rows are the A
#     tiles, read in place (a K slice copied into aligned tiles per task: tile loads from unaligned rows ran 35%
#     slower); x is packed once per call exactly as for DOT and its 16-token slices are the B tiles. Tasks are
#     (AMX_CHUNK_BLOCKS packed blocks, AMX_RB row blocks of 32 weight rows; SwiGLU: 16 gate rows with their 16 up
#     rows, combined in the epilogue); the epilogue stores C transposed (a C tile's columns are rows of y).
#   * DOT (bf16, M > STREAM_MAX_M, even K, AVX512_BF16; no AMX, or HYV3_DISABLE_AMX=1): compute bound, the bf16-dot
#     GEMM shared with moe_experts (microkernels.dot_panel: MR = 8 weight rows read in place x MB = 48 packed
#     activation rows, 24 zmm accumulators). x is packed once per call into blocks [K/2][MB] of bf16 pairs; tasks
#     are (chunk of CHUNK_BLOCKS blocks, GROUPS x MR weight rows), so a task's accumulators stay in L2. SwiGLU runs
#     the panel on the gate rows and on the up rows and combines them in the epilogue, which transposes 16 x 16 of
#     the accumulators in registers into 16 outputs of a row per store (`_dot_tiles_by_row`).
#   * MATMUL (float32, M > STREAM_MAX_M): MAX's own linalg matmul on the raw pointers (it is fast in float32:
#     ~300 GFLOP/s here); SwiGLU writes gate into y and up into a scratch, then combines.
#   * Portable (bf16 without AVX512_BF16, HYV3_PORTABLE_KERNELS=1, or odd K at large M): STREAM at every M.
#   * Q8_0 weights, M <= STREAM_MAX_M: STREAM, reading 34 bytes per 32 weights (53% of bf16's). On a CPU with
#     AVX512_VNNI (cpu_isa.use_vnni): x is quantized once per call into int8 blocks of 32 with a float32 scale each
#     (microkernels.q8_quantize_activations), and microkernels.stream_dots_q8_vnni runs vpdpbusd on two weight blocks at
#     a time, exact int32 block sums scaled by d_w * d_x in float32: 1.4-1.6x the compute ceiling of widening
#     (docs/perf-notes.md, "Q8_0"), at the cost of x's int8 rounding (as llama.cpp's q8_0 does, with a float32 rather
#     than float16 scale). Q8_0 passes read 8 weight rows (1.2-1.4x the rate of 4 on vpdpbusd at M = 1;
#     docs/perf-notes.md, "Q8_0 streaming: 8 rows a pass"). That loop costs a vpdpbusd, a convert, the scale product and
#     an FMA per 64 weights and x row, so from Q8_LANES_MIN_M = 6 rows x is also packed with its rows in the vector
#     lanes (microkernels.q8_pack_lanes) and microkernels.stream_dots_q8_lanes runs eight vpdpbusd per weight row and
#     block for all rows at once (the weight dword broadcast, made unsigned; x's -128 * sum(x) start packed once per
#     call): the same cost at 9 rows as at 16 (`_stream_task_lanes`), and up to Q8_LANES_NARROW_M = 8 rows in 8 lanes on
#     ymm (microkernels.q8_lane_width: 0.66x of 16 lanes' cost), 1.1-1.4x the row kernel at 6-8 rows
#     (docs/perf-notes.md, "Q8_0 with the activation rows in the lanes, kept", and "Q8_0's lanes on ymm from 6 rows").
#     Calls of more than 16 rows take DOT below: its bf16-rounded x keeps a q8_0 prefill's logits within
#     tests/test_model.py's bound, which int8 x on the lanes did not (docs/perf-notes.md, "Q8_0's lanes in `linear` up
#     to 256 rows"). Otherwise (no VNNI, HYV3_PORTABLE_KERNELS=1): microkernels.stream_dots_q8_0, each block widened and
#     scaled exactly and FMA'd into float32 x, so y is x . dequantize(w)^T to float32 rounding. M > STREAM_MAX_M on a
#     CPU with AVX512_BF16: DOT on Q8_0 rows (microkernels.q8_dot_panel, the same tasks, packing and epilogue): each
#     task widens its rows' K slice into a scratch of bf16 pairs (int8 values are exact in bf16) and sums each block's
#     16 pairs apart, then scales them by the block's d, so the weights are exactly the dequantized ones and only x is
#     rounded to bf16 (packed as bf16 pairs; a bf16 x as it is). 2.0-2.3x DEQUANT, 0.86-0.92x the bf16 weights' DOT
#     (docs/perf-notes.md, "Q8_0 on the bf16-dot GEMM"). Without AVX512_BF16 (or HYV3_PORTABLE_KERNELS=1): DEQUANT,
#     DEQUANT_ROWS weight rows at a time dequantized into float32 and multiplied by MAX's matmul (the dequantization is
#     1/M of the work). Not built: an int8 GEMM (vpdpbusd or AMX-int8), whose per-32 scales cost a convert, a multiply
#     and an FMA next to each vpdpbusd.
#   * Why no AMX for float32 weights or at M <= 16: the tiles take bf16 only (rounding float32 weights would change
#     the model), and decode is bound by the weight bytes, which the streaming path already reads once.
#
# Code map: `Linear.execute` / `LinearSwiglu.execute` check shapes, then `_run` picks the path, makes the forms of x
# it reads (`_XForms`: widened, or quantized by q8_quantize_activations on the Q8_0 VNNI path) and runs its passes:
# `_stream` (which dots and rows a pass) then `_stream_task`; `_pack_block`, then `_amx_task` or `_dot_task` (bf16 or
# Q8_0 rows); `_matmul`; `_dequant_matmul`. State lives in `_Problem`. The bench's yardsticks: `linear_dot_peak`
# (the bf16-dot micro-kernel on L1-resident operands) and `linear_stream_peak` (`_stream_peak`: `_stream`'s passes
# repeated on one core's L2-resident weights, on every core).
#
# Today's numbers (`python -m bench --only linear --json`, 2026-12-07 18:53-19:18 UTC, 2-core AMD EPYC family 25
# model 17 (Zen 4), no AMX; start probe 51.5 GB/s, the probes around each row 33-61 GB/s ("local"); Hy3's shapes;
# "ceiling" = the `stream_peak` case of the row's weight format and M, this path's own passes on weights in L2:
# M 1 f32 137.5 / bf16 129.7 / Q8_0 77.8 GB/s, M 8 f32 36.6 / bf16 39.1 / Q8_0 15.7):
#   M 1:   f32 32.6-51.8 GB/s (82-94% of local), 1.5-2.1x MAX, 1.6-2.7x torch; bf16 30.0-59.9 GB/s (85-102%),
#          1.9-4.0x MAX, 1.6-4.8x torch; Q8_0 29.5-54.4 GB/s of int8 bytes (72-147%). All memory bound (23-70% of
#          the ceiling). `small`'s shapes (1-4 MB) pay a one-op graph's fixed cost: bf16 qkv 34.0, o_proj 25.5 GB/s.
#   M 8:   f32 27.0-35.4 GB/s (49-90% of local, 74-97% of the ceiling), bf16 17.0-33.9 (30-84%; 43-87%, the low one
#          lm_head, not investigated), 1.5-3.6x MAX, 1.3-4.6x torch. So at M 8 the loop, not memory, is the limit
#          whenever the probe reads above the ceiling (bf16: 8 vdpbf16ps per 64 weight bytes, at most ~57 GB/s on
#          both cores here). Q8_0 at M 8 on the 8 ymm lanes (the bench's M 8 and `stream_peak` cases through its
#          run_case, 2026-12-08 00:57-01:05 UTC, local probes 34-62; ceiling Q8_0 22.1, bf16 38.0 GB/s): 18.7-20.8
#          GB/s of int8 bytes (84-94% of its ceiling), faster than bf16 on Hy3's five shapes (qkv 2.25 / 2.37 ms,
#          o_proj 1.76 / 2.16, gate_up 6.21 / 7.46, down 2.94 / 3.77, lm_head 25.2 / 28.9: 1.05-1.28x); `small`'s
#          1-4 MB shapes level. The row kernel before it: 13.6-14.7 GB/s, slower than bf16 from M 5 to 8. At M 5 the
#          row kernel still runs (level with the lanes there).
#   M 16 (the bench's `linear` M 16 and `stream_peak` cases through its run_case, 2026-12-07 22:51-22:57 UTC,
#          the same Zen 4, local probes 35-63 GB/s; ceilings M 16 f32 24.2 / bf16 19.6 / Q8_0 15.3 GB/s): Q8_0 on the
#          lanes 12.0-13.6 GB/s of int8 bytes (78-89% of its ceiling), faster than bf16 on all five of Hy3's shapes
#          (qkv 3.33 / 3.91 ms, o_proj 2.74 / 3.22, gate_up 9.67 / 10.94, down 4.34 / 5.67, lm_head 38.7 / 47.4:
#          1.13-1.31x); bf16 19.2-21.5 GB/s (0.98-1.10 of its ceiling), 1.6-2.4x torch, 2.6-2.9x MAX; f32 17.6-21.1
#          (0.73-0.88), 1.4x MAX. The row kernel ran Q8_0 at M 16 at 5.9-6.4 GB/s (1.64-1.83x slower).
#   M 512: bf16 on DOT 379-431 GFLOP/s = 83-94% of the micro-kernel's own peak (`dot_peak` 459 GFLOP/s that run),
#          1.9-2.1x MAX, 0.93-1.03x torch (oneDNN bf16); `small`'s shapes 303-406 GFLOP/s, 0.76-0.99x torch. Q8_0 on
#          DOT 360-375 GFLOP/s (78-82% of `dot_peak`). f32 = MAX's matmul (209-220 GFLOP/s), 1.2-1.4x torch. Since
#          that run DOT's epilogue is in registers: `small`'s shapes 1.02-1.07x, Hy3's level (A/B in one process,
#          docs/perf-notes.md "Q8_0 with the activation rows in the lanes, kept; DOT's epilogue in registers").
#   M 512 bf16 on AMX (2-core Intel Xeon with amx_bf16, 2026-12-03; a timing script, not the bench yet:
#          docs/perf-notes.md "AMX"): 1.41-1.68 TFLOP/s, ~0.8x torch's oneDNN AMX (1.72-1.83).
#   Q8_0 M 512 (DOT on Q8_0 rows; 2026-12-07 05:15, the same Zen 4, a timing script beside DEQUANT and bf16 DOT in
#          one process, docs/perf-notes.md "Q8_0 on the bf16-dot GEMM"): 299-339 GFLOP/s, 2.0-2.3x DEQUANT
#          (133-176), 0.86-0.92x bf16 DOT (329-391).
# History and the e2e effect: docs/perf-notes.md, "linear" and "Q8_0".
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from layout import TileTensor
from layout.tile_layout import row_major
from linalg.matmul.cpu import matmul as cpu_matmul
from std.runtime import parallelism_level
from std.sys import size_of
from std.utils import StaticTuple
from std.memory import bitcast
from .cpu_isa import (F32x, adjacent_bf16_pairs, amx_configure, amx_release, round_to_bf16, use_amx, use_bf16_dot,
                      use_vnni, widen_row)
from .microkernels import (W, MAX_STREAM_ROWS, STREAM_NW, MB, MR, KC, NVMAX, AMX_TILE, PREFETCH_AHEAD,
                           PREFETCH_AHEAD_Q8,
                           Q8_BLOCK, Q8_BLOCK_BYTES, align64,
                           amx_c_tiles, amx_k_ok, amx_pack_bytes, amx_panel, amx_rows, amx_tile_by_token, transpose16,
                           dot_panel, dot_tile, n_blocks, q8_dot_panel, q8_activation_scales, q8_dequantize_row,
                           q8_quantize_activations, q8_row_bytes, silu, stream_dots, stream_dots_bf16, stream_dots_q8_0,
                           stream_dots_q8_vnni, stream_ahead, stream_rows_per_pass, swiglu_row,
                           Q8LaneSlots, Q8_LANES_MIN_M, untracked)
from .work_queue import parallelize_dynamic

comptime STREAM_MAX_M = 16  # at most this many rows stream the weights (see the header)
comptime STREAM_TASK_BYTES = 1 << 20  # streaming: weight bytes per task
comptime STREAM_GROUPS = STREAM_MAX_M // MAX_STREAM_ROWS  # streaming: groups of 4 activation rows
comptime STREAM_WHOLE_X_BYTES = 256 << 10  # streaming, M > 4: whole rows a pass while the chunk's x fits this
comptime STREAM_K_SLICE = 2048  # streaming, M > 4, longer rows: elements per K slice (`_stream_k_slice`)
comptime GROUPS = 8  # GEMM: micro-tiles of MR weight rows per task (they share each activation slice in L1)
comptime CHUNK_BLOCKS = 8  # GEMM: packed blocks of MB rows per task (its accumulators: 8 x 8 x MR x MB x 4 = 96 KiB)
comptime AMX_RB = 8  # AMX: row blocks (2 x 16 weight rows) per task (4 and 16 measured slower)
comptime AMX_CHUNK_BLOCKS = 11  # AMX: packed blocks of MB rows per task (528: M = 512 is one chunk)
comptime DEQUANT_ROWS = 256  # DEQUANT: Q8_0 weight rows dequantized per matmul call (K = 4096: 4 MiB of float32)
comptime STREAM = 1
comptime DOT = 2
comptime MATMUL = 3
comptime AMX = 4
comptime DEQUANT = 5
comptime READ_WIDEN = 0  # streaming reads float32 x and weights widened exactly to float32
comptime READ_PAIRS = 1  # streaming runs vdpbf16ps on the stored bf16 x and weights
comptime READ_Q8 = 2  # streaming reads float32 x and Q8_0 weight blocks, dequantized exactly
comptime READ_Q8_INT8 = 3  # streaming runs vpdpbusd on Q8_0 weight blocks and int8-quantized x
comptime READ_Q8_LANES = 4  # the same with x's rows in the lanes (microkernels.stream_dots_q8_lanes)


@fieldwise_init
struct _Problem[dt: DType](ImplicitlyCopyable, Movable):
    """One call: x [M, K], wa [N, K] (the weight, or SwiGLU's gate), wb [N, K] (SwiGLU's up; wa otherwise),
    y [M, N]; xf: x as float32 for the portable streaming and Q8_0 paths (x itself when dt is float32); xq, xs: x
    quantized to int8 blocks for READ_Q8_INT8 and READ_Q8_LANES ([M, K] bytes, [M, K / 4] scales;
    microkernels.q8_quantize_activations); lanes: the same with its rows in the lanes, for READ_Q8_LANES (one slot
    per group of up to W rows, microkernels.Q8LaneSlots).
    Q8_0 weights: wa and wb point at their bytes ([N, K / 32 * 34], microkernels.q8_row_bytes)."""
    var M: Int
    var N: Int
    var K: Int
    var xp: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin]
    var wa: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin]
    var wb: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin]
    var yp: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin]
    var xf: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var xq: Pointer[mut=True, UInt8, MutUntrackedOrigin]
    var xs: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var lanes: Q8LaneSlots


@always_inline
def _store[dt: DType, n: Int](y: Pointer[mut=True, Scalar[dt], MutUntrackedOrigin], i: Int, v: SIMD[DType.float32, n]):
    """y[i .. i + n) = v in y's dtype (bf16: rounded to nearest even, without the compiler's per-element libcall)."""
    comptime if dt == DType.bfloat16:
        y.unsafe_bitcast[UInt16]().unsafe_store(i, round_to_bf16[n](v))
    else:
        y.unsafe_bitcast[Float32]().unsafe_store(i, v)


def _stream_cols_per_task(N: Int, row_bytes: Int, nw: Int) -> Int:
    """Output columns per streaming task: ~STREAM_TASK_BYTES of weight rows, but at least 4 tasks per core when N
    allows it (so the cores finish together); a multiple of nw, the rows of a pass."""
    var by_bytes = max(1, STREAM_TASK_BYTES // max(1, row_bytes * nw))
    var by_balance = max(1, (N + 4 * parallelism_level() * nw - 1) // (4 * parallelism_level() * nw))
    return min(by_bytes, by_balance) * nw


@always_inline
def _stream_dots[dt: DType, READ: Int, NW: Int](
    pb: _Problem[dt], w: Pointer[mut=True, Scalar[dt], MutUntrackedOrigin], w_rows: StaticTuple[Int, NW],
    m0: Int, rows: Int, k0: Int, kn: Int, ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """NW weight rows of w (offsets w_rows: elements, Q8_0 bytes) . activation rows m0 .. m0 + rows
    (<= MAX_STREAM_ROWS), over k0 .. k0 + kn (Q8_0: whole blocks), prefetching `ahead` units on."""
    comptime if READ == READ_Q8_INT8:
        var x0 = m0 * pb.K + k0  # x's scales: K / 4 floats a row (q8_activation_scales)
        return stream_dots_q8_vnni(w.unsafe_bitcast[UInt8]().unsafe_offset(k0 // Q8_BLOCK * Q8_BLOCK_BYTES), w_rows,
                                   pb.xq.unsafe_offset(x0), pb.xs.unsafe_offset(x0 // 4), pb.K, rows, kn, ahead)
    elif READ == READ_Q8:
        return stream_dots_q8_0(w.unsafe_bitcast[UInt8]().unsafe_offset(k0 // Q8_BLOCK * Q8_BLOCK_BYTES), w_rows,
                                pb.xf.unsafe_offset(m0 * pb.K + k0), pb.K, rows, kn, ahead)
    elif READ == READ_PAIRS:
        return stream_dots_bf16(w.unsafe_bitcast[UInt16]().unsafe_offset(k0), w_rows,
                                pb.xp.unsafe_bitcast[UInt16]().unsafe_offset(m0 * pb.K + k0), pb.K, rows, kn, ahead)
    else:
        return stream_dots(w.unsafe_offset(k0), w_rows, pb.xf.unsafe_offset(m0 * pb.K + k0), pb.K, rows, kn, ahead)


@always_inline
def _stream_k_slice[READ: Int](M: Int, K: Int) -> Int:
    """Elements of K a streaming pass reduces before the next group of four x rows passes over the same weights:
    whole rows (K) at M <= 4 (one group), and while the x rows of a chunk (up to STREAM_MAX_M) take at most
    STREAM_WHOLE_X_BYTES in the form the dots read (float32, bf16, or int8 with its scales: 2 bytes an element);
    longer rows run in STREAM_K_SLICE slices, so the chunk's x slices stay in L2 while the groups pass. Whole rows
    also let the dots prefetch the next pass's rows (stream_ahead). Measured (docs/perf-notes.md, "linear
    streaming at M > 4"): 512-element slices, before, cost 15-45% at M = 8 and 16 on K <= 4096 (one reduction
    per slice and group, and a prefetch distance along the row that lands inside the pass on K 1024); at
    Hy3's K 13312 2048-element slices were level with or ahead of whole rows. A multiple of Q8_BLOCK."""
    if M <= MAX_STREAM_ROWS:
        return K
    comptime x_bytes = 4 if READ == READ_WIDEN or READ == READ_Q8 else 2
    if min(M, STREAM_MAX_M) * K * x_bytes <= STREAM_WHOLE_X_BYTES:
        return K
    return STREAM_K_SLICE


def _stream_pass[dt: DType, SWIGLU: Bool, READ: Int, NW: Int](pb: _Problem[dt], cols: Int, tasks: Int,
                                                              weight_bytes: Int, reps: Int):
    """STREAM: the call's `tasks` tasks of `cols` output columns (a multiple of NW), on whichever core is free; or,
    with reps > 0 (the stream_peak op), all of them reps times over on the calling core."""
    if reps > 0:
        for _ in range(reps):
            for task in range(tasks):
                _stream_task[dt, SWIGLU, READ, NW](pb, cols, task)
        return

    def task_fn(task: Int) {var pb, var cols}:
        _stream_task[dt, SWIGLU, READ, NW](pb, cols, task)

    parallelize_dynamic(task_fn, tasks, weight_bytes)


def _stream[dt: DType, SWIGLU: Bool, Q8: Bool](pb: _Problem[dt], x_form: Int, reps: Int):
    """STREAM for this call's weights and x (the header's rules): the dots for the form of x the call made
    (`x_form`, _XForms.x_form), and how many weight rows a pass; reps as in _stream_pass (0: one parallel pass, the
    ops)."""
    var M = pb.M
    var N = pb.N
    var K = pb.K
    var row_bytes = (q8_row_bytes(K) if Q8 else K * size_of[dt]()) * (2 if SWIGLU else 1)  # an output's rows
    comptime NW = stream_rows_per_pass[DType.uint8 if Q8 else dt]()
    # bf16 at M > 4: STREAM_NW rows a pass; the next group of x rows rereads each K slice of 8 rows (32 KiB),
    # which then no longer sits in L1 (8 rows: 0.93x at M 8; docs/perf-notes.md, "bf16 streaming: 8 rows a pass")
    var four_rows = dt == DType.bfloat16 and not Q8 and M > MAX_STREAM_ROWS
    var cols = _stream_cols_per_task(N, row_bytes, STREAM_NW if four_rows else NW)
    var tasks = (N + cols - 1) // cols
    var weight_bytes = N * row_bytes  # what the pass reads (a small one runs inline)
    comptime if Q8:
        if x_form == READ_Q8_LANES:
            _stream_pass[dt, SWIGLU, READ_Q8_LANES, NW](pb, cols, tasks, weight_bytes, reps)
        elif x_form == READ_Q8_INT8:
            _stream_pass[dt, SWIGLU, READ_Q8_INT8, NW](pb, cols, tasks, weight_bytes, reps)
        else:
            _stream_pass[dt, SWIGLU, READ_Q8, NW](pb, cols, tasks, weight_bytes, reps)
    elif dt == DType.bfloat16:
        var pairs = x_form == READ_PAIRS
        if pairs and four_rows:
            _stream_pass[dt, SWIGLU, READ_PAIRS, STREAM_NW](pb, cols, tasks, weight_bytes, reps)
        elif pairs:
            _stream_pass[dt, SWIGLU, READ_PAIRS, NW](pb, cols, tasks, weight_bytes, reps)
        elif four_rows:
            _stream_pass[dt, SWIGLU, READ_WIDEN, STREAM_NW](pb, cols, tasks, weight_bytes, reps)
        else:
            _stream_pass[dt, SWIGLU, READ_WIDEN, NW](pb, cols, tasks, weight_bytes, reps)
    else:
        _stream_pass[dt, SWIGLU, READ_WIDEN, NW](pb, cols, tasks, weight_bytes, reps)


@always_inline
def _stream_task_lanes[dt: DType, SWIGLU: Bool, NW: Int](pb: _Problem[dt], cols_per_task: Int, task: Int):
    """STREAM with x's rows in the lanes (READ_Q8_LANES: Q8_0 weights, Q8_LANES_MIN_M..STREAM_MAX_M rows on
    AVX512_VNNI, one lanes slot): as _stream_task, each pass of NW weight rows read once for every row of x at the
    same cost (Q8LaneSlots.dots: 8 lanes up to Q8_LANES_NARROW_M rows, 16 above)."""
    comptime assert STREAM_MAX_M <= W, "the lanes hold every row of a streaming call"
    var N = pb.N
    var row_bytes = q8_row_bytes(pb.K)
    var ahead = stream_ahead(NW * row_bytes, 1)
    var o0 = task * cols_per_task
    for o in range(o0, min(N, o0 + cols_per_task), NW):
        var w_rows = StaticTuple[Int, NW](fill=0)
        comptime for v in range(NW):
            w_rows[v] = min(o + v, N - 1) * row_bytes
        var a = pb.lanes.dots[NW](0, pb.M, pb.wa.unsafe_bitcast[UInt8](), w_rows, ahead)
        comptime if SWIGLU:
            var u = pb.lanes.dots[NW](0, pb.M, pb.wb.unsafe_bitcast[UInt8](), w_rows, ahead)
            comptime for v in range(NW):
                a[v] = silu[W](a[v]) * u[v]
        comptime for v in range(NW):
            for r in range(pb.M):
                _store[dt, 1](pb.yp, r * N + min(o + v, N - 1), SIMD[DType.float32, 1](a[v][r]))


@always_inline
def _stream_task[dt: DType, SWIGLU: Bool, READ: Int, NW: Int](pb: _Problem[dt], cols_per_task: Int, task: Int):
    """STREAM: output columns task * cols_per_task .. (their weight rows, each read from memory once when M <=
    STREAM_MAX_M), NW at a time, for the rows of x in chunks of STREAM_MAX_M (more only on the
    portable path), each chunk in groups of four. With more than four rows and long rows the reduction runs in K
    slices (`_stream_k_slice`), so the chunk's activation slices stay in cache while each group passes over the
    weight rows' slice. At M <= 4 (decode) a pass stores its dots' sums directly: the chunks' run-time-indexed sums
    cost a third of a pass on K-256 rows (docs/perf-notes.md, "`linear` decode passes"). Columns past N alias N - 1
    (the same value is stored twice)."""
    comptime if READ == READ_Q8_LANES:
        _stream_task_lanes[dt, SWIGLU, NW](pb, cols_per_task, task)
        return
    var N = pb.N
    var K = pb.K
    var k_slice = _stream_k_slice[READ](pb.M, K)
    comptime Q8 = READ == READ_Q8 or READ == READ_Q8_INT8
    var row_units = q8_row_bytes(K) if Q8 else K
    # whole rows a pass: prefetch the next passes' rows (stream_ahead); K slices: along the row
    var ahead = stream_ahead(NW * row_units, 1 if Q8 else size_of[dt]()) if k_slice >= K else (
        PREFETCH_AHEAD_Q8 if Q8 else PREFETCH_AHEAD)
    var o0 = task * cols_per_task
    if pb.M <= MAX_STREAM_ROWS:  # decode: one group of rows over whole rows, so the dots' sums are the outputs
        for o in range(o0, min(N, o0 + cols_per_task), NW):
            var w_rows = StaticTuple[Int, NW](fill=0)
            comptime for v in range(NW):
                w_rows[v] = min(o + v, N - 1) * row_units
            var y = _stream_dots[dt, READ, NW](pb, pb.wa, w_rows, 0, pb.M, 0, K, ahead)
            comptime if SWIGLU:
                var u = _stream_dots[dt, READ, NW](pb, pb.wb, w_rows, 0, pb.M, 0, K, ahead)
                comptime for v in range(NW):
                    y[v] = silu[4](y[v]) * u[v]
            comptime for v in range(NW):
                for r in range(pb.M):
                    _store[dt, 1](pb.yp, r * N + min(o + v, N - 1), SIMD[DType.float32, 1](y[v][r]))
        return
    for o in range(o0, min(N, o0 + cols_per_task), NW):
        var w_rows = StaticTuple[Int, NW](fill=0)
        comptime for v in range(NW):
            w_rows[v] = min(o + v, N - 1) * row_units
        for mc in range(0, pb.M, STREAM_MAX_M):
            var groups = (min(STREAM_MAX_M, pb.M - mc) + MAX_STREAM_ROWS - 1) // MAX_STREAM_ROWS
            var a = StaticTuple[SIMD[DType.float32, 4], STREAM_GROUPS * NW](fill=SIMD[DType.float32, 4](0))
            var u = StaticTuple[SIMD[DType.float32, 4], STREAM_GROUPS * NW](fill=SIMD[DType.float32, 4](0))
            for k0 in range(0, K, k_slice):
                var kn = min(k_slice, K - k0)
                for grp in range(groups):
                    var m0 = mc + grp * MAX_STREAM_ROWS
                    var rows = min(MAX_STREAM_ROWS, pb.M - m0)
                    var d = _stream_dots[dt, READ, NW](pb, pb.wa, w_rows, m0, rows, k0, kn, ahead)
                    comptime for v in range(NW):
                        a[grp * NW + v] += d[v]
                    comptime if SWIGLU:
                        var e = _stream_dots[dt, READ, NW](pb, pb.wb, w_rows, m0, rows, k0, kn, ahead)
                        comptime for v in range(NW):
                            u[grp * NW + v] += e[v]
            for grp in range(groups):
                var m0 = mc + grp * MAX_STREAM_ROWS
                comptime for v in range(NW):
                    var y = a[grp * NW + v]
                    comptime if SWIGLU:
                        y = silu[4](y) * u[grp * NW + v]
                    for r in range(min(MAX_STREAM_ROWS, pb.M - m0)):
                        _store[dt, 1](pb.yp, (m0 + r) * N + min(o + v, N - 1), SIMD[DType.float32, 1](y[r]))


@always_inline
def _x_pairs[dt: DType, n: Int](pb: _Problem[dt], x32: Pointer[mut=True, Int32, MutUntrackedOrigin], p: Int) -> SIMD[
        DType.int32, n]:
    """Pairs p .. p + n of x's flat [M, K / 2] bf16 pairs: x's own (bf16), or float32 x rounded (Q8_0 on DOT)."""
    comptime if dt == DType.bfloat16:
        return x32.unsafe_load[width=n](p)
    else:
        return adjacent_bf16_pairs[n](pb.xf.unsafe_load[width=2 * n](2 * p))


@always_inline
def _pack_block[dt: DType](pb: _Problem[dt], xk: Pointer[mut=True, Int32, MutUntrackedOrigin], blk: Int):
    """DOT and AMX: rows blk * MB .. of x as bf16 pairs -> packed block [K/2][MB]; rows past M (up to a whole vector)
    are 0. 16 rows x 16 pairs at a time through a register transpose (the int32 pairs travel as float32 bits). A
    float32 x (Q8_0 weights on DOT) is rounded to bf16 on the way, to nearest even."""
    var K2 = pb.K // 2
    var x32 = pb.xp.unsafe_bitcast[Int32]()
    var dst = xk.unsafe_offset(blk * K2 * MB)
    var m_first = blk * MB
    var n_real = min(MB, pb.M - m_first)
    for m0 in range(0, n_real, W):
        var p = 0
        while p + W <= K2:
            var r = StaticTuple[F32x, W](fill=F32x(0))
            comptime for i in range(W):
                if m0 + i < n_real:
                    r[i] = bitcast[DType.float32, W](_x_pairs[dt, W](pb, x32, (m_first + m0 + i) * K2 + p))
            var t = transpose16(r)
            comptime for j in range(W):
                dst.unsafe_store((p + j) * MB + m0, bitcast[DType.int32, W](t[j]))
            p += W
        for q in range(p, K2):
            for i in range(W):
                var pair = _x_pairs[dt, 1](pb, x32, (m_first + m0 + i) * K2 + q)[0] if m0 + i < n_real else 0
                dst[unsafe_offset=q * MB + m0 + i] = pair


@always_inline
def _dot_tiles_by_row(c: Pointer[mut=True, Float32, _], blocks: Int, groups: Int, b: Int, g: Int,
                      j: Int) -> StaticTuple[F32x, AMX_TILE]:
    """DOT's epilogue input: activation rows j .. j + W of block b against the 2 x MR weight rows of groups g and
    g + 1 (zeros past the last group), from the panel's c [groups][blocks][MR][MB] transposed in registers, so that
    element r holds activation row j + r's 16 consecutive outputs (one vector store into y, where a column at a
    time cost ~10% of a `small` M 512 call)."""
    var t = StaticTuple[F32x, AMX_TILE](fill=F32x(0))
    comptime for h in range(2):
        if g + h < groups:
            var tile = c.unsafe_offset(((g + h) * blocks + b) * MR * MB + j)
            comptime for i in range(MR):
                t[h * MR + i] = tile.unsafe_load[width=W](i * MB)
    return transpose16(t)


@always_inline
def _dot_task[dt: DType, SWIGLU: Bool, Q8: Bool](
    pb: _Problem[dt], xk: Pointer[mut=True, Int32, MutUntrackedOrigin], n_tiles: Int, task: Int,
):
    """DOT: output columns of tile task % n_tiles (GROUPS x MR weight rows) for the rows of chunk task // n_tiles
    (CHUNK_BLOCKS packed blocks); a transposed store, MR outputs of a row at a time. Q8: Q8_0 weight rows on
    microkernels.q8_dot_panel."""
    var N = pb.N
    var K2 = pb.K // 2
    var blk0 = (task // n_tiles) * CHUNK_BLOCKS
    var m_first = blk0 * MB
    var rows = min(CHUNK_BLOCKS * MB, pb.M - m_first)
    var blocks = n_blocks(rows)
    var n_first = (task % n_tiles) * MR * GROUPS
    var groups = min(GROUPS, (N - n_first + MR - 1) // MR)
    var row_units = q8_row_bytes(pb.K) if Q8 else K2  # a weight row: Q8_0 bytes, or bf16 pairs
    var offsets = List[Int](length=groups * MR, fill=0)
    for i in range(groups * MR):  # rows past N alias the last one; never stored
        offsets[i] = min(n_first + i, N - 1) * row_units
    var xb = xk.unsafe_offset(blk0 * K2 * MB)
    var size = groups * blocks * MR * MB
    var ca = List[Float32](unsafe_uninit_length=size)  # the first K slice stores, never loads
    var cap = ca.unsafe_ptr()
    var cu = List[Float32](unsafe_uninit_length=size if SWIGLU else 0)
    var cup = cu.unsafe_ptr()
    comptime if Q8:
        q8_dot_panel(pb.wa.unsafe_bitcast[UInt8](), offsets.unsafe_ptr(), groups, xb, rows, K2, cap)
        comptime if SWIGLU:
            q8_dot_panel(pb.wb.unsafe_bitcast[UInt8](), offsets.unsafe_ptr(), groups, xb, rows, K2, cup)
    else:
        dot_panel(pb.wa.unsafe_bitcast[Int32](), offsets.unsafe_ptr(), groups, xb, rows, K2, cap)
        comptime if SWIGLU:
            dot_panel(pb.wb.unsafe_bitcast[Int32](), offsets.unsafe_ptr(), groups, xb, rows, K2, cup)
    for b in range(blocks):
        var m_real = min(MB, rows - b * MB)
        for g in range(0, groups, 2):
            var n0 = n_first + g * MR
            for j in range(0, m_real, W):
                var v = _dot_tiles_by_row(cap, blocks, groups, b, g, j)
                comptime if SWIGLU:
                    var u = _dot_tiles_by_row(cup, blocks, groups, b, g, j)
                    comptime for r in range(W):
                        v[r] = silu[W](v[r]) * u[r]
                var m_cnt = min(W, m_real - j)
                comptime for r in range(W):
                    if r < m_cnt:
                        _store_cols[dt](pb.yp, (m_first + b * MB + j + r) * N, n0, N, v[r])
    _ = offsets^
    _ = ca^
    _ = cu^


@always_inline
def _amx_task[dt: DType, SWIGLU: Bool](
    pb: _Problem[dt], xk: Pointer[mut=True, Int32, MutUntrackedOrigin], n_groups: Int, task: Int,
):
    """AMX: output columns of row group task % n_groups (AMX_RB row blocks: 32 weight rows each, or SwiGLU's 16 gate
    rows with their 16 up rows) for the rows of chunk task // n_groups (AMX_CHUNK_BLOCKS packed blocks); a
    transposed store (a C tile's columns are rows of y)."""
    var N = pb.N
    var K = pb.K
    var blk0 = (task // n_groups) * AMX_CHUNK_BLOCKS
    var m_first = blk0 * MB
    var rows = min(AMX_CHUNK_BLOCKS * MB, pb.M - m_first)
    var cols_rb = AMX_TILE if SWIGLU else 2 * AMX_TILE  # output columns per row block
    var n_first = (task % n_groups) * AMX_RB * cols_rb
    var n_rb = min(AMX_RB, (N - n_first + cols_rb - 1) // cols_rb)
    var tails = List[UInt16](unsafe_uninit_length=2 * AMX_TILE * K if n_first + n_rb * cols_rb > N else 0)
    var tail = untracked(tails.unsafe_ptr())
    var a = List[Int](length=2 * n_rb, fill=0)
    for rb in range(n_rb):
        var n0 = n_first + rb * cols_rb
        var wa = pb.wa.unsafe_bitcast[UInt16]()
        comptime if SWIGLU:
            a[2 * rb] = amx_rows(wa, n0, N, K, tail)
            a[2 * rb + 1] = amx_rows(pb.wb.unsafe_bitcast[UInt16](), n0, N, K, tail.unsafe_offset(AMX_TILE * K))
        else:
            a[2 * rb] = amx_rows(wa, n0, N, K, tail)
            a[2 * rb + 1] = amx_rows(wa, n0 + AMX_TILE, N, K, tail.unsafe_offset(AMX_TILE * K))
    var c = List[Float32](unsafe_uninit_length=amx_c_tiles(n_rb, rows) + 16)  # the first K slice stores, never loads
    var cp = untracked(c.unsafe_ptr())
    cp = cp.unsafe_offset(align64(Int(cp)))
    var pack = List[UInt8](unsafe_uninit_length=amx_pack_bytes(n_rb) + 64)
    var pp = untracked(pack.unsafe_ptr())
    amx_configure()
    amx_panel(a.unsafe_ptr(), K * size_of[dt](), n_rb, xk.unsafe_offset(blk0 * (K // 2) * MB), rows, K, cp,
              pp.unsafe_offset((64 - Int(pp) % 64) % 64))
    amx_release()
    for rb in range(n_rb):
        var n0 = n_first + rb * cols_rb
        for t in range((rows + AMX_TILE - 1) // AMX_TILE):
            var g = amx_tile_by_token(cp, rows, rb, t, 0)
            var h = amx_tile_by_token(cp, rows, rb, t, 1)
            for j in range(min(AMX_TILE, rows - t * AMX_TILE)):
                var y_row = (m_first + t * AMX_TILE + j) * N
                comptime if SWIGLU:
                    _store_cols[dt](pb.yp, y_row, n0, N, silu[AMX_TILE](g[j]) * h[j])
                else:
                    _store_cols[dt](pb.yp, y_row, n0, N, g[j])
                    _store_cols[dt](pb.yp, y_row, n0 + AMX_TILE, N, h[j])
    _ = tails^
    _ = a^
    _ = c^
    _ = pack^


@always_inline
def _store_cols[dt: DType](y: Pointer[mut=True, Scalar[dt], MutUntrackedOrigin], y_row: Int, n0: Int, N: Int,
                           v: SIMD[DType.float32, AMX_TILE]):
    """y[y_row + n0 ..] = the 16 values of v that fall before column N."""
    if n0 + AMX_TILE <= N:
        _store[dt, AMX_TILE](y, y_row + n0, v)
    else:
        for i in range(max(0, N - n0)):
            _store[dt, 1](y, y_row + n0 + i, SIMD[DType.float32, 1](v[i]))


def _matmul[SWIGLU: Bool](pb: _Problem[DType.float32]) raises:
    """MATMUL: MAX's CPU matmul (transpose_b) on all cores; SwiGLU combines gate (in y) and up (a scratch)."""
    var M = pb.M
    var N = pb.N
    var K = pb.K
    var y = pb.yp.unsafe_bitcast[Float32]()
    var x = pb.xp.unsafe_bitcast[Float32]()
    cpu_matmul[transpose_b=True](TileTensor(y, row_major(M, N)), TileTensor(x, row_major(M, K)),
                                 TileTensor(pb.wa.unsafe_bitcast[Float32](), row_major(N, K)), 0, num_threads=-1)
    comptime if SWIGLU:
        var up = List[Float32](unsafe_uninit_length=M * N)
        var upp = untracked(up.unsafe_ptr())
        cpu_matmul[transpose_b=True](TileTensor(upp, row_major(M, N)), TileTensor(x, row_major(M, K)),
                                     TileTensor(pb.wb.unsafe_bitcast[Float32](), row_major(N, K)), 0, num_threads=-1)

        def combine_row(r: Int) {var y, var upp, var N}:
            swiglu_row(y.unsafe_offset(r * N), y.unsafe_offset(r * N), upp.unsafe_offset(r * N), N)

        parallelize(combine_row, M)
        _ = up^


def _dequant_matmul[dt: DType, SWIGLU: Bool](pb: _Problem[dt]) raises:
    """DEQUANT (Q8_0 weights, M > STREAM_MAX_M, no AVX512_BF16): DEQUANT_ROWS weight rows at a time are dequantized
    into float32 (exact; all cores), multiplied with the float32 x by MAX's CPU matmul (transpose_b, all cores), and
    stored as those columns of y (SwiGLU: combined). Dequantizing costs 1 / M of the matmul's work."""
    var M = pb.M
    var N = pb.N
    var K = pb.K
    var rb = q8_row_bytes(K)
    var rows_max = min(N, DEQUANT_ROWS)
    var ws = List[Float32](unsafe_uninit_length=rows_max * K * (2 if SWIGLU else 1))  # gate rows, then up rows
    var cs = List[Float32](unsafe_uninit_length=M * rows_max * (2 if SWIGLU else 1))  # x . their rows, [M, rows]
    var wf = untracked(ws.unsafe_ptr())
    var cf = untracked(cs.unsafe_ptr())
    var uf = wf.unsafe_offset(rows_max * K)
    var cu = cf.unsafe_offset(M * rows_max)
    var x = TileTensor(pb.xf, row_major(M, K))
    for n0 in range(0, N, DEQUANT_ROWS):
        var nc = min(DEQUANT_ROWS, N - n0)

        def dequantize(i: Int) {var pb, var wf, var uf, var n0, var K, var rb}:
            q8_dequantize_row(pb.wa.unsafe_bitcast[UInt8]().unsafe_offset((n0 + i) * rb), wf.unsafe_offset(i * K), K)
            comptime if SWIGLU:
                q8_dequantize_row(pb.wb.unsafe_bitcast[UInt8]().unsafe_offset((n0 + i) * rb), uf.unsafe_offset(i * K),
                                  K)

        parallelize(dequantize, nc)
        cpu_matmul[transpose_b=True](TileTensor(cf, row_major(M, nc)), x, TileTensor(wf, row_major(nc, K)), 0,
                                     num_threads=-1)
        comptime if SWIGLU:
            cpu_matmul[transpose_b=True](TileTensor(cu, row_major(M, nc)), x, TileTensor(uf, row_major(nc, K)), 0,
                                         num_threads=-1)

        def store_row(m: Int) {var pb, var cf, var cu, var n0, var nc, var N}:
            var j = 0
            while j < nc:
                var n = min(W, nc - j)
                var g = SIMD[DType.float32, W](0)
                var u = SIMD[DType.float32, W](0)
                for i in range(n):
                    g[i] = cf[unsafe_offset=m * nc + j + i]
                    comptime if SWIGLU:
                        u[i] = cu[unsafe_offset=m * nc + j + i]
                comptime if SWIGLU:
                    g = silu[W](g) * u
                _store_cols[dt](pb.yp, m * N, n0 + j, n0 + j + n, g)
                j += W

        parallelize(store_row, M)
    _ = ws^
    _ = cs^


struct _XForms[dt: DType, Q8: Bool](Movable):
    """The forms of x a call's path reads besides x itself, made once per call: the portable streaming path and the
    Q8_0 paths read x as float32 (x itself, or a bf16 x widened here); Q8_0 streaming on AVX512_VNNI reads x
    quantized into int8 blocks with their scales (microkernels.q8_quantize_activations), and from Q8_LANES_MIN_M
    rows on also packed with the rows in the lanes (microkernels.q8_pack_lanes). `x_form` is the form the streaming
    dots take (READ_*), decided here once per call from M, cpuid and the ISA switches."""
    var widened: List[Float32]
    var xq: List[UInt8]
    var xs: List[Float32]
    var xl: List[Int32]  # the lanes slots (Q8LaneSlots)
    var xls: List[Float32]
    var xlc: List[Int32]
    var x_form: Int

    def __init__(out self, x: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin], M: Int, K: Int, path: Int):
        var pairs = Self.dt == DType.bfloat16 and use_bf16_dot() and not Self.Q8  # streaming on vdpbf16ps
        var widen = Self.dt != DType.float32 and ((Self.Q8 and path != DOT) or (path == STREAM and not pairs))
        var int8 = Self.Q8 and path == STREAM and use_vnni()
        var lanes = int8 and M >= Q8_LANES_MIN_M
        self.x_form = READ_Q8_LANES if lanes else (
            READ_Q8_INT8 if int8 else (READ_Q8 if Self.Q8 else (READ_PAIRS if pairs else READ_WIDEN)))
        self.widened = List[Float32](unsafe_uninit_length=M * K if widen else 0)
        self.xq = List[UInt8](unsafe_uninit_length=M * K if int8 else 0)
        self.xs = List[Float32](unsafe_uninit_length=M * q8_activation_scales(K) if int8 else 0)
        var slots = 1 if lanes else 0  # every row in one slot: M <= STREAM_MAX_M <= W
        self.xl = List[Int32](unsafe_uninit_length=Q8LaneSlots.ints(K, slots))
        self.xls = List[Float32](unsafe_uninit_length=Q8LaneSlots.blocks(K, slots))
        self.xlc = List[Int32](unsafe_uninit_length=Q8LaneSlots.blocks(K, slots))
        var xf = self._xf(x)
        comptime if Self.dt != DType.float32:
            if widen:
                widen_row(xf, x, M * K)
        if int8:
            var xq = untracked(self.xq.unsafe_ptr())
            var xs = untracked(self.xs.unsafe_ptr())
            for m in range(M):
                q8_quantize_activations(xf.unsafe_offset(m * K), K, xq.unsafe_offset(m * K),
                                        xs.unsafe_offset(m * q8_activation_scales(K)))
            if lanes:
                self._lanes(K).pack(0, xq, xs, M)

    def _lanes(mut self, K: Int) -> Q8LaneSlots:
        """The lanes slots (empty unless the call streams on the lanes)."""
        return Q8LaneSlots(untracked(self.xl.unsafe_ptr()), untracked(self.xls.unsafe_ptr()),
                           untracked(self.xlc.unsafe_ptr()), K)

    def _xf(mut self, x: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin]) -> Pointer[
            mut=True, Float32, MutUntrackedOrigin]:
        """x as float32: the widened copy where one was made, else x's own (float32) values."""
        if len(self.widened) > 0:
            return untracked(self.widened.unsafe_ptr())
        return x.unsafe_bitcast[Float32]()

    def problem(mut self, x: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin],
                wa: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin],
                wb: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin],
                y: Pointer[mut=True, Scalar[Self.dt], MutUntrackedOrigin], M: Int, N: Int, K: Int) -> _Problem[Self.dt]:
        """The call's state, pointing into these forms (which must outlive it)."""
        return _Problem[Self.dt](M, N, K, x, wa, wb, y, self._xf(x), untracked(self.xq.unsafe_ptr()),
                                 untracked(self.xs.unsafe_ptr()), self._lanes(K))


def _path[dt: DType, Q8: Bool](M: Int, K: Int) -> Int:
    """STREAM, AMX, DOT, MATMUL or DEQUANT for this call (the header's rules)."""
    if M <= STREAM_MAX_M:
        return STREAM
    comptime if Q8:
        return DOT if use_bf16_dot() else DEQUANT
    comptime if dt == DType.float32:
        return MATMUL
    else:
        if amx_k_ok(K) and use_amx():
            return AMX
        return DOT if K % 2 == 0 and use_bf16_dot() else STREAM


def _run[dt: DType, SWIGLU: Bool, Q8: Bool](
    y: Pointer[mut=True, Scalar[dt], _], x: Pointer[mut=True, Scalar[dt], _], wa: Pointer[mut=True, Scalar[dt], _],
    wb: Pointer[mut=True, Scalar[dt], _], M: Int, N: Int, K: Int,
) raises:
    """One call of any of the ops: y = x . wa^T (SwiGLU: silu(x . wa^T) * (x . wb^T)); Q8: wa and wb are Q8_0
    bytes (K a multiple of 32, checked by the caller)."""
    comptime assert dt == DType.float32 or dt == DType.bfloat16, "linear: float32 or bfloat16"
    if M == 0 or N == 0:
        return
    var yu = untracked(y)
    if K == 0:  # empty sums: 0, and silu(0) * 0 = 0
        for i in range(M * N):
            _store[dt, 1](yu, i, SIMD[DType.float32, 1](0))
        return
    var path = _path[dt, Q8](M, K)
    var forms = _XForms[dt, Q8](untracked(x), M, K, path)
    var pb = forms.problem(untracked(x), untracked(wa), untracked(wb), yu, M, N, K)

    if path == STREAM:
        _stream[dt, SWIGLU, Q8](pb, forms.x_form, 0)
    elif path == DOT or path == AMX:
        var K2 = K // 2
        var blocks = n_blocks(M)
        var packed = List[Int32](unsafe_uninit_length=blocks * K2 * MB + 16)  # every pair read is written first
        var xk = untracked(packed.unsafe_ptr())
        xk = xk.unsafe_offset(align64(Int(xk)))

        def pack(blk: Int) {var pb, var xk}:
            _pack_block[dt](pb, xk, blk)

        parallelize(pack, blocks)
        var amx_path = False
        comptime if dt == DType.bfloat16:
            amx_path = path == AMX
        if amx_path:
            var cols_task = AMX_RB * AMX_TILE * (1 if SWIGLU else 2)
            var n_groups = (N + cols_task - 1) // cols_task
            var amx_chunks = (blocks + AMX_CHUNK_BLOCKS - 1) // AMX_CHUNK_BLOCKS

            def amx(task: Int) {var pb, var xk, var n_groups}:
                comptime if dt == DType.bfloat16:
                    _amx_task[dt, SWIGLU](pb, xk, n_groups, task)

            parallelize_dynamic(amx, amx_chunks * n_groups)
        else:
            var n_tiles = (N + MR * GROUPS - 1) // (MR * GROUPS)
            var chunks = (blocks + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS

            def dot(task: Int) {var pb, var xk, var n_tiles}:
                _dot_task[dt, SWIGLU, Q8](pb, xk, n_tiles, task)

            parallelize_dynamic(dot, chunks * n_tiles)
        _ = packed^
    elif path == DEQUANT:
        _dequant_matmul[dt, SWIGLU](pb)
    else:
        comptime if dt == DType.float32:
            _matmul[SWIGLU](rebind[_Problem[DType.float32]](pb))
    _ = forms^


def _check_contiguous(name: StaticString, rows: Int, cols: Int, s0: Int, s1: Int) raises:
    if s1 != 1 or (rows > 1 and s0 != cols):
        raise Error("linear: ", name, " must be contiguous row-major")


@extensibility.register("linear")
struct Linear:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype = output.dtype, rank=2, ...],
        w: InputTensor[dtype = output.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        """y [M, N] = x [M, K] . w[N, K]^T."""
        comptime assert target == "cpu", "linear: CPU-only kernel"
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var N = w.dim_size(0)
        if w.dim_size(1) != K or output.dim_size(0) != M or output.dim_size(1) != N:
            raise Error("linear: expected x [M, K], w [N, K], y [M, N]; got K ", K, " vs w [", N, ", ", w.dim_size(1),
                        "]")
        _check_contiguous("x", M, K, x.stride_length(0), x.stride_length(1))
        _check_contiguous("w", N, K, w.stride_length(0), w.stride_length(1))
        _check_contiguous("y", M, N, output.stride_length(0), output.stride_length(1))
        _run[output.dtype, False, False](output.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), w.unsafe_ptr(), M, N, K)


@extensibility.register("linear_swiglu")
struct LinearSwiglu:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype = output.dtype, rank=2, ...],
        gate: InputTensor[dtype = output.dtype, rank=2, ...],
        up: InputTensor[dtype = output.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        """y [M, I] = silu(x [M, K] . gate[I, K]^T) * (x . up[I, K]^T)."""
        comptime assert target == "cpu", "linear_swiglu: CPU-only kernel"
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var I = gate.dim_size(0)
        if (gate.dim_size(1) != K or up.dim_size(0) != I or up.dim_size(1) != K or output.dim_size(0) != M
                or output.dim_size(1) != I):
            raise Error("linear_swiglu: expected x [M, K], gate and up [I, K], y [M, I]")
        _check_contiguous("x", M, K, x.stride_length(0), x.stride_length(1))
        _check_contiguous("gate", I, K, gate.stride_length(0), gate.stride_length(1))
        _check_contiguous("up", I, K, up.stride_length(0), up.stride_length(1))
        _check_contiguous("y", M, I, output.stride_length(0), output.stride_length(1))
        _run[output.dtype, True, False](output.unsafe_ptr(), x.unsafe_ptr(), gate.unsafe_ptr(), up.unsafe_ptr(), M, I,
                                        K)


def _check_q8(op: StaticString, name: StaticString, rows: Int, K: Int, w_cols: Int, s0: Int, s1: Int) raises:
    """A Q8_0 weight [rows, K / 32 * 34] of uint8 for an x with K columns; K a multiple of 32 (no padding)."""
    if K % Q8_BLOCK != 0:
        raise Error(op, ": K = ", K, " is not a multiple of ", Q8_BLOCK, " (Q8_0 blocks)")
    if w_cols != q8_row_bytes(K):
        raise Error(op, ": ", name, " must be Q8_0 bytes [N, K / 32 * 34] = [N, ", q8_row_bytes(K), "] for K ", K,
                    "; got ", w_cols, " columns")
    _check_contiguous(name, rows, w_cols, s0, s1)


@extensibility.register("linear_q8_0")
struct LinearQ8_0:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype = output.dtype, rank=2, ...],
        w: InputTensor[dtype = DType.uint8, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        """y [M, N] = x [M, K] . dequantize(w)^T, w Q8_0 bytes [N, K / 32 * 34]."""
        comptime assert target == "cpu", "linear_q8_0: CPU-only kernel"
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var N = w.dim_size(0)
        _check_q8("linear_q8_0", "w", N, K, w.dim_size(1), w.stride_length(0), w.stride_length(1))
        if output.dim_size(0) != M or output.dim_size(1) != N:
            raise Error("linear_q8_0: expected y [M, N] = [", M, ", ", N, "]")
        _check_contiguous("x", M, K, x.stride_length(0), x.stride_length(1))
        _check_contiguous("y", M, N, output.stride_length(0), output.stride_length(1))
        var wp = w.unsafe_ptr().unsafe_bitcast[Scalar[output.dtype]]()
        _run[output.dtype, False, True](output.unsafe_ptr(), x.unsafe_ptr(), wp, wp, M, N, K)


@extensibility.register("linear_swiglu_q8_0")
struct LinearSwigluQ8_0:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype = output.dtype, rank=2, ...],
        gate: InputTensor[dtype = DType.uint8, rank=2, ...],
        up: InputTensor[dtype = DType.uint8, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        """y [M, I] = silu(x . dequantize(gate)^T) * (x . dequantize(up)^T), gate and up Q8_0 [I, K / 32 * 34]."""
        comptime assert target == "cpu", "linear_swiglu_q8_0: CPU-only kernel"
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var I = gate.dim_size(0)
        _check_q8("linear_swiglu_q8_0", "gate", I, K, gate.dim_size(1), gate.stride_length(0), gate.stride_length(1))
        _check_q8("linear_swiglu_q8_0", "up", I, K, up.dim_size(1), up.stride_length(0), up.stride_length(1))
        if up.dim_size(0) != I or output.dim_size(0) != M or output.dim_size(1) != I:
            raise Error("linear_swiglu_q8_0: expected gate and up with the same rows, y [M, I]")
        _check_contiguous("x", M, K, x.stride_length(0), x.stride_length(1))
        _check_contiguous("y", M, I, output.stride_length(0), output.stride_length(1))
        var gp = gate.unsafe_ptr().unsafe_bitcast[Scalar[output.dtype]]()
        var upp = up.unsafe_ptr().unsafe_bitcast[Scalar[output.dtype]]()
        _run[output.dtype, True, True](output.unsafe_ptr(), x.unsafe_ptr(), gp, upp, M, I, K)


@extensibility.register("linear_dot_peak")
struct LinearDotPeak:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[dtype = DType.float32, rank=1, ...],
        reps: InputTensor[dtype = DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        """The bf16-dot micro-kernel's own peak, the yardstick of the DOT path: every core runs reps x
        microkernels.dot_tile (MR x MB outputs, KC pairs: MR x NVMAX x KC vdpbf16ps of 64 flops) on operands in its
        L1; output[w] = a sum worker w computed (so nothing is optimised away). Needs AVX512_BF16."""
        comptime assert target == "cpu", "linear_dot_peak: CPU-only kernel"
        if not use_bf16_dot():
            raise Error("linear_dot_peak: the CPU has no AVX512_BF16 (or HYV3_PORTABLE_KERNELS=1)")
        var n = reps.unsafe_ptr()[unsafe_offset=0]
        var workers = output.dim_size(0)
        var outp = untracked(output.unsafe_ptr())

        def worker(wk: Int) {var n, var outp}:
            var xb = List[Int32](length=KC * MB + 16, fill=0x3F803F80)  # bf16 pairs (1.0, 1.0)
            var wr = List[Int32](length=MR * KC, fill=0x3C003C00)  # bf16 pairs (2^-7, 2^-7)
            var c = List[Float32](length=MR * MB, fill=0)
            var xp = xb.unsafe_ptr()
            xp = xp.unsafe_offset(align64(Int(xp)))
            var rows = StaticTuple[Int, MR](fill=0)
            comptime for i in range(MR):
                rows[i] = i * KC
            for _ in range(Int(n)):
                dot_tile[NVMAX](wr.unsafe_ptr(), rows, xp, KC, c.unsafe_ptr(), False)
            outp[unsafe_offset=wk] = c[0]
            _ = xb^
            _ = wr^
            _ = c^

        parallelize(worker, workers)


def _stream_peak[dt: DType, Q8: Bool](
    y: Pointer[mut=True, Scalar[dt], _], x: Pointer[mut=True, Scalar[dt], _], w: Pointer[mut=True, Scalar[dt], _],
    workers: Int, M: Int, N: Int, K: Int, reps: Int,
) raises:
    """The streaming path's compute ceiling (ops `linear_stream_peak`, `linear_stream_peak_q8_0`): every one of
    `workers` cores runs the STREAM path's tasks (the same passes, dots and prefetches as `linear`) reps times over
    on one weight matrix small enough to stay in its L2, into its own y[worker] [M, N]. Weight bytes over time is
    then the rate the path can consume when memory keeps up: the yardstick that says whether a decode-shaped call
    is bound by memory or by its loop (bench/cases/linear.py, `stream_peak` cases)."""
    if M < 1 or M > STREAM_MAX_M:
        raise Error("linear_stream_peak: M = ", M, " is not a streaming shape (1..", STREAM_MAX_M, ")")
    if reps < 1:
        raise Error("linear_stream_peak: reps must be >= 1; got ", reps)
    var forms = _XForms[dt, Q8](untracked(x), M, K, STREAM)
    var pb = forms.problem(untracked(x), untracked(w), untracked(w), untracked(y), M, N, K)

    var x_form = forms.x_form

    def worker(wk: Int) {var pb, var x_form, var reps}:
        var mine = pb
        mine.yp = pb.yp.unsafe_offset(wk * pb.M * pb.N)
        _stream[dt, False, Q8](mine, x_form, reps)

    parallelize(worker, workers)
    _ = forms^


@extensibility.register("linear_stream_peak")
struct LinearStreamPeak:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=3, ...],
        x: InputTensor[dtype = output.dtype, rank=2, ...],
        w: InputTensor[dtype = output.dtype, rank=2, ...],
        reps: InputTensor[dtype = DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        """y [workers, M, N]: each worker's x [M, K] . w[N, K]^T, after reps[0] passes (_stream_peak)."""
        comptime assert target == "cpu", "linear_stream_peak: CPU-only kernel"
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var N = w.dim_size(0)
        if w.dim_size(1) != K or output.dim_size(1) != M or output.dim_size(2) != N:
            raise Error("linear_stream_peak: expected x [M, K], w [N, K], y [workers, M, N]")
        _check_contiguous("x", M, K, x.stride_length(0), x.stride_length(1))
        _check_contiguous("w", N, K, w.stride_length(0), w.stride_length(1))
        _stream_peak[output.dtype, False](output.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), output.dim_size(0),
                                          M, N, K, Int(reps.unsafe_ptr()[unsafe_offset=0]))


@extensibility.register("linear_stream_peak_q8_0")
struct LinearStreamPeakQ8_0:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=3, ...],
        x: InputTensor[dtype = output.dtype, rank=2, ...],
        w: InputTensor[dtype = DType.uint8, rank=2, ...],
        reps: InputTensor[dtype = DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        """linear_stream_peak with Q8_0 weights [N, K / 32 * 34]."""
        comptime assert target == "cpu", "linear_stream_peak_q8_0: CPU-only kernel"
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var N = w.dim_size(0)
        _check_q8("linear_stream_peak_q8_0", "w", N, K, w.dim_size(1), w.stride_length(0), w.stride_length(1))
        if output.dim_size(1) != M or output.dim_size(2) != N:
            raise Error("linear_stream_peak_q8_0: expected y [workers, M, N] = [workers, ", M, ", ", N, "]")
        _check_contiguous("x", M, K, x.stride_length(0), x.stride_length(1))
        var wp = w.unsafe_ptr().unsafe_bitcast[Scalar[output.dtype]]()
        _stream_peak[output.dtype, True](output.unsafe_ptr(), x.unsafe_ptr(), wp, output.dim_size(0), M, N, K,
                                         Int(reps.unsafe_ptr()[unsafe_offset=0]))
