"""Sequences (lists of tensors, as scripted loops build them): a sequence's value is a list of
arrays, and so are its tangent and cotangent, with None for an element that has none.

Per-sample cotangents need nothing of these rules: the elements' cotangents pass through as
they come (`keeps`), already per sample where an element has no sample axis. A sequence is
unbatched only as long as it holds no batched element (an empty one, before a loop appends)."""

from __future__ import annotations

import numpy as np

from . import rule
from ..errors import ModelError
from ._util import neg_axis


def _position(seq, position, insert=False):
    """A position in the sequence (negative counts from the end); the end by default."""
    n = len(seq)
    if position is None or np.size(position) == 0:
        return n if insert else n - 1
    p = int(np.ravel(position)[0])
    p = p + n if p < 0 else p
    if not 0 <= p <= (n if insert else n - 1):
        raise ModelError(f"sequence position {int(np.ravel(position)[0])} is out of range for a sequence of {n}")
    return p


def _filled(tangents, values, lead_of):
    """The tangents of a sequence's elements, zeros where one has none (a concatenation needs all)."""
    return [np.zeros(lead_of + np.shape(v), values[0].dtype) if t is None else t for t, v in zip(tangents, values)]


def _lead_of(tangents, values):
    for t, v in zip(tangents, values):
        if t is not None:
            return t.shape[: t.ndim - np.ndim(v)]
    return None


@rule("SequenceEmpty", since=11)
class SequenceEmpty:
    """An empty sequence."""

    def forward(*, dtype=None):
        return ([],)


@rule("SequenceConstruct", since=11)
class SequenceConstruct:
    """A sequence of the inputs."""

    keeps = True

    def forward(*inputs):
        return (list(inputs),)

    def jvp(cx, *dots):
        return list(dots)

    def vjp(cx, bar):
        return tuple(bar)


@rule("SequenceInsert", since=11)
class SequenceInsert:
    """The sequence with the tensor inserted at `position` (the end by default)."""

    keeps = True

    nondiff = (2,)

    def forward(input_sequence, tensor, position=None):
        out = list(input_sequence)
        out.insert(_position(out, position, insert=True), tensor)
        return (out,)

    def jvp(cx, seq_dot, t_dot, _=None):
        seq, p = cx.x[0], _position(cx.x[0], cx.x[2] if len(cx.x) > 2 else None, insert=True)
        out = list(seq_dot) if seq_dot is not None else [None] * len(seq)
        out.insert(p, t_dot)
        return out

    def vjp(cx, bar):
        p = _position(cx.x[0], cx.x[2] if len(cx.x) > 2 else None, insert=True)
        rest = list(bar)
        t = rest.pop(p)
        return rest, t, None


@rule("SequenceAt", since=11)
class SequenceAt:
    """The element at `position`."""

    keeps = True

    nondiff = (1,)

    def forward(input_sequence, position):
        return input_sequence[_position(input_sequence, position)]

    def jvp(cx, seq_dot, _=None):
        return None if seq_dot is None else seq_dot[_position(cx.x[0], cx.x[1])]

    def vjp(cx, bar):
        out = [None] * len(cx.x[0])
        out[_position(cx.x[0], cx.x[1])] = bar
        return out, None


@rule("SequenceErase", since=11)
class SequenceErase:
    """The sequence without the element at `position` (the last by default)."""

    keeps = True

    nondiff = (1,)

    def forward(input_sequence, position=None):
        out = list(input_sequence)
        out.pop(_position(out, position))
        return (out,)

    def jvp(cx, seq_dot, _=None):
        out = list(seq_dot)
        out.pop(_position(cx.x[0], cx.x[1] if len(cx.x) > 1 else None))
        return out

    def vjp(cx, bar):
        out = list(bar)
        out.insert(_position(cx.x[0], cx.x[1] if len(cx.x) > 1 else None), None)
        return out, None


@rule("SequenceLength", since=11)
class SequenceLength:
    """The number of elements (int64)."""

    nondiff = (0,)

    def forward(input_sequence):
        return np.array(len(input_sequence), np.int64)


@rule("ConcatFromSequence", since=11)
class ConcatFromSequence:
    """The elements concatenated along `axis`, or stacked along a new one with new_axis=1."""

    keeps = True

    def forward(input_sequence, *, axis, new_axis=0):
        if not input_sequence:
            raise ModelError("ConcatFromSequence of an empty sequence")
        if new_axis:
            return np.stack(input_sequence, axis=neg_axis(axis, input_sequence[0].ndim + 1) % (input_sequence[0].ndim + 1))
        return np.concatenate(input_sequence, axis=axis)

    def jvp(cx, seq_dot, *, axis, new_axis=0):
        seq = cx.x[0]
        lead = _lead_of(seq_dot, seq)
        if lead is None:
            return None
        parts = _filled(seq_dot, seq, lead)
        nd = seq[0].ndim + (1 if new_axis else 0)
        a = len(lead) + (axis % nd)
        return np.stack(parts, axis=a) if new_axis else np.concatenate(parts, axis=a)

    def vjp(cx, bar, *, axis, new_axis=0):
        seq = cx.x[0]
        lead = cx.lead(bar)
        nd = seq[0].ndim + (1 if new_axis else 0)
        a = lead + (axis % nd)
        if new_axis:
            return ([np.take(bar, i, axis=a) for i in range(len(seq))],)
        edges = np.cumsum([s.shape[axis % nd] for s in seq])[:-1]
        return (np.split(bar, edges, axis=a),)


@rule("SplitToSequence", since=11)
class SplitToSequence:
    """The input split along `axis`: into pieces of the sizes in `split`, into pieces of `split`
    (a scalar) and a remainder, or (no split) into its slices, squeezed unless keepdims."""

    keeps = True
    nondiff = (1,)

    def forward(input, split=None, *, axis=0, keepdims=1):
        return (_split(input, 0, split, axis, keepdims),)

    def jvp(cx, dot, _=None, *, axis=0, keepdims=1):
        X = cx.x[0]
        return _split(dot, dot.ndim - X.ndim, cx.x[1] if len(cx.x) > 1 else None, axis, keepdims)

    def vjp(cx, bar, *, axis=0, keepdims=1):
        X = cx.x[0]
        split = cx.x[1] if len(cx.x) > 1 else None
        pieces = _split(X, 0, split, axis, keepdims)
        lead = _lead_of(bar, pieces)
        if lead is None:
            return None, None
        parts = _filled(bar, pieces, lead)
        a = len(lead) + axis % X.ndim
        if split is None and not keepdims:
            return np.stack(parts, axis=a), None
        return np.concatenate(parts, axis=a), None


def _split(X, lead, split, axis, keepdims):
    a = lead + axis % (X.ndim - lead)
    n = X.shape[a]
    if split is None or np.size(split) == 0:
        parts = np.split(X, n, axis=a)
        return parts if keepdims else [np.squeeze(p, axis=a) for p in parts]
    split = np.asarray(split).astype(np.int64)
    if split.ndim == 0:
        k = int(split)
        edges = list(range(k, n, k))
    else:
        edges = list(np.cumsum(split)[:-1])
    return np.split(X, edges, axis=a)


# ---- optionals (opset 15): a tensor or sequence, or nothing. An optional's value is its element,
# or None when empty, as an input left out is None: OptionalHasElement reads both as empty ----------


@rule("Optional", since=15)
class Optional:
    """The input as an optional: the value itself, or empty (None) without one."""

    keeps = True

    def forward(input=None, *, type=None):
        return (input,)

    def jvp(cx, dot=None, **_):
        return dot

    def vjp(cx, bar, **_):
        return (bar,)


@rule("OptionalHasElement", since=15)
class OptionalHasElement:
    """Whether the optional holds an element (a tensor or sequence given as such does, from
    opset 18; an input left out does not): a boolean, no derivative."""

    nondiff = (0,)

    def forward(input=None):
        return np.array(input is not None)


@rule("OptionalGetElement", since=15)
class OptionalGetElement:
    """The optional's element (from opset 18, a tensor or sequence passes as it is); an empty
    optional has none, and is an error."""

    keeps = True

    def forward(input):
        if input is None:
            raise ModelError("OptionalGetElement of an empty optional")
        return (input,)

    def jvp(cx, dot):
        return dot

    def vjp(cx, bar):
        return (bar,)
