"""onnxruntime's static quantization in the QOperator format: QLinearConv and QLinearMatMul (ONNX),
QGemm, QLinearAdd, QLinearMul, QLinearSigmoid, QLinearLeakyRelu, QLinearSoftmax, QLinearConcat,
QLinearWhere, QLinearAveragePool and QLinearGlobalAveragePool (com.microsoft); and QAttention, the
attention quantize_dynamic makes of onnxruntime's fused Attention.

Each reads integers that stand for reals, r = (q - zero_point) * scale, applies a float operator,
and writes its result quantized to its own scale, y = saturate(round(v / y_scale) + y_zero_point),
rounding half to even. The kernels compute as onnxruntime's do: integer products exact, then
requantized in float32 (the product's multiplier x_scale * w_scale / y_scale, then round); the
operators onnxruntime runs through a table of the 256 levels (Sigmoid, LeakyRelu) dequantize,
apply the function and quantize, in float32.

The outputs are integers, piecewise constant in the inputs: the derivative is zero, and the summary
says why (the model's first QuantizeLinear lies on the way). With --straight-through each operator
differentiates as its float operator on the dequantized inputs, from integer units to integer units
(a tangent times its input's scale, through the float rule, over the output's scale), and zero
where the output saturates: the derivative quantization-aware training takes, the one the same
model quantized to the QDQ format gets.
"""

from __future__ import annotations

import numpy as np

from . import Ctx, rule, through
from ..errors import UnsupportedOpError
from ._util import padded
from .contrib import Attention
from .conv import Conv
from .elementwise import _INT_RANGES, Add, LeakyRelu, Mul, Sigmoid, Where
from .linalg import Gemm, MatMul
from .norm import Softmax1, Softmax13
from .pool import AveragePool, GlobalAveragePool, MaxPool
from .shape import Concat

MS = "com.microsoft"
_F32 = np.float32


def _along(v, axis, ndim):
    """A scalar, or a 1-D per-channel v, shaped to broadcast against an array of `ndim` axes
    along `axis`."""
    v = np.asarray(v)
    if v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def _levels(q, zp, axis=0):
    """q - zero_point in float64 (exact for integers of up to 32 bits): zp a scalar or one per
    channel along `axis`."""
    q = np.asarray(q, np.float64)
    return q if zp is None else q - _along(np.asarray(zp, np.float64), axis, q.ndim)


def _sc(scale, q, axis=0):
    """An input's scale shaped to broadcast against it (and its tangents, which lead with more axes)."""
    return _along(np.asarray(scale, np.float64), axis, np.ndim(q))


def _real(q, scale, zp, dtype, axis=0):
    """The reals the integers stand for, (q - zero_point) * scale, in `dtype`."""
    return (_levels(q, zp, axis) * _sc(scale, q, axis)).astype(dtype)


def _unary(op, x, dtype, **fattrs):
    """What `real` gives for an operator of inputs (X, X_scale, X_zp, Y_scale, Y_zp): `op` on the dequantized X."""
    return op, (_real(*x[0:3], dtype),), fattrs, {0: (0, _sc(x[1], x[0]))}, (x[3], padded(x, 5)[4])


def _binary_data(x):
    """The differentiated inputs of a binary operator's inputs (A, A_scale, A_zp, B, B_scale, B_zp, ...)."""
    return {0: (0, _sc(x[1], x[0])), 1: (3, _sc(x[4], x[3]))}


def _saturate(r, zp):
    """Levels r (rounded, float) plus the zero point, saturated to its integer type (uint8 without one)."""
    dt = np.asarray(zp).dtype if zp is not None else np.dtype(np.uint8)
    if dt not in _INT_RANGES:
        raise UnsupportedOpError(f"quantized output of type {dt} is not supported (8, 16 and 32-bit integers are)")
    lo, hi = _INT_RANGES[dt]
    if zp is not None:
        r = r + _F32(np.asarray(zp).reshape(()))
    return np.clip(r, lo, hi).astype(dt)


def _requantize(acc, multiplier, zp, axis=1):
    """An exact integer accumulator (float64) times the float32 multiplier (one per channel along
    `axis`), rounded half to even and saturated: onnxruntime's requantization."""
    v = acc.astype(_F32) * _along(np.asarray(multiplier, _F32), axis, acc.ndim)
    return _saturate(np.rint(v), zp)


def _real32(q, scale, zp):
    """The reals of integers at a per-tensor scale, in float32 as onnxruntime dequantizes them."""
    return _levels(q, zp).astype(_F32) * _F32(np.asarray(scale).reshape(()))


def _quantize(v, scale, zp):
    """Float32 values quantized: round(v / scale) + zero_point, saturated (MLAS's QuantizeLinear)."""
    return _saturate(np.rint(v.astype(_F32) / _F32(np.asarray(scale).reshape(()))), zp)


def _multiplier(a_scale, b_scale, y_scale=None, alpha=1.0):
    """alpha * a_scale * b_scale / y_scale in float32, per tensor or per channel of b."""
    m = _F32(alpha) * _F32(np.asarray(a_scale).reshape(())) * np.asarray(b_scale, _F32)
    return m if y_scale is None else m / _F32(np.asarray(y_scale).reshape(()))


# ---- the integer operators ---------------------------------------------------------------------


_CONV_ATTRS = dict(auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None)


@rule("QLinearConv", since=10)
class QLinearConv:
    """y = requantize(conv(x - x_zp, w - w_zp) + B), w's scale and zero point per tensor or per
    output channel, B in int32 at scale x_scale * w_scale."""

    nondiff = tuple(range(9))

    def forward(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B=None, *,
                auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
        acc = Conv.forward(_levels(x, x_zero_point), _levels(w, w_zero_point), auto_pad=auto_pad, dilations=dilations,
                           group=group, kernel_shape=kernel_shape, pads=pads, strides=strides)
        if B is not None:
            acc = acc + _along(np.asarray(B, np.float64), 1, acc.ndim)
        return _requantize(acc, _multiplier(x_scale, w_scale, y_scale), y_zero_point)

    def real(x, attrs, dtype):
        """The float operator on the reals: (rule, its inputs, its attributes, {its input: (node
        input, scale)} for the inputs that carry derivatives), and the output's scale and zero point."""
        xs, w, ws, wzp, B = x[1], x[3], x[4], x[5], padded(x, 9)[8]
        Xr, Wr = _real(x[0], xs, x[2], dtype), _real(w, ws, wzp, dtype)
        Br = None if B is None else _real(B, _multiplier(xs, ws), None, dtype)
        return Conv, (Xr, Wr, Br), dict(_CONV_ATTRS, **attrs), {0: (0, _sc(xs, x[0]))}, (x[6], x[7])


def _matmul_acc(a, a_zp, b, b_zp):
    """(a - a_zp) @ (b - b_zp), exact: b's zero point per tensor or per column."""
    return np.matmul(_levels(a, a_zp), _levels(b, b_zp, -1))


@rule("QLinearMatMul", since=10)
class QLinearMatMul:
    """y = requantize((a - a_zp) @ (b - b_zp)), numpy's matmul semantics; b's scale and zero
    point per tensor or per column."""

    nondiff = tuple(range(8))

    def forward(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
        acc = _matmul_acc(a, a_zero_point, b, b_zero_point)
        return _requantize(acc, _multiplier(a_scale, b_scale, y_scale), y_zero_point, axis=-1)

    def real(x, attrs, dtype):
        A, B = _real(x[0], x[1], x[2], dtype), _real(x[3], x[4], x[5], dtype, axis=-1)
        return MatMul, (A, B), {}, {0: (0, _sc(x[1], x[0])), 1: (3, _sc(x[4], x[3], -1))}, (x[6], x[7])


@rule("QGemm", since=1, domain=MS)
class QGemm:
    """y = alpha * (A' - a_zp)(B' - b_zp) + C at scale a_scale * b_scale (C int32, added as is:
    onnxruntime ignores beta), requantized to y_scale and y_zero_point; a float output, not
    requantized, without y_zero_point. b's scale and zero point per tensor or per column of B'."""

    nondiff = tuple(range(9))

    def forward(A, a_scale, a_zero_point, B, b_scale, b_zero_point, C=None, y_scale=None, y_zero_point=None, *,
                alpha=1.0, beta=1.0, transA=0, transB=0):
        Bl = _levels(B, b_zero_point, 0 if transB else -1)
        acc = _levels(A, a_zero_point).T @ Bl.T if transA else _levels(A, a_zero_point) @ (Bl.T if transB else Bl)
        if C is not None:
            acc = acc + np.asarray(C, np.float64)
        m = _multiplier(a_scale, b_scale, y_scale, alpha)
        if y_zero_point is None:  # a float output
            return (acc.astype(_F32) * _along(m, -1, acc.ndim)).astype(_F32)
        return _requantize(acc, m, y_zero_point, axis=-1)

    def real(x, attrs, dtype):
        A, a_s, a_zp, B, b_s, b_zp, C, y_s, y_zp = padded(x, 9)
        alpha, transB = attrs.get("alpha", 1.0), attrs.get("transB", 0)
        Ar, Br = _real(A, a_s, a_zp, dtype), _real(B, b_s, b_zp, dtype, axis=0 if transB else -1)
        Cr = None if C is None else _real(C, _multiplier(a_s, b_s), None, dtype, axis=-1)
        fattrs = dict(alpha=alpha, beta=1.0, transA=attrs.get("transA", 0), transB=transB)
        data = {0: (0, _sc(a_s, A)), 1: (3, _sc(b_s, B, 0 if transB else -1))}
        if y_zp is None:  # a float output: its scale, if any, divides
            return Gemm, (Ar, Br, Cr), fattrs, data, (y_s, None)
        return Gemm, (Ar, Br, Cr), fattrs, data, (y_s, y_zp)


@rule("QLinearAdd", since=1, domain=MS)
class QLinearAdd:
    """C = quantize(A_real + B_real), with broadcasting, rounded as onnxruntime does (see _mlas_add)."""

    nondiff = tuple(range(8))

    def forward(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point=None):
        cs = _F32(np.asarray(C_scale).reshape(()))
        ra, rb = _F32(np.asarray(A_scale).reshape(())) / cs, _F32(np.asarray(B_scale).reshape(())) / cs
        za, zb, zc = (_F32(0 if z is None else np.asarray(z).reshape(())) for z in (A_zero_point, B_zero_point, C_zero_point))
        v = _mlas_add(np.asarray(A, np.float64), za, ra, np.asarray(B, np.float64), zb, rb, zc)
        return _saturate(np.rint(v) - zc, C_zero_point)  # _saturate adds the zero point back

    def real(x, attrs, dtype):
        return Add, (_real(*x[0:3], dtype), _real(*x[3:6], dtype)), {}, _binary_data(x), (x[6], padded(x, 8)[7])


def _fma(a, b, c):
    """a * b + c rounded once to float32: exact in float64 for 8-bit integers times float32 ratios."""
    return (np.asarray(a, np.float64) * np.float64(b) + np.asarray(c, np.float64)).astype(_F32)


def _mlas_add(a, za, ra, b, zb, rb, zc):
    """ra * (a - za) + rb * (b - zb) + zc in float32 as MLAS computes it on x86: the constant part
    zc - (ra * za + rb * zb) first (its sum fused), then a fused multiply-add per input, B's first.
    It differs from the plain sum at ties, which scales in simple ratios make common."""
    fixed = _F32(zc) - _fma(ra, za, _F32(rb * zb))
    return _fma(a, ra, _fma(b, rb, fixed))


@rule("QLinearMul", since=1, domain=MS)
class QLinearMul:
    """C = quantize(A_real * B_real), with broadcasting: as onnxruntime, (A - A_zp)(B - B_zp) *
    (A_scale * B_scale / C_scale), rounded, in float32."""

    nondiff = tuple(range(8))

    def forward(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point=None):
        v = (_levels(A, A_zero_point) * _levels(B, B_zero_point)).astype(_F32) * _multiplier(A_scale, B_scale, C_scale)
        return _saturate(np.rint(v), C_zero_point)

    def real(x, attrs, dtype):
        return Mul, (_real(*x[0:3], dtype), _real(*x[3:6], dtype)), {}, _binary_data(x), (x[6], padded(x, 8)[7])


def _table(X, X_scale, X_zero_point, Y_scale, Y_zero_point, f):
    """f on the 256 levels of an 8-bit X, dequantized, applied and quantized in float32; then looked up."""
    if X.dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
        raise UnsupportedOpError(f"quantized input of type {X.dtype} is not supported here (8-bit integers are)")
    info = np.iinfo(X.dtype)
    levels = np.arange(info.min, info.max + 1)
    table = _quantize(f(_real32(levels, X_scale, X_zero_point)), Y_scale, Y_zero_point)
    return table[X.astype(np.int64) - info.min]


@rule("QLinearSigmoid", since=1, domain=MS)
class QLinearSigmoid:
    """Y = quantize(sigmoid(X_real)), by a table of X's 256 levels, as onnxruntime."""

    nondiff = tuple(range(5))

    def forward(X, X_scale, X_zero_point, Y_scale, Y_zero_point=None):
        return _table(X, X_scale, X_zero_point, Y_scale, Y_zero_point, Sigmoid.forward)

    def real(x, attrs, dtype):
        return _unary(Sigmoid, x, dtype)


@rule("QLinearLeakyRelu", since=1, domain=MS)
class QLinearLeakyRelu:
    """Y = quantize(leaky_relu(X_real)), by a table of X's 256 levels, as onnxruntime."""

    nondiff = tuple(range(5))

    def forward(X, X_scale, X_zero_point, Y_scale, Y_zero_point=None, *, alpha=0.01):
        return _table(X, X_scale, X_zero_point, Y_scale, Y_zero_point, lambda r: LeakyRelu.forward(r, alpha=alpha))

    def real(x, attrs, dtype):
        return _unary(LeakyRelu, x, dtype, alpha=attrs.get("alpha", 0.01))


@rule("QLinearConcat", since=1, domain=MS)
class QLinearConcat:
    """Y = the inputs joined along `axis`, each requantized to Y's scale and zero point (copied
    where they already share them). Inputs: Y_scale, Y_zero_point, then (X, X_scale, X_zero_point)
    for each joined tensor."""

    nondiff = tuple(range(1024))  # every input, however many are joined

    def forward(Y_scale, Y_zero_point, *xs, axis):
        parts = [_requantized(X, s, zp, Y_scale, Y_zero_point) for X, s, zp in zip(xs[0::3], xs[1::3], xs[2::3])]
        return np.concatenate(parts, axis=axis)

    def real(x, attrs, dtype):
        triples = range(2, len(x), 3)
        reals = tuple(_real(x[i], x[i + 1], x[i + 2], dtype) for i in triples)
        data = {k: (i, _sc(x[i + 1], x[i])) for k, i in enumerate(triples)}
        return Concat, reals, {"axis": attrs["axis"]}, data, (x[0], x[1])


@rule("QLinearSoftmax", since=1, domain=MS)
class QLinearSoftmax:
    """Y = quantize(softmax(X_real)) along `axis` (over the axes from `axis` on, flattened, when the
    `opset` attribute is below 13), as onnxruntime computes it: exp of each level less the row's
    largest from a float32 table, summed in order, and the quotient scaled by floor(1 / y_scale),
    rounded (X's zero point cancels out)."""

    nondiff = tuple(range(5))

    def forward(X, X_scale, x_zero_point, y_scale, y_zero_point=None, *, axis=None, opset=13):
        axis = (-1 if opset >= 13 else 1) if axis is None else axis
        if X.dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
            raise UnsupportedOpError(f"QLinearSoftmax of {X.dtype} is not supported (8-bit integers are)")
        rows, restore = _softmax_rows(X, axis, opset)
        signed, D = X.dtype == np.int8, rows.shape[-1]
        table = _exp_table(float(_F32(np.asarray(X_scale).reshape(()))), D, signed)
        top = rows.max(axis=-1, keepdims=True).astype(np.int64)
        idx = (127 - top + rows) % 256 if signed else 255 - top + rows
        e = table[idx]
        total = np.add.accumulate(e, axis=-1, dtype=_F32)[..., -1:]  # in order, as onnxruntime adds
        zp = 0 if y_zero_point is None else int(np.asarray(y_zero_point).reshape(()))
        q = np.rint(e * np.floor(_F32(1) / _F32(np.asarray(y_scale).reshape(()))) / total).astype(np.int64) + zp
        lo, hi = _INT_RANGES[X.dtype]
        return restore(np.clip(q, lo, hi).astype(X.dtype))

    def real(x, attrs, dtype):
        new = attrs.get("opset", 13) >= 13
        return _unary(Softmax13 if new else Softmax1, x, dtype, axis=attrs.get("axis", -1 if new else 1))


def _softmax_rows(X, axis, opset):
    """X as rows softmax runs along, and how to put the rows back in X's layout."""
    ax = axis % X.ndim
    if opset < 13:  # the axes from `axis` on, flattened
        return X.reshape(int(np.prod(X.shape[:ax])), -1).astype(np.int64), lambda Y: Y.reshape(X.shape)
    return np.moveaxis(X, ax, -1).astype(np.int64), lambda Y: np.moveaxis(Y, -1, ax)


def _exp_table(x_scale, D, signed):
    """onnxruntime's float32 table of exp((i - 255 + shift) * x_scale) for the 256 levels i (shifted so
    that a row of D of them sums below float32's largest), indexed by the level's byte (signed: i - 128)."""
    shift = max(0.0, float(np.log(np.float64(np.finfo(_F32).max / _F32(D)))) - 5) / x_scale
    i = np.arange(256)
    table = np.empty(256, _F32)
    table[(i - 128) % 256 if signed else i] = np.exp((i - 255 + shift) * x_scale).astype(_F32)
    return table


@rule("QLinearWhere", since=1, domain=MS)
class QLinearWhere:
    """Z = X where condition else Y (broadcast), each requantized to Z's scale and zero point (copied
    where they share them). Inputs: condition, X, x_scale, x_zp, Y, y_scale, y_zp, z_scale, z_zp."""

    nondiff = tuple(range(9))

    def forward(condition, X, x_scale, x_zero_point, Y, y_scale, y_zero_point, z_scale, z_zero_point):
        return np.where(condition, _requantized(X, x_scale, x_zero_point, z_scale, z_zero_point),
                        _requantized(Y, y_scale, y_zero_point, z_scale, z_zero_point))

    def real(x, attrs, dtype):
        reals = (x[0], _real(*x[1:4], dtype), _real(*x[4:7], dtype))
        return Where, reals, {}, {1: (1, _sc(x[2], x[1])), 2: (4, _sc(x[5], x[4]))}, (x[7], x[8])


def _requantized(X, scale, zp, to_scale, to_zp):
    """Integers X at (scale, zp) as integers at (to_scale, to_zp): dequantized and quantized in
    float32, or X itself where the two agree."""
    if np.array_equal(scale, to_scale) and np.array_equal(zp, to_zp) and X.dtype == np.asarray(to_zp).dtype:
        return X
    return _quantize(_real32(X, scale, zp), to_scale, to_zp)


def _nchw(X, channels_last):
    """X with its channels second: channels_last moves them from the last axis."""
    return np.moveaxis(X, -1, 1) if channels_last else X


def _channels_back(Y, channels_last):
    return np.moveaxis(Y, 1, -1) if channels_last else Y


@rule("QLinearGlobalAveragePool", since=1, domain=MS)
class QLinearGlobalAveragePool:
    """Y = quantize(mean of X_real over the spatial axes), kept as size 1: as onnxruntime, the
    integer sum less the zero points, times x_scale / (y_scale * count), rounded, in float32."""

    nondiff = tuple(range(5))

    def forward(X, x_scale, x_zero_point, y_scale, y_zero_point=None, *, channels_last=0):
        Xc = _nchw(X, channels_last)
        count = int(np.prod(Xc.shape[2:]))
        acc = _levels(Xc, x_zero_point).sum(axis=tuple(range(2, Xc.ndim)), keepdims=True)
        m = _F32(np.asarray(x_scale).reshape(())) / (_F32(np.asarray(y_scale).reshape(())) * _F32(count))
        return _channels_back(_requantize(acc, m, y_zero_point), channels_last)

    def real(x, attrs, dtype):
        return _unary(_ChannelsLast(GlobalAveragePool) if attrs.get("channels_last", 0) else GlobalAveragePool, x, dtype)


_POOL_ATTRS = ("auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape", "pads", "strides")


@rule("QLinearAveragePool", since=1, domain=MS)
class QLinearAveragePool:
    """Y = quantize(average pool of X_real): dequantized, pooled and quantized in float32, as onnxruntime."""

    nondiff = tuple(range(5))

    def forward(X, x_scale, x_zero_point, y_scale, y_zero_point=None, *, auto_pad="NOTSET", ceil_mode=0,
                channels_last=0, count_include_pad=0, dilations=None, kernel_shape, pads=None, strides=None):
        Xr = _real32(_nchw(X, channels_last), x_scale, x_zero_point)
        Y = AveragePool.forward(Xr, auto_pad=auto_pad, ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                                dilations=dilations, kernel_shape=kernel_shape, pads=pads, strides=strides)
        return _channels_back(_quantize(Y, y_scale, y_zero_point), channels_last)

    def real(x, attrs, dtype):
        pool = {k: v for k, v in attrs.items() if k in _POOL_ATTRS}
        return _unary(_ChannelsLast(AveragePool) if attrs.get("channels_last", 0) else AveragePool, x, dtype, **pool)


def _ChannelsLast(op):
    """A pooling or convolution rule on channels-last data: channels moved second around the NCHW
    rule. Only the data X is differentiated; the other inputs (a convolution's weight and bias)
    pass as they are."""

    class ChannelsLast:
        def forward(X, *rest, **attrs):
            return np.moveaxis(op.forward(np.moveaxis(X, -1, 1), *rest, **attrs), 1, -1)

        def jvp(cx, Xdot, *_, **attrs):
            lead = Xdot.ndim - cx.x[0].ndim
            inner = Ctx((np.moveaxis(cx.x[0], -1, 1), *cx.x[1:]), (np.moveaxis(cx.y[0], -1, 1),), rule=op)
            return np.moveaxis(op.jvp(inner, np.moveaxis(Xdot, -1, lead + 1), *[None] * (len(cx.x) - 1), **attrs),
                               lead + 1, -1)

        def vjp(cx, Ybar, **attrs):
            lead = Ybar.ndim - cx.y[0].ndim
            rest = len(cx.x) - 1
            inner = Ctx((np.moveaxis(cx.x[0], -1, 1), *cx.x[1:]), (np.moveaxis(cx.y[0], -1, 1),),
                        (cx.need[0],) + (False,) * rest, (cx.keep[0],) + (False,) * rest, rule=op)
            Xbar = op.vjp(inner, np.moveaxis(Ybar, -1, lead + 1), **attrs)[0]
            return (None if Xbar is None else np.moveaxis(Xbar, lead + 1, -1),) + (None,) * rest

    return ChannelsLast


@rule("NhwcMaxPool", since=1, domain=MS)
class NhwcMaxPool(_ChannelsLast(MaxPool)):
    """MaxPool on channels-last data, as onnxruntime's NHWC transformer writes it for a quantized
    model's integers at ORT_ENABLE_ALL; taken straight through, the maxima pass their levels'
    derivatives as MaxPool does."""


@rule("QLinearConv", since=1, domain=MS)
class MsQLinearConv(QLinearConv):
    """com.microsoft's QLinearConv, which onnxruntime's NHWC transformer writes at ORT_ENABLE_ALL:
    ONNX's, with `channels_last` (x and y channels last, the weight still OIHW)."""

    def forward(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B=None, *, channels_last=0,
                **conv):
        y = QLinearConv.forward(_nchw(x, channels_last), x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
                                y_zero_point, B, **conv)
        return _channels_back(y, channels_last)

    def real(x, attrs, dtype):
        conv = {k: v for k, v in attrs.items() if k != "channels_last"}
        op, xs, fattrs, data, out = QLinearConv.real(x, conv, dtype)
        return (_ChannelsLast(op) if attrs.get("channels_last", 0) else op), xs, fattrs, data, out


_ATTN_SLOTS = (0, 1, 2, 5, 8)  # QAttention's input, weight, bias, mask_index and past: Attention's first five


@rule("QAttention", since=1, domain=MS)
class QAttention:
    """onnxruntime's Attention with a quantized input (DynamicQuantizeLinear's, in quantize_dynamic)
    and weight: inputs input, weight, bias, input_scale, weight_scale, mask_index, input_zero_point,
    weight_zero_point, past. It runs as Attention on the dequantized input and weight (the weight's
    scale and zero point per tensor or per column). The input is integer (derivative zero but
    straight through); the bias is float, and passes derivatives."""

    nondiff = (0, 1, 3, 4, 5, 6, 7, 8)
    keeps = True

    def forward(input, weight, bias, input_scale, weight_scale, mask_index=None, input_zero_point=None,
                weight_zero_point=None, past=None, *, num_heads, unidirectional=0, do_rotary=0,
                past_present_share_buffer=0, mask_filter_value=-10000.0, scale=0.0, n_outputs=1):
        reals = _attention_reals((input, weight, bias, input_scale, weight_scale, mask_index, input_zero_point,
                                  weight_zero_point, past), np.dtype(np.float32))
        return Attention.forward(*reals, num_heads=num_heads, unidirectional=unidirectional, do_rotary=do_rotary,
                                 mask_filter_value=mask_filter_value, scale=scale, n_outputs=n_outputs)

    def jvp(cx, *dots, **attrs):
        dots = padded(dots, 9)
        dt = next(d.dtype for d in dots if d is not None)
        reals = _attention_reals(cx.x, dt)
        Xdot = None if dots[0] is None else dots[0].astype(dt, copy=False) * _sc(cx.x[3], cx.x[0]).astype(dt)
        return Attention.jvp(Ctx(reals, cx.y), Xdot, None, dots[2], **_attention_attrs(attrs))

    def vjp(cx, Ybar, **attrs):
        reals = _attention_reals(cx.x, Ybar.dtype)
        need, keep = (tuple(bool(padded(v, 9, False)[i]) for i in _ATTN_SLOTS) for v in (cx.need, cx.keep))
        bars = Attention.vjp(Ctx(reals, cx.y, need, keep), Ybar, **_attention_attrs(attrs))
        out = [None] * len(cx.x)
        if need[0] and bars[0] is not None:
            out[0] = bars[0] * _sc(cx.x[3], cx.x[0]).astype(Ybar.dtype)
        if need[2]:
            out[2] = bars[2]
        return tuple(out)


def _attention_reals(x, dtype):
    """QAttention's inputs as Attention's: input and weight dequantized, bias, mask_index, past."""
    inp, weight, bias, i_scale, w_scale, mask, i_zp, w_zp, past = padded(x, 9)
    return (_real(inp, i_scale, i_zp, dtype), _real(weight, w_scale, w_zp, dtype, axis=-1), bias, mask, past)


def _attention_attrs(attrs):
    return {k: v for k, v in attrs.items() if k not in ("past_present_share_buffer", "n_outputs")}


@through(QAttention)
class QAttentionThrough(QAttention):
    """QAttention whose integer input passes derivatives as its real value's (times its scale)."""

    nondiff = (1, 3, 4, 5, 6, 7, 8)


# ---- straight through: each operator as its float operator on the dequantized inputs ----------


class _Through:
    """The float operator's derivative, from integer units to integer units: a tangent times its
    input's scale, through the float rule, then over the output's scale where the output (the
    float result quantized) lies inside its integer range, zero where it saturates."""

    keeps = False

    def jvp(cx, *dots, **attrs):
        dt = next(d.dtype for d in dots if d is not None)
        dt = dt if dt.kind == "f" else np.dtype(np.float64)
        op, xs, fattrs, data, (ys, yzp) = cx.rule.real(cx.x, attrs, dt)
        fdots = [None] * len(xs)
        for k, (slot, scale) in data.items():
            if slot < len(dots) and dots[slot] is not None:
                fdots[k] = dots[slot].astype(dt, copy=False) * scale.astype(dt)
        y = op.forward(*xs, **fattrs)
        return op.jvp(Ctx(xs, (y,), rule=op), *fdots, **fattrs) * _out_partial(y, ys, yzp)

    def vjp(cx, Ybar, **attrs):
        op, xs, fattrs, data, (ys, yzp) = cx.rule.real(cx.x, attrs, Ybar.dtype)
        y = op.forward(*xs, **fattrs)
        need = [False] * len(xs)
        for k, (slot, _) in data.items():
            need[k] = bool(cx.need[slot]) if slot < len(cx.need) else False
        bars = op.vjp(Ctx(xs, (y,), tuple(need), (False,) * len(xs), rule=op), Ybar * _out_partial(y, ys, yzp), **fattrs)
        out = [None] * len(cx.x)
        for k, (slot, scale) in data.items():
            if need[k] and bars[k] is not None:
                out[slot] = bars[k] * scale.astype(Ybar.dtype)
        return tuple(out)


def _out_partial(y, scale, zp):
    """1 / y_scale where round(y / y_scale) + zero point is inside the integer range, else 0 (no
    zero point: a float output, 1 / y_scale or 1 without a scale)."""
    if scale is None:
        return y.dtype.type(1)
    s = np.asarray(scale, y.dtype).reshape(())
    if zp is None:
        return 1 / s
    lo, hi = _INT_RANGES[np.asarray(zp).dtype]
    v = np.rint(y / s) + np.asarray(zp, y.dtype).reshape(())
    return ((v >= lo) & (v <= hi)).astype(y.dtype) / s


def _through_variant(base, data_slots):
    cls = type(f"{base.__name__}Through", (_Through, base), {"nondiff": tuple(i for i in base.nondiff if i not in data_slots),
                                                             "__doc__": f"{base.__name__} taken straight through."})
    return through(base)(cls)


for _base, _slots in ((QLinearConv, (0,)), (QLinearMatMul, (0, 3)), (QGemm, (0, 3)), (QLinearAdd, (0, 3)),
                      (QLinearMul, (0, 3)), (QLinearSigmoid, (0,)), (QLinearLeakyRelu, (0,)), (QLinearSoftmax, (0,)),
                      (QLinearWhere, (1, 4)),
                      (QLinearConcat, tuple(range(2, 1024, 3))), (QLinearGlobalAveragePool, (0,)),
                      (QLinearAveragePool, (0,)), (MsQLinearConv, (0,))):
    _through_variant(_base, _slots)
