"""Reductions: each is its value and its elementwise partial dY/dX; axes are an attribute in
old opsets and an input in new ones (ReduceSum from opset 13, the others from 18)."""

from __future__ import annotations

import numpy as np

from . import rule


def _norm_axes(axes, ndim, noop_with_empty_axes):
    """Axes as a sorted tuple of negative ints; None or empty reduces all (or none, if noop)."""
    if axes is None or np.size(axes) == 0:
        return () if noop_with_empty_axes else tuple(range(-ndim, 0))
    return tuple(sorted(int(a) - ndim if a >= 0 else int(a) for a in np.ravel(axes)))


def _first_extreme(X, Yk, axes):
    """One-hot of the first element equal to the extreme value over `axes`."""
    hit = X == Yk
    # keep only the first hit in each reduced group, in C order of the reduced axes
    moved = np.moveaxis(hit, axes, tuple(range(-len(axes), 0)))
    flat = moved.reshape(moved.shape[: moved.ndim - len(axes)] + (-1,))
    first = np.zeros_like(flat)
    np.put_along_axis(first, flat.argmax(axis=-1)[..., None], True, axis=-1)
    return np.moveaxis(first.reshape(moved.shape), tuple(range(-len(axes), 0)), axes).astype(X.dtype)


def _prod_partial(X, Yk, axes):
    """d prod / dX_i = product of the others (exact where X has zeros)."""
    zero = X == 0
    nz = zero.sum(axis=axes, keepdims=True)
    others = np.prod(np.where(zero, 1, X), axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        plain = np.where(zero, 0, Yk / np.where(zero, 1, X))
    return np.where(nz == 0, plain, np.where(zero & (nz == 1), others, 0)).astype(X.dtype)


def _sum(X, a):
    return X.sum(axis=a, keepdims=True)


def _mean(X, a):
    return X.mean(axis=a, keepdims=True)


def _max(X, a):
    return X.max(axis=a, keepdims=True, **_empty(X, lowest=True))


def _min(X, a):
    return X.min(axis=a, keepdims=True, **_empty(X, lowest=False))


def _empty(X, lowest):
    """For a reduction over an empty set, its value (opset 18's): the type's lowest value for a
    maximum (-inf, or False), its highest for a minimum."""
    if X.size:
        return {}
    if X.dtype == bool:
        return {"initial": not lowest}
    if X.dtype.kind == "f":
        return {"initial": -np.inf if lowest else np.inf}
    return {"initial": np.iinfo(X.dtype).min if lowest else np.iinfo(X.dtype).max}


def _prod(X, a):
    return X.prod(axis=a, keepdims=True)


def _l1(X, a):
    return np.abs(X).sum(axis=a, keepdims=True)


def _l2(X, a):
    return np.sqrt((X * X).sum(axis=a, keepdims=True))


def _sum_square(X, a):
    return (X * X).sum(axis=a, keepdims=True)


def _log_sum(X, a):
    return np.log(X.sum(axis=a, keepdims=True))


def _logsumexp(X, axes):
    m = _max(X, axes)
    return m + np.log(np.exp(X - m).sum(axis=axes, keepdims=True))


def _one(X, Yk, a):
    return 1


def _mean_partial(X, Yk, a):
    return X.dtype.type(1 / np.prod([X.shape[i] for i in a]))


def _sign_partial(X, Yk, a):
    return np.sign(X)


def _l2_partial(X, Yk, a):
    return np.where(Yk > 0, X / np.where(Yk > 0, Yk, 1), 0)


def _sum_square_partial(X, Yk, a):
    return 2 * X


def _log_sum_partial(X, Yk, a):
    return np.exp(-Yk)


def _logsumexp_partial(X, Yk, a):
    return np.exp(X - Yk)


# name: (value over axes with kept axes, partial(X, kept value, axes), what it computes)
REDUCTIONS = {
    "ReduceSum": (_sum, _one, "sum"),
    "ReduceMean": (_mean, _mean_partial, "mean"),
    "ReduceMax": (_max, _first_extreme, "maximum (gradient to the first)"),
    "ReduceMin": (_min, _first_extreme, "minimum (gradient to the first)"),
    "ReduceProd": (_prod, _prod_partial, "product"),
    "ReduceL1": (_l1, _sign_partial, "sum of |X|"),
    "ReduceL2": (_l2, _l2_partial, "sqrt of the sum of squares"),
    "ReduceSumSquare": (_sum_square, _sum_square_partial, "sum of squares"),
    "ReduceLogSum": (_log_sum, _log_sum_partial, "log of the sum"),
    "ReduceLogSumExp": (_logsumexp, _logsumexp_partial, "log of the sum of exp"),
}


def _reduce_rule(name, since, axes_input):
    value, partial, what = REDUCTIONS[name]

    def axes_of(cx_x, attrs):
        X = cx_x[0]
        given = (cx_x[1] if len(cx_x) > 1 else None) if axes_input else attrs.get("axes")
        return _norm_axes(given, X.ndim, attrs.get("noop_with_empty_axes", 0))

    def reduce(X, ax, keepdims):
        if not ax:
            return X
        Yk = value(X, ax).astype(X.dtype)
        return Yk if keepdims else np.squeeze(Yk, axis=ax)

    def jvp(cx, Xdot, *_, keepdims=1, **attrs):
        X = cx.x[0]
        ax = axes_of(cx.x, attrs)
        if not ax:
            return Xdot
        d = partial(X, value(X, ax), ax)
        return (Xdot if isinstance(d, int) else d * Xdot).sum(axis=ax, keepdims=bool(keepdims))

    def vjp(cx, Ybar, *, keepdims=1, **attrs):
        X = cx.x[0]
        ax = axes_of(cx.x, attrs)
        rest = (None,) * (len(cx.x) - 1)
        if not ax:
            return (Ybar,) + rest
        lead = cx.lead(Ybar)
        Yb = Ybar if keepdims else np.expand_dims(Ybar, ax)
        d = partial(X, value(X, ax), ax)
        G = np.broadcast_to(Yb if isinstance(d, int) else d * Yb, Yb.shape[:lead] + X.shape)
        return (G,) + rest

    if axes_input:

        def forward(data, axes=None, *, keepdims=1, noop_with_empty_axes=0):
            return reduce(data, _norm_axes(axes, data.ndim, noop_with_empty_axes), keepdims)

        nondiff = (1,)
    else:

        def forward(data, *, keepdims=1, axes=None, noop_with_empty_axes=0):
            return reduce(data, _norm_axes(axes, data.ndim, noop_with_empty_axes), keepdims)

        nondiff = ()
    doc = f"Y = {what} of data over axes (" + ("an input" if axes_input else "an attribute") + "), kept if keepdims"
    cls = type(name, (), {"__doc__": doc, "forward": forward, "jvp": jvp, "vjp": vjp, "nondiff": nondiff})
    return rule(name, since)(cls)


for _name in REDUCTIONS:
    _reduce_rule(_name, 1, axes_input=False)
    _reduce_rule(_name, 13 if _name == "ReduceSum" else 18, axes_input=True)
