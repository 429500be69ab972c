"""Our Jacobians against central finite differences computed by onnxruntime, the independent oracle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .drivers import input_jacobian, param_jacobian, prepare_feeds
from .errors import JaccliError, ModelError
from .model import load

TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-6}


def _to_double(proto):
    """A copy of the model computing in float64 (None if that cannot be built)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return m


def _params_as_inputs(proto, names):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    existing = {v.name for v in g.input}
    for t in g.initializer:
        if t.name in names and t.name not in existing:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


class Oracle:
    """An onnxruntime session over the model, computing in `dtype` (float64 or float32)."""

    def __init__(self, proto, dtype):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.dtype = np.dtype(dtype)
        m = _to_double(proto) if self.dtype == np.float64 else proto
        self.session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def run(self, feeds, outputs):
        cast = {k: (v.astype(self.dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in feeds.items()}
        return self.session.run(outputs, cast)


def _oracle(proto, feeds, out_names, extra=None):
    """An oracle that runs on one sample: float64 where onnxruntime has the kernels, else float32."""
    probe = {k: v[:1] if v.ndim else v for k, v in feeds.items()}
    probe.update(extra or {})
    last = None
    for dtype in (np.float64, np.float32):
        try:
            o = Oracle(proto, dtype)
            o.run(probe, out_names)
            return o
        except Exception as e:
            last = e
    raise ModelError(f"onnxruntime cannot run this model: {str(last).splitlines()[0][:200]}")


def _step(dtype):
    """Relative step of the central differences: small enough in float32 to rarely cross a
    ReLU kink, large enough that rounding stays near 1e-4 of the derivative."""
    return 1e-3 if np.dtype(dtype) == np.float32 else float(np.finfo(np.float64).eps) ** (1 / 3)


def _central(evaluate, base, pick, h):
    """Central differences of evaluate (a (m, n) batch of vectors -> (m, k, n_out)) at entries `pick`.

    Returns (k, n_out, len(pick)). Each entry's step is h * max(1, |base|).
    """
    m = pick.size
    steps = h * np.maximum(1.0, np.abs(base[pick]))
    batch = np.repeat(base[None], 2 * m, axis=0)
    batch[np.arange(m), pick] += steps
    batch[m + np.arange(m), pick] -= steps
    ys = evaluate(batch)  # (2m, k, n_out)
    return ((ys[:m] - ys[m:]) / (2 * steps[:, None, None])).transpose(1, 2, 0)


def check(model_path, x, params=False, samples=3, entries=64, dtype=np.float32, seed=0, tolerance=None, of=None):
    """Compare our Jacobian with onnxruntime central differences on a few samples.

    Columns (input elements or parameter entries) are sampled when there are more than
    `entries`. An entry counts as wrong only if it disagrees with the differences at both
    step h and h/4: a kink inside one step spoils one of them, a wrong derivative both.
    Returns a JSON-ready dict with one row per checked float output.
    """
    model = load(model_path)
    dtype = np.dtype(dtype)
    proto = model_path if isinstance(model_path, onnx.ModelProto) else onnx.load(model_path)
    feeds, N = prepare_feeds(model, x, np.float64)
    k = min(samples, N)
    feeds = {n: (v[:k] if v.ndim else v) for n, v in feeds.items()}
    rng = np.random.default_rng(seed)
    outs = [v.name for v in model.outputs if v.is_float] if of is None else [of]
    rows, oracle_dtype = [], None
    for name in outs:
        if params:
            ours, fds, y_ort, oracle = _param_fd(model, proto, feeds, name, k, dtype, rng, entries)
        else:
            ours, fds, y_ort, oracle = _input_fd(model, proto, feeds, name, k, dtype, rng, entries)
        oracle_dtype = oracle.dtype
        y_ours = _forward(model, feeds, name, dtype)
        rows.append(_row(name, ours, fds, y_ours, y_ort))
    tol = tolerance if tolerance is not None else max(TOLERANCE[dtype], TOLERANCE[oracle_dtype])
    return {"kind": "parameter" if params else "input", "samples": k, "step": _step(oracle_dtype),
            "oracle_dtype": oracle_dtype.name, "tolerance": tol, "rows": rows,
            "ok": all(r["relative_error"] <= tol for r in rows)}


def _pick(n, entries, rng):
    return np.arange(n) if n <= entries else np.sort(rng.choice(n, entries, replace=False))


def _input_fd(model, proto, feeds, name, k, dtype, rng, entries):
    wrt = next(v.name for v in model.inputs if v.is_float)
    J = input_jacobian(model, feeds, wrt=wrt, of=name, dtype=dtype, flat=True)
    oracle = _oracle(proto, feeds, [name])
    x0 = feeds[wrt]
    pick = _pick(x0[0].size, entries, rng)
    h = _step(oracle.dtype)
    fds = []
    for step in (h, h / 4):
        per = []
        for i in range(k):
            def evaluate(batch, i=i):
                m = batch.shape[0]
                f = {n: np.repeat(v[i:i + 1], m, axis=0) for n, v in feeds.items() if n != wrt}
                f[wrt] = batch.reshape((m,) + x0.shape[1:])
                return _run_batched(oracle, f, name).reshape(m, 1, -1)

            per.append(_central(evaluate, x0[i].ravel(), pick, step))
        fds.append(np.concatenate(per))
    return J[:, :, pick], fds, _run_batched(oracle, feeds, name).reshape(k, -1), oracle


def _param_fd(model, proto, feeds, name, k, dtype, rng, entries):
    G, cols = param_jacobian(model, feeds, of=name, dtype=dtype)
    names = [c["name"] for c in cols]
    theta = {n: model.initializers[n] for n in names}
    oracle = _oracle(_params_as_inputs(proto, set(names)), feeds, [name], theta)
    base = np.concatenate([theta[n].astype(np.float64).ravel() for n in names])

    def evaluate(thetas):
        out = []
        for th in thetas:
            vals = {c["name"]: th[c["offset"]: c["offset"] + c["size"]].reshape(c["shape"]) for c in cols}
            out.append(oracle.run({**feeds, **vals}, [name])[0].reshape(k, -1))
        return np.asarray(out, dtype=np.float64)

    pick = _pick(base.size, entries, rng)
    h = _step(oracle.dtype)
    fds = [_central(evaluate, base, pick, step) for step in (h, h / 4)]
    y_ort = oracle.run({**feeds, **theta}, [name])[0].reshape(k, -1).astype(np.float64)
    return G.reshape(k, -1, base.size)[:, :, pick], fds, y_ort, oracle


def _run_batched(oracle, feeds, name):
    """Run the oracle on all samples at once, or one by one if the model's batch is fixed."""
    try:
        return oracle.run(feeds, [name])[0].astype(np.float64)
    except Exception:
        n = next(iter(feeds.values())).shape[0]
        parts = [oracle.run({k: v[i:i + 1] for k, v in feeds.items()}, [name])[0] for i in range(n)]
        return np.concatenate(parts).astype(np.float64)


def _forward(model, feeds, name, dtype):
    from . import walk
    from .plan import Plan

    plan = Plan(model, name, [], dtype)
    return walk.primal(plan, {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in feeds.items()})[name].reshape(next(iter(feeds.values())).shape[0], -1)


def _row(name, ours, fds, y_ours, y_ort):
    ours = np.asarray(ours, np.float64)
    err = np.minimum(*(np.abs(ours - fd) for fd in fds))
    scale = np.abs(fds[0]).max()
    return {"output": name, "max_abs_error": float(err.max()), "max_abs": float(scale),
            "relative_error": float(err.max() / scale) if scale > 0 else float(err.max()),
            "forward_error": float(np.abs(y_ours.astype(np.float64) - y_ort).max())}
