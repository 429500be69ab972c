"""Shape and layout operators. Linear ones push tangents through themselves; VJP is the adjoint."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from onnx import TensorProto, helper

from . import rule
from ..errors import ModelError, UnsupportedOpError
from ._util import check_alloc, expand, need_no_keep, neg_axis, padded, per_place, unbroadcast


def _to_shape(D, cx, lead=None):
    """Reshape a (co)tangent to leading axes + the output's primal shape."""
    lead = D.ndim - cx.x[0].ndim if lead is None else lead
    return D.reshape(D.shape[:lead] + cx.y[0].shape)


def _back_to_input(Ybar, cx):
    """Ybar reshaped to the input's shape; written into the walker's destination for it when
    there is one and it can take Ybar's shape as a view (one pass where a reshape of a
    strided cotangent copies, and the destination would copy again)."""
    lead = cx.lead(Ybar)
    dest = cx.dest(0)
    if dest is not None:
        try:
            view = dest.view()
            view.shape = Ybar.shape  # raises where that would need a copy
        except (AttributeError, ValueError):
            pass
        else:
            np.copyto(view, Ybar)
            return dest
    return Ybar.reshape(Ybar.shape[:lead] + cx.x[0].shape)


class _Reshaping:
    """Ops that only reinterpret the shape of input 0: tangent and cotangent are reshaped."""

    keeps = False
    batch_from_data = True  # see _SliceBase

    def jvp(cx, Xdot, *_, **__):
        return _to_shape(Xdot, cx)

    def vjp(cx, Ybar, *_, **__):
        return (_back_to_input(Ybar, cx),) + (None,) * (len(cx.x) - 1)


@rule("Reshape", since=5)
class Reshape(_Reshaping):
    """Y = X viewed with `shape` (0 copies the input's dim unless allowzero, -1 is inferred)."""

    nondiff = (1,)

    def forward(data, shape, *, allowzero=0):
        shape = [int(s) for s in shape]
        if not allowzero:
            shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return data.reshape(shape)


@rule("Flatten", since=1)
class Flatten(_Reshaping):
    """Y = X reshaped to (prod(shape[:axis]), prod(shape[axis:]))."""

    def forward(input, *, axis):
        a = axis + input.ndim if axis < 0 else axis  # axis may be the rank itself: (size, 1)
        return input.reshape(math.prod(input.shape[:a]), math.prod(input.shape[a:]))


class _AxesReshaping(_Reshaping):
    nondiff = (1,)


@rule("Squeeze", since=1)
class Squeeze1(_AxesReshaping):
    """Y = X without the size-1 axes listed in `axes` (all size-1 axes if none)."""

    def forward(data, *, axes=None):
        return _squeeze(data, axes)


@rule("Squeeze", since=13)
class Squeeze13(_AxesReshaping):
    """Y = X without the size-1 axes listed in input `axes` (all size-1 axes if absent)."""

    def forward(data, axes=None):
        return _squeeze(data, axes)


def _squeeze(data, axes):
    if axes is None:
        return np.squeeze(data)
    return np.squeeze(data, axis=tuple(int(a) for a in np.ravel(axes)))


@rule("Unsqueeze", since=1)
class Unsqueeze1(_AxesReshaping):
    """Y = X with size-1 axes inserted at `axes` (positions in the output)."""

    def forward(data, *, axes):
        return _unsqueeze(data, axes)


@rule("Unsqueeze", since=13)
class Unsqueeze13(_AxesReshaping):
    """Y = X with size-1 axes inserted at input `axes` (positions in the output)."""

    def forward(data, axes):
        return _unsqueeze(data, axes)


def _unsqueeze(data, axes):
    rank = data.ndim + len(np.ravel(axes))
    return np.expand_dims(data, tuple(int(a) % rank for a in np.ravel(axes)))


class _PassThrough:
    """Y = X (tangent and cotangent pass unchanged)."""

    keeps = False

    def jvp(cx, Xdot, *_, **__):
        return Xdot

    def vjp(cx, Ybar, *_, **__):
        return (Ybar,) + (None,) * (len(cx.x) - 1)


@rule("Identity", since=1)
class Identity(_PassThrough):
    """Y = X"""

    def forward(input):
        return input


@rule("Dropout", since=1)
class Dropout(_PassThrough):
    """Y = X at inference, or in training mode with a ratio of 0 (the mask output, if asked for,
    is all ones)."""

    nondiff = (1, 2)

    def forward(data, ratio=None, training_mode=None, **_):
        training = training_mode is not None and bool(np.ravel(training_mode)[0])
        if training and (ratio is None or float(np.ravel(ratio)[0]) != 0):  # the default ratio is 0.5
            raise UnsupportedOpError("Dropout with training_mode=True is random; export the model in eval mode")
        return data, np.ones(data.shape, dtype=bool)


_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _converted(input, dtype, saturate):
    """input as `dtype`: floats to integers truncated; to a float8 or float4 type (ml_dtypes'),
    with `saturate`, values beyond its range and infinities to its largest finite value."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(input.dtype, np.floating):
        return np.trunc(input).astype(dtype)
    if saturate and dtype.name.startswith(("float8", "float4")) and input.dtype.kind == "f":
        import ml_dtypes

        largest = float(ml_dtypes.finfo(dtype).max)
        input = np.clip(input, -largest, largest)
    return input.astype(dtype)


@rule("Cast", since=6)
class Cast:
    """Y = X converted to type `to`; float types become jaccli's working float type."""

    def forward(input, *, to, saturate=1, round_mode="up"):
        # the plan maps float targets to the working dtype
        return _converted(input, helper.tensor_dtype_to_np_dtype(to), saturate)

    def jvp(cx, Xdot, *, to, **_):
        return Xdot if to in _FLOAT_TYPES and np.issubdtype(cx.x[0].dtype, np.floating) else None

    def vjp(cx, Ybar, *, to, **_):
        return (Ybar if to in _FLOAT_TYPES and np.issubdtype(cx.x[0].dtype, np.floating) else None,)


@rule("BitCast", since=26)
class BitCast:
    """The input's bits read as type `to`, of the same width (little endian). No value is
    converted: a float's bits read as an integer are no step function of it that a derivative of
    zero would describe (masking the sign bit and reading the float back is |x|), so a BitCast
    of a value that depends on what is differentiated is refused (see Plan)."""

    nondiff = (0,)

    def opaque(attrs):
        return {0: "the bits of a value that depends on what is differentiated, read as another type, have no derivative"}

    def forward(input, *, to):
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(to))
        if input.dtype.kind == "f" and dtype.itemsize != input.dtype.itemsize:
            # jaccli computes in its working float type: the model's own float of the width asked
            input = input.astype({2: np.float16, 4: np.float32, 8: np.float64}.get(dtype.itemsize, input.dtype))
        if dtype.itemsize != input.dtype.itemsize:
            raise ModelError(f"BitCast from {input.dtype} to {dtype}: the widths differ")
        return np.ascontiguousarray(input).astype(input.dtype.newbyteorder("<"), copy=False).view(dtype.newbyteorder("<"))


@rule("Cast", since=1)
class Cast1(Cast):
    """Y = X converted to the type named by `to` (a string in opsets 1-5)."""

    def forward(input, *, to):
        return Cast.forward(input, to=_type_code(to))

    def jvp(cx, Xdot, *, to):
        return Cast.jvp(cx, Xdot, to=_type_code(to))

    def vjp(cx, Ybar, *, to):
        return Cast.vjp(cx, Ybar, to=_type_code(to))


@rule("CastLike", since=15)
class CastLike:
    """Y = input converted to the type of target_type (whose values are not read)."""

    nondiff = (1,)
    batch_from_data = True  # a batched target_type gives its type, not a sample axis (see _SliceBase)

    def forward(input, target_type, *, saturate=1, round_mode="up"):
        return _converted(input, target_type.dtype, saturate)

    def jvp(cx, Xdot, _=None, **__):
        return Xdot if cx.x[0].dtype.kind == "f" and cx.x[1].dtype.kind == "f" else None

    def vjp(cx, Ybar, **_):
        return (Ybar if cx.x[0].dtype.kind == "f" and cx.x[1].dtype.kind == "f" else None), None


def _type_code(to):
    return getattr(TensorProto, to.upper()) if isinstance(to, str) else to


@rule("Transpose", since=1)
class Transpose:
    """Y = X with axes permuted by `perm` (reversed if absent)."""

    def forward(data, *, perm=None):
        return np.transpose(data, perm)

    def jvp(cx, Xdot, *, perm=None):
        return np.transpose(Xdot, _lead_perm(perm, cx.x[0].ndim, Xdot.ndim - cx.x[0].ndim))

    def vjp(cx, Ybar, *, perm=None):
        nd = cx.x[0].ndim
        p = list(range(nd))[::-1] if perm is None else list(perm)
        return (np.transpose(Ybar, _lead_perm(np.argsort(p), nd, Ybar.ndim - nd)),)


def _lead_perm(perm, nd, lead):
    p = list(range(nd))[::-1] if perm is None else [int(a) for a in perm]
    return list(range(lead)) + [lead + a for a in p]


@rule("Concat", since=4)
class Concat:
    """Y = the inputs joined along `axis`."""

    def forward(*inputs, axis):
        return np.concatenate(inputs, axis=axis)

    def jvp(cx, *Xdots, axis):
        lead_shape = next(D.shape[: D.ndim - x.ndim] for D, x in zip(Xdots, cx.x) if D is not None)
        parts = [
            np.broadcast_to(np.zeros((), cx.y[0].dtype), lead_shape + x.shape) if D is None else D
            for D, x in zip(Xdots, cx.x)
        ]
        return np.concatenate(parts, axis=neg_axis(axis, cx.y[0].ndim))

    keeps = True  # a value with a row per place of a fixed batch: a class token expanded to a constant batch

    def vjp(cx, Ybar, *, axis):
        ax = neg_axis(axis, cx.y[0].ndim)
        bounds = np.cumsum([x.shape[ax] for x in cx.x])[:-1]
        parts = np.split(Ybar, bounds, axis=ax)
        if any(cx.keep):  # sample n's cotangent of such a value is its own row: see per_place
            if ax == -cx.y[0].ndim:
                raise UnsupportedOpError("per-sample cotangents of a value joined to the samples along their own axis")
            parts = [per_place(p, cx.lead(Ybar)) if k else p for p, k in zip(parts, cx.keep)]
        return tuple(p if n else None for p, n in zip(parts, cx.need))


@rule("Concat", since=1)
class Concat1(Concat):
    """Concat of opsets 1 to 3, whose axis defaults to 1 (Caffe2's exports leave it out)."""

    def forward(*inputs, axis=1):
        return Concat.forward(*inputs, axis=axis)

    def jvp(cx, *Xdots, axis=1):
        return Concat.jvp(cx, *Xdots, axis=axis)

    def vjp(cx, Ybar, *, axis=1):
        return Concat.vjp(cx, Ybar, axis=axis)


@rule("Gather", since=1)
class Gather:
    """Y = X indexed along `axis` by integer `indices` (negative counts from the end)."""

    nondiff = (1,)

    def forward(data, indices, *, axis):
        return np.take(data, _wrap(indices, data.shape[axis]), axis=axis)

    def jvp(cx, Xdot, _=None, *, axis):
        X, idx = cx.x
        return np.take(Xdot, _wrap(idx, X.shape[axis]), axis=neg_axis(axis, X.ndim))

    keeps = True

    def vjp(cx, Ybar, *, axis):
        X, idx = cx.x
        ax = axis % X.ndim
        lead = cx.lead(Ybar)
        idx = _wrap(idx, X.shape[ax])
        if cx.keep[0]:
            return _embedding_cotangent(X, idx, ax, Ybar, lead), None
        Xb = np.zeros(Ybar.shape[:lead] + X.shape, dtype=Ybar.dtype)
        # move the gathered axis to the front on both sides, then scatter-add
        Xm = np.moveaxis(Xb, lead + ax, 0)
        k = idx.ndim
        Ym = np.moveaxis(Ybar, list(range(lead + ax, lead + ax + k)), list(range(k)))
        Ym = Ym.reshape((-1,) + Ym.shape[k:])
        flat = idx.ravel()
        if np.unique(flat).size == flat.size:
            Xm[flat] += Ym
        else:
            np.add.at(Xm, flat, Ym)
        return Xb, None


def _embedding_cotangent(X, idx, ax, Ybar, lead):
    """Per-sample cotangent of a table X gathered by sample-wise indices idx (N, ...) on axis 0:
    (*lead, N, *X.shape), each sample's rows scattered into its own copy of the table."""
    if ax != 0 or idx.ndim == 0:
        raise UnsupportedOpError("Gather: per-sample cotangents only for a table indexed along axis 0 by per-sample indices")
    head = Ybar.shape[:lead]
    N = idx.shape[0]
    L = int(np.prod(head))
    Xb = np.zeros((L, N) + X.shape, Ybar.dtype)
    n = np.broadcast_to(np.arange(N).reshape((N,) + (1,) * (idx.ndim - 1)), idx.shape)
    G = Ybar.reshape((L,) + idx.shape + X.shape[1:])
    np.add.at(Xb, (slice(None), n, idx), G)
    return Xb.reshape(head + (N,) + X.shape)


def _wrap(idx, n):
    idx = np.asarray(idx, dtype=np.int64)
    return np.where(idx < 0, idx + n, idx)


@rule("Shape", since=1)
class Shape:
    """Y = the shape of X as int64 (dims start:end from opset 15)."""

    nondiff = (0,)

    def forward(data, *, start=0, end=None):
        return np.array(data.shape[start:end], dtype=np.int64)


@rule("Constant", since=1)
class Constant:
    """Y = the tensor held in the node's value attribute."""

    def forward(**attrs):
        for key, v in attrs.items():
            if v is not None:
                return np.asarray(v)
        raise UnsupportedOpError("Constant node without a value")


@rule("ConstantOfShape", since=9)
class ConstantOfShape:
    """Y = a tensor of the given shape filled with `value` (a one-element tensor, default float 0)."""

    nondiff = (0,)

    def forward(input, *, value=None):
        v = np.zeros(1, np.float32) if value is None else np.asarray(value).ravel()
        shape = check_alloc(np.ravel(input), v.dtype, "ConstantOfShape")
        return np.full(shape, v[0], dtype=v.dtype)


@rule("ConstantFill", since=1)
class ConstantFill:
    """The experimental ConstantFill of early models (PyTorch's RNN exports at opsets 7-8 fill
    their initial states with it): Y = `value` in the shape of the input's values (input_as_shape),
    of the input, or of `shape`, each followed by extra_shape."""

    nondiff = (0,)

    def forward(input=None, *, dtype=1, extra_shape=None, input_as_shape=0, shape=None, value=0.0):
        if input is not None:
            base = [int(d) for d in np.ravel(input)] if input_as_shape else list(np.shape(input))
        else:
            base = list(shape or [])
        dt = helper.tensor_dtype_to_np_dtype(dtype)
        return np.full(check_alloc(base + list(extra_shape or []), dt, "ConstantFill"), value, dtype=dt)


@rule("Expand", since=8)
class Expand:
    """Y = input broadcast with `shape` (numpy rules, either side may be 1)."""

    nondiff = (1,)
    keeps = True

    def forward(input, shape):
        out = np.broadcast_shapes(input.shape, tuple(int(s) for s in np.ravel(shape)))
        check_alloc(out, input.dtype, "Expand")
        return np.broadcast_to(input, out).copy()

    def jvp(cx, Xdot, _=None):
        return expand(Xdot, cx.x[0], cx.y[0], Xdot.ndim - cx.x[0].ndim)

    def vjp(cx, Ybar):
        return unbroadcast(Ybar, cx.x[0].shape, cx.lead(Ybar), cx.keep[0]), None


@rule("Tile", since=6)
class Tile:
    """Y = input repeated `repeats[i]` times along axis i."""

    nondiff = (1,)
    keeps = True  # a parameter tiled along the samples (Keras's class token, tf.tile(cls, [batch, 1, 1]))

    def forward(input, repeats):
        reps = tuple(int(r) for r in np.ravel(repeats))
        check_alloc(tuple(s * r for s, r in zip(input.shape, reps)), input.dtype, "Tile")
        return np.tile(input, reps)

    def jvp(cx, Xdot, _=None):
        reps = tuple(int(r) for r in np.ravel(cx.x[1]))
        return np.tile(Xdot, (1,) * (Xdot.ndim - len(reps)) + reps)

    def vjp(cx, Ybar):
        X = cx.x[0]
        reps = [int(r) for r in np.ravel(cx.x[1])]
        lead = cx.lead(Ybar)
        split = Ybar.shape[:lead] + tuple(d for r, s in zip(reps, X.shape) for d in (r, s))
        if cx.keep[0]:  # the repeats along axis 0 are the samples: (*lead, N, 1, ...) keeps them apart
            if X.shape[0] != 1:
                raise UnsupportedOpError("per-sample cotangents of a value tiled along the samples need its axis 0 to be 1, "
                                         f"not {X.shape[0]}")
            return Ybar.reshape(split).sum(axis=tuple(lead + 2 * i for i in range(1, X.ndim))), None
        G = Ybar.reshape(split).sum(axis=tuple(lead + 2 * i for i in range(X.ndim)))
        return G, None


@rule("Tile", since=1)
class Tile1:
    """Y = input repeated `tiles` times along `axis` (both inputs, scalars: opsets 1 to 5)."""

    nondiff = (1, 2)
    keeps = True

    def repeats(x):
        X, tiles, axis = x[:3]
        reps = np.ones(X.ndim, np.int64)
        reps[int(np.ravel(axis)[0]) % X.ndim] = int(np.ravel(tiles)[0])
        return reps

    def forward(input, tiles, axis):
        return Tile.forward(input, Tile1.repeats((input, tiles, axis)))

    def _as_tile(cx):
        return replace(cx, x=(cx.x[0], Tile1.repeats(cx.x)), need=tuple(cx.need[:2]), keep=tuple(cx.keep[:2]), out=(),
                       owned=())

    def jvp(cx, Xdot, *_):
        return Tile.jvp(Tile1._as_tile(cx), Xdot)

    def vjp(cx, Ybar):
        return Tile.vjp(Tile1._as_tile(cx), Ybar) + (None,)


@rule("Trilu", since=14)
class Trilu:
    """Y = the upper (upper=1) or lower triangle of the last two axes of input, from diagonal k
    on; the rest zero. Linear: tangents and cotangents are masked the same way."""

    nondiff = (1,)

    def forward(input, k=None, *, upper=1):
        return _triangle(input, k, upper)

    def jvp(cx, Xdot, _=None, *, upper=1):
        return _triangle(Xdot, cx.x[1] if len(cx.x) > 1 else None, upper)

    def vjp(cx, Ybar, *, upper=1):
        return _triangle(Ybar, cx.x[1] if len(cx.x) > 1 else None, upper), None


def _triangle(X, k, upper):
    k = 0 if k is None else int(np.ravel(k)[0])
    return np.triu(X, k) if upper else np.tril(X, k)


def _slices(shape, starts, ends, axes=None, steps=None):
    """Per-axis python slices for ONNX Slice, with the spec's clamping (also for negative steps)."""
    starts, ends = [int(v) for v in np.ravel(starts)], [int(v) for v in np.ravel(ends)]
    axes = list(range(len(starts))) if axes is None else [int(a) % len(shape) for a in np.ravel(axes)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.ravel(steps)]
    out = [slice(None)] * len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise ValueError("Slice step 0")
        n = shape[a]
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), n), min(max(e, 0), n)
            out[a] = slice(s, e, st)
        else:
            s, e = min(max(s, 0), n - 1), min(max(e, -1), n - 1)
            out[a] = slice(s, None if e < 0 else e, st)
    return (Ellipsis,) + tuple(out)


class _SliceBase:
    """Linear: tangents are sliced alike; the VJP writes the cotangent into zeros."""

    # the output has a sample axis only if the data has: bounds computed from a batched
    # value's shape (an ONNX function's head size) do not give a parameter's slice one
    batch_from_data = True

    def jvp(cx, Xdot, *_, **attrs):
        return Xdot[cx.rule.index(cx.x, attrs)]

    def vjp(cx, Ybar, **attrs):
        X = cx.x[0]
        lead = cx.lead(Ybar)
        Xb = np.zeros(Ybar.shape[:lead] + X.shape, Ybar.dtype)
        Xb[cx.rule.index(cx.x, attrs)] = Ybar
        return (Xb,) + (None,) * (len(cx.x) - 1)


@rule("Slice", since=1)
class Slice1(_SliceBase):
    """Y = data[starts:ends] along `axes` (attributes)."""

    def forward(data, *, starts, ends, axes=None):
        return data[_slices(data.shape, starts, ends, axes)]

    def index(x, attrs):
        return _slices(x[0].shape, attrs["starts"], attrs["ends"], attrs.get("axes"))


@rule("Slice", since=10)
class Slice10(_SliceBase):
    """Y = data[starts:ends:steps] along `axes` (inputs)."""

    nondiff = (1, 2, 3, 4)

    def forward(data, starts, ends, axes=None, steps=None):
        return data[_slices(data.shape, starts, ends, axes, steps)]

    def index(x, attrs):
        x = list(x) + [None] * (5 - len(x))
        return _slices(x[0].shape, x[1], x[2], x[3], x[4])


@rule("Crop", since=1)
class Crop(_SliceBase):
    """Experimental, opsets 1 to 9: Y = X (N, C, H, W) cut by `border` (left, top, right, bottom), or
    from (top, left) to the size `scale` (height, width) when given."""

    def forward(input, *, border, scale=None):
        return input[Crop.index((input,), {"border": border, "scale": scale})]

    def index(x, attrs):
        left, top, right, bottom = (int(v) for v in attrs["border"])
        H, W = x[0].shape[-2:]
        scale = attrs.get("scale")
        bottom_end, right_end = (top + int(scale[0]), left + int(scale[1])) if scale else (H - bottom, W - right)
        if not (0 <= top < bottom_end <= H and 0 <= left < right_end <= W):
            raise ValueError(f"border {list(attrs['border'])} does not fit an image of {H} x {W}")
        return (Ellipsis, slice(top, bottom_end), slice(left, right_end))


def _split_sizes(n, split, num_outputs, count):
    if split is not None and len(np.ravel(split)):
        return [int(s) for s in np.ravel(split)]
    k = num_outputs or count
    size = -(-n // k)
    return [min(size, n - i * size) for i in range(k)]


class _SplitBase:
    """Outputs are consecutive pieces of the input along `axis`."""

    batch_from_data = True  # see _SliceBase

    n_diff_outputs = None  # every output carries a cotangent

    def piece_axis(x, *, axis=0, **attrs):
        """The axis (from the end) along which the outputs are consecutive pieces of input x: the
        walker then pulls their cotangents into one array for the input, in place of a concatenation."""
        return neg_axis(axis, x.ndim)

    def jvp(cx, Xdot, *_, axis=0, **attrs):
        ax = neg_axis(axis, cx.x[0].ndim)
        bounds = np.cumsum([y.shape[ax] for y in cx.y])[:-1]
        return tuple(np.split(Xdot, bounds, axis=ax))

    def vjp(cx, *Ybars, axis=0, **attrs):
        ax = neg_axis(axis, cx.x[0].ndim)
        ref = next(b for b in Ybars if b is not None)
        lead = ref.ndim - cx.y[0].ndim
        parts = [b if b is not None else np.zeros(ref.shape[:lead] + y.shape, ref.dtype) for b, y in zip(Ybars, cx.y)]
        return (np.concatenate(parts, axis=ax),) + (None,) * (len(cx.x) - 1)


@rule("Split", since=2)
class Split2(_SplitBase):
    """Outputs = input cut along `axis` into pieces of sizes `split` (attribute) or equal pieces."""

    def forward(input, *, axis=0, split=None, n_outputs=None):
        return _split(input, axis, split, None, n_outputs)


@rule("Split", since=1)
class Split1(_SplitBase):
    """Outputs = input cut along `axis` into pieces of the sizes in the second input, or in the
    `split` attribute, or equal pieces (opset 1)."""

    nondiff = (1,)

    def forward(input, lengths=None, *, axis=0, split=None, n_outputs=None):
        return _split(input, axis, lengths if lengths is not None and np.size(lengths) else split, None, n_outputs)


@rule("Split", since=13)
class Split13(_SplitBase):
    """Outputs = input cut along `axis` into pieces of sizes `split` (input) or equal pieces."""

    nondiff = (1,)

    def forward(input, split=None, *, axis=0, num_outputs=None, n_outputs=None):
        return _split(input, axis, split, num_outputs, n_outputs)


def _split(X, axis, split, num_outputs, count):
    sizes = _split_sizes(X.shape[axis], split, num_outputs, count)
    if min(sizes) < 0 or sum(sizes) != X.shape[axis]:  # numpy would cut pieces short, or leave some empty
        raise ValueError(f"split sizes {sizes} do not add up to the length {X.shape[axis]} of axis {axis}")
    return tuple(np.split(X, np.cumsum(sizes)[:-1], axis=axis))


class _PadBase:
    """Linear in data: the tangent is padded as the data is (with zeros for a constant), the
    cotangent goes through the adjoint, axis by axis."""

    batch_from_data = True  # see _SliceBase

    def jvp(cx, Xdot, *_, **attrs):
        pads, mode = cx.rule.geometry(cx.x, attrs)
        nd, lead = cx.x[0].ndim, Xdot.ndim - cx.x[0].ndim
        pads = [int(p) for p in pads]
        return _pad(Xdot, [0] * lead + pads[:nd] + [0] * lead + pads[nd:], mode, 0)

    def vjp(cx, Ybar, **attrs):
        pads, mode = cx.rule.geometry(cx.x, attrs)
        shape = cx.x[0].shape
        nd, lead = len(shape), Ybar.ndim - len(shape)
        G = Ybar
        for i in range(nd):
            b, e = int(pads[i]), int(pads[nd + i])
            if b or e:
                G = _pad_axis_adjoint(G, lead + i, _pad(np.arange(shape[i]), [b, e], mode, -1), shape[i])
        return (G,) + (None,) * (len(cx.x) - 1)


def _pad_axis_adjoint(G, ax, idx, n):
    """Adjoint of padding one axis of length n, where padded position q (along axis `ax` of G)
    copies input position idx[q], or a constant where idx[q] < 0. The positions come in runs
    that copy consecutive input positions, up or down (the middle, a reflected border), or one
    position again and again (an edge): each run is one slice added, or one sum."""
    out = np.zeros(G.shape[:ax] + (n,) + G.shape[ax + 1:], G.dtype)
    at = (slice(None),) * ax
    q, P = 0, len(idx)
    while q < P:
        i0 = int(idx[q])
        r = q + 1
        if i0 < 0:
            q = r
            continue
        step = int(idx[r]) - i0 if r < P and idx[r] >= 0 and abs(int(idx[r]) - i0) == 1 else 0
        while r < P and idx[r] >= 0 and idx[r] == idx[r - 1] + step:
            r += 1
        src = G[at + (slice(q, r),)]
        if step == 1:
            out[at + (slice(i0, i0 + r - q),)] += src
        elif step == -1:
            out[at + (slice(i0 - (r - q) + 1, i0 + 1),)] += np.flip(src, ax)
        else:
            out[at + (i0,)] += src.sum(axis=ax)
        q = r
    return out


def _pad(X, pads, mode, value):
    nd = X.ndim
    pads = [int(p) for p in pads]
    begin, end = pads[:nd], pads[nd:]
    crop = tuple(slice(-b if b < 0 else 0, X.shape[i] + e if e < 0 else None) for i, (b, e) in enumerate(zip(begin, end)))
    X = X[crop]
    width = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]
    if mode == "constant":
        return np.pad(X, width, mode="constant", constant_values=value)
    if mode in ("reflect", "edge", "wrap"):
        return np.pad(X, width, mode=mode)
    raise UnsupportedOpError(f"Pad mode {mode!r} is not supported")


@rule("Pad", since=1)
class Pad1(_PadBase):
    """Y = data padded by `paddings` (opset 1; begins then ends) in `mode`."""

    def forward(data, *, paddings, mode="constant", value=0.0):
        return Pad2.forward(data, pads=paddings, mode=mode, value=value)

    def geometry(x, attrs):
        return attrs["paddings"], attrs.get("mode", "constant")


@rule("Pad", since=2)
class Pad2(_PadBase):
    """Y = data padded by `pads` (attribute; begins then ends) in `mode`."""

    def forward(data, *, pads, mode="constant", value=0.0):
        check_alloc(_padded_shape(data.shape, pads), data.dtype, "Pad")
        return _pad(data, pads, mode, value)

    def geometry(x, attrs):
        return attrs["pads"], attrs.get("mode", "constant")


@rule("Pad", since=11)
class Pad11(_PadBase):
    """Y = data padded by input `pads` (begins then ends, over `axes` if given) in `mode`."""

    nondiff = (1, 2, 3)

    def forward(data, pads, constant_value=None, axes=None, *, mode="constant"):
        full = _full_pads(data.ndim, pads, axes)
        check_alloc(_padded_shape(data.shape, full), data.dtype, "Pad")
        value = 0 if constant_value is None or np.size(constant_value) == 0 else np.ravel(constant_value)[0]
        return _pad(data, full, mode, value)

    def geometry(x, attrs):
        x = list(x) + [None] * (4 - len(x))
        return _full_pads(x[0].ndim, x[1], x[3]), attrs.get("mode", "constant")


def _full_pads(nd, pads, axes):
    pads = [int(p) for p in np.ravel(pads)]
    if axes is None or np.size(axes) == 0:
        return pads
    axes = [int(a) % nd for a in np.ravel(axes)]
    full = [0] * (2 * nd)
    k = len(axes)
    for j, a in enumerate(axes):
        full[a], full[nd + a] = pads[j], pads[k + j]
    return full


def _padded_shape(shape, pads):
    nd = len(shape)
    pads = [int(p) for p in np.ravel(pads)]
    return tuple(max(0, s + pads[i] + pads[nd + i]) for i, s in enumerate(shape))


@rule("Range", since=11)
class Range:
    """Y = start, start + delta, ... below limit."""

    nondiff = (0, 1, 2)

    def forward(start, limit, delta):
        start, limit, delta = (np.ravel(v)[0] for v in (start, limit, delta))
        n = max(int(np.ceil((limit - start) / delta)), 0)
        check_alloc((n,), np.asarray(start).dtype, "Range")
        return (start + delta * np.arange(n)).astype(np.asarray(start).dtype)


class _Permutation:
    """Ops that reshape, permute and reshape again: y = x.reshape(A).transpose(P).reshape(B)."""

    def jvp(cx, Xdot, **attrs):
        A, P, B = cx.rule.plan(cx.x[0].shape, attrs)
        return _perm(Xdot, Xdot.ndim - cx.x[0].ndim, A, P, B)

    def vjp(cx, Ybar, **attrs):
        A, P, B = cx.rule.plan(cx.x[0].shape, attrs)
        At = tuple(A[p] for p in P)
        return (_perm(Ybar, cx.lead(Ybar), At, tuple(np.argsort(P)), cx.x[0].shape),)


def _perm(D, lead, A, P, B):
    head = D.shape[:lead]
    return D.reshape(head + tuple(A)).transpose(tuple(range(lead)) + tuple(lead + p for p in P)).reshape(head + tuple(B))


@rule("DepthToSpace", since=1)
class DepthToSpace(_Permutation):
    """Y = blocks of channels moved into space (mode DCR or CRD)."""

    def forward(input, *, blocksize, mode="DCR"):
        return _perm(input, 0, *DepthToSpace.plan(input.shape, {"blocksize": blocksize, "mode": mode}))

    def plan(shape, attrs):
        b, mode = attrs["blocksize"], attrs.get("mode", "DCR")
        N, C, H, W = shape
        if mode == "DCR":
            return (N, b, b, C // (b * b), H, W), (0, 3, 4, 1, 5, 2), (N, C // (b * b), H * b, W * b)
        return (N, C // (b * b), b, b, H, W), (0, 1, 4, 2, 5, 3), (N, C // (b * b), H * b, W * b)


@rule("SpaceToDepth", since=1)
class SpaceToDepth(_Permutation):
    """Y = blocks of space moved into channels: block row, block column, then channel (mode DCR,
    the only one before opset 28), or channel first (CRD), as DepthToSpace takes them back."""

    def forward(input, *, blocksize, mode="DCR"):
        return _perm(input, 0, *SpaceToDepth.plan(input.shape, {"blocksize": blocksize, "mode": mode}))

    def plan(shape, attrs):
        b, mode = attrs["blocksize"], attrs.get("mode", "DCR")
        if mode not in ("DCR", "CRD"):
            raise UnsupportedOpError(f"SpaceToDepth mode {mode!r} is not supported (DCR and CRD are)")
        N, C, H, W = shape
        perm = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
        return (N, C, H // b, b, W // b, b), perm, (N, C * b * b, H // b, W // b)


@rule("GatherElements", since=11)
class GatherElements:
    """Y[i, j] = data[index[i, j], j] along `axis` (index has the data's rank)."""

    nondiff = (1,)

    def forward(data, indices, *, axis=0):
        return np.take_along_axis(data, _wrap(indices, data.shape[axis]), axis=axis)

    def jvp(cx, Xdot, _=None, *, axis=0):
        X, idx = cx.x
        lead = Xdot.ndim - X.ndim
        idx = _wrap(idx, X.shape[axis])
        return np.take_along_axis(Xdot, np.broadcast_to(idx, Xdot.shape[:lead] + idx.shape), axis=lead + axis % X.ndim)

    def vjp(cx, Ybar, *, axis=0):
        X, idx = cx.x
        lead = cx.lead(Ybar)
        idx = _wrap(idx, X.shape[axis])
        L = int(np.prod(Ybar.shape[:lead]))
        grid = list(np.indices(idx.shape, sparse=True))
        grid[axis % X.ndim] = idx
        Xb = np.zeros((L,) + X.shape, Ybar.dtype)
        np.add.at(Xb, (slice(None),) + tuple(grid), Ybar.reshape((L,) + idx.shape))
        return Xb.reshape(Ybar.shape[:lead] + X.shape), None


@rule("GatherND", since=11)
class GatherND:
    """Y = data[indices[..., 0], ..., indices[..., k-1]] with the first batch_dims axes of data and
    indices paired (opset 12); negative indices count from the end."""

    nondiff = (1,)

    def forward(data, indices, *, batch_dims=0):
        return data[_nd_index(data.shape, indices, batch_dims)]

    def jvp(cx, Ddot, _=None, *, batch_dims=0):
        return Ddot[(slice(None),) * (Ddot.ndim - cx.x[0].ndim) + _nd_index(cx.x[0].shape, cx.x[1], batch_dims)]

    def vjp(cx, Ybar, *, batch_dims=0):
        need_no_keep(cx, "GatherND")
        X, idx = cx.x
        lead = cx.lead(Ybar)
        L = int(np.prod(Ybar.shape[:lead]))
        Xb = np.zeros((L,) + X.shape, Ybar.dtype)
        np.add.at(Xb, (slice(None),) + _nd_index(X.shape, idx, batch_dims), Ybar.reshape((L,) + Ybar.shape[lead:]))
        return Xb.reshape(Ybar.shape[:lead] + X.shape), None


def _nd_index(shape, indices, batch_dims):
    """GatherND's indices as a tuple of integer arrays over data's first batch_dims + k axes,
    broadcast to indices.shape[:-1]: aranges for the batch axes, the (wrapped) index columns."""
    idx = np.asarray(indices, np.int64)
    b, k = int(batch_dims), idx.shape[-1]
    outer = idx.shape[:-1]
    tup = [np.arange(shape[j]).reshape((1,) * j + (-1,) + (1,) * (len(outer) - j - 1)) for j in range(b)]
    tup += [_wrap(idx[..., i], shape[b + i]) for i in range(k)]
    return tuple(tup)


@rule("CumSum", since=11)
class CumSum:
    """Y = running sums of x along `axis` (an input): exclusive leaves each element out, reverse
    sums from the end. Linear; its adjoint runs the other way with the same exclusiveness."""

    nondiff = (1,)

    def forward(x, axis, *, exclusive=0, reverse=0):
        return _cumsum(x, int(np.ravel(axis)[0]) % x.ndim, exclusive, reverse)

    def jvp(cx, Xdot, _=None, *, exclusive=0, reverse=0):
        X = cx.x[0]
        return _cumsum(Xdot, Xdot.ndim - X.ndim + int(np.ravel(cx.x[1])[0]) % X.ndim, exclusive, reverse)

    def vjp(cx, Ybar, *, exclusive=0, reverse=0):
        X = cx.x[0]
        return _cumsum(Ybar, cx.lead(Ybar) + int(np.ravel(cx.x[1])[0]) % X.ndim, exclusive, not reverse), None


def _cumsum(X, axis, exclusive, reverse):
    if reverse:
        X = np.flip(X, axis)
    Y = np.cumsum(X, axis=axis, dtype=X.dtype)
    if exclusive:
        Y = np.roll(Y, 1, axis=axis)
        Y[(slice(None),) * axis + (0,)] = 0
    return np.flip(Y, axis) if reverse else Y


@rule("CumProd", since=26)
class CumProd:
    """Y = running products of x along `axis` (an input), exclusive and reverse as in CumSum.

    Reversed and shifted (a 1 in front, the last element dropped, for exclusive), every form is
    the inclusive product P_k = P_(k-1) z_k, whose derivatives follow the same recurrence:
    dP_k = dP_(k-1) z_k + P_(k-1) dz_k forward, and backward the cotangent of P_(k-1) gathers
    that of P_k times z_k. Nothing is divided, so zeros in x are exact (the partial of a running
    product in a zero is the product of the others)."""

    nondiff = (1,)

    def forward(x, axis, *, exclusive=0, reverse=0):
        a = neg_axis(int(np.ravel(axis)[0]), x.ndim)
        return _unprep(np.cumprod(_prep(x, a, exclusive, reverse, 1), axis=a), a, reverse)

    def jvp(cx, Xdot, _=None, *, exclusive=0, reverse=0):
        X = cx.x[0]
        a = neg_axis(int(np.ravel(cx.x[1])[0]), X.ndim)
        Z = _prep(X, a, exclusive, reverse, 1)
        P = _prep(cx.y[0], a, 0, reverse, None)
        D = _prep(Xdot, a, exclusive, reverse, 0)
        Y = np.empty(np.broadcast_shapes(D.shape, Z.shape), D.dtype)
        Y[_at(a, 0)] = D[_at(a, 0)]
        for k in range(1, Z.shape[a]):
            Y[_at(a, k)] = Y[_at(a, k - 1)] * Z[_at(a, k)] + P[_at(a, k - 1)] * D[_at(a, k)]
        return _unprep(Y, a, reverse)

    def vjp(cx, Ybar, *, exclusive=0, reverse=0):
        X = cx.x[0]
        a = neg_axis(int(np.ravel(cx.x[1])[0]), X.ndim)
        Z = _prep(X, a, exclusive, reverse, 1)
        P = _prep(cx.y[0], a, 0, reverse, None)
        G = _prep(Ybar, a, 0, reverse, None)
        Zbar = np.empty(G.shape, G.dtype)
        c = G[_at(a, -1)]
        for k in range(Z.shape[a] - 1, 0, -1):
            Zbar[_at(a, k)] = c * P[_at(a, k - 1)]
            c = G[_at(a, k - 1)] + c * Z[_at(a, k)]
        Zbar[_at(a, 0)] = c
        if exclusive:  # z_k = x_(k-1): x's cotangent is z's moved back by one, the last x unused
            Zbar = np.concatenate([Zbar[_at(a, slice(1, None))], np.zeros_like(Zbar[_at(a, slice(0, 1))])], axis=a)
        return _unprep(Zbar, a, reverse), None


def _at(axis, k):
    return (Ellipsis, k) + (slice(None),) * (-axis - 1)


def _prep(X, axis, exclusive, reverse, fill):
    """X in the order of the running product (flipped for reverse), shifted one on with `fill`
    in front for exclusive."""
    if reverse:
        X = np.flip(X, axis)
    if exclusive:
        X = np.concatenate([np.full_like(X[_at(axis, slice(0, 1))], fill), X[_at(axis, slice(0, -1))]], axis=axis)
    return X


def _unprep(Y, axis, reverse):
    return np.ascontiguousarray(np.flip(Y, axis)) if reverse else Y


@rule("TensorScatter", since=24)
class TensorScatter:
    """present = past_cache with `update` written along `axis` at write_indices[b] + i for each
    batch entry b (a KV cache's update; circular wraps around the cache's length). Linear in the
    cache and the update: the cache's cotangent is the output's outside the written positions,
    the update's the output's at them."""

    nondiff = (2,)

    def forward(past_cache, update, write_indices=None, *, axis=-2, mode="linear"):
        Y = past_cache.copy()
        _scatter_at(Y, update, _cache_positions(past_cache, update, write_indices, axis, mode), 0)
        return Y

    def jvp(cx, Pdot, Udot, _=None, *, axis=-2, mode="linear"):
        past, update = cx.x[:2]
        lead = next(D.ndim - x.ndim for D, x in zip((Pdot, Udot), (past, update)) if D is not None)
        Y = np.zeros(Udot.shape[:lead] + past.shape, Udot.dtype) if Pdot is None else Pdot.copy()
        U = np.zeros(Pdot.shape[:lead] + update.shape, Pdot.dtype) if Udot is None else Udot  # written over the cache's
        _scatter_at(Y, U, _cache_positions(past, update, padded(cx.x, 3)[2], axis, mode), lead)
        return Y

    def vjp(cx, Ybar, *, axis=-2, mode="linear"):
        need_no_keep(cx, "TensorScatter")
        past, update, widx = padded(cx.x, 3)
        lead = cx.lead(Ybar)
        b, pos, a = _cache_positions(past, update, widx, axis, mode)
        index = (slice(None),) * lead + (b, pos)
        Yv = np.moveaxis(Ybar, lead + a, lead + 1)
        Ubar = np.moveaxis(Yv[index], lead + 1, lead + a) if cx.need[1] else None
        Pbar = None
        if cx.need[0]:
            Pbar = Ybar.copy()
            np.moveaxis(Pbar, lead + a, lead + 1)[index] = 0
        return Pbar, Ubar, None


def _cache_positions(past, update, write_indices, axis, mode):
    """TensorScatter's (batch index (B, 1), positions (B, S), axis): where each update row goes."""
    a = axis % past.ndim
    if a == 0:
        raise UnsupportedOpError("TensorScatter along the batch axis is not supported")
    B, M, S = past.shape[0], past.shape[a], update.shape[a]
    start = np.zeros(B, np.int64) if write_indices is None else np.asarray(write_indices, np.int64).reshape(B)
    pos = start[:, None] + np.arange(S)
    if mode == "circular":
        pos %= M
    elif pos.size and (pos.max() >= M or pos.min() < 0):
        raise ModelError(f"TensorScatter: write indices {start.tolist()} put {S} positions beyond the cache's {M}")
    return np.arange(B)[:, None], pos, a


def _scatter_at(Y, U, where, lead):
    """Y[..., b, pos[b, i], ...] = U[..., b, i, ...] along where's axis, in place (lead direction axes first)."""
    b, pos, a = where
    np.moveaxis(Y, lead + a, lead + 1)[(slice(None),) * lead + (b, pos)] = np.moveaxis(U, lead + a, lead + 1)


@rule("ScatterND", since=11)
class ScatterND:
    """Y = data with Y[indices[...]] = updates (or += with reduction='add')."""

    nondiff = (1,)

    def forward(data, indices, updates, *, reduction="none"):
        return _scatter(data.copy(), _nd_tuple(indices), updates, reduction, "ScatterND")

    def jvp(cx, Ddot, _, Udot, *, reduction="none"):
        return _scatter_jvp(cx, Ddot, Udot, _nd_tuple(cx.x[1]), reduction)

    def vjp(cx, Ybar, *, reduction="none"):
        return _scatter_vjp(cx, Ybar, _nd_tuple(cx.x[1]), reduction)


@rule("ScatterElements", since=11)
class ScatterElements:
    """Y = data with Y[..., indices[i, j], ...] = updates[i, j] along `axis` (or += with
    reduction='add'); indices and updates share a shape, as in GatherElements."""

    nondiff = (1,)
    keeps = True  # data or updates with a row per place of a fixed batch: a recurrent state folded by an exporter

    def forward(data, indices, updates, *, axis=0, reduction="none"):
        return _scatter(data.copy(), _elements_index(indices, axis, data.shape), updates, reduction, "ScatterElements")

    def jvp(cx, Ddot, _, Udot, *, axis=0, reduction="none"):
        return _scatter_jvp(cx, Ddot, Udot, _elements_index(cx.x[1], axis, cx.x[0].shape), reduction)

    def vjp(cx, Ybar, *, axis=0, reduction="none"):
        bars = _scatter_vjp(cx, Ybar, _elements_index(cx.x[1], axis, cx.x[0].shape), reduction)
        if any(cx.keep):  # sample n's cotangent of such a value is its own row: see per_place
            Y = cx.y[0]
            if axis % Y.ndim == 0 or any(k and x.shape[0] != Y.shape[0] for k, x in zip(cx.keep, cx.x)):
                raise UnsupportedOpError("ScatterElements: per-sample parameter cotangents along the samples' axis, or of "
                                         "fewer rows than samples, are not supported")
            bars = tuple(per_place(b, cx.lead(Ybar)) if k and b is not None else b for b, k in zip(bars, cx.keep))
        return bars


@rule("Scatter", since=9)
class Scatter(ScatterElements):
    """Scatter of opsets 9 and 10, deprecated at 11: ScatterElements without a reduction (torch's
    `scatter` exported at those opsets)."""


def _nd_tuple(indices):
    return tuple(np.moveaxis(np.asarray(indices), -1, 0))


_REDUCE_AT = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter(Y, ix, updates, reduction, op):
    """Y with the updates written (reduction 'none') or combined (add, mul, max, min) at the index
    ix, repeated indices combining in turn."""
    if reduction == "none":
        Y[ix] = updates
    elif reduction in _REDUCE_AT:
        _REDUCE_AT[reduction].at(Y, ix, updates)
    else:
        raise UnsupportedOpError(f"{op} with reduction={reduction!r} is not supported")
    return Y


def _reduce_partials(cx, ix, reduction):
    """For reductions mul, max and min: Y's partials in the data (the data's shape) and in the
    updates (theirs). A product's partial in one factor is the product of the others, without
    dividing by a zero; max and min send the derivative to the element that won, the data on a
    tie, else the first update."""
    X, U, Y = cx.x[0], cx.x[2], cx.y[0]
    t = np.arange(X.size).reshape(X.shape)[ix].ravel()  # each update's target element
    if reduction == "mul":
        zeros = (X == 0).ravel().astype(np.int64)
        np.add.at(zeros, t, (U == 0).ravel())
        prod = np.where(X == 0, 1, X).ravel().astype(np.float64)
        np.multiply.at(prod, t, np.where(U == 0, 1, U).ravel())

        def others(F, at):
            z, p = zeros[at], prod[at]
            return np.where(z == 0, p / np.where(F == 0, 1, F), np.where((z == 1) & (F == 0), p, 0)).astype(Y.dtype)

        return others(X.ravel(), slice(None)).reshape(X.shape), others(U.ravel(), t).reshape(U.shape)
    won = X == Y
    cand = np.flatnonzero((U == Y[ix]) & ~won[ix])
    _, first = np.unique(t[cand], return_index=True)
    Pu = np.zeros(U.size, Y.dtype)
    Pu[cand[first]] = 1
    return won.astype(Y.dtype), Pu.reshape(U.shape)


def _scatter_jvp(cx, Ddot, Udot, ix, reduction):
    """A scatter's tangent: the data's tangent with the updates' tangent scattered the same way."""
    X, U = cx.x[0], cx.x[2]
    lead = (Ddot if Ddot is not None else Udot).ndim - (X if Ddot is not None else U).ndim
    head = (Ddot if Ddot is not None else Udot).shape[:lead]
    if reduction in ("mul", "max", "min"):
        Pd, Pu = _reduce_partials(cx, ix, reduction)
        Y = np.zeros(head + X.shape, cx.y[0].dtype) if Ddot is None else Ddot * Pd
        if Udot is not None:
            np.add.at(Y, (slice(None),) * lead + ix, Udot * Pu)
        return Y
    Y = np.zeros(head + X.shape, cx.y[0].dtype) if Ddot is None else Ddot.copy()
    ix = (slice(None),) * lead + ix
    if Udot is not None:
        return _scatter(Y, ix, Udot, reduction, "")
    if reduction == "none":  # overwritten: the data's tangent does not reach there
        Y[ix] = 0
    return Y


def _scatter_vjp(cx, Ybar, ix, reduction):
    """The data's cotangent is Ybar, less what was overwritten; the updates' is Ybar gathered at ix
    (each times its partial, for mul, max and min)."""
    if reduction in ("mul", "max", "min"):
        Pd, Pu = _reduce_partials(cx, ix, reduction)
        lead_ix = (slice(None),) * cx.lead(Ybar) + ix
        return (Ybar * Pd if cx.need[0] else None), None, (Ybar[lead_ix] * Pu if cx.need[2] else None)
    ix = (slice(None),) * cx.lead(Ybar) + ix
    Dbar = None
    if cx.need[0]:
        Dbar = Ybar.copy()
        if reduction == "none":
            Dbar[ix] = 0
    return Dbar, None, (Ybar[ix] if cx.need[2] else None)


def _elements_index(indices, axis, shape):
    """The advanced index of data that indices (of data's rank) point to along axis."""
    idx = np.asarray(indices, np.int64)
    axis = axis % len(shape)
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = _wrap(idx, shape[axis])
    return tuple(grid)


@rule("TopK", since=10)
class TopK:
    """(Values, Indices) = the K largest (or smallest) elements along `axis`, sorted; K an input.
    Values are X gathered at Indices, so their derivatives are gathers and scatters there (ties
    follow the order numpy's stable sort gives, the lower index first)."""

    nondiff = (1,)
    n_diff_outputs = 1

    def forward(X, K, *, axis=-1, largest=1, sorted=1):
        k = int(np.ravel(K)[0])
        axis = axis % X.ndim
        # descending as ascending keys, ties in index order: ~X for integers (-X wraps an unsigned
        # value, and the most negative signed one)
        key = (-X if X.dtype.kind in "fc" else ~X) if largest else X
        order = np.argsort(key, axis=axis, kind="stable")
        idx = np.take(order, np.arange(k), axis=axis)
        return np.take_along_axis(X, idx, axis=axis), idx.astype(np.int64)

    def jvp(cx, Xdot, _=None, **attrs):
        X, idx = cx.x[0], cx.y[1]
        lead = Xdot.ndim - X.ndim
        axis = attrs.get("axis", -1) % X.ndim
        return np.take_along_axis(Xdot, np.broadcast_to(idx, Xdot.shape[:lead] + idx.shape), axis=lead + axis), None

    def vjp(cx, Ybar, **attrs):
        need_no_keep(cx, "TopK")
        X, idx = cx.x[0], cx.y[1]
        lead = cx.lead(Ybar)
        axis = attrs.get("axis", -1) % X.ndim
        Xb = np.zeros(Ybar.shape[:lead] + X.shape, Ybar.dtype)
        np.put_along_axis(Xb, np.broadcast_to(idx, Ybar.shape[:lead] + idx.shape), Ybar, axis=lead + axis)
        return Xb, None


@rule("TopK", since=1)
class TopK1(TopK):
    """TopK of opsets 1-9: K an attribute, the largest along `axis`, sorted."""

    nondiff = ()

    def forward(X, *, axis=-1, k):
        return TopK.forward(X, np.array([k]), axis=axis)

    def jvp(cx, Xdot, *, axis=-1, k):
        return TopK.jvp(cx, Xdot, axis=axis)

    def vjp(cx, Ybar, *, axis=-1, k):
        return TopK.vjp(cx, Ybar, axis=axis)[:1]


@rule("Unique", since=11)
class Unique:
    """(Y, indices, inverse_indices, counts): the distinct elements of X (flattened, or its
    distinct slices along `axis`), ascending (lexicographically for slices) or, with sorted=0,
    in the order they first occur; where each first occurs, where each element of X went, and
    how often each occurs. Y is X gathered at `indices`, so its derivatives are a gather and a
    scatter there; the rest are integers. Y's size depends on the values: a model that applies
    Unique across its samples mixes them."""

    n_diff_outputs = 1

    def forward(X, *, axis=None, sorted=1):
        a = X.reshape(-1) if axis is None else np.moveaxis(X, axis % X.ndim, 0)
        Y, first, inverse, counts = np.unique(a, return_index=True, return_inverse=True, return_counts=True,
                                              axis=None if axis is None else 0)
        if not sorted:  # in the order of first occurrence
            order = np.argsort(first, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            Y, first, counts, inverse = Y[order], first[order], counts[order], rank[np.ravel(inverse)]
        if axis is not None:
            Y = np.moveaxis(Y, 0, axis % X.ndim)
        return Y, first.astype(np.int64), np.ravel(inverse).astype(np.int64), counts.astype(np.int64)

    def first(cx, axis, sorted):
        """Where each distinct element first occurs: the node's second output, or found again."""
        return cx.y[1] if len(cx.y) > 1 and cx.y[1] is not None else Unique.forward(cx.x[0], axis=axis, sorted=sorted)[1]

    def jvp(cx, Xdot, *, axis=None, sorted=1):
        X, first = cx.x[0], Unique.first(cx, axis, sorted)
        lead = Xdot.ndim - X.ndim
        if axis is None:
            return Xdot.reshape(Xdot.shape[:lead] + (-1,))[..., first]
        return np.take(Xdot, first, axis=lead + axis % X.ndim)

    def vjp(cx, Ybar, *, axis=None, sorted=1):
        need_no_keep(cx, "Unique")
        X, first = cx.x[0], Unique.first(cx, axis, sorted)
        lead = cx.lead(Ybar)
        if axis is None:
            Xb = np.zeros(Ybar.shape[:lead] + (X.size,), Ybar.dtype)
            Xb[..., first] = Ybar
            return (Xb.reshape(Ybar.shape[:lead] + X.shape),)
        a = lead + axis % X.ndim
        Xb = np.zeros(Ybar.shape[:lead] + X.shape, Ybar.dtype)
        index = [slice(None)] * Xb.ndim
        index[a] = first
        Xb[tuple(index)] = Ybar  # first occurrences are distinct: no two land on one place
        return (Xb,)


class _ArgReduce:
    nondiff = (0,)


@rule("ArgMax", since=1)
class ArgMax(_ArgReduce):
    """Y = index of the maximum along `axis` (int64; the last one if select_last_index)."""

    def forward(data, *, axis=0, keepdims=1, select_last_index=0):
        return _arg(np.argmax, data, axis, keepdims, select_last_index)


@rule("ArgMin", since=1)
class ArgMin(_ArgReduce):
    """Y = index of the minimum along `axis` (int64; the last one if select_last_index)."""

    def forward(data, *, axis=0, keepdims=1, select_last_index=0):
        return _arg(np.argmin, data, axis, keepdims, select_last_index)


def _arg(f, X, axis, keepdims, last):
    if last:
        r = X.shape[axis] - 1 - f(np.flip(X, axis=axis), axis=axis)
    else:
        r = f(X, axis=axis)
    r = r.astype(np.int64)
    return np.expand_dims(r, axis) if keepdims else r


@rule("Size", since=1)
class Size:
    """Y = the number of elements of X (int64 scalar)."""

    nondiff = (0,)

    def forward(data):
        return np.array(data.size, dtype=np.int64)


@rule("Reshape", since=1)
class Reshape1(_Reshaping):
    """Y = X viewed with the `shape` attribute (0 copies the input's dim, -1 is inferred)."""

    def forward(data, *, shape, consumed_inputs=None):
        return Reshape.forward(data, np.asarray(shape))


# ---- index-producing and selecting ops ---------------------------------------------------------


@rule("NonZero", since=9)
class NonZero:
    """Y = the indices of the non-zero elements of X, (rank, count) int64, in row-major order."""

    nondiff = (0,)

    def forward(X):
        return np.array(np.nonzero(X), dtype=np.int64).reshape(X.ndim, -1)


@rule("EyeLike", since=9)
class EyeLike:
    """Y = ones on the k-th diagonal of a matrix shaped like X, of type `dtype` (default X's)."""

    nondiff = (0,)

    def forward(input, *, dtype=None, k=0):
        if input.ndim != 2:
            raise UnsupportedOpError(f"EyeLike: the input must be 2-D, not {input.ndim}-D")
        dt = helper.tensor_dtype_to_np_dtype(dtype) if dtype is not None else input.dtype
        return np.eye(*input.shape, k=k, dtype=dt)


def _one_hot_mask(indices, depth, axis):
    """Boolean (…, depth, …) with depth on `axis`: True where the (wrapped) index points."""
    d = int(np.ravel(depth)[0])
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + d, idx)
    a = axis % (idx.ndim + 1)
    return np.expand_dims(idx, a) == np.arange(d).reshape((d,) + (1,) * (idx.ndim - a))


@rule("OneHot", since=9)
class OneHot:
    """Y = values[1] where the index points along the new axis, values[0] elsewhere; indices out of
    range give a row of values[0]. Linear in `values` (off, on)."""

    nondiff = (0, 1)
    keeps = True

    def forward(indices, depth, values, *, axis=-1):
        return np.where(_one_hot_mask(indices, depth, axis), values[1], values[0])

    def jvp(cx, _i, _d, Vdot, *, axis=-1):
        mask = _one_hot_mask(cx.x[0], cx.x[1], axis)
        on, off = Vdot[..., 1], Vdot[..., 0]
        shape = on.shape + (1,) * mask.ndim
        return np.where(mask, on.reshape(shape), off.reshape(shape))

    def vjp(cx, Ybar, *, axis=-1):
        mask = _one_hot_mask(cx.x[0], cx.x[1], axis)
        lead = cx.lead(Ybar)
        keep = 1 if cx.keep[2] else 0  # the sample axis stays, in front of (off, on)
        axes = tuple(range(lead + keep, Ybar.ndim))
        on = np.where(mask, Ybar, 0).sum(axis=axes)
        return None, None, np.stack([Ybar.sum(axis=axes) - on, on], axis=-1)


@rule("Compress", since=9)
class Compress:
    """Y = the slices of X along `axis` (X flattened if none) where condition is true; the
    condition may be shorter than the axis."""

    nondiff = (1,)

    def forward(input, condition, *, axis=None):
        return np.compress(np.ravel(condition).astype(bool), input, axis=axis)

    def jvp(cx, Xdot, _=None, *, axis=None):
        X = cx.x[0]
        idx = _kept(cx.x[1], X, axis)
        lead = Xdot.ndim - X.ndim
        if axis is None:
            return Xdot.reshape(Xdot.shape[:lead] + (-1,))[..., idx]
        return np.take(Xdot, idx, axis=lead + axis % X.ndim)

    def vjp(cx, Ybar, *, axis=None):
        need_no_keep(cx, "Compress")
        X = cx.x[0]
        idx = _kept(cx.x[1], X, axis)
        lead = cx.lead(Ybar)
        if axis is None:
            Xb = np.zeros(Ybar.shape[:lead] + (X.size,), Ybar.dtype)
            Xb[..., idx] = Ybar
            return Xb.reshape(Ybar.shape[:lead] + X.shape), None
        a = lead + axis % X.ndim
        Xb = np.zeros(Ybar.shape[:lead] + X.shape, Ybar.dtype)
        Xb[(slice(None),) * a + (idx,)] = Ybar
        return Xb, None


def _kept(condition, X, axis):
    n = X.size if axis is None else X.shape[axis]
    return np.flatnonzero(np.ravel(condition)[:n].astype(bool))


@rule("ReverseSequence", since=10)
class ReverseSequence:
    """Y = X with the first sequence_lens[b] steps along time_axis reversed, for each b along
    batch_axis. A permutation that is its own inverse: its adjoint is itself."""

    nondiff = (1,)

    def forward(input, sequence_lens, *, batch_axis=1, time_axis=0):
        return _reverse_steps(input, 0, sequence_lens, batch_axis, time_axis)

    def jvp(cx, Xdot, _=None, *, batch_axis=1, time_axis=0):
        return _reverse_steps(Xdot, Xdot.ndim - cx.x[0].ndim, cx.x[1], batch_axis, time_axis)

    def vjp(cx, Ybar, *, batch_axis=1, time_axis=0):
        need_no_keep(cx, "ReverseSequence")
        return _reverse_steps(Ybar, cx.lead(Ybar), cx.x[1], batch_axis, time_axis), None


def _reverse_steps(X, lead, lens, batch_axis, time_axis):
    """X (*lead, *shape) with each batch's first lens[b] steps along time_axis reversed."""
    T, B = X.shape[lead + time_axis], X.shape[lead + batch_axis]
    t = np.arange(T)[:, None]
    L = np.asarray(lens, dtype=np.int64).reshape(1, B)
    src = np.where(t < L, L - 1 - t, t)  # (T, B): the step each output step reads
    shape = [1] * X.ndim
    shape[lead + time_axis], shape[lead + batch_axis] = T, B
    src = (src if time_axis < batch_axis else src.T).reshape(shape)
    return np.take_along_axis(X, src, axis=lead + time_axis)
