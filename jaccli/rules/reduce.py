"""Reductions: ReduceSum and ReduceMean, axes as attribute (old opsets) or as input (new)."""

from __future__ import annotations

import numpy as np

from . import rule
from ._util import need_no_keep


def _norm_axes(axes, ndim, noop_with_empty_axes):
    """Axes as a tuple of negative ints; None reduces all; () reduces nothing."""
    if axes is None or len(axes) == 0:
        return () if noop_with_empty_axes else tuple(range(-ndim, 0))
    return tuple(sorted(int(a) - ndim if a >= 0 else int(a) for a in np.ravel(axes)))


def _reduce_rule(name, since, mean, axes_input):
    def axes_of(X, axes_in, attrs_axes, noop):
        return _norm_axes(axes_in if axes_input else attrs_axes, X.ndim, noop)

    def reduce(data, axes_in, keepdims, noop_with_empty_axes, attrs):
        ax = axes_of(data, axes_in, attrs.get("axes"), noop_with_empty_axes)
        if not ax:
            return data
        f = np.mean if mean else np.sum
        return f(data, axis=ax, keepdims=bool(keepdims)).astype(data.dtype)

    if axes_input:

        def forward(data, axes=None, *, keepdims=1, noop_with_empty_axes=0):
            return reduce(data, axes, keepdims, noop_with_empty_axes, {})

    else:

        def forward(data, *, keepdims=1, noop_with_empty_axes=0, axes=None):
            return reduce(data, None, keepdims, noop_with_empty_axes, {"axes": axes})

    def jvp(cx, Xdot, *_, keepdims=1, noop_with_empty_axes=0, **attrs):
        X = cx.x[0]
        ax = axes_of(X, cx.x[1] if len(cx.x) > 1 else None, attrs.get("axes"), noop_with_empty_axes)
        if not ax:
            return Xdot
        f = np.mean if mean else np.sum
        return f(Xdot, axis=ax, keepdims=bool(keepdims))

    def vjp(cx, Ybar, *_, keepdims=1, noop_with_empty_axes=0, **attrs):
        need_no_keep(cx, name)
        X = cx.x[0]
        ax = axes_of(X, cx.x[1] if len(cx.x) > 1 else None, attrs.get("axes"), noop_with_empty_axes)
        if not ax:
            return (Ybar,) + (None,) * (len(cx.x) - 1)
        lead = cx.lead(Ybar)
        if not keepdims:
            Ybar = np.expand_dims(Ybar, ax)
        if mean:
            Ybar = Ybar / int(np.prod([X.shape[a] for a in ax]))
        return (np.broadcast_to(Ybar, Ybar.shape[:lead] + X.shape),) + (None,) * (len(cx.x) - 1)

    op = "mean" if mean else "sum"
    doc = f"Y = {op} of data over axes (" + ("an input" if axes_input else "an attribute") + "), kept if keepdims"
    cls = type(name, (), {"__doc__": doc, "forward": forward, "jvp": jvp, "vjp": vjp, "nondiff": (1,)})
    return rule(name, since)(cls)


ReduceSum1 = _reduce_rule("ReduceSum", 1, mean=False, axes_input=False)
ReduceSum13 = _reduce_rule("ReduceSum", 13, mean=False, axes_input=True)
ReduceMean1 = _reduce_rule("ReduceMean", 1, mean=True, axes_input=False)
ReduceMean18 = _reduce_rule("ReduceMean", 18, mean=True, axes_input=True)
