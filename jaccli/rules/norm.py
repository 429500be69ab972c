"""Normalisations: BatchNormalization (inference), Softmax and LogSoftmax."""

from __future__ import annotations

import numpy as np

from . import rule
from ..errors import UnsupportedOpError
from ._util import neg_axis


def _channel(v, ndim):
    """(C,) -> (C, 1, ..., 1) to broadcast along axis 1 of an ndim-rank primal."""
    return v.reshape((-1,) + (1,) * (ndim - 2))


@rule("BatchNormalization", since=6)
class BatchNormalization:
    """Y = scale * (X - mean) / sqrt(var + epsilon) + B, per channel (axis 1); inference only."""

    nondiff = (3, 4)  # running mean and variance are buffers
    keeps = True

    def forward(X, scale, B, input_mean, input_var, *, epsilon, momentum=0.9, spatial=1, is_test=0, training_mode=0):
        if training_mode:
            raise UnsupportedOpError("BatchNormalization with training_mode=1 is not supported (inference only)")
        if not spatial:
            raise UnsupportedOpError("BatchNormalization with spatial=0 is not supported")
        a = scale / np.sqrt(input_var + X.dtype.type(epsilon))
        return X * _channel(a, X.ndim) + _channel(B - input_mean * a, X.ndim)

    def jvp(cx, Xdot, sdot, Bdot, *_, epsilon, **__):
        X, scale, B, mean, var = cx.x
        inv = 1 / np.sqrt(var + X.dtype.type(epsilon))
        out = None
        if Xdot is not None:
            out = Xdot * _channel(scale * inv, X.ndim)
        for D, base in ((sdot, (X - _channel(mean, X.ndim)) * _channel(inv, X.ndim)), (Bdot, None)):
            if D is not None:
                term = _channel_tangent(D, X) if base is None else _channel_tangent(D, X) * base
                out = term if out is None else out + term
        return out

    def vjp(cx, Ybar, *_, epsilon, **__):
        X, scale, B, mean, var = cx.x
        lead = cx.lead(Ybar)
        inv = 1 / np.sqrt(var + X.dtype.type(epsilon))
        Xbar = Ybar * _channel(scale * inv, X.ndim) if cx.need[0] else None
        sbar = Bbar = None
        spatial_axes = tuple(range(lead + 2, Ybar.ndim))
        if cx.need[1]:
            xhat = (X - _channel(mean, X.ndim)) * _channel(inv, X.ndim)
            sbar = _per_channel(Ybar * xhat, spatial_axes, lead, cx.keep[1])
        if cx.need[2]:
            Bbar = _per_channel(Ybar, spatial_axes, lead, cx.keep[2])
        return Xbar, sbar, Bbar, None, None


def _channel_tangent(D, X):
    """Tangent of a per-channel vector (*lead, C) spread over X's shape: (*lead, 1, C, 1, ...)."""
    lead = D.ndim - 1
    return D.reshape(D.shape[:lead] + (1, -1) + (1,) * (X.ndim - 2))


def _per_channel(G, spatial_axes, lead, keep):
    G = G.sum(axis=spatial_axes) if spatial_axes else G  # (*lead, N, C)
    return G if keep else G.sum(axis=lead)


def _softmax(X, axes):
    E = np.exp(X - X.max(axis=axes, keepdims=True))
    return E / E.sum(axis=axes, keepdims=True)


def _softmax_rule(name, since, coerced, log):
    """Softmax or LogSoftmax; `coerced` treats axes [axis:] as one (opsets before 13)."""

    def axes(ndim, axis):
        a = neg_axis(axis, ndim)
        return tuple(range(a, 0)) if coerced else (a,)

    if log:

        def forward(X, *, axis):
            ax = axes(X.ndim, axis)
            Z = X - X.max(axis=ax, keepdims=True)
            return Z - np.log(np.exp(Z).sum(axis=ax, keepdims=True))

        def jvp(cx, Xdot, *, axis):
            S = np.exp(cx.y[0])
            return Xdot - (S * Xdot).sum(axis=axes(cx.x[0].ndim, axis), keepdims=True)

        def vjp(cx, Ybar, *, axis):
            S = np.exp(cx.y[0])
            return (Ybar - S * Ybar.sum(axis=axes(cx.x[0].ndim, axis), keepdims=True),)

    else:

        def forward(X, *, axis):
            return _softmax(X, axes(X.ndim, axis))

        def jvp(cx, Xdot, *, axis):
            S = cx.y[0]
            return S * (Xdot - (S * Xdot).sum(axis=axes(cx.x[0].ndim, axis), keepdims=True))

        def vjp(cx, Ybar, *, axis):
            S = cx.y[0]
            return (S * (Ybar - (S * Ybar).sum(axis=axes(cx.x[0].ndim, axis), keepdims=True)),)

    doc = ("Y = X - log(sum(exp(X)))" if log else "Y = exp(X) / sum(exp(X))") + (
        " over axes [axis:] flattened" if coerced else " along axis"
    )
    cls = type(name, (), {"__doc__": doc, "forward": forward, "jvp": jvp, "vjp": vjp})
    return rule(name, since)(cls)


Softmax1 = _softmax_rule("Softmax", 1, coerced=True, log=False)
Softmax13 = _softmax_rule("Softmax", 13, coerced=False, log=False)
LogSoftmax1 = _softmax_rule("LogSoftmax", 1, coerced=True, log=True)
LogSoftmax13 = _softmax_rule("LogSoftmax", 13, coerced=False, log=True)
