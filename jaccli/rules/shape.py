"""Shape and layout operators. Linear ones push tangents through themselves; VJP is the adjoint."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from . import rule
from ..errors import UnsupportedOpError
from ._util import check_alloc, need_no_keep, neg_axis


def _to_shape(D, cx, lead=None):
    """Reshape a (co)tangent to leading axes + the output's primal shape."""
    lead = D.ndim - cx.x[0].ndim if lead is None else lead
    return D.reshape(D.shape[:lead] + cx.y[0].shape)


def _back_to_input(Ybar, cx):
    lead = cx.lead(Ybar)
    return Ybar.reshape(Ybar.shape[:lead] + cx.x[0].shape)


class _Reshaping:
    """Ops that only reinterpret the shape of input 0: tangent and cotangent are reshaped."""

    keeps = False

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
        a = axis % input.ndim if input.ndim else 0
        return input.reshape(int(np.prod(input.shape[:a])), -1)


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
    """Y = X at inference (the mask output, if asked for, is all ones)."""

    nondiff = (1, 2)

    def forward(data, ratio=None, training_mode=None, **_):
        if training_mode is not None and bool(np.ravel(training_mode)[0]):
            raise UnsupportedOpError("Dropout with training_mode=True is random; export the model in eval mode")
        return data, np.ones(data.shape, dtype=bool)


_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


@rule("Cast", since=6)
class Cast:
    """Y = X converted to type `to`; float types become jaccli's working float type."""

    def forward(input, *, to, saturate=1, round_mode="up"):
        dtype = helper.tensor_dtype_to_np_dtype(to)  # the plan maps float targets to the working dtype
        if np.issubdtype(dtype, np.integer) and np.issubdtype(input.dtype, np.floating):
            return np.trunc(input).astype(dtype)
        return input.astype(dtype)

    def jvp(cx, Xdot, *, to, **_):
        return Xdot if to in _FLOAT_TYPES and np.issubdtype(cx.x[0].dtype, np.floating) else None

    def vjp(cx, Ybar, *, to, **_):
        return (Ybar if to in _FLOAT_TYPES and np.issubdtype(cx.x[0].dtype, np.floating) else None,)


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

    def vjp(cx, Ybar, *, axis):
        need_no_keep(cx, "Concat")
        ax = neg_axis(axis, cx.y[0].ndim)
        bounds = np.cumsum([x.shape[ax] for x in cx.x])[:-1]
        parts = np.split(Ybar, bounds, axis=ax)
        return tuple(p if n else None for p, n in zip(parts, cx.need))


@rule("Gather", since=1)
class Gather:
    """Y = X indexed along `axis` by integer `indices` (negative counts from the end)."""

    nondiff = (1,)

    def forward(data, indices, *, axis):
        return np.take(data, _wrap(indices, data.shape[axis]), axis=axis)

    def jvp(cx, Xdot, _=None, *, axis):
        X, idx = cx.x
        return np.take(Xdot, _wrap(idx, X.shape[axis]), axis=neg_axis(axis, X.ndim))

    def vjp(cx, Ybar, *, axis):
        need_no_keep(cx, "Gather")
        X, idx = cx.x
        ax = axis % X.ndim
        lead = cx.lead(Ybar)
        idx = _wrap(idx, X.shape[ax])
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
