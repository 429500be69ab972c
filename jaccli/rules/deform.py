"""Deformable convolution (DeformConv, opset 19: torchvision's deform_conv2d, DCN v1 and v2).

Each kernel tap of each output position reads the input at its regular place moved by a
learned offset, by bilinear interpolation with zeros outside the image, scaled by a mask (DCN
v2); the samples are then a convolution's columns. So the output is linear in the input (for
given offsets), in the mask and in the kernel, and piecewise smooth in the offsets: between
whole pixels, a sample's bilinear weights are linear in its position along each axis.
"""

from __future__ import annotations

import numpy as np

from . import rule
from ..errors import ModelError, UnsupportedOpError
from ._util import add, padded, sum_trailing


class _Plan:
    """Where and how the taps sample X (N, C, H, W): for each of the four corners around a
    sample, its flat pixel index and bilinear weight (zero outside the image) and the weight's
    derivatives along h and w, each (N, Go, 1, K*O): Go offset groups, K kernel taps, O output
    positions."""

    def __init__(self, X, W, offset, *, dilations, group, offset_group, pads, strides):
        N, C, H, Wd = X.shape
        M, Cg, kh, kw = W.shape
        Go = offset_group
        oh, ow = offset.shape[2:]
        sh, sw = strides
        dh, dw = dilations
        if C != Cg * group or M % group or C % Go or offset.shape[1] != Go * kh * kw * 2:
            raise ModelError(f"DeformConv: input {X.shape}, kernel {W.shape} and offset {offset.shape} do not agree "
                             f"with group={group} and offset_group={Go}")
        if (oh, ow) != ((H + pads[0] + pads[2] - (kh - 1) * dh - 1) // sh + 1, (Wd + pads[1] + pads[3] - (kw - 1) * dw - 1) // sw + 1):
            raise ModelError(f"DeformConv: offset's output size {(oh, ow)} does not follow from the input {(H, Wd)}, "
                             f"kernel {(kh, kw)}, strides, pads and dilations")
        dtype = np.result_type(X.dtype, offset.dtype)
        off = offset.astype(dtype, copy=False).reshape(N, Go, kh, kw, 2, oh, ow)
        at_h = (np.arange(kh) * dh)[:, None, None, None] + (np.arange(oh) * sh - pads[0])[None, None, :, None]
        at_w = (np.arange(kw) * dw)[None, :, None, None] + (np.arange(ow) * sw - pads[1])[None, None, None, :]
        ph = (at_h + off[:, :, :, :, 0]).reshape(N, Go, 1, -1)
        pw = (at_w + off[:, :, :, :, 1]).reshape(N, Go, 1, -1)
        h0, w0 = np.floor(ph), np.floor(pw)
        lh, lw = ph - h0, pw - w0
        h0, w0 = h0.astype(np.int64), w0.astype(np.int64)
        self.corners = []
        for dy, wy, sy in ((0, 1 - lh, -1), (1, lh, 1)):
            for dx, wx, sx in ((0, 1 - lw, -1), (1, lw, 1)):
                h, w = h0 + dy, w0 + dx
                inside = (h >= 0) & (h < H) & (w >= 0) & (w < Wd)
                zero = dtype.type(0)
                self.corners.append((np.where(inside, h * Wd + w, 0), np.where(inside, wy * wx, zero),
                                     np.where(inside, sy * wx, zero), np.where(inside, wy * sx, zero)))
        self.shape = dict(N=N, C=C, H=H, W=Wd, M=M, Cg=Cg, K=kh * kw, O=oh * ow, Go=Go, g=group, out=(oh, ow))

    def sample(self, Xl, coef=1):
        """sum over corners of weight * Xl at the corner: Xl (*lead, N, C, H, W) -> (*lead, N, C, K, O);
        coef 1 takes the weights, 2 and 3 their derivatives along h and w."""
        s = self.shape
        head = Xl.shape[:-4]
        Xg = Xl.reshape(head + (s["N"], s["Go"], s["C"] // s["Go"], s["H"] * s["W"]))
        out = None
        for corner in self.corners:
            idx = corner[0].reshape((1,) * len(head) + corner[0].shape)
            term = np.take_along_axis(Xg, idx, axis=-1) * corner[coef]
            out = term if out is None else out + term
        return out.reshape(head + (s["N"], s["C"], s["K"], s["O"]))

    def scatter(self, Vbar):
        """The adjoint of sample(., 1): Vbar (L, N, C, K, O) -> (L, N, C, H, W)."""
        s = self.shape
        L = Vbar.shape[0]
        Cgo, HW = s["C"] // s["Go"], s["H"] * s["W"]
        V = Vbar.reshape(L, s["N"], s["Go"], Cgo, -1)
        rows = ((np.arange(L)[:, None, None, None] * s["N"] + np.arange(s["N"])[:, None, None]) * s["Go"]
                + np.arange(s["Go"])[:, None]) * Cgo  # (L, N, Go, 1)
        rows = (rows[..., None] + np.arange(Cgo)[:, None]) * HW  # (L, N, Go, Cgo, 1)
        flat = np.zeros(L * s["N"] * s["C"] * HW, Vbar.dtype)
        for idx, w, _, _ in self.corners:
            flat += np.bincount((rows + idx).ravel(), (V * w).ravel(), minlength=flat.size).astype(Vbar.dtype, copy=False)
        return flat.reshape(L, s["N"], s["C"], s["H"], s["W"])

    def per_group(self, A):
        """(…, N, C, K, O) -> (…, N, Go, C/Go, K, O)."""
        s = self.shape
        return A.reshape(A.shape[:-3] + (s["Go"], s["C"] // s["Go"], s["K"], s["O"]))


def _attrs(X, W, dilations, group, kernel_shape, offset_group, pads, strides):
    if X.ndim != 4:
        raise UnsupportedOpError(f"DeformConv of a {X.ndim}-D input is not supported (N, C, H, W is, as in onnxruntime)")
    if kernel_shape is not None and tuple(kernel_shape) != W.shape[2:]:
        raise ModelError(f"DeformConv: kernel_shape {list(kernel_shape)} is not the kernel's {list(W.shape[2:])}")
    return dict(dilations=list(dilations or (1, 1)), group=int(group), offset_group=int(offset_group),
                pads=list(pads or (0, 0, 0, 0)), strides=list(strides or (1, 1)))


def _convolve(cols, W, p):
    """Columns (*lead, N, C, K, O) with kernel W (M, Cg, kh, kw): (*lead, N, M, O)."""
    s = p.shape
    g = s["g"]
    head = cols.shape[:-3]
    c = cols.reshape(head + (g, s["Cg"] * s["K"], s["O"]))
    Y = W.reshape(g, s["M"] // g, -1).astype(cols.dtype, copy=False) @ c  # (*lead, N, g, Mg, O)
    return Y.reshape(head + (s["M"], s["O"]))


def _columns_adjoint(Ybar, W, p):
    """The adjoint of _convolve in its columns: Ybar (L, N, M, O) -> (L, N, C, K, O)."""
    s = p.shape
    g = s["g"]
    Yg = Ybar.reshape(Ybar.shape[:-2] + (g, s["M"] // g, s["O"]))
    Wt = np.swapaxes(W.reshape(g, s["M"] // g, -1), -1, -2).astype(Ybar.dtype, copy=False)  # (g, Cg*K, Mg)
    return (Wt @ Yg).reshape(Ybar.shape[:-2] + (s["C"], s["K"], s["O"]))


def _masked(p, V, mask):
    """Samples (*lead, N, C, K, O) times the mask of their offset group (DCN v2), or as they are."""
    if mask is None:
        return V
    s = p.shape
    return (p.per_group(V) * mask.reshape(s["N"], s["Go"], 1, s["K"], s["O"])).reshape(V.shape)


@rule("DeformConv", since=19)
class DeformConv:
    """Y = B + conv(columns, W), columns[n, c, k, o] = mask[n, c's offset group, k, o] times X[n, c]
    sampled bilinearly at kernel tap k of output position o moved by offset[n, c's offset group,
    k, (h, w), o]: X (N, C, H, W), W (M, C/group, kh, kw), offset (N, offset_group*kh*kw*2, oh,
    ow), B (M,), mask (N, offset_group*kh*kw, oh, ow); zeros outside the image."""

    keeps = True  # per-sample cotangents of the kernel and bias

    def forward(X, W, offset, B=None, mask=None, *, dilations=None, group=1, kernel_shape=None, offset_group=1,
                pads=None, strides=None):
        p = _Plan(X, W, offset, **_attrs(X, W, dilations, group, kernel_shape, offset_group, pads, strides))
        cols = _masked(p, p.sample(X), mask)
        Y = _convolve(cols, W, p)
        if B is not None:
            Y = Y + B.reshape(-1, 1)
        return Y.reshape(Y.shape[:2] + p.shape["out"]).astype(X.dtype, copy=False)

    def jvp(cx, Xdot, Wdot, Odot, Bdot=None, Mdot=None, *, dilations=None, group=1, kernel_shape=None, offset_group=1,
            pads=None, strides=None):
        X, W, offset, _, mask = padded(cx.x, 5)
        p = _Plan(X, W, offset, **_attrs(X, W, dilations, group, kernel_shape, offset_group, pads, strides))
        s = p.shape
        V = p.sample(X)
        cols_dot = None
        if Xdot is not None:
            cols_dot = _masked(p, p.sample(Xdot), mask)
        if Odot is not None:  # the samples move: their slopes along h and w times the offsets' tangents
            O = Odot.reshape(Odot.shape[:-3] + (s["Go"], s["K"], 2, s["O"]))
            moved = add(*(p.per_group(p.sample(X, 2 + a)) * O[..., None, :, a, :] for a in (0, 1)))
            cols_dot = add(cols_dot, _masked(p, moved.reshape(moved.shape[:-4] + V.shape[-3:]), mask))
        if Mdot is not None:
            Md = Mdot.reshape(Mdot.shape[:-3] + (s["Go"], 1, s["K"], s["O"]))
            cols_dot = add(cols_dot, (p.per_group(V) * Md).reshape(Mdot.shape[:-4] + V.shape))
        out = None if cols_dot is None else _convolve(cols_dot, W, p)
        if Wdot is not None:  # the same kernel tangent for every sample
            g = s["g"]
            cols = _masked(p, V, mask).reshape(s["N"], g, -1, s["O"])
            Wd = Wdot.reshape((-1, g, s["M"] // g, cols.shape[2]))
            Yw = np.einsum("tgmk,ngko->tngmo", Wd, cols, optimize=True)
            out = add(out, Yw.reshape(Wdot.shape[:-4] + (s["N"], s["M"], s["O"])))
        if out is not None:
            out = out.reshape(out.shape[:-1] + s["out"])
        if Bdot is not None:
            Bd = Bdot.reshape(Bdot.shape[:-1] + (1, s["M"], 1, 1))
            out = add(out, np.broadcast_to(Bd, Bdot.shape[:-1] + cx.y[0].shape))
        return out

    def vjp(cx, Ybar, *, dilations=None, group=1, kernel_shape=None, offset_group=1, pads=None, strides=None):
        X, W, offset, B, mask = padded(cx.x, 5)
        need, keep = padded(cx.need, 5, False), padded(cx.keep, 5, False)
        if keep[0] or keep[2] or keep[4]:
            raise UnsupportedOpError("DeformConv: per-sample cotangents of an input, offset or mask held as a "
                                     "parameter are not supported (of the kernel and bias they are)")
        p = _Plan(X, W, offset, **_attrs(X, W, dilations, group, kernel_shape, offset_group, pads, strides))
        s = p.shape
        lead = cx.lead(Ybar)
        head = Ybar.shape[:lead]
        Yb = Ybar.reshape((-1, s["N"], s["M"], s["O"]))
        V = p.sample(X)
        bars = [None] * 5
        if need[1]:
            cols = _masked(p, V, mask).reshape(s["N"], s["g"], -1, s["O"])  # (N, g, Cg*K, O)
            Yg = Yb.reshape(Yb.shape[0], s["N"], s["g"], s["M"] // s["g"], s["O"])
            if keep[1]:
                Wb = Yg @ np.swapaxes(cols, -1, -2)  # (L, N, g, Mg, Cg*K)
                bars[1] = Wb.reshape(head + (s["N"],) + W.shape)
            else:
                bars[1] = np.einsum("lngmo,ngko->lgmk", Yg, cols, optimize=True).reshape(head + W.shape)
        if B is not None and need[3]:
            Bb = sum_trailing(Yb, (-1,), keepdims=False)  # (L, N, M)
            bars[3] = (Bb if keep[3] else Bb.sum(axis=1)).reshape(head + ((s["N"],) if keep[3] else ()) + (s["M"],))
        if need[0] or need[2] or need[4]:
            Cbar = _columns_adjoint(Yb, W, p)  # (L, N, C, K, O)
            if need[4] and mask is not None:
                bars[4] = (p.per_group(Cbar) * p.per_group(V)).sum(axis=-3).reshape(head + mask.shape)
            Cbar = _masked(p, Cbar, mask)
            if need[0]:
                bars[0] = p.scatter(Cbar).reshape(head + X.shape)
            if need[2]:
                Cg = p.per_group(Cbar)
                moved = [(Cg * p.per_group(p.sample(X, 2 + a))).sum(axis=-3) for a in (0, 1)]  # (L, N, Go, K, O) each
                Ob = np.stack(moved, axis=-2)  # (L, N, Go, K, 2, O)
                bars[2] = Ob.reshape(head + offset.shape)
        return tuple(None if b is None else b.astype(Ybar.dtype, copy=False) for b in bars[:len(cx.x)])
