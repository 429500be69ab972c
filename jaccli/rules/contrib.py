"""com.microsoft contrib operators that onnxruntime's transformer optimizer writes into models."""

from __future__ import annotations

import numpy as np

from . import Ctx, rule
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



# ---- FusedConv and FusedGemm: a Conv or Gemm followed by an activation (onnxruntime's optimizer) ----


def _activation(name, params):
    """(f(U), f'(U) from Y = f(U)) of an activation that onnxruntime fuses, with its parameters."""
    p = list(params or [])
    if name == "Relu":
        return (lambda U: np.maximum(U, 0)), (lambda Y: (Y > 0).astype(Y.dtype))
    if name == "Tanh":
        return np.tanh, (lambda Y: 1 - Y * Y)
    if name == "Sigmoid":
        return _sigmoid, (lambda Y: Y * (1 - Y))
    if name == "LeakyRelu":
        a = p[0] if p else 0.01
        return (lambda U: np.where(U > 0, U, U * U.dtype.type(a))), (lambda Y: np.where(Y > 0, 1, a).astype(Y.dtype))
    if name == "Clip":
        lo, hi = (p + [-np.inf, np.inf][len(p):])[:2]
        return (lambda U: np.clip(U, lo, hi)), (lambda Y: ((Y > lo) & (Y < hi)).astype(Y.dtype))
    if name == "HardSigmoid":
        a, b = (p + [0.2, 0.5][len(p):])[:2]
        return (lambda U: np.clip(U * U.dtype.type(a) + U.dtype.type(b), 0, 1)), \
            (lambda Y: np.where((Y > 0) & (Y < 1), a, 0).astype(Y.dtype))
    from ..errors import UnsupportedOpError

    raise UnsupportedOpError(f"fused activation '{name}' is not supported")


def _conv_attrs(a):
    return {"auto_pad": a.get("auto_pad", "NOTSET"), "dilations": a.get("dilations"), "group": a.get("group", 1),
            "kernel_shape": a.get("kernel_shape"), "pads": a.get("pads"), "strides": a.get("strides")}


@rule("FusedConv", since=1, domain=MS)
class FusedConv:
    """Y = activation(Conv(X, W, B) + Z), Z optional (a residual summed in)."""

    keeps = True

    def forward(X, W, B=None, Z=None, *, activation="", activation_params=None, **conv):
        from .conv import Conv

        U = Conv.forward(X, W, B, **_conv_attrs(conv))
        if Z is not None:
            U = U + Z
        return _activation(activation, activation_params)[0](U) if activation else U

    def jvp(cx, Xdot, Wdot, Bdot=None, Zdot=None, *, activation="", activation_params=None, **conv):
        from .conv import Conv

        D = add(Conv.jvp(cx, Xdot, Wdot, Bdot, **_conv_attrs(conv)) if any(t is not None for t in (Xdot, Wdot, Bdot)) else None, Zdot)
        return _activation(activation, activation_params)[1](cx.y[0]) * D if activation else D

    def vjp(cx, Ybar, *, activation="", activation_params=None, **conv):
        from .conv import Conv

        G = _activation(activation, activation_params)[1](cx.y[0]) * Ybar if activation else Ybar
        bars = Conv.vjp(cx, G, **_conv_attrs(conv))
        Zbar = G if len(cx.x) > 3 and cx.x[3] is not None and cx.need[3] else None
        return tuple(bars) + (Zbar,)


@rule("FusedGemm", since=1, domain=MS)
class FusedGemm:
    """Y = activation(alpha * A' @ B' + beta * C)."""

    keeps = True

    def forward(A, B, C=None, *, activation="", activation_alpha=None, activation_beta=None, activation_gamma=None,
                alpha=1.0, beta=1.0, transA=0, transB=0):
        U = Gemm.forward(A, B, C, alpha=alpha, beta=beta, transA=transA, transB=transB)
        return _activation(activation, _gemm_params(activation_alpha, activation_beta))[0](U) if activation else U

    def jvp(cx, Adot, Bdot, Cdot=None, *, activation="", activation_alpha=None, activation_beta=None,
            activation_gamma=None, alpha=1.0, beta=1.0, transA=0, transB=0):
        D = Gemm.jvp(cx, Adot, Bdot, Cdot, alpha=alpha, beta=beta, transA=transA, transB=transB)
        return _activation(activation, _gemm_params(activation_alpha, activation_beta))[1](cx.y[0]) * D if activation else D

    def vjp(cx, Ybar, *, activation="", activation_alpha=None, activation_beta=None, activation_gamma=None,
            alpha=1.0, beta=1.0, transA=0, transB=0):
        G = _activation(activation, _gemm_params(activation_alpha, activation_beta))[1](cx.y[0]) * Ybar if activation else Ybar
        return Gemm.vjp(cx, G, alpha=alpha, beta=beta, transA=transA, transB=transB)


def _gemm_params(a, b):
    return [v for v in (a, b) if v is not None]


@rule("SkipLayerNormalization", since=1, domain=MS)
class SkipLayerNormalization:
    """Y = LayerNorm(input + skip + bias) * gamma + beta over the last axis (the transformer
    optimizer's fusion of a residual Add and its LayerNorm); on request also the mean, the
    inverse standard deviation and the sum input + skip + bias."""

    keeps = True
    n_diff_outputs = None

    def forward(input, skip, gamma, beta=None, bias=None, *, epsilon=1e-12, n_outputs=1):
        from .norm import LayerNormalization

        s = _skip_sum(input, skip, bias)
        Y, mu, r = LayerNormalization.forward(s, gamma, beta, axis=-1, epsilon=epsilon)
        return (Y, mu, r, s)[:max(1, n_outputs)]

    def jvp(cx, Xdot, Kdot, Gdot, Bdot=None, Cdot=None, *, epsilon=1e-12, n_outputs=1):
        from .norm import LayerNormalization

        X, skip, gamma, beta, bias = (tuple(cx.x) + (None, None))[:5]
        s = _skip_sum(X, skip, bias)
        lead = next(D.ndim - x.ndim for D, x in zip((Xdot, Kdot, Gdot, Bdot, Cdot), cx.x) if D is not None)
        sdot = add(Xdot, expand(Kdot, skip, s, lead), expand(Cdot, bias, s, lead) if Cdot is not None else None)
        ln = Ctx((s, gamma, beta), (None,), rule=LayerNormalization)
        Ydot = LayerNormalization.jvp(ln, sdot, Gdot, Bdot, axis=-1, epsilon=epsilon)[0]
        return (Ydot, None, None, sdot)[:max(1, n_outputs)]

    def vjp(cx, Ybar, mubar=None, rbar=None, sbar=None, *, epsilon=1e-12, n_outputs=1):
        from .norm import LayerNormalization

        X, skip, gamma, beta, bias = (tuple(cx.x) + (None, None))[:5]
        s = _skip_sum(X, skip, bias)
        need = tuple(cx.need) + (False,) * (5 - len(cx.need))
        keep = tuple(cx.keep) + (False,) * (5 - len(cx.keep))
        need_s = need[0] or need[1] or need[4]
        lead = cx.lead(Ybar) if Ybar is not None else cx.lead(sbar, 3)
        Gbar = Bbar = None
        sb = sbar
        if Ybar is not None:
            ln = Ctx((s, gamma, beta), (cx.y[0],), (need_s, need[2], need[3]), (False, keep[2], keep[3]), LayerNormalization)
            Xs, Gbar, Bbar = LayerNormalization.vjp(ln, Ybar, axis=-1, epsilon=epsilon)
            sb = add(Xs, sbar)
        return (sb if need[0] else None,
                unbroadcast(sb, skip.shape, lead, keep[1]) if need[1] and sb is not None else None,
                Gbar, Bbar,
                unbroadcast(sb, bias.shape, lead, keep[4]) if need[4] and sb is not None else None)


def _skip_sum(X, skip, bias):
    return X + skip if bias is None else X + skip + bias
