# RMSNorm at the decoder's layer boundaries, alone (op `rms_norm`) or fused with the residual add before it
# (op `add_rms_norm`). x, the addend, the weight and the outputs share one dtype (float32 or bfloat16: the model's).
#   rms_norm:     y = w * dt(x32 * (1 / sqrt(mean(x32^2) + eps))), x32 = float32(x)
#   add_rms_norm: s = dt(x + d);  y = rms_norm(s)                  (outputs s, the new residual stream, and y)
# HF's order (HYV3RMSNorm): normalize in float32, round to the model dtype, then multiply by the weight in the model
# dtype (a bf16 product is the float32 product rounded once, to nearest even; so is a bf16 sum). The mean is a
# float32 sum of squares over H, divided by H; its summation order is this kernel's own (16 float32 lanes, then
# their sum), so y may differ from another implementation's in the last bit of the float32 normalization.
#
# Reference (the spec): hyv3_graph/kernels/rms_norm.py::rms_norm_reference
# Wrapper:              hyv3_graph/kernels/rms_norm.py::rms_norm, add_rms_norm
# Fuzz test:            tests/test_rms_norm.py     Bench: bench/cases/rms_norm.py (`rms_norm` cases)
#
# Design, and why: the norm is memory bound and tiny at decode ([1, H]: 16 KiB at H 4096), where what it costs is the
# op count, not the bytes: as MAX ops the norm is a chain of ~8 graph ops (cast, square, mean, add, sqrt, divide,
# cast, multiply) and the residual add one more, each one op launch inside the step (`rms_norm` bench case: MAX's
# chain against this op at T 1). One op per norm, with the add fused, takes two launches a layer instead of ~14.
# Rows are independent: one row per work item, on the calling core below work_queue.PARALLEL_MIN_BYTES of traffic
# (decode), on every core above it (prefill). A row is read twice (sum of squares, then scale); at H <= 8192 it
# stays in L1 between the two.
#
# Today's numbers (`python -m bench --only rms_norm`, 2026-12-07 02:25 UTC, 2-core AMD EPYC family 25 model 17
# (Zen 4), read probe 31.5 GB/s; this VM's timings of a few microseconds move 2-3x between runs: read the minima
# too), ours / MAX's op chain: a chain of 16 add + norm at T 1, H 4096: f32 256 / 288 us (min 86 / 78), bf16 109 /
# 160 us (min 74 / 110); T 512: f32 1.24 / 1.17 ms (27-29 GB/s, both at the probe), bf16 2.31 / 3.26 ms (a
# standalone loop over those rows takes 1.8 us a row, the op 4.5: likely MAX's allocation of the outputs, not timed
# apart). In the model (`small` decode, both graphs in one process, blocks of steps alternating): q8_0 6.94 -> 6.75
# ms a step, then 8.36 -> 8.24 in a slower minute; bf16 9.46 -> 9.17 ms: 1.5-3%. docs/perf-notes.md, "rms_norm as
# one op".
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from std.math import sqrt
from std.sys import size_of
from .cpu_isa import F32x, bf16_bits_to_f32, from_f32, round_to_bf16
from .microkernels import W, untracked
from .work_queue import parallelize_sized


@always_inline
def _load[dt: DType, n: Int](p: Pointer[Scalar[dt], _], i: Int) -> SIMD[DType.float32, n]:
    comptime if dt == DType.bfloat16:
        return bf16_bits_to_f32[n](p.unsafe_bitcast[UInt16]().unsafe_load[width=n](i))
    else:
        return p.unsafe_load[width=n](i).cast[DType.float32]()


@always_inline
def _rounded[dt: DType, n: Int](v: SIMD[DType.float32, n]) -> SIMD[DType.float32, n]:
    """v rounded to dt, as float32 (the value a dt store then load would give)."""
    comptime if dt == DType.bfloat16:
        return bf16_bits_to_f32[n](round_to_bf16[n](v))
    else:
        return v


@always_inline
def _add_row[dt: DType](s: Pointer[mut=True, Scalar[dt], _], x: Pointer[Scalar[dt], _], d: Pointer[Scalar[dt], _],
                        H: Int):
    """s = dt(x + d), one row."""
    var i = 0
    while i + W <= H:
        s.unsafe_store(i, from_f32[dt, W](_load[dt, W](x, i) + _load[dt, W](d, i)))
        i += W
    while i < H:
        s[unsafe_offset=i] = from_f32[dt, 1](_load[dt, 1](x, i) + _load[dt, 1](d, i))
        i += 1


@always_inline
def _norm_row[dt: DType](y: Pointer[mut=True, Scalar[dt], _], x: Pointer[Scalar[dt], _], w: Pointer[Scalar[dt], _],
                         H: Int, eps: Float32):
    """y = w * dt(x32 * (1 / sqrt(mean(x32^2) + eps))), one row (HF's order, its rsqrt; see the header)."""
    var acc = F32x(0)
    var i = 0
    while i + W <= H:
        var v = _load[dt, W](x, i)
        acc = v.fma(v, acc)
        i += W
    var ss = acc.reduce_add()
    while i < H:
        var v = _load[dt, 1](x, i)
        ss += v * v
        i += 1
    var inv = Float32(1) / sqrt(ss / Float32(H) + eps)
    i = 0
    while i + W <= H:
        var normed = _rounded[dt, W](_load[dt, W](x, i) * inv)
        y.unsafe_store(i, from_f32[dt, W](_load[dt, W](w, i) * normed))
        i += W
    while i < H:
        var normed = _rounded[dt, 1](_load[dt, 1](x, i) * inv)
        y[unsafe_offset=i] = from_f32[dt, 1](_load[dt, 1](w, i) * normed)
        i += 1


def _check_rows(name: StaticString, T: Int, H: Int, w_len: Int, rows_ok: Bool) raises:
    if w_len != H:
        raise Error(name, ": the weight has ", w_len, " elements, the rows ", H)
    if not rows_ok:
        raise Error(name, ": expected contiguous [T, H] tensors of one shape, T=", T, " H=", H)


@extensibility.register("rms_norm")
struct RmsNorm:
    @staticmethod
    def execute[
        target: StaticString,
        eps: Float32,
    ](
        y: OutputTensor[rank=2, ...],
        x: InputTensor[dtype = y.dtype, rank=2, ...],
        w: InputTensor[dtype = y.dtype, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime assert target == "cpu", "rms_norm: CPU-only kernel"
        comptime dt = y.dtype
        comptime assert dt == DType.float32 or dt == DType.bfloat16, "rms_norm: float32 or bfloat16"
        var T = x.dim_size(0)
        var H = x.dim_size(1)
        _check_rows("rms_norm", T, H, w.dim_size(0),
                    y.dim_size(0) == T and y.dim_size(1) == H and x.stride_length(1) == 1 and y.stride_length(1) == 1
                    and x.stride_length(0) == H and y.stride_length(0) == H)
        var xp = untracked(x.unsafe_ptr())
        var yp = untracked(y.unsafe_ptr())
        var wp = untracked(w.unsafe_ptr())

        def row(t: Int) {var xp, var yp, var wp, var H}:
            _norm_row[dt](yp.unsafe_offset(t * H), xp.unsafe_offset(t * H), wp, H, eps)

        parallelize_sized(row, T, 2 * T * H * size_of[dt]())


@extensibility.register("add_rms_norm")
struct AddRmsNorm:
    @staticmethod
    def execute[
        target: StaticString,
        eps: Float32,
    ](
        s: OutputTensor[rank=2, ...],
        y: OutputTensor[dtype = s.dtype, rank=2, ...],
        x: InputTensor[dtype = s.dtype, rank=2, ...],
        d: InputTensor[dtype = s.dtype, rank=2, ...],
        w: InputTensor[dtype = s.dtype, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime assert target == "cpu", "add_rms_norm: CPU-only kernel"
        comptime dt = s.dtype
        comptime assert dt == DType.float32 or dt == DType.bfloat16, "add_rms_norm: float32 or bfloat16"
        var T = x.dim_size(0)
        var H = x.dim_size(1)
        var same = True
        comptime for i in range(2):
            same = same and s.dim_size(i) == x.dim_size(i) and y.dim_size(i) == x.dim_size(i)
            same = same and d.dim_size(i) == x.dim_size(i)
        _check_rows("add_rms_norm", T, H, w.dim_size(0),
                    same and x.stride_length(0) == H and d.stride_length(0) == H and s.stride_length(0) == H
                    and y.stride_length(0) == H and x.stride_length(1) == 1 and d.stride_length(1) == 1
                    and s.stride_length(1) == 1 and y.stride_length(1) == 1)
        var xp = untracked(x.unsafe_ptr())
        var dp = untracked(d.unsafe_ptr())
        var sp = untracked(s.unsafe_ptr())
        var yp = untracked(y.unsafe_ptr())
        var wp = untracked(w.unsafe_ptr())

        def row(t: Int) {var xp, var dp, var sp, var yp, var wp, var H}:
            var o = t * H
            _add_row[dt](sp.unsafe_offset(o), xp.unsafe_offset(o), dp.unsafe_offset(o), H)
            _norm_row[dt](yp.unsafe_offset(o), sp.unsafe_offset(o), wp, H, eps)

        parallelize_sized(row, T, 4 * T * H * size_of[dt]())
