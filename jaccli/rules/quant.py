"""onnxruntime's dynamic quantization: DynamicQuantizeLinear, MatMulInteger and ConvInteger, and the
fusions onnxruntime's optimizer saves of them, DynamicQuantizeMatMul and MatMulIntegerToFloat.

`onnxruntime.quantization.quantize_dynamic` writes, for each MatMul or Conv, its input quantized
to uint8 with a scale from that tensor's own range, the product of integers, and the float
result rescaled: DynamicQuantizeLinear -> MatMulInteger / ConvInteger -> Cast -> Mul(scales).
The integers are piecewise constant in the input: the derivative is zero, and the summary says
why. With --straight-through, as quantization-aware training differentiates it, the quantizer
passes derivatives as 1 / scale, with its scale taken as a constant (an observer's statistic),
and the integer products are linear in their integer inputs: the chain then differentiates as
the float product with the dequantized weights. The products are exact: integers of 8 bits,
summed in float64 below 2^53, then int32 as the spec asks.
"""

from __future__ import annotations

import numpy as np

from . import Ctx, rule, through
from ..errors import ModelError, UnsupportedOpError
from ._util import add, padded
from .contrib import EmbedLayerNormalization, _embed_sum
from .conv import Conv
from .elementwise import DequantizeLinear13, QuantizeLinear, QuantizeLinearThrough, _DequantizeThrough
from .linalg import MatMul
from .norm import LayerNormalization
from .shape import _FLOAT_TYPES, Cast, Gather, _wrap


@rule("DynamicQuantizeLinear", since=11)
class DynamicQuantizeLinear:
    """y = saturate(round(x / scale) + zero_point) in uint8, with scale = (max(0, max x) -
    min(0, min x)) / 255 (1 for a tensor of zeros, as onnxruntime has it) and zero_point =
    saturate(round(-min(0, min x) / scale)): the range of the whole tensor (on a batch of
    samples, it mixes them). Outputs y, scale, zero_point."""

    nondiff = (0,)

    def forward(x, *, n_outputs=3):
        return _dynamic(x)[:max(1, n_outputs)] if n_outputs > 1 else _dynamic(x)[0]


def _dynamic(x):
    scale, zp = _dynamic_scale(x)
    return _levels(x, scale, zp).astype(np.uint8), scale, zp


def _dynamic_scale(x):
    """DynamicQuantizeLinear's scale and zero point for x: its range, 0 included, over 255 levels."""
    lo, hi = min(0.0, float(np.min(x))), max(0.0, float(np.max(x)))
    scale = x.dtype.type((hi - lo) / 255)
    if scale == 0:  # all zeros: scale 1, as onnxruntime has it, and every level is the zero point, 0
        return np.asarray(x.dtype.type(1)), np.asarray(np.uint8(0))
    return np.asarray(scale), np.asarray(np.uint8(np.clip(np.rint(-lo / scale), 0, 255)))


def _levels(x, scale, zp):
    """x's uint8 levels for that scale and zero point, as floats: round(x / scale) + zp, saturated."""
    return np.clip(np.rint(x / scale) + zp, 0, 255)


@through(DynamicQuantizeLinear)
class DynamicQuantizeLinearThrough(DynamicQuantizeLinear):
    """DynamicQuantizeLinear whose y passes derivatives as 1 / scale (its range covers the
    tensor, so nothing saturates); the scale and zero point carry none, as an observer's."""

    nondiff = ()

    def jvp(cx, Xdot, **_):
        return Xdot / cx.y[1].astype(Xdot.dtype)

    def vjp(cx, Ybar, **_):
        return (Ybar / cx.y[1].astype(Ybar.dtype),)


def _shifted(v, zp, shape=None):
    """v - zero_point in float64: exact for 8-bit integers; `shape` reshapes a per-row or
    per-channel zero point to broadcast against v."""
    v = np.asarray(v, np.float64)
    if zp is None:
        return v
    zp = np.asarray(zp, np.float64)
    return v - (zp.reshape(shape) if shape is not None and zp.ndim else zp)


def _matmul_operands(a, b, a_zp, b_zp):
    """A - a_zero_point (scalar, or one per row of A) and B - b_zero_point (scalar, or one per
    column of B), in float64."""
    return _shifted(a, a_zp, (-1, 1)), _shifted(b, b_zp)


@rule("MatMulInteger", since=10)
class MatMulInteger:
    """Y = (A - a_zero_point) @ (B - b_zero_point) in int32: numpy's matmul semantics."""

    nondiff = (0, 1, 2, 3)

    def forward(A, B, a_zero_point=None, b_zero_point=None):
        return np.matmul(*_matmul_operands(A, B, a_zero_point, b_zero_point)).astype(np.int32)


@through(MatMulInteger)
class MatMulIntegerThrough(MatMulInteger):
    """MatMulInteger as the product of its shifted operands: linear in each integer input."""

    nondiff = (2, 3)
    keeps = True

    def jvp(cx, Adot, Bdot, *_):
        dt = _tangent_dtype(Adot, Bdot)
        A, B = (v.astype(dt) for v in _matmul_operands(*padded(cx.x, 4)))
        return MatMul.jvp(Ctx((A, B), cx.y), _float(Adot, dt), _float(Bdot, dt))

    def vjp(cx, Ybar):
        A, B = _matmul_operands(*padded(cx.x, 4))
        return MatMul.vjp(Ctx((A.astype(Ybar.dtype), B.astype(Ybar.dtype)), cx.y, cx.need[:2], cx.keep[:2]), Ybar) + (None, None)


def _tangent_dtype(*tangents):
    """The float type the tangents carry (an integer's tangent from a quantizer is a float)."""
    t = next(t for t in tangents if t is not None)
    return t.dtype if t.dtype.kind == "f" else np.dtype(np.float64)


def _float(t, dtype):
    return None if t is None else t.astype(dtype, copy=False)


def _conv_operands(x, w, x_zp, w_zp):
    """x - x_zero_point and w - w_zero_point (scalar, or one per output channel), in float64."""
    return _shifted(x, x_zp), _shifted(w, w_zp, (-1,) + (1,) * (np.ndim(w) - 1))


@rule("ConvInteger", since=10)
class ConvInteger:
    """Y = conv(x - x_zero_point, w - w_zero_point) in int32: Conv's geometry, no bias (padding
    holds the zero point, a zero once shifted)."""

    nondiff = (0, 1, 2, 3)

    def forward(x, w, x_zero_point=None, w_zero_point=None, **attrs):
        X, W = _conv_operands(x, w, x_zero_point, w_zero_point)
        return np.rint(Conv.forward(X, W, **attrs)).astype(np.int32)


@through(ConvInteger)
class ConvIntegerThrough(ConvInteger):
    """ConvInteger as the convolution of its shifted operands: linear in x (and in w)."""

    nondiff = (2, 3)
    keeps = True

    def jvp(cx, Xdot, Wdot, *_, **attrs):
        dt = _tangent_dtype(Xdot, Wdot)
        X, W = (v.astype(dt) for v in _conv_operands(*padded(cx.x, 4)))
        return Conv.jvp(Ctx((X, W), cx.y), _float(Xdot, dt), _float(Wdot, dt), **attrs)

    def vjp(cx, Ybar, **attrs):
        X, W = (v.astype(Ybar.dtype) for v in _conv_operands(*padded(cx.x, 4)))
        return Conv.vjp(Ctx((X, W), cx.y, cx.need[:2], cx.keep[:2]), Ybar, **attrs) + (None, None)


MS = "com.microsoft"


class _BiasOnly:
    """Derivatives through the float bias (input `bias`) alone: the integers carry none."""

    keeps = True

    def jvp(cx, *dots):
        b = cx.rule.bias
        return _bias_jvp(cx, dots[b] if len(dots) > b else None)

    def vjp(cx, Ybar):
        return (None,) * cx.rule.bias + (_bias_vjp(cx, Ybar, cx.rule.bias),)


class _LinearInA:
    """Straight through: linear in A too, Y = A @ weight(cx) + bias, weight the dequantized B times
    whatever scales A's levels."""

    def jvp(cx, Adot, *dots):
        b = cx.rule.bias - 1  # dots start after A
        dt = Adot.dtype if Adot is not None else np.dtype(np.float32)
        through = None if Adot is None else np.matmul(_float(Adot, dt), cx.rule.weight(cx, dt))
        return add(through, _bias_jvp(cx, dots[b] if len(dots) > b else None))

    def vjp(cx, Ybar):
        Abar = np.matmul(Ybar, np.swapaxes(cx.rule.weight(cx, Ybar.dtype), -1, -2)) if cx.need[0] else None
        return (Abar,) + (None,) * (cx.rule.bias - 1) + (_bias_vjp(cx, Ybar, cx.rule.bias),)


@rule("MatMulIntegerToFloat", since=1, domain=MS)
class MatMulIntegerToFloat(_BiasOnly):
    """Y = (A - a_zero_point) @ (B - b_zero_point) * a_scale * b_scale + bias, in float32 (onnxruntime's
    fusion of MatMulInteger, Cast and the scales' Mul): b's scale and zero point per tensor or per
    column. Linear in bias; the integers carry no derivative."""

    nondiff = (0, 1, 2, 3, 4, 5)
    bias = 6

    def forward(A, B, a_scale, b_scale, a_zero_point=None, b_zero_point=None, bias=None):
        acc = np.matmul(*_matmul_operands(A, B, a_zero_point, b_zero_point))
        m = np.asarray(a_scale, np.float32).reshape(()) * np.asarray(b_scale, np.float32)
        Y = (acc.astype(np.float32) * m).astype(np.float32)
        return Y if bias is None else Y + bias

    def weight(cx, dtype):
        """What A's levels multiply: (B - b_zero_point) * a_scale * b_scale."""
        B, b_zp = cx.x[1], padded(cx.x, 6)[5]
        scales = np.asarray(cx.x[2], np.float64).reshape(()) * np.asarray(cx.x[3], np.float64)
        return (_shifted(B, b_zp) * scales).astype(dtype)


@through(MatMulIntegerToFloat)
class MatMulIntegerToFloatThrough(_LinearInA, MatMulIntegerToFloat):
    """MatMulIntegerToFloat linear in A's integers (their tangent from a quantizer) too."""

    nondiff = (1, 2, 3, 4, 5)


@rule("DynamicQuantizeMatMul", since=1, domain=MS)
class DynamicQuantizeMatMul(_BiasOnly):
    """Y = DynamicQuantizeLinear(A) times (B - b_zero_point), scaled, plus bias: onnxruntime's fusion
    of quantize_dynamic's MatMul. A's quantization is piecewise constant (its derivative zero, and
    the summary says so); bias passes derivatives."""

    nondiff = (0, 1, 2, 3)
    bias = 4

    def forward(A, B, b_scale, b_zero_point=None, bias=None):
        q, a_scale, a_zp = _dynamic(A)
        return MatMulIntegerToFloat.forward(q, B, a_scale, b_scale, a_zp, b_zero_point, bias)

    def weight(cx, dtype):
        """Straight through A's quantizer (1 / scale, the scale a constant): the dequantized B."""
        B, b_scale, b_zp = padded(cx.x, 4)[1:4]
        return (_shifted(B, b_zp) * np.asarray(b_scale, np.float64)).astype(dtype)


@through(DynamicQuantizeMatMul)
class DynamicQuantizeMatMulThrough(_LinearInA, DynamicQuantizeMatMul):
    """DynamicQuantizeMatMul straight through its quantizer: the float product with the dequantized B."""

    nondiff = (1, 2, 3)


def _bias_jvp(cx, Bdot):
    """The bias's tangent, broadcast over Y (None without one)."""
    if Bdot is None:
        return None
    lead = Bdot.ndim - 1
    return np.broadcast_to(Bdot.reshape(Bdot.shape[:lead] + (1,) * (cx.y[0].ndim - 1) + Bdot.shape[lead:]),
                           Bdot.shape[:lead] + cx.y[0].shape)


def _bias_vjp(cx, Ybar, i):
    """The bias's cotangent: Ybar summed over all but its last axis (and the lead ones), the samples kept if asked."""
    if i >= len(cx.x) or cx.x[i] is None or not cx.need[i]:
        return None
    lead = cx.lead(Ybar)
    keep = cx.keep[i]
    axes = tuple(range(lead + (1 if keep else 0), Ybar.ndim - 1))
    return Ybar.sum(axis=axes) if axes else Ybar


@through(Cast)
class CastThrough(Cast):
    """Cast that passes derivatives from an integer input to a float output too: the integers of
    a quantized product, whose tangents --straight-through carries."""

    def jvp(cx, Xdot, *, to, **_):
        return Xdot if to in _FLOAT_TYPES else None

    def vjp(cx, Ybar, *, to, **_):
        return (Ybar if to in _FLOAT_TYPES else None,)


# ---- MatMulNBits: weights of 2, 4 or 8 bits in blocks along K (onnxruntime's weight-only quantization)


def _unpack(packed, bits, count):
    """Codes of `bits` bits packed low-first in the bytes of the last axis: (..., bytes) -> (..., count)."""
    per = 8 // bits
    codes = (packed[..., None].astype(np.int64) >> (np.arange(per) * bits)) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[:-1] + (-1,))[..., :count]


def _nbits_parts(B, scales, zero_points, g_idx, *, K, N, bits, block_size, dtype):
    """The weight (N, K) as its integer levels less their zero points (float), the scales (N, blocks)
    and each k's block as a one-hot (K, blocks): W = levels * (scales @ onehot.T). A float zero
    point is subtracted as it is (HQQ's). Column k's scale and zero point are those of block
    k // block_size, or g_idx[k] (act-order GPTQ: the columns quantized in another order)."""
    blocks = -(-K // block_size)
    q = _unpack(np.asarray(B).reshape(N, blocks, -1), bits, block_size).reshape(N, -1)[:, :K]
    s = np.asarray(scales).reshape(N, blocks)
    if zero_points is None:
        zp = np.full((N, blocks), 1 << (bits - 1))
    elif np.asarray(zero_points).dtype.kind == "f":
        zp = np.asarray(zero_points, np.float64).reshape(N, blocks)
    else:
        zp = _unpack(np.asarray(zero_points).reshape(N, -1), bits, blocks)
    block = np.arange(K) // block_size
    if g_idx is not None and np.size(g_idx):
        if zero_points is not None and np.asarray(zero_points).dtype.kind != "f":
            raise UnsupportedOpError("MatMulNBits with g_idx and integer zero points is not supported: onnxruntime (1.32) "
                                     "takes them as 2^(bits-1) there, whatever they hold")
        block = np.ravel(g_idx).astype(np.int64)
        if block.size != K or block.min() < 0 or block.max() >= blocks:
            raise ModelError(f"MatMulNBits: g_idx holds {block.size} block indices in [{block.min()}, {block.max()}]; "
                             f"K = {K} in [0, {blocks - 1}] are expected")
    onehot = (block[:, None] == np.arange(blocks)).astype(dtype)
    return (q - zp[:, block]).astype(dtype), s, onehot


def _int8_rows(A, block_size):
    """A as onnxruntime's accuracy_level 4 rounds it: each row's blocks of block_size along K to
    int8 levels of max|a| / 127 (in float32), returned dequantized."""
    K = A.shape[-1]
    blocks = -(-K // block_size)
    a = np.zeros(A.shape[:-1] + (blocks * block_size,), np.float32)
    a[..., :K] = A
    a = a.reshape(A.shape[:-1] + (blocks, block_size))
    scale = np.abs(a).max(-1, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.rint(a * inverse) * scale
    return q.reshape(A.shape[:-1] + (-1,))[..., :K].astype(A.dtype)


def _int8_product(attrs, zero_points, g_idx=None):
    """Whether onnxruntime rounds A to int8: at accuracy_level 4 where it has an int8 kernel, as its
    x86 kernels (1.32) have for 4 and 8 bits, and for 2 bits in blocks of 32 to 128; not with float
    zero points, nor with g_idx (it dequantizes W then)."""
    bits, size = attrs.get("bits", 4), attrs["block_size"]
    kernel = bits in (4, 8) or (bits == 2 and 32 <= size <= 128)
    return (attrs.get("accuracy_level") == 4 and kernel and (zero_points is None or np.asarray(zero_points).dtype.kind != "f")
            and (g_idx is None or np.size(g_idx) == 0))


class _NBits:
    """A MatMulNBits node's parts in `dtype`: the weight W (N, K), its levels less their zero points,
    each k's block as a one-hot (W = levels * (scales @ onehot.T)), what the product reads of A
    (A, or its int8 rounding: see _int8_product) and whether that is a rounding."""

    def __init__(self, x, attrs, dtype):
        A, B, scales, zero_points, g_idx = padded(x, 5)
        self.levels, s, self.onehot = _nbits_parts(B, scales, zero_points, g_idx, K=attrs["K"], N=attrs["N"],
                                                   bits=attrs.get("bits", 4), block_size=attrs["block_size"], dtype=dtype)
        self.W = self.levels * (s.astype(dtype) @ self.onehot.T)
        self.rounds = _int8_product(attrs, zero_points, g_idx)
        self.A = (_int8_rows(A, attrs["block_size"]) if self.rounds else A).astype(dtype)


def _gbq_levels(data, scales, zero_points, bits, block_size, gather_axis, quantize_axis):
    """A GatherBlockQuantized table's codes less their zero points, (R, C) integers, and its
    block size: uint8 codes of `bits` bits packed low-first along the last axis, zero points packed
    alike (2^(bits-1) when absent), or int4 or uint4 codes, one a value (zero points of 0 when
    absent, as onnxruntime takes them); one scale per row and block of the last axis."""
    dtype = np.asarray(data).dtype
    four = dtype.name in ("int4", "uint4")
    if dtype != np.uint8 and not four:
        raise UnsupportedOpError(f"GatherBlockQuantized of {dtype} data is not supported; uint8, int4 and uint4 codes are")
    if np.ndim(data) != 2 or gather_axis % 2 != 0 or quantize_axis % 2 != 1 or (bits not in (2, 4, 8) and not four):
        raise UnsupportedOpError("GatherBlockQuantized: only a table of rows (2-D) gathered on axis 0 and quantized along "
                                 "axis 1, in 2, 4 or 8 bits, is supported")
    R, C = data.shape[0], data.shape[1] * (1 if four else 8 // bits)
    blocks = -(-C // block_size)
    if np.shape(scales) != (R, blocks):
        raise UnsupportedOpError(f"GatherBlockQuantized: scales of shape {np.shape(scales)}, not {(R, blocks)}")
    if four:
        codes = np.asarray(data).astype(np.int64)
        zp = np.zeros((R, blocks), np.int64) if zero_points is None else np.asarray(zero_points).astype(np.int64)
    else:
        codes = _unpack(np.asarray(data), bits, C)
        zp = np.full((R, blocks), 1 << (bits - 1)) if zero_points is None else _unpack(np.asarray(zero_points), bits, blocks)
    return codes - np.repeat(zp, block_size, axis=1)[:, :C], block_size


def _per_block(T, block_size, blocks):
    """(..., C) summed within each block of the last axis: (..., blocks)."""
    pad = blocks * block_size - T.shape[-1]
    T = np.concatenate([T, np.zeros(T.shape[:-1] + (pad,), T.dtype)], -1) if pad else T
    return T.reshape(T.shape[:-1] + (blocks, block_size)).sum(-1)


@rule("GatherBlockQuantized", since=1, domain=MS)
class GatherBlockQuantized:
    """Y = rows of a block-quantized table at `indices`, dequantized (onnxruntime-genai's int4
    and int8 embeddings): (codes - zero points) * their block's scale; uint8, int4 or uint4 codes. Linear
    in the scales, which are parameters (per sample too, like an embedding table's); the codes
    and zero points are integers."""

    nondiff = (0, 1, 3)
    keeps = True

    def forward(data, indices, scales, zero_points=None, *, bits=4, block_size=128, gather_axis=0, quantize_axis=1):
        L, b = _gbq_levels(data, scales, zero_points, bits, block_size, gather_axis, quantize_axis)
        T = L * np.repeat(np.asarray(scales), b, axis=1)[:, :L.shape[1]]
        return np.take(T, _wrap(indices, T.shape[0]), axis=0).astype(np.asarray(scales).dtype)

    def jvp(cx, _d, _i, Sdot, _z=None, *, bits=4, block_size=128, gather_axis=0, quantize_axis=1):
        data, indices, scales, zero_points = padded(cx.x, 4)
        L, b = _gbq_levels(data, scales, zero_points, bits, block_size, gather_axis, quantize_axis)
        Tdot = L * np.repeat(Sdot, b, axis=-1)[..., :L.shape[1]]
        return np.take(Tdot, _wrap(indices, L.shape[0]), axis=Sdot.ndim - 2)

    def vjp(cx, Ybar, *, bits=4, block_size=128, gather_axis=0, quantize_axis=1):
        data, indices, scales, zero_points = padded(cx.x, 4)
        L, b = _gbq_levels(data, scales, zero_points, bits, block_size, gather_axis, quantize_axis)
        table = np.broadcast_to(Ybar.dtype.type(0), L.shape)  # the dequantized table: its cotangent is a Gather's
        rows = np.broadcast_to(Ybar.dtype.type(0), np.shape(indices) + L.shape[1:])
        Tbar = Gather.vjp(Ctx((table, indices), (rows,), (True, False), (cx.keep[2], False)), Ybar, axis=0)[0]
        return None, None, _per_block(Tbar * L, b, scales.shape[1]).astype(Ybar.dtype), None


@rule("MatMulNBits", since=1, domain=MS)
class MatMulNBits:
    """Y = A @ W^T + bias, W (N, K) quantized to `bits` bits in blocks of block_size along K: W[n, k] =
    (level - zero_point) * scale of k's block. The levels are constants: the derivative in A is
    exact, and in the scales (parameters) and the bias linear. A float zero point is taken as a
    constant. At accuracy_level 4 onnxruntime rounds A's rows to int8 in blocks for its product
    (see _int8_product): so does jaccli, and the derivative in A is then zero (piecewise
    constant; the summary says so), or with --straight-through that of the float product."""

    keeps = True
    nondiff = (1, 3, 4)
    through_a = False

    def forward(A, B, scales, zero_points=None, g_idx=None, bias=None, *, K, N, bits=4, block_size, accuracy_level=0):
        attrs = dict(K=K, N=N, bits=bits, block_size=block_size, accuracy_level=accuracy_level)
        q = _NBits((A, B, scales, zero_points, g_idx), attrs, A.dtype)
        Y = np.matmul(q.A, q.W.T)
        return Y if bias is None else Y + bias.astype(A.dtype)

    def jvp(cx, Adot, Bdot=None, Sdot=None, Zdot=None, Gdot=None, biasdot=None, **attrs):
        q = _NBits(cx.x, attrs, next(t.dtype for t in (Adot, Sdot, biasdot) if t is not None))
        out = np.matmul(Adot, q.W.T) if Adot is not None and (cx.rule.through_a or not q.rounds) else None
        if Sdot is not None:  # W's tangent: each level times its block's scale tangent
            lead = Sdot.ndim - cx.x[2].ndim
            Wdot = q.levels * (Sdot.reshape(Sdot.shape[:lead] + (attrs["N"], -1)) @ q.onehot.T)  # (*lead, N, K)
            out = add(out, np.einsum("...k,tnk->t...n", q.A, Wdot.reshape((-1,) + Wdot.shape[-2:])).reshape(
                Sdot.shape[:lead] + cx.y[0].shape))
        return add(out, _bias_jvp(cx, biasdot))

    def vjp(cx, Ybar, **attrs):
        q = _NBits(cx.x, attrs, Ybar.dtype)
        Abar = np.matmul(Ybar, q.W) if cx.need[0] and (cx.rule.through_a or not q.rounds) else None
        Sbar = None
        if len(cx.x) > 2 and cx.need[2]:
            lead, A = cx.lead(Ybar), q.A
            if cx.keep[2]:  # per sample: rows of one sample together
                S = A.shape[0]
                Yf = Ybar.reshape(Ybar.shape[:lead] + (S, -1, Ybar.shape[-1]))
                Wbar = np.einsum("...srn,srk->...snk", Yf, A.reshape(S, -1, A.shape[-1]))
            else:
                Yf = Ybar.reshape(Ybar.shape[:lead] + (-1,) + Ybar.shape[-1:])  # rows: (*lead, rows, N)
                Wbar = np.einsum("...rn,rk->...nk", Yf, A.reshape(-1, A.shape[-1]))
            Sbar = ((Wbar * q.levels) @ q.onehot).reshape(Wbar.shape[:-2] + cx.x[2].shape)
        return (Abar, None, Sbar, None, None, _bias_vjp(cx, Ybar, 5))


@through(MatMulNBits)
class MatMulNBitsThrough(MatMulNBits):
    """MatMulNBits at accuracy_level 4 straight through its rounding of A: the float product."""

    through_a = True


# ---- MatMulBnb4: weights of 4-bit NormalFloat or FP4 codes (QLoRA's), in blocks with an absmax ---


_BNB4_CODES = {  # the value of each code, as onnxruntime's kernel reads it: 0 FP4, 1 NF4 (bitsandbytes')
    0: [0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
        0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25],
    1: [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
        -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
}


def _bnb4_parts(B, *, K, N, block_size, quant_type, transB=1):
    """A MatMulBnb4 weight as its codes' values (N, K) and each element's block (N*K,): the
    weight, (N, K) in PyTorch's layout, is its codes' values times its block's absmax. The codes
    are packed two a byte, the first in the high nibble, over the weight flattened."""
    if int(quant_type) not in _BNB4_CODES:
        raise UnsupportedOpError(f"MatMulBnb4 with quant_type {quant_type} is not supported (0, FP4, and 1, NF4, are)")
    if not transB:
        raise UnsupportedOpError("MatMulBnb4 with transB=0 (a training graph's backward product) is not supported")
    packed = np.ravel(np.asarray(B))
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:N * K]
    values = np.asarray(_BNB4_CODES[int(quant_type)], np.float64)[codes].reshape(N, K)
    return values, np.arange(N * K) // block_size


@rule("MatMulBnb4", since=1, domain=MS)
class MatMulBnb4:
    """Y = A @ W^T, W (N, K) quantized to 4-bit FP4 or NF4 codes in blocks of block_size over its
    elements, each block scaled by its absmax (onnxruntime's MatMulBnb4Quantizer). The codes are
    constants: the derivative in A is exact, and in the absmax values (parameters) linear.
    transB=0, a training graph's backward product, is refused."""

    nondiff = (1,)
    keeps = True

    def forward(A, B, absmax, *, K, N, block_size, quant_type, transB=1, training_mode=0):
        attrs = dict(K=K, N=N, block_size=block_size, quant_type=quant_type, transB=transB)
        return np.matmul(A, _bnb4_weight(B, absmax, attrs, A.dtype).T)

    def jvp(cx, Adot, _b=None, Mdot=None, *, training_mode=0, **attrs):
        A, B, absmax = cx.x
        values, block = _bnb4_parts(B, **attrs)
        out = None if Adot is None else np.matmul(Adot, _scaled(values, block, absmax, Adot.dtype).T)
        if Mdot is not None:
            lead = Mdot.shape[:Mdot.ndim - 1]
            Wdot = (values * Mdot[..., block].reshape(lead + values.shape)).astype(Mdot.dtype)  # (*lead, N, K)
            prod = np.einsum("...k,tnk->t...n", A, Wdot.reshape((-1,) + values.shape))
            out = add(out, prod.reshape(lead + cx.y[0].shape))
        return out

    def vjp(cx, Ybar, *, training_mode=0, **attrs):
        A, B, absmax = cx.x
        values, block = _bnb4_parts(B, **attrs)
        Abar = np.matmul(Ybar, _scaled(values, block, absmax, Ybar.dtype)) if cx.need[0] else None
        Mbar = None
        if cx.need[2]:
            lead, per = cx.lead(Ybar), cx.keep[2]
            S = A.shape[0] if per else 1
            Yf = Ybar.reshape(Ybar.shape[:lead] + (S, -1, Ybar.shape[-1]))  # (*lead, S, rows, N)
            Wbar = np.einsum("...srn,srk->...snk", Yf, A.reshape(S, -1, A.shape[-1]))  # (*lead, S, N, K)
            sums = _per_block((Wbar * values).reshape(Wbar.shape[:-2] + (-1,)), attrs["block_size"], np.size(absmax))
            Mbar = (sums if per else sums[..., 0, :]).astype(Ybar.dtype)
        return Abar, None, Mbar


def _scaled(values, block, absmax, dtype):
    """The codes' values (N, K) times their blocks' absmax: the weight."""
    return (values * np.asarray(absmax, np.float64)[block].reshape(values.shape)).astype(dtype)


def _bnb4_weight(B, absmax, attrs, dtype):
    """The dequantized weight (N, K)."""
    return _scaled(*_bnb4_parts(B, **attrs), absmax, dtype)


# ---- com.microsoft's QuantizeLinear and DequantizeLinear: what onnxruntime's quantizer writes for
# types the default domain's opset lacks (16-bit, 4-bit) or when asked (extra_options
# UseQDQContribOps). The same formulas as the standard operators, axis 1 by default -----------------


@rule("DequantizeLinear", since=1, domain=MS)
class MsDequantizeLinear(DequantizeLinear13):
    """y = (x - x_zero_point) * x_scale, per tensor or along `axis` (default 1); linear in the scale."""


@through(MsDequantizeLinear)
class MsDequantizeLinearThrough(_DequantizeThrough, MsDequantizeLinear):
    """The straight-through variant, as for the standard DequantizeLinear."""


@rule("QuantizeLinear", since=1, domain=MS)
class MsQuantizeLinear(QuantizeLinear):
    """y = saturate(round(x / y_scale) + y_zero_point), an integer: piecewise constant."""


@through(MsQuantizeLinear)
class MsQuantizeLinearThrough(QuantizeLinearThrough):
    """The straight-through variant, as for the standard QuantizeLinear."""


# ---- QEmbedLayerNormalization: quantize_dynamic's EmbedLayerNormalization (a BERT optimized by
# onnxruntime's transformer optimizer, then quantized, as optimum does it) -------------------------


def _qembed_parts(x, dtype):
    """The tables dequantized, (level - zero point) * scale, each per tensor: (word, position,
    segment or None, gamma, beta) as floats, and the same as levels (level - zero point)."""
    (ids, seg, wq, pq, sq, gq, bq, _, ws, ps, ss, gs, bs, wz, pz, sz, gz, bz) = padded(x, 18)
    levels = [None if q is None else np.asarray(q, np.float64) - np.asarray(z, np.float64).reshape(())
              for q, z in ((wq, wz), (pq, pz), (sq if seg is not None else None, sz), (gq, gz), (bq, bz))]
    scales = [None if s is None else np.asarray(s, np.float64).reshape(()) for s in (ws, ps, ss, gs, bs)]
    tables = [None if L is None else (L * s).astype(dtype) for L, s in zip(levels, scales)]
    return tables, levels


@rule("QEmbedLayerNormalization", since=1, domain=MS)
class QEmbedLayerNormalization:
    """EmbedLayerNormalization whose tables, gamma and beta are 8-bit integers, each with its
    scale and zero point (per tensor): dequantized, then summed at the tokens' rows, positions
    0..S-1 and segments, and normalized, as onnxruntime computes it; and the mask index (each
    sample's count of mask values equal to 1). Linear in the scales, which are parameters."""

    nondiff = tuple(range(8)) + tuple(range(13, 18))
    keeps = True
    n_diff_outputs = 1

    def forward(input_ids, segment_ids, word_embedding_quant, position_embedding_quant, segment_embedding_quant=None,
                gamma_quant=None, beta_quant=None, mask=None, *rest, epsilon=1e-12):
        x = (input_ids, segment_ids, word_embedding_quant, position_embedding_quant, segment_embedding_quant, gamma_quant,
             beta_quant, mask, *rest)
        dtype = np.asarray(rest[0]).dtype if np.asarray(rest[0]).dtype.kind == "f" else np.float32
        (word, pos, segtab, gamma, beta), _ = _qembed_parts(x, dtype)
        Y = EmbedLayerNormalization.forward(input_ids, segment_ids, word, pos, segtab, gamma, beta, epsilon=epsilon)[0]
        count = np.zeros(input_ids.shape[0], np.int32) if mask is None else (np.asarray(mask) == 1).sum(axis=1, dtype=np.int32)
        return Y, count

    def jvp(cx, *dots, epsilon=1e-12):
        dots = padded(dots, 18)
        ids, seg = cx.x[0], cx.x[1]
        (word, pos, segtab, gamma, beta), levels = _qembed_parts(cx.x, cx.y[0].dtype)
        rows = _qembed_rows(ids, seg, levels)
        E = _embed_sum(ids, seg, word, pos, segtab, None)
        lead = next(d.shape[:d.ndim - np.ndim(cx.x[8 + k])] for k, d in enumerate(dots[8:13]) if d is not None)
        per = lambda d, k: d.reshape(lead + (1,) * (3 if k < 3 else 1))  # noqa: E731  (a scale's tangent, broadcast)
        Edot = add(*(R * per(dots[8 + k], k) for k, R in enumerate(rows) if R is not None and dots[8 + k] is not None))
        Gdot, Bdot = (None if dots[8 + k] is None else levels[k] * per(dots[8 + k], k) for k in (3, 4))
        return LayerNormalization.jvp(Ctx((E, gamma, beta), (cx.y[0],)), Edot, Gdot, Bdot, axis=-1, epsilon=epsilon)[0], None

    def vjp(cx, Ybar, _mbar=None, *, epsilon=1e-12):
        ids, seg = cx.x[0], cx.x[1]
        need, keep = padded(cx.need, 18, False), padded(cx.keep, 18, False)
        (word, pos, segtab, gamma, beta), levels = _qembed_parts(cx.x, Ybar.dtype)
        E = _embed_sum(ids, seg, word, pos, segtab, None)
        lead = cx.lead(Ybar)
        ln = Ctx((E, gamma, beta), (cx.y[0],), (any(need[8:11]), need[11], need[12]), (False, keep[11], keep[12]),
                 LayerNormalization)
        Ebar, Gbar, Bbar = LayerNormalization.vjp(ln, Ybar, axis=-1, epsilon=epsilon)
        out = [None] * 18
        for k, R in enumerate(_qembed_rows(ids, seg, levels)):
            if R is not None and need[8 + k]:  # summed over the tokens (and the samples, unless per sample)
                axes = tuple(range(lead + (1 if keep[8 + k] else 0), Ebar.ndim))
                out[8 + k] = (Ebar * R).sum(axis=axes)
        for k, bar in ((3, Gbar), (4, Bbar)):
            if bar is not None and need[8 + k]:
                out[8 + k] = (bar * levels[k]).sum(axis=-1)
        for k in range(8, 13):
            if out[k] is not None:
                out[k] = out[k].reshape(out[k].shape + np.shape(cx.x[k])).astype(Ybar.dtype)
        return tuple(out)


def _qembed_rows(ids, seg, levels):
    """The levels at each token's rows (N, S, H): word, position and segment (None where absent)."""
    word, pos, segtab = levels[:3]
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return [word[_wrap(ids, word.shape[0])], pos[positions], None if segtab is None else segtab[_wrap(seg, segtab.shape[0])]]
