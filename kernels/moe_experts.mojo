# Routed MoE experts on the CPU: for every token, sum over its k chosen experts of
# weight * down(silu(gate(x)) * up(x)); float32 activations and accumulation, float32 or bfloat16 weights. One custom op: MAX's own grouped matmul and MoE
# kernels are GPU-only, so without this MAX cannot run an MoE layer's experts sparsely on a CPU.
#
# Reference (the spec): hyv3_graph/kernels/moe_experts.py::moe_experts_reference (float64)
# Wrapper:              hyv3_graph/kernels/moe_experts.py::moe_experts
# Fuzz test:            tests/test_moe_experts.py     Bench: bench/cases/moe_experts.py (`experts` cases)
#
# Inputs: x [T, H], topk_weights [T, k], and the router's dispatch metadata (kernels/moe_router.mojo):
# expert_offsets [E + 1] and sorted_slots [T * k] (slot = t * k + j, grouped by expert, ascending t).
# Weights in HF's stacked layout, as loaded (hyv3_graph/weights.py): gate_up [E, 2I, H] (rows 0..I-1
# gate, I..2I-1 up) and down [E, H, I]; both are read row-wise (a weight row is contiguous over the
# reduction dim), which is what a dot-product micro-kernel and MAX's transpose_b matmul want.
#
# Design:
#   * An expert with few rows (<= SMALL_ROWS: decode, or a long tail of lightly used experts) is
#     memory bound: its weights are streamed exactly once, each weight row chunk feeding the FMAs of
#     all its rows (register accumulators). Gate and up rows o and I + o are in the same task, so
#     SwiGLU is fused into the gate_up pass. All such experts' (expert, row tile) tasks share one
#     parallel loop, so both cores stay busy whether one expert or all of them are active.
#   * An expert with many rows is compute bound: with float32 weights, gathered rows times its weights
#     through MAX's own CPU matmul (linalg.matmul, transpose_b, all cores), SwiGLU in between. With
#     bfloat16 weights (the real checkpoint's dtype) every expert takes the streaming path, its rows in
#     groups of 4 per weight row (the row stays in L1 across the groups); bf16 widens to float32 exactly,
#     so results match the float32 path on the same (rounded) weights. An AMX path is not written yet.
#   * Combine is deterministic, without atomics: out[t] accumulates its experts in ascending expert
#     order, whatever the thread count; the shared expert(s) stay in the graph (a dense SwiGLU).
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.math import exp
from layout import TileTensor
from layout.tile_layout import row_major
from linalg.matmul import matmul

comptime W = 16  # SIMD width
comptime SMALL_ROWS = 4  # experts with at most this many rows take the streaming path (_dots4)
comptime TILE = 16  # output rows of a weight matrix per streaming task


@always_inline
def _silu(g: Float32) -> Float32:
    return g / (1.0 + exp(-g))


@always_inline
def _dots4[wdt: DType](
    w: Pointer[Scalar[wdt], _], rows: Pointer[Float32, _], row_stride: Int, n_rows: Int, K: Int,
) -> SIMD[DType.float32, 4]:
    """Dot products of one weight row w [K] (float32, or bfloat16 widened exactly) with up to 4 activation rows:
    w is streamed once for all of them."""
    var a0 = SIMD[DType.float32, W](0)
    var a1 = SIMD[DType.float32, W](0)
    var a2 = SIMD[DType.float32, W](0)
    var a3 = SIMD[DType.float32, W](0)
    var r1 = rows.unsafe_offset(min(1, n_rows - 1) * row_stride)  # rows past n_rows alias the last real one
    var r2 = rows.unsafe_offset(min(2, n_rows - 1) * row_stride)
    var r3 = rows.unsafe_offset(min(3, n_rows - 1) * row_stride)
    var i = 0
    while i + W <= K:
        var wv = w.unsafe_load[width=W](i).cast[DType.float32]()
        a0 += wv * rows.unsafe_load[width=W](i)
        a1 += wv * r1.unsafe_load[width=W](i)
        a2 += wv * r2.unsafe_load[width=W](i)
        a3 += wv * r3.unsafe_load[width=W](i)
        i += W
    var out = SIMD[DType.float32, 4](a0.reduce_add(), a1.reduce_add(), a2.reduce_add(), a3.reduce_add())
    while i < K:
        var wv = w[unsafe_offset=i].cast[DType.float32]()
        out += wv * SIMD[DType.float32, 4](rows[unsafe_offset=i], r1[unsafe_offset=i], r2[unsafe_offset=i], r3[unsafe_offset=i])
        i += 1
    return out


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
        comptime assert wdt == DType.float32 or wdt == DType.bfloat16, "moe_experts: float32 or bfloat16 weights"
        var T = x.dim_size(0)
        var H = x.dim_size(1)
        var k = topk_weights.dim_size(1)
        var E = gate_up.dim_size(0)
        var I = down.dim_size(2)
        if gate_up.dim_size(1) != 2 * I or gate_up.dim_size(2) != H or down.dim_size(0) != E or down.dim_size(1) != H:
            raise Error("moe_experts: weights must be gate_up [E, 2I, H] and down [E, H, I]")
        if expert_offsets.dim_size(0) != E + 1 or sorted_slots.dim_size(0) != T * k or topk_weights.dim_size(0) != T:
            raise Error("moe_experts: routing shapes do not match T=", T, " k=", k, " E=", E)
        if (x.stride_length(1) != 1 or x.stride_length(0) != H or output.stride_length(0) != H
                or gate_up.stride_length(2) != 1 or gate_up.stride_length(1) != H
                or down.stride_length(2) != 1 or down.stride_length(1) != I or topk_weights.stride_length(0) != k):
            raise Error("moe_experts: expected contiguous tensors")
        var op = output.unsafe_ptr()
        for i in range(T * H):
            op[unsafe_offset=i] = 0
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

        # Gathered activation rows in grouped order: row r of expert e is token slots[r] // k.
        var rows = List[Float32](length=T * k * H, fill=0)
        var rp = rows.unsafe_ptr()

        def gather(r: Int) {var rp, var xp, var slotp, var H, var k}:
            var src = xp.unsafe_offset((Int(slotp[unsafe_offset=r]) // k) * H)
            var dst = rp.unsafe_offset(r * H)
            for h in range(H):
                dst[unsafe_offset=h] = src[unsafe_offset=h]

        parallelize(gather, T * k)

        var act = List[Float32](length=T * k * I, fill=0)  # SwiGLU activations per grouped row
        var ys = List[Float32](length=T * k * H, fill=0)  # expert outputs per grouped row
        var ap = act.unsafe_ptr()
        var yp = ys.unsafe_ptr()

        # Streaming path: tasks over (expert, tile of TILE output rows), the expert's rows in groups of 4 per
        # weight row (which stays in L1 meanwhile). float32: the small experts; bfloat16: every expert.
        var small = List[Int]()
        for e in range(E):
            var n = Int(offp[unsafe_offset=e + 1]) - Int(offp[unsafe_offset=e])
            if n > 0 and (n <= SMALL_ROWS or wdt != DType.float32):
                small.append(e)
        var n_small = len(small)
        var sp = small.unsafe_ptr()
        var gu_tiles = (I + TILE - 1) // TILE
        var dn_tiles = (H + TILE - 1) // TILE

        def gate_up_task(task: Int) {var sp, var offp, var rp, var ap, var gup, var gu_es, var H, var I, var gu_tiles}:
            var e = sp[unsafe_offset=task // gu_tiles]
            var r0 = Int(offp[unsafe_offset=e])
            var n = Int(offp[unsafe_offset=e + 1]) - r0
            var w = gup.unsafe_offset(e * gu_es)
            var o0 = (task % gu_tiles) * TILE
            for o in range(o0, min(I, o0 + TILE)):
                for g0 in range(0, n, SMALL_ROWS):
                    var gn = min(SMALL_ROWS, n - g0)
                    var g = _dots4(w.unsafe_offset(o * H), rp.unsafe_offset((r0 + g0) * H), H, gn, H)
                    var u = _dots4(w.unsafe_offset((I + o) * H), rp.unsafe_offset((r0 + g0) * H), H, gn, H)
                    for r in range(gn):
                        ap[unsafe_offset=(r0 + g0 + r) * I + o] = _silu(g[r]) * u[r]

        def down_task(task: Int) {var sp, var offp, var ap, var yp, var dnp, var dn_es, var H, var I, var dn_tiles}:
            var e = sp[unsafe_offset=task // dn_tiles]
            var r0 = Int(offp[unsafe_offset=e])
            var n = Int(offp[unsafe_offset=e + 1]) - r0
            var w = dnp.unsafe_offset(e * dn_es)
            var h0 = (task % dn_tiles) * TILE
            for h in range(h0, min(H, h0 + TILE)):
                for g0 in range(0, n, SMALL_ROWS):
                    var gn = min(SMALL_ROWS, n - g0)
                    var y = _dots4(w.unsafe_offset(h * I), ap.unsafe_offset((r0 + g0) * I), I, gn, I)
                    for r in range(gn):
                        yp[unsafe_offset=(r0 + g0 + r) * H + h] = y[r]

        if n_small > 0:
            parallelize(gate_up_task, n_small * gu_tiles)
            parallelize(down_task, n_small * dn_tiles)

        # Matmul path (float32 weights), one expert at a time (MAX's matmul uses all cores itself).
        comptime if wdt == DType.float32:
            var g_buf = List[Float32](length=T * k * 2 * I, fill=0)
            var gp = g_buf.unsafe_ptr()
            for e in range(E):
                var r0 = Int(offp[unsafe_offset=e])
                var n = Int(offp[unsafe_offset=e + 1]) - r0
                if n <= SMALL_ROWS:
                    continue
                matmul[transpose_b=True](
                    TileTensor(gp, row_major(n, 2 * I)),
                    TileTensor(rp.unsafe_offset(r0 * H), row_major(n, H)),
                    TileTensor(gup.unsafe_offset(e * gu_es), row_major(2 * I, H)),
                )

                def swiglu_row(r: Int) {var gp, var ap, var I, var r0}:
                    for o in range(I):
                        ap[unsafe_offset=(r0 + r) * I + o] = _silu(gp[unsafe_offset=r * 2 * I + o]) * gp[unsafe_offset=r * 2 * I + I + o]

                parallelize(swiglu_row, n)
                matmul[transpose_b=True](
                    TileTensor(yp.unsafe_offset(r0 * H), row_major(n, H)),
                    TileTensor(ap.unsafe_offset(r0 * I), row_major(n, I)),
                    TileTensor(dnp.unsafe_offset(e * dn_es), row_major(H, I)),
                )

        # Combine: out[t] += w * y over t's rows in ascending row = ascending expert order (deterministic).
        var token_rows = List[Int](length=T * k, fill=0)
        var filled = List[Int](length=T, fill=0)
        for r in range(T * k):
            var t = Int(slotp[unsafe_offset=r]) // k
            token_rows[t * k + filled[t]] = r
            filled[t] += 1
        var trp = token_rows.unsafe_ptr()

        def combine_token(t: Int) {var op, var yp, var wp, var trp, var slotp, var H, var k}:
            var dst = op.unsafe_offset(t * H)
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

        parallelize(combine_token, T)
