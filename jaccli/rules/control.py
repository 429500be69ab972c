"""Control flow: If, Loop and Scan. Their sub-graphs are planned and walked as graphs of their
own, with the outer values they read (Graph.free) as inputs: the forward runs the branch taken or
the iterations; the derivatives run the same sub-graphs' JVP and VJP, in reverse order of the
iterations for Loop and Scan. A condition is read at run time, per block of samples: the pairing probe
of the drivers catches one that depends on the samples' values."""

from __future__ import annotations

import numpy as np

from . import Ctx, rule
from ..errors import ModelError, UnsupportedOpError

MAX_ITERATIONS = 1 << 20  # a Loop without a trip count whose condition never turns false


def _plan(graph, wrt=(), per_sample=False, unbatched=(), dtype=np.float32):
    """The sub-graph's plan for these asks, built once."""
    from ..model import Model, ValueInfo
    from ..plan import Plan

    key = (tuple(wrt), per_sample, tuple(unbatched), np.dtype(dtype).str)
    if key not in graph.plans:
        model = Model(None, graph.opsets, graph.nodes, graph.initializers,
                      [ValueInfo(n, 0, None) for n in graph.inputs + graph.free],
                      [ValueInfo(o, 0, None) for o in graph.outputs])
        graph.plans[key] = Plan(model, graph.outputs, wrt, dtype, per_sample=per_sample, unbatched=unbatched)
    return graph.plans[key]


def _dtype(values):
    """The compute type: the widest float type among the node's inputs. A float32 constant
    (a ConstantOfShape's zeros as the initial state) beside float64 data must not make the body
    of a float64 run compute in float32."""
    return max((v.dtype for v in values if isinstance(v, np.ndarray) and v.dtype.kind == "f"),
               key=lambda d: d.itemsize, default=np.dtype(np.float32))


def _add(a, b):
    from ..walk import accumulate

    return b if a is None else a if b is None else accumulate(a, b)


def _seed(cot, name, bar):
    if bar is not None:
        cot[name] = _add(cot.get(name), bar)


def _flags(batched, start, names):
    """{name: has a sample axis} for the node inputs from `start` on (all True before planning)."""
    return {n: (True if batched is None else batched[start + i]) for i, n in enumerate(names)}


def _pull(plan, env, cot, wrt):
    from .. import walk

    return walk._pull(plan, env, cot, plan.active_steps, wrt, {})


def _branch_names(then_branch, else_branch):
    """The node's inputs after the condition: the outer values either branch reads, in the order
    of the attributes' names (see model._nodes)."""
    return else_branch.free + tuple(v for v in then_branch.free if v not in else_branch.free)


@rule("If", since=1)
class If:
    """outputs = then_branch() if cond else else_branch(); cond is one boolean for the block."""

    nondiff = (0,)
    n_diff_outputs = None
    keeps = True
    needs_batched = True

    def forward(cond, *free, then_branch, else_branch, batched=None):
        from .. import walk

        g = _taken(cond, then_branch, else_branch)
        values = dict(zip(_branch_names(then_branch, else_branch), free))
        env = walk.primal(_plan(g, dtype=_dtype(free)), {n: values[n] for n in g.free})
        return tuple(env[o] for o in g.outputs)

    def jvp(cx, _cond, *dots, then_branch, else_branch, batched=None):
        from .. import walk

        g = _taken(cx.x[0], then_branch, else_branch)
        names = _branch_names(then_branch, else_branch)
        values = dict(zip(names, cx.x[1:]))
        seeds = {n: d for n, d in zip(names, dots) if d is not None and n in g.free}
        plan = _plan(g, tuple(seeds), dtype=_dtype(cx.x[1:]))
        return walk.jvp_outputs(plan, walk.primal(plan, {n: values[n] for n in g.free}), seeds)

    def vjp(cx, *bars, then_branch, else_branch, batched=None):
        from .. import walk

        g = _taken(cx.x[0], then_branch, else_branch)
        names = _branch_names(then_branch, else_branch)
        values = dict(zip(names, cx.x[1:]))
        need, keep = dict(zip(names, cx.need[1:])), dict(zip(names, cx.keep[1:]))
        flags = _flags(batched, 1, names)
        wrt = tuple(n for n in g.free if need[n])
        plan = _plan(g, wrt, any(keep[n] for n in g.free), tuple(n for n in g.free if not flags[n]), _dtype(cx.x[1:]))
        cot = {}
        for o, b in zip(g.outputs, bars):
            _seed(cot, o, b)
        res = _pull(plan, walk.primal(plan, {n: values[n] for n in g.free}), cot, wrt)
        return (None,) + tuple(res.get(n) if need[n] and n in g.free else None for n in names)


def _taken(cond, then_branch, else_branch):
    c = np.asarray(cond)
    if c.size != 1:
        raise ModelError(f"If: the condition has {c.size} elements; one boolean is expected")
    return then_branch if bool(c.ravel()[0]) else else_branch


@rule("Loop", since=1)
class Loop:
    """Iterations of body(i, cond, carried..., outer values) -> (cond, carried..., scanned...),
    at most M of them (if given) while cond holds (if given); outputs: the final carried values,
    then each scanned value stacked along a new first axis."""

    nondiff = (0, 1)
    n_diff_outputs = None
    keeps = True
    needs_batched = True

    def forward(M=None, cond=None, *rest, body, batched=None):
        from .. import walk

        plan = _plan(body, dtype=_dtype(rest))
        values, scans = _run(body, M, cond, rest, lambda feeds: walk.primal(plan, feeds))
        return _outputs(body, values, scans, rest)

    def jvp(cx, _m, _c, *dots, body, batched=None):
        from .. import walk

        K = len(body.inputs) - 2
        carried = list(dots[:K])
        free = {n: d for n, d in zip(body.free, dots[K:]) if d is not None}
        dtype = _dtype(cx.x[2:])
        scans = [[] for _ in body.outputs[1 + K:]]

        def iteration(feeds):  # the seeds change as tangents reach the carried values
            nonlocal carried
            seeds = {**{n: t for n, t in zip(body.inputs[2:], carried) if t is not None}, **free}
            plan = _plan(body, tuple(seeds), dtype=dtype)
            env = walk.primal(plan, feeds)
            outs = walk.jvp_outputs(plan, env, seeds)
            carried = list(outs[1:1 + K])
            for k, o in enumerate(body.outputs[1 + K:]):
                scans[k].append((outs[1 + K + k], env[o]))
            return env

        _run(body, cx.x[0], cx.x[1], cx.x[2:], iteration)
        return tuple(carried) + tuple(_stack_tangents(s) for s in scans)

    def rows_mix_inside(x, need, keep, n, mixed, *, body, batched=None):
        """For the drivers' probe: whether, over the iterations, a step of the body asked for
        per-sample cotangents reads values whose first axis is not the n samples (`mixed`, the
        probe's own test). Only that makes the Loop's rows mix: its outer values may carry the
        samples on another axis, as tf2onnx's and jax2onnx's recurrences pass their sequence
        time-major, when what the body's parameters meet has them first."""
        plan = _loop_vjp_plan(body, x, need, keep, batched)[0]
        return _mixes_inside(plan, lambda iteration: _run(body, x[0], x[1], list(x[2:]), iteration), n, mixed)

    def vjp(cx, *bars, body, batched=None):
        K = len(body.inputs) - 2
        M, cond, rest = cx.x[0], cx.x[1], list(cx.x[2:])
        plan, wrt, need_free = _loop_vjp_plan(body, cx.x, cx.need, cx.keep, batched)
        envs = []
        _run(body, M, cond, rest, _keeping(plan, envs))
        carried = list(bars[:K])
        scan_bars = bars[K:]
        acc = dict.fromkeys(need_free)
        for t in reversed(range(len(envs))):
            cot = {}
            for o, b in zip(body.outputs[1:1 + K], carried):
                _seed(cot, o, b)
            for k, (o, b) in enumerate(zip(body.outputs[1 + K:], scan_bars)):
                if b is not None:
                    _seed(cot, o, b[(slice(None),) * cx.lead(b, K + k) + (t,)])
            if not cot:
                carried = [None] * K
                continue
            res = _pull(plan, envs[t], cot, wrt)
            carried = [res.get(n) for n in body.inputs[2:]]
            for n in need_free:
                acc[n] = _add(acc[n], res.get(n))
        return (None, None) + tuple(c if d else None for c, d in zip(carried, cx.need[2:2 + K])) + \
            tuple(acc.get(n) if d else None for n, d in zip(body.free, cx.need[2 + K:]))


def _mixes_inside(plan, run, n, mixed):
    """Whether `mixed(plan, env, n)` finds steps in any iteration's values (see rows_mix_inside):
    `run(iteration)` runs the iterations."""
    envs = []
    run(_keeping(plan, envs))
    return any(mixed(plan, env, n) for env in envs)


def _loop_vjp_plan(body, x, need, keep, batched):
    """The body's plan for a Loop's reverse sweep, what it differentiates with respect to (the
    carried float values, the outer values that need cotangents), and those outer values."""
    K = len(body.inputs) - 2
    rest = list(x[2:])
    need_free = [n for n, d in zip(body.free, need[2 + K:]) if d]
    per_sample = any(keep)
    flags = {**_flags(batched, 2, body.inputs[2:]), **_flags(batched, 2 + K, body.free)}
    unbatched = tuple(body.inputs[:2]) + tuple(n for n in body.inputs[2:] + body.free if not flags[n])
    wrt = tuple(n for n, v in zip(body.inputs[2:], rest) if _floating(v)) + tuple(need_free)  # not the counters
    plan = _plan(body, wrt, per_sample, unbatched, _dtype(rest))
    if per_sample and any(n in unbatched and o in plan.batched and not _empty(v)
                          for n, o, v in zip(body.inputs[2:], body.outputs[1:], rest)):
        raise UnsupportedOpError("Loop: a carried value without a sample axis gains one in the body; per-sample "
                                 "parameter cotangents through it are not supported")
    return plan, wrt, need_free


def _scan_vjp_plan(body, g, x, need, keep, batched):
    """The body's plan for a Scan's reverse sweep, what it differentiates with respect to (the
    float states and slices, the outer values that need cotangents), and those outer values."""
    S, M = g.S, g.M
    need_free = [n for n, d in zip(body.free, need[S + M:]) if d]
    flags = {**_flags(batched, 0, body.inputs[:S]), **_flags(batched, S + M, body.free)}
    slice_flags = _flags(batched, S, body.inputs[S:])
    unbatched = tuple(n for n in body.inputs[:S] + body.free if not flags[n]) + \
        tuple(n for n in body.inputs[S:] if not slice_flags[n])
    wrt = tuple(n for n, v in zip(body.inputs, list(x[:S]) + [x[S + j] for j in range(M)]) if _floating(v)) + \
        tuple(need_free)
    return _plan(body, wrt, any(keep), unbatched, _dtype(x)), wrt, need_free


def _floating(v):
    """A float value, or a sequence of them (an empty one too): one that can have a cotangent."""
    if isinstance(v, list):
        return all(_floating(e) for e in v)
    return np.asarray(v).dtype.kind == "f"


def _empty(v):
    """An empty sequence: it gains a sample axis with its first batched element, harmlessly."""
    return isinstance(v, list) and not v


def _trip(M):
    return None if M is None or np.size(M) == 0 else int(np.ravel(M)[0])


def _start(cond):
    return True if cond is None or np.size(cond) == 0 else bool(np.ravel(cond)[0])


def _next(i):
    if i + 1 >= MAX_ITERATIONS:
        raise ModelError(f"Loop: still running after {MAX_ITERATIONS} iterations (no trip count, and the condition holds)")
    return i + 1


def _feeds(body, i, go, values, free):
    return {body.inputs[0]: np.array(i, np.int64), body.inputs[1]: np.array(go), **dict(zip(body.inputs[2:], values)),
            **dict(zip(body.free, free))}


def _keeping(plan, envs):
    """An iteration that evaluates the plan and keeps its values in `envs`, for the reverse sweep."""
    from .. import walk

    def iteration(feeds, t=None):
        envs.append(walk.primal(plan, feeds))
        return envs[-1]

    return iteration


def _run(body, M, cond, rest, iteration):
    """The iterations, `iteration(feeds)` giving each one's values: the final carried values and,
    per scanned output, its values."""
    K = len(body.inputs) - 2
    values, scans = list(rest[:K]), [[] for _ in body.outputs[1 + K:]]
    go, i, trip = _start(cond), 0, _trip(M)
    while go and (trip is None or i < trip):
        env = iteration(_feeds(body, i, go, values, rest[K:]))
        go, values = bool(np.ravel(env[body.outputs[0]])[0]), [env[o] for o in body.outputs[1:1 + K]]
        for k, o in enumerate(body.outputs[1 + K:]):
            scans[k].append(env[o])
        i = _next(i)
    return values, scans


def _outputs(body, values, scans, rest):
    dtype = _dtype(rest)
    return tuple(values) + tuple(np.stack(s) if s else np.zeros((0,), dtype) for s in scans)


def _stack_tangents(pairs, axis=0):
    """Tangents of a scanned output over the iterations, from (tangent, value) pairs, stacked at
    `axis` after their lead axes; zeros for iterations where it had none (before a tangent
    reached it), None if it never had one."""
    ref = next((t for t, _ in pairs if t is not None), None)
    if ref is None:
        return None
    v0 = next(v for t, v in pairs if t is not None)
    lead = ref.shape[: ref.ndim - np.ndim(v0)]
    ts = [t if t is not None else np.zeros(lead + np.shape(v), ref.dtype) for t, v in pairs]
    return np.stack(ts, axis=len(lead) + axis)


@rule("Scan", since=9)
class Scan:
    """body(state..., slices...) -> (state..., scanned...) over the scan inputs' slices along
    their scan axes (backwards where a direction is 1); outputs: the final states, then each
    scanned value stacked along its output axis (reversed where its direction is 1)."""

    n_diff_outputs = None
    keeps = True
    needs_batched = True

    def forward(*inputs, body, batched=None, **attrs):
        from .. import walk

        g = _ScanGeometry(body, inputs, **attrs)
        plan = _plan(body, dtype=_dtype(inputs))
        states, outs = g.run(inputs, lambda feeds, t: walk.primal(plan, feeds))
        return tuple(states) + tuple(g.stack(o, k) for k, o in enumerate(outs))

    def jvp(cx, *dots, body, batched=None, **attrs):
        from .. import walk

        g = _ScanGeometry(body, cx.x, **attrs)
        S, M = g.S, g.M
        state_t = list(dots[:S])
        free_t = {n: d for n, d in zip(body.free, dots[S + M:]) if d is not None}
        outs = [[] for _ in range(g.K)]

        def iteration(feeds, t):  # the seeds change as tangents reach the states
            nonlocal state_t
            slice_t = [None if dots[S + j] is None else g.slice(dots[S + j], j, t, dots[S + j].ndim - cx.x[S + j].ndim)
                       for j in range(M)]
            seeds = {n: d for n, d in zip(body.inputs, state_t + slice_t) if d is not None}
            seeds.update(free_t)
            plan = _plan(body, tuple(seeds), dtype=_dtype(cx.x))
            env = walk.primal(plan, feeds)
            tans = walk.jvp_outputs(plan, env, seeds)
            state_t = list(tans[:S])
            for k in range(g.K):
                outs[k].append((tans[S + k], env[body.outputs[S + k]]))
            return env

        g.run(cx.x, iteration)
        return tuple(state_t) + tuple(g.stack_tangents(o, k) for k, o in enumerate(outs))

    def rows_mix_inside(x, need, keep, n, mixed, *, body, batched=None, **attrs):
        """For the drivers' probe, as Loop's: whether a step of the body asked for per-sample
        cotangents reads values whose first axis is not the n samples, over the iterations. A
        scan input may carry the samples on another axis than the first (time-major, scanned
        along axis 0) when its slices have them first."""
        g = _ScanGeometry(body, x, **attrs)
        plan = _scan_vjp_plan(body, g, x, need, keep, batched)[0]
        return _mixes_inside(plan, lambda iteration: g.run(x, iteration), n, mixed)

    def vjp(cx, *bars, body, batched=None, **attrs):
        g = _ScanGeometry(body, cx.x, **attrs)
        S, M = g.S, g.M
        plan, wrt, need_free = _scan_vjp_plan(body, g, cx.x, cx.need, cx.keep, batched)
        envs = []
        g.run(cx.x, _keeping(plan, envs))
        carried, acc = list(bars[:S]), dict.fromkeys(need_free)
        ref = next(((b, y) for b, y in zip(bars, cx.y) if isinstance(b, np.ndarray)), None)
        lead = 0 if ref is None else ref[0].ndim - ref[1].ndim
        # per scan input, its cotangent; per sample (a parameter scanned over, as scikit-learn's
        # pairwise distances scan the training points) the sample axis follows the lead axes,
        # and its size is known once a cotangent arrives
        xbars = [np.zeros(ref[0].shape[:lead] + cx.x[S + j].shape, ref[0].dtype)
                 if ref is not None and cx.need[S + j] and not cx.keep[S + j] else None for j in range(M)]
        for t in reversed(range(g.length)):
            cot = {}
            for o, b in zip(body.outputs[:S], carried):
                _seed(cot, o, b)
            for k, (o, b) in enumerate(zip(body.outputs[S:], bars[S:])):
                if b is not None:
                    _seed(cot, o, g.out_slice(b, k, t, b.ndim - cx.y[S + k].ndim))
            if not cot:
                carried = [None] * S
                continue
            res = _pull(plan, envs[t], cot, wrt)
            carried = [res.get(n) for n in body.inputs[:S]]
            for j, n in enumerate(body.inputs[S:]):
                r = res.get(n)
                if r is None or not cx.need[S + j]:
                    continue
                k = lead + 1 if cx.keep[S + j] else lead
                if xbars[j] is None:
                    xbars[j] = np.zeros(r.shape[:k] + cx.x[S + j].shape, r.dtype)
                g.slice(xbars[j], j, t, k)[...] += r
            for n in need_free:
                acc[n] = _add(acc[n], res.get(n))
        return tuple(c if d else None for c, d in zip(carried, cx.need[:S])) + tuple(xbars) + \
            tuple(acc.get(n) if d else None for n, d in zip(body.free, cx.need[S + M:]))


@rule("Scan", since=8)
class Scan8:
    """Scan at opset 8: batched. Its states and scan inputs carry a batch on axis 0 (the scan
    inputs their sequence on axis 1), and the body runs on each batch element's own slices:
    opset 9's Scan per element, its outputs stacked along the batch again. A body's outer values
    are shared by the elements; their cotangents add up (per sample: one element each). Sequence
    lengths shorter than the inputs' are refused."""

    n_diff_outputs = None
    keeps = True
    nondiff = (0,)

    def forward(sequence_lens, *inputs, body, num_scan_inputs, directions=None):
        n, per = _scan8_batch(sequence_lens, inputs, body, num_scan_inputs)
        runs = [Scan.forward(*_element(inputs, b, 0, per), body=body, num_scan_inputs=num_scan_inputs,
                             scan_input_directions=directions) for b in range(n)]
        return tuple(np.stack(out) for out in zip(*runs))

    def jvp(cx, _lens, *dots, body, num_scan_inputs, directions=None):
        x = cx.x[1:]
        n, per = _scan8_batch(cx.x[0], x, body, num_scan_inputs)
        runs = []
        for b in range(n):
            sub = Ctx(tuple(_element(x, b, 0, per)), tuple(_element(cx.y, b, 0, len(cx.y))), rule=Scan)
            seeds = [d if d is None or i >= per else d[(slice(None),) * (d.ndim - x[i].ndim) + (b,)] for i, d in enumerate(dots)]
            runs.append(Scan.jvp(sub, *seeds, body=body, num_scan_inputs=num_scan_inputs, scan_input_directions=directions))
        return tuple(_batch_of(parts, y[0]) for parts, y in zip(zip(*runs), cx.y))

    def vjp(cx, *bars, body, num_scan_inputs, directions=None):
        x = cx.x[1:]
        n, per = _scan8_batch(cx.x[0], x, body, num_scan_inputs)
        if any(cx.keep[1:1 + per]):
            raise UnsupportedOpError("Scan (opset 8): per-sample cotangents of a state or scan input are not supported")
        runs = []
        for b in range(n):
            sub = Ctx(tuple(_element(x, b, 0, per)), tuple(_element(cx.y, b, 0, len(cx.y))), cx.need[1:],
                      (False,) * len(x), rule=Scan)
            seeds = [c if c is None else c[(slice(None),) * (c.ndim - y.ndim) + (b,)] for c, y in zip(bars, cx.y)]
            runs.append(Scan.vjp(sub, *seeds, body=body, num_scan_inputs=num_scan_inputs, scan_input_directions=directions))
        out = []
        for i, parts in enumerate(zip(*runs)):
            if i < per or cx.keep[1 + i]:  # the batch's own values, or an outer value's cotangent per sample
                out.append(_batch_of(parts, x[i] if i >= per else x[i][0]))
            else:
                out.append(None if all(p is None for p in parts) else sum(p for p in parts if p is not None))
        return (None,) + tuple(out)


def _scan8_batch(sequence_lens, inputs, body, num_scan_inputs):
    """Scan 8's batch size and how many inputs carry it (the states and scan inputs); sequence
    lengths shorter than the scan inputs' are refused."""
    per = len(body.inputs)
    n = np.shape(inputs[0])[0]
    if sequence_lens is not None and np.size(sequence_lens):
        full = np.shape(inputs[per - int(num_scan_inputs)])[1]
        if (np.ravel(sequence_lens) != full).any():
            raise UnsupportedOpError("Scan (opset 8) with sequence lengths shorter than the scan inputs' is not supported")
    return n, per


def _element(values, b, lead, per):
    """Batch element b of the first `per` values (their axis `lead`), the rest as they are."""
    return [v[(slice(None),) * lead + (b,)] if i < per else v for i, v in enumerate(values)]


def _batch_of(parts, like):
    """Each element's tangent or cotangent stacked along the batch axis, after the lead axes
    (zeros for an element that has none); None if none has one."""
    ref = next((p for p in parts if p is not None), None)
    if ref is None:
        return None
    lead = ref.ndim - np.ndim(like)
    return np.stack([np.zeros_like(ref) if p is None else p for p in parts], axis=lead)


class _ScanGeometry:
    """Where Scan's iteration t reads its slices and writes its outputs."""

    def __init__(self, body, inputs, *, num_scan_inputs, scan_input_axes=None, scan_input_directions=None,
                 scan_output_axes=None, scan_output_directions=None):
        M, in_axes, in_dirs, out_axes, out_dirs = (num_scan_inputs, scan_input_axes, scan_input_directions,
                                                   scan_output_axes, scan_output_directions)
        self.body, self.M = body, int(M)
        self.S = len(body.inputs) - self.M
        self.K = len(body.outputs) - self.S
        scans = inputs[self.S:self.S + self.M]
        self.in_axes = [int(a) % np.ndim(x) for a, x in zip(in_axes or [0] * self.M, scans)]
        self.in_dirs = list(in_dirs or [0] * self.M)
        self.out_axes = list(out_axes or [0] * self.K)
        self.out_dirs = list(out_dirs or [0] * self.K)
        lengths = {np.shape(x)[a] for x, a in zip(scans, self.in_axes)}
        if len(lengths) != 1:
            raise ModelError(f"Scan: the scan inputs have lengths {sorted(lengths)} along their scan axes")
        self.length = lengths.pop()

    def slice(self, x, j, t, lead=0):
        i = self.length - 1 - t if self.in_dirs[j] else t
        return x[(slice(None),) * (lead + self.in_axes[j]) + (i,)]

    def out_slice(self, y, k, t, lead):
        nd = y.ndim - lead
        i = self.length - 1 - t if self.out_dirs[k] else t
        return y[(slice(None),) * (lead + int(self.out_axes[k]) % nd) + (i,)]

    def feeds(self, states, slices, free):
        return {**dict(zip(self.body.inputs, list(states) + list(slices))), **dict(zip(self.body.free, free))}

    def run(self, inputs, iteration):
        """The iterations, `iteration(feeds, t)` giving each one's values: the final states and,
        per scanned output, its values."""
        S, M = self.S, self.M
        states, free = list(inputs[:S]), inputs[S + M:]
        outs = [[] for _ in range(self.K)]
        for t in range(self.length):
            env = iteration(self.feeds(states, [self.slice(inputs[S + j], j, t) for j in range(M)], free), t)
            states = [env[o] for o in self.body.outputs[:S]]
            for k in range(self.K):
                outs[k].append(env[self.body.outputs[S + k]])
        return states, outs

    def stack(self, values, k):
        values = values[::-1] if self.out_dirs[k] else values
        return np.stack(values, axis=int(self.out_axes[k]) % (np.ndim(values[0]) + 1))

    def stack_tangents(self, pairs, k):
        pairs = pairs[::-1] if self.out_dirs[k] else pairs
        return _stack_tangents(pairs, int(self.out_axes[k]) % (np.ndim(pairs[0][1]) + 1) if pairs else 0)
