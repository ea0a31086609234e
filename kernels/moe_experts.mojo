# Routed MoE experts on the CPU: for every token, sum over its k chosen experts of
# weight * down(silu(gate(x)) * up(x)); float32 accumulation, float32 or bfloat16 weights. One custom op: MAX's
# own grouped matmul and MoE kernels are GPU-only, so without this MAX cannot run an MoE layer's experts
# sparsely on a CPU.
#
# Reference (the spec): hyv3_graph/kernels/moe_experts.py::moe_experts_reference (float64)
# Wrapper:              hyv3_graph/kernels/moe_experts.py::moe_experts
# Fuzz test:            tests/test_moe_experts.py     Bench: bench/cases/moe_experts.py (`experts` cases)
# History (variants measured, kept or not): docs/perf-notes.md, "moe_experts".
#
# Contract. Inputs: x [T, H], topk_weights [T, k], and the router's dispatch metadata (kernels/moe_router.mojo):
# expert_offsets [E + 1] and sorted_slots [T * k] (slot = t * k + j, grouped by expert, ascending t).
# Weights in HF's stacked layout, as loaded (hyv3_graph/weights.py): gate_up [E, 2I, H] (rows 0..I-1
# gate, I..2I-1 up) and down [E, H, I]; both are read row-wise (a weight row is contiguous over the
# reduction dim), which is what a dot-product micro-kernel and MAX's transpose_b matmul want. Weights are float32,
# bfloat16, or Q8_0 (uint8: each row as llama.cpp's blocks of 32 int8 with a float16 scale, hyv3_graph/q8_0.py;
# gate_up [E, 2I, H / 32 * 34], down [E, H, I / 32 * 34]; H and I multiples of 32, else an error). Output [T, H]
# float32. Deterministic bit for bit, whatever the thread count.
#
# Design, and why:
#   * An expert with few rows (<= SMALL_ROWS: decode, or a long tail of lightly used experts) is memory bound: its
#     weights are streamed exactly once, each weight row chunk feeding the FMAs of all its rows (register accumulators,
#     a tile of 1, 2 or 4 rows so that no FMA is wasted). Four weight rows share each pass over the activations (gate
#     rows o, o + 1 with up rows I + o, I + o + 1, so SwiGLU is fused into the gate_up pass; or four adjacent down
#     rows); each row is prefetched at the same position in the first later pass at least 8 KiB on
#     (microkernels.stream_ahead: Hy3's short down rows, 3 KiB, would otherwise prefetch inside the current pass). All
#     such experts' (expert, ~1 MiB of weight rows) tasks share one parallel loop, so both cores stay busy whether one
#     expert or all of them are active; at decode (every streaming expert <= SMALL_ROWS rows, >= EXPERT_TASKS_PER_CORE
#     of them a core) each expert is instead one task, gate_up then down on one core (`_stream_expert`: one parallel
#     pass instead of two; `small`'s experts 1.06-1.10x). bf16 weights on a CPU with AVX512_BF16 (even H and I): the
#     rows and then the SwiGLU outputs are rounded to bf16 (as the bf16-dot GEMM below and HF's bf16 experts round them)
#     and dotted on vdpbf16ps (microkernels.stream_dots_bf16), 8 weight rows a pass; otherwise the weights are widened
#     exactly against float32 activations.
#   * An expert with many rows is compute bound. float32 weights: gathered rows times its weights through
#     MAX's own CPU matmul (linalg.matmul.cpu, transpose_b), SwiGLU in between. Each expert runs on one core,
#     experts with the most rows first, whenever that greedy schedule ends within 10% of an even split;
#     otherwise (a few dominant experts) one expert at a time on all cores: experts side by side beat MAX's
#     own threading over one expert's ~100-500 rows.
#   * bfloat16 weights (the real checkpoint's dtype), CPU with AVX512_BF16 (cpuid at run time, see
#     cpu_isa.mojo): the bf16-dot GEMM. The expert's activations are rounded to bf16 and packed in blocks
#     of MB rows, [block][K/2][MB] bf16 pairs (vdpbf16ps's layout); the weights are read in place, a bf16
#     pair broadcast against MB activation rows in the lanes, so nothing is packed at load time. Micro-tile:
#     MR weight rows x MB rows = 24 zmm accumulators; fp32 accumulation. Tasks are (expert, GROUPS micro-
#     tiles of weight rows), KC pairs at a time so an activation slice stays in L1 for every group. gate_up
#     pairs gate rows o.. with up rows I+o.., so SwiGLU runs in the epilogue and writes the down GEMM's
#     packed bf16 input directly; the down epilogue stores MR outputs of a row at once. Numerics: x and the
#     SwiGLU output are rounded to bf16 (the reference models that: moe_experts_reference's
#     bf16_activations). Without the instruction (or with HYV3_PORTABLE_KERNELS=1), or with odd H or I, bf16
#     experts take the streaming path instead, on exact float32 activations: slower at large T.
#   * AMX (bf16 weights, H and I multiples of 32, AMX-BF16 granted; cpu_isa.use_amx, HYV3_DISABLE_AMX=1 turns it
#     off): the same packing and numerics as the bf16-dot GEMM, on the tile unit (microkernels.amx_panel): A tiles
#     are 16 weight rows read in place (gate_up: 16 gate rows with their 16 up rows, so SwiGLU fuses as above; a
#     C tile row is one output for 16 tokens, which is exactly a row of the down GEMM's packed input), B tiles
#     16 tokens of a packed block; tasks are (expert, AMX_RB row blocks).
#   * Q8_0 weights: an expert with <= Q8_STREAM_MAX_ROWS rows (Q8_LANES_MAX_ROWS on AVX512_VNNI) streams, so decode
#     reads 34 bytes per 32 weights, 53% of bf16: on AVX512_VNNI (cpu_isa.use_vnni) its rows and then its SwiGLU
#     activations are quantized to int8 blocks (microkernels.q8_quantize_activations) and dotted on vpdpbusd
#     (stream_dots_q8_vnni), as linear does, 8 weight rows a pass (4 gate rows with their up rows, or 8 down rows; bf16
#     weights the same); an expert with Q8_LANES_MIN_M rows or more (a prefill, a large batch) has its int8 rows, then
#     its activations, packed with the rows in the vector lanes, in groups of up to 16 rows (microkernels.q8_pack_lanes;
#     8 lanes for a group of up to 8) and runs stream_dots_q8_lanes, eight vpdpbusd per weight row, block and group,
#     each weight pass dotted against every group while it is in L1 (`_lanes_gate_up`, `_lanes_down`). At Hy3's dims (E
#     32) that is 1.2-1.7x the row kernel at 6-16 rows, and 2.1x / 1.8x / 1.5x / 1.2x / 1.1x the bf16-dot GEMM at 17-24
#     / 32 / 48-64 / 128 / 256 rows (vpdpbusd does twice vdpbf16ps's products; docs/perf-notes.md, "Q8_0's lanes in
#     moe_experts"), so up to Q8_LANES_MAX_ROWS rows such an expert streams on the lanes instead of taking the GEMM;
#     otherwise each weight block is widened and scaled, exact in float32, against exact float32 activations
#     (stream_dots_q8_0). An expert with more rows (prefill) takes the bf16-dot GEMM below on its Q8_0 rows where the
#     CPU has AVX512_BF16 (microkernels.q8_dot_panel: each K slice widened into a scratch per task, each block's sum
#     scaled by its d, so the weights are exactly the dequantized ones; x and the SwiGLU output rounded to bf16 as for
#     bf16 weights; never AMX): 1.66x DEQUANT at Hy3's dims (docs/perf-notes.md, "Q8_0 on the bf16-dot GEMM"). Otherwise
#     DEQUANT, as linear does: tasks of (expert, DEQUANT_ROWS weight rows: gate rows with their up rows, or down rows),
#     each dequantizing its rows once into a float32 scratch (exact) and multiplying the expert's rows by them through
#     MAX's matmul on its core; streaming them instead re-read every expert's activations from L3 for each 4 weight
#     rows. Why no int8 GEMM: docs/perf-notes.md, "Q8_0".
#   * The streaming and bf16-dot tasks go to whichever core is free (work_queue.mojo): MAX's parallelize
#     gives each core a fixed half of the task list, which leaves one idle when experts' row counts differ.
#   * Combine is deterministic, without atomics: out[t] accumulates its experts in ascending expert
#     order, whatever the thread count; the shared expert(s) stay in the graph (a dense SwiGLU).
#
# Code map: `MoeExperts.execute` validates the routing, picks each expert's path, then runs the passes: `_gather_row`;
# streaming `_stream_gate_up`, `_stream_down`; bf16-dot `_dot_pack_x`, `_dot_gate_up`, `_dot_down` (their GEMM:
# `_expert_panel`; AMX: `_amx_gate_up`, `_amx_down`); float32 matmul `_matmul_expert`; Q8_0 `_dequant_gate_up`,
# `_dequant_down`; and `_combine_token`. They read the op's state from small structs (`_Routing`, `_Weights`,
# `_Rows`, `_Stream`, `_Dot`, `_Matmul`, `_Dequant`). The streaming dots and the bf16-dot micro-kernels are
# microkernels.mojo's (shared with linear.mojo).
#
# Today's numbers (`python -m bench`, bench/results/latest.md, 2026-12-02, 2-core AMD EPYC family 26 (Zen 5); H 4096,
# I 1536, E 32, k 8): fp32 T 1 17.1 ms (35 GB/s, 2.4x torch's eager loop), T 512 561 ms (275 GFLOP/s), T 2048
# 1.90 s (326 GFLOP/s); bf16 T 1 10.9 ms (28 GB/s), T 512 323 ms (478 GFLOP/s), T 2048 1.31 s (472 GFLOP/s).
# On AMX (`python -m bench --only experts`, 2026-12-03, 2-core Intel Xeon with amx_bf16): bf16 T 512 177-182 ms
# (849-874 GFLOP/s, 1.66x torch's bf16 grouped_mm), T 2048 466-486 ms (1.27-1.33 TFLOP/s, 2.33x).
# Q8_0 (2026-12-03, 2-core Zen 4 with AVX512_VNNI, a timing script: docs/perf-notes.md "Q8_0"): T 1 7.42 ms
# (21.6 GB/s; bf16 9.60 ms), T 8 36.3 ms (bf16 41.8). T 512 (2026-12-07 05:20, the same Zen 4, a timing script,
# the three in one process): on the bf16-dot GEMM 574 ms (269 GFLOP/s), DEQUANT 954 ms (162), bf16 464 ms (333).
# Q8_0 with every expert at the same row count (2026-12-08, the same Zen 4, a timing script against the previous
# package in one process: docs/perf-notes.md "Q8_0's lanes in moe_experts"): on the lanes 6 rows 34.0 ms, 8 35.6,
# 16 55.4, 17 80.8, 32 98.6, 64 193, 128 369, 256 746 ms (the row kernel 40.6 / 51.2 / 94.4 ms at 6 / 8 / 16;
# the bf16-dot GEMM 170 / 173 / 286 / 448 / 845 ms at 17 / 32 / 64 / 128 / 256).
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from .work_queue import parallelize_dynamic, parallelize_sized, sort_codes_by_cost
from std.os import abort
from std.runtime import parallelism_level
from layout import TileTensor
from layout.tile_layout import row_major
from linalg.matmul.cpu import matmul as cpu_matmul
from std.utils import StaticTuple
from std.sys import size_of
from .cpu_isa import (F32x, adjacent_bf16_pairs, amx_configure, amx_release, bf16_pairs, narrow_row, round_to_bf16,
                      use_amx, use_bf16_dot, use_vnni)
from .microkernels import (W, MAX_STREAM_ROWS, MB, MR, AMX_TILE, Q8_BLOCK, Q8_BLOCK_BYTES, align64,
                           amx_c_tile, amx_c_tiles, amx_k_ok, amx_pack_bytes, amx_panel, amx_rows, amx_tile_by_token,
                           dot_panel, n_blocks, n_vec, q8_activation_scales, q8_dequantize_row, q8_dot_panel,
                           q8_quantize_activations, q8_lane_groups, Q8LaneSlots, Q8_LANES_MIN_M,
                           q8_row_bytes, silu, stream_ahead, stream_dots, stream_dots_bf16, stream_dots_q8_0,
                           stream_dots_q8_vnni,
                           stream_rows_per_pass, swiglu_row, untracked)

comptime EXPERT_TASKS_PER_CORE = 4  # decode: from this many streaming experts a core, one task each (_stream_expert)
comptime SMALL_ROWS = MAX_STREAM_ROWS  # experts with at most this many rows take the streaming path
comptime STREAM_TASK_BYTES = 1 << 20  # streaming path: weight bytes per task
comptime GU_ROWS = MR // 2  # gate_up: gate rows o0..o0+3 with up rows I+o0..I+o0+3, so SwiGLU fuses
comptime GROUPS = 8  # bf16-dot path: micro-tiles of MR weight rows per task (share each activation slice)
comptime AMX_RB = 8  # AMX: row blocks per task (gate_up: 16 gate rows with their 16 up rows; down: 32 rows)
comptime Q8_STREAM_MAX_ROWS = 16  # Q8_0 experts with more rows take a GEMM (bf16-dot or DEQUANT), but:
comptime Q8_LANES_MAX_ROWS = 256  # on AVX512_VNNI they stream on the lanes up to this many rows (1.1-2.1x the GEMM)
comptime DEQUANT_ROWS = 64  # DEQUANT: weight rows dequantized per task (gate_up: gate rows, with their up rows)
comptime STREAM = 1  # an expert's path: streaming
comptime MATMUL = 2  # MAX's matmul (float32 weights)
comptime DOT = 3  # the bf16-dot GEMM
comptime DEQUANT = 4  # Q8_0 weights: row chunks dequantized into float32, then MAX's matmul


def _stream_rows_per_task(row_bytes: Int, nw: Int) -> Int:
    """Weight rows per streaming task: about STREAM_TASK_BYTES of weights (so that the pool's per-task cost is
    noise), a multiple of nw, the rows of a pass."""
    return max(1, STREAM_TASK_BYTES // (row_bytes * nw)) * nw


@always_inline
def _row_len[wdt: DType](K: Int) -> Int:
    """Elements of wdt in one weight row over K: K, or the bytes of a Q8_0 row (wdt uint8)."""
    return q8_row_bytes(K) if wdt == DType.uint8 else K


@always_inline
def _stream_dots_w[wdt: DType, NW: Int](
    w: Pointer[mut=True, Scalar[wdt], MutUntrackedOrigin], w_rows: StaticTuple[Int, NW],
    x: Pointer[mut=True, Float32, MutUntrackedOrigin], xq: Pointer[mut=True, UInt8, MutUntrackedOrigin],
    xs: Pointer[mut=True, Float32, MutUntrackedOrigin], xb: Pointer[mut=True, UInt16, MutUntrackedOrigin],
    int8: Bool, pairs: Bool, n_rows: Int, K: Int, ahead: Int,
) -> StaticTuple[SIMD[DType.float32, 4], NW]:
    """The streaming dots for this weight format: stream_dots (float32, bf16 widened), stream_dots_q8_0, with
    int8 (Q8_0 on AVX512_VNNI) stream_dots_q8_vnni on the same rows quantized (xq, xs), or with pairs (bf16 on
    AVX512_BF16) stream_dots_bf16 on the rows rounded to bf16 (xb)."""
    comptime if wdt == DType.uint8:
        if int8:
            return stream_dots_q8_vnni(w.unsafe_bitcast[UInt8](), w_rows, xq, xs, K, n_rows, K, ahead)
        return stream_dots_q8_0(w.unsafe_bitcast[UInt8](), w_rows, x, K, n_rows, K, ahead)
    elif wdt == DType.bfloat16:
        if pairs:
            return stream_dots_bf16(w.unsafe_bitcast[UInt16](), w_rows, xb, K, n_rows, K, ahead)
        return stream_dots(w, w_rows, x, K, n_rows, K, ahead)
    else:
        return stream_dots(w, w_rows, x, K, n_rows, K, ahead)


@always_inline
def _swiglu_lanes(c: Pointer[Float32, _], i: Int, j: Int) -> F32x:
    """silu(gate) * up of gate_up micro-tile c [MR][MB]: gate row i, up row GU_ROWS + i, lanes of vector j."""
    return silu[W](c.unsafe_load[width=W](i * MB + j * W)) * c.unsafe_load[width=W]((GU_ROWS + i) * MB + j * W)


def _swiglu_ffn(
    x: Pointer[Float32, _], n: Int, H: Int, I: Int, gate_up: Pointer[Float32, _], down: Pointer[Float32, _],
    g: Pointer[mut=True, Float32, _], act: Pointer[mut=True, Float32, _], y: Pointer[mut=True, Float32, _],
    num_threads: Int,
) raises:
    """y [n, H] = down(silu(gate) * up) for one expert's n rows x [n, H] (gate_up [2I, H], down [H, I]) through
    MAX's CPU matmul on num_threads cores (-1: all); g [n, 2I] and act [n, I] are scratch."""
    cpu_matmul[transpose_b=True](TileTensor(g, row_major(n, 2 * I)), TileTensor(x, row_major(n, H)),
                                 TileTensor(gate_up, row_major(2 * I, H)), 0, num_threads=num_threads)

    def swiglu(r: Int) {var g, var act, var I}:
        var gr = untracked(g.unsafe_offset(r * 2 * I))
        swiglu_row(untracked(act.unsafe_offset(r * I)), gr, gr.unsafe_offset(I), I)

    if num_threads == 1:
        for r in range(n):
            swiglu(r)
    else:
        parallelize(swiglu, n)
    cpu_matmul[transpose_b=True](TileTensor(y, row_major(n, H)), TileTensor(act, row_major(n, I)),
                                 TileTensor(down, row_major(H, I)), 0, num_threads=num_threads)


# The op's state, grouped by what it describes. Each pass below is a function of the groups it reads, so the
# parallel loops in `execute` are one-line closures over a few small structs. Pointers are untracked: the
# buffers they point into (the op's tensors and execute's scratch Lists) outlive every pass.
@fieldwise_init
struct _Routing(ImplicitlyCopyable, Movable):
    """The dispatch: H, I, k; expert offsets [E + 1] and sorted slots [T k] from the router, the top-k weights
    [T, k], each expert's path and each grouped row's expert."""
    var H: Int
    var I: Int
    var k: Int
    var offp: Pointer[mut=True, Int32, MutUntrackedOrigin]
    var slotp: Pointer[mut=True, Int32, MutUntrackedOrigin]
    var wp: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var pathp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var rep: Pointer[mut=True, Int, MutUntrackedOrigin]


@fieldwise_init
struct _Weights[wdt: DType](ImplicitlyCopyable, Movable):
    """The stacked expert weights gate_up [E, 2I, H] and down [E, H, I] and their expert strides."""
    var gup: Pointer[mut=True, Scalar[Self.wdt], MutUntrackedOrigin]
    var dnp: Pointer[mut=True, Scalar[Self.wdt], MutUntrackedOrigin]
    var gu_es: Int
    var dn_es: Int


@fieldwise_init
struct _Rows(ImplicitlyCopyable, Movable):
    """x [T, H], its rows gathered in grouped order (float32 paths), the SwiGLU activations and expert outputs
    per grouped row, and the output [T, H]."""
    var xp: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var rp: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var ap: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var yp: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var op: Pointer[mut=True, Float32, MutUntrackedOrigin]


@fieldwise_init
struct _Stream(ImplicitlyCopyable, Movable):
    """The streaming experts (few rows each) and their task tiling: weight rows per task and tasks per expert;
    with int8 (Q8_0 weights, AVX512_VNNI), the grouped rows and the SwiGLU activations quantized to int8 blocks
    (microkernels.q8_quantize_activations: xq [T k, H] and xs [T k, H / 4], aq [T k, I] and as_ [T k, I / 4]);
    with pairs (bf16 weights, AVX512_BF16), the same rows and activations rounded to bf16 (xb [T k, H], ab [T k, I]:
    bf16 bits) for vdpbf16ps. lane_slot [E]: with int8, each streaming expert of Q8_LANES_MIN_M rows or more has
    its first slot (else -1; one slot per group of up to W rows, microkernels.q8_lane_groups) in x_lanes (its
    quantized rows in the vector lanes over H, microkernels.Q8LaneSlots) and a_lanes (its activations over I)."""
    var sp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var gu_rows: Int
    var gu_tiles: Int
    var dn_rows: Int
    var dn_tiles: Int
    var int8: Bool
    var xq: Pointer[mut=True, UInt8, MutUntrackedOrigin]
    var xs: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var aq: Pointer[mut=True, UInt8, MutUntrackedOrigin]
    var as_: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var pairs: Bool
    var xb: Pointer[mut=True, UInt16, MutUntrackedOrigin]
    var ab: Pointer[mut=True, UInt16, MutUntrackedOrigin]
    var lane_slot: Pointer[mut=True, Int, MutUntrackedOrigin]
    var x_lanes: Q8LaneSlots
    var a_lanes: Q8LaneSlots


@fieldwise_init
struct _Dot(ImplicitlyCopyable, Movable):
    """The bf16-dot experts (bf16 or Q8_0 weights): packed bf16-pair activations for gate_up (xkp) and down (akp),
    each expert's first block and each block's expert, the task counts per expert, and whether the GEMMs run on
    AMX tiles (bf16 only; the tasks then cover AMX_RB row blocks) or on vdpbf16ps."""
    var xkp: Pointer[mut=True, Int32, MutUntrackedOrigin]
    var akp: Pointer[mut=True, Int32, MutUntrackedOrigin]
    var dp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var dbp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var bep: Pointer[mut=True, Int, MutUntrackedOrigin]
    var H2: Int
    var I2: Int
    var gu_tasks: Int
    var dn_tasks: Int
    var amx: Bool


@fieldwise_init
struct _Matmul(ImplicitlyCopyable, Movable):
    """The float32 matmul experts, most rows first; the gate_up outputs per grouped row; the weights as float32."""
    var mmp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var gp: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var gu_f32: Pointer[mut=True, Float32, MutUntrackedOrigin]
    var dn_f32: Pointer[mut=True, Float32, MutUntrackedOrigin]


@always_inline
def _gather_row(
    rt: _Routing, rw: _Rows, r: Int,
):
    """Copies x row slots[r] // k to grouped row r (float32 paths only)."""
    var H = rt.H
    var k = rt.k
    var slotp = rt.slotp
    var pathp = rt.pathp
    var rep = rt.rep
    var xp = rw.xp
    var rp = rw.rp
    if pathp[unsafe_offset=rep[unsafe_offset=r]] == DOT:
        return
    var src = xp.unsafe_offset((Int(slotp[unsafe_offset=r]) // k) * H)
    var dst = rp.unsafe_offset(r * H)
    for h in range(H):
        dst[unsafe_offset=h] = src[unsafe_offset=h]


@always_inline
def _stream_gate_up[wdt: DType](
    rt: _Routing, wt: _Weights[wdt], rw: _Rows, st: _Stream, task: Int,
):
    """Streaming path, gate_up task: gate rows with their up rows, half a pass's rows (stream_rows_per_pass) each,
    per pass over the expert's rows; SwiGLU on the way out."""
    var H = rt.H
    var I = rt.I
    var offp = rt.offp
    var gup = wt.gup
    var gu_es = wt.gu_es
    var rp = rw.rp
    var ap = rw.ap
    var sp = st.sp
    var gu_rows = st.gu_rows
    var gu_tiles = st.gu_tiles
    var e = sp[unsafe_offset=task // gu_tiles]
    var r0 = Int(offp[unsafe_offset=e])
    var n = Int(offp[unsafe_offset=e + 1]) - r0
    var w = gup.unsafe_offset(e * gu_es)
    var o0 = (task % gu_tiles) * gu_rows
    comptime if wdt == DType.uint8:
        var slot = st.lane_slot[unsafe_offset=e]
        if slot >= 0:
            _lanes_gate_up(w.unsafe_bitcast[UInt8](), st, ap, slot, r0, n, o0, gu_rows, I)
            return
    var row_len = _row_len[wdt](H)
    comptime NW = stream_rows_per_pass[wdt]()
    comptime GATES = NW // 2  # gate rows a pass, each with its up row
    var ahead = stream_ahead(GATES * row_len, size_of[wdt]())  # the next passes' gate and up rows
    for o in range(o0, min(I, o0 + gu_rows), GATES):  # gate rows o.. with up rows I + o..
        var w_rows = StaticTuple[Int, NW](fill=0)
        comptime for v in range(GATES):  # rows past I alias I - 1 (same value stored)
            w_rows[v] = min(o + v, I - 1) * row_len
            w_rows[GATES + v] = (I + min(o + v, I - 1)) * row_len
        for g0 in range(0, n, SMALL_ROWS):
            var gn = min(SMALL_ROWS, n - g0)
            var row = r0 + g0
            var gu = _stream_dots_w[wdt, NW](w, w_rows, rp.unsafe_offset(row * H), st.xq.unsafe_offset(row * H),
                                             st.xs.unsafe_offset(row * (H // 4)), st.xb.unsafe_offset(row * H),
                                             st.int8, st.pairs, gn, H, ahead)
            for r in range(gn):
                comptime for v in range(GATES):
                    var a = silu[1](gu[v][r]) * gu[GATES + v][r]
                    var at = (r0 + g0 + r) * I + min(o + v, I - 1)
                    if st.pairs:  # the down pass's bf16 input, rounded as the bf16-dot GEMM's epilogue rounds it
                        st.ab[unsafe_offset=at] = round_to_bf16[1](a)[0]
                    else:
                        ap[unsafe_offset=at] = a


def _pack_expert_lanes(rt: _Routing, q: Pointer[mut=True, UInt8, MutUntrackedOrigin],
                       sc: Pointer[mut=True, Float32, MutUntrackedOrigin], lanes: Q8LaneSlots, e: Int, slot0: Int):
    """Expert e's int8 rows over lanes.K (q, sc: grouped rows, q8_quantize_activations) into its lanes slots from
    slot0 (one per group of up to W rows)."""
    var K = lanes.K
    var r0 = Int(rt.offp[unsafe_offset=e])
    var n = Int(rt.offp[unsafe_offset=e + 1]) - r0
    lanes.pack(slot0, q.unsafe_offset(r0 * K), sc.unsafe_offset(r0 * q8_activation_scales(K)), n)


@always_inline
def _lanes_gate_up(
    w: Pointer[mut=True, UInt8, MutUntrackedOrigin], st: _Stream, ap: Pointer[mut=True, Float32, MutUntrackedOrigin],
    slot0: Int, r0: Int, n: Int, o0: Int, gu_rows: Int, I: Int,
):
    """Streaming gate_up task of a Q8_0 expert whose n int8 rows sit in the lanes (groups of up to W rows, slots
    from slot0): each pass's gate rows with their up rows dotted against every group in turn while they are in L1
    (Q8LaneSlots.dots), SwiGLU on the way out into the float32 activations ap (quantized next, as on the row
    path)."""
    var row_len = q8_row_bytes(st.x_lanes.K)
    comptime NW = stream_rows_per_pass[DType.uint8]()
    comptime GATES = NW // 2  # gate rows a pass, each with its up row
    var ahead = stream_ahead(GATES * row_len, 1)
    for o in range(o0, min(I, o0 + gu_rows), GATES):  # gate rows o.. with up rows I + o..
        var w_rows = StaticTuple[Int, NW](fill=0)
        comptime for v in range(GATES):  # rows past I alias I - 1 (same value stored)
            w_rows[v] = min(o + v, I - 1) * row_len
            w_rows[GATES + v] = (I + min(o + v, I - 1)) * row_len
        for g in range(q8_lane_groups(n)):
            var ng = min(W, n - g * W)
            var gu = st.x_lanes.dots[NW](slot0 + g, ng, w, w_rows, ahead)
            comptime for v in range(GATES):
                var a = silu[W](gu[v]) * gu[GATES + v]
                for r in range(ng):
                    ap[unsafe_offset=(r0 + g * W + r) * I + min(o + v, I - 1)] = a[r]


@always_inline
def _lanes_down(
    w: Pointer[mut=True, UInt8, MutUntrackedOrigin], st: _Stream, yp: Pointer[mut=True, Float32, MutUntrackedOrigin],
    slot0: Int, r0: Int, n: Int, h0: Int, dn_rows: Int, H: Int,
):
    """Streaming down task of a Q8_0 expert whose n int8 activation rows sit in the lanes: NW down rows a pass,
    against every group of up to W rows in turn."""
    var row_len = q8_row_bytes(st.a_lanes.K)
    comptime NW = stream_rows_per_pass[DType.uint8]()
    var ahead = stream_ahead(NW * row_len, 1)  # the next passes' rows
    for h in range(h0, min(H, h0 + dn_rows), NW):  # rows past H alias H - 1 (same value stored)
        var w_rows = StaticTuple[Int, NW](fill=0)
        comptime for v in range(NW):
            w_rows[v] = min(h + v, H - 1) * row_len
        for g in range(q8_lane_groups(n)):
            var ng = min(W, n - g * W)
            var y = st.a_lanes.dots[NW](slot0 + g, ng, w, w_rows, ahead)
            for r in range(ng):
                comptime for v in range(NW):
                    yp[unsafe_offset=(r0 + g * W + r) * H + min(h + v, H - 1)] = y[v][r]


@always_inline
def _stream_down[wdt: DType](
    rt: _Routing, wt: _Weights[wdt], rw: _Rows, st: _Stream, task: Int,
):
    """Streaming path, down task: stream_rows_per_pass down rows per pass over the activations."""
    var H = rt.H
    var I = rt.I
    var offp = rt.offp
    var dnp = wt.dnp
    var dn_es = wt.dn_es
    var ap = rw.ap
    var yp = rw.yp
    var sp = st.sp
    var dn_rows = st.dn_rows
    var dn_tiles = st.dn_tiles
    var e = sp[unsafe_offset=task // dn_tiles]
    var r0 = Int(offp[unsafe_offset=e])
    var n = Int(offp[unsafe_offset=e + 1]) - r0
    var w = dnp.unsafe_offset(e * dn_es)
    var h0 = (task % dn_tiles) * dn_rows
    comptime if wdt == DType.uint8:
        var slot = st.lane_slot[unsafe_offset=e]
        if slot >= 0:
            _lanes_down(w.unsafe_bitcast[UInt8](), st, yp, slot, r0, n, h0, dn_rows, H)
            return
    var row_len = _row_len[wdt](I)
    comptime NW = stream_rows_per_pass[wdt]()
    var ahead = stream_ahead(NW * row_len, size_of[wdt]())  # the next passes' rows
    for h in range(h0, min(H, h0 + dn_rows), NW):  # rows past H alias H - 1 (same value stored)
        var w_rows = StaticTuple[Int, NW](fill=0)
        comptime for v in range(NW):
            w_rows[v] = min(h + v, H - 1) * row_len
        for g0 in range(0, n, SMALL_ROWS):
            var gn = min(SMALL_ROWS, n - g0)
            var row = r0 + g0
            var y = _stream_dots_w[wdt, NW](w, w_rows, ap.unsafe_offset(row * I), st.aq.unsafe_offset(row * I),
                                            st.as_.unsafe_offset(row * (I // 4)), st.ab.unsafe_offset(row * I),
                                            st.int8, st.pairs, gn, I, ahead)
            for r in range(gn):
                comptime for v in range(NW):
                    yp[unsafe_offset=(r0 + g0 + r) * H + min(h + v, H - 1)] = y[v][r]


@always_inline
def _quantize_act_row(rt: _Routing, rw: _Rows, st: _Stream, r: Int):
    """Grouped row r's SwiGLU outputs (float32, ap) to int8 blocks for the down pass (aq, as_)."""
    q8_quantize_activations(rw.ap.unsafe_offset(r * rt.I), rt.I, st.aq.unsafe_offset(r * rt.I),
                            st.as_.unsafe_offset(r * q8_activation_scales(rt.I)))


def _stream_expert[wdt: DType](rt: _Routing, wt: _Weights[wdt], rw: _Rows, st: _Stream, i: Int):
    """Streaming path, one expert (the i-th streaming one) whole on one core: its gate_up tasks, its SwiGLU outputs
    quantized (int8: and packed in the lanes), then its down tasks. Taken in decode (every streaming expert at most
    SMALL_ROWS rows, so each costs its weight bytes, and at least EXPERT_TASKS_PER_CORE of them a core, so whole
    experts balance the cores): one parallel pass a call instead of two with the quantization between them, and no
    core waits for the other between gate_up and down. `small`'s routed experts at decode, Q8_0 / bf16: 1.10x /
    1.06x (docs/perf-notes.md, "One task per expert at decode")."""
    for tile in range(st.gu_tiles):
        _stream_gate_up[wdt](rt, wt, rw, st, i * st.gu_tiles + tile)
    if st.int8:
        var e = st.sp[unsafe_offset=i]
        var r0 = Int(rt.offp[unsafe_offset=e])
        var n = Int(rt.offp[unsafe_offset=e + 1]) - r0
        for r in range(r0, r0 + n):
            _quantize_act_row(rt, rw, st, r)
        var slot = st.lane_slot[unsafe_offset=e]
        if slot >= 0:
            _pack_expert_lanes(rt, st.aq, st.as_, st.a_lanes, e, slot)
    for tile in range(st.dn_tiles):
        _stream_down[wdt](rt, wt, rw, st, i * st.dn_tiles + tile)


@always_inline
def _dot_pack_x(
    rt: _Routing, rw: _Rows, dt_: _Dot, blk: Int,
):
    """bf16-dot path: rounds block `blk` of an expert's rows of x to bf16 pairs, [K/2][MB]."""
    var H = rt.H
    var k = rt.k
    var offp = rt.offp
    var slotp = rt.slotp
    var xp = rw.xp
    var xkp = dt_.xkp
    var dp = dt_.dp
    var dbp = dt_.dbp
    var bep = dt_.bep
    var H2 = dt_.H2
    var e = dp[unsafe_offset=bep[unsafe_offset=blk]]
    var r_first = Int(offp[unsafe_offset=e]) + (blk - dbp[unsafe_offset=bep[unsafe_offset=blk]]) * MB
    var r_end = Int(offp[unsafe_offset=e + 1])
    var dst = xkp.unsafe_offset(blk * H2 * MB)
    var n_real = min(MB, r_end - r_first)
    for m in range(n_real, (n_real + W - 1) // W * W):  # padding rows of the last vector read
        for p in range(H2):
            dst[unsafe_offset=p * MB + m] = 0
    for m in range(n_real):
        var src = xp.unsafe_offset((Int(slotp[unsafe_offset=r_first + m]) // k) * H)
        var p = 0
        while p + W <= H2:
            var pairs = adjacent_bf16_pairs[W](src.unsafe_load[width=2 * W](2 * p))
            comptime for l in range(W):
                dst[unsafe_offset=(p + l) * MB + m] = pairs[l]
            p += W
        while p < H2:
            dst[unsafe_offset=p * MB + m] = adjacent_bf16_pairs[1](src.unsafe_load[width=2](2 * p))
            p += 1


@always_inline
def _pair_rows[wdt: DType](K: Int) -> Int:
    """A weight row of K on the bf16-dot GEMM, in the units its row offsets count: Q8_0 bytes, or bf16 pairs."""
    return q8_row_bytes(K) if wdt == DType.uint8 else K // 2


@always_inline
def _expert_panel[wdt: DType](
    w: Pointer[mut=True, Scalar[wdt], MutUntrackedOrigin], offsets: Pointer[Int, _], groups: Int,
    xk: Pointer[mut=True, Int32, MutUntrackedOrigin], n: Int, K2: Int, c: Pointer[mut=True, Float32, _],
):
    """c = groups x MR rows of one expert's weight (w: the expert's first row; offsets: `_pair_rows` units) . its n
    packed activation rows, over K2 pairs: microkernels.dot_panel on bf16 weights, q8_dot_panel on Q8_0 weights."""
    comptime if wdt == DType.uint8:
        q8_dot_panel(w.unsafe_bitcast[UInt8](), offsets, groups, xk, n, K2, c)
    else:
        dot_panel(w.unsafe_bitcast[Int32](), offsets, groups, xk, n, K2, c)


@always_inline
def _dot_gate_up[wdt: DType](
    rt: _Routing, wt: _Weights[wdt], rw: _Rows, dt_: _Dot, task: Int,
):
    """bf16-dot path, gate_up task: GROUPS micro-tiles of gate/up rows; SwiGLU in the
    epilogue writes the down GEMM's packed bf16 input."""
    var unit = _pair_rows[wdt](rt.H)
    var I = rt.I
    var offp = rt.offp
    var gu_es = wt.gu_es
    var xkp = dt_.xkp
    var akp = dt_.akp
    var dp = dt_.dp
    var dbp = dt_.dbp
    var H2 = dt_.H2
    var I2 = dt_.I2
    var gu_tasks = dt_.gu_tasks
    var d = task // gu_tasks
    var e = dp[unsafe_offset=d]
    var n = Int(offp[unsafe_offset=e + 1]) - Int(offp[unsafe_offset=e])
    var blocks = n_blocks(n)
    var o_first = (task % gu_tasks) * GU_ROWS * GROUPS
    var groups = min(GROUPS, (I - o_first + GU_ROWS - 1) // GU_ROWS)
    var offsets = List[Int](length=groups * MR, fill=0)
    for g in range(groups):
        for i in range(GU_ROWS):  # rows past I alias the last one; never stored
            var o = min(o_first + g * GU_ROWS + i, I - 1)
            offsets[g * MR + i] = o * unit
            offsets[g * MR + GU_ROWS + i] = (I + o) * unit
    var c = List[Float32](unsafe_uninit_length=groups * blocks * MR * MB)  # the first K slice stores, never loads
    var cp = c.unsafe_ptr()
    var blk0 = dbp[unsafe_offset=d]
    _expert_panel[wdt](wt.gup.unsafe_offset(e * gu_es), offsets.unsafe_ptr(), groups,
                       xkp.unsafe_offset(blk0 * H2 * MB), n, H2, cp)
    for g in range(groups):
        for b in range(blocks):
            var nv = n_vec(n, b)
            var cb = cp.unsafe_offset((g * blocks + b) * MR * MB)
            var dst = akp.unsafe_offset((blk0 + b) * I2 * MB)
            comptime for q in range(GU_ROWS // 2):  # outputs o, o + 1 -> one bf16 pair
                var o = o_first + g * GU_ROWS + 2 * q
                if o < I:
                    for j in range(nv):
                        dst.unsafe_store((o // 2) * MB + j * W, bf16_pairs(_swiglu_lanes(cb, 2 * q, j),
                                                                           _swiglu_lanes(cb, 2 * q + 1, j)))


@always_inline
def _dot_down[wdt: DType](
    rt: _Routing, wt: _Weights[wdt], rw: _Rows, dt_: _Dot, task: Int,
):
    """bf16-dot path, down task: GROUPS micro-tiles of down rows; a transposed store of y."""
    var unit = _pair_rows[wdt](rt.I)
    var H = rt.H
    var offp = rt.offp
    var dn_es = wt.dn_es
    var yp = rw.yp
    var akp = dt_.akp
    var dp = dt_.dp
    var dbp = dt_.dbp
    var I2 = dt_.I2
    var dn_tasks = dt_.dn_tasks
    var d = task // dn_tasks
    var e = dp[unsafe_offset=d]
    var r0 = Int(offp[unsafe_offset=e])
    var n = Int(offp[unsafe_offset=e + 1]) - r0
    var blocks = n_blocks(n)
    var h_first = (task % dn_tasks) * MR * GROUPS
    var groups = min(GROUPS, (H - h_first + MR - 1) // MR)
    var offsets = List[Int](length=groups * MR, fill=0)
    for i in range(groups * MR):
        offsets[i] = min(h_first + i, H - 1) * unit
    var c = List[Float32](unsafe_uninit_length=groups * blocks * MR * MB)  # the first K slice stores, never loads
    var cp = c.unsafe_ptr()
    _expert_panel[wdt](wt.dnp.unsafe_offset(e * dn_es), offsets.unsafe_ptr(), groups,
                       akp.unsafe_offset(dbp[unsafe_offset=d] * I2 * MB), n, I2, cp)
    for b in range(blocks):  # transposed store: c's lanes are rows of y, MR outputs per row at a time
        for g in range(groups):
            var cb = cp.unsafe_offset((g * blocks + b) * MR * MB)
            var h0 = h_first + g * MR
            var full = h0 + MR <= H
            for m in range(min(MB, n - b * MB)):
                var y = yp.unsafe_offset((r0 + b * MB + m) * H + h0)
                if full:
                    var v = SIMD[DType.float32, MR](0)
                    comptime for i in range(MR):
                        v[i] = cb[unsafe_offset=i * MB + m]
                    y.unsafe_store(0, v)
                else:
                    for i in range(H - h0):
                        y[unsafe_offset=i] = cb[unsafe_offset=i * MB + m]


@always_inline
def _amx_gate_up[wdt: DType](
    rt: _Routing, wt: _Weights[wdt], dt_: _Dot, task: Int,
):
    """AMX gate_up task: AMX_RB row blocks of 16 gate rows (A0) with their 16 up rows (A1); SwiGLU in the epilogue
    writes the down GEMM's packed bf16 input, a C tile row (16 tokens) per output."""
    var H = rt.H
    var I = rt.I
    var offp = rt.offp
    var d = task // dt_.gu_tasks
    var e = dt_.dp[unsafe_offset=d]
    var n = Int(offp[unsafe_offset=e + 1]) - Int(offp[unsafe_offset=e])
    var o_first = (task % dt_.gu_tasks) * AMX_RB * AMX_TILE
    var n_rb = min(AMX_RB, (I - o_first + AMX_TILE - 1) // AMX_TILE)
    var w = wt.gup.unsafe_bitcast[UInt16]().unsafe_offset(e * wt.gu_es)
    var tails = List[UInt16](unsafe_uninit_length=2 * AMX_TILE * H if o_first + n_rb * AMX_TILE > I else 0)
    var tail = untracked(tails.unsafe_ptr())
    var a = List[Int](length=2 * n_rb, fill=0)
    for rb in range(n_rb):
        var o = o_first + rb * AMX_TILE
        a[2 * rb] = amx_rows(w, o, I, H, tail)
        a[2 * rb + 1] = amx_rows(w.unsafe_offset(I * H), o, I, H, tail.unsafe_offset(AMX_TILE * H))
    var c = List[Float32](unsafe_uninit_length=amx_c_tiles(n_rb, n) + 16)  # the first K slice stores, never loads
    var cp = untracked(c.unsafe_ptr())
    cp = cp.unsafe_offset(align64(Int(cp)))
    var pack = List[Int32](unsafe_uninit_length=amx_pack_bytes(n_rb) // 4 + 16)
    var pp = untracked(pack.unsafe_ptr())
    var blk0 = dt_.dbp[unsafe_offset=d]
    amx_configure()
    amx_panel(a.unsafe_ptr(), H * 2, n_rb, dt_.xkp.unsafe_offset(blk0 * dt_.H2 * MB), n, H, cp,
              pp.unsafe_offset(align64(Int(pp))).unsafe_bitcast[UInt8]())
    amx_release()
    for rb in range(n_rb):
        for t in range((n + AMX_TILE - 1) // AMX_TILE):
            var g = cp.unsafe_offset(amx_c_tile(n, rb, t, 0))
            var u = cp.unsafe_offset(amx_c_tile(n, rb, t, 1))
            var dst = dt_.akp.unsafe_offset((blk0 + t // 3) * dt_.I2 * MB + (t % 3) * AMX_TILE)
            for i in range(0, AMX_TILE, 2):  # outputs o, o + 1 -> one bf16 pair for 16 tokens
                var o = o_first + rb * AMX_TILE + i
                if o < I:
                    var lo = silu[W](g.unsafe_load[width=W](i * W)) * u.unsafe_load[width=W](i * W)
                    var hi = silu[W](g.unsafe_load[width=W]((i + 1) * W)) * u.unsafe_load[width=W]((i + 1) * W)
                    dst.unsafe_store((o // 2) * MB, bf16_pairs(lo, hi))
    _ = tails^
    _ = a^
    _ = c^
    _ = pack^


@always_inline
def _amx_down[wdt: DType](
    rt: _Routing, wt: _Weights[wdt], rw: _Rows, dt_: _Dot, task: Int,
):
    """AMX down task: AMX_RB row blocks of 32 down rows; a transposed store of y."""
    var H = rt.H
    var I = rt.I
    var offp = rt.offp
    var d = task // dt_.dn_tasks
    var e = dt_.dp[unsafe_offset=d]
    var r0 = Int(offp[unsafe_offset=e])
    var n = Int(offp[unsafe_offset=e + 1]) - r0
    var h_first = (task % dt_.dn_tasks) * AMX_RB * 2 * AMX_TILE
    var n_rb = min(AMX_RB, (H - h_first + 2 * AMX_TILE - 1) // (2 * AMX_TILE))
    var w = wt.dnp.unsafe_bitcast[UInt16]().unsafe_offset(e * wt.dn_es)
    var tails = List[UInt16](unsafe_uninit_length=2 * AMX_TILE * I if h_first + n_rb * 2 * AMX_TILE > H else 0)
    var tail = untracked(tails.unsafe_ptr())
    var a = List[Int](length=2 * n_rb, fill=0)
    for rb in range(n_rb):
        var h0 = h_first + rb * 2 * AMX_TILE
        a[2 * rb] = amx_rows(w, h0, H, I, tail)
        a[2 * rb + 1] = amx_rows(w, h0 + AMX_TILE, H, I, tail.unsafe_offset(AMX_TILE * I))
    var c = List[Float32](unsafe_uninit_length=amx_c_tiles(n_rb, n) + 16)  # the first K slice stores, never loads
    var cp = untracked(c.unsafe_ptr())
    cp = cp.unsafe_offset(align64(Int(cp)))
    var pack = List[Int32](unsafe_uninit_length=amx_pack_bytes(n_rb) // 4 + 16)
    var pp = untracked(pack.unsafe_ptr())
    amx_configure()
    amx_panel(a.unsafe_ptr(), I * 2, n_rb, dt_.akp.unsafe_offset(dt_.dbp[unsafe_offset=d] * dt_.I2 * MB), n, I, cp,
              pp.unsafe_offset(align64(Int(pp))).unsafe_bitcast[UInt8]())
    amx_release()
    for rb in range(n_rb):
        var h0 = h_first + rb * 2 * AMX_TILE
        for t in range((n + AMX_TILE - 1) // AMX_TILE):
            comptime for half in range(2):
                var v = amx_tile_by_token(cp, n, rb, t, half)
                var col = h0 + half * AMX_TILE
                for j in range(min(AMX_TILE, n - t * AMX_TILE)):
                    var y = rw.yp.unsafe_offset((r0 + t * AMX_TILE + j) * H)
                    if col + AMX_TILE <= H:
                        y.unsafe_store(col, v[j])
                    else:
                        for i in range(max(0, H - col)):
                            y[unsafe_offset=col + i] = v[j][i]
    _ = tails^
    _ = a^
    _ = c^
    _ = pack^


@always_inline
def _matmul_expert[wdt: DType](
    rt: _Routing, wt: _Weights[wdt], rw: _Rows, mm: _Matmul, num_threads: Int, i: Int,
) raises:
    """Matmul path: expert number i of the by-rows order through MAX's matmul on
    `num_threads` threads (-1: all)."""
    var H = rt.H
    var I = rt.I
    var offp = rt.offp
    var gu_es = wt.gu_es
    var dn_es = wt.dn_es
    var rp = rw.rp
    var ap = rw.ap
    var yp = rw.yp
    var mmp = mm.mmp
    var gp = mm.gp
    var gu_f32 = mm.gu_f32
    var dn_f32 = mm.dn_f32
    var e = mmp[unsafe_offset=i]
    var r0 = Int(offp[unsafe_offset=e])
    var n = Int(offp[unsafe_offset=e + 1]) - r0
    _swiglu_ffn(rp.unsafe_offset(r0 * H), n, H, I, gu_f32.unsafe_offset(e * gu_es), dn_f32.unsafe_offset(e * dn_es),
                gp.unsafe_offset(r0 * 2 * I), ap.unsafe_offset(r0 * I), yp.unsafe_offset(r0 * H), num_threads)


@fieldwise_init
struct _Dequant(ImplicitlyCopyable, Movable):
    """The DEQUANT experts (Q8_0 weights, many rows) and their tasks per expert: gate_up and down row chunks."""
    var qp: Pointer[mut=True, Int, MutUntrackedOrigin]
    var gu_tiles: Int
    var dn_tiles: Int


def _dequant_gate_up[wdt: DType](rt: _Routing, wt: _Weights[wdt], rw: _Rows, dq: _Dequant, task: Int) raises:
    """DEQUANT, gate_up task: DEQUANT_ROWS gate rows and their up rows of one expert, dequantized (exact) into one
    float32 [2 nc, H] scratch, times the expert's gathered rows through MAX's matmul on this core; SwiGLU into the
    activations' columns of those gate rows."""
    var H = rt.H
    var I = rt.I
    var e = dq.qp[unsafe_offset=task // dq.gu_tiles]
    var r0 = Int(rt.offp[unsafe_offset=e])
    var n = Int(rt.offp[unsafe_offset=e + 1]) - r0
    var o0 = (task % dq.gu_tiles) * DEQUANT_ROWS
    var nc = min(DEQUANT_ROWS, I - o0)
    var rb = q8_row_bytes(H)
    var w = wt.gup.unsafe_bitcast[UInt8]().unsafe_offset(e * wt.gu_es)
    var ws = List[Float32](unsafe_uninit_length=2 * nc * H)  # gate rows o0 .., then their up rows
    var cs = List[Float32](unsafe_uninit_length=n * 2 * nc)  # [n, 2 nc]: x . gate rows, then x . up rows
    var wf = untracked(ws.unsafe_ptr())
    var cf = untracked(cs.unsafe_ptr())
    for i in range(nc):
        q8_dequantize_row(w.unsafe_offset((o0 + i) * rb), wf.unsafe_offset(i * H), H)
        q8_dequantize_row(w.unsafe_offset((I + o0 + i) * rb), wf.unsafe_offset((nc + i) * H), H)
    cpu_matmul[transpose_b=True](TileTensor(cf, row_major(n, 2 * nc)), TileTensor(rw.rp.unsafe_offset(r0 * H),
                                 row_major(n, H)), TileTensor(wf, row_major(2 * nc, H)), 0, num_threads=1)
    for r in range(n):
        var c = cf.unsafe_offset(r * 2 * nc)
        swiglu_row(rw.ap.unsafe_offset((r0 + r) * I + o0), c, c.unsafe_offset(nc), nc)
    _ = ws^
    _ = cs^


def _dequant_down[wdt: DType](rt: _Routing, wt: _Weights[wdt], rw: _Rows, dq: _Dequant, task: Int) raises:
    """DEQUANT, down task: DEQUANT_ROWS down rows of one expert dequantized into float32, times its activations
    through MAX's matmul on this core; those columns of the expert's output rows."""
    var H = rt.H
    var I = rt.I
    var e = dq.qp[unsafe_offset=task // dq.dn_tiles]
    var r0 = Int(rt.offp[unsafe_offset=e])
    var n = Int(rt.offp[unsafe_offset=e + 1]) - r0
    var h0 = (task % dq.dn_tiles) * DEQUANT_ROWS
    var nc = min(DEQUANT_ROWS, H - h0)
    var rb = q8_row_bytes(I)
    var w = wt.dnp.unsafe_bitcast[UInt8]().unsafe_offset(e * wt.dn_es)
    var ws = List[Float32](unsafe_uninit_length=nc * I)
    var cs = List[Float32](unsafe_uninit_length=n * nc)  # [n, nc]
    var wf = untracked(ws.unsafe_ptr())
    var cf = untracked(cs.unsafe_ptr())
    for i in range(nc):
        q8_dequantize_row(w.unsafe_offset((h0 + i) * rb), wf.unsafe_offset(i * I), I)
    cpu_matmul[transpose_b=True](TileTensor(cf, row_major(n, nc)), TileTensor(rw.ap.unsafe_offset(r0 * I),
                                 row_major(n, I)), TileTensor(wf, row_major(nc, I)), 0, num_threads=1)
    for r in range(n):
        var dst = rw.yp.unsafe_offset((r0 + r) * H + h0)
        for i in range(nc):
            dst[unsafe_offset=i] = cf[unsafe_offset=r * nc + i]
    _ = ws^
    _ = cs^


@always_inline
def _combine_token(
    rt: _Routing, rw: _Rows, trp: Pointer[mut=True, Int, MutUntrackedOrigin], t: Int,
):
    """Combine: out[t] = sum of w * y over t's rows in ascending row = expert order."""
    var H = rt.H
    var k = rt.k
    var slotp = rt.slotp
    var wp = rt.wp
    var yp = rw.yp
    var op = rw.op
    var dst = op.unsafe_offset(t * H)
    for h in range(H):
        dst[unsafe_offset=h] = 0
    for j in range(k):
        var row = trp[unsafe_offset=t * k + j]
        var weight = wp[unsafe_offset=Int(slotp[unsafe_offset=row])]
        var src = yp.unsafe_offset(row * H)
        var h = 0
        while h + W <= H:
            dst.unsafe_store(h, dst.unsafe_load[width=W](h) + weight * src.unsafe_load[width=W](h))
            h += W
        while h < H:
            dst[unsafe_offset=h] = dst[unsafe_offset=h] + weight * src[unsafe_offset=h]
            h += 1


@extensibility.register("moe_experts")
struct MoeExperts:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[dtype = DType.float32, rank=2, ...],
        x: InputTensor[dtype = DType.float32, rank=2, ...],
        topk_weights: InputTensor[dtype = DType.float32, rank=2, ...],
        expert_offsets: InputTensor[dtype = DType.int32, rank=1, ...],
        sorted_slots: InputTensor[dtype = DType.int32, rank=1, ...],
        gate_up: InputTensor[rank=3, ...],
        down: InputTensor[dtype = gate_up.dtype, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        comptime assert target == "cpu", "moe_experts: CPU-only kernel"
        comptime wdt = gate_up.dtype
        comptime assert wdt == DType.float32 or wdt == DType.bfloat16 or wdt == DType.uint8, (
            "moe_experts: float32, bfloat16 or Q8_0 (uint8) weights")
        comptime Q8 = wdt == DType.uint8
        var T = x.dim_size(0)
        var H = x.dim_size(1)
        var k = topk_weights.dim_size(1)
        var E = gate_up.dim_size(0)
        var I = down.dim_size(2) // Q8_BLOCK_BYTES * Q8_BLOCK if Q8 else down.dim_size(2)
        if Q8 and (H % Q8_BLOCK != 0 or down.dim_size(2) % Q8_BLOCK_BYTES != 0):
            raise Error("moe_experts: Q8_0 weights need H and I multiples of ", Q8_BLOCK, "; got H ", H,
                        " and down rows of ", down.dim_size(2), " bytes")
        var h_len = _row_len[wdt](H)  # a gate_up row, in elements of wdt
        var i_len = _row_len[wdt](I)  # a down row
        if (gate_up.dim_size(1) != 2 * I or gate_up.dim_size(2) != h_len or down.dim_size(0) != E
                or down.dim_size(1) != H):
            raise Error("moe_experts: weights must be gate_up [E, 2I, H] and down [E, H, I] (Q8_0: the last dim in ",
                        "bytes, K / 32 * 34)")
        if expert_offsets.dim_size(0) != E + 1 or sorted_slots.dim_size(0) != T * k or topk_weights.dim_size(0) != T:
            raise Error("moe_experts: routing shapes do not match T=", T, " k=", k, " E=", E)
        if (x.stride_length(1) != 1 or x.stride_length(0) != H or output.stride_length(0) != H
                or gate_up.stride_length(2) != 1 or gate_up.stride_length(1) != h_len
                or down.stride_length(2) != 1 or down.stride_length(1) != i_len or topk_weights.stride_length(0) != k):
            raise Error("moe_experts: expected contiguous tensors")
        var op = output.unsafe_ptr()
        if T == 0:
            return
        var xp = x.unsafe_ptr()
        var wp = topk_weights.unsafe_ptr()
        var offp = expert_offsets.unsafe_ptr()
        var slotp = sorted_slots.unsafe_ptr()
        var gup = gate_up.unsafe_ptr()
        var dnp = down.unsafe_ptr()
        var gu_es = gate_up.stride_length(0)
        var dn_es = down.stride_length(0)
        if Int(offp[unsafe_offset=0]) != 0 or Int(offp[unsafe_offset=E]) != T * k:
            raise Error("moe_experts: expert_offsets must run from 0 to T * k")
        for e in range(E):
            if offp[unsafe_offset=e + 1] < offp[unsafe_offset=e]:
                raise Error("moe_experts: expert_offsets must be non-decreasing")
        for r in range(T * k):
            var s = Int(slotp[unsafe_offset=r])
            if s < 0 or s >= T * k:
                raise Error("moe_experts: slot out of range: ", s)

        # Each expert's path (see the header): STREAM, MATMUL (float32), DOT (the bf16-dot GEMM) or DEQUANT (Q8_0).
        var dot = wdt != DType.float32 and H > 0 and I > 0 and H % 2 == 0 and I % 2 == 0 and use_bf16_dot()
        var path = List[Int](length=E, fill=0)
        var small = List[Int]()  # streaming experts
        var dots = List[Int]()  # bf16-dot experts
        var dequants = List[Int]()  # DEQUANT experts
        var dot_blk0 = List[Int]()  # their first packed block
        var n_blk = 0
        var dot_rows = 0
        var small_max_rows = 0  # the most rows of a streaming expert
        var q8_stream_max = Q8_LANES_MAX_ROWS if Q8 and use_vnni() else Q8_STREAM_MAX_ROWS
        for e in range(E):
            var n = Int(offp[unsafe_offset=e + 1]) - Int(offp[unsafe_offset=e])
            if n == 0:
                continue
            if Q8 and n > q8_stream_max and not dot:
                path[e] = DEQUANT
                dequants.append(e)
            elif n <= (q8_stream_max if Q8 else SMALL_ROWS) or (wdt != DType.float32 and not dot):
                path[e] = STREAM
                small.append(e)
                small_max_rows = max(small_max_rows, n)
            elif wdt == DType.float32:
                path[e] = MATMUL
            else:
                path[e] = DOT
                dots.append(e)
                dot_blk0.append(n_blk)
                dot_rows += n
                n_blk += n_blocks(n)
        var pathp = path.unsafe_ptr()
        var row_expert = List[Int](length=T * k, fill=0)
        for e in range(E):
            for r in range(Int(offp[unsafe_offset=e]), Int(offp[unsafe_offset=e + 1])):
                row_expert[r] = e
        var rep = row_expert.unsafe_ptr()

        # Gathered float32 activation rows in grouped order (row r is token slots[r] // k), for the streaming
        # and matmul experts; the bf16-dot experts pack theirs straight from x.
        var f32_rows = T * k if dot_rows < T * k else 0  # no float32 copies when every expert is DOT
        var rows = List[Float32](unsafe_uninit_length=f32_rows * H)
        var rp = rows.unsafe_ptr()
        var act = List[Float32](unsafe_uninit_length=f32_rows * I)  # SwiGLU activations per grouped row
        var ys = List[Float32](unsafe_uninit_length=T * k * H)  # expert outputs per grouped row, all written
        var ap = act.unsafe_ptr()
        var yp = ys.unsafe_ptr()
        var rt = _Routing(H, I, k, untracked(offp), untracked(slotp), untracked(wp), untracked(pathp),
                          untracked(rep))
        var wt = _Weights[wdt](untracked(gup), untracked(dnp), gu_es, dn_es)
        var rw = _Rows(untracked(xp), untracked(rp), untracked(ap), untracked(yp), untracked(op))

        def gather(r: Int) {var rt, var rw}:
            _gather_row(rt, rw, r)

        parallelize_sized(gather, T * k, T * k * H * 8)  # reads x's rows, writes float32 copies

        # Streaming path: tasks over (expert, tile of weight rows), stream_rows_per_pass weight rows per pass over the
        # expert's rows in groups of SMALL_ROWS (the weight rows stay in L1 meanwhile).
        var n_small = len(small)
        var sp = small.unsafe_ptr()
        var gu_row_bytes = 2 * h_len * size_of[wdt]()  # a gate row with its up row
        var dn_row_bytes = i_len * size_of[wdt]()
        comptime NW = stream_rows_per_pass[wdt]()
        var gu_rows = _stream_rows_per_task(gu_row_bytes, NW)  # gate rows (each with its up row) per task
        var dn_rows = _stream_rows_per_task(dn_row_bytes, NW)
        var gu_tiles = (I + gu_rows - 1) // gu_rows
        var dn_tiles = (H + dn_rows - 1) // dn_rows
        # Q8_0 on AVX512_VNNI: the streaming experts' rows, and then their activations, quantized to int8 blocks.
        var int8 = Q8 and n_small > 0 and use_vnni()
        var xq_buf = List[UInt8](unsafe_uninit_length=T * k * H if int8 else 0)
        var xs_buf = List[Float32](unsafe_uninit_length=T * k * q8_activation_scales(H) if int8 else 0)
        var aq_buf = List[UInt8](unsafe_uninit_length=T * k * I if int8 else 0)
        var as_buf = List[Float32](unsafe_uninit_length=T * k * q8_activation_scales(I) if int8 else 0)
        # bf16 weights on AVX512_BF16: the same rows, and then their activations, rounded to bf16 for vdpbf16ps.
        var pairs = wdt == DType.bfloat16 and n_small > 0 and dot
        var xb_buf = List[UInt16](unsafe_uninit_length=T * k * H if pairs else 0)
        var ab_buf = List[UInt16](unsafe_uninit_length=T * k * I if pairs else 0)
        # int8 experts of Q8_LANES_MIN_M rows or more: their rows, then their activations, in the vector lanes.
        var lane_slot = List[Int](length=E, fill=-1)  # an expert's first slot (one per group of W rows)
        var lane_experts = List[Int]()
        var n_lanes = 0  # slots
        if int8:
            for i in range(n_small):
                var e = small[i]
                var n = Int(offp[unsafe_offset=e + 1]) - Int(offp[unsafe_offset=e])
                if n >= Q8_LANES_MIN_M:
                    lane_slot[e] = n_lanes
                    lane_experts.append(e)
                    n_lanes += q8_lane_groups(n)
        var xl_buf = List[Int32](unsafe_uninit_length=Q8LaneSlots.ints(H, n_lanes))
        var xls_buf = List[Float32](unsafe_uninit_length=Q8LaneSlots.blocks(H, n_lanes))
        var xlc_buf = List[Int32](unsafe_uninit_length=Q8LaneSlots.blocks(H, n_lanes))
        var al_buf = List[Int32](unsafe_uninit_length=Q8LaneSlots.ints(I, n_lanes))
        var als_buf = List[Float32](unsafe_uninit_length=Q8LaneSlots.blocks(I, n_lanes))
        var alc_buf = List[Int32](unsafe_uninit_length=Q8LaneSlots.blocks(I, n_lanes))
        var lep = untracked(lane_experts.unsafe_ptr())
        var st = _Stream(untracked(sp), gu_rows, gu_tiles, dn_rows, dn_tiles, int8, untracked(xq_buf.unsafe_ptr()),
                         untracked(xs_buf.unsafe_ptr()), untracked(aq_buf.unsafe_ptr()), untracked(as_buf.unsafe_ptr()),
                         pairs, untracked(xb_buf.unsafe_ptr()), untracked(ab_buf.unsafe_ptr()),
                         untracked(lane_slot.unsafe_ptr()),
                         Q8LaneSlots(untracked(xl_buf.unsafe_ptr()), untracked(xls_buf.unsafe_ptr()),
                                     untracked(xlc_buf.unsafe_ptr()), H),
                         Q8LaneSlots(untracked(al_buf.unsafe_ptr()), untracked(als_buf.unsafe_ptr()),
                                     untracked(alc_buf.unsafe_ptr()), I))

        def gate_up_task(task: Int) {var rt, var wt, var rw, var st}:
            _stream_gate_up[wdt](rt, wt, rw, st, task)

        def down_task(task: Int) {var rt, var wt, var rw, var st}:
            _stream_down[wdt](rt, wt, rw, st, task)

        def expert_task(i: Int) {var rt, var wt, var rw, var st}:
            _stream_expert[wdt](rt, wt, rw, st, i)

        def quantize_x(r: Int) {var rt, var rw, var st}:
            if rt.pathp[unsafe_offset=rt.rep[unsafe_offset=r]] == STREAM:
                q8_quantize_activations(rw.rp.unsafe_offset(r * rt.H), rt.H, st.xq.unsafe_offset(r * rt.H),
                                        st.xs.unsafe_offset(r * q8_activation_scales(rt.H)))

        def round_x(r: Int) {var rt, var rw, var st}:
            if rt.pathp[unsafe_offset=rt.rep[unsafe_offset=r]] == STREAM:
                var xb = st.xb.unsafe_offset(r * rt.H).unsafe_bitcast[BFloat16]()
                narrow_row(xb, rw.rp.unsafe_offset(r * rt.H), rt.H)

        def quantize_act(r: Int) {var rt, var rw, var st}:
            if rt.pathp[unsafe_offset=rt.rep[unsafe_offset=r]] == STREAM:
                _quantize_act_row(rt, rw, st, r)

        def pack_x_lanes(i: Int) {var rt, var st, var lep}:
            var e = lep[unsafe_offset=i]
            _pack_expert_lanes(rt, st.xq, st.xs, st.x_lanes, e, st.lane_slot[unsafe_offset=e])

        def pack_act_lanes(i: Int) {var rt, var st, var lep}:
            var e = lep[unsafe_offset=i]
            _pack_expert_lanes(rt, st.aq, st.as_, st.a_lanes, e, st.lane_slot[unsafe_offset=e])

        if n_small > 0:
            if int8:  # float32 rows in, int8 rows out (their scales aside)
                parallelize_sized(quantize_x, T * k, T * k * H * 5)
                parallelize_sized(pack_x_lanes, len(lane_experts), n_lanes * W * H * 2)
            if pairs:  # float32 rows in, bf16 rows out
                parallelize_sized(round_x, T * k, T * k * H * 6)
            var expert_bytes = n_small * (I * gu_row_bytes + H * dn_row_bytes)  # the experts' weights
            if n_small >= EXPERT_TASKS_PER_CORE * parallelism_level() and small_max_rows <= SMALL_ROWS:
                parallelize_dynamic(expert_task, n_small, expert_bytes)
            else:
                parallelize_dynamic(gate_up_task, n_small * gu_tiles, n_small * I * gu_row_bytes)
                if int8:
                    parallelize_sized(quantize_act, T * k, T * k * I * 5)
                    parallelize_sized(pack_act_lanes, len(lane_experts), n_lanes * W * I * 2)
                parallelize_dynamic(down_task, n_small * dn_tiles, n_small * H * dn_row_bytes)

        # bf16-dot path (bfloat16 or Q8_0 weights, CPU with AVX512_BF16): activations rounded to bf16 and packed in
        # blocks of MB rows, [block][K/2][MB] bf16 pairs; bf16 weights read in place as bf16 pairs, Q8_0 ones
        # widened a K slice at a time (microkernels.q8_dot_panel).
        var n_dots = len(dots)
        if n_dots > 0:
            var H2 = H // 2
            var I2 = I // 2
            var blk_expert = List[Int](length=n_blk, fill=0)  # block -> index into dots
            for d in range(n_dots):
                for b in range(n_blocks(Int(offp[unsafe_offset=dots[d] + 1]) - Int(offp[unsafe_offset=dots[d]]))):
                    blk_expert[dot_blk0[d] + b] = d
            var xpk = List[Int32](unsafe_uninit_length=n_blk * H2 * MB + 16)  # pack_x writes every row read
            var apk = List[Int32](unsafe_uninit_length=n_blk * I2 * MB + 16)  # every pair read is written first
            var xkp = xpk.unsafe_ptr()
            xkp = xkp.unsafe_offset(align64(Int(xkp)))
            var akp = apk.unsafe_ptr()
            akp = akp.unsafe_offset(align64(Int(akp)))
            var dp = dots.unsafe_ptr()
            var dbp = dot_blk0.unsafe_ptr()
            var bep = blk_expert.unsafe_ptr()
            var amx = not Q8 and amx_k_ok(H) and amx_k_ok(I) and use_amx()  # AMX: bf16 weights only
            var gu_cols = AMX_RB * AMX_TILE if amx else GU_ROWS * GROUPS  # gate rows per task
            var dn_cols = AMX_RB * 2 * AMX_TILE if amx else MR * GROUPS  # down rows per task
            var gu_tasks = (I + gu_cols - 1) // gu_cols
            var dn_tasks = (H + dn_cols - 1) // dn_cols
            var dt_ = _Dot(untracked(xkp), untracked(akp), untracked(dp), untracked(dbp), untracked(bep), H2, I2,
                           gu_tasks, dn_tasks, amx)

            def pack_x(blk: Int) {var rt, var rw, var dt_}:
                _dot_pack_x(rt, rw, dt_, blk)

            parallelize_dynamic(pack_x, n_blk)

            def gate_up_dot(task: Int) {var rt, var wt, var rw, var dt_}:
                if dt_.amx:
                    _amx_gate_up[wdt](rt, wt, dt_, task)
                else:
                    _dot_gate_up[wdt](rt, wt, rw, dt_, task)

            def down_dot(task: Int) {var rt, var wt, var rw, var dt_}:
                if dt_.amx:
                    _amx_down[wdt](rt, wt, rw, dt_, task)
                else:
                    _dot_down[wdt](rt, wt, rw, dt_, task)

            parallelize_dynamic(gate_up_dot, n_dots * gu_tasks)
            parallelize_dynamic(down_dot, n_dots * dn_tasks)
            # The structs hold untracked pointers into these Lists: they must live until the passes have run.
            _ = blk_expert^
            _ = xpk^
            _ = apk^

        # Matmul path (float32 weights): most rows first, each expert on one core when that balances (see the
        # header), else one expert at a time on all cores.
        comptime if wdt == DType.float32:
            var by_rows = List[Int]()  # sort key: (rows, descending) then the expert
            var mm_rows = 0
            for e in range(E):
                if path[e] == MATMUL:
                    var n = Int(offp[unsafe_offset=e + 1]) - Int(offp[unsafe_offset=e])
                    by_rows.append((T * k - n) * E + e)
                    mm_rows += n
            sort_codes_by_cost(by_rows, E)
            var workers = parallelism_level()
            var load = List[Int](length=workers, fill=0)  # greedy list schedule: what the work queue does
            for i in range(len(by_rows)):
                var e = by_rows[i]
                var least = 0
                for w in range(1, workers):
                    if load[w] < load[least]:
                        least = w
                load[least] += Int(offp[unsafe_offset=e + 1]) - Int(offp[unsafe_offset=e])
            var makespan = 0
            for w in range(workers):
                makespan = max(makespan, load[w])
            var g_buf = List[Float32](unsafe_uninit_length=T * k * 2 * I)  # gate_up outputs per grouped row
            var gp = g_buf.unsafe_ptr()
            var mmp = by_rows.unsafe_ptr()
            var gu_f32 = gup.unsafe_bitcast[Float32]()  # wdt is float32 here
            var dn_f32 = dnp.unsafe_bitcast[Float32]()
            var mm = _Matmul(untracked(mmp), untracked(gp), untracked(gu_f32), untracked(dn_f32))

            def matmul_expert_one_core(i: Int) {var rt, var wt, var rw, var mm}:
                try:
                    _matmul_expert[wdt](rt, wt, rw, mm, 1, i)
                except err:
                    abort(String("moe_experts: ", err))  # a raise cannot leave a parallel loop

            if makespan * workers * 10 <= mm_rows * 11:
                parallelize_dynamic(matmul_expert_one_core, len(by_rows))
            else:
                for i in range(len(by_rows)):
                    _matmul_expert[wdt](rt, wt, rw, mm, -1, i)
            _ = by_rows^  # `mm` holds untracked pointers into both
            _ = g_buf^

        # DEQUANT path (Q8_0 weights, many rows): tasks over (expert, DEQUANT_ROWS weight rows), each dequantizing
        # its rows once into float32 and running MAX's matmul on its core.
        var n_dequants = len(dequants)
        if n_dequants > 0:
            var dq = _Dequant(untracked(dequants.unsafe_ptr()), (I + DEQUANT_ROWS - 1) // DEQUANT_ROWS,
                              (H + DEQUANT_ROWS - 1) // DEQUANT_ROWS)

            def gate_up_dequant(task: Int) {var rt, var wt, var rw, var dq}:
                try:
                    _dequant_gate_up[wdt](rt, wt, rw, dq, task)
                except err:
                    abort(String("moe_experts: ", err))  # a raise cannot leave a parallel loop

            def down_dequant(task: Int) {var rt, var wt, var rw, var dq}:
                try:
                    _dequant_down[wdt](rt, wt, rw, dq, task)
                except err:
                    abort(String("moe_experts: ", err))

            parallelize_dynamic(gate_up_dequant, n_dequants * dq.gu_tiles)
            parallelize_dynamic(down_dequant, n_dequants * dq.dn_tiles)

        # Combine: out[t] += w * y over t's rows in ascending row = ascending expert order (deterministic).
        var token_rows = List[Int](length=T * k, fill=0)
        var filled = List[Int](length=T, fill=0)
        for r in range(T * k):
            var t = Int(slotp[unsafe_offset=r]) // k
            token_rows[t * k + filled[t]] = r
            filled[t] += 1
        var trp = untracked(token_rows.unsafe_ptr())

        def combine_token(t: Int) {var rt, var rw, var trp}:
            _combine_token(rt, rw, trp, t)

        parallelize_sized(combine_token, T, T * k * H * 4)  # reads the expert outputs
        # The structs hold untracked pointers into these Lists: they must live until every pass has run.
        _ = path^
        _ = small^
        _ = dots^
        _ = dequants^
        _ = xq_buf^
        _ = xs_buf^
        _ = aq_buf^
        _ = as_buf^
        _ = lane_slot^
        _ = lane_experts^
        _ = xl_buf^
        _ = xls_buf^
        _ = xlc_buf^
        _ = al_buf^
        _ = als_buf^
        _ = alc_buf^
        _ = dot_blk0^
        _ = row_expert^
        _ = rows^
        _ = act^
        _ = ys^
        _ = token_rows^
