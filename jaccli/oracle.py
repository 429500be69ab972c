"""Our Jacobians against central finite differences computed by onnxruntime, the independent oracle
(onnx's reference evaluator where onnxruntime cannot run the model)."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .drivers import (DEFAULT_MAX_MEMORY, Feeds, _copies, _first_float, _slice_samples, in_runs, input_jacobian, settle_batch,
                      param_jacobian, parse_outputs, prepare_feeds, quiet_floats, samples_first, samples_in)
from .errors import JaccliError, MemoryBudgetError
from .model import inputs_samples_first, load, reads_of_subgraphs, weights_rewritten
from .nchwc import plain

TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-6}


_HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _to_double(proto):
    """A copy of the model computing in float64 (every float type becomes double)."""
    return _widened(proto, (TensorProto.FLOAT,) + _HALF, TensorProto.DOUBLE, np.float64)


def _widened(proto, types, to, dtype):
    """A copy of the model with the float `types` (initializers, constants, inputs, outputs,
    value types, Casts) made `to`: as jaccli computes, in one float type throughout."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    for t in g.initializer:
        if t.data_type in types:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type in types:
            v.type.tensor_type.elem_type = to
    for n in g.node:
        for a in n.attribute:
            if n.op_type in ("Cast", "EyeLike", "RandomNormal", "RandomUniform") and a.name in ("to", "dtype") and a.i in types:
                a.i = to
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in types:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(dtype), a.t.name))
    return m


def _with_output(proto, name):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


def _with_appended(proto, name, appended):
    """The model with the node (and initializers) that made value `name` samples first (see
    drivers.samples_first), and that value an output: the oracle's output is then laid out
    as ours."""
    node, inits = appended
    m = _with_output(proto, name)
    for v in list(m.graph.output) + list(m.graph.value_info):  # a declared shape can be wrong (a rank short), which a
        if v.name == node.input[0] and v.type.HasField("tensor_type"):  # Transpose's type inference then refuses
            v.type.tensor_type.ClearField("shape")
    m.graph.node.append(node)
    m.graph.initializer.extend(inits)
    if not any(o.domain in ("", "ai.onnx") for o in m.opset_import):
        m.opset_import.append(onnx.helper.make_opsetid("", 1))
    return m


def _cut_at(proto, value, outputs):
    """The model with graph value `value` made an input of its own, for the differences of an
    input Jacobian of `outputs` with respect to it (--wrt): its producer no longer writes it,
    and nodes that only served the outputs through it are left out, as are the other outputs.
    The other inputs stay, for what the outputs read of them past `value` (an attention mask
    from the token ids)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    for node in g.node:
        for k, o in enumerate(node.output):
            if o == value:
                node.output[k] = ""  # an output left unnamed: not computed, or computed and dropped
    needed, keep = set(outputs), []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(reads_of_subgraphs(node))
    kept = [onnx.NodeProto() for _ in keep]
    for dst, src in zip(kept, reversed(keep)):
        dst.CopyFrom(src)
    del g.node[:]
    g.node.extend(kept)
    outs = [o for o in g.output if o.name in outputs]  # the others may have lost their producers
    del g.output[:]
    g.output.extend(outs)
    elem = next((v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) if v.name == value),
                TensorProto.FLOAT)
    g.input.append(onnx.helper.make_tensor_value_info(value, elem, None))
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


_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


class _Runner:
    """What both oracles share: the model in the oracle's float type, and runs on feeds cast to
    each input's declared float type (a double model stays double)."""

    types: dict
    batch = None  # the model's declared batch where it is fixed: runs take exactly that many samples
    why = None  # why a lesser oracle stands in (see Ours)
    note = None  # what the report says of how this oracle ran the model
    point_bytes = 0.0  # the memory numpy held for one sample's run when the oracle was chosen (see _points_per_run)

    @staticmethod
    def _model(proto, dtype):
        return _to_double(proto) if dtype == np.float64 else _widened(proto, _HALF, TensorProto.FLOAT, np.float32)

    def run(self, feeds, outputs):
        cast = {}
        for k, v in feeds.items():
            want = self.types.get(k)
            cast[k] = v.astype(want) if want is not None and np.issubdtype(v.dtype, np.floating) else v
        return self._run(outputs, cast)


class Oracle(_Runner):
    """An onnxruntime session over the model, computing in `dtype` (float64 or float32)."""

    name = "onnxruntime"

    def __init__(self, proto, dtype):
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # a kernel's refusal is reported in one line, by _oracle
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        # basic optimizations only (constant folding, redundant nodes): the extended ones fuse
        # operators into kernels that compute another function, as a dequantized weight's MatMul
        # that quantizes the activations too, or (onnxruntime 1.32) a Transpose into a MatMul
        # by a vector with a wrong result
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.dtype = np.dtype(dtype)
        self.session = ort.InferenceSession(self._model(proto, self.dtype).SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        inputs = list(self.session.get_inputs()) + list(self.session.get_overridable_initializers())
        self.types = {i.name: _ORT_FLOATS.get(i.type) for i in inputs}

    def _run(self, outputs, feeds):
        return self.session.run(outputs, feeds)


class AttributeOracle(Oracle):
    """onnxruntime on a model whose parameters include coefficients that the model it runs holds
    as attributes (ai.onnx.ml's linear models, SVR and tree ensembles; model.attribute_params):
    a run sets them from the values fed, in a copy of the model, a session per set of values
    (in float32, as onnxruntime computes those operators)."""

    def __init__(self, proto, moved):
        super().__init__(proto, np.float32)  # a session at the model's own values: its input types
        self.proto, self.moved, self.sessions = proto, moved, {}

    def _run(self, outputs, feeds):
        vals = {k: np.asarray(feeds.pop(k), np.float32).ravel() for k in list(feeds) if k in self.moved}
        key = tuple((k, v.tobytes()) for k, v in sorted(vals.items()))
        if key not in self.sessions:
            if len(self.sessions) > 64:
                self.sessions.clear()
            m = onnx.ModelProto()
            m.CopyFrom(self.proto)
            at = {}
            for k, v in vals.items():
                out, attr = self.moved[k]
                at.setdefault(out, {})[attr] = v
            for n in m.graph.node:
                for attr, v in at.get(n.output[0] if n.output else None, {}).items():
                    _set_attribute(n, attr, [float(e) for e in v])
            self.sessions[key] = Oracle(m, np.float32).session
        return self.sessions[key].run(outputs, feeds)


def _attribute_oracle(proto, moved, model):
    """An AttributeOracle on the model, or on it with its StringNormalizers in the C.UTF-8 locale
    (a text pipeline's logistic regression); else jaccli's own forward, saying why."""
    last = None
    for m, note in ((proto, None), (c_locale(proto), LocaleOracle.note)):
        if m is None:
            continue
        try:
            o = AttributeOracle(m, moved)
        except Exception as e:
            last = e
            continue
        o.note = note
        return o
    o = _own(proto, model)
    o.why = f"onnxruntime cannot run this model ({_first_line(last)})"
    return o


class LocaleOracle(Oracle):
    """onnxruntime on the model with its StringNormalizers in the C.UTF-8 locale (c_locale)."""

    note = ("onnxruntime ran the model with its StringNormalizers' case mapping in the C.UTF-8 locale: the one "
            "they name (en_US.UTF-8 by default) is not installed here")


class Reference(_Runner):
    """onnx's reference evaluator, with Oracle's interface: for models that onnxruntime cannot
    run, or runs in float32 only (see _oracle)."""

    name = "the onnx reference evaluator"
    budget = DEFAULT_MAX_MEMORY  # bytes a run may add to the process: its numpy kernels can take far more

    def __init__(self, proto, dtype):
        from onnx.reference import ReferenceEvaluator

        self.dtype = np.dtype(dtype)
        m = self._model(proto, self.dtype)
        self.evaluator = ReferenceEvaluator(m, new_ops=_exact_reference_ops())
        self.types = {v.name: _ONNX_FLOATS.get(v.type.tensor_type.elem_type) for v in m.graph.input}

    def _run(self, outputs, feeds):
        with _memory_cap(self.budget):
            return self.evaluator.run(outputs, feeds)


class Ours(_Runner):
    """jaccli's own forward in float64, the last resort for a model that neither onnxruntime
    nor onnx's reference evaluator can run (an old export's ConstantFill): its differences
    check the derivative rules against the forward kernels, not the kernels themselves."""

    name = "jaccli's own forward"
    types: dict = {}

    def __init__(self, proto, dtype):
        self.dtype = np.dtype(np.float64)
        self.model = load(proto)

    def _run(self, outputs, feeds):
        params = {k: v for k, v in feeds.items() if k in self.model.initializers}  # the oracle's inputs for parameters
        inputs = {k: v for k, v in feeds.items() if k not in params}
        return [_forward(self.model, inputs, o, np.float64, params, flat=False) for o in outputs]


def _exact_reference_ops():
    """Kernels of the reference evaluator that round to float32 whatever the input type: Erf
    (math.erf, cast to float32) and GridSample (its pixel coordinates). Their float64 differences
    are float32 rounding over the step; a GELU network's check FAILed on a correct Jacobian."""
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_grid_sample import GridSample as _GridSample

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x):
            return (np.vectorize(math.erf, otypes=[x.dtype])(x) if x.size else x.copy(),)

    class GridSample(_GridSample):
        op_domain = ""

        def _gs_denormalize_coordinates(self, n, dims, align_corners: bool):
            return np.array([self._gs_denormalize(n=v, length=d, align_corners=align_corners) for v, d in zip(n, dims)],
                            np.float64)

    return [Erf, GridSample]


_ONNX_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}


def upgraded(proto, feeds, opset=11):
    """The model converted to `opset` by onnx's version converter, for opsets onnxruntime has no
    kernels for (input dimensions pinned to the data, as the converter needs)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for v in m.graph.input:
        if v.name in feeds:
            for d, n in zip(v.type.tensor_type.shape.dim, np.shape(feeds[v.name])):
                d.Clear()
                d.dim_value = n
    up = onnx.version_converter.convert_version(m, opset)
    del up.graph.value_info[:]  # the converter leaves untyped entries that onnxruntime rejects
    _channel_slopes(up)
    return up


def c_locale(proto):
    """The model with every StringNormalizer's case mapping in the C.UTF-8 locale, which every
    glibc has; None if it has none. onnxruntime builds the node's locale, en_US.UTF-8 unless it
    names another, and refuses the whole model where that locale is not installed (a Debian
    image has C.UTF-8 alone); C.UTF-8 maps case by Unicode's simple mappings too."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    nodes = [n for n in m.graph.node if n.op_type == "StringNormalizer" and n.domain in ("", "ai.onnx")]
    for n in nodes:
        _set_attribute(n, "locale", "C.UTF-8")
    return m if nodes else None


def _set_attribute(node, name, value):
    """Give a NodeProto's attribute `name` the value, in place of the one it had, if any."""
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute(name, value)])


def _channel_slopes(m):
    """The converter keeps an opset-6 PRelu slope of shape (C,), which then broadcasts along the
    last axis; the old semantics put it on the channel axis 1: reshape it to (C, 1, ..., 1)."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in list(onnx.shape_inference.infer_shapes(m).graph.value_info) + list(m.graph.input)}
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "PRelu" and n.input[1] in inits and ranks.get(n.input[0], 0) > 2:
            t = inits[n.input[1]]
            if len(t.dims) == 1 and t.dims[0] > 1:
                a = numpy_helper.to_array(t).reshape((-1,) + (1,) * (ranks[n.input[0]] - 2))
                t.CopyFrom(numpy_helper.from_array(a, t.name))
                for v in m.graph.input:  # old exports list initializers among the inputs too
                    if v.name == t.name:
                        v.type.tensor_type.shape.ClearField("dim")
                        for d in a.shape:
                            v.type.tensor_type.shape.dim.add().dim_value = d


def _oracle(proto, feeds, out_names, extra=None, model=None, budget=DEFAULT_MAX_MEMORY):
    """An oracle that runs on one sample, the most precise that can: onnxruntime in float64
    where it has the kernels (on the model, then on it upgraded to a newer opset), else onnx's
    reference evaluator in float64 if it runs one sample within REFERENCE_SECONDS, else
    onnxruntime in float32, else the reference evaluator in float32. Differences of a float32
    forward cannot resolve small derivatives of a deep network (onnxruntime has no float64
    Conv); the reference evaluator's float64 can, where it is fast enough.

    A float64 oracle counts as float64 only if, at a slightly jittered sample, its output agrees
    with our float64 forward of `model` to 1e-9: some onnxruntime kernels accept doubles but
    compute in float, which exact test values (integers) would hide. An oracle whose output has
    another shape than ours is no oracle: the reference evaluator sizes a Resize by scales of
    float32(7/6) as floor(6 * 7/6) in float64, 6, where onnxruntime and jaccli take 7 (a
    bicubic tf.image.resize through tf2onnx, in float64, which onnxruntime does not run).
    """
    import time

    batch = model.fixed_batch()[1] if model is not None else None  # onnxruntime holds a model to its declared batch
    probe = _copies(feeds, 0, batch or 1)
    rng = np.random.default_rng(1)
    jitter = {k: (v * (1 + 1e-3 * rng.standard_normal(v.shape)) if np.issubdtype(v.dtype, np.floating) else v)
              for k, v in probe.items()}
    reference = None if model is None else _forward(model, jitter, out_names[0], np.float64, extra)
    probe.update(extra or {})
    last = None
    candidates = _as_needed(_candidates(proto, feeds))  # upgrading a model takes time: only if reached
    for dtype in (np.float64, np.float32):
        for m, kind in candidates():
            try:
                o = kind(m, dtype)
                if kind is Reference:  # its runs may add no more than the budget to the process (see _memory_cap)
                    o.budget = budget
                t0 = time.perf_counter()
                o.run(probe, out_names)
                slow = kind is Reference and dtype == np.float64 and time.perf_counter() - t0 > REFERENCE_SECONDS
                y, peak = _peak_bytes(lambda: o.run({**jitter, **(extra or {})}, out_names)[0])
                o.point_bytes = peak / (batch or 1)
            except Exception as e:
                last = e
                continue
            if reference is not None and np.size(y) != np.size(reference):  # another function: its differences cannot judge ours
                last = ValueError(f"{o.name} gives output '{out_names[0]}' {np.size(y) // len(reference)} values a sample, "
                                  f"jaccli {np.size(reference) // len(reference)}")
                continue
            if slow:
                continue  # float32 differences, faster
            if dtype == np.float64 and reference is not None and not _agrees(y, reference, 1e-9):
                continue  # not truly double precision: use a float32 oracle with float32 steps
            o.batch = batch
            return o
    o = Ours(proto, np.float64)  # no independent oracle: the derivatives can still be checked against our forward
    o.run(probe, out_names)
    o.batch, o.why = batch, f"neither onnxruntime nor onnx's reference evaluator can run this model ({_first_line(last)})"
    return o


def _first_line(e):
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


REFERENCE_SECONDS = 0.05  # one sample through the reference evaluator: a check makes some hundreds


def _agrees(a, b, rtol):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    fin = np.isfinite(b)
    scale = max(float(np.abs(b[fin]).max()) if fin.any() else 0.0, 1e-300)
    return a.shape == b.shape and bool(np.all(np.isfinite(a) == fin)) and float(np.abs(a[fin] - b[fin]).max(initial=0)) <= rtol * scale


def _as_needed(items):
    """A function giving the iterator's items again on every call, each produced once, when
    first reached."""
    seen = []

    def each():
        yield from list(seen)
        for item in items:
            seen.append(item)
            yield item

    return each


def _candidates(proto, feeds):
    """(model, oracle class), each built only if asked for: onnxruntime on the model as it is,
    then with its StringNormalizers in the C.UTF-8 locale (c_locale), then on it upgraded to
    opset 11; onnx's reference evaluator on the model as it is, then on it upgraded to opset 18
    (the evaluator's BatchNormalization of opsets 9 to 13 is wrong in onnx 1.23: the float64
    agreement test rejects it, the upgraded model passes)."""
    yield proto, Oracle
    relocaled = c_locale(proto)
    if relocaled is not None:  # a text model, refused for a locale this machine lacks
        yield relocaled, LocaleOracle
    for kind, opset in ((Oracle, 11), (Reference, None), (Reference, 18)):
        try:
            yield (proto if opset is None else upgraded(proto, feeds, opset)), kind
        except Exception:
            pass


DIRECTIONS = 3  # random dense directions checked besides the sampled entries


def _steps(dtype):
    """Steps of the central differences, relative to the perturbed values: a wide range, since
    kinks want small steps and the rounding of deep float32 models wants large ones."""
    h = 1e-3 if np.dtype(dtype) == np.float32 else float(np.finfo(np.float64).eps) ** (1 / 3)
    return (4 * h, h, h / 4)


class _Directions:
    """The rows of perturbation: a unit vector per sampled entry (scaled by max(1, |value|)), then
    DIRECTIONS random dense directions scaled by the rms of the values (all of them move at
    once, so each by a step relative to the typical size). Held as the entries and the dense
    rows, never as a matrix: a model's millions of parameters times some dozens of rows would
    not fit in memory."""

    def __init__(self, base, pick, rng):
        self.pick, self.scale = pick, np.maximum(1.0, np.abs(base[pick]))
        rms = float(np.sqrt(np.mean(base * base))) if base.size else 0.0
        self.V = rng.standard_normal((DIRECTIONS, base.size)) * (rms if rms > 0 else 1.0)

    def __len__(self):
        return self.pick.size + DIRECTIONS

    def points(self, base, h):
        """base + h D_j for every row j, then base - h D_j: one vector at a time."""
        for sign in (h, -h):
            for j, s in zip(self.pick, self.scale):
                x = base.copy()
                x[j] += sign * s
                yield x
            for v in self.V:
                yield base + sign * v

    def of(self, J, block=1 << 20):
        """J D^T in float64 for J (..., n) in any float type: the sampled columns scaled, then the
        dense rows' products, a block of columns at a time (no float64 copy of a large J)."""
        lead, n = J.shape[:-1], J.shape[-1]
        dense = np.zeros(lead + (DIRECTIONS,))
        for a in range(0, n, block):
            Jb, Vb = J[..., a:a + block].astype(np.float64), self.V[:, a:a + block]
            Jb[..., ~Vb.any(axis=0)] = 0  # columns the directions leave be (a kink's): even a NaN there moves nothing
            dense += Jb @ Vb.T
        return np.concatenate([J[..., self.pick].astype(np.float64) * self.scale, dense], axis=-1)


class _Look(NamedTuple):
    """What a look at a Jacobian against differences gathered (see _input_fd, _param_fd)."""

    ours: np.ndarray  # J D^T: (k, n_out, sampled entries + directions)
    fds: list  # the central differences at each step, the same shape
    evens: list  # the perturbed points' mean outputs less the unperturbed ones, at each step (see _symmetric_jumps)
    n_entries: int
    y: np.ndarray  # the oracle's outputs (k, n_out)
    oracle: object
    J: np.ndarray
    branch: tuple | None = None  # (a mask like ours: columns that move a tie, not judged; the comparisons)


def _central(evaluate, base, D, h):
    """(evaluate(base + h D_j) - evaluate(base - h D_j)) / 2h for every row D_j: (k, n_out, rows);
    and the two points' mean (see _symmetric_jumps). evaluate maps the 2m perturbed vectors (an
    iterator) to (2m, k, n_out)."""
    m = len(D)
    ys = evaluate(D.points(base, h))
    return ((ys[:m] - ys[m:]) / (2 * h)).transpose(1, 2, 0), ((ys[:m] + ys[m:]) / 2).transpose(1, 2, 0)


def _max_abs(J, minus=None, block=1 << 18):
    """max |J - minus| over axis 1 (the output rows) for J (k, rows, n), NaN taken as 0: (k, n),
    a block of columns at a time (no copy of a large J)."""
    out = np.zeros((J.shape[0], J.shape[-1]))
    for a in range(0, J.shape[-1], block):
        part = J[..., a:a + block] if minus is None else J[..., a:a + block] - minus[..., a:a + block]
        out[:, a:a + block] = np.nan_to_num(np.fmax(np.fmax.reduce(part, axis=1), -np.fmin.reduce(part, axis=1)))
    return out


@quiet_floats
def check(model_path, x, params=False, samples=3, entries=64, dtype=np.float32, seed=0, tolerance=None, of=None,
          outputs=None, wrt=None, sample_axes=None, one_by_one=False, max_memory=DEFAULT_MAX_MEMORY):
    """Compare our Jacobian with onnxruntime central differences on a few samples.

    Columns (input elements or parameter entries) are sampled when there are more than
    `entries`, and the column of our largest entry is always among them; DIRECTIONS random
    dense directions are checked too (J v). A column counts as wrong only if it disagrees with
    the differences at every one of three steps.
    `outputs` (a slice of the flattened per-sample output) restricts the check to those
    elements. `wrt` names the input, or float graph value (token embeddings), of the input
    Jacobian; a graph value is made an input of the oracle's model for its differences.
    Returns a JSON-ready dict with one row per checked float output.
    """
    model = load(model_path, sample_axes=sample_axes, one_by_one=one_by_one)
    dtype = np.dtype(dtype)
    proto = model_path if isinstance(model_path, onnx.ModelProto) else onnx.load(model_path)
    blocked = proto
    proto = plain(proto)  # onnxruntime's NCHWc operators as standard ones: in float64, fed plain weights (model.nchwc)
    proto = weights_rewritten(proto)[0]  # the weights as load made them: parameters the oracle can be fed,
    proto = inputs_samples_first(proto, model.sample_axes)  # and the inputs samples first
    outs = ([v.name for v in model.outputs if v.is_float] if of is None else []) or [model.output(of).name]
    outs, skipped = _checkable(model, outs, params, wrt) if of is None else (outs, [])
    for name in outs:
        if name not in {o.name for o in proto.graph.output}:
            proto = _with_output(proto, name)  # an intermediate value: let onnxruntime return it too
    feeds, N = prepare_feeds(model, x, np.float64, of=outs + ([] if params else [wrt or _first_float(model, outs[0]).name]))
    settle_batch(model, feeds, outs, dtype)  # a batch the graph bakes in: the few samples checked run padded to it
    k = min(samples, N)
    feeds = Feeds({n: (v[:k] if v.ndim else v) for n, v in feeds.items()})
    inner = {}  # output -> the value differentiated: itself, or itself with the samples moved first
    for name in outs:
        inner[name] = samples_first(model, name, feeds, dtype)[0]
        if inner[name] != name:
            proto = _with_appended(proto, inner[name], model.appended[inner[name]])
    rng = np.random.default_rng(seed)
    rows, jacobians, oracle_dtype, oracle_name, oracle_why, oracle_note = [], {}, None, None, None, None
    spec = {}  # output -> the output elements checked (a slice), None for all
    for name in outs:
        v = inner[name]
        y_ours = _forward(model, feeds, v, dtype)
        spec[name] = outputs if outputs is not None else _spread(y_ours.shape[1])
        if params:
            look = _param_fd(model, proto, feeds, v, k, dtype, rng, entries, spec[name], max_memory=max_memory)
        else:
            look = _input_fd(model, proto, feeds, v, k, dtype, rng, entries, spec[name], wrt, max_memory=max_memory)
        y_ort, oracle, jacobians[name] = look.y, look.oracle, look.J
        oracle_dtype, oracle_name, oracle_why, oracle_note = oracle.dtype, oracle.name, oracle.why, oracle.note
        steps = _steps(oracle.dtype)
        rows.append(_row(name, look, y_ours, _noise(y_ort, oracle.dtype), ratio=steps[0] / steps[1],
                         rounding=_rounding(y_ort, oracle.dtype)))
        rows[-1]["forward_floor"] = FORWARD_ULPS * float(np.finfo(oracle.dtype).eps)
        quantizers, reaches = _quantization(model, v, params, wrt, dtype)
        if quantizers and not reaches:
            rows[-1]["quantized_zero"] = quantizers
        if outputs is None and spec[name] is not None:
            rows[-1]["rows"] = {"slice": spec[name], "checked": int(parse_outputs(spec[name], y_ours.shape[1]).size),
                                "of": int(y_ours.shape[1])}
    if model.nchwc:  # the rewrite itself against onnxruntime's NCHWc kernels
        _blocked_forward(blocked, model, feeds, rows, inner, dtype)
    tol = tolerance if tolerance is not None else max(TOLERANCE[dtype], TOLERANCE[oracle_dtype])
    for row in rows:
        if (oracle_name != Ours.name and verdict(row, tol) != "pass" and (row["entries_judged"] or row["directions_judged"])
                and not row.get("quantized_zero")):  # its differences would cross the same jumps
            try:
                row["own"] = _own_look(model, proto, feeds, inner[row["output"]], k, jacobians[row["output"]], seed,
                                       min(entries, OWN_ENTRIES), spec[row["output"]], wrt, params, tol, max_memory)
            except MemoryBudgetError as e:  # its float64 Jacobian twice the first look's: the first look's verdict stands
                row["own_skipped"] = str(e)
    d = {"kind": "parameter" if params else "input", "samples": k, "dtype": dtype.name, "step": _steps(oracle_dtype)[1],
         "oracle": oracle_name, "oracle_dtype": oracle_dtype.name, "tolerance": tol, "rows": rows,
         "ok": all(verdict(r, tol) != "FAIL" for r in rows)}
    if skipped:
        d["skipped"] = skipped
    if oracle_why:
        d["oracle_note"] = f"{oracle_why}: the differences are of jaccli's own float64 forward, which checks the " \
                           f"derivative rules against the forward kernels, not the kernels themselves"
    elif oracle_note:
        d["oracle_note"] = oracle_note
    return d


CHECK_ROWS = 64  # output elements (Jacobian rows) checked by default, evenly spread: a Jacobian's cost grows with them


def _spread(n_out, rows=CHECK_ROWS):
    """The slice of every n-th output element that checks at most `rows` of n_out (None: all)."""
    return None if n_out <= rows else f"::{-(-n_out // rows)}"


def _blocked_forward(blocked, model, feeds, rows, inner, dtype):
    """A model saved in onnxruntime's NCHWc layout is checked as the standard operators jaccli reads
    it as (see jaccli.nchwc); its outputs are compared with onnxruntime's NCHWc kernels (float32)
    too, and each row's forward error is the larger of the two."""
    proto = inputs_samples_first(weights_rewritten(blocked)[0], model.sample_axes)
    names = [r["output"] for r in rows if inner[r["output"]] == r["output"]]
    for name in names:
        if name not in {o.name for o in proto.graph.output}:
            proto = _with_output(proto, name)
    ys = Oracle(proto, np.float32).run(dict(feeds), names)
    for name, y in zip(names, ys):
        row = next(r for r in rows if r["output"] == name)
        ours = _forward(model, feeds, name, dtype).astype(np.float64)
        err = float(np.nanmax(np.abs(ours - np.reshape(y, ours.shape)), initial=0.0))
        row["forward_error"] = max(row["forward_error"], err)


FINE = (1e-6, 1e-7, 1e-8)  # steps of the second look: float64, past most kinks, above its rounding
OWN_ENTRIES = 16  # sampled entries of the second look (and the largest, and the directions): jaccli's numpy
# forward in float64 is slower than onnxruntime's, and a wrong rule is off in most columns


def _own(proto, model):
    o = Ours(proto, np.float64)
    o.batch = model.fixed_batch()[1]
    return o


def _checkable(model, outs, params, wrt):
    """Of every float output, those whose Jacobian there is to check, and a line for each of the
    others, in the outputs' order: one that is the same for every sample (made of weights
    alone), and one of no parameter or that the input differentiated does not reach (a
    recurrent model's state, an output of another input). None left: all of them, for the
    drivers to say why."""
    varying = [n for n in outs if model.inputs_of([n])]
    if not varying:
        return outs, []
    w = None if params else wrt or _first_float(model, varying[0]).name
    why = {n: "depends on no model input, the same for every sample" for n in outs if n not in varying}
    for n in varying:
        if params and not model.parameters(n):
            why[n] = "depends on no float parameter"
        elif not params and n != w and not any(w in node.inputs for node in model.ancestors([n])):
            why[n] = f"does not depend on '{w}'"
    keep = [n for n in outs if n not in why]
    return (keep, [f"output '{n}' {why[n]}: not checked" for n in outs if n in why]) if keep else (outs, [])


def _quantization(model, name, params, wrt, dtype):
    """The quantizing operators between what is differentiated and output `name` ('' for
    none), and whether a derivative reaches the output past them."""
    from .plan import Plan

    plan = Plan(model, name, model.parameters(name) if params else [wrt or _first_float(model, name).name], dtype)
    return plan.quantizer_ops, name in plan.active


def _own_look(model, proto, feeds, name, k, J, seed, entries, outputs, wrt, params, tol, max_memory=DEFAULT_MAX_MEMORY):
    """Where the oracle does not pass a row, a second look: our Jacobian in float64, on columns
    and directions drawn as for the first, against differences of jaccli's own forward in
    float64 at FINE steps, small enough to pass most kinks that the oracle's steps cross. It
    checks the derivative rules against the forward kernels, which the row's forward_error
    checks against the oracle's forward. Apart from it, `precision`: how far the first look's
    Jacobian J (in the dtype asked for) is from the float64 one, relative to its largest entry
    (float32 rounding in a badly scaled model, or a rule that loses precision in float32)."""
    rng = np.random.default_rng(seed)
    fd = _param_fd if params else functools.partial(_input_fd, wrt=wrt)
    look = fd(model, proto, feeds, name, k, np.float64, rng, entries, outputs, own=True, max_memory=max_memory)
    y, J64 = look.y, look.J
    row = _row(name, look, y, _noise(y, np.float64), ratio=FINE[0] / FINE[1], rounding=_rounding(y, np.float64))
    keys = ("entry_error", "directional_error", "max_abs_error", "max_abs_direction_error", "entries_judged", "directions_judged")
    precision = _max_abs(J.reshape(J64.shape), J64).max(initial=0.0) / max(float(_max_abs(J64).max(initial=0.0)), 1e-300)
    return {"verdict": verdict(row, tol), "steps": list(FINE), "precision": precision, **{key: row[key] for key in keys}}


def _noise(y, dtype, ulps=4):
    """What the oracle's own rounding can put into a difference at the largest step: a few units
    in the last place of the largest output, over the step. A float32 oracle on an output of
    order 1 cannot resolve derivatives much below 1e-4."""
    return _rounding(y, dtype, ulps) / _steps(dtype)[0]


def _rounding(y, dtype, ulps=4):
    """A few units in the last place of the largest output: what rounding can put into an output."""
    y = np.abs(np.asarray(y, np.float64))
    return ulps * float(np.finfo(dtype).eps) * float(y[np.isfinite(y)].max(initial=0.0))


def _jumps(fds, noise, ratio=4.0):
    """Where the model jumps at the point (a Cast to an integer, a one-hot category, a threshold
    met exactly, a quantization's level): differences that grow as 1 / step, by about `ratio`
    (of each step to the next: 4 for the oracle's, 10 for the second look's) from each step to
    the next, with one sign, and above the oracle's rounding. The derivative there does not
    exist, and such columns are not judged. A smooth function's differences agree across steps,
    a kink's stay bounded."""
    a = [np.abs(f) for f in fds]  # steps from the largest
    with np.errstate(divide="ignore", invalid="ignore"):
        r1, r2 = a[1] / a[0], a[2] / a[1]
    lo, hi = 0.75 * ratio, 1.33 * ratio
    one_sign = (np.sign(fds[0]) == np.sign(fds[1])) & (np.sign(fds[1]) == np.sign(fds[2]))
    return one_sign & (a[0] > 4 * noise) & (r1 > lo) & (r1 < hi) & (r2 > lo) & (r2 < hi)


def _symmetric_jumps(evens, rounding, ratio=4.0):
    """Where the model jumps at the point the same way on both sides, which central differences
    do not see: a step function of the input that the point sits on (Keras's Masking of an
    all-zero time step: any move off zero unmasks it). The mean of the two perturbed outputs
    less the unperturbed one (`evens`, per step) stays the same size from each step to the next
    (within the square root of their `ratio`), above rounding, with one sign; a smooth
    function's shrinks as the step squared, a kink's as the step."""
    a = [np.abs(e) for e in evens]
    lo, hi = ratio ** -0.5, ratio ** 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        flat = [(a[s + 1] / a[s] > lo) & (a[s + 1] / a[s] < hi) for s in range(len(a) - 1)]
    one_sign = np.logical_and.reduce([np.sign(e) == np.sign(evens[0]) for e in evens[1:]])
    return one_sign & np.logical_and.reduce([x > 4 * rounding for x in a]) & np.logical_and.reduce(flat)


def _passes(row, tol):
    """The better conditioned of the two checks (sampled entries, random directions) within the
    tolerance, the other within ten times it. In float32, entries suffer rounding in deep models
    and directions suffer ReLU kinks (every value moves at once); a wrong rule fails both by far.
    A check left with nothing to judge (every direction crosses a jump of the model) drops out,
    and the other must then be within the tolerance itself."""
    judged = [err for err, ok in ((row["entry_error"], row.get("entries_judged", True)),
                                  (row["directional_error"], row.get("directions_judged", True))) if ok]
    if len(judged) == 1:
        return judged[0] <= tol
    return bool(judged) and min(judged) <= tol and max(judged) <= 10 * tol


def verdict(row, tol):
    """The row's verdict against the oracle (see _verdict), weighed with the second look
    (row["own"], see _own_look) where there is one: a second look that FAILs is a FAIL; one
    that passes makes the oracle's FAIL unclear where the forward passes agree and our
    Jacobian in the dtype asked for is within the tolerance of our float64 one, as the
    oracle's steps then crossed kinks or rounded (a float32 oracle on a deep ReLU network, its
    random directions moving every parameter at once). The forward passes agree within the
    tolerance of the output's largest value, or within a few units in the last place of 1
    (row["forward_floor"]): onnxruntime's float32 Sigmoid is exact to about 1e-7 absolute,
    coarse on a detector's map of probabilities near 0 (PP-OCRv6's text detector: outputs up
    to 3.5e-4, onnxruntime's 1.3e-7 from the onnx reference evaluator's in float64, jaccli's
    9e-11; PP-OCRv5's: 1.1e-7 on outputs of 1e-4)."""
    v = _verdict(row, tol)
    own = row.get("own")
    if own is None or v == "pass" or row.get("quantized_zero"):
        return v
    if own["verdict"] == "FAIL":
        return "FAIL"
    if (v == "FAIL" and own["verdict"] == "pass" and own.get("precision", np.inf) <= tol
            and row["forward_error"] < max(tol * row.get("forward_scale", 0.0), row.get("forward_floor", 0.0))):
        return "unclear"
    return v


def _verdict(row, tol):
    """pass, FAIL, or unclear: not within the tolerance, but every difference from ours is within
    what the oracle resolves, so it cannot tell: within its own rounding (row["noise"]; a
    saturated classifier's probabilities checked in float32, or a tolerance below what its
    precision resolves), or within twice how far its own differences at its three steps are
    apart for most columns (row["entry_spread"], row["direction_spread"]; a float32 oracle on a
    deep ReLU network, where the steps cross kinks). A wrong rule is off by more than that: on
    torchvision and timm CNNs checked in float32, a Jacobian 10% off is 2-14 times that
    spread, a correct one 0.2-1.9 times. And unclear where every path to the output passes a
    quantization (row["quantized_zero"]): the Jacobian is zero by construction, where it exists,
    and differences can only cross the levels' jumps (a TFLite int8 LSTM through tf2onnx: 158
    QuantizeLinear nodes, whose levels random directions cross at every step, even at 1e-8)."""
    if _passes(row, tol):
        return "pass"
    if not (row.get("entries_judged", True) or row.get("directions_judged", True)):
        return "unclear"  # every difference crossed a jump
    if row.get("quantized_zero"):
        return "unclear"  # zero by construction: the differences can only cross the levels' jumps
    noise = row.get("noise", 0.0)
    if (row["max_abs_error"] <= max(noise, SPREAD * row.get("entry_spread", 0.0))
            and row.get("max_abs_direction_error", np.inf) <= max(noise, SPREAD * row.get("direction_spread", 0.0))):
        return "unclear"
    return "FAIL"


FORWARD_ULPS = 4  # the oracle's forward error allowed, in units in the last place of 1 (see verdict)
SPREAD = 2.0  # errors within this many times the oracle's step-to-step spread are beyond what it resolves


def _resolution(spread, q=0.9):
    """How far apart the oracle's differences at its three steps are for most columns (their
    90th percentile): what it resolves. A float32 oracle on a deep ReLU network has both
    rounding and kinks crossed inside a step; its differences then disagree with each other
    by more than its rounding alone would say."""
    spread = spread[np.isfinite(spread)]
    return float(np.quantile(spread, q)) if spread.size else 0.0


def _pick(n, entries, rng):
    return np.arange(n) if n <= entries else np.sort(rng.choice(n, entries, replace=False))


def _with_largest(pick, J):
    """The sampled columns plus, for each sample, the column of our largest entry: it is then
    checked too, and the differences' own maximum is a fair scale for the relative error."""
    largest = _max_abs(J).argmax(axis=-1)  # (samples,)
    return np.union1d(pick, largest)


_COMPARISONS = ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")
_KINKS = _COMPARISONS + ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "ThresholdedRelu", "Clip", "HardSigmoid", "HardSwish",
                         "Shrink", "Max", "Min", "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "TopK", "Cast",
                         "Sqrt")


_FLAT_BELOW = ("Sqrt",)  # kinks whose operand is typically flat where they sit (the root of a sum of squares at 0)


def _near(a, b):
    """Equal, or within a few units in the last place of float64 (a breakpoint of an affine map)."""
    return np.abs(a - b) <= 8 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(b))


def _kinks(node, vals):
    """{input index: where it sits on a point of `node` that the derivative jumps at}: a
    comparison's tie, an activation's breakpoint, a bound of Clip met, a maximum (or minimum)
    of Max, Min, a max pool or a reduction that another element ties, an element of TopK's
    that another ties.
    `vals`: the node's inputs at the checked points (None where absent)."""
    op, a, x = node.op_type, node.attrs, vals[0]
    if op in _COMPARISONS:
        tie = np.asarray(vals[0]) == np.asarray(vals[1])
        return {0: tie, 1: tie}
    if op == "Cast":  # a float read as a boolean (torch's x.bool()): a comparison with 0
        return {0: x == 0} if a.get("to") in (TensorProto.BOOL, "BOOL") and np.asarray(x).dtype.kind == "f" else {}
    if op in ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu"):
        return {0: x == 0}
    if op == "Sqrt":  # of zero: a distance to itself (a nearest-neighbours model's training point), a norm's kink
        return {0: x == 0}
    if op == "ThresholdedRelu":
        return {0: x == a.get("alpha", 1.0)}
    if op == "Shrink":
        return {0: np.abs(x) == a.get("lambd", 0.5)}
    if op == "HardSwish":
        return {0: np.abs(x) == 3}
    if op == "HardSigmoid":
        z = a.get("alpha", 0.2) * x + a.get("beta", 0.5)
        return {0: _near(z, 0.0) | _near(z, 1.0)}
    if op == "Clip":
        lo = vals[1] if len(vals) > 1 and vals[1] is not None else a.get("min")
        hi = vals[2] if len(vals) > 2 and vals[2] is not None else a.get("max")
        tie = np.zeros(np.shape(x), bool)
        for bound in (lo, hi):
            if bound is not None:
                tie = tie | (x == bound)
        return {0: tie}
    if op in ("Max", "Min"):
        present = [(i, np.asarray(v)) for i, v in enumerate(vals) if v is not None]
        if len(present) < 2:
            return {}
        r = (np.maximum if op == "Max" else np.minimum).reduce(np.broadcast_arrays(*[v for _, v in present]))
        count = sum((v == r).astype(int) for _, v in present)
        return {i: (v == r) & (count >= 2) for i, v in present}
    if op in ("ReduceMax", "ReduceMin", "GlobalMaxPool"):
        from .rules.reduce import _norm_axes

        if op == "GlobalMaxPool":
            axes = tuple(range(2 - x.ndim, 0))
        else:
            given = vals[1] if len(vals) > 1 and vals[1] is not None else a.get("axes")
            axes = _norm_axes(given, x.ndim, a.get("noop_with_empty_axes", 0))
        if not axes:
            return {}
        r = (np.max if op != "ReduceMin" else np.min)(x, axis=axes, keepdims=True)
        hit = x == r
        return {0: hit & (hit.sum(axis=axes, keepdims=True) >= 2)}
    if op == "MaxPool":
        return {0: _pool_ties(x, a)}
    if op == "TopK":
        k = int(np.ravel(vals[1])[0]) if len(vals) > 1 and vals[1] is not None else int(a["k"])
        return {0: _topk_ties(x, k, a.get("axis", -1), a.get("largest", 1))}
    return {}


def _topk_ties(X, k, axis, largest):
    """The elements of X that TopK takes (or that tie with the last it takes) and whose value
    another element along `axis` has too: which output each goes to is a choice there."""
    Xm = np.moveaxis(X, axis, -1)
    if k <= 0 or Xm.shape[-1] == 0:
        return np.zeros(X.shape, bool)
    order = np.argsort(-Xm if largest else Xm, axis=-1, kind="stable")
    s = np.take_along_axis(Xm, order, axis=-1)
    dup = np.zeros(s.shape, bool)
    dup[..., 1:] |= s[..., 1:] == s[..., :-1]
    dup[..., :-1] |= s[..., :-1] == s[..., 1:]
    kth = s[..., min(k, s.shape[-1]) - 1:min(k, s.shape[-1])]
    taken = (s >= kth) if largest else (s <= kth)
    out = np.zeros(Xm.shape, bool)
    np.put_along_axis(out, order, dup & taken, axis=-1)
    return np.moveaxis(out, -1, axis)


def _pool_ties(X, a):
    """The elements of X that are the maximum of a MaxPool window together with another."""
    from .rules._util import pad_spatial, unpad, windows, windows_adjoint
    from .rules.pool import _geom, _lowest

    kernel, s, d, begin, end, _ = _geom(X, a["kernel_shape"], a.get("strides"), a.get("dilations"), a.get("pads"),
                                        a.get("auto_pad", "NOTSET"), a.get("ceil_mode", 0))
    low = _lowest(X.dtype)
    Xp = pad_spatial(X, begin, end, low)
    V = windows(Xp, kernel, s, d)  # (N, C, *out, *kernel)
    axes = tuple(range(-len(kernel), 0))
    hit = (V == V.max(axis=axes, keepdims=True)) & (V != low)  # padding never wins
    tied = hit & (hit.sum(axis=axes, keepdims=True) >= 2)
    return unpad(windows_adjoint(tied.astype(np.float64), Xp.shape[-len(kernel):], kernel, s, d) > 0, begin, end)


@quiet_floats
def _branch_points(model, feeds, name, wrt, seed=0, params=False):
    """Where the checked points sit on a kink or a branch of the model that `wrt` moves: a
    comparison on the way to output `name` whose operands are equal at a point (Keras's Masking
    of an all-zero time step: any move off zero unmasks it), or an input exactly at a kink of
    a piecewise activation (a Clip to [0, 1] or a Relu of images with black pixels), or one of
    several tied for a maximum (a white patch max-pooled). jaccli's derivative there is one
    side's, as TensorFlow's and PyTorch's are; central differences see the other branch, or
    the mean of both slopes (a Relu's 0.5), at every step, and where the model is continuous
    across (a masked first step from a zero state) no jump gives them away. Returns (per sample, which elements of `wrt` move such a point (k,
    n): where a random combination of the tied values' VJPs is not zero), and the nodes'
    names; None where there is none. A model of a fixed batch runs in runs of it. With
    `params`, `wrt` are parameters (weights clipped to a bound they sit on, as after
    quantization-aware training), their entries one after another as the columns, the same
    for every sample."""
    from . import walk
    from .plan import Plan
    from .rules._util import unbroadcast

    nodes = [n for n in model.ancestors([name]) if n.op_type in _KINKS and n.domain in ("", "ai.onnx")]
    wrt = list(wrt) if params else [wrt]
    if not nodes or not (params or wrt[0] in feeds):
        return None
    operands = list(dict.fromkeys(v for n in nodes for v in n.inputs if v))
    try:
        plan = Plan(model, operands, wrt, np.float64)
    except JaccliError:  # what the check itself meets, and says, on the way to the output
        return None
    moved = {v for v in operands if v in plan.active}
    if not moved:
        return None
    rng = np.random.default_rng(seed)
    where = {}  # the nodes met at a kink, in order

    def one_run(feeds):
        f = {n: (v.astype(np.float64) if v.dtype.kind == "f" else v) for n, v in feeds.items()}
        env = walk.primal(plan, f)
        cot = {}
        for n in nodes:
            if not moved.intersection(n.inputs):
                continue
            vals = [env.get(v) if v else None for v in n.inputs]
            ties = {i: t for i, t in _kinks(n, vals).items()  # of floats: an integer (TopK's indices) carries no cotangent
                    if n.inputs[i] in moved and np.any(t) and np.asarray(vals[i]).dtype.kind == "f"}
            if ties:
                where[n.name or n.op_type] = True
            for i, tie in ties.items():  # the ties (of the inputs' broadcast shape) on the operand's own
                v = n.inputs[i]
                m = (unbroadcast(np.asarray(tie, np.float64), np.shape(vals[i]), lead=0) > 0).astype(np.float64)
                seed_v = rng.standard_normal((1,) + m.shape) * m
                if n.op_type in _FLAT_BELOW:  # its operand's own derivative is zero there (a squared distance at 0):
                    seed_v[:, m > 0] = np.nan  # NaN marks what it depends on at all, as 0 * NaN is NaN
                cot[v] = cot[v] + seed_v if v in cot else seed_v
        k = samples_in(f)
        bars = walk._pull(plan, env, cot, plan.active_steps, wrt, {}) if cot else {}
        if params:  # summed over the samples: one row for all of them
            row = np.concatenate([(np.asarray(bars[w])[0] != 0).ravel() if bars.get(w) is not None
                                  else np.zeros(plan.params[w].size, bool) for w in wrt])
            return np.broadcast_to(row, (k, row.size))
        xbar = bars.get(wrt[0])
        return np.zeros((k, f[wrt[0]][0].size), bool) if xbar is None else np.asarray(xbar)[0].reshape(k, -1) != 0

    try:
        touched = in_runs(one_run, feeds, model.fixed_batch()[1])
    except JaccliError:
        return None
    return (touched, list(where)) if where else None


def _input_fd(model, proto, feeds, name, k, dtype, rng, entries, outputs, wrt=None, own=False, max_memory=DEFAULT_MAX_MEMORY):
    wrt = wrt or _first_float(model, name).name
    r = input_jacobian(model, feeds, wrt=wrt, of=name, dtype=dtype, flat=True, outputs=outputs, return_result=True,
                       max_memory=max_memory)
    J, sel = r.value, r.selection
    if wrt not in feeds:  # a value inside the graph: the oracle's model takes it as an input
        feeds = Feeds({**feeds, wrt: _forward(model, feeds, wrt, np.float64, flat=False)})
        proto = _cut_at(proto, wrt, [name])
        model = load(proto)
    oracle = _own(proto, model) if own else _oracle(proto, feeds, [name], model=model, budget=max_memory)
    places = oracle.batch and _rows_per_place(oracle, feeds, name)
    x0 = feeds[wrt]
    run_size = _points_per_run(r.estimate, oracle, max_memory // 2)
    pick = _with_largest(_pick(x0[0].size, entries, rng), J)
    steps = FINE if own else _steps(oracle.dtype)
    ours, fds, means, branch = [], [[] for _ in steps], [[] for _ in steps], []
    ties = _branch_points(model, _slice_samples(feeds, 0, k), name, wrt) if _fits(r, J, k, max_memory) else None
    for i in range(k):
        def evaluate(points, i=i):
            batch = np.stack(list(points))  # an input's perturbed copies, in one batch
            m = batch.shape[0]
            f = {n: (np.repeat(v[i:i + 1], m, axis=0) if v.ndim else v) for n, v in feeds.items() if n != wrt}  # 0-d: no samples
            f[wrt] = batch.reshape((m,) + x0.shape[1:])
            if places:  # each perturbed copy at sample i's place in a run, as the drivers put it
                y = _run_at(oracle, f, name, i % oracle.batch)
            else:
                y = _run_batched(oracle, f, name, run_size=run_size)
            return y.reshape(m, 1, -1)[:, :, sel]

        base = x0[i].ravel().astype(np.float64)
        D = _Directions(base, pick, rng)
        if ties is not None:  # the sampled elements that move a kink are not judged; the dense directions leave them be
            D.V[:, ties[0][i]] = 0
            branch.append(np.concatenate([ties[0][i][pick], np.zeros(DIRECTIONS, bool)])[None, None])
        ours.append(D.of(J[i])[None])
        for s, h in enumerate(steps):
            odd, mean = _central(evaluate, base, D, h)
            fds[s].append(odd)
            means[s].append(mean)
    y = _run_batched(oracle, feeds, name).reshape(k, -1)
    fds, evens = [np.concatenate(f) for f in fds], [np.concatenate(m) - y[:, sel, None] for m in means]
    branch = (np.concatenate(branch), ties[1]) if ties is not None else None
    return _Look(np.concatenate(ours), fds, evens, pick.size, y, oracle, J, branch)


def _param_fd(model, proto, feeds, name, k, dtype, rng, entries, outputs, own=False, max_memory=DEFAULT_MAX_MEMORY):
    r = param_jacobian(model, feeds, of=name, dtype=dtype, outputs=outputs, return_result=True, max_memory=max_memory)
    G, cols, sel = r.value, r.columns, r.selection
    names = [c["name"] for c in cols]
    theta = {n: model.initializers[n] for n in names}
    moved = {n: model.attribute_params[n] for n in names if n in model.attribute_params}  # attributes to onnxruntime
    as_inputs = _params_as_inputs(proto, set(names) - set(moved))
    if own:
        oracle = _own(as_inputs, model)
    elif moved:
        oracle = _attribute_oracle(as_inputs, moved, model)
    else:
        oracle = _oracle(as_inputs, feeds, [name], theta, model=model, budget=max_memory)
    base = np.concatenate([theta[n].astype(np.float64).ravel() for n in names])

    def evaluate(thetas):
        out = []
        for th in thetas:
            vals = {c["name"]: th[c["offset"]: c["offset"] + c["size"]].reshape(c["shape"]) for c in cols}
            out.append(_run_batched(oracle, feeds, name, vals).reshape(k, -1)[:, sel])
        return np.asarray(out, dtype=np.float64)

    G = G.reshape(k, -1, base.size)
    pick = _with_largest(_pick(base.size, entries, rng), G)
    D = _Directions(base, pick, rng)
    ties = _branch_points(model, feeds, name, names, params=True) if _fits(r, G, k, max_memory) else None
    branch = None
    if ties is not None:  # the sampled entries that move a kink are not judged; the dense directions leave them be
        D.V[:, ties[0][0]] = 0
        branch = (np.concatenate([ties[0][:, pick], np.zeros((k, DIRECTIONS), bool)], axis=1)[:, None], ties[1])
    fds, means = zip(*[_central(evaluate, base, D, h) for h in (FINE if own else _steps(oracle.dtype))])
    y_ort = _run_batched(oracle, feeds, name, theta).reshape(k, -1)
    return _Look(D.of(G), list(fds), [m - y_ort[:, sel, None] for m in means], pick.size, y_ort, oracle, G, branch)


def _fits(r, J, k, max_memory):
    """Whether the kink and branch search (which keeps every value it tests for k samples in
    float64) fits in half the check's budget, from the Jacobian's kept bytes a sample."""
    return r.estimate.get("bytes_primal", 0.0) * 8 / J.dtype.itemsize * k <= max_memory // 2


def _run_batched(oracle, feeds, name, extra=None, run_size=None):
    """Run the oracle on all samples at once (or `run_size` at a time), or in runs of the model's
    fixed batch, or one by one if that fails (the oracle's output is not one row per sample: the
    reference evaluator's Loop over a sequence has been seen to drop the batch)."""
    extra = extra or {}  # values without a sample axis (the parameters being perturbed)

    def run(f):
        return oracle.run({**f, **extra}, [name])[0]

    if oracle.batch:
        return in_runs(run, feeds, oracle.batch).astype(np.float64)
    n = samples_in(feeds)
    if run_size and n > run_size:
        return np.concatenate([_run_batched(oracle, _slice_samples(feeds, a, a + run_size), name, extra)
                               for a in range(0, n, run_size)])
    try:
        y = run(feeds)
        if np.ndim(y) and np.shape(y)[0] == n:
            return y.astype(np.float64)
    except Exception:
        pass
    return in_runs(run, feeds, 1).astype(np.float64)


def _points_per_run(estimate, oracle=None, budget=DEFAULT_MAX_MEMORY // 2):
    """How many perturbed points one oracle run may take within the budget: its float64
    intermediates, twice the bytes of our float32 ones a sample (a 1-D U-Net on 7500-long
    signals keeps 360 MiB a sample, and 140 points at once were killed for memory), or what
    a point took when the oracle was chosen, if more: the reference evaluator's Conv builds
    im2col matrices a kernel's width times its input (see _memory_cap)."""
    per_point = max(2 * estimate.get("bytes_primal", 0.0), oracle.point_bytes if oracle else 0.0, 1.0)
    return max(1, int(budget // per_point))


@contextlib.contextmanager
def _memory_cap(extra):
    """Let the process's address space grow by at most `extra` bytes while the block runs
    (RLIMIT_AS, where the platform has it): a run that would take all the machine's memory
    raises MemoryError instead of having the process killed. The reference evaluator's Conv
    builds im2col matrices a kernel's width times its input, and on one sample of a 1-D U-Net
    over 7500-long EEG signals (brainmaze's spindle detector) it took more than 24 GiB."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration, ValueError):
        size = None
    cap = None if size is None else size + int(extra)
    if cap is not None and hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if cap is None or (soft != resource.RLIM_INFINITY and soft <= cap):
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _peak_bytes(run):
    """run() and the most memory that numpy held at once during it, above what it held before:
    tracemalloc sees numpy's buffers (the reference evaluator's; not onnxruntime's own)."""
    import tracemalloc

    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        out = run()
        return out, max(0, tracemalloc.get_traced_memory()[1] - before)
    finally:
        if not tracing:
            tracemalloc.stop()


def _rows_per_place(oracle, feeds, name):
    """Whether a fixed batch's output depends on a sample's place in its run: one run of copies
    of the first sample gives different rows (a constant with a row per place)."""
    y = np.asarray(oracle.run(_copies(feeds, 0, oracle.batch), [name])[0], np.float64)
    return not np.allclose(y, y[:1], rtol=1e-12, atol=0)


def _run_at(oracle, feeds, name, place):
    """Each sample of the feeds run alone, in a run of the model's fixed batch that it fills, and
    read at `place`: where a model's batch is fixed, its constants may have a row per place."""
    n = samples_in(feeds)
    return np.stack([oracle.run(_copies(feeds, j, oracle.batch), [name])[0][place] for j in range(n)]).astype(np.float64)



def _forward(model, feeds, name, dtype, params=None, flat=True):
    """Our forward (flat per sample); `params` replace parameters (as the oracle feeds them).
    A model whose declared batch is fixed runs in runs of that batch, as the drivers run it."""
    from . import walk
    from .plan import Plan

    plan = Plan(model, name, list(params or ()), dtype)
    plan.params.update({k: np.asarray(v, dtype) for k, v in (params or {}).items()})
    cast = {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in feeds.items()}
    n = samples_in(feeds)
    y = in_runs(lambda f: walk.primal(plan, f)[name], cast, model.fixed_batch()[1])
    return y.reshape(n, -1) if flat else y


def _row(name, look, y_ours, noise=0.0, ratio=4.0, rounding=0.0):
    """Errors of ours (J D^T: the sampled entries, then the random directions) against the
    differences. A column is wrong only if it disagrees with the differences at every step (a
    kink inside one step, or rounding at another, spoils some of them, a wrong derivative all).
    Not judged: columns whose differences are not finite, and every column of a sample whose
    output is not finite (there IEEE's 0 * NaN = NaN spreads NaN through structurally zero
    entries, in jaccli as in every autodiff system); they are counted. Nor columns where the
    model jumps (see _jumps; and _symmetric_jumps, from the perturbed points' means), nor
    those that move a comparison tied at the point (see _branch_points). `ratio`: of each
    step to the next (see _jumps)."""
    ours, fds, n_entries, y_ort = look.ours, look.fds, look.n_entries, look.y
    y0 = np.asarray(y_ort, np.float64).reshape(len(ours), -1)
    sample_ok = np.isfinite(y0).all(axis=1)
    finite = np.logical_and.reduce([np.isfinite(f) for f in fds]) & sample_ok[:, None, None]
    jumps = finite & (_jumps(fds, noise, ratio) | _symmetric_jumps(look.evens, rounding, ratio))
    branch = finite & ~jumps & (look.branch[0] if look.branch is not None else False)
    judged = finite & ~jumps & ~branch
    with np.errstate(invalid="ignore"):
        err = np.where(judged, np.minimum.reduce([np.abs(ours - f) for f in fds]), 0.0)
    err = np.where(judged & ~np.isfinite(ours), np.inf, err)
    scale_of = np.abs(np.where(judged, fds[1], 0))

    def relative(cols):
        e, sc = err[:, :, cols], scale_of[:, :, cols]
        if e.size == 0:
            return 0.0, 0.0, 0.0
        m, s = float(e.max()), float(sc.max())
        return m, s, (m / s if s > 0 else m)

    entries, directions = slice(0, n_entries), slice(n_entries, None)
    abs_e, scale, rel_e = relative(entries)
    abs_d, _, rel_d = relative(directions)
    with np.errstate(invalid="ignore"):
        spread = np.where(judged, np.maximum.reduce(fds) - np.minimum.reduce(fds), np.nan)
    return {"output": name, "max_abs_error": abs_e, "max_abs": scale, "entry_error": rel_e, "directional_error": rel_d,
            "max_abs_direction_error": abs_d, "noise": noise,
            "entry_spread": _resolution(spread[:, :, entries]), "direction_spread": _resolution(spread[:, :, directions]),
            "entries_judged": bool(judged[:, :, entries].any()), "directions_judged": bool(judged[:, :, directions].any()),
            "jumps": int(jumps.any(axis=1).sum()),
            "branch_points": int(branch.any(axis=1).sum()), "ties_at": list(look.branch[1]) if look.branch else [],
            "relative_error": max(rel_e, rel_d), "nan_entries": int((~finite).sum()),
            "forward_error": float(np.nanmax(np.abs(y_ours.astype(np.float64) - y_ort), initial=0.0)),
            "forward_scale": float(np.abs(np.asarray(y_ort, np.float64)[np.isfinite(y_ort)]).max(initial=0.0))}
