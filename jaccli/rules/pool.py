"""Pooling in 1-D, 2-D and 3-D over the window view; derivatives loop over kernel offsets only."""

from __future__ import annotations

import math

import numpy as np

from . import rule
from ._util import conv_geometry, first_max_mask, lead_flat, need_no_keep, pad_spatial, unpad, window_slices, windows, windows_adjoint


def _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode):
    """(kernel, strides, dilations, begin, end, extra) for a pool on X. A kernel longer than the
    padded input is cut to it: with ceil_mode a window may then reach far past the input (its
    averages leave that part out, and max pools pad it with the least value), and the part of
    each window beyond the input holds nothing. transformers' EfficientNet pools its 1x1 map
    with a kernel of 2560 so, which made a window view of 2560 x 2560 per channel."""
    s, d, begin, end, extra = conv_geometry(X.shape, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    kernel = list(kernel_shape)
    for i, n in enumerate(X.shape[X.ndim - len(kernel):]):
        inside = n + begin[i] + end[i] - extra[i]  # the padded input, without ceil_mode's extra
        if d[i] == 1 and kernel[i] > inside:
            out = (inside + extra[i] - kernel[i]) // s[i] + 1
            kernel[i], end[i], extra[i] = inside, end[i] - extra[i] + (out - 1) * s[i], (out - 1) * s[i]
    return kernel, s, d, begin, end, extra


def _offsets(X, kernel_shape, s, d, begin, end, fill=0.0):
    """The padded input's slice for each kernel offset that reaches into X for some output, over
    all outputs: (k, strided view) pairs, k the offset's index into the flattened kernel, in
    increasing order. An offset that reads padding only for every output is left out (a large
    kernel on a small map, as SPPF's 5x5 pools on a detector's 2x2 map: 9 offsets of 25)."""
    Xp = pad_spatial(X, begin, end, fill)
    nd = len(kernel_shape)
    sp = X.shape[X.ndim - nd:]
    out = [(n - (k - 1) * dd - 1) // ss + 1 for n, k, ss, dd in zip(Xp.shape[X.ndim - nd:], kernel_shape, s, d)]
    reach = [inside.any(axis=0) for inside in _in_input(sp, kernel_shape, s, d, begin, out)]  # per axis, (k,)
    pairs = [(k, Xp[window_slices(off, s, d, out)]) for k, off in enumerate(np.ndindex(*kernel_shape))
             if all(r[o] for o, r in zip(off, reach))]
    return pairs or [(0, Xp[window_slices((0,) * nd, s, d, out)])]  # an empty input: padding only


def _lowest(dtype):
    """What a max pool pads with: -inf, or an integer type's least value (uint8 images)."""
    return -np.inf if dtype.kind == "f" or dtype.name.startswith(("bfloat", "float")) else np.iinfo(dtype).min


def _max_arg(X, kernel_shape, s, d, begin, end):
    """Each window's maximum and the offset (into the flattened kernel) of its first maximum.
    The offsets come in increasing order, so one strictly greater than the maximum so far takes
    over as max(idx, k * (v > Y)): no masked copy, whose branch per element a random mask
    mispredicts (3x the time)."""
    low = _lowest(X.dtype)
    (k0, v0), *views = _offsets(X, kernel_shape, s, d, begin, end, low)
    Y = v0.copy()
    idx = np.full(Y.shape, k0, np.int32)
    greater, taken = np.empty(Y.shape, bool), np.empty(Y.shape, np.int32)
    for k, v in views:
        np.greater(v, Y, out=greater)
        np.maximum(idx, np.multiply(greater, np.int32(k), out=taken), out=idx)
        np.maximum(Y, v, out=Y)
    tied = Y == low  # every value of the window the least, tied with its padding: the first offset in X, as onnxruntime
    if tied.any():
        idx[tied] = np.broadcast_to(_first_inside(X.shape[2:], kernel_shape, s, d, begin, Y.shape[2:]), Y.shape)[tied]
    return Y, idx


def _in_input(sp, kernel, s, d, begin, out):
    """Per spatial axis, (outputs, kernel offsets): whether the offset reads the input, not its padding."""
    inside = []
    for n, k, ss, dd, b, o in zip(sp, kernel, s, d, begin, out):
        pos = np.arange(o)[:, None] * ss + np.arange(k)[None, :] * dd - b
        inside.append((pos >= 0) & (pos < n))
    return inside


def _first_inside(sp, kernel, s, d, begin, out):
    """(*out): each window's first kernel offset (flattened) that falls in the input, not in its padding."""
    first = [np.argmax(inside, axis=1) for inside in _in_input(sp, kernel, s, d, begin, out)]  # all padding: offset 0
    return np.ravel_multi_index(np.ix_(*first), kernel).astype(np.int32)


def _tiled_max_cotangent(Ybar, idx, kernel, padded):
    """MaxPool's cotangent when the windows tile the input (stride = kernel): per kernel offset,
    the cotangent times that offset's mask of maxima, written into its strided share of the
    windows (one write of the result; repeating the cotangent first would make three passes)."""
    nd = len(kernel)
    out = idx.shape[2:]
    lead = Ybar.shape[: Ybar.ndim - nd]
    full = tuple(o * k for o, k in zip(out, kernel))
    R = np.empty(lead + tuple(x for o, k in zip(out, kernel) for x in (o, k)), Ybar.dtype)  # (..., o1, k1, o2, k2, ...)
    for k, off in enumerate(np.ndindex(*kernel)):
        np.multiply(Ybar, (idx == k).astype(Ybar.dtype), out=R[(Ellipsis,) + tuple(x for o in off for x in (slice(None), o))])
    R = R.reshape(lead + full)
    if full == tuple(padded):
        return R
    Xb = np.zeros(lead + tuple(padded), R.dtype)  # rows and columns past the last window
    Xb[(Ellipsis,) + tuple(slice(0, n) for n in full)] = R
    return Xb


def _flat_indices(shape, idx, kernel, s, d, begin, storage_order, inside=False):
    """Indices into X flattened of each window's maximum, from its kernel offsets idx; with
    `inside`, also whether every one is in X, not in its padding."""
    nd = len(kernel)
    out = idx.shape[2:]
    offsets = np.array(list(np.ndindex(*kernel)))  # (K, nd)
    sp = shape[2:]
    flat = np.arange(shape[0] * shape[1]).reshape(shape[:2] + (1,) * nd)  # the (n, c) plane
    pos = []
    for a in range(nd):
        start = np.arange(out[a]) * s[a] - begin[a]
        pos.append(start.reshape((1, 1) + tuple(-1 if b == a else 1 for b in range(nd))) + offsets[idx, a] * d[a])
    order = range(nd) if not storage_order else reversed(range(nd))
    for a in order:
        flat = flat * sp[a] + pos[a]
    if inside:
        return flat.astype(np.int64), all(bool(((p >= 0) & (p < n)).all()) for p, n in zip(pos, sp))
    return flat.astype(np.int64)


def _overlap(kernel_shape, s, d):
    return any(ss < (k - 1) * dd + 1 for k, ss, dd in zip(kernel_shape, s, d))


@rule("MaxPool", since=1)
class MaxPool:
    """Y = max over each window of X (N, C, *sp); padding never wins. The derivatives follow the
    first maximum of each window. With a second output, Indices: where each maximum is in X
    flattened (row-major, or column-major over the spatial axes with storage_order=1)."""

    n_diff_outputs = 1

    def forward(X, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None, storage_order=0, strides=None,
                n_outputs=1):
        kernel_shape, s, d, begin, end, _ = _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
        if n_outputs > 1:
            Y, idx = _max_arg(X, kernel_shape, s, d, begin, end)
            return Y, _flat_indices(X.shape, idx, kernel_shape, s, d, begin, storage_order)
        (_, v0), *views = _offsets(X, kernel_shape, s, d, begin, end, _lowest(X.dtype))
        Y = v0.copy()
        for _, v in views:
            np.maximum(Y, v, out=Y)
        return Y

    def jvp(cx, Xdot, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None, storage_order=0, strides=None,
            n_outputs=1):
        X = cx.x[0]
        kernel_shape, s, d, begin, end, _ = _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
        _, idx = _max_arg(X, kernel_shape, s, d, begin, end)
        flat, inside = _flat_indices(X.shape, idx, kernel_shape, s, d, begin, 0, inside=True)
        if inside and Xdot.shape[Xdot.ndim - X.ndim:] == X.shape:  # each maximum's tangent, gathered in one pass
            lead = Xdot.shape[:Xdot.ndim - X.ndim]
            return np.take(Xdot.reshape(lead + (-1,)), flat, axis=len(lead))
        views = _offsets(Xdot, kernel_shape, s, d, begin, end)  # a window of padding only: its tangent is 0
        Ydot = np.zeros(views[0][1].shape, Xdot.dtype)
        for k, v in views:
            np.copyto(Ydot, v, where=idx == k)
        return Ydot

    def vjp(cx, Ybar, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None, storage_order=0, strides=None,
            n_outputs=1):
        need_no_keep(cx, "MaxPool")
        X = cx.x[0]
        kernel_shape, s, d, begin, end, _ = _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
        _, idx = _max_arg(X, kernel_shape, s, d, begin, end)
        nd = len(kernel_shape)
        out = idx.shape[2:]
        padded = tuple(n + b + e for n, b, e in zip(X.shape[2:], begin, end))
        if _tiles(padded, kernel_shape, s, d) is not None:  # windows tile the input
            return (unpad(_tiled_max_cotangent(Ybar, idx, kernel_shape, padded), begin, end),)
        flat, inside = _flat_indices(X.shape, idx, kernel_shape, s, d, begin, 0, inside=True)
        lead = Ybar.shape[:Ybar.ndim - X.ndim]
        if inside and Ybar.shape[len(lead):] == idx.shape:
            return (_scattered(Ybar.reshape(-1, idx.size), flat.ravel(), X.size).reshape(lead + X.shape),)
        Xb = np.zeros(Ybar.shape[: Ybar.ndim - nd] + padded, dtype=Ybar.dtype)
        disjoint = not _overlap(kernel_shape, s, d)
        for k, off in enumerate(np.ndindex(*kernel_shape)):
            dst = Xb[window_slices(off, s, d, out)]
            if disjoint:  # each input element is in one window at most: write, do not add
                np.multiply(Ybar, idx == k, out=dst)
            else:
                dst += Ybar * (idx == k)
        return (unpad(Xb, begin, end),)


def _scattered(G, flat, size):
    """(rows, size): each row of G (rows, windows) added at the flat positions of its windows'
    maxima, np.add.at's unbuffered sums where windows overlap (2-6x the speed of a masked sum
    per kernel offset: ResNet's 3x3 stride-2 stem pool, 32 directions, 64 -> 11 ms)."""
    Xb = np.zeros((len(G), size), G.dtype)
    for row, g in zip(Xb, G):
        np.add.at(row, flat, g)
    return Xb


def _avg_count(X, kernel_shape, s, d, begin, end, extra, count_include_pad):
    """Number of elements each window averages over: (*out,)."""
    nd = len(kernel_shape)
    sp = X.shape[2:]
    ones = np.ones(sp, dtype=X.dtype)
    if count_include_pad:
        ones = np.pad(ones, [(b, e - x) for b, e, x in zip(begin, end, extra)], constant_values=1)
        ones = np.pad(ones, [(0, x) for x in extra])
    else:
        ones = np.pad(ones, list(zip(begin, end)))
    V = windows(ones, kernel_shape, s, d)
    return V.sum(axis=tuple(range(nd, 2 * nd)))


@rule("AveragePool", since=1)
class AveragePool:
    """Y = mean over each window of X (N, C, *sp), pads counted if count_include_pad."""

    def forward(X, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, pads=None, strides=None):
        kernel_shape, s, d, begin, end, extra = _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
        return _avg(X, X.ndim - 1, kernel_shape, s, d, begin, end, extra, count_include_pad)

    def jvp(cx, Xdot, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, pads=None, strides=None):
        X = cx.x[0]
        kernel_shape, s, d, begin, end, extra = _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
        flat, head = lead_flat(Xdot, X.ndim - 1)
        Y = _avg(flat, X.ndim - 1, kernel_shape, s, d, begin, end, extra, count_include_pad, like=X)
        return Y.reshape(head + Y.shape[1:])

    def vjp(cx, Ybar, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, pads=None, strides=None):
        need_no_keep(cx, "AveragePool")
        X = cx.x[0]
        kernel_shape, s, d, begin, end, extra = _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
        count = _avg_count(X, kernel_shape, s, d, begin, end, extra, count_include_pad)
        return (_window_sums_adjoint(Ybar / count, X.shape, kernel_shape, s, d, begin, end),)


def _avg(X, core, kernel_shape, s, d, begin, end, extra, count_include_pad, like=None):
    total = _window_sums(X, kernel_shape, s, d, begin, end)
    return total / _avg_count(X if like is None else like, kernel_shape, s, d, begin, end, extra, count_include_pad)


def _window_sums(X, kernel_shape, s, d, begin, end):
    """Each window's sum over X (N, C, *sp) zero-padded by begin/end."""
    nd = len(kernel_shape)
    Xp = pad_spatial(X, begin, end)
    tiles = _tiles(Xp.shape[Xp.ndim - nd:], kernel_shape, s, d)
    if tiles is not None:  # windows side by side: one reshape, one sum
        cover, split = tiles
        T = Xp[(Ellipsis,) + cover].reshape(Xp.shape[:Xp.ndim - nd] + split)
        return T.sum(axis=tuple(range(T.ndim - 2 * nd + 1, T.ndim, 2)))
    V = windows(Xp, kernel_shape, s, d)
    return V.sum(axis=tuple(range(V.ndim - nd, V.ndim)))


def _window_sums_adjoint(G, shape, kernel_shape, s, d, begin, end):
    """The adjoint of _window_sums: each window's G added over its elements of X's `shape`."""
    nd = len(kernel_shape)
    padded = tuple(n + b + e for n, b, e in zip(shape[2:], begin, end))
    tiles = _tiles(padded, kernel_shape, s, d)
    if tiles is not None:  # each window's G broadcast over its tile
        cover, split = tiles
        Xb = np.zeros(G.shape[:G.ndim - nd] + padded, G.dtype)
        tile = Xb[(Ellipsis,) + cover].reshape(G.shape[:G.ndim - nd] + split)  # a view: the cover is a prefix
        tile[...] = G[(Ellipsis,) + tuple(slice(None) if i % 2 == 0 else None for i in range(2 * nd))]
        return unpad(Xb, begin, end)
    G = np.broadcast_to(G[(Ellipsis,) + (None,) * nd], G.shape + tuple(kernel_shape))
    return unpad(windows_adjoint(G, padded, kernel_shape, s, d), begin, end)


def _tiles(padded, kernel_shape, s, d):
    """For windows that tile the input (stride = kernel, no dilation): the part of the padded
    spatial axes they cover, and those axes split as (out, kernel) pairs. None otherwise."""
    if any(st != k or dl != 1 for st, k, dl in zip(s, kernel_shape, d)):
        return None
    out = [(n - k) // k + 1 for n, k in zip(padded, kernel_shape)]
    cover = tuple(slice(0, o * k) for o, k in zip(out, kernel_shape))
    return cover, tuple(x for o, k in zip(out, kernel_shape) for x in (o, k))


@rule("GlobalAveragePool", since=1)
class GlobalAveragePool:
    """Y = mean of X (N, C, *sp) over the spatial axes, kept as size 1."""

    def forward(X):
        return X.mean(axis=tuple(range(2, X.ndim)), keepdims=True)

    def jvp(cx, Xdot):
        nd = cx.x[0].ndim - 2
        return Xdot.mean(axis=tuple(range(Xdot.ndim - nd, Xdot.ndim)), keepdims=True)

    def vjp(cx, Ybar):
        need_no_keep(cx, "GlobalAveragePool")
        X = cx.x[0]
        size = math.prod(X.shape[2:])
        lead = cx.lead(Ybar)
        return (np.broadcast_to(Ybar / size, Ybar.shape[:lead] + X.shape),)


@rule("GlobalMaxPool", since=1)
class GlobalMaxPool:
    """Y = max of X (N, C, *sp) over the spatial axes, kept as size 1."""

    def forward(X):
        return X.max(axis=tuple(range(2, X.ndim)), keepdims=True)

    def jvp(cx, Xdot):
        mask = first_max_mask(cx.x[0], cx.x[0].ndim - 2)
        nd = cx.x[0].ndim - 2
        return (mask * Xdot).sum(axis=tuple(range(Xdot.ndim - nd, Xdot.ndim)), keepdims=True)

    def vjp(cx, Ybar):
        need_no_keep(cx, "GlobalMaxPool")
        return (first_max_mask(cx.x[0], cx.x[0].ndim - 2) * Ybar,)


# ---- Lp pooling: y = (sum over the window of |x|^p)^(1/p); pads add nothing ----------------------


def _lp_scale(X, Y, p):
    """|x|^(p-1) sign(x) and y^(1-p) (0 where y is 0): dy = y^(1-p) * sum(|x|^(p-1) sign(x) dx)."""
    w = np.sign(X) * np.abs(X) ** (p - 1) if p != 2 else X
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(Y > 0, Y ** (1 - p), 0).astype(Y.dtype)
    return w.astype(X.dtype, copy=False), inv


@rule("LpPool", since=1)
class LpPool:
    """Y = (sum over each window of |X|^p)^(1/p), X (N, C, *sp); padding adds nothing."""

    def forward(X, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, p=2, pads=None, strides=None):
        kernel_shape, s, d, begin, end, _ = _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
        return (_window_sums(np.abs(X) ** p, kernel_shape, s, d, begin, end) ** (1 / p)).astype(X.dtype)

    def jvp(cx, Xdot, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, p=2, pads=None, strides=None):
        X = cx.x[0]
        kernel_shape, s, d, begin, end, _ = _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
        w, inv = _lp_scale(X, cx.y[0], p)
        flat, head = lead_flat(w * Xdot, X.ndim - 1)
        S = _window_sums(flat, kernel_shape, s, d, begin, end)
        return inv * S.reshape(head + S.shape[1:])

    def vjp(cx, Ybar, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, p=2, pads=None, strides=None):
        need_no_keep(cx, "LpPool")
        X = cx.x[0]
        kernel_shape, s, d, begin, end, _ = _geom(X, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
        w, inv = _lp_scale(X, cx.y[0], p)
        return (w * _window_sums_adjoint(Ybar * inv, X.shape, kernel_shape, s, d, begin, end),)


@rule("GlobalLpPool", since=1)
class GlobalLpPool:
    """Y = (sum of |X|^p over the spatial axes)^(1/p), X (N, C, *sp), kept as size 1."""

    def forward(X, *, p=2):
        return (np.sum(np.abs(X) ** p, axis=tuple(range(2, X.ndim)), keepdims=True) ** (1 / p)).astype(X.dtype)

    def jvp(cx, Xdot, *, p=2):
        w, inv = _lp_scale(cx.x[0], cx.y[0], p)
        nd = cx.x[0].ndim - 2
        return inv * (w * Xdot).sum(axis=tuple(range(Xdot.ndim - nd, Xdot.ndim)), keepdims=True)

    def vjp(cx, Ybar, *, p=2):
        need_no_keep(cx, "GlobalLpPool")
        w, inv = _lp_scale(cx.x[0], cx.y[0], p)
        return (w * (Ybar * inv),)


@rule("MaxUnpool", since=9)
class MaxUnpool:
    """Y = zeros with X placed at Indices (into Y flattened, as MaxPool gives them); the shape
    from output_shape, or from the pooling's kernel, strides and pads. Linear in X: its
    adjoint gathers at Indices."""

    nondiff = (1, 2)

    def forward(X, I, output_shape=None, *, kernel_shape, pads=None, strides=None):
        shape = _unpooled_shape(X.shape, output_shape, kernel_shape, pads, strides)
        Y = np.zeros(math.prod(shape), X.dtype)
        Y[np.ravel(I)] = np.ravel(X)
        return Y.reshape(shape)

    def jvp(cx, Xdot, _i=None, _s=None, *, kernel_shape, pads=None, strides=None):
        X, I = cx.x[0], cx.x[1]
        lead = Xdot.shape[: Xdot.ndim - X.ndim]
        shape = cx.y[0].shape
        Y = np.zeros(lead + (math.prod(shape),), Xdot.dtype)
        Y[..., np.ravel(I)] = Xdot.reshape(lead + (-1,))
        return Y.reshape(lead + shape)

    def vjp(cx, Ybar, *, kernel_shape, pads=None, strides=None):
        need_no_keep(cx, "MaxUnpool")
        X, I = cx.x[0], cx.x[1]
        lead = Ybar.shape[: cx.lead(Ybar)]
        return Ybar.reshape(lead + (-1,))[..., np.ravel(I)].reshape(lead + X.shape), None, None


def _unpooled_shape(x_shape, output_shape, kernel, pads, strides):
    if output_shape is not None and np.size(output_shape):
        return tuple(int(d) for d in np.ravel(output_shape))
    nd = len(kernel)
    pads = list(pads) if pads else [0] * (2 * nd)
    strides = list(strides) if strides else [1] * nd
    return tuple(x_shape[:2]) + tuple((x_shape[2 + a] - 1) * strides[a] + kernel[a] - pads[a] - pads[nd + a] for a in range(nd))
