"""LSTM, GRU and RNN: forward, reverse and bidirectional, layout 0 (time major) and 1 (batch first).

The loop over time is in Python; everything within a step is batched over samples and directions.
The JVP runs the recurrence forward with tangents; the VJP runs it backwards through time and
keeps the sample axis for per-sample weight cotangents. Shapes in the comments are canonical:
X (S, N, I), states (N, H), W (G*H, I), R (G*H, H) per direction, L leading tangent axes folded.
"""

from __future__ import annotations

import numpy as np

from . import rule, through
from ..errors import UnsupportedOpError
from ._util import per_place
from .elementwise import _sigmoid
from .quant import MS, _dynamic_scale, _levels, _shifted


# ---- activations: value and derivative from (pre-activation, value) ---------------------------------


def _tanh(a):
    return np.tanh(a)


def _dtanh(a, y):
    return 1 - y * y


def _dsigmoid(a, y):
    return y * (1 - y)


def _relu(a):
    return np.maximum(a, 0)


def _drelu(a, y):
    return (a > 0).astype(a.dtype)


def _softsign(a):
    return a / (1 + np.abs(a))


def _dsoftsign(a, y):
    return 1 / (1 + np.abs(a)) ** 2


def _softplus(a):
    return np.logaddexp(0, a).astype(a.dtype)


def _dsoftplus(a, y):
    return _sigmoid(a)


ACTIVATIONS = {
    "sigmoid": (_sigmoid, _dsigmoid),
    "tanh": (_tanh, _dtanh),
    "relu": (_relu, _drelu),
    "softsign": (_softsign, _dsoftsign),
    "softplus": (_softplus, _dsoftplus),
}


def _hardsigmoid(alpha, beta):
    return (lambda a: np.clip(alpha * a + beta, 0, 1),
            lambda a, y: np.where((y > 0) & (y < 1), alpha, 0).astype(a.dtype))


def _leakyrelu(alpha, _):
    return lambda a: np.where(a >= 0, a, alpha * a), lambda a, y: np.where(a >= 0, 1, alpha).astype(a.dtype)


def _thresholdedrelu(alpha, _):
    return lambda a: np.where(a > alpha, a, 0).astype(a.dtype), lambda a, y: (a > alpha).astype(a.dtype)


def _elu(alpha, _):
    return (lambda a: np.where(a >= 0, a, alpha * np.expm1(np.minimum(a, 0))).astype(a.dtype),
            lambda a, y: np.where(a >= 0, 1, y + alpha).astype(a.dtype))


def _affine(alpha, beta):
    return lambda a: (alpha * a + beta).astype(a.dtype), lambda a, y: np.full_like(a, alpha)


def _scaledtanh(alpha, beta):
    return (lambda a: (alpha * np.tanh(beta * a)).astype(a.dtype),
            lambda a, y: (alpha * beta * (1 - np.tanh(beta * a) ** 2)).astype(a.dtype))


# the activations with parameters: (alpha's default, beta's default or None where it takes none),
# and the (value, derivative) pair for given values. The defaults are onnxruntime's, which are the
# operators' own but for ThresholdedRelu (the operator's is 1), Affine and ScaledTanh (the
# experimental operators' are 1 and 0, and none): both 0
PARAMETRIC = {
    "hardsigmoid": ((0.2, 0.5), _hardsigmoid),
    "leakyrelu": ((0.01, None), _leakyrelu),
    "thresholdedrelu": ((0.0, None), _thresholdedrelu),
    "elu": ((1.0, None), _elu),
    "affine": ((0.0, 0.0), _affine),
    "scaledtanh": ((0.0, 0.0), _scaledtanh),
}


def _activations(names, defaults, D, alpha, beta):
    """Per direction, the cell's activations (value, derivative). activation_alpha and
    activation_beta are consumed in the order of the activations, each value by the next one
    that takes it (as onnxruntime reads them): HardSigmoid, LeakyRelu, ThresholdedRelu, Elu,
    Affine and ScaledTanh take an alpha; HardSigmoid, Affine and ScaledTanh a beta; the others
    none. An activation past the end of a list takes its default."""
    names = list(names) if names else list(defaults) * D
    if len(names) == len(defaults):
        names = names * D
    alphas, betas = iter(alpha or ()), iter(beta or ())
    acts = []
    for n in names:
        n = n.decode() if isinstance(n, bytes) else n
        key = n.lower()
        if key in ACTIVATIONS:
            acts.append(ACTIVATIONS[key])
        elif key in PARAMETRIC:
            (a0, b0), make = PARAMETRIC[key]
            a = float(next(alphas, a0))
            b = None if b0 is None else float(next(betas, b0))
            acts.append(make(a, b))
        else:
            raise UnsupportedOpError(f"recurrent activation {n!r} is not supported")
    k = len(defaults)
    return [acts[d * k:(d + 1) * k] for d in range(D)]


# ---- layout and directions ----------------------------------------------------------------------


def _x_canonical(X, layout, lead):
    """Layout 1 (N, S, I) -> canonical (S, N, I); `lead` leading axes are left alone."""
    return np.swapaxes(X, lead, lead + 1) if layout else X


_state_canonical = _x_canonical  # layout 1 (N, D, H) <-> canonical (D, N, H): the same swap


def _y_to_layout(Y, layout, lead):
    """Canonical (S, D, N, H) -> layout 1 (N, S, D, H)."""
    return np.moveaxis(Y, lead + 2, lead) if layout else Y


def _y_from_layout(Y, layout, lead):
    return np.moveaxis(Y, lead, lead + 2) if layout else Y


SLOTS = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P",
         "W_scale", "W_zero_point", "R_scale", "R_zero_point")  # the last four: DynamicQuantizeLSTM's


def _slots(values):
    """Inputs (or tangents, or flags) by name; absent trailing ones are None."""
    values = list(values) + [None] * (len(SLOTS) - len(values))
    return dict(zip(SLOTS, values))


class _Setup:
    """Geometry of one call: layout, sizes, directions, activations, clip, and the sequences'
    lengths. A sequence shorter than the input (sequence_lens, which tf2onnx writes for a Keras
    mask) takes no step past its end: its state is held, and its outputs there are zeros; the
    reverse direction starts at its last step (as onnxruntime runs it). An empty one's final
    states are zeros, as onnxruntime has them."""

    def __init__(self, cell, inputs, attrs):
        v = _slots(inputs)
        self.layout = attrs.get("layout", 0)
        X = _x_canonical(v["X"], self.layout, 0)
        self.S, self.N, _ = X.shape
        self.X = X
        self.H = attrs["hidden_size"]
        self.reverse = {"forward": [False], "foward": [False],  # GRU-1's default, misspelt in the spec
                        "reverse": [True], "bidirectional": [False, True]}[attrs.get("direction", "forward")]
        seq = None if v["sequence_lens"] is None else np.asarray(v["sequence_lens"]).reshape(-1)
        if seq is not None and (len(seq) != self.N or np.any((seq < 0) | (seq > self.S))):
            raise UnsupportedOpError(f"{cell.__name__}: sequence_lens {seq.tolist()[:8]} do not fit {self.N} sequences of "
                                     f"{self.S} steps")
        # per step, the samples whose sequence it is in (None: all of them, at every step)
        self.active = None if seq is None or np.all(seq == self.S) else [(t < seq)[:, None] for t in range(self.S)]
        # the empty sequences, whose final states onnxruntime gives as zeros (not the initial ones)
        self.empty = (seq == 0)[:, None] if seq is not None and np.any(seq == 0) else None
        self.input_forget = bool(attrs.get("input_forget", 0))  # LSTM's forget gate coupled: 1 - the input gate
        self.acts = _activations(attrs.get("activations"), cell.default_acts, len(self.reverse),
                                 attrs.get("activation_alpha"), attrs.get("activation_beta"))
        self.clip = attrs.get("clip")
        self.linear_before_reset = attrs.get("linear_before_reset", 0)


def _clipped(a, clip):
    """Clip a pre-activation; returns it and the derivative mask (None without clip)."""
    if clip is None:
        return a, None
    return np.clip(a, -clip, clip), (np.abs(a) < clip).astype(a.dtype)


def _masked(D, m):
    return D if m is None else D * m


class _Grads:
    """Weight cotangents of one direction: per sample (keep) or summed over samples.

    A matrix's cotangent is a sum over the time steps of outer products G_t V_t^T. The steps'
    G and V are kept and contracted over time at the end (`finish`), one GEMM per sample (or
    one over all samples) with the steps as its inner dimension, instead of an outer product
    per step and sample added into the result."""

    def __init__(self, shapes, need, keep, L, N, dtype):
        self.keep = keep
        self.g = {k: np.zeros((L,) + ((N,) if keep[k] else ()) + shp, dtype) for k, shp in shapes.items() if need[k]}
        self.steps = {}  # (key, rows) -> ([G_t], [V_t])

    def outer(self, key, rows, G, V):
        """Add the outer products G (L, N, r) x V (N, c) (or (L, N, c)) to rows of `key`."""
        if key in self.g:
            Gs, Vs = self.steps.setdefault((key, rows.start, rows.stop), ([], []))
            Gs.append(G)
            Vs.append(V)

    def finish(self):
        """The weight cotangents, the steps' outer products summed."""
        for (key, a, b), (Gs, Vs) in self.steps.items():
            G = np.stack(Gs, axis=-1)  # (L, N, r, S)
            V = np.stack(Vs, axis=-2)  # (N, S, c) or (L, N, S, c)
            if self.keep[key]:
                self.g[key][..., a:b, :] += G @ V
            else:  # over samples and steps at once
                L, N, r, S = G.shape
                Gf = G.transpose(0, 2, 1, 3).reshape(L, r, N * S)
                self.g[key][..., a:b, :] += Gf @ V.reshape(V.shape[:-3] + (N * S, V.shape[-1]))
        self.steps = {}
        return self.g

    def vec(self, key, sl, G):
        """Add G (L, N, k) to the entries `sl` of the vector `key`."""
        if key in self.g:
            self.g[key][..., sl] += G if self.keep[key] else G.sum(axis=1)


class _Recurrent:
    """Shared driver for the three cells: directions, layouts, outputs and the walks in time."""

    keeps = True
    n_diff_outputs = None

    def sample_rows(X, *_, layout=0, **__):
        """For the drivers' probe: the length of X's batch axis (1 in layout 0, 0 in layout 1),
        along which the rule keeps per-sample cotangents: it must be the samples'."""
        return X.shape[1 - layout]

    def jvp(cx, *dots, **attrs):  # rules are called on their class: cx.rule is the cell
        return cx.rule._jvp(cx, dots, attrs)

    def vjp(cx, *bars, **attrs):
        return cx.rule._vjp(cx, bars, attrs)

    @classmethod
    def _run(cls, inputs, attrs):
        """Outputs in the node's layout, and per direction (reverse?, weights, [(t, cache)])."""
        st = _Setup(cls, inputs, attrs)
        v = _slots(inputs)
        S, N, H, D = st.S, st.N, st.H, len(st.reverse)
        dt = st.X.dtype
        h0 = None if v["initial_h"] is None else _state_canonical(v["initial_h"], st.layout, 0)
        c0 = None if v["initial_c"] is None else _state_canonical(v["initial_c"], st.layout, 0)
        Y = np.zeros((S, D, N, H), dt)
        Yh, Yc = np.zeros((D, N, H), dt), np.zeros((D, N, H), dt)
        caches = []
        for d, rev in enumerate(st.reverse):
            p = cls.weights(v, d, H, dt)
            h = np.zeros((N, H), dt) if h0 is None else h0[d]
            c = np.zeros((N, H), dt) if c0 is None else c0[d]
            steps = []
            for t in range(S - 1, -1, -1) if rev else range(S):
                hn, cn, cache = cls.step(st.X[t], h, c, p, st.acts[d], st)
                h, c, Y[t, d] = _held(st, t, hn, cn, h, c)
                steps.append((t, cache))
            Yh[d], Yc[d] = _final(st, h), _final(st, c)
            caches.append((p, steps))
        outs = (_y_to_layout(Y, st.layout, 0), _state_canonical(Yh, st.layout, 0), _state_canonical(Yc, st.layout, 0))
        return outs[: cls.n_outputs], caches, st

    @classmethod
    def _jvp(cls, cx, dots, attrs):
        v, dv = _slots(cx.x), _slots(dots)
        if any(dv[k] is not None for k in ("W", "R", "B", "P")):
            raise UnsupportedOpError(f"{cls.__name__}: weights that depend on the input are not supported")
        _, caches, st = cls._run(cx.x, attrs)
        ref, prim = next((dv[k], v[k]) for k in ("X", "initial_h", "initial_c") if dv[k] is not None)
        head = ref.shape[: ref.ndim - prim.ndim]
        L = int(np.prod(head))
        S, N, H, D, dt = st.S, st.N, st.H, len(caches), st.X.dtype
        Xd = None if dv["X"] is None else _x_canonical(dv["X"].reshape((L,) + v["X"].shape), st.layout, 1)
        states = {k: None if dv[k] is None else _state_canonical(dv[k].reshape((L,) + v[k].shape), st.layout, 1)
                  for k in ("initial_h", "initial_c")}
        Yd = np.zeros((L, S, D, N, H), dt)
        Yhd, Ycd = np.zeros((L, D, N, H), dt), np.zeros((L, D, N, H), dt)
        for d, (p, steps) in enumerate(caches):
            hd = np.zeros((L, N, H), dt) if states["initial_h"] is None else states["initial_h"][:, d]
            cd = np.zeros((L, N, H), dt) if states["initial_c"] is None else states["initial_c"][:, d]
            for t, cache in steps:
                hn, cn = cls.step_jvp(None if Xd is None else Xd[:, t], hd, cd, p, cache, st.acts[d], st)
                hd, cd, Yd[:, t, d] = _held(st, t, hn, cn, hd, cd)
            Yhd[:, d], Ycd[:, d] = _final(st, hd), _final(st, cd)
        outs = (_y_to_layout(Yd, st.layout, 1), _state_canonical(Yhd, st.layout, 1), _state_canonical(Ycd, st.layout, 1))
        return tuple(o.reshape(head + o.shape[1:]) for o in outs[: cls.n_outputs])

    @classmethod
    def _vjp(cls, cx, bars, attrs):
        v = _slots(cx.x)
        need, keep = _slots(cx.need), _slots(cx.keep)
        _, caches, st = cls._run(cx.x, attrs)
        k0 = next(k for k, b in enumerate(bars) if b is not None)
        head = bars[k0].shape[: bars[k0].ndim - cx.y[k0].ndim]
        L = int(np.prod(head))
        S, N, H, D, dt = st.S, st.N, st.H, len(caches), st.X.dtype
        Yb = None if bars[0] is None else _y_from_layout(bars[0].reshape((L,) + cx.y[0].shape), st.layout, 1)
        finals = [None if k >= len(bars) or bars[k] is None else
                  _state_canonical(bars[k].reshape((L,) + cx.y[k].shape), st.layout, 1) for k in (1, 2)]
        Xbar = np.zeros((L, S, N, st.X.shape[-1]), dt) if need["X"] else None
        h0bar, c0bar = np.zeros((L, D, N, H), dt), np.zeros((L, D, N, H), dt)
        weights = {k: v[k].shape[1:] for k in ("W", "R", "B", "P") if v[k] is not None}
        per_dir = []
        for d, (p, steps) in enumerate(caches):
            grads = _Grads(weights, {k: bool(need[k]) for k in weights}, {k: bool(keep[k]) for k in weights}, L, N, dt)
            hb = np.zeros((L, N, H), dt) if finals[0] is None else _final(st, finals[0][:, d]).copy()
            cb = np.zeros((L, N, H), dt) if finals[1] is None else _final(st, finals[1][:, d]).copy()
            for t, cache in reversed(steps):
                yb = None if Yb is None else Yb[:, t, d]
                a = None if st.active is None else st.active[t]
                if a is None:
                    hb = hb if yb is None else hb + yb
                else:  # a sequence past its end: its states' cotangents pass the step by, its output's is lost
                    held = (np.where(a, 0, hb), np.where(a, 0, cb))
                    hb, cb = np.where(a, hb if yb is None else hb + yb, 0), np.where(a, cb, 0)
                xb, hb, cb = cls.step_vjp(hb, cb, p, cache, st.acts[d], st, grads)
                if a is not None:
                    hb, cb = hb + held[0], cb + held[1]
                if Xbar is not None:
                    Xbar[:, t] += xb
            h0bar[:, d], c0bar[:, d] = hb, cb
            per_dir.append(grads.finish())
        out = {}
        if Xbar is not None:
            out["X"] = _x_canonical(Xbar, st.layout, 1)
        for k in weights:
            if need[k]:
                axis = 2 if keep[k] else 1  # the direction axis after (L[, N])
                out[k] = np.stack([g[k] for g in per_dir], axis=axis)
        for k, G in (("initial_h", h0bar), ("initial_c", c0bar)):
            if need[k] and v[k] is not None:
                out[k] = _state_canonical(G, st.layout, 1)
                if keep[k]:  # a state without a sample axis of its own: an initializer in a model whose batch is fixed
                    out[k] = per_place(out[k], 1, axis=1 if st.layout == 0 else 0)
        return tuple(None if k not in out else out[k].reshape(head + out[k].shape[1:]) for k in SLOTS[: len(cx.x)])


def _held(st, t, h_new, c_new, h, c):
    """The states after step t, and its output: the step's, or for a sequence past its end, the
    states it had and a zero output (on values or on their tangents alike)."""
    if st.active is None:
        return h_new, c_new, h_new
    a = st.active[t]
    return np.where(a, h_new, h), np.where(a, c_new, c), np.where(a, h_new, 0)


def _final(st, h):
    """A final state (or its tangent or cotangent): zero for an empty sequence."""
    return h if st.empty is None else np.where(st.empty, 0, h)


# ---- the cells ------------------------------------------------------------------------------------


class _W:
    """One direction's weights: W (G*H, I), R (G*H, H), Wb and Rb (G*H), P (3H) or None."""

    def __init__(self, v, d, G, H, dt):
        self.W, self.R = v["W"][d], v["R"][d]
        B = np.zeros(2 * G * H, dt) if v["B"] is None else v["B"][d]
        self.Wb, self.Rb = B[: G * H], B[G * H:]
        self.P = None if v.get("P") is None else v["P"][d]

    def pre(self, x, h):
        """The gates' products before the biases: x W^T + h R^T."""
        return x @ self.W.T + h @ self.R.T


def _split(A, k):
    return np.split(A, k, axis=-1)


@rule("LSTM", since=7)
class LSTM(_Recurrent):
    """Y, Y_h, Y_c of an LSTM: gates i, o, f, c; C' = f*C + i*g(c); H' = o*h(C'); peepholes P.
    With input_forget, f = 1 - i (as onnxruntime couples them; onnx's reference evaluator
    ignores the attribute)."""

    default_acts = ("sigmoid", "tanh", "tanh")
    n_outputs = 3

    def forward(X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *, hidden_size,
                activation_alpha=None, activation_beta=None, activations=None, clip=None, direction="forward",
                input_forget=0, layout=0):
        attrs = dict(hidden_size=hidden_size, activation_alpha=activation_alpha, activation_beta=activation_beta,
                     activations=activations, clip=clip, direction=direction, input_forget=input_forget, layout=layout)
        return LSTM._run((X, W, R, B, sequence_lens, initial_h, initial_c, P), attrs)[0]

    def weights(v, d, H, dt):
        return _W(v, d, 4, H, dt)

    def step(x, h, c, p, acts, st):
        f, g, hh = (a[0] for a in acts)
        ai, ao, af, ac = _split(p.pre(x, h) + p.Wb + p.Rb, 4)
        if p.P is not None:
            pi, po, pf = _split(p.P, 3)
            ai, af = ai + pi * c, af + pf * c
        (ai, mi), (af, mf), (ac, mc) = (_clipped(a, st.clip) for a in (ai, af, ac))
        i, cc = f(ai), g(ac)
        fg = 1 - i if st.input_forget else f(af)
        cn = fg * c + i * cc
        if p.P is not None:
            ao = ao + po * cn
        ao, mo = _clipped(ao, st.clip)
        o = f(ao)
        hc = hh(cn)
        return o * hc, cn, (x, h, c, ai, af, ac, ao, i, fg, cc, o, cn, hc, mi, mf, mc, mo)

    def step_jvp(xd, hd, cd, p, cache, acts, st):
        (_, df), (_, dg), (_, dh) = acts
        x, h, c, ai, af, ac, ao, i, fg, cc, o, cn, hc, mi, mf, mc, mo = cache
        A = hd @ p.R.T if xd is None else xd @ p.W.T + hd @ p.R.T
        aid, aod, afd, acd = _split(A, 4)
        if p.P is not None:
            pi, po, pf = _split(p.P, 3)
            aid, afd = aid + pi * cd, afd + pf * cd
        idt = df(ai, i) * _masked(aid, mi)
        fgd = -idt if st.input_forget else df(af, fg) * _masked(afd, mf)
        ccd = dg(ac, cc) * _masked(acd, mc)
        cnd = fgd * c + fg * cd + idt * cc + i * ccd
        if p.P is not None:
            aod = aod + po * cnd
        od = df(ao, o) * _masked(aod, mo)
        return od * hc + o * dh(cn, hc) * cnd, cnd

    def step_vjp(hb, cb, p, cache, acts, st, grads):
        (_, df), (_, dg), (_, dh) = acts
        x, h, c, ai, af, ac, ao, i, fg, cc, o, cn, hc, mi, mf, mc, mo = cache
        H = h.shape[-1]
        cnb = cb + hb * o * dh(cn, hc)
        aob = _masked(hb * hc * df(ao, o), mo)
        if p.P is not None:
            pi, po, pf = _split(p.P, 3)
            cnb = cnb + aob * po
            grads.vec("P", slice(H, 2 * H), aob * cn)
        if st.input_forget:  # the forget gate is 1 - i: its cotangent goes to i, negated
            aib = _masked(cnb * (cc - c) * df(ai, i), mi)
            afb = np.zeros_like(aib)
        else:
            aib = _masked(cnb * cc * df(ai, i), mi)
            afb = _masked(cnb * c * df(af, fg), mf)
        acb = _masked(cnb * i * dg(ac, cc), mc)
        cprev = cnb * fg
        if p.P is not None:
            cprev = cprev + aib * pi + afb * pf
            grads.vec("P", slice(0, H), aib * c)
            grads.vec("P", slice(2 * H, 3 * H), afb * c)
        Ab = np.concatenate([aib, aob, afb, acb], axis=-1)
        grads.outer("W", slice(None), Ab, x)
        grads.outer("R", slice(None), Ab, h)
        grads.vec("B", slice(0, 4 * H), Ab)
        grads.vec("B", slice(4 * H, 8 * H), Ab)
        return Ab @ p.W, Ab @ p.R, cprev


@rule("GRU", since=7)
class GRU(_Recurrent):
    """Y, Y_h of a GRU: gates z, r, h; H' = (1 - z) * h~ + z * H (linear_before_reset as the spec)."""

    default_acts = ("sigmoid", "tanh")
    n_outputs = 2

    def forward(X, W, R, B=None, sequence_lens=None, initial_h=None, *, hidden_size, activation_alpha=None,
                activation_beta=None, activations=None, clip=None, direction="forward", layout=0, linear_before_reset=0):
        attrs = dict(hidden_size=hidden_size, activation_alpha=activation_alpha, activation_beta=activation_beta,
                     activations=activations, clip=clip, direction=direction, layout=layout,
                     linear_before_reset=linear_before_reset)
        return GRU._run((X, W, R, B, sequence_lens, initial_h), attrs)[0]

    def weights(v, d, H, dt):
        return _W(v, d, 3, H, dt)

    def step(x, h, c, p, acts, st):
        f, g = (a[0] for a in acts)
        H = h.shape[-1]
        axz, axr, axh = _split(x @ p.W.T + p.Wb, 3)
        ahz, ahr = _split(h @ p.R[: 2 * H].T + p.Rb[: 2 * H], 2)
        (az, mz), (ar, mr) = _clipped(axz + ahz, st.clip), _clipped(axr + ahr, st.clip)
        z, r = f(az), f(ar)
        Rh, Rbh = p.R[2 * H:], p.Rb[2 * H:]
        if st.linear_before_reset:
            q = h @ Rh.T + Rbh
            ah = axh + r * q
        else:
            q = (r * h) @ Rh.T + Rbh
            ah = axh + q
        ah, mh = _clipped(ah, st.clip)
        hh = g(ah)
        return (1 - z) * hh + z * h, c, (x, h, az, ar, ah, z, r, hh, q, mz, mr, mh)

    def step_jvp(xd, hd, cd, p, cache, acts, st):
        (_, df), (_, dg) = acts
        x, h, az, ar, ah, z, r, hh, q, mz, mr, mh = cache
        H = h.shape[-1]
        Rh = p.R[2 * H:]
        Ahd = hd @ p.R[: 2 * H].T
        Axd = None if xd is None else xd @ p.W.T
        azd, ard = _split(Ahd if Axd is None else Ahd + Axd[..., : 2 * H], 2)
        zd = df(az, z) * _masked(azd, mz)
        rd = df(ar, r) * _masked(ard, mr)
        if st.linear_before_reset:
            ahd = rd * q + r * (hd @ Rh.T)
        else:
            ahd = (rd * h + r * hd) @ Rh.T
        if Axd is not None:
            ahd = ahd + Axd[..., 2 * H:]
        hhd = dg(ah, hh) * _masked(ahd, mh)
        return zd * (h - hh) + (1 - z) * hhd + z * hd, cd

    def step_vjp(hb, cb, p, cache, acts, st, grads):
        (_, df), (_, dg) = acts
        x, h, az, ar, ah, z, r, hh, q, mz, mr, mh = cache
        H = h.shape[-1]
        Rh = p.R[2 * H:]
        zb = hb * (h - hh)
        hprev = hb * z
        ahb = _masked(hb * (1 - z) * dg(ah, hh), mh)
        if st.linear_before_reset:
            rb = ahb * q
            qb = ahb * r
            hprev = hprev + qb @ Rh
            grads.outer("R", slice(2 * H, 3 * H), qb, h)
        else:
            qb = ahb
            rhb = qb @ Rh
            rb = rhb * h
            hprev = hprev + rhb * r
            grads.outer("R", slice(2 * H, 3 * H), qb, r * h)
        grads.vec("B", slice(5 * H, 6 * H), qb)
        azb = _masked(zb * df(az, z), mz)
        arb = _masked(rb * df(ar, r), mr)
        Azr = np.concatenate([azb, arb], axis=-1)
        hprev = hprev + Azr @ p.R[: 2 * H]
        grads.outer("R", slice(0, 2 * H), Azr, h)
        grads.vec("B", slice(3 * H, 5 * H), Azr)
        Ax = np.concatenate([azb, arb, ahb], axis=-1)
        grads.outer("W", slice(None), Ax, x)
        grads.vec("B", slice(0, 3 * H), Ax)
        return Ax @ p.W, hprev, cb


@rule("RNN", since=7)
class RNN(_Recurrent):
    """Y, Y_h of a simple RNN: H' = f(X W^T + H R^T + Wb + Rb)."""

    default_acts = ("tanh",)
    n_outputs = 2

    def forward(X, W, R, B=None, sequence_lens=None, initial_h=None, *, hidden_size, activation_alpha=None,
                activation_beta=None, activations=None, clip=None, direction="forward", layout=0):
        attrs = dict(hidden_size=hidden_size, activation_alpha=activation_alpha, activation_beta=activation_beta,
                     activations=activations, clip=clip, direction=direction, layout=layout)
        return RNN._run((X, W, R, B, sequence_lens, initial_h), attrs)[0]

    def weights(v, d, H, dt):
        return _W(v, d, 1, H, dt)

    def step(x, h, c, p, acts, st):
        a, m = _clipped(x @ p.W.T + h @ p.R.T + p.Wb + p.Rb, st.clip)
        hn = acts[0][0](a)
        return hn, c, (x, h, a, hn, m)

    def step_jvp(xd, hd, cd, p, cache, acts, st):
        x, h, a, hn, m = cache
        ad = hd @ p.R.T if xd is None else xd @ p.W.T + hd @ p.R.T
        return acts[0][1](a, hn) * _masked(ad, m), cd

    def step_vjp(hb, cb, p, cache, acts, st, grads):
        x, h, a, hn, m = cache
        H = h.shape[-1]
        ab = _masked(hb * acts[0][1](a, hn), m)
        grads.outer("W", slice(None), ab, x)
        grads.outer("R", slice(None), ab, h)
        grads.vec("B", slice(0, H), ab)
        grads.vec("B", slice(H, 2 * H), ab)
        return ab @ p.W, ab @ p.R, cb


# ---- opsets 1 to 6: the same cells, with an output_sequence attribute (whether Y is wanted, which
# changes nothing here; GRU has linear_before_reset from opset 3) --------------------------------

for _cell in (LSTM, GRU, RNN):
    rule(_cell.key.op_type, since=1)(type(f"{_cell.__name__}1", (_cell,), {
        "__doc__": f"{_cell.__name__} of opsets 1 to 6: output_sequence changes nothing here.",
        "ignored_attrs": ("output_sequence",)}))


# ---- onnxruntime's quantized LSTM ----------------------------------------------------------------


class _QuantizedW(_W):
    """One direction's weights of a DynamicQuantizeLSTM. Its products are onnxruntime's: W (I, 4H)
    and R (H, 4H) are 8-bit integers with a scale and zero point per tensor or per column; the
    float operand is quantized to uint8 with a scale from its own range (as DynamicQuantizeLinear:
    the whole input sequence for x, one step's hidden states for h), the product of integers
    taken exactly, then times the two scales. For the derivatives, W and R are the dequantized
    weights (straight through) or zero: the true derivative, as the products are piecewise
    constant in x and h."""

    def __init__(self, v, d, H, dt, through):
        super().__init__(v, d, 4, H, dt)

        def operand(key):  # (integers - zero point) in float64, exact, and the scale per column
            zp = v[key + "_zero_point"]
            return _shifted(v[key][d], None if zp is None else np.asarray(zp)[d]), np.asarray(v[key + "_scale"], np.float32)[d]

        (self.Wq, self.w_scale), (self.Rq, self.r_scale) = operand("W"), operand("R")
        self.x_scale, self.x_zp = _dynamic_scale(np.asarray(v["X"], dt))
        self.W, self.R = ((self.Wq * self.w_scale).T.astype(dt), (self.Rq * self.r_scale).T.astype(dt)) if through else \
            (np.zeros(self.Wq.shape[::-1], dt), np.zeros(self.Rq.shape[::-1], dt))

    def pre(self, x, h):
        return _product(x, self.x_scale, self.x_zp, self.Wq, self.w_scale) + _product(h, *_dynamic_scale(h), self.Rq, self.r_scale)


def _product(a, scale, zp, Bq, b_scale):
    """onnxruntime's quantized product: a's uint8 levels (scale, zp) minus zp, times Bq (integers
    less their zero point), exact in float64, then times scale * b_scale in float32."""
    q = _levels(a, scale, zp) - np.float64(zp)
    m = np.float32(scale) * b_scale
    return (q @ Bq).astype(a.dtype) * m.astype(a.dtype)


@rule("DynamicQuantizeLSTM", since=1, domain=MS)
class DynamicQuantizeLSTM(LSTM):
    """onnxruntime's LSTM with 8-bit weights, what quantize_dynamic makes of an LSTM: W (D, I, 4H)
    and R (D, H, 4H), transposed from LSTM's, with scales and zero points per direction or per
    gate column (see _QuantizedW). x and h reach the gates through integers only, piecewise
    constant (their scales taken as constants, as DynamicQuantizeLinear's): their derivative is
    zero (the summary says why), and the cell state, the biases and the peepholes pass theirs.
    Like DynamicQuantizeLinear's, the hidden states' scale spans the batch, so samples mix: a
    batch fixed at 1 runs one sample at a time."""

    nondiff = (0, 1, 2, 4, 5, 8, 9, 10, 11)

    def forward(X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, W_scale=None,
                W_zero_point=None, R_scale=None, R_zero_point=None, *, hidden_size, activation_alpha=None,
                activation_beta=None, activations=None, clip=None, direction="forward", input_forget=0):
        attrs = dict(hidden_size=hidden_size, activation_alpha=activation_alpha, activation_beta=activation_beta,
                     activations=activations, clip=clip, direction=direction, input_forget=input_forget)
        inputs = (X, W, R, B, sequence_lens, initial_h, initial_c, P, W_scale, W_zero_point, R_scale, R_zero_point)
        return DynamicQuantizeLSTM._run(inputs, attrs)[0]

    def weights(v, d, H, dt):
        return _QuantizedW(v, d, H, dt, through=False)


@through(DynamicQuantizeLSTM)
class DynamicQuantizeLSTMThrough(DynamicQuantizeLSTM):
    """DynamicQuantizeLSTM straight through its quantizers: x and h pass derivatives as the LSTM
    with the dequantized weights, at the quantized forward's gates."""

    nondiff = (1, 2, 4, 8, 9, 10, 11)

    def weights(v, d, H, dt):
        return _QuantizedW(v, d, H, dt, through=True)
