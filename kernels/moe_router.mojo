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
# pass 2 gathers only the few experts at or above it (about 11 of 192 on random logits: the compare
# masks of four chunks make one 64-bit word whose set bits are walked) and ranks them all at once: an
# expert's output position is the number of candidates ahead of it, and output j is the lane ranked j
# (one compare and a tzcnt). The renorm and scale run on one vector, stored as one (k a power of two).
# The metadata is a counting sort: counted per block once it is routed, one serial prefix, scattered per
# block. History (variants measured, kept or not): docs/perf-notes.md, "moe_router".
#
# Today's numbers (`python -m bench`, bench/results/latest.md, 2026-12-02, 2-core AMD EPYC family 26 (Zen 5); E 192,
# k 8): T 1 83 us (min 23), T 128 97 us (10x MAX's op chain), T 4096 0.56 ms (48x MAX, 11x torch).
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.bit import count_trailing_zeros
from std.math import exp, isnan
from std.memory import pack_bits
from std.runtime import parallelism_level

comptime W = 16  # SIMD width for the sigmoid
comptime CAND = 32  # candidates ranked in registers (two vectors)
comptime PARALLEL_SCATTER_SLOTS = 8192  # below this many slots, waking the pool costs more than the scatter


@always_inline
def _at_or_above(cp: Pointer[Float32, _], e: Int, threshold: Float32) -> Int:
    """Bit i is set where key e + i >= threshold (one SIMD chunk)."""
    return Int(pack_bits(cp.unsafe_load[width=W](e).ge(threshold)))


@always_inline
def _keep_candidate(
    ck: Pointer[mut=True, Float32, _], ci: Pointer[mut=True, Int32, _], mut nc: Int, key: Float32, score: Float32,
    x: Int,
):
    """Counts one more candidate (key at ck, score at ck + CAND); only the first CAND are kept (more sends the token
    to the sorted insertion)."""
    if nc < CAND:
        ck[unsafe_offset=nc] = key
        ck[unsafe_offset=CAND + nc] = score
        ci[unsafe_offset=nc] = Int32(x)
    nc += 1


@always_inline
def _lane_index[n: Int]() -> SIMD[DType.int32, n]:
    var lanes = SIMD[DType.int32, n](0)
    comptime for i in range(n):
        lanes[i] = Int32(i)
    return lanes


@always_inline
def _insert[top_k: Int](kp: Pointer[mut=True, Float32, _], tid: Pointer[mut=True, Int32, _], mut n: Int, key: Float32, x: Int):
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
        tid[unsafe_offset=pos] = tid[unsafe_offset=pos - 1]
        pos -= 1
    kp[unsafe_offset=pos] = key
    tid[unsafe_offset=pos] = Int32(x)


@always_inline
def _pick_ranked[n: Int, top_k: Int](
    ck: Pointer[Float32, _], ci: Pointer[Int32, _], nc: Int, tid: Pointer[mut=True, Int32, _],
    tsc: Pointer[mut=True, Float32, _],
):
    """Top k of top_k <= nc <= n candidates (keys ck, scores ck + CAND, experts ci) into tid, tsc [top_k] in output
    order. Each one's position is its rank: the number of candidates with a larger key, or an equal key and a lower
    index (a strict order: the live ranks are 0 .. nc - 1, each once; padding lanes rank nc or more). Output j is
    the lane whose rank is j, found with one compare and a tzcnt: no stores for the ranks past the top k."""
    var live = _lane_index[n]().lt(Int32(nc))
    var keys = live.select(ck.unsafe_load[width=n](0), SIMD[DType.float32, n](Float32.MIN))
    var idx = live.select(ci.unsafe_load[width=n](0), SIMD[DType.int32, n](Int32.MAX))
    var rank = SIMD[DType.int32, n](0)
    for i in range(nc):
        var ki = ck[unsafe_offset=i]
        var before = keys.lt(ki) | (keys.eq(ki) & idx.gt(ci[unsafe_offset=i]))
        rank += before.select(SIMD[DType.int32, n](1), SIMD[DType.int32, n](0))
    comptime for j in range(top_k):  # exactly one live lane has each rank below nc >= top_k: take it by tzcnt
        var l = min(Int(count_trailing_zeros(pack_bits(rank.eq(Int32(j))))), n - 1)
        tid[unsafe_offset=j] = ci[unsafe_offset=l]
        tsc[unsafe_offset=j] = ck[unsafe_offset=CAND + l]


@always_inline
def route_token[top_k: Int, scale: Float32, renormalize: Bool](
    row: Pointer[Float32, _],
    bp: Pointer[Float32, _],
    E: Int,
    scratch: Pointer[mut=True, Float32, _],
    ci: Pointer[mut=True, Int32, _],
    tid: Pointer[mut=True, Int32, _],
    tsc: Pointer[mut=True, Float32, _],
    ids: Pointer[mut=True, Int32, _],
    weights: Pointer[mut=True, Float32, _],
):
    """Routes one token: logits row [E] -> ids [top_k], weights [top_k].

    scratch holds [E] scores, [E] keys, [CAND] candidate keys, [CAND] candidate scores and [top_k] sorted keys;
    ci the [CAND] candidate experts; tid and tsc the top experts and their scores (_top_width(top_k) each).
    """
    var sp = scratch
    var cp = scratch.unsafe_offset(E)
    var ck = scratch.unsafe_offset(2 * E)
    var kp = scratch.unsafe_offset(2 * E + 2 * CAND)
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
    # The W lane maxima are keys of W distinct experts, so their k-th largest is <= the true k-th largest
    # key: a lower bound, and only keys >= it can be chosen (about 11 of 192 on random logits).
    var threshold = Float32.MIN
    comptime if top_k <= W:
        if E >= W:
            # lanes with fewer than k strictly larger lanes hold the top k lane maxima; the least of them
            var larger = SIMD[DType.int32, W](0)
            comptime for i in range(W):
                larger += lane_max.lt(lane_max[i]).select(SIMD[DType.int32, W](1), SIMD[DType.int32, W](0))
            threshold = larger.lt(Int32(top_k)).select(lane_max, SIMD[DType.float32, W](Float32.MAX)).reduce_min()
    # Pass 2: gather the candidates (keys >= threshold, ascending expert order). The compare masks of four
    # chunks make one 64-bit word whose set bits are walked with tzcnt: the loop branches once per candidate
    # and once per 64 experts, not once per 16, and nothing is stored for the chunks without one. Up to CAND
    # candidates are ranked in registers (_pick_ranked); more (heavy ties, k > W) take the sorted insertion
    # over all experts instead.
    var nc = 0  # candidates seen; the first CAND are kept
    e = 0
    while e + W <= E:
        var chunks = min(4, (E - e) // W)  # full chunks in this word
        var bits = UInt64(0)
        comptime for c in range(4):
            if c < chunks:
                bits |= UInt64(_at_or_above(cp, e + c * W, threshold)) << UInt64(c * W)
        while bits != 0:
            var x = e + Int(count_trailing_zeros(bits))
            bits &= bits - 1
            _keep_candidate(ck, ci, nc, cp[unsafe_offset=x], sp[unsafe_offset=x], x)
        e += chunks * W
    for x in range(e, E):
        if cp[unsafe_offset=x] >= threshold:
            _keep_candidate(ck, ci, nc, cp[unsafe_offset=x], sp[unsafe_offset=x], x)
    if nc <= CAND:
        if nc <= W:
            _pick_ranked[W, top_k](ck, ci, nc, tid, tsc)
        else:
            _pick_ranked[CAND, top_k](ck, ci, nc, tid, tsc)
        _finish[top_k, scale, renormalize](tid, tsc, ids, weights)
        return
    var n = 0
    e = 0
    while e + W <= E:
        var mask = _at_or_above(cp, e, threshold)
        while mask != 0:
            var x = e + count_trailing_zeros(mask)
            mask &= mask - 1
            _insert[top_k](kp, tid, n, cp[unsafe_offset=x], x)
        e += W
    for x in range(e, E):
        if cp[unsafe_offset=x] >= threshold:
            _insert[top_k](kp, tid, n, cp[unsafe_offset=x], x)
    for j in range(top_k):
        tsc[unsafe_offset=j] = sp[unsafe_offset=Int(tid[unsafe_offset=j])]
    _finish[top_k, scale, renormalize](tid, tsc, ids, weights)


@always_inline
def _top_width(top_k: Int) -> Int:
    """Lanes of the top-k vectors: the smallest power of two at least top_k (SIMD widths are powers of two)."""
    var n = 1
    while n < top_k:
        n *= 2
    return n


@always_inline
def _finish[top_k: Int, scale: Float32, renormalize: Bool](
    tid: Pointer[Int32, _], tsc: Pointer[Float32, _], ids: Pointer[mut=True, Int32, _], weights: Pointer[mut=True, Float32, _],
):
    """Writes the chosen experts tid [top_k] and their (renormalised, scaled) unbiased scores tsc [top_k]."""
    comptime KW = _top_width(top_k)
    var chosen = _lane_index[KW]().lt(Int32(top_k))
    var w = chosen.select(tsc.unsafe_load[width=KW](0), SIMD[DType.float32, KW](0))
    var den: Float32 = 1  # dividing by 1 is exact: one formula, HF's rounding order, both modes
    comptime if renormalize:
        den = w.reduce_add() + Float32(1e-20)
    w = w / den * scale
    var x = tid.unsafe_load[width=KW](0)
    # exactly top_k lanes stored: the next row may belong to another thread
    comptime if KW == top_k:  # top_k a power of two: one store each
        ids.unsafe_store(0, x)
        weights.unsafe_store(0, w)
    else:
        comptime for j in range(top_k):
            ids[unsafe_offset=j] = x[j]
            weights[unsafe_offset=j] = w[j]


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
        var block = max(64, min(1024, (T + 2 * workers - 1) // (2 * workers)))
        var n_blocks = (T + block - 1) // block

        # Dispatch metadata: a stable counting sort of the T * k slots by expert, per block. Each block counts
        # its own tokens' experts; one prefix over (expert, block) gives every block its start within each
        # expert's range, so blocks scatter in parallel and a range still ascends in t.
        var counts = List[Int](length=n_blocks * E, fill=0)
        var cnt = counts.unsafe_ptr()

        def route_block(b: Int) {var lp, var bp, var ip, var wp, var cnt, var ls, var ids_s, var ws, var E, var T, var block}:
            comptime KW = _top_width(top_k)
            var scratch = List[Float32](length=2 * E + 2 * CAND + top_k, fill=0)  # see route_token
            var cand = List[Int32](length=CAND, fill=0)  # candidate experts
            var top = List[Int32](length=KW, fill=0)  # the top k, padded to _finish's vector width
            var top_scores = List[Float32](length=KW, fill=0)
            var sp = scratch.unsafe_ptr()
            var block_counts = cnt.unsafe_offset(b * E)
            for t in range(b * block, min(T, (b + 1) * block)):
                route_token[top_k, scale, renormalize](
                    lp.unsafe_offset(t * ls), bp, E, sp, cand.unsafe_ptr(), top.unsafe_ptr(), top_scores.unsafe_ptr(), ip.unsafe_offset(t * ids_s),
                    wp.unsafe_offset(t * ws))
            # Counted once the block is routed: reading a token's ids right after their vector store stalls on
            # store forwarding (standalone, per token: 171 ns counted in the loop, 158 ns here).
            for t in range(b * block, min(T, (b + 1) * block)):
                for j in range(top_k):
                    var x = Int(ip[unsafe_offset=t * ids_s + j])
                    block_counts[unsafe_offset=x] = block_counts[unsafe_offset=x] + 1

        var op = expert_offsets.unsafe_ptr()
        var slots = sorted_slots.unsafe_ptr()

        def scatter_block(b: Int) {var ip, var slots, var cnt, var ids_s, var E, var T, var block}:
            var cursor = cnt.unsafe_offset(b * E)  # this block's start in each expert's range (after the prefix)
            for t in range(b * block, min(T, (b + 1) * block)):
                for j in range(top_k):
                    var x = Int(ip[unsafe_offset=t * ids_s + j])
                    slots[unsafe_offset=cursor[unsafe_offset=x]] = Int32(t * top_k + j)
                    cursor[unsafe_offset=x] = cursor[unsafe_offset=x] + 1

        if n_blocks == 1:
            route_block(0)
        else:
            parallelize(route_block, n_blocks)
        var running = 0
        for e in range(E):
            op[unsafe_offset=e] = Int32(running)
            for b in range(n_blocks):
                var c = cnt[unsafe_offset=b * E + e]
                cnt[unsafe_offset=b * E + e] = running
                running += c
        op[unsafe_offset=E] = Int32(running)
        if T * top_k < PARALLEL_SCATTER_SLOTS:
            for b in range(n_blocks):
                scatter_block(b)
        else:
            parallelize(scatter_block, n_blocks)
