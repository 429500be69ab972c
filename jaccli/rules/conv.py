"""Convolution in 1-D, 2-D and 3-D by im2col: windows of the padded input against the kernel."""

from __future__ import annotations

import numpy as np

from . import rule
from ._util import add, conv_geometry, lead_flat, pad_spatial, unpad, windows, windows_adjoint


def _cols(X, kernel, strides, dilations, begin, end):
    """(B, C, *sp) -> windows (B, C, *out, *kernel), a strided view of the padded input."""
    return windows(pad_spatial(X, begin, end), kernel, strides, dilations)


def _apply(cols, W, group):
    """Windows (B, C, *out, *k) against kernel (M, C/g, *k) -> (B, M, *out)."""
    nd = W.ndim - 2
    B, C = cols.shape[:2]
    out = cols.shape[2 : 2 + nd]
    M = W.shape[0]
    if group == 1:
        # contract C and the kernel axes: (B, *out, C*k) @ (C*k, M)
        P = np.moveaxis(cols, 1, 1 + nd).reshape(B * int(np.prod(out)), -1)
        Y = P @ W.reshape(M, -1).T
        return np.moveaxis(Y.reshape(B, *out, M), -1, 1)
    g = group
    P = cols.reshape(B, g, C // g, *out, *W.shape[2:])
    P = np.moveaxis(P, 2, 2 + nd).reshape(B, g, int(np.prod(out)), -1)  # (B, g, O, Cg*k)
    Wg = W.reshape(g, M // g, -1)  # (g, Mg, Cg*k)
    Y = P @ np.swapaxes(Wg, -1, -2)  # (B, g, O, Mg)
    return np.swapaxes(Y, -1, -2).reshape(B, M, *out)


def _geometry(X, W, auto_pad, dilations, pads, strides):
    kernel = W.shape[2:]
    return conv_geometry(X.shape, kernel, strides, dilations, pads, auto_pad)


@rule("Conv", since=1)
class Conv:
    """Y = conv(X, W) + B: X (N, C, *sp), W (M, C/group, *kernel), B (M,)."""

    keeps = True

    def forward(X, W, B=None, *, auto_pad, dilations=None, group, kernel_shape=None, pads=None, strides=None):
        s, d, begin, end, _ = _geometry(X, W, auto_pad, dilations, pads, strides)
        Y = _apply(_cols(X, W.shape[2:], s, d, begin, end), W, group)
        if B is not None:
            Y = Y + B.reshape((-1,) + (1,) * (W.ndim - 2))
        return Y

    def jvp(cx, Xdot, Wdot, Bdot=None, *, auto_pad, dilations=None, group, kernel_shape=None, pads=None, strides=None):
        X, W = cx.x[0], cx.x[1]
        s, d, begin, end, _ = _geometry(X, W, auto_pad, dilations, pads, strides)
        nd = W.ndim - 2
        terms = []
        if Xdot is not None:  # linear in X: the op itself on the tangent, directions folded into B
            flat, head = lead_flat(Xdot, X.ndim - 1)
            Y = _apply(_cols(flat, W.shape[2:], s, d, begin, end), W, group)
            terms.append(Y.reshape(head + Y.shape[1:]))
        if Wdot is not None:
            cols = _cols(X, W.shape[2:], s, d, begin, end)
            flat, head = lead_flat(Wdot, W.ndim)  # (L, M, C/g, *k)
            Y = _apply_many(cols, flat, group)
            terms.append(Y.reshape(head + Y.shape[1:]))
        if Bdot is not None:
            terms.append(_bias_tangent(Bdot, cx.y[0]))
        return add(*terms)

    def vjp(cx, Ybar, *, auto_pad, dilations=None, group, kernel_shape=None, pads=None, strides=None):
        X, W = cx.x[0], cx.x[1]
        s, d, begin, end, _ = _geometry(X, W, auto_pad, dilations, pads, strides)
        nd = W.ndim - 2
        kernel = W.shape[2:]
        lead = cx.lead(Ybar)
        Xbar = Wbar = Bbar = None
        if cx.need[0]:
            flat, head = lead_flat(Ybar, X.ndim - 1)  # (L, M, *out)
            G = _cols_adjoint_input(flat, W, group)  # (L, C, *out, *k)
            padded = [n + b + e for n, b, e in zip(X.shape[2:], begin, end)]
            Xp = windows_adjoint(G, padded, kernel, s, d)
            Xbar = unpad(Xp, begin, end).reshape(head + X.shape[1:])
        if cx.need[1]:
            cols = _cols(X, kernel, s, d, begin, end)
            Wbar = _weight_cotangent(Ybar, cols, W, group, lead, cx.keep[1])
        if len(cx.x) > 2 and cx.x[2] is not None and cx.need[2]:
            Bbar = Ybar.sum(axis=tuple(range(Ybar.ndim - nd, Ybar.ndim)))  # (*lead, N, M)
            if not cx.keep[2]:
                Bbar = Bbar.sum(axis=lead)
        return Xbar, Wbar, Bbar


def _bias_tangent(Bdot, Y):
    nd = Y.ndim - 2
    lead = Bdot.ndim - 1
    D = Bdot.reshape(Bdot.shape[:lead] + (1,) + Bdot.shape[lead:] + (1,) * nd)
    return np.broadcast_to(D, Bdot.shape[:lead] + Y.shape)


def _apply_many(cols, Wflat, group):
    """Windows (B, C, *out, *k) against L kernels (L, M, C/g, *k) -> (L, B, M, *out)."""
    nd = Wflat.ndim - 3
    B, C = cols.shape[:2]
    out = cols.shape[2 : 2 + nd]
    L, M = Wflat.shape[:2]
    g = group
    P = np.moveaxis(cols.reshape(B, g, C // g, *out, *Wflat.shape[3:]), 2, 2 + nd).reshape(B, g, -1, Wflat[0, 0].size)
    Y = np.einsum("bgok,lgmk->lbgmo", P, Wflat.reshape(L, g, M // g, -1), optimize=True)
    return Y.reshape(L, B, M, *out)


def _cols_adjoint_input(Yb, W, group):
    """Cotangent of the windows from Yb (L, M, *out): (L, C, *out, *k)."""
    nd = W.ndim - 2
    L, M = Yb.shape[:2]
    out = Yb.shape[2:]
    g = group
    Cg = W.shape[1]
    Ym = np.moveaxis(Yb.reshape(L, g, M // g, -1), 2, 3)  # (L, g, O, Mg)
    Wg = W.reshape(g, M // g, -1)  # (g, Mg, Cg*k)
    G = Ym @ Wg  # (L, g, O, Cg*k)
    G = G.reshape(L, g, *out, Cg, *W.shape[2:])
    G = np.moveaxis(G, 2 + nd, 2)  # (L, g, Cg, *out, *k)
    return G.reshape(L, g * Cg, *out, *W.shape[2:])


def _weight_cotangent(Ybar, cols, W, group, lead, keep):
    """Per-sample (keep) or summed kernel cotangent from Ybar (*lead, N, M, *out) and windows of X."""
    nd = W.ndim - 2
    N, C = cols.shape[:2]
    out = cols.shape[2 : 2 + nd]
    O = int(np.prod(out))
    M = W.shape[0]
    g = group
    head = Ybar.shape[:lead]
    P = cols.reshape(N, g, C // g, *out, *W.shape[2:])
    P = np.moveaxis(P, 2, 2 + nd).reshape(N, g, O, -1)  # (N, g, O, Cg*k)
    Yg = Ybar.reshape(head + (N, g, M // g, O))
    if keep:
        Wb = Yg @ P  # (*lead, N, g, Mg, Cg*k)
        return Wb.reshape(head + (N,) + W.shape)
    Yf = Yg.reshape((-1, N, g, M // g, O))
    Wb = np.einsum("lngmo,ngok->lgmk", Yf, P, optimize=True)
    return Wb.reshape(head + W.shape)
