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
    return float(np.finfo(dtype).eps) ** (1 / 3)


def check(model_path, x, params=False, samples=3, entries=64, dtype=np.float32, seed=0, tolerance=None, of=None):
    """Compare our Jacobian with onnxruntime central differences on a few samples.

    Columns (input elements or parameter entries) are sampled when there are more than
    `entries`. Returns a JSON-ready dict with one row per checked output.
    """
    model = load(model_path)
    dtype = np.dtype(dtype)
    proto = onnx.load(model_path) if isinstance(model_path, str) else model_path
    feeds, N = prepare_feeds(model, x, np.float64)
    k = min(samples, N)
    feeds = {n: (v[:k] if v.ndim else v) for n, v in feeds.items()}
    rng = np.random.default_rng(seed)
    outs = [v.name for v in model.outputs if v.is_float] if of is None else [of]
    rows = []
    if params:
        names = None
        for name in outs:
            G, cols = param_jacobian(model, feeds, of=name, dtype=dtype)
            names = [c["name"] for c in cols]
            oracle = _oracle(_params_as_inputs(proto, set(names)), feeds, [name],
                             {n: model.initializers[n] for n in names})
            h = _step(oracle.dtype)
            theta = np.concatenate([model.initializers[n].astype(np.float64).ravel() for n in names])
            P = theta.size
            pick = np.arange(P) if P <= entries else np.sort(rng.choice(P, entries, replace=False))
            Gf = G.reshape(k, -1, P)

            def run_theta(th):
                vals, off = {}, 0
                for c in cols:
                    vals[c["name"]] = th[off: off + c["size"]].reshape(c["shape"])
                    off += c["size"]
                return oracle.run({**feeds, **vals}, [name])[0].reshape(k, -1).astype(np.float64)

            fd = np.empty((k, Gf.shape[1], pick.size))
            for j, p in enumerate(pick):
                step = h * max(1.0, abs(theta[p]))
                tp, tm = theta.copy(), theta.copy()
                tp[p] += step
                tm[p] -= step
                fd[:, :, j] = (run_theta(tp) - run_theta(tm)) / (2 * step)
            y_ort = run_theta(theta)
            y_ours = _forward(model, feeds, name, dtype)
            rows.append(_row(name, Gf[:, :, pick], fd, y_ours, y_ort))
    else:
        wrt = next(v.name for v in model.inputs if v.is_float)
        for name in outs:
            J = input_jacobian(model, feeds, of=name, dtype=dtype, flat=True)
            oracle = _oracle(proto, feeds, [name])
            h = _step(oracle.dtype)
            x0 = feeds[wrt].astype(np.float64)
            n_in = x0[0].size
            pick = np.arange(n_in) if n_in <= entries else np.sort(rng.choice(n_in, entries, replace=False))
            # all perturbed copies in one batch when the model's batch axis is free
            xs = np.repeat(x0.reshape(k, 1, n_in), 2 * pick.size, axis=1)
            steps = h * np.maximum(1.0, np.abs(x0.reshape(k, n_in)[:, pick]))  # (k, m)
            m = pick.size
            xs[:, np.arange(m), pick] += steps
            xs[:, m + np.arange(m), pick] -= steps
            batch = xs.reshape((k * 2 * m,) + x0.shape[1:])
            others = {n: np.repeat(v, 2 * m, axis=0) for n, v in feeds.items() if n != wrt}
            ys = _run_batched(oracle, {wrt: batch, **others}, name).reshape(k, 2 * m, -1)
            fd = (ys[:, :m] - ys[:, m:]) / (2 * steps[:, :, None])  # (k, m, n_out)
            y_ort = _run_batched(oracle, feeds, name).reshape(k, -1)
            y_ours = _forward(model, feeds, name, dtype)
            rows.append(_row(name, J[:, :, pick], fd.transpose(0, 2, 1), y_ours, y_ort))
    tol = tolerance if tolerance is not None else max(TOLERANCE[dtype], TOLERANCE[oracle.dtype])
    return {"kind": "parameter" if params else "input", "samples": k, "step": h, "oracle_dtype": oracle.dtype.name,
            "tolerance": tol, "rows": rows, "ok": all(r["relative_error"] <= tol for r in rows)}


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


def _row(name, ours, fd, y_ours, y_ort):
    ours = np.asarray(ours, np.float64)
    err = np.abs(ours - fd)
    scale = np.abs(fd).max()
    return {"output": name, "max_abs_error": float(err.max()), "max_abs": float(scale),
            "relative_error": float(err.max() / scale) if scale > 0 else float(err.max()),
            "forward_error": float(np.abs(y_ours.astype(np.float64) - y_ort).max())}
