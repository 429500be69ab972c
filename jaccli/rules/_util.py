"""Helpers shared by the rule families: broadcasting, axes, windows (im2col) and their adjoints."""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import MemoryBudgetError, ModelError, UnsupportedOpError


def scaled(cx, G, d, i=0):
    """G * d (see times) for output i's cotangent G, written over G where the rule may (cx.mine)
    and the product keeps G's shape and dtype."""
    if cx.mine(i) and np.result_type(G, d) == G.dtype and np.broadcast_shapes(G.shape, np.shape(d)) == G.shape:
        return times(G, d, out=G)
    return times(G, d)


def times(G, d, out=None):
    """G * d for a tangent or cotangent G and a derivative d, zero where either is zero even if
    the other is not finite there.

    A branch that the graph computes and then discards (an Imputer replacing the NaN of a log of
    a negative number, as scikit-learn's power transform does; a Where's other side) sends back
    a zero, which must stay zero: IEEE's 0 * NaN is NaN, and autodiff systems return it. One
    sum of d tells whether it is all finite.

    The other way round: a derivative that is infinite where it is taken (a square root at 0)
    makes a cotangent infinite, which a zero partial further on must stop. A standard deviation
    exported as Sqrt(ReduceMean((x - mean)^2)) of a channel that is constant (a ReLU's dead
    channel, as in an x-vector's statistics pooling) is constant near it, derivative 0; the
    cotangent of its variance is inf, and the partial of the square, 2 (x - mean), is 0. Once a
    sweep has made a non-finite value here (sweep_guard), zero partials pass nothing."""
    finite = not (isinstance(d, np.ndarray) and d.dtype.kind == "f") or np.isfinite(d.sum())
    zero = None if finite else G == 0
    r = np.multiply(G, d, out=out) if out is not None else G * d
    if zero is not None:
        np.copyto(r, 0, where=zero)
        _NONFINITE.set(True)
    elif _NONFINITE.get():
        np.copyto(r, 0, where=np.equal(d, 0))
    return r


_NONFINITE = contextvars.ContextVar("jaccli_nonfinite", default=False)  # times made a non-finite value in this sweep


@contextlib.contextmanager
def sweep_guard():
    """A forward or reverse sweep: zero partials in times stop non-finite values made within it."""
    token = _NONFINITE.set(False)
    try:
        yield
    finally:
        _NONFINITE.reset(token)


def sum_trailing(G, axes, keepdims=True):
    """G summed over `axes`. When they are G's last axes and G is contiguous, a matrix-vector
    product with ones: BLAS reads G once, where numpy's sum loops per row (2-14x slower on the
    short rows of softmax, normalisation and bias cotangents)."""
    axes = tuple(a % G.ndim for a in axes)
    k = len(axes)
    if k and axes == tuple(range(G.ndim - k, G.ndim)) and G.flags.c_contiguous and G.dtype.kind == "f" and G.size:
        n = math.prod(G.shape[G.ndim - k:])
        s = (G.reshape(-1, n) @ np.ones(n, G.dtype)).reshape(G.shape[:G.ndim - k])
        return s.reshape(s.shape + (1,) * k) if keepdims else s
    return G.sum(axis=axes, keepdims=keepdims)


def unbroadcast(G, shape, lead=1, keep=False):
    """Sum G, shaped (*lead_axes, *b) with b a broadcast of `shape`, down to (*lead_axes, *shape).

    With `keep`, the sample axis (the first primal axis of G) is not summed and stays
    in front of `shape`: the result is (*lead_axes, N, *shape), a per-sample cotangent.
    """
    shape = tuple(shape)
    lead_shape, prim = G.shape[:lead], G.shape[lead:]
    extra = len(prim) - len(shape)
    aligned = (None,) * extra + shape
    axes = tuple(
        lead + i
        for i, (g, s) in enumerate(zip(prim, aligned))
        if (s is None or (s == 1 and g != 1)) and not (keep and i == 0)
    )
    if axes:
        G = sum_trailing(G, axes)
    if keep and extra == 0 and shape[0] == prim[0] != 1:
        return per_place(G.reshape(*lead_shape, *shape), lead)
    if keep:
        return G.reshape(*lead_shape, prim[0], *shape)
    return G.reshape(*lead_shape, *shape)


def per_place(G, lead, axis=0):
    """Per-sample cotangents (*lead_axes, N, *shape) of a value with a row per place in a fixed
    batch along its `axis` (a constant of an old export, an RNN's initial state), from its
    cotangent G (*lead_axes, *shape): sample n's is G's row n, among zeros."""
    N = G.shape[lead + axis]
    P = np.zeros(G.shape[:lead] + (N,) + G.shape[lead:], G.dtype)
    for n in range(N):
        at = (slice(None),) * (lead + axis) + (n,)
        P[(slice(None),) * lead + (n,)][at] = G[at]
    return P


def expand(D, x, y, lead):
    """Broadcast tangent D, shaped (*lead_axes, *x.shape), to (*lead_axes, *y.shape)."""
    if D is None:
        return None
    pad = y.ndim - x.ndim
    if pad:
        D = D.reshape(D.shape[:lead] + (1,) * pad + D.shape[lead:])
    return np.broadcast_to(D, D.shape[:lead] + y.shape)


def padded(seq, n, fill=None):
    """The first n of a node's inputs (or their flags), `fill` where trailing optional ones are
    absent: the walker trims those."""
    seq = tuple(seq)
    return seq[:n] + (fill,) * (n - len(seq))


def add(*terms):
    """Sum of the terms that are not None (None when all are)."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def neg_axis(axis, ndim):
    """Axis counted from the end, so it stays right when leading axes are added."""
    return axis - ndim if axis >= 0 else axis


def first_max_mask(X, k):
    """1 at the first maximum over X's last k axes (flattened together), 0 elsewhere."""
    flat = X.reshape(X.shape[: X.ndim - k] + (-1,))
    mask = np.zeros_like(flat)
    np.put_along_axis(mask, flat.argmax(axis=-1)[..., None], 1, axis=-1)
    return mask.reshape(X.shape)


def lead_flat(D, core_ndim):
    """Fold every axis before the last `core_ndim` into one: returns (flat, leading shape)."""
    head = D.shape[: D.ndim - core_ndim]
    return D.reshape((-1,) + D.shape[D.ndim - core_ndim :]), head


def need_no_keep(cx, op):
    """Raise when a per-sample cotangent is asked of a rule that cannot give one."""
    if any(cx.keep):
        raise UnsupportedOpError(f"{op}: per-sample parameter cotangents through this operator are not supported")


# ---- windows: the im2col view behind Conv and the pools -------------------------------------


def spatial_pads(in_sp, kernel, strides, dilations, pads, auto_pad, ceil_mode=0):
    """Begin and end pads per spatial axis, from explicit pads or auto_pad (and ceil_mode)."""
    nd = len(in_sp)
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, e, s in zip(in_sp, ext, strides):
            out = -(-n // s)
            total = max(0, (out - 1) * s + e - n)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
    elif auto_pad == "VALID":
        begin, end = [0] * nd, [0] * nd
    else:
        pads = list(pads) if pads else [0] * (2 * nd)
        begin, end = pads[:nd], pads[nd:]
    extra = [0] * nd
    if ceil_mode:
        for i, (n, e, s) in enumerate(zip(in_sp, ext, strides)):
            span = n + begin[i] + end[i] - e
            out = -(-span // s) + 1
            if (out - 1) * s >= n + begin[i]:  # last window would start in the end padding
                out -= 1
            extra[i] = max(0, (out - 1) * s + e - (n + begin[i] + end[i]))
    return begin, end, extra


def pad_spatial(X, begin, end, value=0.0):
    """X with its last len(begin) axes padded by `value`: begin[i] before and end[i] after.

    Written out rather than np.pad, whose Python takes some 0.1 ms a call, holding the GIL that
    the other parts of a block (parallel.py) wait for: a convolution pads its input at every
    step of a sweep."""
    nd = len(begin)
    if not any(begin) and not any(end):
        return X
    if min(begin) < 0 or min(end) < 0:
        raise ValueError(f"negative padding {list(begin)}, {list(end)}")
    lead = X.ndim - nd
    Xp = np.empty(X.shape[:lead] + tuple(n + b + e for n, b, e in zip(X.shape[lead:], begin, end)), X.dtype)
    Xp[(Ellipsis,) + tuple(slice(b, b + n) for b, n in zip(begin, X.shape[lead:]))] = X
    for i, (b, e) in enumerate(zip(begin, end)):  # the borders: slabs across the axes after i, inner ones only before
        inner = tuple(slice(bb, bb + n) for bb, n in zip(begin[:i], X.shape[lead:lead + i]))
        for part in (slice(0, b), slice(Xp.shape[lead + i] - e, None)):
            Xp[(slice(None),) * lead + inner + (part,)] = value
    return Xp


def crop_or_pad(X, begin, end):
    """X with begin[i] entries cut from the start of its i-th trailing axis and end[i] from its
    end, where they are positive; zeros added there where they are negative (a transposed
    convolution whose output_shape is larger than its canvas)."""
    nd = len(begin)
    lead = X.ndim - nd
    X = X[(Ellipsis,) + tuple(slice(max(b, 0), n - max(e, 0)) for b, e, n in zip(begin, end, X.shape[lead:]))]
    return pad_spatial(X, [max(-b, 0) for b in begin], [max(-e, 0) for e in end])


def windows(Xp, kernel, strides, dilations):
    """View of padded Xp (..., C, *sp) as windows (..., C, *out, *kernel); no copy."""
    nd = len(kernel)
    ext = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    V = sliding_window_view(Xp, ext, axis=tuple(range(Xp.ndim - nd, Xp.ndim)))
    return V[(Ellipsis,) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dilations)]


def window_slices(offset, strides, dilations, out):
    """The slice of the padded input that kernel position `offset` reads, over all outputs."""
    return (Ellipsis,) + tuple(
        slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offset, dilations, strides, out)
    )


def windows_adjoint(G, padded_sp, kernel, strides, dilations):
    """Adjoint of `windows`: scatter-add G (..., C, *out, *kernel) back to (..., C, *padded_sp)."""
    nd = len(kernel)
    out = G.shape[G.ndim - 2 * nd : G.ndim - nd]
    Xb = np.zeros(G.shape[: G.ndim - 2 * nd] + tuple(padded_sp), dtype=G.dtype)
    for off in np.ndindex(*kernel):
        Xb[window_slices(off, strides, dilations, out)] += G[(Ellipsis,) + off]
    return Xb


def unpad(Xp, begin, end):
    nd = len(begin)
    sl = tuple(slice(b, Xp.shape[Xp.ndim - nd + i] - e) for i, (b, e) in enumerate(zip(begin, end)))
    return Xp[(Ellipsis,) + sl]


def conv_geometry(x_shape, kernel, strides, dilations, pads, auto_pad, ceil_mode=0):
    """Filled-in strides, dilations and (begin, end) pads for an N-d window op."""
    nd = len(kernel)
    strides = list(strides) if strides else [1] * nd
    dilations = list(dilations) if dilations else [1] * nd
    begin, end, extra = spatial_pads(x_shape[-nd:], kernel, strides, dilations, pads, auto_pad, ceil_mode)
    end = [e + x for e, x in zip(end, extra)]
    return strides, dilations, begin, end, extra


# ---- allocation guard: outputs whose size comes from data values (ConstantOfShape, Expand ...) ----

_MAX_BYTES = contextvars.ContextVar("jaccli_max_bytes", default=None)


@contextlib.contextmanager
def memory_limit(max_bytes):
    """Within this block, check_alloc refuses single allocations above max_bytes."""
    token = _MAX_BYTES.set(max_bytes)
    try:
        yield
    finally:
        _MAX_BYTES.reset(token)


def check_alloc(shape, dtype, op):
    """Refuse, before allocating, an output of `shape` that would exceed the memory budget."""
    limit = _MAX_BYTES.get()
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ModelError(f"{op}: negative dimension in requested shape {shape}")
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if limit is not None and nbytes > limit:
        raise MemoryBudgetError(f"{op}: an output of shape {shape} would need {nbytes / 2**30:.2f} GiB, over --max-memory; refused")
    return shape
