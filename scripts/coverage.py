"""Run jaccli on every test model that the onnx package ships (onnx/backend/test/data), and
report per model: operators, forward error against the stored expected outputs, input-Jacobian
error against onnxruntime central differences, and a status.

    python scripts/coverage.py [--only NAME] [--report out/coverage.md]

Statuses: pass; FAIL (an error above tolerance); unsupported (one line naming the operator);
refused (another one-line jaccli error: no float input, sequences, ...); CRASH (anything that
is not a jaccli error, which must never happen). Inputs whose axis 0 is not a sample axis (the
operator tests) are checked as one sample: the model is wrapped with a leading axis of size 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import traceback

import numpy as np
import onnx
from onnx import helper, numpy_helper

import jaccli
from jaccli.errors import DataError, JaccliError, ModelError, UnsupportedOpError

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
CATEGORIES = ("pytorch-converted", "pytorch-operator", "simple", "light")
FORWARD_RTOL, FORWARD_ATOL = 1e-3, 1e-4
MAX_OUTPUTS = 5  # output elements whose Jacobian rows are checked (--outputs 0:5)
ENTRIES = 12  # input elements sampled for the central differences


def discover():
    for cat in CATEGORIES:
        for d in sorted(glob.glob(os.path.join(DATA, cat, "*"))):
            if cat == "light":
                if d.endswith(".onnx"):
                    yield cat, os.path.basename(d)[: -len(".onnx")], d, None
            elif os.path.isfile(os.path.join(d, "model.onnx")):
                yield cat, os.path.basename(d), os.path.join(d, "model.onnx"), os.path.join(d, "test_data_set_0")


def _read_pb(path):
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def inputs_and_expected(proto, path, data_dir):
    """Graph inputs (not initializers) and the expected outputs, if stored."""
    inits = {t.name for t in proto.graph.initializer}
    real = [v for v in proto.graph.input if v.name not in inits]
    if data_dir is None:  # light models: onnx's runner feeds arange(n)/n in the declared shape
        feeds = {}
        for v in real:
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim)
            n = int(np.prod(shape))
            feeds[v.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
        out = os.path.splitext(path)[0] + "_output_0.pb"
        expected = [_read_pb(out)] if os.path.exists(out) else None
        return feeds, expected
    feeds = {}
    for i, v in enumerate(real):
        f = os.path.join(data_dir, f"input_{i}.pb")
        feeds[v.name] = _read_pb(f)
    outs = sorted(glob.glob(os.path.join(data_dir, "output_*.pb")))
    return feeds, [_read_pb(f) for f in outs] or None


def wrap_one_sample(proto):
    """The model with a new leading axis of size 1 on every input and output: the whole tensor
    becomes one sample (Unsqueeze / Squeeze in the model's own opset)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
    inits = {t.name for t in g.initializer}
    nodes = []

    def axes_node(op, src, dst):
        if opset >= 13:
            name = f"__axes_{dst}"
            g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), name))
            return helper.make_node(op, [src, name], [dst])
        return helper.make_node(op, [src], [dst], axes=[0])

    for v in g.input:
        if v.name in inits:
            continue
        inner = v.name + "__one"
        for n in g.node:
            n.input[:] = [inner if i == v.name else i for i in n.input]
        nodes.append(axes_node("Squeeze", v.name, inner))
        dims = v.type.tensor_type.shape.dim
        new = [d for d in dims]
        v.type.tensor_type.shape.ClearField("dim")
        v.type.tensor_type.shape.dim.add().dim_value = 1
        for d in new:
            v.type.tensor_type.shape.dim.add().CopyFrom(d)
    tail = []
    for o in g.output:
        inner = o.name + "__one"
        for n in g.node:
            n.output[:] = [inner if x == o.name else x for x in n.output]
            n.input[:] = [inner if x == o.name else x for x in n.input]
        tail.append(axes_node("Unsqueeze", inner, o.name))
        o.type.tensor_type.ClearField("shape")
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old + tail)
    return m


def random_weights(proto, seed=0):
    """The light models make every weight with ConstantOfShape (one value per tensor), so every
    logit is equal and the true Jacobian of their softmax output is 0. For the Jacobian check,
    the same architecture with random weights (fan-in scaled normals for tensors of rank >= 2,
    values in [0.5, 1.5] for vectors such as biases and BatchNormalization statistics), checked
    on the logits: the input of the final Softmax."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    last = m.graph.node[-1]
    if last.op_type == "Softmax" and last.output[0] == m.graph.output[0].name:
        # check the logits: random weights saturate the softmax, and a Jacobian of ~0 tests nothing
        m.graph.output[0].name = last.input[0]
        m.graph.output[0].type.tensor_type.ClearField("shape")
        del m.graph.node[-1]
    keep = []
    for n in m.graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in inits:
            shape = tuple(int(d) for d in inits[n.input[0]])
            if len(shape) >= 2:
                w = rng.standard_normal(shape) * np.sqrt(2.0 / max(1, int(np.prod(shape[1:]))))
            else:
                w = rng.uniform(0.5, 1.5, shape)
            m.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def run_one(cat, name, path, data_dir):
    row = {"category": cat, "model": name, "operators": "", "status": "", "forward_error": None,
           "jacobian_error": None, "mode": "", "seconds": 0.0, "detail": ""}
    t0 = time.perf_counter()
    try:
        proto = onnx.load(path)
        row["operators"] = " ".join(sorted({n.op_type for n in proto.graph.node}))
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        row["opset"] = opset
        try:
            feeds, expected = inputs_and_expected(proto, path, data_dir)
        except Exception as e:
            raise DataError(f"test data is not a tensor ({type(e).__name__})") from None
        model = jaccli.load(proto)
        if not model.float_inputs():
            raise DataError("no float input to differentiate")
        # forward against the stored expected outputs
        if expected is not None:
            row["forward_error"] = forward_error(proto, feeds, expected)
        # input Jacobian against onnxruntime central differences
        if cat == "light":
            row["jacobian_error"], row["mode"] = rough_jacobian_error(random_weights(proto), feeds)
        else:
            row["jacobian_error"], row["mode"] = jacobian_error(proto, feeds)
        ok_fwd = row["forward_error"] is None or row["forward_error"] <= 1.0
        ok_jac = row["jacobian_error"] is not None and row["jacobian_error"] <= 1e-3
        row["status"] = "pass" if ok_fwd and ok_jac else "FAIL"
    except UnsupportedOpError as e:
        row["status"], row["detail"] = "unsupported", str(e)
    except JaccliError as e:
        row["status"], row["detail"] = "refused", str(e)
    except Exception as e:
        row["status"], row["detail"] = "CRASH", f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def forward_error(proto, feeds, expected):
    """Worst |ours - expected| / (atol + rtol |expected|) over the outputs (<= 1 passes; see
    output_error); sequence outputs are not compared."""
    from jaccli import walk
    from jaccli.plan import Plan

    model = jaccli.load(proto)
    worst = 0.0
    with np.errstate(all="ignore"):
        for v, exp in zip(model.outputs, expected):
            got = walk.primal(Plan(model, v.name, [], np.float32), dict(feeds))[v.name]
            if not isinstance(got, list) and not isinstance(exp, list) and exp is not None:
                worst = max(worst, output_error(got, exp))
    return worst


NARROW_RTOL = {"bfloat16": 1e-2, "float16": 2e-3}  # expected outputs of narrow float types: their rounding


def output_error(got, want):
    """Largest |got - want| / (atol + rtol |want|), equal NaNs and infinities counting as equal and
    a NaN on one side only as a mismatch (inf); strings and booleans exactly equal or inf; a
    result of another size inf (one of the same size is compared in the expected shape)."""
    want, got = np.asarray(want), np.asarray(got)
    if got.size == want.size:
        got = got.reshape(want.shape)
    if want.dtype.kind in "OSUb" or got.dtype.kind in "OSU":
        return 0.0 if got.shape == want.shape and np.array_equal(got.astype(object), want.astype(object)) else np.inf
    if got.shape != want.shape:
        return np.inf
    rtol = NARROW_RTOL.get(want.dtype.name, FORWARD_RTOL)
    g, w = got.astype(np.float64), want.astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where((g == w) | (np.isnan(g) & np.isnan(w)), 0.0, np.abs(g - w) / (FORWARD_ATOL + rtol * np.abs(w)))
    return float(np.where(np.isnan(err), np.inf, err).max(initial=0.0))


def jacobian_error(proto, feeds):
    """Relative error of our input Jacobian against onnxruntime differences, and how it was run."""
    for how, m in (("batch", proto), ("whole", None)):
        if m is None:
            m = wrap_one_sample(proto)
            feeds = {k: v[None] for k, v in feeds.items()}
        try:
            model = jaccli.load(m)
            of = model.output(None).name  # the first float output (a one-line refusal if none)
            y = jaccli.input_jacobian(model, feeds, of=of, outputs=f"0:{MAX_OUTPUTS}", return_result=True)
            n_out = int(np.prod(y.out_shape))
            sel = None if n_out <= MAX_OUTPUTS else f"0:{MAX_OUTPUTS}"
            d = jaccli.check(m, feeds, samples=1, entries=ENTRIES, of=of, outputs=sel)
            e = max(r["entry_error"] for r in d["rows"])
            v = max(r["directional_error"] for r in d["rows"])
            # check's verdict: the better of the two within 1e-3, the other within 1e-2
            return max(min(e, v), max(e, v) / 10), f"{how}, {y.mode}, oracle {d['oracle_dtype']}, entries {e:.0e}, directions {v:.0e}"
        except DataError as e:
            if how == "batch" and ("sample" in str(e) or "samples" in str(e)):
                continue  # axis 0 is not a sample axis: check the whole input as one sample
            raise
        except ModelError:
            if how == "batch":
                continue  # the model fails on one sample of its axis 0 (it splits that axis): try the whole input
            raise
    raise AssertionError("unreachable")


ROUGH_TOLERANCE = 1e-2


def rough_jacobian_error(proto, feeds, directions=3):
    """For deep ReLU networks, where float32 differences cannot resolve the slope (kinks lie
    within ~1e-8 of the input along any direction, and onnxruntime has no float64 Conv):

    1. our float64 forward against onnxruntime's on this model (<= 1e-5 relative);
    2. forward mode against reverse mode: <u, J v> = <J^T u, v> in float64 for random u, v, two
       independent sets of rules (JVP and VJP) (<= 1e-9);
    3. J v against float64 differences of our forward at steps 1e-9, 1e-10, 1e-11, the best of
       them (<= 1e-2: the error falls with the step until rounding, as kinks predict).

    Returns the worst of the three, each scaled to the tolerance of 1e-3, and a description."""
    from jaccli import walk
    from jaccli.oracle import Oracle
    from jaccli.plan import Plan

    model = jaccli.load(proto)
    of = model.outputs[0].name
    k = model.float_inputs()[0].name
    x = feeds[k].astype(np.float64)
    plan = Plan(model, of, [k], np.float64)

    def f(z):
        return walk.primal(plan, {k: z})[of]

    y = f(x)
    y_ort = Oracle(proto, np.float32).run(feeds, [of])[0]
    forward = float(np.abs(y - y_ort).max() / max(np.abs(y_ort).max(), 1e-30))
    env = walk.primal(plan, {k: x})
    rng = np.random.default_rng(0)
    dot, fd_err = 0.0, 0.0
    for _ in range(directions):
        v = rng.standard_normal(x.shape)
        u = rng.standard_normal(y.shape)
        Jv = walk.jvp(plan, env, {k: v[None]})[0]
        JTu = walk.vjp(plan, env, u[None], [k])[k][0]
        lhs, rhs = float((u * Jv).sum()), float((JTu * v).sum())
        dot = max(dot, abs(lhs - rhs) / max(abs(lhs), abs(rhs), 1e-300))
        fds = [(f(x + h * v) - f(x - h * v)) / (2 * h) for h in (1e-9, 1e-10, 1e-11)]
        err = min(float(np.abs(Jv - fd).max()) for fd in fds) / max(float(np.abs(fds[0]).max()), 1e-300)
        fd_err = max(fd_err, err)
    worst = max(forward / 1e-5, dot / 1e-9, fd_err / ROUGH_TOLERANCE) * 1e-3
    how = (f"forward vs onnxruntime {forward:.0e}, <u,Jv> vs <J^T u,v> {dot:.0e}, "
           f"J v vs float64 differences {fd_err:.0e} (tol 1e-2); random weights, logits")
    return worst, how


def render(rows, path):
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"jaccli on the onnx {onnx.__version__} backend test models ({len(rows)})")
    for col in ("model", "opset", "status", "forward", "jacobian", "how", "s"):
        t.add_column(col)
    for r in rows:
        style = {"pass": "green", "FAIL": "red", "CRASH": "red bold"}.get(r["status"], "yellow")
        t.add_row(f"{r['category']}/{r['model']}", str(r.get("opset", "")), f"[{style}]{r['status']}[/{style}]",
                  "" if r["forward_error"] is None else f"{r['forward_error']:.2g}",
                  "" if r["jacobian_error"] is None else f"{r['jacobian_error']:.1e}",
                  r["mode"] or r["detail"][:90], f"{r['seconds']:.1f}")
    Console(width=160).print(t)
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(summary)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# jaccli on the onnx {onnx.__version__} backend test models\n\n{summary}\n\n")
        f.write("forward: worst |ours - expected| / (1e-4 + 1e-3 |expected|), at most 1 passes; "
                "jacobian: max |J - J_fd| / max |J_fd| on sampled entries against onnxruntime central "
                "differences, at most 1e-3 passes\n\n")
        f.write("| model | opset | status | forward | jacobian | how / why | operators |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['category']}/{r['model']} | {r.get('opset', '')} | {r['status']} | "
                    f"{_num(r['forward_error'], '.2g')} | {_num(r['jacobian_error'], '.1e')} | "
                    f"{(r['mode'] or r['detail']).replace('|', '/')} | {r['operators']} |\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    return counts


def _num(x, fmt):
    return "" if x is None else format(x, fmt)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="substring of the model names to run")
    ap.add_argument("--report", default="out/coverage.md")
    args = ap.parse_args()
    rows = [run_one(*m) for m in discover() if not args.only or args.only in m[1]]
    counts = render(rows, args.report)
    sys.exit(1 if counts.get("FAIL") or counts.get("CRASH") else 0)


if __name__ == "__main__":
    main()
