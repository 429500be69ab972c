"""Normalisations: BatchNormalization, Softmax and LogSoftmax."""

from __future__ import annotations

import math

import numpy as np

from . import rule
from ..errors import UnsupportedOpError
from ._util import add, expand, first_max_mask, neg_axis, need_no_keep, scaled, sum_trailing, times, unbroadcast


def _channel(v, ndim):
    """(C,) -> (C, 1, ..., 1) to broadcast along axis 1 of an ndim-rank primal; a statistic per
    activation, (C, D1, ...) (BatchNormalization's spatial=0), broadcasts as it is."""
    return v if _per_activation(v, ndim) else v.reshape((-1,) + (1,) * (ndim - 2))


def _per_activation(v, ndim):
    """Whether a BatchNormalization statistic is one per activation, (C, D1, ...) of a rank-ndim
    input: spatial=0, which opsets 1 to 8 had (in inference, an affine map per activation)."""
    return 1 < v.ndim == ndim - 1


@rule("BatchNormalization", since=1)
class BatchNormalization:
    """Y = scale * (X - mean) / sqrt(var + epsilon) + B, per channel (axis 1).

    The running mean and variance are buffers, not parameters; but they are differentiated like
    any input, for a parameter that reaches them (exporters tie a fresh model's running variance
    to its scale, both ones, through an Identity).

    In training mode the mean and variance are X's own, over every axis but the channel's (see
    _train): what weight standardization exports (timm's NFNets normalize their kernels so). On
    a batch of samples it mixes them, and the drivers' probe refuses it. From opset 14 the
    attribute training_mode says so; before, the form with more than Y (the TorchScript
    exporter writes five outputs: Y, the running mean and variance updated, the batch's mean
    and its inverse standard deviation, as onnxruntime computes them), which onnxruntime
    takes for training mode whatever the opset.

    With spatial=0 (opsets 1 to 8) the four tensors are (C, D1, ...), one per activation: in
    inference an affine map per activation (see _per_activation)."""

    buffers = (3, 4)
    keeps = True
    n_diff_outputs = 1

    def forward(X, scale, B, input_mean, input_var, *, epsilon, momentum=0.9, spatial=1, is_test=0, training_mode=0,
                n_outputs=1):
        if training_mode or n_outputs > 1:
            if _per_activation(scale, X.ndim):
                raise UnsupportedOpError("BatchNormalization in training mode with spatial=0 (statistics per "
                                         "activation) is not supported")
            xhat, mu, var = _train(X, epsilon)
            Y = xhat * _channel(scale, X.ndim) + _channel(B, X.ndim)
            m = X.dtype.type(momentum)  # the running statistics, as the spec updates them
            return (Y, input_mean * m + mu * (1 - m), input_var * m + var * (1 - m), mu,
                    1 / np.sqrt(var + X.dtype.type(epsilon)))[:max(1, n_outputs)]
        a = scale / np.sqrt(input_var + X.dtype.type(epsilon))
        return X * _channel(a, X.ndim) + _channel(B - input_mean * a, X.ndim)

    def jvp(cx, Xdot, sdot, Bdot, mdot=None, vdot=None, *, epsilon, training_mode=0, n_outputs=1, **__):
        if training_mode or n_outputs > 1:
            return _train_jvp(cx, Xdot, sdot, Bdot, epsilon)
        X, scale, B, mean, var = cx.x
        inv = 1 / np.sqrt(var + X.dtype.type(epsilon))
        out = None
        if Xdot is not None:
            out = Xdot * _channel(scale * inv, X.ndim)
        xhat = None if sdot is None and vdot is None else (X - _channel(mean, X.ndim)) * _channel(inv, X.ndim)
        # dY/dmean = -scale * inv and dY/dvar = -scale * inv^2 * xhat / 2, per channel
        terms = ((sdot, None, xhat), (Bdot, None, None), (mdot, -scale * inv, None), (vdot, -0.5 * scale * inv * inv, xhat))
        for D, c, base in terms:
            if D is not None:
                term = _channel_tangent(D if c is None else D * c, X, scale.ndim if _per_activation(scale, X.ndim) else 1)
                term = term if base is None else term * base
                out = term if out is None else out + term
        return out

    def vjp(cx, Ybar, *_, epsilon, training_mode=0, n_outputs=1, **__):
        if training_mode or n_outputs > 1:
            return _train_vjp(cx, Ybar, epsilon)
        X, scale, B, mean, var = cx.x
        lead = cx.lead(Ybar)
        inv = 1 / np.sqrt(var + X.dtype.type(epsilon))
        if _per_activation(scale, X.ndim):
            return _per_activation_vjp(cx, Ybar, lead, inv)
        sbar = Bbar = Xbar = mbar = vbar = None
        if any(cx.need[1:5]):
            # per direction, sample and channel, Ybar summed over space against x-hat (the scale's
            # cotangent) and against ones (the bias's): one batched GEMM reads Ybar once for both,
            # (N, C, k, S) @ (N, C, S, L), where a sum and a product-sum would each make a pass
            head, (N, C), S = Ybar.shape[:lead], X.shape[:2], X[0, 0].size
            Yr = Ybar.reshape((-1, N, C, S))  # (L, N, C, S)
            # the variance's cotangent is the scale's times -scale * inv^2 / 2, the mean's the bias's
            # times -scale * inv: both from the same two sums
            partner = {1: (4, -0.5 * scale * inv * inv), 2: (3, -scale * inv)}  # input, factor
            which = [i for i in (1, 2) if cx.need[i] or cx.need[partner[i][0]]]
            Z = np.empty((N, C, len(which), S), Ybar.dtype)
            for j, i in enumerate(which):
                Z[:, :, j] = ((X - _channel(mean, X.ndim)) * _channel(inv, X.ndim)).reshape(N, C, S) if i == 1 else 1
            R = np.matmul(Z, Yr.transpose(1, 2, 3, 0))  # (N, C, k, L)
            bars = {}
            for j, i in enumerate(which):
                per = R[:, :, j].transpose(2, 0, 1)  # (L, N, C)
                for k, c in ((i, None), partner[i]):
                    if cx.need[k]:
                        g = per if c is None else per * c
                        bars[k] = (g if cx.keep[k] else g.sum(axis=1)).reshape(head + per.shape[1 if cx.keep[k] else 2:])
            sbar, Bbar, mbar, vbar = bars.get(1), bars.get(2), bars.get(3), bars.get(4)
        if cx.need[0]:  # last: it may overwrite Ybar
            Xbar = scaled(cx, Ybar, _channel(scale * inv, X.ndim))
        return Xbar, sbar, Bbar, mbar, vbar


def _per_activation_vjp(cx, Ybar, lead, inv):
    """BatchNormalization's VJP with spatial=0 (opsets 1 to 8): the scale, bias, mean and variance
    are (C, D1, ...), one per activation, so their cotangents are Ybar's products summed over
    the samples only (not where kept), with no sum over space."""
    X, scale, _, mean, _ = cx.x
    need, keep = cx.need, cx.keep

    def summed(g, k):
        return g if keep[k] else g.sum(axis=lead)

    xhat = (X - mean) * inv if need[1] or need[4] else None
    sx = Ybar * xhat if xhat is not None else None
    sbar = summed(sx, 1) if need[1] else None
    Bbar = summed(Ybar, 2) if need[2] else None
    mbar = summed(Ybar * (-scale * inv), 3) if need[3] else None
    vbar = summed(sx * (-0.5 * scale * inv * inv), 4) if need[4] else None
    Xbar = scaled(cx, Ybar, scale * inv) if need[0] else None
    return Xbar, sbar, Bbar, mbar, vbar


def _stat_axes(ndim, lead=0):
    """The axes of training-mode statistics: all but the channel's (axis 1), after `lead` axes."""
    return tuple(a + lead for a in (0,) + tuple(range(2, ndim)))


def _train(X, epsilon):
    """x-hat = (X - mean) / sqrt(var + epsilon), with X's own mean and (population) variance over
    every axis but the channel's; and those (C,)."""
    axes = _stat_axes(X.ndim)
    mu = X.mean(axis=axes)
    var = ((X - _channel(mu, X.ndim)) ** 2).mean(axis=axes)
    return (X - _channel(mu, X.ndim)) / _channel(np.sqrt(var + X.dtype.type(epsilon)), X.ndim), mu, var


def _train_jvp(cx, Xdot, sdot, Bdot, epsilon):
    """d x-hat = (dX - mean(dX) - x-hat mean(x-hat dX)) / sigma, over the statistics' axes."""
    X, scale = cx.x[0], cx.x[1]
    xhat, _, var = _train(X, epsilon)
    out = None
    if Xdot is not None:
        axes = _stat_axes(X.ndim, Xdot.ndim - X.ndim)
        d = Xdot - Xdot.mean(axis=axes, keepdims=True) - xhat * (xhat * Xdot).mean(axis=axes, keepdims=True)
        out = d * _channel(scale / np.sqrt(var + X.dtype.type(epsilon)), X.ndim)
    for D, base in ((sdot, xhat), (Bdot, None)):
        if D is not None:
            term = _channel_tangent(D, X)
            term = term if base is None else term * base
            out = term if out is None else out + term
    return out


def _train_vjp(cx, Ybar, epsilon):
    """X-bar = (g - mean(g) - x-hat mean(g x-hat)) / sigma with g = scale Y-bar; the scale's and
    bias's cotangents Y-bar summed against x-hat and ones, per sample where kept."""
    X, scale = cx.x[0], cx.x[1]
    lead = cx.lead(Ybar)
    xhat, _, var = _train(X, epsilon)
    axes = _stat_axes(X.ndim, lead)
    sbar = _per_channel(Ybar * xhat, axes[1:], lead, cx.keep[1]) if cx.need[1] else None
    Bbar = _per_channel(Ybar, axes[1:], lead, cx.keep[2]) if cx.need[2] else None
    Xbar = None
    if cx.need[0]:
        g = Ybar * _channel(scale, X.ndim)
        Xbar = (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True)) \
            * _channel(1 / np.sqrt(var + X.dtype.type(epsilon)), X.ndim)
    return Xbar, sbar, Bbar, None, None


def _channel_tangent(D, X, rank=1):
    """Tangent of a per-channel vector (*lead, C) spread over X's shape: (*lead, 1, C, 1, ...); of
    a statistic per activation (rank > 1: (*lead, C, D1, ...)), (*lead, 1, C, D1, ...)."""
    lead = D.ndim - rank
    if rank > 1:
        return D.reshape(D.shape[:lead] + (1,) + D.shape[lead:])
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
            return (np.subtract(Ybar, times(sum_trailing(Ybar, axes(cx.x[0].ndim, axis)), S), out=Ybar if cx.mine() else None),)

    else:

        def forward(X, *, axis):
            return _softmax(X, axes(X.ndim, axis))

        def jvp(cx, Xdot, *, axis):
            S = cx.y[0]
            return S * (Xdot - (S * Xdot).sum(axis=axes(cx.x[0].ndim, axis), keepdims=True))

        def vjp(cx, Ybar, *, axis):
            S = cx.y[0]
            P = scaled(cx, Ybar, S)  # S * Ybar, ours to overwrite either way
            # a row with no cotangent stays zero where S is NaN: a softmax over a row masked
            # whole (all -inf) that a Where then replaces, as attention with padding does
            P -= times(sum_trailing(P, axes(cx.x[0].ndim, axis)), S)
            return (P,)

    doc = ("Y = X - log(sum(exp(X)))" if log else "Y = exp(X) / sum(exp(X))") + (
        " over axes [axis:] flattened" if coerced else " along axis"
    )
    cls = type(name, (), {"__doc__": doc, "forward": forward, "jvp": jvp, "vjp": vjp})
    return rule(name, since)(cls)


Softmax1 = _softmax_rule("Softmax", 1, coerced=True, log=False)
Softmax13 = _softmax_rule("Softmax", 13, coerced=False, log=False)
LogSoftmax1 = _softmax_rule("LogSoftmax", 1, coerced=True, log=True)
LogSoftmax13 = _softmax_rule("LogSoftmax", 13, coerced=False, log=True)


# ---- normalisations over a group of axes ---------------------------------------------------------


def _standardize(X, axes, epsilon):
    """xhat = (X - mean) * r over `axes` (negative), with r = 1/sqrt(var + epsilon)."""
    mu = X.mean(axis=axes, keepdims=True)
    Xc = X - mu
    r = 1 / np.sqrt((Xc * Xc).mean(axis=axes, keepdims=True) + X.dtype.type(epsilon))
    return Xc * r, mu, r


def _xhat_tangent(Xdot, xhat, r, axes):
    """Tangent of xhat: r * (Xdot - mean(Xdot) - xhat * mean(Xdot * xhat))."""
    return r * (Xdot - Xdot.mean(axis=axes, keepdims=True) - xhat * (Xdot * xhat).mean(axis=axes, keepdims=True))


# the adjoint of _xhat_tangent is the same map: it is symmetric
_xhat_cotangent = _xhat_tangent


@rule("LayerNormalization", since=17)
class LayerNormalization:
    """Y = (X - mean) / sqrt(var + epsilon) * Scale + B, statistics over axes [axis:]."""

    keeps = True

    def samples_inside(attrs, ndim, merged):
        """Whether its per-sample cotangents follow an input whose samples the walker moves
        first from behind a sequence (drivers._samples_inside): the statistics' axes come
        after the sequence's and the samples' (counted from the end where merged rows are
        shown as (N, S, ...))."""
        axis = attrs.get("axis", -1)
        return (axis < 0 or not merged) and axis % ndim >= (1 if merged else 2)

    def forward(X, Scale, B=None, *, axis, epsilon, stash_type=1):
        axes = tuple(range(neg_axis(axis, X.ndim), 0))
        xhat, mu, r = _standardize(X, axes, epsilon)
        Y = xhat * Scale if B is None else xhat * Scale + B
        return Y, mu, r

    def jvp(cx, Xdot, Sdot, Bdot=None, *, axis, epsilon, stash_type=1):
        X, S = cx.x[0], cx.x[1]
        Y = cx.y[0]
        axes = tuple(range(neg_axis(axis, X.ndim), 0))
        xhat, _, r = _standardize(X, axes, epsilon)  # the node may not expose Mean and InvStdDev
        parts = []
        if Xdot is not None:
            parts.append(_xhat_tangent(Xdot, xhat, r, axes) * S)
        lead = next(D.ndim - x.ndim for D, x in zip((Xdot, Sdot, Bdot), cx.x) if D is not None)
        if Sdot is not None:
            parts.append(expand(Sdot, S, Y, lead) * xhat)
        if Bdot is not None:
            parts.append(expand(Bdot, cx.x[2], Y, lead))
        return add(*parts), None, None

    def vjp(cx, Ybar, *, axis, epsilon, stash_type=1):
        X, S = cx.x[0], cx.x[1]
        lead = cx.lead(Ybar)
        axes = tuple(range(neg_axis(axis, X.ndim), 0))
        B = cx.x[2] if len(cx.x) > 2 else None
        norm_shape = X.shape[X.ndim + axes[0]:]
        if S.shape == norm_shape and (B is None or B.shape == norm_shape) and axes[0] > -X.ndim:
            return _layernorm_vjp(cx, Ybar, X, S, lead, len(axes), epsilon)
        xhat, _, r = _standardize(X, axes, epsilon)
        Xbar = _xhat_cotangent(Ybar * S, xhat, r, axes) if cx.need[0] else None
        Sbar = unbroadcast(Ybar * xhat, S.shape, lead, cx.keep[1]) if cx.need[1] else None
        Bbar = None
        if len(cx.x) > 2 and cx.x[2] is not None and cx.need[2]:
            Bbar = unbroadcast(Ybar, cx.x[2].shape, lead, cx.keep[2])
        return Xbar, Sbar, Bbar


def _layernorm_vjp(cx, Ybar, X, S, lead, k, epsilon):
    """LayerNormalization's VJP when Scale and B have the normalised shape (the usual case): on
    (rows, D) views, reductions as dot products, the cotangent updated in place."""
    D = math.prod(X.shape[X.ndim - k:])
    rows = X.shape[0], math.prod(X.shape[1:X.ndim - k])  # (N, positions)
    Xr = X.reshape(rows + (D,))
    xhat, _, r = _standardize(Xr, (-1,), epsilon)
    head = Ybar.shape[:lead]
    Yr = Ybar.reshape((-1,) + rows + (D,))  # (L, N, p, D)
    Xbar = Sbar = Bbar = None
    if cx.need[1]:
        per = np.einsum("lnpd,npd->lnd", Yr, xhat) if cx.keep[1] else np.einsum("lnpd,npd->ld", Yr, xhat)
        Sbar = per.reshape(head + per.shape[1:-1] + S.shape)
    if len(cx.x) > 2 and cx.x[2] is not None and cx.need[2]:
        per = Yr.sum(axis=2) if cx.keep[2] else Yr.sum(axis=(1, 2))
        Bbar = per.reshape(head + per.shape[1:-1] + S.shape)
    if cx.need[0]:  # last: it may overwrite Ybar. r * (G - mean(G) - xhat * mean(G * xhat)), G = Ybar * S
        Xbar = (_layernorm_input_cotangent(cx, Yr, xhat, r, S.reshape(-1)) if Yr.shape[0] >= 16 else
                _layernorm_input_cotangent_small(Yr, xhat, r, S.reshape(-1))).reshape(Ybar.shape)
    return Xbar, Sbar, Bbar


def _layernorm_input_cotangent(cx, Yr, xhat, r, S):
    """r*S*Y - r*m1 - r*xhat*m2 with m1 = mean(Y*S), m2 = mean(Y*S*xhat) over D, for Yr (L, N, p, D).
    The two means are a matrix-vector product and an einsum; per (sample, position) the
    correction is rank two, [m1 m2] (L, 2) @ [r; r*xhat] (2, D), one batched GEMM written in
    Yr's layout; the rest is one product (in place when the cotangent is the rule's own) and
    one subtraction."""
    L, N, p, D = Yr.shape
    inv = Yr.dtype.type(1 / D)
    M = np.empty((N, p, L, 2), Yr.dtype)
    Mv = M.transpose(2, 0, 1, 3)  # (L, N, p, 2), a view
    Mv[..., 0] = (Yr.reshape(-1, D) @ (S * inv)).reshape(L, N, p)
    Mv[..., 1] = np.einsum("lnpd,npd->lnp", Yr, S * xhat * inv)
    Q = np.empty((N, p, 2, D), Yr.dtype)
    Q[:, :, 0] = r
    Q[:, :, 1] = r * xhat
    corr = np.empty(Yr.shape, Yr.dtype)
    np.matmul(M, Q, out=corr.transpose(1, 2, 0, 3))
    G = np.multiply(Yr, r * S, out=Yr if cx.mine() else None)  # Yr: the cotangent or a copy of it
    G -= corr
    return G


def _layernorm_input_cotangent_small(Yr, xhat, r, S):
    """The same for few directions, where a GEMM per (sample, position) would cost more than it saves."""
    G = Yr * S
    m1 = G.mean(axis=-1, keepdims=True)
    m2 = np.einsum("lnpd,npd->lnp", G, xhat)[..., None] / G.dtype.type(Yr.shape[-1])
    G -= m1
    G -= xhat * m2
    G *= r
    return G


@rule("InstanceNormalization", since=1)
class InstanceNormalization:
    """Y = scale * (X - mean) / sqrt(var + epsilon) + B, statistics per sample and channel."""

    keeps = True

    def forward(input, scale, B, *, epsilon):
        X = input
        xhat, _, _ = _standardize(X, tuple(range(2 - X.ndim, 0)), epsilon)
        return xhat * _channel(scale, X.ndim) + _channel(B, X.ndim)

    def jvp(cx, Xdot, sdot, Bdot, *, epsilon):
        X, scale, B = cx.x
        axes = tuple(range(2 - X.ndim, 0))
        xhat, _, r = _standardize(X, axes, epsilon)
        out = None if Xdot is None else _xhat_tangent(Xdot, xhat, r, axes) * _channel(scale, X.ndim)
        if sdot is not None:
            out = add(out, _channel_tangent(sdot, X) * xhat)
        if Bdot is not None:
            out = add(out, np.broadcast_to(_channel_tangent(Bdot, X), Bdot.shape[:-1] + X.shape))
        return out

    def vjp(cx, Ybar, *, epsilon):
        """On (rows, D) views, D the spatial positions of a (sample, channel): the sums of Ybar and
        of Ybar * xhat per row are the bias' and the scale's per-sample cotangents, and the two
        means of the input cotangent, r * scale * (Ybar - mean(Ybar) - xhat * mean(Ybar * xhat))
        (the scale is constant along a row): six passes, where the means apart took eleven."""
        X, scale, B = cx.x
        lead = cx.lead(Ybar)
        N, C = X.shape[:2]
        D = math.prod(X.shape[2:])
        xhat, _, r = _standardize(X, tuple(range(2 - X.ndim, 0)), epsilon)
        Yr, xr = Ybar.reshape(Ybar.shape[:lead] + (N, C, D)), xhat.reshape(N, C, D)
        s_y = sum_trailing(np.ascontiguousarray(Yr), (-1,), keepdims=False)  # (*lead, N, C)
        s_yx = np.einsum("...ncd,ncd->...nc", Yr, xr)
        Xbar = None
        if cx.need[0]:
            inv = Yr.dtype.type(1 / D)
            Xb = np.multiply(xr, (s_yx * -inv)[..., None])
            Xb += Yr
            Xb -= (s_y * inv)[..., None]
            Xb *= r.reshape(N, C, 1) * scale.reshape(C, 1).astype(Yr.dtype, copy=False)
            Xbar = Xb.reshape(Ybar.shape)
        sbar = (s_yx if cx.keep[1] else s_yx.sum(axis=lead)) if cx.need[1] else None
        Bbar = (s_y if cx.keep[2] else s_y.sum(axis=lead)) if cx.need[2] else None
        return Xbar, sbar, Bbar


class _GroupNorm:
    """Y = per-channel affine of X standardised over (channels of a group, spatial axes)."""

    keeps = True

    def forward(X, scale, bias, *, epsilon, num_groups, stash_type=1):
        N, C = X.shape[:2]
        G = X.reshape(N, num_groups, -1)
        xhat, _, _ = _standardize(G, (-1,), epsilon)
        return xhat.reshape(X.shape) * _affine(scale, X, num_groups) + _affine(bias, X, num_groups)

    def jvp(cx, Xdot, sdot, bdot, *, epsilon, num_groups, stash_type=1):
        X, scale, bias = cx.x
        N, C = X.shape[:2]
        xhat, _, r = _standardize(X.reshape(N, num_groups, -1), (-1,), epsilon)
        out = None
        if Xdot is not None:
            lead = Xdot.shape[: Xdot.ndim - X.ndim]
            D = _xhat_tangent(Xdot.reshape(lead + (N, num_groups, -1)), xhat, r, (-1,))
            out = D.reshape(Xdot.shape) * _affine(scale, X, num_groups)
        xh = xhat.reshape(X.shape)
        for D, base in ((sdot, xh), (bdot, None)):
            if D is not None:
                T = _affine_tangent(D, X, num_groups)
                out = add(out, T * base if base is not None else np.broadcast_to(T, D.shape[:-1] + X.shape))
        return out

    def vjp(cx, Ybar, *, epsilon, num_groups, stash_type=1):
        X, scale, bias = cx.x
        N, C = X.shape[:2]
        lead = cx.lead(Ybar)
        head = Ybar.shape[:lead]
        xhat, _, r = _standardize(X.reshape(N, num_groups, -1), (-1,), epsilon)
        Xbar = None
        if cx.need[0]:
            G = (Ybar * _affine(scale, X, num_groups)).reshape(head + (N, num_groups, -1))
            Xbar = _xhat_cotangent(G, xhat, r, (-1,)).reshape(Ybar.shape)
        spatial = tuple(range(lead + 2, Ybar.ndim))
        xh = xhat.reshape(X.shape)
        sbar = _affine_back(_per_channel(Ybar * xh, spatial, lead, cx.keep[1]), scale) if cx.need[1] else None
        bbar = _affine_back(_per_channel(Ybar, spatial, lead, cx.keep[2]), bias) if cx.need[2] else None
        return Xbar, sbar, bbar


def _affine(v, X, num_groups):
    """Scale or bias, per group (opset 18) or per channel (opset 21), spread over X."""
    C = X.shape[1]
    if v.size == num_groups and num_groups != C:
        v = np.repeat(v, C // num_groups)
    return _channel(v, X.ndim)


def _affine_tangent(D, X, num_groups):
    C = X.shape[1]
    if D.shape[-1] == num_groups and num_groups != C:
        D = np.repeat(D, C // num_groups, axis=-1)
    return _channel_tangent(D, X)


def _affine_back(G, v):
    """Channel cotangent (*lead, C) summed back to v's size (groups) when v is per group."""
    C = G.shape[-1]
    if v.size != C:
        G = G.reshape(G.shape[:-1] + (v.size, C // v.size)).sum(axis=-1)
    return G


@rule("GroupNormalization", since=18)
class GroupNormalization(_GroupNorm):
    """Y = scale * (X - mean) / sqrt(var + epsilon) + bias, statistics per sample and group."""


@rule("LRN", since=1)
class LRN:
    """Y = X / (bias + alpha / size * sum of X^2 over a window of `size` channels) ^ beta"""

    def forward(X, *, size, alpha=1e-4, beta=0.75, bias=1.0):
        d = _lrn_denominator(X, size, alpha, bias)
        return X * d ** X.dtype.type(-beta)

    def jvp(cx, Xdot, *, size, alpha=1e-4, beta=0.75, bias=1.0):
        X = cx.x[0]
        d = _lrn_denominator(X, size, alpha, bias)
        dsq = _channel_window(2 * X * Xdot, X.ndim, size)
        return Xdot * d ** -beta - (beta * alpha / size) * X * d ** (-beta - 1) * dsq

    def vjp(cx, Ybar, *, size, alpha=1e-4, beta=0.75, bias=1.0):
        X = cx.x[0]
        d = _lrn_denominator(X, size, alpha, bias)
        G = -(beta * alpha / size) * Ybar * X * d ** (-beta - 1)
        return (Ybar * d ** -beta + 2 * X * _channel_window(G, X.ndim, size, adjoint=True),)


def _lrn_denominator(X, size, alpha, bias):
    return X.dtype.type(bias) + X.dtype.type(alpha / size) * _channel_window(X * X, X.ndim, size)


def _channel_window(S, ndim, size, adjoint=False):
    """Sum over channels c - floor((size-1)/2) .. c + ceil((size-1)/2) (axis 1 of an ndim-rank
    primal, counted from the end so leading axes pass through); `adjoint` sums the mirrored window."""
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    if adjoint:
        lo, hi = hi, lo
    ax = S.ndim - ndim + 1
    width = [(0, 0)] * S.ndim
    width[ax] = (lo + 1, hi)  # one extra zero in front for the cumulative-sum difference
    cs = np.cumsum(np.pad(S, width), axis=ax)
    C = S.shape[ax]
    return np.take(cs, np.arange(size, size + C), axis=ax) - np.take(cs, np.arange(C), axis=ax)


@rule("Hardmax", since=1)
class Hardmax1:
    """Y = 1 at the first maximum over axes [axis:] flattened, 0 elsewhere; derivative zero."""

    nondiff = (0,)

    def forward(input, *, axis=1):
        return first_max_mask(input, input.ndim - neg_axis(axis, input.ndim) % input.ndim)


@rule("Hardmax", since=13)
class Hardmax13:
    """Y = 1 at the first maximum along axis, 0 elsewhere; derivative zero."""

    nondiff = (0,)

    def forward(input, *, axis=-1):
        a = neg_axis(axis, input.ndim) % input.ndim
        return np.moveaxis(first_max_mask(np.moveaxis(input, a, -1), 1), -1, a)


@rule("LpNormalization", since=1)
class LpNormalization:
    """Y = X / ||X||_p along axis, p = 1 or 2; a zero vector stays zero, as onnxruntime leaves it,
    with a zero derivative (it has none there)."""

    def forward(input, *, axis=-1, p=2):
        return (input * _inverse_norm(input, axis, p)).astype(input.dtype)

    def jvp(cx, Xdot, *, axis=-1, p=2):
        X, Y = cx.x[0], cx.y[0]
        a = neg_axis(axis, X.ndim)
        d = Y if p == 2 else np.sign(X)  # the gradient of the norm, times n
        return (Xdot - Y * (d * Xdot).sum(axis=a, keepdims=True)) * _inverse_norm(X, axis, p)

    def vjp(cx, Ybar, *, axis=-1, p=2):
        need_no_keep(cx, "LpNormalization")
        X, Y = cx.x[0], cx.y[0]
        a = neg_axis(axis, X.ndim)
        d = Y if p == 2 else np.sign(X)
        return ((Ybar - d * (Ybar * Y).sum(axis=a, keepdims=True)) * _inverse_norm(X, axis, p),)


def _inverse_norm(X, axis, p):
    """1 / ||X||_p along axis (kept), 0 for a zero vector."""
    if p == 1:
        n = np.abs(X).sum(axis=axis, keepdims=True)
    elif p == 2:
        n = np.sqrt((X * X).sum(axis=axis, keepdims=True))
    else:
        raise UnsupportedOpError(f"LpNormalization with p={p}: ONNX defines only p = 1 and 2")
    return np.divide(1, n, out=np.zeros_like(n), where=n != 0)


@rule("SimplifiedLayerNormalization", since=1)
class SimplifiedLayerNormalization:
    """Y = X / sqrt(mean(X^2) + epsilon) * Scale, the mean over axes [axis:]: onnxruntime's
    RMSNorm (its optimizer writes it for LLaMA-like models; in the default domain). A second
    output, the inverse root mean square, on request."""

    keeps = True

    def forward(X, scale, *, axis=-1, epsilon=1e-5, stash_type=1, n_outputs=1):
        r = _inverse_rms(X, axis, epsilon)
        Y = X * r * scale
        return (Y, r) if n_outputs > 1 else Y

    def jvp(cx, Xdot, Sdot=None, *, axis=-1, epsilon=1e-5, stash_type=1, n_outputs=1):
        X, S = cx.x[0], cx.x[1]
        r, xhat, axes = _rms_parts(X, axis, epsilon)
        parts = []
        if Xdot is not None:
            parts.append(S * r * (Xdot - xhat * (xhat * Xdot).mean(axis=axes, keepdims=True)))
        if Sdot is not None:
            parts.append(expand(Sdot, S, X, Sdot.ndim - S.ndim) * xhat)
        return add(*parts)

    def vjp(cx, Ybar, *_, axis=-1, epsilon=1e-5, stash_type=1, n_outputs=1):
        X, S = cx.x[0], cx.x[1]
        r, xhat, axes = _rms_parts(X, axis, epsilon)
        Xbar = Sbar = None
        if cx.need[0]:
            G = Ybar * S
            Xbar = r * (G - xhat * (G * xhat).mean(axis=axes, keepdims=True))
        if cx.need[1]:
            Sbar = unbroadcast(Ybar * xhat, S.shape, cx.lead(Ybar), cx.keep[1])
        return Xbar, Sbar


@rule("RMSNormalization", since=23)
class RMSNormalization(SimplifiedLayerNormalization):
    """Y = X / sqrt(mean(X^2) + epsilon) * scale, the mean over axes [axis:]: ONNX's own RMSNorm
    (torch.onnx writes it for nn.RMSNorm from opset 23), onnxruntime's above with one output."""


def _inverse_rms(X, axis, epsilon):
    axes = tuple(range(neg_axis(axis, X.ndim), 0))
    return (1 / np.sqrt((X * X).mean(axis=axes, keepdims=True) + X.dtype.type(epsilon))).astype(X.dtype)


def _rms_parts(X, axis, epsilon):
    """1 / rms, X / rms and the axes of the mean."""
    r = _inverse_rms(X, axis, epsilon)
    return r, X * r, tuple(range(neg_axis(axis, X.ndim), 0))
