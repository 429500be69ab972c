"""One generic checker for every rule: single-node models, float64 central differences of our
own forward for JVP (forward mode), VJP (reverse mode) and per-sample parameter cotangents,
and onnxruntime for the forward kernels."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

N = 3  # samples


class Case:
    """One operator case. `inputs` is a list of (kind, spec):

    - ("x", shape)  a graph input with a sample axis in front: (N, *shape)
    - ("p", shape)  a float initializer (a parameter)
    - ("c", array)  a constant initializer (not differentiated)
    - ("i", (shape, high)) an int64 graph input with a sample axis, values in [0, high)
    - ("i32", (shape, high)) the same in int32 (onnxruntime's contrib operators' indices and masks)
    - ("", None)    an absent optional input
    """

    def __init__(self, op, inputs, attrs=None, opset=17, data="normal", outputs=1, id=None, domain=""):
        self.op, self.inputs, self.attrs, self.opset = op, inputs, attrs or {}, opset
        self.data, self.outputs, self.domain = data, outputs, domain
        self.id = id or f"{op}-{opset}"

    def __repr__(self):
        return self.id


def _sample(shape, how, rng):
    if how == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if how == "unit":  # inside (-1, 1), away from its ends (arcsin, arctanh)
        return rng.uniform(-0.8, 0.8, shape)
    if how == "above1":  # arccosh
        return rng.uniform(1.2, 3.0, shape)
    if how == "distinct":  # no ties (MaxPool), no kinks
        n = int(np.prod(shape))
        return (rng.permutation(n).reshape(shape) / n * 4 - 2) + rng.uniform(0, 1e-3, shape)
    if how == "with-nans":  # missing values, every third element (Imputer)
        x = rng.standard_normal(shape)
        x.reshape(-1)[::3] = np.nan
        return x
    if how == "away":  # |x| >= 0.1: away from kinks at 0
        x = rng.standard_normal(shape)
        return np.where(np.abs(x) < 0.1, np.sign(x + 1e-12) * 0.1 + x, x)
    return rng.standard_normal(shape)


def build(case, rng=None):
    """The single-node model and its data {name: float64 array}."""
    rng = rng or np.random.default_rng(0)
    names, graph_inputs, inits, feeds = [], [], [], {}
    for k, (kind, spec) in enumerate(case.inputs):
        name = f"in{k}"
        if kind == "":
            names.append("")
            continue
        names.append(name)
        if kind == "x":
            feeds[name] = _sample((N, *spec), case.data, rng)
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *spec]))
        elif kind in ("i", "i32"):
            shape, high = spec
            feeds[name] = rng.integers(0, high, (N, *shape)).astype(np.int64 if kind == "i" else np.int32)
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64 if kind == "i" else TensorProto.INT32,
                                                              ["N", *shape]))
        elif kind == "p":
            inits.append(numpy_helper.from_array(_sample(spec, case.data, rng).astype(np.float32), name))
        else:
            inits.append(numpy_helper.from_array(np.asarray(spec), name))
    outs = [f"out{j}" for j in range(case.outputs)]
    node = helper.make_node(case.op, names, outs, domain=case.domain, **case.attrs)
    g = helper.make_graph([node], case.id, graph_inputs,
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs[:1]], inits)
    opsets = [helper.make_opsetid("", case.opset)]
    if case.domain:
        opsets.append(helper.make_opsetid(case.domain, 1))  # ai.onnx.ml and com.microsoft: version 1
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = 8
    return m, feeds


def ort_forward(model, feeds, fold=True):
    """onnxruntime's output; for opsets it has no kernel for, the model upgraded by onnx's version
    converter first, and failing that onnx's reference evaluator. Returns (output, oracle name).
    fold=False turns onnxruntime's constant folding off, for a node it folds otherwise than it
    runs it (BatchNormalization's training form before opset 14, on constants only: folded,
    its unused outputs are dropped, and with them the training mode)."""
    import onnxruntime as ort

    cast = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in feeds.items()}
    opts = ort.SessionOptions()  # basic optimizations: no fusions (see jaccli.oracle.Oracle)
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if fold
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    try:
        s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return s.run(None, cast)[0], "onnxruntime"
    except Exception:
        pass  # an opset onnxruntime has no kernel for, or refuses: try the upgraded model
    try:
        from jaccli.oracle import upgraded

        up = upgraded(model, feeds)
        s = ort.InferenceSession(up.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return s.run(None, cast)[0], "onnxruntime (upgraded to opset 11)"
    except Exception:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run(None, cast)[0], "onnx reference evaluator"


def our_forward(model, feeds, dtype=np.float64, params=None):
    """Our forward in `dtype`; `params` replace initializers in a copy of the model (so constant
    folding cannot keep a stale copy of them)."""
    from jaccli import walk
    from jaccli.model import load
    from jaccli.plan import Plan

    if params:
        model = _replace_initializers(model, params)
    m = load(model)
    plan = Plan(m, m.outputs[0].name, [], dtype)
    return walk.primal(plan, {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in feeds.items()})[m.outputs[0].name]


def _replace_initializers(model, params):
    """A copy of the model with `params` in place of its initializers, under the names they have
    once loaded (model.weights_rewritten): float Constant nodes are initializers, a sub-graph's
    float initializers are read from the main graph (the move check_whole_model's forward
    against onnxruntime vouches for), and an initializer's Identity copies are initializers
    apart: the one replaced moves alone."""
    from jaccli.model import weights_rewritten

    m = onnx.ModelProto()
    m.CopyFrom(weights_rewritten(model)[0])
    for t in m.graph.initializer:
        if t.name in params:
            t.CopyFrom(numpy_helper.from_array(np.asarray(params[t.name], np.float64), t.name))
    return m


def fd_input_jacobian(model, feeds, wrt, eps=1e-6):
    """(N, n_out, n_in) by central differences of our float64 forward."""
    x = feeds[wrt]
    n_in = x[0].size
    cols = []
    for j in range(n_in):
        d = np.zeros(n_in)
        d[j] = eps
        d = np.broadcast_to(d.reshape(x.shape[1:]), x.shape)
        yp = our_forward(model, {**feeds, wrt: x + d})
        ym = our_forward(model, {**feeds, wrt: x - d})
        cols.append(((yp - ym) / (2 * eps)).reshape(N, -1))
    return np.stack(cols, axis=-1)


def fd_param_jacobian(model, feeds, names, inits, eps=1e-6, n=N):
    """(n, n_out, P) by central differences over the parameters, per sample (n of them)."""
    cols = []
    for name in names:
        base = inits[name].astype(np.float64)
        for j in range(base.size):
            p, q = base.copy().ravel(), base.copy().ravel()
            p[j] += eps
            q[j] -= eps
            yp = our_forward(model, feeds, params={name: p.reshape(base.shape)})
            ym = our_forward(model, feeds, params={name: q.reshape(base.shape)})
            cols.append(((yp - ym) / (2 * eps)).reshape(n, -1))
    return np.stack(cols, axis=-1)


def rel_err(a, b):
    scale = max(np.abs(b).max(), 1e-12)
    return np.abs(a - b).max() / scale


def check_rule(rule, inputs, attrs, diff, rng, eps=1e-6, T=3):
    """A rule straight on arrays: JVP against central differences of its forward in random
    directions, and VJP by <u, J v> = <J^T u, v>. `diff` lists the inputs differentiated."""
    from jaccli.rules import Ctx

    inputs = [np.asarray(a, np.float64) if k in diff else a for k, a in enumerate(inputs)]

    def f(xs):
        out = rule.forward(*xs, **attrs)
        return out[0] if isinstance(out, tuple) else out

    Y = f(inputs)
    outs = rule.forward(*inputs, **attrs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    V = {k: rng.standard_normal((T,) + inputs[k].shape) for k in diff}
    tangents = [V.get(k) for k in range(len(inputs))]
    cx = Ctx(tuple(inputs), outs, tuple(k in diff for k in range(len(inputs))), (False,) * len(inputs), rule)
    Ydot = rule.jvp(cx, *tangents, **attrs)
    Ydot = Ydot[0] if isinstance(Ydot, tuple) else Ydot
    for t in range(T):
        plus = [x + eps * V[k][t] if k in diff else x for k, x in enumerate(inputs)]
        minus = [x - eps * V[k][t] if k in diff else x for k, x in enumerate(inputs)]
        fd = (f(plus) - f(minus)) / (2 * eps)
        assert rel_err(Ydot[t], fd) < 1e-6, f"JVP: {rel_err(Ydot[t], fd):.2e}"
    U = rng.standard_normal((T,) + Y.shape)
    bars = rule.vjp(cx, U, **attrs)
    lhs = (U * Ydot).sum()
    rhs = sum((bars[k] * V[k]).sum() for k in diff)
    assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs)), f"VJP: <u, Jv> = {lhs}, <J^T u, v> = {rhs}"


def check_whole_model(model, x, params=None, fold=True):
    """A model of input x (N, ...): its forward against onnxruntime (see ort_forward for fold);
    its input Jacobian in both modes and its per-sample parameter Jacobian against float64
    central differences of our forward. Returns the parameter names."""
    import jaccli
    from jaccli.model import load

    feeds = {"x": x}
    ref, oracle = ort_forward(model, feeds, fold)
    np.testing.assert_allclose(our_forward(model, feeds, np.float32), ref, rtol=1e-5, atol=1e-5, err_msg=oracle)
    fd = fd_input_jacobian(model, feeds, "x")
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(model, feeds, mode=mode, dtype=np.float64, flat=True)
        assert rel_err(J, fd) < 1e-6, mode
    G, cols = jaccli.param_jacobian(model, feeds, params=params, dtype=np.float64)
    names = [c["name"] for c in cols]
    fdp = fd_param_jacobian(model, feeds, names, load(model).initializers)
    assert rel_err(G.reshape(fdp.shape), fdp) < 1e-6
    return names


def one_input_model(nodes, inits, x_shape, opset=13):
    """A model of float input x (N, *x_shape) and output y: `inits` a {name: array} dict or a
    list of TensorProtos."""
    if isinstance(inits, dict):
        inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def wrong_by_ten_percent(monkeypatch, fn):
    """Make the oracle's copy of jaccli's `fn` (input_jacobian or param_jacobian) 10% wrong:
    a check must then FAIL."""
    import jaccli.oracle as oracle

    real = getattr(oracle, fn)

    def wrong(*a, **k):
        res = real(*a, **k)
        res.J = res.J * 1.1
        return res

    monkeypatch.setattr(oracle, fn, wrong)


def compare_param_jacobian(G, cols, model, ref, rtol=1e-6):
    """A per-sample parameter Jacobian (N, n_out, P) with its column map, against a framework's
    (ref: param_jacobian over its parameters in its order, their param_values and param_sizes):
    each column block whose initializer holds one of the framework's parameters as it is (same
    values, same layout) is compared with that parameter's rows. A parameter whose derivative is
    zero (an attention's key bias: softmax ignores a shift of its row) must be negligible in
    both, against the whole Jacobian (a framework's rounding noise there is 1e-7 of it).
    Returns how many of the framework's parameters were compared."""
    sizes = [int(s) for s in ref["param_sizes"]]
    offsets = np.cumsum([0] + sizes)[:-1]
    whole = np.abs(ref["param_jacobian"]).max()
    compared = set()
    for c in cols:
        value = np.asarray(model.initializers[c["name"]], np.float64).ravel()
        for k, (o, s) in enumerate(zip(offsets, sizes)):
            if k in compared or s != c["size"] or not np.allclose(value, ref["param_values"][o:o + s], rtol=rtol, atol=0):
                continue
            ours, theirs = G[..., c["offset"]:c["offset"] + s], ref["param_jacobian"][..., o:o + s]
            if np.abs(theirs).max() < rtol * whole:
                assert np.abs(ours).max() < rtol * whole, c["name"]
            else:
                assert np.abs(ours - theirs).max() / np.abs(theirs).max() < rtol, c["name"]
            compared.add(k)
            break
    return len(compared)


def batch_at_once(model, x, names, at_once=True):
    """The per-sample parameter Jacobian of parameters `names`: against differences (see
    check_whole_model), taken for the whole batch at once (or, with `at_once` False, one sample
    at a time, as the summary says), and equal to runs of one sample."""
    import jaccli

    assert check_whole_model(model, x) == names
    r = jaccli.param_jacobian(model, x, dtype=np.float64, return_result=True)
    assert any("one sample at a time" in n for n in r.notes) != at_once
    one = np.concatenate([jaccli.param_jacobian(model, x[i:i + 1], dtype=np.float64)[0] for i in range(len(x))])
    np.testing.assert_allclose(r.value, one, rtol=1e-12, atol=1e-12)
