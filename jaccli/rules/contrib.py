"""com.microsoft contrib operators that onnxruntime's transformer optimizer writes into models."""

from __future__ import annotations

import numpy as np

from . import Ctx, rule
from ..errors import UnsupportedOpError
from ._util import add, expand, padded, unbroadcast
from .elementwise import Gelu, _Binary, _sigmoid, elementwise
from .linalg import Gemm, MatMul, mm
from .norm import LayerNormalization, SimplifiedLayerNormalization, _softmax
from .resize import GridSample
from .shape import Gather, GatherND, Pad11, Range, Trilu, Unsqueeze13

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


class _Skip:
    """Y = norm(input + skip + bias) with the norm's parameters: onnxruntime's fusions of a
    residual Add and its normalisation. Inputs: input, skip, the norm's parameters, bias; outputs
    on request: Y, a mean, an inverse deviation and the sum input + skip + bias, whose cotangent
    flows too (the next residual reads it). `norm` is the normalisation's rule."""

    keeps = True
    n_diff_outputs = None

    def jvp(cx, *dots, epsilon=1e-12, n_outputs=1):
        x, dots = padded(cx.x, cx.rule.arity), padded(dots, cx.rule.arity)
        X, skip, bias = x[0], x[1], x[-1]
        s = _skip_sum(X, skip, bias)
        lead = next(D.ndim - v.ndim for D, v in zip(dots, x) if D is not None)
        sdot = add(dots[0], expand(dots[1], skip, s, lead), None if dots[-1] is None else expand(dots[-1], bias, s, lead))
        Ydot = cx.rule.norm.jvp(Ctx((s, *x[2:-1]), (s,)), sdot, *dots[2:-1], axis=-1, epsilon=epsilon)
        return (Ydot[0] if isinstance(Ydot, tuple) else Ydot, None, None, sdot)[:max(1, n_outputs)]

    def vjp(cx, Ybar, _mbar=None, _rbar=None, sbar=None, *, epsilon=1e-12, n_outputs=1):
        n, norm = cx.rule.arity, cx.rule.norm
        x, need, keep = padded(cx.x, n), padded(cx.need, n, False), padded(cx.keep, n, False)
        X, skip, bias = x[0], x[1], x[-1]
        s = _skip_sum(X, skip, bias)
        lead = cx.lead(Ybar) if Ybar is not None else cx.lead(sbar, 3)
        pbars, sb = [None] * (n - 3), sbar
        if Ybar is not None:
            nx = Ctx((s, *x[2:-1]), (cx.y[0],), (need[0] or need[1] or need[-1], *need[2:-1]), (False, *keep[2:-1]), norm)
            Xs, *pbars = norm.vjp(nx, Ybar, axis=-1, epsilon=epsilon)
            sb = add(Xs, sbar)
        return (sb if need[0] else None,
                unbroadcast(sb, skip.shape, lead, keep[1]) if need[1] and sb is not None else None,
                *pbars,
                unbroadcast(sb, bias.shape, lead, keep[-1]) if need[-1] and sb is not None else None)


@rule("SkipLayerNormalization", since=1, domain=MS)
class SkipLayerNormalization(_Skip):
    """Y = LayerNorm(input + skip + bias) * gamma + beta over the last axis (the transformer
    optimizer's fusion of a residual Add and its LayerNorm); on request also the mean, the
    inverse standard deviation and the sum input + skip + bias."""

    norm, arity = LayerNormalization, 5  # input, skip, gamma, beta, bias

    def forward(input, skip, gamma, beta=None, bias=None, *, epsilon=1e-12, n_outputs=1):
        s = _skip_sum(input, skip, bias)
        Y, mu, r = LayerNormalization.forward(s, gamma, beta, axis=-1, epsilon=epsilon)
        return (Y, mu, r, s)[:max(1, n_outputs)]


@rule("SkipSimplifiedLayerNormalization", since=1, domain=MS)
class SkipSimplifiedLayerNormalization(_Skip):
    """Y = RMSNorm(input + skip + bias) * gamma over the last axis (the transformer optimizer's
    fusion for LLaMA- and T5-like models); on request also a mean output (zeros: an RMS norm has
    none), the inverse root mean square and the sum input + skip + bias, which such models feed
    to the next residual."""

    norm, arity = SimplifiedLayerNormalization, 4  # input, skip, gamma, bias

    def forward(input, skip, gamma, bias=None, *, epsilon=1e-12, n_outputs=1):
        s = _skip_sum(input, skip, bias)
        Y, r = SimplifiedLayerNormalization.forward(s, gamma, axis=-1, epsilon=epsilon, n_outputs=2)
        return (Y, np.zeros_like(r), r, s)[:max(1, n_outputs)]


def _skip_sum(X, skip, bias):
    return X + skip if bias is None else X + skip + bias


# ---- Attention and EmbedLayerNormalization: a BERT after onnxruntime's transformer optimizer ------


def _heads(P, h):
    """(..., S, h * d) -> (..., h, S, d)"""
    return np.swapaxes(P.reshape(P.shape[:-1] + (h, -1)), -2, -3)


def _merge(O):
    """(..., h, S, d) -> (..., S, h * d)"""
    O = np.swapaxes(O, -2, -3)
    return O.reshape(O.shape[:-2] + (-1,))


class _Scores:
    """softmax(Q K^T s + mask + bias) V by head, Q (..., h, S, d), K (..., h, T, d), V (..., h, T, dv),
    with its tangent and cotangent maps: the core that Attention and MultiHeadAttention share."""

    def __init__(self, Q, K, V, s, mask, bias):
        self.Q, self.K, self.V, self.s = Q, K, V, s
        S = Q @ np.swapaxes(K, -1, -2) * s + mask
        self.A = _softmax(S if bias is None else S + bias, -1)
        self.O = self.A @ V

    def jvp(self, Qd, Kd, Vd, Sd):
        """The output's tangent from those of Q, K, V and of the scores (attention_bias), any None."""
        if Qd is not None:
            Sd = add(Sd, Qd @ np.swapaxes(self.K, -1, -2) * self.s)
        if Kd is not None:
            Sd = add(Sd, self.Q @ np.swapaxes(Kd, -1, -2) * self.s)
        Od = None
        if Sd is not None:
            Ad = self.A * (Sd - (self.A * Sd).sum(axis=-1, keepdims=True))
            Od = Ad @ self.V
        return add(Od, None if Vd is None else self.A @ Vd)

    def vjp(self, Ob):
        """Cotangents of Q, K, V and of the scores from the output's Ob (*lead, ..., h, S, dv)."""
        Ab = Ob @ np.swapaxes(self.V, -1, -2)
        Sb = self.A * (Ab - (Ab * self.A).sum(axis=-1, keepdims=True))
        return Sb @ self.K * self.s, np.swapaxes(Sb, -1, -2) @ self.Q * self.s, np.swapaxes(self.A, -1, -2) @ Ob, Sb


class _Attn:
    """The primal parts of an Attention node: the projection P = X W (+ b), split into queries,
    keys and values by head, the attention weights A and the scale."""

    def __init__(self, cx, attrs):
        X, W, b, mask, past, bias, past_length = padded(cx.x, 7)
        if past is not None or past_length is not None or attrs.get("do_rotary"):
            raise UnsupportedOpError("Attention with a past state (a decoder's cache) or rotary embeddings is not supported")
        self.h = h = int(attrs["num_heads"])
        sizes = attrs.get("qkv_hidden_sizes")
        self.sizes = [int(s) for s in sizes] if sizes is not None and len(sizes) else [W.shape[1] // 3] * 3
        self.P = mm(X, W) if b is None else mm(X, W) + b
        self.Q, self.K, self.V = self.split(self.P)
        scale = self.P.dtype.type(attrs.get("scale") or 1 / np.sqrt(self.sizes[0] // h))
        shape = self.Q.shape[:-1] + self.K.shape[-2:-1]
        fill = _mask_bias(mask, shape, attrs.get("unidirectional", 0), attrs.get("mask_filter_value", -10000.0), self.P.dtype)
        self.core = _Scores(self.Q, self.K, self.V, scale, fill, bias)

    def split(self, P):
        """Queries, keys and values by head, of the projection or of its tangent."""
        q, k, _ = self.sizes
        return _heads(P[..., :q], self.h), _heads(P[..., q:q + k], self.h), _heads(P[..., q + k:], self.h)


def _mask_bias(mask, shape, unidirectional, fill, dtype):
    """The additive mask (0 or `fill`) for scores (N, h, S, T) from mask_index: end positions (N,),
    end and start positions (2N,), or a mask of ones and zeros (N, T), (N, S, T) or (N, 1, M, M);
    plus the causal mask when unidirectional."""
    N, _, S, T = shape
    keep = np.ones((N, 1, S, T), bool)
    if mask is not None:
        m = np.asarray(mask)
        j = np.arange(T)
        if m.ndim == 1 and m.shape[0] == N:
            keep &= (j < m[:, None])[:, None, None, :]
        elif m.ndim == 1 and m.shape[0] == 2 * N:
            keep &= ((j < m[:N, None]) & (j >= m[N:, None]))[:, None, None, :]
        elif m.ndim == 2:
            keep &= (m != 0)[:, None, None, :]
        elif m.ndim == 3:
            keep &= (m != 0)[:, None, :, :]
        elif m.ndim == 4:
            keep &= (m[:, :, :S, :T] != 0)
        else:
            raise UnsupportedOpError(f"Attention with a mask_index of shape {m.shape} is not supported")
    if unidirectional:
        keep &= np.tril(np.ones((S, T), bool), T - S)
    return np.where(keep, dtype.type(0), dtype.type(fill))


@rule("Attention", since=1, domain=MS)
class Attention:
    """Multi-head self-attention fused by onnxruntime's transformer optimizer (BERT, with eager
    attention): Y = concat_h softmax(Q_h K_h^T scale + mask + attention_bias) V_h, where
    [Q K V] = input @ weights + bias. mask_index in any of its forms but the GPT-2 one; no past
    state (the present output, if asked for, is the keys and values). The projection's
    derivatives are MatMul's, per-sample weight cotangents included."""

    nondiff = (3, 4, 6)
    keeps = True

    def forward(input, weights, bias=None, mask_index=None, past=None, attention_bias=None, past_sequence_length=None,
                *, num_heads, unidirectional=0, qkv_hidden_sizes=None, mask_filter_value=-10000.0, scale=0.0, do_rotary=0,
                rotary_embedding_dim=0, past_present_share_buffer=0, n_outputs=1):
        attrs = dict(num_heads=num_heads, unidirectional=unidirectional, qkv_hidden_sizes=qkv_hidden_sizes,
                     mask_filter_value=mask_filter_value, scale=scale, do_rotary=do_rotary)
        a = _Attn(Ctx((input, weights, bias, mask_index, past, attention_bias, past_sequence_length), ()), attrs)
        Y = _merge(a.core.O)
        return (Y, np.stack([a.K, a.V])) if n_outputs > 1 else Y

    def jvp(cx, Xdot, Wdot, bdot=None, _m=None, _p=None, Bdot=None, _l=None, **attrs):
        a = _Attn(cx, attrs)
        X, W, b, _, _, B = padded(cx.x, 6)
        lead = next(D.ndim - x.ndim for D, x in zip((Xdot, Wdot, bdot, Bdot), (X, W, b, B)) if D is not None)
        Pdot = add(MatMul.jvp(Ctx((X, W), ()), Xdot, Wdot), None if bdot is None else expand(bdot, b, a.P, lead))
        Qd, Kd, Vd = (None, None, None) if Pdot is None else a.split(Pdot)
        return _merge(a.core.jvp(Qd, Kd, Vd, None if Bdot is None else expand(Bdot, B, a.core.A, lead)))

    def vjp(cx, Ybar, **attrs):
        a = _Attn(cx, attrs)
        need, keep = padded(cx.need, 7, False), padded(cx.keep, 7, False)
        lead = cx.lead(Ybar)
        Qb, Kb, Vb, Sb = a.core.vjp(_heads(Ybar, a.h))
        Bbar = unbroadcast(Sb, cx.x[5].shape, lead, keep[5]) if need[5] else None
        Xbar = Wbar = bbar = None
        if need[0] or need[1] or need[2]:
            Pb = np.concatenate([_merge(Qb), _merge(Kb), _merge(Vb)], axis=-1)
            if need[0] or need[1]:
                Xbar, Wbar = MatMul.vjp(Ctx(tuple(cx.x[:2]), (a.P,), (need[0], need[1]), (keep[0], keep[1])), Pb)
            if need[2]:
                bbar = unbroadcast(Pb, cx.x[2].shape, lead, keep[2])
        return Xbar, Wbar, bbar, None, None, Bbar, None


class _MhaForm:
    """How a MultiHeadAttention node's query, key and value carry Q, K and V: (B, S, D) inputs,
    with the projection's bias added, or key and value already by head (B, h, T, d). Maps the
    inputs (or their tangents, with leading direction axes) to Q, K, V by head, and cotangents
    back. The packed layouts (QKV or KV in one input) are refused: onnxruntime runs them on
    CUDA only, so there is no oracle for them here."""

    def __init__(self, x, h):
        q, k, v, b = padded(x, 4)
        if q.ndim == 5 or (k is not None and k.ndim == 5) or k is None or v is None:
            raise UnsupportedOpError("MultiHeadAttention with packed QKV or KV is not supported "
                                     "(onnxruntime runs it on CUDA only); unpacked query, key and value are")
        self.h = h
        self.by_head = k.ndim == 4
        if b is not None and self.by_head:
            raise UnsupportedOpError("MultiHeadAttention with a bias and key and value by head is not supported")
        self.sizes = (q.shape[-1], k.shape[-1], v.shape[-1])

    def heads(self, q, k, v, b):
        if b is not None:
            D, Dk = self.sizes[:2]
            q, k, v = q + b[..., :D], k + b[..., D:D + Dk], v + b[..., D + Dk:]
        return (_heads(q, self.h), k, v) if self.by_head else tuple(_heads(t, self.h) for t in (q, k, v))

    def tangents(self, qd, kd, vd, bd, x, lead):
        """Q, K, V tangents, None where nothing moves them."""
        if bd is not None:  # the bias moves each of them
            D, Dk = self.sizes[:2]
            parts = (bd[..., :D], bd[..., D:D + Dk], bd[..., D + Dk:])
            qd, kd, vd = (add(t, expand(p, p[(0,) * lead], xi, lead)) for t, p, xi in zip((qd, kd, vd), parts, x[:3]))
        Qd = None if qd is None else _heads(qd, self.h)
        if self.by_head:
            return Qd, kd, vd
        return (Qd,) + tuple(None if t is None else _heads(t, self.h) for t in (kd, vd))

    def cotangents(self, Qb, Kb, Vb):
        """The cotangents of query, key and value, from those of Q, K, V by head."""
        merged = (None if Qb is None else _merge(Qb),)
        return merged + ((Kb, Vb) if self.by_head else tuple(None if t is None else _merge(t) for t in (Kb, Vb)))


@rule("MultiHeadAttention", since=1, domain=MS)
class MultiHeadAttention:
    """Multi-head attention without the projections, as onnxruntime's transformer optimizer fuses
    it (CLIP, SAM, diffusion models' self- and cross-attention): Y = concat_h softmax(Q_h K_h^T
    scale + mask + attention_bias) V_h from a query, key and value (B, S, D), or key and value
    already by head, with the projection's bias; key_padding_mask as lengths (B), ones and zeros
    (B, T) or (B, S, T); unidirectional. No past state; present_key and present_value are K and V
    by head."""

    nondiff = (4, 6, 7, 8, 9)
    keeps = True  # the bias and attention_bias, parameters
    n_diff_outputs = None  # present_key and present_value too

    def forward(query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None, past_key=None,
                past_value=None, past_sequence_length=None, cache_indirection=None, *, num_heads, mask_filter_value=-10000.0,
                scale=0.0, unidirectional=0, n_outputs=1):
        f, core = _mha(Ctx((query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value,
                            past_sequence_length, cache_indirection), ()), num_heads, mask_filter_value, scale, unidirectional, n_outputs)
        return (_merge(core.O), core.K, core.V)[:max(1, n_outputs)] if n_outputs > 1 else _merge(core.O)

    def jvp(cx, qd, kd=None, vd=None, bd=None, _m=None, Bd=None, *_, num_heads, mask_filter_value=-10000.0, scale=0.0,
            unidirectional=0, n_outputs=1):
        f, core = _mha(cx, num_heads, mask_filter_value, scale, unidirectional, n_outputs)
        lead = next(t.ndim - xi.ndim for t, xi in zip((qd, kd, vd, bd, None, Bd), cx.x) if t is not None)
        Qd, Kd, Vd = f.tangents(qd, kd, vd, bd, cx.x, lead)
        Yd = _merge(core.jvp(Qd, Kd, Vd, None if Bd is None else expand(Bd, cx.x[5], core.A, lead)))
        return (Yd, Kd, Vd)[:n_outputs] if n_outputs > 1 else Yd

    def vjp(cx, Ybar, Kbar=None, Vbar=None, *, num_heads, mask_filter_value=-10000.0, scale=0.0, unidirectional=0, n_outputs=1):
        f, core = _mha(cx, num_heads, mask_filter_value, scale, unidirectional, n_outputs)
        need, keep = padded(cx.need, 10, False), padded(cx.keep, 10, False)
        if any(keep[:3]):
            raise UnsupportedOpError("MultiHeadAttention: per-sample cotangents of a query, key or value that is a parameter are not supported")
        lead = next(cx.lead(G, i) for i, G in enumerate((Ybar, Kbar, Vbar)) if G is not None)
        Qb = Sb = None
        if Ybar is not None:
            Qb, Kb, Vb, Sb = core.vjp(_heads(Ybar, num_heads))
            Kbar, Vbar = add(Kb, Kbar), add(Vb, Vbar)
        qb, kb, vb = f.cotangents(Qb, Kbar, Vbar)
        bb = None
        if need[3]:  # the bias's cotangent is the three inputs', summed over samples and positions
            G = next(g for g in (Ybar, Kbar, Vbar) if g is not None)
            parts = [np.zeros(G.shape[:lead] + x.shape, G.dtype) if g is None else g for g, x in zip((qb, kb, vb), cx.x[:3])]
            bb = np.concatenate([unbroadcast(p, (p.shape[-1],), lead, keep[3]) for p in parts], axis=-1)
        Bb = unbroadcast(Sb, cx.x[5].shape, lead, keep[5]) if need[5] and Sb is not None else None
        return (qb if need[0] else None, kb if need[1] else None, vb if need[2] else None, bb, None, Bb,
                None, None, None, None)


def _mha(cx, num_heads, mask_filter_value, scale, unidirectional, n_outputs):
    """The layout of a MultiHeadAttention node's inputs and its attention by head."""
    q, k, v, b, mask, bias, past_k, past_v = padded(cx.x, 8)
    if past_k is not None or past_v is not None:
        raise UnsupportedOpError("MultiHeadAttention with a past state (a decoder's cache) is not supported")
    if n_outputs > 3:
        raise UnsupportedOpError("MultiHeadAttention's qk output is not supported")
    if mask is not None and np.ndim(mask) == 1 and np.shape(mask)[0] != q.shape[0]:
        raise UnsupportedOpError(f"MultiHeadAttention with a key_padding_mask of shape {np.shape(mask)} is not supported")
    f = _MhaForm(cx.x, int(num_heads))
    Q, K, V = f.heads(q, k, v, b)
    s = Q.dtype.type(scale or 1 / np.sqrt(Q.shape[-1]))
    fill = _mask_bias(mask, Q.shape[:-1] + K.shape[-2:-1], unidirectional, mask_filter_value, Q.dtype)
    return f, _Scores(Q, K, V, s, fill, bias)


@rule("EmbedLayerNormalization", since=1, domain=MS)
class EmbedLayerNormalization:
    """Y = LayerNorm(word[input_ids] + position[position_ids or 0..S-1] + segment[segment_ids]) *
    gamma + beta: a BERT's embeddings fused by onnxruntime's transformer optimizer; also the
    mask index (each sample's count of mask ones) and, on request, the sum before the norm.
    The tables are parameters: a sample's cotangent of one is its own tokens' rows (Gather's)."""

    nondiff = (0, 1, 7, 8)
    keeps = True
    n_diff_outputs = None

    def forward(input_ids, segment_ids=None, word_embedding=None, position_embedding=None, segment_embedding=None,
                gamma=None, beta=None, mask=None, position_ids=None, *, epsilon=1e-12, mask_index_type=1, n_outputs=1):
        E = _embed_sum(input_ids, segment_ids, word_embedding, position_embedding, segment_embedding, position_ids)
        Y = LayerNormalization.forward(E, gamma, beta, axis=-1, epsilon=epsilon)[0]
        count = np.zeros(input_ids.shape[0], np.int32) if mask is None else (np.asarray(mask) != 0).sum(axis=1, dtype=np.int32)
        return (Y, count, E)[:max(2, n_outputs)]

    def jvp(cx, _i, _s, Wdot, Pdot, Sdot, Gdot, Bdot, _m=None, _p=None, *, epsilon=1e-12, mask_index_type=1, n_outputs=1):
        ids, seg, word, pos, segtab, gamma, beta, _, pos_ids = padded(cx.x, 9)
        E = _embed_sum(ids, seg, word, pos, segtab, pos_ids)
        Edot = add(*(Gather.jvp(Ctx((t, i)), D, axis=0) for t, i, D in _tables(cx.x, (Wdot, Pdot, Sdot)) if D is not None))
        Y = cx.y[0]
        Ydot = LayerNormalization.jvp(Ctx((E, gamma, beta), (Y,)), Edot, Gdot, Bdot, axis=-1, epsilon=epsilon)[0]
        return (Ydot, None, Edot)[:max(2, n_outputs)]

    def vjp(cx, Ybar, _mbar=None, Ebar=None, *, epsilon=1e-12, mask_index_type=1, n_outputs=1):
        ids, seg, word, pos, segtab, gamma, beta, _, pos_ids = padded(cx.x, 9)
        need, keep = padded(cx.need, 9, False), padded(cx.keep, 9, False)
        E = _embed_sum(ids, seg, word, pos, segtab, pos_ids)
        Gbar = Bbar = None
        if Ybar is not None:
            ln = Ctx((E, gamma, beta), (cx.y[0],), (need[2] or need[3] or need[4], need[5], need[6]), (False, keep[5], keep[6]),
                     LayerNormalization)
            Es, Gbar, Bbar = LayerNormalization.vjp(ln, Ybar, axis=-1, epsilon=epsilon)
            Ebar = add(Es, Ebar)
        tabs = [None, None, None]
        for k, (t, i, _) in enumerate(_tables(cx.x, (True, True, True))):
            if need[2 + k] and Ebar is not None:
                tabs[k] = Gather.vjp(Ctx((t, i), (E,), (True, False), (keep[2 + k], False)), Ebar, axis=0)[0]
        return (None, None, *tabs, Gbar, Bbar, None, None)


def _tables(x, tangents):
    """(table, per-sample indices, tangent) for the word, position and segment embeddings present."""
    ids, seg, word, pos, segtab, _, _, _, pos_ids = padded(x, 9)
    out = [(word, ids, tangents[0]), (pos, _positions(ids, pos_ids), tangents[1])]
    if segtab is not None and seg is not None:
        out.append((segtab, seg, tangents[2]))
    return out


def _positions(ids, pos_ids):
    """Each sample's position ids (N, S): 0..S-1 unless given, (1, S) broadcast."""
    p = np.arange(ids.shape[1]) if pos_ids is None else np.asarray(pos_ids)
    return np.broadcast_to(p, ids.shape)


def _embed_sum(ids, seg, word, pos, segtab, pos_ids):
    E = np.take(word, ids, axis=0) + np.take(pos, _positions(ids, pos_ids), axis=0)
    if segtab is not None and seg is not None:
        E = E + np.take(segtab, seg, axis=0)
    return E


# ---- RotaryEmbedding: onnxruntime's rotary position embedding (its LLaMA, Phi and Mistral fusions) --


def _rotary_layout(X, num_heads, rotary_embedding_dim, cos_cache):
    """X as (B, h, S, d) (a view): (B, S, h*d) inputs are split into heads; and the rotated width."""
    if X.ndim == 4:
        heads = X
    else:
        h = int(num_heads) or X.shape[-1] // (2 * cos_cache.shape[-1])
        heads = np.swapaxes(X.reshape(X.shape[:-1] + (h, -1)), -2, -3)
    rd = int(rotary_embedding_dim) or 2 * cos_cache.shape[-1]
    if rd > heads.shape[-1] or rd % 2:
        raise UnsupportedOpError(f"RotaryEmbedding of {rd} dimensions on heads of {heads.shape[-1]} is not supported")
    return heads, rd


def _rotary_angles(position_ids, cos_cache, sin_cache, B, S, rd):
    """cos and sin (B, 1, S, rd / 2) at each position: position_ids (B, S), or one offset."""
    p = np.asarray(position_ids, np.int64)
    pos = p if p.ndim == 2 else (p.reshape(-1)[0] + np.arange(S))[None, :].repeat(B, 0)
    if pos.min(initial=0) < 0 or pos.max(initial=0) >= cos_cache.shape[0]:
        raise UnsupportedOpError(f"RotaryEmbedding: a position beyond its cache of {cos_cache.shape[0]}")
    return cos_cache[pos][:, None, :, : rd // 2], sin_cache[pos][:, None, :, : rd // 2]


def _rotate(H, cos, sin, rd, interleaved):
    """The heads H (*lead, B, h, S, d) with their first rd dimensions rotated by the angles: in
    pairs (2i, 2i+1) if interleaved, else (i, i + rd/2). Linear in H."""
    out = H.copy()
    if interleaved:
        a, b = H[..., 0:rd:2], H[..., 1:rd:2]
        out[..., 0:rd:2], out[..., 1:rd:2] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = H[..., : rd // 2], H[..., rd // 2: rd]
        out[..., : rd // 2], out[..., rd // 2: rd] = a * cos - b * sin, b * cos + a * sin
    return out


@rule("RotaryEmbedding", since=1, domain=MS)
class MsRotaryEmbedding:
    """Rotary position embedding of queries or keys, (B, S, h*d) or (B, h, S, d): the first
    rotary_embedding_dim dimensions of each head turned, pair by pair, by the angles of its
    position in cos_cache and sin_cache (positions from position_ids, or from an offset). Linear
    in the input; the caches are tables, taken as constants."""

    nondiff = (1, 2, 3)

    def forward(input, position_ids, cos_cache, sin_cache, *, interleaved=0, num_heads=0, rotary_embedding_dim=0,
                scale=1.0, is_packed_batching=0):
        return MsRotaryEmbedding._apply(input, input, position_ids, cos_cache, sin_cache, interleaved, num_heads,
                                        rotary_embedding_dim, is_packed_batching)

    def _apply(T, X, position_ids, cos_cache, sin_cache, interleaved, num_heads, rotary_embedding_dim, packed):
        """The rotation (fixed by X's positions) applied to T: X itself, or a tangent or (with the
        angles negated) a cotangent of it, with leading direction axes."""
        if packed:
            raise UnsupportedOpError("RotaryEmbedding with is_packed_batching is not supported")
        heads, rd = _rotary_layout(X, num_heads, rotary_embedding_dim, cos_cache)
        B, h, S, _ = heads.shape
        cos, sin = _rotary_angles(position_ids, cos_cache, sin_cache, B, S, rd)
        lead = T.shape[: T.ndim - X.ndim]
        Tf = T.reshape((-1,) + X.shape)
        Th = np.swapaxes(Tf.reshape(Tf.shape[:-1] + (h, -1)), -2, -3) if X.ndim == 3 else Tf
        out = _rotate(Th, cos.astype(T.dtype), sin.astype(T.dtype), rd, interleaved)
        if X.ndim == 3:
            out = np.swapaxes(out, -2, -3)
        return out.reshape(lead + X.shape)

    def jvp(cx, Xdot, *_, interleaved=0, num_heads=0, rotary_embedding_dim=0, scale=1.0, is_packed_batching=0):
        X, pos, cos, sin = cx.x
        return MsRotaryEmbedding._apply(Xdot, X, pos, cos, sin, interleaved, num_heads, rotary_embedding_dim,
                                        is_packed_batching)

    def vjp(cx, Ybar, *, interleaved=0, num_heads=0, rotary_embedding_dim=0, scale=1.0, is_packed_batching=0):
        X, pos, cos, sin = cx.x  # a rotation's transpose is the rotation back: the angles negated
        return (MsRotaryEmbedding._apply(Ybar, X, pos, cos, -sin, interleaved, num_heads, rotary_embedding_dim,
                                         is_packed_batching), None, None, None)


class _Gqa:
    """A GroupQueryAttention node's prompt: Q (B, Hq, S, D), K and V (B, Hkv, S, D) from its
    query, key and value (or a packed query), turned by the rotary caches if do_rotary, and
    the attention of each query head with key and value head h // (Hq / Hkv), causal and
    within the local window. Only a prompt: no past state, every sequence S long."""

    def __init__(self, x, attrs):
        q, k, v, past_k, past_v, seqlens, total, cos, sin = padded(x, 9)
        if any(e is not None for e in x[9:]):
            raise UnsupportedOpError("GroupQueryAttention with position_ids, attention_bias, head_sink, quantized or "
                                     "normalised keys is not supported")
        for a in ("softcap", "smooth_softmax", "qk_output", "k_quant_type", "v_quant_type", "kv_cache_bit_width",
                  "sliding_window_cache"):
            if attrs.get(a) not in (None, 0, 0.0, "NONE", ""):
                raise UnsupportedOpError(f"GroupQueryAttention with {a}={attrs[a]} is not supported")
        if not attrs.get("causal", 1):
            raise UnsupportedOpError("GroupQueryAttention with causal=0 is not supported")
        self.h, self.hkv = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
        self.packed = k is None
        S = q.shape[1]
        if any(p is not None and p.shape[2] for p in (past_k, past_v)) or int(np.ravel(total)[0]) != S \
                or (np.asarray(seqlens) != S - 1).any():
            raise UnsupportedOpError("GroupQueryAttention with a past state or padded sequences (a decoder's later "
                                     "steps) is not supported; a prompt is: no past, seqlens_k = S - 1")
        self.rotary = None
        if attrs.get("do_rotary"):
            if cos is None or sin is None or cos.shape[0] < S:
                raise UnsupportedOpError(f"GroupQueryAttention with do_rotary needs cos_cache and sin_cache of at least "
                                         f"{S} positions")
            rd = 2 * cos.shape[-1]
            self.rotary = (cos[:S][None, None], sin[:S][None, None], rd, int(attrs.get("rotary_interleaved", 0)))
        Q, K, V = self.heads(q, k, v)
        self.K, self.V = K, V
        r = self.h // self.hkv
        i, j = np.arange(S)[:, None], np.arange(S)[None]
        keep = j <= i
        window = int(attrs.get("local_window_size", -1))
        if window > 0:
            keep &= j > i - window
        mask = np.where(keep, Q.dtype.type(0), Q.dtype.type(-np.inf))
        s = Q.dtype.type(attrs.get("scale") or 1 / np.sqrt(Q.shape[-1]))
        self.core = _Scores(Q, np.repeat(K, r, axis=-3), np.repeat(V, r, axis=-3), s, mask, None)

    def turn(self, H, back=False):
        """Heads turned by the rotary angles of their positions (back: the transpose)."""
        if self.rotary is None or H is None:
            return H
        cos, sin, rd, interleaved = self.rotary
        return _rotate(H, cos.astype(H.dtype), (-sin if back else sin).astype(H.dtype), rd, interleaved)

    def heads(self, q, k, v):
        """Q, K, V by head (turned) from the inputs or their tangents (any None)."""
        if self.packed and q is not None:
            D = q.shape[-1] // (self.h + 2 * self.hkv)
            q, k, v = q[..., :self.h * D], q[..., self.h * D:(self.h + self.hkv) * D], q[..., (self.h + self.hkv) * D:]
        Q = None if q is None else self.turn(_heads(q, self.h))
        K = None if k is None else self.turn(_heads(k, self.hkv))
        return Q, K, None if v is None else _heads(v, self.hkv)

    def repeat(self, G):
        return None if G is None else np.repeat(G, self.h // self.hkv, axis=-3)

    def fold(self, G):
        """The cotangent of K or V by head from that of their repeats."""
        r = self.h // self.hkv
        return G.reshape(G.shape[:-3] + (self.hkv, r) + G.shape[-2:]).sum(axis=-3)


@rule("GroupQueryAttention", since=1, domain=MS)
class GroupQueryAttention:
    """Grouped-query attention as onnxruntime's LLM exports and its transformer optimizer fuse
    it (LLaMA, Mistral, Phi, Qwen): each query head attends, causally and within
    local_window_size, to key and value head h // (num_heads / kv_num_heads), after rotary
    embeddings of the queries and keys if do_rotary; the query may pack Q, K and V. Outputs
    the attention (B, S, num_heads * D) and present_key and present_value (K turned, V by
    head). A prompt only: no past state, every sequence full (seqlens_k = S - 1); no softcap."""

    nondiff = tuple(range(3, 17))
    n_diff_outputs = None  # present_key and present_value too

    def forward(query, key=None, value=None, *rest, num_heads, kv_num_heads, scale=0.0, softcap=0.0, local_window_size=-1,
                do_rotary=0, rotary_interleaved=0, smooth_softmax=0, causal=1, qk_output=0, k_quant_type="NONE",
                v_quant_type="NONE", kv_cache_bit_width=0, sliding_window_cache=0, q_norm_epsilon=None,
                k_norm_epsilon=None, qk_norm_epsilon=None, n_outputs=1):
        attrs = dict(num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, softcap=softcap,
                     local_window_size=local_window_size, do_rotary=do_rotary, rotary_interleaved=rotary_interleaved,
                     smooth_softmax=smooth_softmax, causal=causal, qk_output=qk_output, k_quant_type=k_quant_type,
                     v_quant_type=v_quant_type, kv_cache_bit_width=kv_cache_bit_width,
                     sliding_window_cache=sliding_window_cache)
        g = _Gqa((query, key, value) + rest, attrs)
        return (_merge(g.core.O), g.K, g.V)[:max(1, n_outputs)] if n_outputs > 1 else _merge(g.core.O)

    def jvp(cx, qd, kd=None, vd=None, *_, n_outputs=1, **attrs):
        g = _Gqa(cx.x, attrs)
        Qd, Kd, Vd = g.heads(qd, kd, vd)
        Yd = _merge(g.core.jvp(Qd, g.repeat(Kd), g.repeat(Vd), None))
        if n_outputs == 1:
            return Yd
        zeros = np.zeros(Yd.shape[: Yd.ndim - 3] + g.K.shape, Yd.dtype)
        return (Yd, zeros if Kd is None else Kd, zeros if Vd is None else Vd)[:n_outputs]

    def vjp(cx, Ybar, Kbar=None, Vbar=None, *, n_outputs=1, **attrs):
        if any(cx.keep):
            raise UnsupportedOpError("GroupQueryAttention: per-sample cotangents of a query, key or value that is a "
                                     "parameter are not supported")
        g = _Gqa(cx.x, attrs)
        Qb = None
        if Ybar is not None:
            Qb, Kb, Vb, _ = g.core.vjp(_heads(Ybar, g.h))
            Kbar, Vbar = add(g.fold(Kb), Kbar), add(g.fold(Vb), Vbar)
        Qb, Kbar = g.turn(Qb, back=True), g.turn(Kbar, back=True)
        qb, kb, vb = (None if G is None else _merge(G) for G in (Qb, Kbar, Vbar))
        if g.packed:
            G = next(t for t in (qb, kb, vb) if t is not None)
            D = G.shape[-1] // (g.h if G is qb else g.hkv)
            lead = G.shape[:-1]
            parts = [t if t is not None else np.zeros(lead + (n * D,), G.dtype) for t, n in ((qb, g.h), (kb, g.hkv), (vb, g.hkv))]
            return (np.concatenate(parts, axis=-1),) + (None,) * (len(cx.x) - 1)
        return (qb, kb, vb) + (None,) * (len(cx.x) - 3)


# ---- a diffusion model's UNet and VAE after onnxruntime's transformer optimizer for CUDA
# (optimize_model(model_type="unet" or "vae"), as Stable Diffusion's optimized exports ship):
# onnxruntime runs these on CUDA only; here they run as the standard operators they fuse ------------


def _first(X, lead=0):
    """Channels-last data (*lead, N, *sp, C) with its channels second, after the samples."""
    return np.moveaxis(X, -1, lead + 1)


def _last(Y, lead=0):
    return np.moveaxis(Y, lead + 1, -1)


@rule("NhwcConv", since=1, domain=MS)
class NhwcConv:
    """Conv on channels-last data: X (N, *sp, C), W (M, *kernel, C/group), B (M,); Y (N, *out, M)."""

    keeps = True

    def forward(X, W, B=None, **conv):
        from .conv import Conv

        return _last(Conv.forward(_first(X), _first(W), B, **_conv_attrs(conv)))

    def jvp(cx, Xdot, Wdot, Bdot=None, **conv):
        from .conv import Conv

        X, W = cx.x[0], cx.x[1]
        inner = Ctx((_first(X), _first(W), *cx.x[2:]), (_first(cx.y[0]),), rule=Conv)
        lead = next(D.ndim - x.ndim for D, x in zip((Xdot, Wdot, Bdot), cx.x) if D is not None)
        D = Conv.jvp(inner, None if Xdot is None else _first(Xdot, lead), None if Wdot is None else np.moveaxis(Wdot, -1, -3),
                     Bdot, **_conv_attrs(conv))
        return _last(D, lead)

    def vjp(cx, Ybar, **conv):
        from .conv import Conv

        X, W = cx.x[0], cx.x[1]
        lead = cx.lead(Ybar)
        inner = Ctx((_first(X), _first(W), *cx.x[2:]), (_first(cx.y[0]),), cx.need, cx.keep, rule=Conv)
        Xbar, Wbar, *rest = Conv.vjp(inner, _first(Ybar, lead), **_conv_attrs(conv))
        return (None if Xbar is None else _last(Xbar, lead), None if Wbar is None else np.moveaxis(Wbar, -3, -1), *rest)


def _silu_partial(U):
    s = _sigmoid(U)
    return s + U * s * (1 - s)


class _MsGroupNorm:
    """onnxruntime's GroupNorm and SkipGroupNorm: the group normalisation of s = X (+ skip + bias),
    channels last by default, gamma and beta per channel, then SiLU with activation=1."""

    keeps = True
    n_diff_outputs = None

    def _norm(S, gamma, beta, epsilon, groups, channels_last):
        from .norm import GroupNormalization

        Sc = _first(S) if channels_last else S
        return Sc, GroupNormalization.forward(Sc, gamma, beta, epsilon=epsilon, num_groups=groups)

    def _tangent(S, gamma, beta, Sdot, gdot, bdot, lead, *, activation=0, channels_last=1, epsilon=1e-5, groups):
        from .norm import GroupNormalization

        Sc, U = _MsGroupNorm._norm(S, gamma, beta, epsilon, groups, channels_last)
        inner = Ctx((Sc, gamma, beta), (U,), rule=GroupNormalization)
        D = GroupNormalization.jvp(inner, None if Sdot is None else (_first(Sdot, lead) if channels_last else Sdot), gdot, bdot,
                                   epsilon=epsilon, num_groups=groups)
        if activation:
            D = _silu_partial(U) * D
        return _last(D, lead) if channels_last else D

    def _cotangent(cx, S, Ybar, need, keep, *, activation=0, channels_last=1, epsilon=1e-5, groups):
        """(S's, gamma's, beta's) cotangents from Y's."""
        from .norm import GroupNormalization

        gamma, beta = cx.x[1], cx.x[2]
        lead = cx.lead(Ybar)
        Sc, U = _MsGroupNorm._norm(S, gamma, beta, epsilon, groups, channels_last)
        G = _first(Ybar, lead) if channels_last else Ybar
        if activation:
            G = G * _silu_partial(U)
        inner = Ctx((Sc, gamma, beta), (U,), need, keep, rule=GroupNormalization)
        Sbar, gbar, bbar = GroupNormalization.vjp(inner, G, epsilon=epsilon, num_groups=groups)
        return (None if Sbar is None else (_last(Sbar, lead) if channels_last else Sbar)), gbar, bbar


def _group_norm_out(S, gamma, beta, activation, channels_last, epsilon, groups):
    Sc, U = _MsGroupNorm._norm(S, gamma, beta, epsilon, groups, channels_last)
    Y = U * _sigmoid(U) if activation else U
    return _last(Y) if channels_last else Y


@rule("GroupNorm", since=1, domain=MS)
class MsGroupNorm(_MsGroupNorm):
    """Y = GroupNorm(X) * gamma + beta per channel, channels last (channels_last=1, the default),
    then SiLU where activation=1."""

    n_diff_outputs = 1

    def forward(X, gamma, beta, *, activation=0, channels_last=1, epsilon=1e-5, groups):
        return _group_norm_out(X, gamma, beta, activation, channels_last, epsilon, groups)

    def jvp(cx, Xdot, gdot, bdot, **attrs):
        lead = next(D.ndim - x.ndim for D, x in zip((Xdot, gdot, bdot), cx.x) if D is not None)
        return _MsGroupNorm._tangent(*cx.x, Xdot, gdot, bdot, lead, **attrs)

    def vjp(cx, Ybar, **attrs):
        return _MsGroupNorm._cotangent(cx, cx.x[0], Ybar, cx.need, cx.keep, **attrs)


def _skip_shaped(skip, X):
    """A SkipGroupNorm's skip, (N, C) or of X's rank, broadcast against X (N, H, W, C)."""
    return skip.reshape(skip.shape[:1] + (1,) * (X.ndim - 2) + skip.shape[1:]) if skip.ndim == 2 else skip


@rule("SkipGroupNorm", since=1, domain=MS)
class SkipGroupNorm(_MsGroupNorm):
    """s = X + skip + bias (skip (N, H, W, C), (N, 1, 1, C) or (N, C); bias (C,)), then GroupNorm
    of s as above; outputs Y and, on request, s (the next residual reads it)."""

    def forward(X, gamma, beta, skip, bias=None, *, activation=0, channels_last=1, epsilon=1e-5, groups, n_outputs=1):
        S = _skip_sum(X, _skip_shaped(skip, X), bias)
        Y = _group_norm_out(S, gamma, beta, activation, channels_last, epsilon, groups)
        return (Y, S) if n_outputs > 1 else Y

    def jvp(cx, Xdot, gdot, bdot, skipdot=None, biasdot=None, *, n_outputs=1, **attrs):
        x = padded(cx.x, 5)
        X, skip, bias = x[0], x[3], x[4]
        lead = next(D.ndim - v.ndim for D, v in zip((Xdot, gdot, bdot, skipdot, biasdot), x) if D is not None)
        K = _skip_shaped(skip, X)
        S = _skip_sum(X, K, bias)
        Kdot = None if skipdot is None else expand(skipdot.reshape(skipdot.shape[:lead] + K.shape), K, S, lead)
        Sdot = add(Xdot, Kdot, None if biasdot is None else expand(biasdot, bias, S, lead))
        Ydot = _MsGroupNorm._tangent(S, x[1], x[2], Sdot, gdot, bdot, lead, **attrs)
        return (Ydot, Sdot) if n_outputs > 1 else Ydot

    def vjp(cx, Ybar, Sbar=None, *, n_outputs=1, **attrs):
        x, need, keep = padded(cx.x, 5), padded(cx.need, 5, False), padded(cx.keep, 5, False)
        X, skip, bias = x[0], x[3], x[4]
        S = _skip_sum(X, _skip_shaped(skip, X), bias)
        lead = cx.lead(Ybar) if Ybar is not None else cx.lead(Sbar)
        sb, gbar, bbar = Sbar, None, None
        if Ybar is not None:
            inner_need = (need[0] or need[3] or need[4], need[1], need[2])
            Sb, gbar, bbar = _MsGroupNorm._cotangent(cx, S, Ybar, inner_need, (False, keep[1], keep[2]), **attrs)
            sb = add(Sb, Sbar)
        skipbar = None
        if need[3] and sb is not None:
            K = _skip_shaped(skip, X)
            skipbar = unbroadcast(sb, K.shape, lead, keep[3])
            skipbar = skipbar.reshape(skipbar.shape[:skipbar.ndim - K.ndim] + skip.shape)
        return (sb if need[0] else None, gbar, bbar, skipbar,
                unbroadcast(sb, bias.shape, lead, keep[4]) if need[4] and sb is not None else None)


@rule("BiasSplitGelu", since=1, domain=MS)
class BiasSplitGelu:
    """U = X + bias (X (N, S, D), bias (D,)), halved along the last axis into A and B; Y = A * gelu(B),
    the exact GELU."""

    keeps = True

    def forward(X, bias):
        A, B = np.split(X + bias, 2, axis=-1)
        return A * Gelu.forward(B, approximate="none")

    def jvp(cx, Xdot, bdot):
        X, bias = cx.x
        A, B = np.split(X + bias, 2, axis=-1)
        lead = next(D.ndim - x.ndim for D, x in zip((Xdot, bdot), cx.x) if D is not None)
        Udot = add(Xdot, None if bdot is None else expand(bdot, bias, X, lead))
        Ad, Bd = np.split(Udot, 2, axis=-1)
        return Ad * Gelu.forward(B, approximate="none") + A * Gelu.deriv(B, None, approximate="none") * Bd

    def vjp(cx, Ybar):
        X, bias = cx.x
        A, B = np.split(X + bias, 2, axis=-1)
        Ubar = np.concatenate([Ybar * Gelu.forward(B, approximate="none"), Ybar * A * Gelu.deriv(B, None, approximate="none")],
                              axis=-1)
        lead = cx.lead(Ybar)
        return (Ubar if cx.need[0] else None, unbroadcast(Ubar, bias.shape, lead, cx.keep[1]) if cx.need[1] else None)


@rule("BiasAdd", since=1, domain=MS)
class BiasAdd:
    """Y = X + bias + skip: X and skip (N, S, C), bias (C,)."""

    keeps = True

    def forward(X, bias, skip):
        return X + bias + skip

    def jvp(cx, Xdot, bdot, sdot):
        X, bias, skip = cx.x
        lead = next(D.ndim - x.ndim for D, x in zip((Xdot, bdot, sdot), cx.x) if D is not None)
        return add(Xdot, None if bdot is None else expand(bdot, bias, X, lead), sdot)

    def vjp(cx, Ybar):
        lead = cx.lead(Ybar)
        return (Ybar if cx.need[0] else None, unbroadcast(Ybar, cx.x[1].shape, lead, cx.keep[1]) if cx.need[1] else None,
                unbroadcast(Ybar, cx.x[2].shape, lead, cx.keep[2]) if cx.need[2] else None)


# ---- CDist: pairwise distances, as skl2onnx writes a nearest-neighbours model or a Gaussian process
# with options {"optim": "cdist"} ---------------------------------------------------------------------


@rule("CDist", since=1, domain=MS)
class CDist:
    """Y[i, j] = sum_k (A[i, k] - B[j, k])^2 (metric sqeuclidean, the default), or its square root
    (euclidean; where a distance is 0 its derivative is taken as 0). A (N, K), B (M, K)."""

    keeps = True

    def forward(A, B, *, metric="sqeuclidean"):
        S = np.maximum((A * A).sum(-1)[:, None] - 2 * (A @ B.T) + (B * B).sum(-1)[None, :], 0)
        if metric == "sqeuclidean":
            return S
        if metric == "euclidean":
            return np.sqrt(S)
        raise UnsupportedOpError(f"CDist with metric '{metric}' is not supported (sqeuclidean and euclidean are)")

    def jvp(cx, Adot, Bdot, *, metric="sqeuclidean"):
        A, B = cx.x
        terms = []
        if Adot is not None:
            terms.append(2 * ((A * Adot).sum(-1)[..., None] - Adot @ B.T))
        if Bdot is not None:
            terms.append(2 * ((B * Bdot).sum(-1)[..., None, :] - A @ np.swapaxes(Bdot, -1, -2)))
        return _cdist_outer(cx.y[0], metric) * add(*terms)

    def vjp(cx, Ybar, *, metric="sqeuclidean"):
        A, B = cx.x
        if cx.keep[0]:
            raise UnsupportedOpError("CDist: per-sample cotangents of its first input as a parameter are not supported")
        G = _cdist_outer(cx.y[0], metric) * Ybar  # the cotangent of the squared distances
        Abar = 2 * (G.sum(-1)[..., None] * A - G @ B) if cx.need[0] else None
        Bbar = None
        if cx.need[1] and cx.keep[1]:  # per sample (A's rows): its row's share alone
            Bbar = -2 * G[..., None] * (A[:, None, :] - B[None, :, :])
        elif cx.need[1]:
            Bbar = 2 * (G.sum(-2)[..., None] * B - np.swapaxes(G, -1, -2) @ A)
        return Abar, Bbar


def _cdist_outer(Y, metric):
    """The partial of the distance in the squared distance: 1, or 1 / (2 d) (0 where d is 0)."""
    if metric != "euclidean":
        return Y.dtype.type(1)
    with np.errstate(divide="ignore"):
        return np.where(Y > 0, 0.5 / Y, 0).astype(Y.dtype)


# ---- contrib operators that the default domain took over later: models exported before it had
# them (grid_sample below opset 16 through a custom symbolic, onnxruntime's older saves) -------------


@rule("TransposeMatMul", since=1, domain=MS)
class TransposeMatMul(FusedMatMul):
    """FusedMatMul's older name: Y = alpha * A' @ B'."""


@rule("GridSample", since=1, domain=MS)
class MsGridSample(GridSample):
    """ONNX's GridSample of opset 16 (mode bilinear by default, nearest or bicubic; padding zeros,
    border or reflection)."""


@rule("Trilu", since=1, domain=MS)
class MsTrilu(Trilu):
    """ONNX's Trilu."""


@rule("GatherND", since=1, domain=MS)
class MsGatherND(GatherND):
    """ONNX's GatherND without batch dimensions."""


@rule("Pad", since=1, domain=MS)
class MsPad(Pad11):
    """ONNX's Pad of opset 11 (pads (2 * rank) or (1, 2 * rank), then the constant value)."""


@rule("Range", since=1, domain=MS)
class MsRange(Range):
    """ONNX's Range, its delta optional (1)."""

    def forward(start, limit, delta=None):
        return Range.forward(start, limit, np.ones_like(start) if delta is None else delta)


@rule("ExpandDims", since=1, domain=MS)
class ExpandDims(Unsqueeze13):
    """Y = X with a size-1 axis inserted at `axis` (a scalar input; negative counts from the end)."""
