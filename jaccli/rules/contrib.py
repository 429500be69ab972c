"""com.microsoft contrib operators that onnxruntime's transformer optimizer writes into models."""

from __future__ import annotations

import numpy as np

from . import rule
from ._util import add, expand, unbroadcast
from .elementwise import Gelu, _Binary, _sigmoid, elementwise
from .linalg import Gemm, mm

MS = "com.microsoft"


@elementwise("Gelu", since=1, domain=MS)
class MsGelu:
    """Y = X * Phi(X), the exact GELU."""

    def forward(X):
        return Gelu.forward(X, approximate="none")

    def deriv(X, Y):
        return Gelu.deriv(X, Y, approximate="none")


@elementwise("QuickGelu", since=1, domain=MS)
class QuickGelu:
    """Y = X * sigmoid(alpha * X)"""

    def forward(X, *, alpha=1.702):
        return X * _sigmoid(X * X.dtype.type(alpha))

    def deriv(X, Y, *, alpha=1.702):
        s = _sigmoid(X * X.dtype.type(alpha))
        return s + alpha * X * s * (1 - s)


@rule("BiasGelu", since=1, domain=MS)
class BiasGelu(_Binary):
    """Y = gelu(A + B), exact."""

    def forward(A, B):
        return Gelu.forward(A + B, approximate="none")

    def partials(A, B, Y, na, nb):
        d = Gelu.deriv(A + B, None, approximate="none")
        return (d if na else None), (d if nb else None)


@rule("FastGelu", since=1, domain=MS)
class FastGelu:
    """Y = gelu_tanh(X + bias), bias optional along the last axis."""

    keeps = True

    def forward(X, bias=None):
        return Gelu.forward(X if bias is None else X + bias, approximate="tanh")

    def jvp(cx, Xdot, bdot=None):
        X = cx.x[0]
        Z = X if len(cx.x) < 2 or cx.x[1] is None else X + cx.x[1]
        d = Gelu.deriv(Z, None, approximate="tanh")
        lead = (Xdot if Xdot is not None else bdot).ndim - (X if Xdot is not None else cx.x[1]).ndim
        return add(None if Xdot is None else d * Xdot, None if bdot is None else d * expand(bdot, cx.x[1], X, lead))

    def vjp(cx, Ybar):
        X = cx.x[0]
        has_bias = len(cx.x) > 1 and cx.x[1] is not None
        Z = X + cx.x[1] if has_bias else X
        G = Gelu.deriv(Z, None, approximate="tanh") * Ybar
        lead = cx.lead(Ybar)
        bbar = unbroadcast(G, cx.x[1].shape, lead, cx.keep[1]) if has_bias and cx.need[1] else None
        return (G if cx.need[0] else None), bbar


@rule("FusedMatMul", since=1, domain=MS)
class FusedMatMul:
    """Y = alpha * A' @ B' with A' = A^T if transA, B' = B^T if transB (last two axes)."""

    keeps = True

    def forward(A, B, *, alpha=1.0, transA=0, transB=0, transBatchA=0, transBatchB=0):
        _no_batch_transpose(transBatchA, transBatchB)
        return Gemm.forward(A, B, alpha=alpha, beta=1.0, transA=transA, transB=transB)

    def jvp(cx, Adot, Bdot, *, alpha=1.0, transA=0, transB=0, transBatchA=0, transBatchB=0):
        return Gemm.jvp(cx, Adot, Bdot, alpha=alpha, beta=1.0, transA=transA, transB=transB)

    def vjp(cx, Ybar, *, alpha=1.0, transA=0, transB=0, transBatchA=0, transBatchB=0):
        A, B = cx.x
        if A.ndim == 2:
            return Gemm.vjp(cx, Ybar, alpha=alpha, beta=1.0, transA=transA, transB=transB)[:2]
        return _batched_vjp(cx, Ybar, alpha, transA, transB)


def _batched_vjp(cx, Ybar, alpha, transA, transB):
    """VJP of alpha * A' @ B' for batched A (N, ..., M, K); B a matrix or batched alike."""
    from .linalg import _t

    A, B = cx.x
    lead = cx.lead(Ybar)
    Yb = Ybar * Ybar.dtype.type(alpha) if alpha != 1 else Ybar
    Abar = Bbar = None
    if cx.need[0]:
        Abar = _t(mm(Yb, _t(_t(B, transB))), transA)
        Abar = unbroadcast(Abar, A.shape, lead, cx.keep[0])
    if cx.need[1]:
        G = _t(_t(A, transA)) @ Yb
        Bbar = unbroadcast(_t(G, transB), B.shape, lead, cx.keep[1])
    return Abar, Bbar


def _no_batch_transpose(a, b):
    if a or b:
        from ..errors import UnsupportedOpError

        raise UnsupportedOpError("FusedMatMul with transBatchA or transBatchB is not supported")

