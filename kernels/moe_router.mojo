# Fused MoE router: sigmoid + fp32 correction bias + top-k + unbiased weights + renorm + scale,
# plus the dispatch metadata the experts kernel groups tokens by, in one custom op.
#
# Reference (the spec): hyv3_graph/kernels/moe_router.py::moe_router_reference
# Wrapper:              hyv3_graph/kernels/moe_router.py::moe_router
# Fuzz test:            tests/test_moe_router.py     Bench: bench/cases/moe_router.py (`router` cases)
#
# Semantics (HF HYV3TopKRouter): score = sigmoid(logit); the k experts with the largest
# score + bias are chosen; weight = the UNBIASED score; if renormalize, w / (sum(w) + 1e-20);
# times scale. Defined where HF leaves it open:
#   * outputs are in descending order of score + bias; on equal score + bias the lower expert
#     index wins (an insertion that needs a strictly larger key keeps the earlier expert);
#   * a NaN logit scores 0, as a -inf logit does (its expert can still be chosen through the
#     bias, with weight 0); a NaN score + bias (a NaN bias) ranks as -inf, below every number,
#     ties again by index. So ids are always valid and distinct and nothing is read or written
#     out of bounds, whatever the input; weights are NaN only where the bias makes them so: never.
# Dispatch metadata: expert_offsets [E + 1] (exclusive prefix sum of per-expert counts) and
# sorted_slots [T * k]: the slots t * k + j grouped by expert, ascending t within an expert
# (stable, so everything downstream is bit-for-bit deterministic).
#
# CPU design: tokens split into blocks across cores (one scratch allocation per block, none per
# token). Per token, pass 1 computes sigmoid and key for all experts in SIMD chunks and keeps
# per-lane maxima; the k-th largest lane maximum is a lower bound of the k-th largest key, so
# pass 2 gathers only the few experts at or above it (most chunks are one vector compare) and picks
# the top k among them in two vectors: k rounds of max, lowest index holding it, retire that lane. The metadata is a serial counting sort over the T * k slots.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.bit import count_trailing_zeros
from std.math import exp, isnan
from std.runtime import parallelism_level

comptime W = 16  # SIMD width for the sigmoid
comptime CAND = 32  # candidates selected in registers (two vectors)


def _pow2_at_least(k: Int) -> Int:
    var p = 1
    while p < k:
        p *= 2
    return p


@always_inline
def _lane_bits() -> SIMD[DType.uint32, W]:
    var bits = SIMD[DType.uint32, W](0)
    comptime for i in range(W):
        bits[i] = UInt32(1 << i)
    return bits


@always_inline
def _at_or_above(cp: Pointer[Float32, _], e: Int, threshold: Float32) -> Int:
    """Bit i is set where key e + i >= threshold (one SIMD chunk)."""
    return Int(cp.unsafe_load[width=W](e).ge(threshold).select(_lane_bits(), SIMD[DType.uint32, W](0)).reduce_or())


@always_inline
def _lane_index() -> SIMD[DType.int32, CAND]:
    var lanes = SIMD[DType.int32, CAND](0)
    comptime for i in range(CAND):
        lanes[i] = Int32(i)
    return lanes


@always_inline
def _insert[top_k: Int](kp: Pointer[mut=True, Float32, _], xp: Pointer[mut=True, Int, _], mut n: Int, key: Float32, x: Int):
    """Inserts expert x into the sorted top-k list; a key must be strictly larger to displace: ties keep the earlier expert."""
    var pos: Int
    if n < top_k:
        pos = n
        n += 1
    elif key > kp[unsafe_offset=top_k - 1]:
        pos = top_k - 1
    else:
        return
    while pos > 0 and kp[unsafe_offset=pos - 1] < key:
        kp[unsafe_offset=pos] = kp[unsafe_offset=pos - 1]
        xp[unsafe_offset=pos] = xp[unsafe_offset=pos - 1]
        pos -= 1
    kp[unsafe_offset=pos] = key
    xp[unsafe_offset=pos] = x


@always_inline
def route_token[top_k: Int, scale: Float32, renormalize: Bool](
    row: Pointer[Float32, _],
    bp: Pointer[Float32, _],
    E: Int,
    scratch: Pointer[mut=True, Float32, _],
    ci: Pointer[mut=True, Int32, _],
    xp: Pointer[mut=True, Int, _],
    ids: Pointer[mut=True, Int32, _],
    weights: Pointer[mut=True, Float32, _],
):
    """Routes one token: logits row [E] -> ids [top_k], weights [top_k].

    scratch holds [E] scores, [E] keys, [top_k] sorted keys and [CAND] candidate keys; ci the [CAND]
    candidate experts; xp the [top_k] chosen experts.
    """
    var sp = scratch
    var cp = scratch.unsafe_offset(E)
    var kp = scratch.unsafe_offset(2 * E)
    var ck = scratch.unsafe_offset(2 * E + top_k)
    # Pass 1 (SIMD): scores and keys into scratch; per-lane maxima over the full chunks.
    var lane_max = SIMD[DType.float32, W](Float32.MIN)
    var e = 0
    while e + W <= E:
        var v = row.unsafe_load[width=W](e)
        var score = isnan(v).select(SIMD[DType.float32, W](0), 1.0 / (1.0 + exp(-v)))
        var key = score + bp.unsafe_load[width=W](e)
        key = isnan(key).select(SIMD[DType.float32, W](Float32.MIN), key)
        sp.unsafe_store(e, score)
        cp.unsafe_store(e, key)
        lane_max = max(lane_max, key)
        e += W
    for x in range(e, E):
        var v = row[unsafe_offset=x]
        var score: Float32 = 0 if v != v else 1.0 / (1.0 + exp(-v))
        var key = score + bp[unsafe_offset=x]
        sp[unsafe_offset=x] = score
        cp[unsafe_offset=x] = Float32.MIN if key != key else key
    # Any P distinct experts have a P-th largest key <= the true k-th largest (P >= k), so the
    # smallest of P lane-group maxima is a cheap lower bound: only keys >= it can be chosen.
    var threshold = Float32.MIN
    comptime if top_k <= W:
        if E >= W:
            threshold = lane_max.reduce_max[size_out=_pow2_at_least(top_k)]().reduce_min()
    # Pass 2: gather the candidates (keys >= threshold, ascending expert order). Usually a handful: they
    # fit two vectors, and k rounds of (max, lowest index holding it, retire that lane) pick the top k in
    # registers. Many candidates (ties, tiny E) take the sorted insertion over all experts instead.
    var nc = 0  # candidates seen; the first CAND are kept
    e = 0
    while e + W <= E:
        var mask = _at_or_above(cp, e, threshold)
        while mask != 0:
            var x = e + count_trailing_zeros(mask)
            mask &= mask - 1
            if nc < CAND:
                ck[unsafe_offset=nc] = cp[unsafe_offset=x]
                ci[unsafe_offset=nc] = Int32(x)
            nc += 1
        e += W
    for x in range(e, E):
        if cp[unsafe_offset=x] >= threshold:
            if nc < CAND:
                ck[unsafe_offset=nc] = cp[unsafe_offset=x]
                ci[unsafe_offset=nc] = Int32(x)
            nc += 1
    if nc <= CAND:
        var live = _lane_index().lt(Int32(nc))
        var keys = live.select(ck.unsafe_load[width=CAND](0), SIMD[DType.float32, CAND](Float32.MIN))
        var idx = live.select(ci.unsafe_load[width=CAND](0), SIMD[DType.int32, CAND](Int32.MAX))
        for j in range(top_k):
            var best = keys.reduce_max()
            var pick = keys.eq(best).select(idx, SIMD[DType.int32, CAND](Int32.MAX)).reduce_min()
            xp[unsafe_offset=j] = Int(pick)
            var taken = idx.eq(pick)
            keys = taken.select(SIMD[DType.float32, CAND](Float32.MIN), keys)
            idx = taken.select(SIMD[DType.int32, CAND](Int32.MAX), idx)  # a retired lane never matches again
        _finish[top_k, scale, renormalize](sp, xp, ids, weights)
        return
    var n = 0
    e = 0
    while e + W <= E:
        var mask = _at_or_above(cp, e, threshold)
        while mask != 0:
            var x = e + count_trailing_zeros(mask)
            mask &= mask - 1
            _insert[top_k](kp, xp, n, cp[unsafe_offset=x], x)
        e += W
    for x in range(e, E):
        if cp[unsafe_offset=x] >= threshold:
            _insert[top_k](kp, xp, n, cp[unsafe_offset=x], x)
    _finish[top_k, scale, renormalize](sp, xp, ids, weights)


@always_inline
def _finish[top_k: Int, scale: Float32, renormalize: Bool](
    sp: Pointer[Float32, _], xp: Pointer[Int, _], ids: Pointer[mut=True, Int32, _], weights: Pointer[mut=True, Float32, _],
):
    """Writes the chosen experts xp [top_k] and their (renormalised, scaled) unbiased scores."""
    var total: Float32 = 0
    for j in range(top_k):
        total += sp[unsafe_offset=xp[unsafe_offset=j]]
    var den: Float32 = 1  # dividing by 1 is exact: one formula, HF's rounding order, both modes
    comptime if renormalize:
        den = total + Float32(1e-20)
    for j in range(top_k):
        var x = xp[unsafe_offset=j]
        ids[unsafe_offset=j] = Int32(x)
        weights[unsafe_offset=j] = sp[unsafe_offset=x] / den * scale


@extensibility.register("moe_router")
struct MoeRouter:
    @staticmethod
    def execute[
        target: StaticString,
        top_k: Int,
        scale: Float32,
        renormalize: Bool,
    ](
        topk_ids: OutputTensor[dtype = DType.int32, rank=2, ...],
        topk_weights: OutputTensor[dtype = DType.float32, rank=2, ...],
        expert_offsets: OutputTensor[dtype = DType.int32, rank=1, ...],
        sorted_slots: OutputTensor[dtype = DType.int32, rank=1, ...],
        logits: InputTensor[dtype = DType.float32, rank=2, ...],
        bias: InputTensor[dtype = DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime assert target == "cpu", "moe_router: CPU-only kernel"
        comptime assert top_k >= 1, "moe_router: top_k must be >= 1"
        var T = logits.dim_size(0)
        var E = logits.dim_size(1)
        if bias.dim_size(0) != E or expert_offsets.dim_size(0) != E + 1:
            raise Error("moe_router: bias must be [E] and expert_offsets [E + 1], E=", E)
        if top_k > E:
            raise Error("moe_router: top_k=", top_k, " exceeds the number of experts ", E)
        if topk_ids.dim_size(0) != T or topk_ids.dim_size(1) != top_k or sorted_slots.dim_size(0) != T * top_k:
            raise Error("moe_router: output shapes do not match T=", T, " k=", top_k)
        if logits.stride_length(1) != 1 or topk_ids.stride_length(1) != 1 or topk_weights.stride_length(1) != 1:
            raise Error("moe_router: expected contiguous rows")
        if T == 0:
            var op0 = expert_offsets.unsafe_ptr()
            for e in range(E + 1):
                op0[unsafe_offset=e] = 0
            return

        var lp = logits.unsafe_ptr()
        var bp = bias.unsafe_ptr()
        var ip = topk_ids.unsafe_ptr()
        var wp = topk_weights.unsafe_ptr()
        var ls = logits.stride_length(0)
        var ids_s = topk_ids.stride_length(0)
        var ws = topk_weights.stride_length(0)
        # A token costs well under a microsecond: below ~64 tokens per worker waking the thread pool
        # costs more than it saves, so small batches (decode) run on the calling thread.
        var workers = parallelism_level()
        var block = max(64, min(256, (T + 4 * workers - 1) // (4 * workers)))
        var n_blocks = (T + block - 1) // block

        def route_block(b: Int) {var lp, var bp, var ip, var wp, var ls, var ids_s, var ws, var E, var T, var block}:
            var scratch = List[Float32](length=2 * E + top_k + CAND, fill=0)  # scores, keys, top-k, candidates
            var cand = List[Int32](length=CAND, fill=0)
            var best = List[Int](length=top_k, fill=0)
            var sp = scratch.unsafe_ptr()
            for t in range(b * block, min(T, (b + 1) * block)):
                route_token[top_k, scale, renormalize](
                    lp.unsafe_offset(t * ls), bp, E, sp, cand.unsafe_ptr(), best.unsafe_ptr(), ip.unsafe_offset(t * ids_s),
                    wp.unsafe_offset(t * ws))

        if n_blocks == 1:
            route_block(0)
        else:
            parallelize(route_block, n_blocks)

        # Dispatch metadata: a stable counting sort of the T * k slots by expert.
        var op = expert_offsets.unsafe_ptr()
        var slots = sorted_slots.unsafe_ptr()
        for e in range(E + 1):
            op[unsafe_offset=e] = 0
        for t in range(T):
            for j in range(top_k):
                var x = Int(ip[unsafe_offset=t * ids_s + j])
                op[unsafe_offset=x + 1] = op[unsafe_offset=x + 1] + 1
        for e in range(E):
            op[unsafe_offset=e + 1] = op[unsafe_offset=e + 1] + op[unsafe_offset=e]
        var cursor = List[Int](length=E, fill=0)
        for e in range(E):
            cursor[e] = Int(op[unsafe_offset=e])
        for t in range(T):
            for j in range(top_k):
                var x = Int(ip[unsafe_offset=t * ids_s + j])
                slots[unsafe_offset=cursor[x]] = Int32(t * top_k + j)
                cursor[x] += 1
