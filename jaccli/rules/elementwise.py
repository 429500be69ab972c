"""Elementwise operators: unary ones need only f'(x); binary ones broadcast and unbroadcast."""

from __future__ import annotations

import math

import numpy as np

from . import rule
from ._util import add, expand, unbroadcast


def elementwise(op_type, since, domain=""):
    """Register a unary rule from `forward(X, **attrs)` and `deriv(X, Y, **attrs)` = dY/dX."""

    def register(cls):
        def jvp(cx, Xdot, **attrs):
            return cls.deriv(cx.x[0], cx.y[0], **attrs) * Xdot

        def vjp(cx, Ybar, **attrs):
            return (cls.deriv(cx.x[0], cx.y[0], **attrs) * Ybar,)

        cls.jvp, cls.vjp = jvp, vjp
        return rule(op_type, since, domain)(cls)

    return register


@elementwise("Neg", since=6)
class Neg:
    """Y = -X"""

    def forward(X):
        return -X

    def deriv(X, Y):
        return -1.0


@elementwise("Relu", since=6)
class Relu:
    """Y = max(X, 0)"""

    def forward(X):
        return np.maximum(X, 0)

    def deriv(X, Y):
        return (X > 0).astype(X.dtype)


@elementwise("LeakyRelu", since=6)
class LeakyRelu:
    """Y = X if X > 0 else alpha * X"""

    def forward(X, *, alpha):
        return np.where(X > 0, X, X * X.dtype.type(alpha))

    def deriv(X, Y, *, alpha):
        return np.where(X > 0, 1.0, alpha).astype(X.dtype)


@elementwise("Sigmoid", since=6)
class Sigmoid:
    """Y = 1 / (1 + exp(-X))"""

    def forward(X):
        return _sigmoid(X)

    def deriv(X, Y):
        return Y * (1 - Y)


@elementwise("Tanh", since=6)
class Tanh:
    """Y = tanh(X)"""

    def forward(X):
        return np.tanh(X)

    def deriv(X, Y):
        return 1 - Y * Y


@elementwise("Exp", since=6)
class Exp:
    """Y = exp(X)"""

    def forward(X):
        return np.exp(X)

    def deriv(X, Y):
        return Y


@elementwise("Log", since=6)
class Log:
    """Y = log(X)"""

    def forward(X):
        return np.log(X)

    def deriv(X, Y):
        return 1 / X


@elementwise("Sqrt", since=6)
class Sqrt:
    """Y = sqrt(X)"""

    def forward(X):
        return np.sqrt(X)

    def deriv(X, Y):
        return 0.5 / Y


_erf = np.frompyfunc(math.erf, 1, 1)


@elementwise("Erf", since=9)
class Erf:
    """Y = erf(X) = 2/sqrt(pi) * integral_0^X exp(-t^2) dt"""

    def forward(X):
        return _erf(X).astype(X.dtype)

    def deriv(X, Y):
        return X.dtype.type(2 / math.sqrt(math.pi)) * np.exp(-X * X)


@elementwise("Softplus", since=1)
class Softplus:
    """Y = log(1 + exp(X))"""

    def forward(X):
        return np.logaddexp(0, X).astype(X.dtype)

    def deriv(X, Y):
        return _sigmoid(X)


@elementwise("Elu", since=6)
class Elu:
    """Y = X if X > 0 else alpha * (exp(X) - 1)"""

    def forward(X, *, alpha):
        return np.where(X > 0, X, X.dtype.type(alpha) * np.expm1(np.minimum(X, 0)))

    def deriv(X, Y, *, alpha):
        return np.where(X > 0, 1, Y + X.dtype.type(alpha)).astype(X.dtype)


def _sigmoid(X):
    E = np.exp(-np.abs(X))
    return np.where(X >= 0, 1 / (1 + E), E / (1 + E)).astype(X.dtype)


class _Clip:
    """Y = min(max(X, min), max); bounds are constants, not differentiated."""

    def jvp(cx, Xdot, *_, **attrs):
        return _inside(cx) * Xdot

    def vjp(cx, Ybar, *_, **attrs):
        return (_inside(cx) * Ybar,)


def _inside(cx):
    X, Y = cx.x[0], cx.y[0]
    return (X == Y).astype(X.dtype)


@rule("Clip", since=6)
class Clip6(_Clip):
    """Y = min(max(X, min), max), bounds as attributes."""

    def forward(X, *, min=-3.4028234663852886e38, max=3.4028234663852886e38):
        return np.clip(X, min, max).astype(X.dtype)


@rule("Clip", since=11)
class Clip11(_Clip):
    """Y = min(max(X, min), max), bounds as optional inputs."""

    nondiff = (1, 2)

    def forward(X, min=None, max=None):
        lo = -np.inf if min is None else min
        hi = np.inf if max is None else max
        return np.clip(X, lo, hi).astype(X.dtype)


# ---- binary, with multidirectional broadcasting ---------------------------------------------


class _Binary:
    """Y = f(A, B) with partials dA, dB; subclasses give forward and partials."""

    keeps = True

    def jvp(cx, Adot, Bdot):
        (A, B), Y = cx.x, cx.y[0]
        dA, dB = cx.rule.partials(A, B, Y, Adot is not None, Bdot is not None)
        lead = (Adot if Adot is not None else Bdot).ndim - (A if Adot is not None else B).ndim
        return add(
            None if Adot is None else expand(_times(dA, Adot), A, Y, lead) if dA is not None else None,
            None if Bdot is None else expand(_times(dB, Bdot), B, Y, lead) if dB is not None else None,
        )

    def vjp(cx, Ybar):
        (A, B), Y = cx.x, cx.y[0]
        lead = cx.lead(Ybar)
        dA, dB = cx.rule.partials(A, B, Y, cx.need[0], cx.need[1])
        return (
            unbroadcast(_times(dA, Ybar), A.shape, lead, cx.keep[0]) if cx.need[0] else None,
            unbroadcast(_times(dB, Ybar), B.shape, lead, cx.keep[1]) if cx.need[1] else None,
        )


def _times(d, G):
    """d * G, where d is a partial (None or the scalar 1 means identity)."""
    if isinstance(d, (int, float)):
        return G if d == 1 else d * G
    return d * G


@rule("Add", since=7)
class Add(_Binary):
    """C = A + B"""

    def forward(A, B):
        return A + B

    def partials(A, B, Y, na, nb):
        return 1, 1


@rule("Sub", since=7)
class Sub(_Binary):
    """C = A - B"""

    def forward(A, B):
        return A - B

    def partials(A, B, Y, na, nb):
        return 1, -1


@rule("Mul", since=7)
class Mul(_Binary):
    """C = A * B"""

    def forward(A, B):
        return A * B

    def partials(A, B, Y, na, nb):
        return B, A


@rule("Div", since=7)
class Div(_Binary):
    """C = A / B"""

    def forward(A, B):
        if np.issubdtype(A.dtype, np.integer):
            return np.trunc(A / B).astype(A.dtype)
        return A / B

    def partials(A, B, Y, na, nb):
        return (1 / B if na else None), (-Y / B if nb else None)


@rule("Pow", since=7)
class Pow(_Binary):
    """Z = X ** Y"""

    def forward(X, Y):
        return np.power(X, Y.astype(X.dtype) if np.issubdtype(X.dtype, np.floating) else Y).astype(X.dtype)

    def partials(A, B, Y, na, nb):
        dA = B * np.power(A, B - 1) if na else None
        dB = Y * np.log(np.where(A > 0, A, 1)) if nb else None
        return dA, dB
