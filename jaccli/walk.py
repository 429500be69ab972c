"""The numeric walkers: primal, forward (JVP) and reverse (VJP). They know no operator."""

from __future__ import annotations

import sys

import numpy as np

from .errors import JaccliError, ModelError
from .plan import Plan, _trim, run_forward
from .rules import Ctx
from .rules._util import scaled, sweep_guard, times


def _guarded(step, what, args, fn, *fn_args, **fn_kwargs):
    """fn(*fn_args, **fn_kwargs) for a rule; anything but a JaccliError becomes one line naming the node."""
    try:
        return fn(*fn_args, **fn_kwargs)
    except JaccliError:
        raise
    except Exception as e:
        shapes = [getattr(a, "shape", None) for a in args]
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise ModelError(f"node '{step.node.name}' ({step.node.op_type}): {what} failed on inputs of shape {shapes}: {msg}") from None


def primal(plan: Plan, feeds: dict) -> dict:
    """Evaluate every step of the plan; returns the environment of values the walkers need."""
    env = dict(plan.consts)
    env.update(plan.params)
    env.update(dict.fromkeys(plan.optional_inputs))  # left out of the data: empty (None), unless given
    env.update(feeds)
    for i, step in enumerate(plan.steps):
        args = [env[v] if v else None for v in step.inputs]
        outs = _guarded(step, "the forward kernel", args, run_forward, step, args)
        for name, value in zip(step.outputs, outs):
            if name:
                env[name] = value
        for v in plan.free_after[i]:
            env.pop(v, None)
    return env


def _ctx(step, env, need=(), keep=(), out=(), owned=(), samples=None):
    x = tuple([env[v] if v else None for v in _trim(step.inputs)])
    y = tuple([env.get(o) for o in step.outputs])
    rows = x[0].shape[0] // samples if samples and step.grouped and any(keep) else 1
    return Ctx(x, y, need, keep, step.rule, out, owned, rows)


def _owned(bars):
    """Per cotangent: an array with its own memory that only `bars` refers to (a rule's fresh
    result, not a view, not shared with another value's entry), so the next rule may overwrite it."""
    return tuple([isinstance(b, np.ndarray) and b.base is None and b.flags.writeable and sys.getrefcount(b) == 3 for b in bars])


def jvp(plan: Plan, env: dict, seeds: dict):
    """Push tangents `seeds` {name: (T, *shape)} forward; returns the tangent of plan.of (or None).
    A diagonal region (plan.regions) is one product, at its first step."""
    return jvp_outputs(plan, env, seeds)[0]


@sweep_guard()
def jvp_outputs(plan: Plan, env: dict, seeds: dict):
    """As jvp, for every one of plan.outs: a tuple of tangents (None where inactive)."""
    tan = dict(seeds)
    diag = {}
    for i, step in enumerate(plan.active_steps):
        region = plan.regions.get(id(step))
        if region is not None and _diagonal(plan, env, region, diag) is not None:
            if step is region.steps[0] and tan.get(region.entry) is not None:
                tan[region.exit] = times(tan[region.entry], diag[id(region)])
        else:
            _push(plan, env, tan, step)
        for v in step.inputs:
            if v and plan.last_use.get(v) == i and v not in plan.outs:
                tan.pop(v, None)
    return tuple(tan.get(o) for o in plan.outs)


def _push(plan, env, tan, step):
    """One step of the forward sweep: the tangents of its outputs from those of its inputs."""
    present = len(_trim(step.inputs))
    ins = [tan.get(v) if d else None for v, d in zip(step.inputs[:present], step.diff_in)]
    if any(t is not None for t in ins):
        cx = _ctx(step, env)
        out = _guarded(step, "the JVP rule", cx.x, step.rule.jvp, cx, *ins, **step.attrs)
        out = out if isinstance(out, tuple) else (out,)
        for name, t in zip(step.outputs, out):
            if t is not None and name in plan.active:
                tan[name] = _in_type(t, plan.dtype)


def _diagonal(plan, env, region, cache):
    """The diagonal of a region's Jacobian, (1, *exit shape): its steps' JVP along ones. None when
    the shapes rule it out at run time (an active value broadcast: the Jacobian is not diagonal)."""
    key = id(region)
    if key not in cache:
        e, y = env[region.entry], env[region.exit]
        d = None
        if e.shape == y.shape and e.dtype == y.dtype and e.dtype.kind == "f":
            tan = {region.entry: np.ones((1,) + e.shape, e.dtype)}
            for step in region.steps:
                _push(plan, env, tan, step)
            d = tan.get(region.exit)
        cache[key] = d
    return cache[key]


def _one_sample(plan, env):
    """Whether per-sample cotangents are to be taken as plain (summed) ones, given a sample axis of
    1 at the sinks: for a graph whose rows mix samples with another axis (a Reshape that merges
    the sample axis with a sequence, as exporters write before a Gemm; plan.rows_mix_samples),
    which the drivers seed one sample at a time (in a run of one, or of a model's fixed batch).
    Elsewhere the rules' own per-sample cotangents are faster."""
    return plan.per_sample and plan.rows_mix_samples


def vjp(plan: Plan, env: dict, Ybar, wrt, sinks=None):
    """Pull cotangent Ybar of plan.of back; returns {name: cotangent or None} for names in wrt.

    `sinks` {name: array} are the final homes of some cotangents (views into the result). A
    value read by one node only is written there by that node's rule (or copied once); the
    others are accumulated as usual and copied at the end. Every sink is filled, with zeros
    where the output does not depend on it.
    """
    return _pull(plan, env, {plan.of: Ybar}, plan.active_steps, wrt, sinks or {}, _one_sample(plan, env))


def vjp_identity(plan: Plan, env: dict, sel, wrt, dtype, sinks=None):
    """Reverse sweep from the identity seed: direction t is output element sel[t] of every
    sample. The output's own rule may answer that seed without arithmetic (`vjp_identity`:
    a Gemm's first cotangent is rows of its weight, broadcast over samples); otherwise the seed
    is built and pulled as usual. `sinks` as for vjp."""
    last = plan.active_steps[-1] if plan.active_steps else None
    y = env[plan.of]
    one = _one_sample(plan, env)
    if last is not None and plan.of in last.outputs and hasattr(last.rule, "vjp_identity") and (one or not any(last.keep)):
        cx = _ctx(last, env, last.diff_in, (False,) * len(last.keep))
        res = _guarded(last, "the VJP rule", cx.x, last.rule.vjp_identity, cx, sel, **last.attrs)
        if res is not None:
            cot = {}
            for name, b, d in zip(last.inputs, res, last.diff_in):
                if d and b is not None:
                    cot[name] = accumulate(cot[name], b) if name in cot else b
            return _pull(plan, env, cot, plan.active_steps[:-1], wrt, sinks or {}, one)
    return vjp(plan, env, identity_seed(sel, y, dtype), wrt, sinks)


def identity_seed(sel, y, dtype):
    """The cotangent seed (T, *y.shape): direction t is 1 at flat output element sel[t] of every
    sample."""
    seed = np.zeros((len(sel), y.shape[0], y[0].size), dtype)
    seed[np.arange(len(sel)), :, sel] = 1
    return seed.reshape((len(sel),) + y.shape)


@sweep_guard()
def _pull(plan, env, cot, steps, wrt, sinks, one=False):
    """The reverse sweep over `steps` from the cotangents `cot` (see vjp). A diagonal region
    (plan.regions) is one product, at its exit step; its other steps then receive nothing. The
    cotangent of a split input (plan.pieces) is one array, its pieces written by the readers
    of the outputs, instead of a concatenation at the split. With `one` sample (see
    _one_sample), the rules are asked for plain cotangents, and the sinks, (T, 1, *shape), are
    taken without their sample axis: plain too, for the rules that write into them."""
    done = set()
    if one:
        sinks = {v: s[:, 0] for v, s in sinks.items()}
    through = _through_transpose(plan, sinks)
    homes = {**sinks, **{v: view for v, (_, view) in through.items()}}
    diag, pieces = {}, {}  # pieces: {id(step): the array its input's cotangent is assembled in}

    def home(v, lead):
        """Where the cotangent of v (read once) goes: a sink, a parameter behind its Transpose,
        or its piece of the cotangent of the input it was split from. `lead`: (shape of the
        direction axes, dtype) of the cotangents at hand."""
        if plan.uses.get(v) != 1:
            return None
        if v in homes:
            return homes[v]
        if v not in plan.pieces or lead is None:
            return None
        st, k = plan.pieces[v]
        if id(st) not in pieces:
            pieces[id(st)] = np.empty(lead[0] + env[st.inputs[0]].shape, lead[1])
        return _piece(st, k, pieces[id(st)], env)

    wrt_set = set(wrt)
    out_y = env.get(plan.of)  # its first axis: the samples, whose rows grouped steps (Step.grouped) divide
    samples = out_y.shape[0] if plan.per_sample and isinstance(out_y, np.ndarray) and out_y.ndim else None
    for step in reversed(steps):  # a value differentiated with respect to keeps its cotangent from its producer
        bars = [None if o in wrt_set else cot.pop(o, None) for o in step.outputs]
        assembled = pieces.pop(id(step), None)
        if assembled is None and not [b for b in bars if b is not None]:
            continue
        region = plan.regions.get(id(step))
        dg = None if region is None else _diagonal(plan, env, region, diag)
        lead = _bars_lead(plan, env, bars, step.outputs)
        if assembled is not None:  # pieces written by their readers; the rest copied or zero
            for k, (o, b) in enumerate(zip(step.outputs, bars)):
                if o and o not in done:
                    np.copyto(_piece(step, k, assembled, env), 0 if b is None else b)
            inputs, diff_in, res = step.inputs[:1], (True,), (assembled,)
            out = (home(step.inputs[0], _lead(assembled, env[step.inputs[0]])),)
        elif dg is not None:  # the exit step: no other step of the region has a cotangent
            inputs, diff_in = (region.entry,), (True,)
            res = (scaled(Ctx((), (), owned=_owned(bars)), bars[0], dg),)
            out = (home(region.entry, lead),)
        else:
            inputs, diff_in = step.inputs, step.diff_in
            n_diff = step.rule.n_diff_outputs
            out = tuple([home(v, lead) if d else None for v, d in zip(step.inputs, step.diff_in)])
            given, back = bars, None
            if step.inner and not one and samples:  # samples behind a sequence, moved first for the rule
                cx, given, back = _samples_first(step, env, bars, out, samples)
            else:
                cx = _ctx(step, env, step.diff_in, (False,) * len(step.keep) if one else step.keep, out, _owned(bars), samples)
            res = _guarded(step, "the VJP rule", cx.x, step.rule.vjp, cx, *(given if n_diff is None else given[:n_diff]), **step.attrs)
            if back is not None:
                res = back(res)
        for name, b, d, dst in zip(inputs, res, diff_in, out):
            if not d or b is None:
                continue
            b = _in_type(b, plan.dtype)
            if dst is not None:
                if b is not dst:
                    np.copyto(dst, b)
                done.add(name)
                if name in through:  # written in the parameter's own place: its Transpose has nothing to do
                    done.add(through[name][0])
            else:
                cot[name] = accumulate(cot[name], b) if name in cot else b
        res = b = None  # cotangents are held by `cot` alone, for _owned
    for name, dst in sinks.items():
        if name not in done:
            if name in cot:
                np.copyto(dst, cot[name])
            else:
                dst[...] = 0
    return {w: (sinks[w] if w in sinks else cot.get(w)) for w in wrt}


def _samples_first(step, env, bars, out, n):
    """For a step whose batched values hold S slices per sample ahead of the samples
    (Step.inner: (S, n, ...), or merged, (S*n, ...) with a sample's rows n apart, as a
    time-major sequence and torch's multi-head attention projections have them): its rule's
    Ctx and output cotangents with the samples first, (n, S, ...), or, for a product that
    follows rows grouped by sample (its rule's grouped_rows), merged ones as sample-major rows
    (n*S, ...) grouped by S (Ctx.rows); and the function that puts the batched inputs'
    cotangents back in their own layout."""
    rows_form = hasattr(step.rule, "grouped_rows")

    def layout(v):  # S, and whether the slices are merged with the samples
        merged = step.inner[v]
        return env[v].shape[0] // n if merged else env[v].shape[0], merged

    def first(a, v, lead=0):  # a value (or a cotangent of it, after `lead` direction axes) with the samples first
        S, merged = layout(v)
        tail = a.shape[lead + 1:] if merged else a.shape[lead + 2:]
        b = np.moveaxis(a.reshape(a.shape[:lead] + (S, n) + tail), lead + 1, lead)
        return np.ascontiguousarray(b).reshape(a.shape[:lead] + ((n * S,) if merged and rows_form else (n, S)) + tail)

    def back_one(g, v, shape):  # an input's cotangent, (*lead, samples first), in the value's own layout
        S, merged = layout(v)
        lead = g.ndim - len(shape) - (merged and not rows_form)  # a merged value was shown with S apart
        tail = tuple(shape[1:] if merged else shape[2:])
        b = np.moveaxis(g.reshape(g.shape[:lead] + (n, S) + tail), lead, lead + 1)
        return np.ascontiguousarray(b).reshape(g.shape[:lead] + tuple(shape))

    def back(res):
        return tuple(back_one(b, v, env[v].shape) if b is not None and v in step.inner else b for b, v in zip(res, step.inputs))

    ins = _trim(step.inputs)
    x = tuple((first(env[v], v) if v in step.inner else env[v]) if v else None for v in ins)
    y = tuple(first(env[o], o) if o in step.inner else env.get(o) for o in step.outputs)
    moved = tuple(first(b, o, b.ndim - env[o].ndim) if b is not None and o in step.inner else b
                  for b, o in zip(bars, step.outputs))
    rows = layout(ins[0])[0] if rows_form and ins and ins[0] in step.inner and step.inner[ins[0]] else 1
    out = tuple(None if v in step.inner else d for v, d in zip(step.inputs, out))
    return Ctx(x, y, step.diff_in, step.keep, step.rule, out, (False,) * len(moved), rows), moved, back


def _in_type(g, dtype):
    """A (co)tangent in the computation's float type: a rule that mixes in an integer or a
    double constant (x ** 3 with an int64 exponent) must not turn float32 work into float64."""
    if isinstance(g, np.ndarray) and g.dtype != dtype and g.dtype.kind == "f":
        return g.astype(dtype)
    return g


def _bars_lead(plan, env, bars, outputs):
    """_lead of the first cotangent of a batched output (None when there is none). A function, so
    that no reference to a cotangent outlives it (see _owned)."""
    for b, o in zip(bars, outputs):
        if b is not None and o in plan.batched:
            return _lead(b, env[o])
    return None


def _lead(b, value):
    """(shape of the direction axes, dtype) of b, a cotangent of value (None for a sequence's)."""
    if not isinstance(b, np.ndarray):
        return None
    return b.shape[: b.ndim - np.ndim(value)], b.dtype


def accumulate(a, b):
    """a + b for (co)tangents: arrays, or sequences' lists of them (None where an element has none)."""
    if isinstance(a, list):
        return [y if x is None else x if y is None else accumulate(x, y) for x, y in zip(a, b)]
    return a + b


def _piece(step, k, whole, env):
    """Output k's piece of `whole`, the cotangent of the input `step` splits (see plan.pieces)."""
    x = env[step.inputs[0]]
    axis = step.rule.piece_axis(x, **step.attrs)
    sizes = [env[o].shape[axis] if o else 0 for o in step.outputs]
    start = sum(sizes[:k])
    return whole[(Ellipsis, slice(start, start + sizes[k])) + (slice(None),) * (-axis - 1)]


def _through_transpose(plan, sinks):
    """{output: (parameter, view)} for plan.param_transposes whose parameter has a sink: the view
    is that sink in the Transpose output's layout."""
    found = {}
    for dst, (src, perm) in plan.param_transposes.items():
        if src in sinks:
            sink = sinks[src]
            lead = sink.ndim - len(perm)
            found[dst] = (src, sink.transpose(tuple(range(lead)) + tuple(lead + a for a in perm)))
    return found
