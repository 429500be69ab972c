"""Drivers: seed basis directions, choose the mode, chunk samples and directions, fill the result."""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import functools
import math
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import parallel, walk
from .errors import DataError, JaccliError, MemoryBudgetError, ModelError, SampleAxisError, UsageError
from .io import gib
from .model import NO_SAMPLE_AXIS, Model, fused_note, load, removed_note
from .plan import Plan
from .rules._util import memory_limit

DEFAULT_MAX_MEMORY = 2 << 30


@dataclass
class Result:
    """What a run produced: the Jacobian (flat per sample: (N, n_out, n_cols)) and how."""

    J: np.ndarray | None  # (N, n_sel, n_cols) in memory; None when streamed to a file
    shape: tuple  # the shape the user asked for
    kind: str  # "input" or "params"
    of: str
    wrt: str | list
    mode: str
    out_shape: tuple  # per-sample shape of the output
    in_shape: tuple  # per-sample shape of the input (input Jacobian)
    selection: np.ndarray  # flat output indices that the rows are
    columns: list = field(default_factory=list)  # params: [{name, shape, offset, size}]
    outputs: np.ndarray | None = None  # model outputs (N, *out_shape)
    seconds: float = 0.0
    chunks: tuple = (0, 0)  # samples per chunk, directions per chunk
    block_rows: int = 0  # rows of a block when one sample's rows are over the budget (0: all of them); set by _fill_blocks
    estimate: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    dtype: np.dtype = np.dtype(np.float32)
    labels: dict = field(default_factory=dict)  # input Jacobian: {flat input element: what it stands for}

    @property
    def value(self):
        return self.J.reshape(self.shape)

    @property
    def flat_shape(self):
        """(N, rows, columns): the per-sample matrices."""
        return (self.shape[0], int(self.selection.size), math.prod(self.shape[1:]) // int(self.selection.size))


# ---- data ----------------------------------------------------------------------------------


class Feeds(dict):
    """Arrays for the model inputs as prepare_feeds made them: samples first, where an input's
    data came in the model's layout with its samples on another axis."""


def prepare_feeds(model: Model, x, dtype, source="data", of=None):
    """Arrays for the model inputs, samples on axis 0: Feeds {name: array}, and N. With `of`
    (output names), only the inputs they depend on are needed; others given are still checked.
    An input that carries the samples on another axis (model.sample_axes) takes its data in
    the model's layout, moved here (once: Feeds are not moved again)."""
    needed = model.inputs if of is None else model.inputs_of(of)
    if not needed:
        raise _constant(of[0])
    if isinstance(x, dict):
        arrays = dict(x)
        unknown = [k for k in arrays if k not in {v.name for v in model.inputs}]
        if unknown:
            raise DataError(f"{source}: array '{unknown[0]}' matches no model input ({', '.join(v.name for v in model.inputs)})")
        missing = [v.name for v in needed if v.name not in arrays and not v.optional]  # one of optional type: empty
        if missing:
            raise DataError(f"{source}: no array for model input '{missing[0]}' (an .npz needs one array per input "
                            f"the output depends on)")
    else:
        needed = [v for v in needed if not v.optional] or needed  # an array for the one input that must have one
        if len(needed) != 1:
            names = ", ".join(v.name for v in needed)
            raise DataError(f"{source}: the output depends on {len(needed)} inputs ({names}); give an .npz with one array "
                            f"per input")
        arrays = {needed[0].name: x}
    feeds, n, whole = {}, None, []
    for v in (v for v in model.inputs if v.name in arrays):
        a = np.asarray(arrays[v.name])
        if v.elem_type == _STRING:  # categories of a scikit-learn pipeline: text, as objects for the rules
            if a.dtype.kind not in "USO":
                raise DataError(f"{source}: array for '{v.name}' has dtype {a.dtype}; the input takes strings")
            a = (a if a.dtype == object else a.astype(str)).astype(object)
        elif a.dtype == object or a.dtype.kind not in "biuf":
            raise DataError(f"{source}: array for '{v.name}' has dtype {a.dtype}; expected numbers")
        shape = v.shape
        axis = model.sample_axes.get(v.name, 0)
        if axis == NO_SAMPLE_AXIS:  # the data is one sample whole, shared by the other inputs' samples
            if not isinstance(x, Feeds):
                a = a[None]
            whole.append(v.name)
        elif axis and not isinstance(x, Feeds) and shape is not None and a.ndim == len(shape):
            a = np.moveaxis(a, axis, 0)  # the model's layout, samples on `axis`: samples first
        if shape is not None and a.ndim == len(shape) - 1:
            a = a[None]  # one sample of the input's own shape
        if shape is not None and a.ndim != len(shape):
            raise DataError(f"{source}: '{v.name}' expects shape {v.describe()} (samples on axis 0); got {a.shape}")
        if shape is not None:
            for k, (want, got) in enumerate(zip(shape[1:], a.shape[1:]), start=1):
                if isinstance(want, int) and want > 0 and want != got:
                    hint = (f"; if axis {k} holds the samples (a recurrent state of a model exported with a batch of "
                            f"one), name it: --sample-axis {v.name}={k} (sample_axes= in Python)" if want == 1 and not axis else "")
                    raise DataError(f"{source}: '{v.name}' expects shape {v.describe()}; axis {k} is {got}, not {want}{hint}")
        if v.is_float:
            a = a.astype(dtype, copy=False)
        elif v.elem_type:
            from onnx import helper

            a = a.astype(helper.tensor_dtype_to_np_dtype(v.elem_type), copy=False)
        counts = a.ndim and v.name not in whole  # a 0-d input (a sample rate), or one sample whole, counts none
        if counts and n is None:
            n = a.shape[0]
        elif counts and a.shape[0] != n:
            where = f" on axis {axis}" if axis else ""
            raise DataError(f"{source}: '{v.name}' has {a.shape[0]} samples{where} but another input has {n}; an input that "
                            f"carries the samples on another axis (a recurrent state (layers, N, hidden)) is named with "
                            f"--sample-axis {v.name}=AXIS (sample_axes= in Python)")
        feeds[v.name] = a
    n = 1 if n is None else n  # only 0-d inputs (or inputs of one sample): one sample
    if not n:
        raise DataError(f"{source}: no samples")
    for name in whole:
        if feeds[name].shape[0] != n:  # as prepared already: Feeds
            feeds[name] = np.broadcast_to(feeds[name][:1], (n,) + feeds[name].shape[1:])
    return Feeds(feeds), n


def _output_rows(spec, name, out_shape):
    """The flat output indices that the rows are (see parse_outputs); an output with no elements
    has no Jacobian (a Resize by a scale under one over a short axis gives one)."""
    if math.prod(out_shape) == 0:
        raise DataError(f"output '{name}' is empty for these samples (shape {tuple(out_shape)} a sample): "
                        f"it has no Jacobian")
    return parse_outputs(spec, math.prod(out_shape))


def parse_outputs(spec, n_out):
    """Flat output indices from a slice like '0:5', '3' or '::2' (None: all)."""
    if spec is None:
        return np.arange(n_out)
    try:
        parts = [int(p) if p.strip() else None for p in str(spec).split(":")]
        if len(parts) == 1:
            i = parts[0] + n_out if parts[0] < 0 else parts[0]
            if not 0 <= i < n_out:
                raise IndexError
            return np.array([i])
        sel = np.arange(n_out)[slice(*parts)]
    except (ValueError, TypeError, IndexError):
        raise UsageError(f"--outputs {spec!r}: expected an index or a slice start:stop[:step] within 0..{n_out - 1}") from None
    if sel.size == 0:
        raise UsageError(f"--outputs {spec!r} selects no output element (the output has {n_out})")
    return sel


def samples_in(feeds):
    """The number of samples of the feeds: the first axis of any that has axes (a 0-d input, a
    sample rate, has none)."""
    return next((v.shape[0] for v in feeds.values() if np.ndim(v)), 1)


def _slice_samples(feeds, a, b):
    return {k: (v[a:b] if v.ndim else v) for k, v in feeds.items()}


def _pad_samples(feeds, n):
    """The feeds with n samples: theirs, then copies of their last one."""
    def pad(v):
        return np.concatenate([v, np.repeat(v[-1:], n - len(v), axis=0)]) if v.ndim and len(v) < n else v

    return {k: pad(v) for k, v in feeds.items()}


def _copies(feeds, j, size):
    """A run of `size` copies of sample j."""
    return _pad_samples(_slice_samples(feeds, j, j + 1), size)


def in_runs(fn, feeds, size):
    """fn(feeds of one run) over all samples in runs of exactly `size` (None: one run), the last
    padded with copies of its last sample; the results, samples first, concatenated without the
    padding. A model whose declared batch is fixed runs only in such runs."""
    n = samples_in(feeds)
    if not size:
        return fn(feeds)

    def run(a):  # a result is sliced only where padded: an oracle has been seen to drop the axis of one sample
        y = fn(_pad_samples(_slice_samples(feeds, a, a + size), size))
        return y[: n - a] if n - a < size else y

    return np.concatenate([run(a) for a in range(0, n, size)])


# ---- chunking ---------------------------------------------------------------------------------


def choose_chunks(N, T, est, max_memory, extra_per_sd=0.0, run_size=0):
    """Samples and directions per chunk so that one chunk's working set fits max_memory bytes.
    With `run_size` (a model's fixed batch, N), chunks of exactly N samples."""
    runs = run_size or 1  # samples that go together
    b_s = est["bytes_primal"] * runs
    b_sd = (est["bytes_per_direction"] + extra_per_sd) * runs
    # the estimate counts the values that live; the rules' temporaries (a derivative and its
    # product, a cotangent before it is copied into the result) and the summary's take about as
    # much again: plan for half of the budget
    budget = max_memory / 2
    if b_s + b_sd > budget:
        what = f"a run of {run_size} samples (the model's fixed batch)" if run_size else "one sample"
        raise MemoryBudgetError(
            f"{what} and one direction need about {gib(2 * (b_s + b_sd))} with temporaries, over "
            f"--max-memory ({gib(max_memory)})"
        )
    n_c = int(budget // (b_s + T * b_sd))
    if run_size and n_c < 1:  # rows in parts come one sample at a time, and a run is several
        raise MemoryBudgetError(
            f"a run of {run_size} samples (the model's fixed batch) with all {T} directions needs about "
            f"{gib(2 * (b_s + T * b_sd))} with temporaries, over --max-memory ({gib(max_memory)}): raise it, or ask "
            f"for fewer outputs"
        )
    if n_c >= 1:
        return (N if run_size else min(N, n_c)), T
    return 1, max(1, min(T, int((budget - b_s) // b_sd)))


def _prepared(model, of, wrt, dtype, per_sample, feeds, N, through=False):
    """The plan and its measurements (estimates, output shape, samples per run, the samples a
    run's feeds must have or 0, see _measure), cached on the model: they depend on the graph
    and the per-sample shapes, not on the values."""
    key = (of, tuple(wrt), np.dtype(dtype).str, per_sample, through)
    if key not in model.plans:
        model.plans[key] = (Plan(model, of, wrt, dtype, per_sample=per_sample, through=through), {})
    plan, probes = model.plans[key]
    shapes = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(feeds.items())) + (min(N, 2),)
    if shapes not in probes:
        try:
            probes[shapes] = _measure(plan, model, feeds, of, N)
        except _Replan as again:  # values shared by every sample: a plan that knows them, probed afresh
            plan = Plan(model, of, wrt, dtype, per_sample=per_sample, through=through, shared=again.shared)
            model.plans[key] = (plan, probes := {})
            probes[shapes] = _measure(plan, model, feeds, of, N)
    est, y0, per_run, run_size, wrt_shapes = probes[shapes]
    return plan, (est, y0, per_run if per_run == 1 or run_size else N, run_size, wrt_shapes)


def _prepared_output(model, of, wrt, dtype, per_sample, feeds, N, through):
    """_prepared for output `of`; where the run finds its first axis not the samples', for `of`
    with them moved first (see samples_first), and that note: (note or None, plan, measurements).
    The usual export pays for no probe of its own."""
    try:
        return (None,) + _prepared(model, of, wrt, dtype, per_sample, feeds, N, through)
    except SampleAxisError:
        inner, note = samples_first(model, of, feeds, dtype)
        if note is None:
            raise
        return (note,) + _prepared(model, inner, wrt, dtype, per_sample, feeds, N, through)


def _measure(plan, model, feeds, of, N):
    """Estimates from a primal pass over the first sample, that sample's output, the most
    samples one run may take (N, or 1 for a model whose declared batch is fixed at 1), the
    samples a run's feeds must have (0: any number; a batch fixed above 1 that the graph bakes
    in: that batch, padded), and the per-sample shapes of the values differentiated with
    respect to that are not inputs."""
    fixed, size = model.fixed_batch()
    try:
        env = walk.primal(plan, _slice_samples(feeds, 0, 1))
        _check_sample_axis(env[of], 1, of)  # a batch baked into an Expand runs, with the wrong rows
        n = 1
    except JaccliError as e:
        if not size and type(e) is ModelError:  # a kernel fails on one sample: perhaps axis 0 holds none,
            model.baked_batch = _baked_batch(plan, feeds, N)  # or the graph bakes in the batch it was exported with
            if not model.baked_batch:
                raise ModelError(f"{e} (run on the first sample alone: where the data has no sample axis, one graph or "
                                 f"a model exported without a batch, give it as one sample with --sample-axis NAME=none, "
                                 f"or '*=none' for every input)") from None
            fixed, size = model.fixed_batch()
        if not size or size == 1:
            raise
        try:  # the graph may run on its declared batch only: runs of exactly that many samples
            env = walk.primal(plan, _pad_samples(_slice_samples(feeds, 0, size), size))
        except JaccliError:
            raise DataError(f"input '{fixed.name}' is declared with a batch of {size} and the graph runs neither on one "
                            f"sample nor on {size} ({e})") from None
        n = size
    y0 = env[of]
    _check_sample_axis(y0, n, of)
    inner = {w: _value_shape(plan, feeds, w, n) for w in plan.wrt if w not in feeds and not plan.per_sample}
    if n > 1:
        return plan.estimate(env, n), y0, _fixed_runs(plan, feeds, of, env, size), size, inner
    return plan.estimate(env, 1), y0, _samples_per_run(plan, model, feeds, of, N, env), 0, inner


_BAKED_AT_MOST = 256  # samples of a run tried whole where one sample fails: export batches are smaller
_BAKED_TRIES = 8  # batch sizes tried at most


def _baked_batch(plan, feeds, N):
    """The batch the graph runs on though not on one sample (a constant of the export's batch
    size: tf2onnx's sequence lengths, a Reshape to it, as torch writes for x.view(32, -1)), else
    None. Tried: all N samples at once, then the sizes its constants suggest (_batch_candidates)
    on the first samples, padded, where the output must have a row per sample and sample 0's row
    must be its own (the same among copies of it). Not above _BAKED_AT_MOST samples, whose
    forward pass could be of any size."""
    for size in _batch_candidates(plan, N):
        try:
            y = walk.primal(plan, _pad_samples(_slice_samples(feeds, 0, size), size))[plan.of]
            if size == N:
                return N  # the usual checks follow (_measure, _fixed_runs), with their own messages
            alone = walk.primal(plan, _copies(feeds, 0, size))[plan.of]
        except JaccliError:
            continue
        if isinstance(y, np.ndarray) and y.ndim and len(y) == size and _same(y[0], alone[0]):
            return size
    return None


_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}  # the input that is a shape
_PER_SAMPLE_INPUTS = {"ReverseSequence": 1, "RNN": 4, "GRU": 4, "LSTM": 4}  # a vector with an entry per sample


def _batch_candidates(plan, N):
    """Batch sizes the graph may have baked in, in the order tried: the data's N, the first
    entries of the constant shapes it reshapes, expands or tiles to, then the lengths of its
    constant vectors of one entry per sample (sequence lengths); from 2 to _BAKED_AT_MOST,
    _BAKED_TRIES at most."""
    shapes, lengths = [], []
    for step in plan.steps:
        for k, v in enumerate(step.inputs):
            a = plan.consts.get(v) if v else None
            if isinstance(a, np.ndarray) and a.ndim == 1 and a.size and a.dtype.kind in "iu":
                if _SHAPE_INPUTS.get(step.node.op_type) == k:
                    shapes.append(int(a[0]))
                elif _PER_SAMPLE_INPUTS.get(step.node.op_type) == k:
                    lengths.append(a.size)
    sizes = list(dict.fromkeys(c for c in [N] + shapes + lengths if 2 <= c <= _BAKED_AT_MOST))
    return sizes[:_BAKED_TRIES]


def settle_batch(model, feeds, of, dtype):
    """Set model.baked_batch where the graph runs on all the data's samples at once though not on
    its first alone, and its inputs declare no batch (see _measure): for a caller that runs
    parts of the data before the drivers do (check's few samples)."""
    if model.fixed_batch()[1]:
        return
    N = samples_in(feeds)
    plan = Plan(model, of, [], dtype)
    try:
        walk.primal(plan, _slice_samples(feeds, 0, 1))
    except ModelError:
        model.baked_batch = _baked_batch(plan, feeds, N) or 0
    except JaccliError:
        pass


def _fixed_runs(plan, feeds, of, env, size):
    """Samples per run of a graph that runs on its declared batch only (`size` samples; env a
    run of the first ones): that batch. Each sample's output must come from that sample alone:
    the first sample's output is the same with copies of it in the other places. Where the rows
    mix samples (see _rows_mix_samples), the parameter Jacobian seeds one sample at a time
    (see param_jacobian)."""
    alone = walk.primal(plan, _copies(feeds, 0, size))[of]
    if not _same(env[of][0], alone[0]):
        raise DataError(f"output '{of}' of sample 0 changes when other samples are in the same batch: the model "
                        f"mixes samples, so per-sample Jacobians are not defined for it; if its inputs have no sample "
                        f"axis (one image of (C, H, W), one graph), give the data as one sample: --sample-axis '*=none'")
    if plan.per_sample:
        _note_mixed_rows(plan, env, size)
    return size


def _derivative_notes(plan):
    """What the summary says of the QuantizeLinear nodes between what is differentiated and the output,
    and of the piecewise-constant operators there (tree ensembles)."""
    notes = []
    rounds_a = plan.quantizer_ops == "MatMulNBits"  # its accuracy_level 4 rounds A inside the product
    if plan.through and rounds_a:
        notes.append(f"straight through: {plan.through} MatMulNBits node(s) at accuracy_level 4 pass their int8 rounding "
                     f"of A as the identity, the float product's derivative (not the true derivative, zero)")
    elif plan.through:
        integer = _integer_ops(s.node for s in plan.active_steps)
        notes.append(f"straight through: {plan.through} {plan.quantizer_ops} node(s) and what dequantizes "
                     f"after them pass derivatives as the identity inside the integer range, zero where they saturate (not "
                     f"the true derivative, zero)" + (f"; the integer operators ({', '.join(integer)}) as their float "
                                                      f"operators on the dequantized inputs" if integer else ""))
    elif plan.quantized:
        what = ("at accuracy_level 4 onnxruntime rounds its input A to int8 in blocks, piecewise constant" if rounds_a
                else "its integer output is piecewise constant")
        notes.append(f"a {plan.quantizer_ops} lies on the way to the output: {what}, "
                     f"so no derivative passes it; --straight-through (straight_through=True) passes quantize-dequantize "
                     f"pairs as the identity, as quantization-aware training differentiates them")
    return notes + [f"a {op} lies on the way to the output: piecewise constant, its derivative is zero wherever it "
                    f"exists, so the Jacobian holds only what flows around it" for op in plan.flat]


def _integer_ops(nodes):
    """The QOperator format's integer operators among the nodes (QLinearConv, QGemm ...), sorted."""
    return sorted({n.op_type for n in nodes if n.op_type.startswith(("QLinear", "QGemm"))})


def _dequantized_weights(model):
    """['DequantizeLinear of integer initializers'] where the QDQ format stores the weights as
    integers that a DequantizeLinear reads, else []."""
    stored = any(n.op_type == "DequantizeLinear" and n.inputs and n.inputs[0] in model.initializers
                 and not np.issubdtype(model.initializers[n.inputs[0]].dtype, np.floating) for n in model.nodes)
    return ["DequantizeLinear of integer initializers"] if stored else []


def _run_notes(model, run_size):
    """What the summary says of a fixed batch's runs, or of --one-by-one."""
    if model.one_by_one:
        return ["one by one: each sample's Jacobian is the model's on that sample alone, a batch of one"]
    if not run_size:
        return []
    if model.baked_batch:
        return [f"runs of {run_size} samples: the graph runs on a batch of {run_size} only, though its inputs declare "
                f"none (a batch baked in when it was exported); a run short of it is padded with copies of its last sample"]
    return [f"runs of {run_size} samples: input '{model.fixed_batch()[0].name}' is declared with a batch of {run_size}, "
            f"which the graph bakes in; a run short of it is padded with copies of its last sample"]


def _element_labels(model, name, shape):
    """{flat element: label} for the elements of a value differentiated with respect to, where
    they stand for something nameable: a TfIdfVectorizer's columns are n-grams of its pool."""
    node = next((n for n in model.nodes if name in n.outputs), None)
    if node is None or node.op_type != "TfIdfVectorizer" or len(shape) != 1:
        return {}
    from .rules.text import pool_ngrams

    a, labels = node.attrs, {}
    columns = list(a.get("ngram_indexes") or [])
    for gid, gram in pool_ngrams(a.get("pool_int64s"), a.get("pool_strings"), list(a.get("ngram_counts") or [])):
        if gid < len(columns) and columns[gid] < shape[0]:
            labels.setdefault(int(columns[gid]), " ".join(map(str, gram)))
    return labels


def _output_notes(model, of, of_v):
    """What the summary says of the output asked for (or the default): an integer one, a ZipMap's maps."""
    if of_v.elem_type and not of_v.is_float:
        return [f"output '{of_v.name}' is {of_v.describe()}, integers (a label, an index): piecewise constant, its Jacobian is zero"]
    zipped = [v.name for v in model.outputs if (z := model.zipmap(v.name)) is not None and z.inputs[0] == of_v.name]
    if not zipped or of not in (None, zipped[0]):
        return []
    attrs = model.zipmap(zipped[0]).attrs
    labels = [str(c) for c in list(attrs.get("classlabels_int64s") or attrs.get("classlabels_strings") or [])]
    shown = ", ".join(labels[:8]) + (f", ... ({len(labels)} classes)" if len(labels) > 8 else "")
    return [f"output '{zipped[0]}' is a ZipMap, a {{class: probability}} map per sample, of '{of_v.name}': the "
            f"Jacobian is that of '{of_v.name}', whose columns are the classes in the order {shown}"]


def _samples_per_run(plan, model, feeds, of, N, env0):
    """Probe samples 0 and 1 together and alone, and the last beside them and alone: each output
    must depend on its own sample only. env0: the run of sample 0 alone.

    Seeding every sample with the same direction is right only then; a graph that mixes
    samples (a reduction or softmax over axis 0, BatchNormalization in training mode) would
    silently sum cross-sample blocks. A model exported with a batch fixed at 1 runs one sample
    at a time.
    """
    def one_per_run():
        """A batch of one baked into the graph (declared or not): one sample per run, whose rows
        only the run of one can tell (a Squeeze of axis 0 leaves values without them)."""
        if plan.per_sample:
            _note_mixed_rows(plan, env0, 1)
        return 1

    if N < 2:
        if plan.per_sample:  # one sample twice: the shapes show whether some rows mix samples
            try:
                _note_mixed_rows(plan, walk.primal(plan, _copies(feeds, 0, 2)), env1=env0)
            except JaccliError:
                one_per_run()
        return N
    fixed, y0 = model.fixed_batch()[1] == 1, env0[of]
    try:
        env01 = walk.primal(plan, _slice_samples(feeds, 0, 2))
        y01 = env01[of]
        paired = y01.ndim > 0 and y01.shape[0] == 2 and y01.shape[1:] == y0.shape[1:]
    except JaccliError:
        if not fixed:
            raise
        paired = False
    if not paired:
        if fixed:
            return one_per_run()
        _check_sample_axis(y01, 2, of)
        raise SampleAxisError(f"output '{of}' changes shape with the number of samples; it cannot be paired with them")
    if plan.per_sample and _note_mixed_rows(plan, env01, feeds=_slice_samples(feeds, 0, 2), env1=env0):
        return 1
    y1 = walk.primal(plan, _slice_samples(feeds, 1, 2))[of]
    for k, alone in ((0, y0[0]), (1, y1[0])):
        if not _same(y01[k], alone) and not _same_in_float64(
                plan, feeds, of, lambda p, f: (walk.primal(p, _slice_samples(f, 0, 2))[of][k],
                                               walk.primal(p, _slice_samples(f, k, k + 1))[of][0])):
            if fixed:
                return one_per_run()
            raise _mixing_error(of, k)
    if N > 2 and not fixed:  # the last sample beside the pair: samples alike there can hide a graph that mixes them
        def last(p, f):  # the last sample's output beside samples 0 and 1, and alone
            y = walk.primal(p, {k: (v[[0, 1, N - 1]] if v.ndim else v) for k, v in f.items()})[of]
            _check_sample_axis(y, 3, of)  # a first axis of two that the pair took for the samples'
            return y[2], walk.primal(p, _slice_samples(f, N - 1, N))[of][0]

        if not _same(*last(plan, feeds)) and not _same_in_float64(plan, feeds, of, last):
            raise _mixing_error(of, N - 1)
    return N


def _mixing_error(of, k):
    return DataError(
        f"output '{of}' of sample {k} changes when another sample is in the same batch: the model "
        f"mixes samples (an operation over axis 0, or BatchNormalization in training mode), so "
        f"per-sample Jacobians are not defined for it; to take each sample as the model computes it "
        f"alone (a batch of one), use --one-by-one; if axis 0 holds the parts of one instance "
        f"(a graph's nodes, a set's members), give the data as one sample: --sample-axis '*=none'"
    )


def _same_in_float64(plan, feeds, of, pair):
    """Whether the two outputs pair(plan, feeds) (a sample's, in a batch and alone) are the same
    computed in float64. In float32 a batch and a lone sample round differently (a GEMM
    and a matrix-vector product), which tells them apart where the output is a small
    difference of large terms: a prediction near zero, an ill-conditioned kernel model. A
    model that mixes samples differs in any precision."""
    if plan.dtype == np.float64:
        return False
    wide = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    try:
        return _same(*pair(plan.in_float64(), wide))
    except JaccliError:
        return False


def _note_mixed_rows(plan, env, n=2, feeds=None, env1=None):
    """Whether some rows mix samples (see _rows_mix_samples) in env, a run of n samples, or in
    env1, a run of one; if so the plan runs one sample at a time with plain cotangents
    (plan.rows_mix_samples), and says so in the summary. Unless (`feeds`, of two samples or
    more, to tell) those values have no sample axis at all (see _shared_values: the plan is
    made again), or are the samples' rows merged with another axis sample by sample, in
    products whose rule follows them (see _grouped).

    Both runs are asked: a first axis that happens to be as long as the probe's samples (a
    time-major sequence of two steps, a bidirectional recurrence's two directions) is told
    from the samples by the run of one, where it keeps its length."""
    runs = [(env, n)] + ([(env1, 1)] if env1 is not None else [])
    mixed = [s for s in plan.active_steps if any(s.keep) and any(_rows_mix(plan, e, k, s) for e, k in runs)]
    if mixed and feeds is not None:
        try:  # runs of copies of each sample, which both tests read
            alone = [walk.primal(plan, _copies(feeds, j, n)) for j in range(n)]
        except JaccliError:
            alone = None
        if alone is not None and not plan.shared:
            shared = _shared_values(plan, env, feeds, alone[-1])
            if any(all(v in shared for e, k in runs for v in _row_values(plan, e, k, s)) for s in mixed):
                raise _Replan(shared)
        if alone is not None and (_grouped(plan, env, n, alone, mixed) or _samples_inside(plan, env, n, alone, mixed)):
            return False
    if mixed and not plan.rows_mix_samples:
        plan.rows_mix_samples = True
        plan.notes.append(f"one sample at a time: node '{mixed[0].node.name}' ({mixed[0].node.op_type}) reads values whose first "
                          f"axis mixes the samples with another axis, so its rows cannot be assigned to samples in a batch")
    return bool(mixed)


def _rows_mix_samples(plan, env, n=2):
    """The steps asked for per-sample cotangents that read or write a batched value whose first
    axis is not the n samples of env (dynamo exports flatten (N, S, D) to (N*S, D) before a
    Gemm; skl2onnx adds a (1, 1) intercept to a GP's (N,) mean, which makes it (1, N)). Such a
    graph runs one sample at a time: per-sample cotangents are then plain ones (see
    walk._one_sample), whatever became of the sample axis. Control flow's outputs stack
    iterations as they may: its bodies' values are what carry the sample axis."""
    return [s for s in plan.active_steps if any(s.keep) and _rows_mix(plan, env, n, s)]


def _rows_mix(plan, env, n, s):
    """Whether step s's rows are not the n samples of env: its batched values' first axis (see
    _row_values), or, for a rule that keeps per-sample cotangents along an axis of its own (a
    recurrence's batch axis), that axis (its rule's sample_rows)."""
    rows = getattr(s.rule, "sample_rows", None)
    if rows is None:
        return bool(_row_values(plan, env, n, s))
    x = env.get(s.inputs[0])
    return isinstance(x, np.ndarray) and rows(x, **s.attrs) != n


def _row_values(plan, env, n, s):
    """The batched values that step s reads or writes (reads, for control flow) whose first axis
    is not the n samples of env; none for a Loop whose body's parameters meet only values with
    the samples first (its rule's rows_mix_inside)."""
    found = [v for v in (s.inputs if getattr(s.rule, "needs_batched", False) else s.inputs + s.outputs)
             if v in plan.batched and v in env and np.shape(env[v])[:1] != (n,) and _carries_rows(env[v])]
    inside = getattr(s.rule, "rows_mix_inside", None)
    if found and inside is not None:
        x = tuple(env.get(v) if v else None for v in s.inputs)
        if not inside(x, s.diff_in, s.keep, n, _rows_mix_samples, **s.attrs):
            return []
    return found


class _Replan(Exception):
    """The probe found values with no sample axis among the batched ones (see _shared_values):
    the plan is made again, with them taken as shared by every sample."""

    def __init__(self, shared):
        super().__init__("replan")
        self.shared = shared


def _shared_values(plan, env, feeds, copies):
    """The batched values that hold no sample axis: computed from the data's shape, not its
    samples (GPT-2's position ids as TorchScript exports them, a range over the sequence's
    length, and the position embeddings they gather), they are the same, shape and values, in
    env's run of samples, in a run of the first alone and in `copies`, a run of copies of the
    last."""
    try:
        runs = (walk.primal(plan, _slice_samples(feeds, 0, 1)), copies)
    except JaccliError:
        return set()
    found = set()
    for v in plan.batched - set(feeds):
        a = env.get(v)
        if isinstance(a, np.ndarray) and all(isinstance(r.get(v), np.ndarray) and r[v].shape == a.shape and _same(r[v], a)
                                              for r in runs):
            found.add(v)
    return found


def _grouped(plan, env, n, alone, steps):
    """Whether each of `steps` is a product whose first input is the only batched one, a matrix
    of n*S rows, S for each sample in turn, as its output's: (N, S, D) flattened to (N*S, D)
    before a Gemm, as torch's exporters (GPT-2's Conv1D), tf2onnx (a Dense on a sequence) and
    jax2onnx write it. The rows are checked against runs of copies of each sample: sample j's
    S rows are the same with the other samples replaced by copies of it. If so the steps are
    marked (Step.grouped): their rules' per-sample cotangents sum each sample's rows, and the
    batch runs at once. `alone`: per sample j, the values of a run of copies of it."""
    for s in steps:
        accepts = getattr(s.rule, "grouped_rows", None)
        A = env.get(s.inputs[0])
        if accepts is None or not accepts(s.attrs) or not isinstance(A, np.ndarray) or A.ndim != 2:
            return False
        if A.shape[0] % n or A.shape[0] == n or np.shape(env.get(s.outputs[0]))[:1] != A.shape[:1]:
            return False
        if any(v in plan.batched and _carries_rows(env.get(v)) for v in s.inputs[1:] if v):
            return False
    for s in steps:
        A, S = env[s.inputs[0]], env[s.inputs[0]].shape[0] // n
        if not all(_same(A[j * S:(j + 1) * S], alone[j][s.inputs[0]][j * S:(j + 1) * S]) for j in range(n)):
            return False
    for s in steps:
        s.grouped = True
    return True


def _samples_inside(plan, env, n, alone, steps):
    """Whether each of `steps` reads and writes batched values that hold S slices per sample
    ahead of the samples: (S, n, ...), a time-major sequence, or merged, (S*n, ...) with a
    sample's rows n apart, as torch's multi-head attention projects (T, N, E) and (T*N, E);
    and is a product of such a value with a weight (MatMul, Gemm), an elementwise operation
    with a parameter that broadcasts along those axes, or a rule that says it takes them so
    (its samples_inside: LayerNormalization over trailing axes). If so the steps are marked
    (Step.inner): the walker moves the samples first for their rules, and the batch runs at
    once. The slices are checked against runs of copies of each sample, as _grouped's rows."""
    marks = []
    for s in steps:
        vals = [v for v in s.inputs + s.outputs if v and v in plan.batched and _carries_rows(env.get(v))]
        layout = {}
        for v in vals:
            a = env.get(v)
            if not isinstance(a, np.ndarray) or a.ndim < 2:
                return False
            if a.ndim >= 3 and a.shape[1] == n and a.shape[0] != n:
                layout[v] = (a.shape[0], False)
            elif a.shape[0] % n == 0 and a.shape[0] > n:
                layout[v] = (a.shape[0] // n, True)
            else:
                return False
        if not layout or len({S for S, _ in layout.values()}) != 1:
            return False
        others = [env.get(v) for v in s.inputs if v and v not in layout]
        first = s.inputs[0] in layout and all(v not in layout for v in s.inputs[1:] if v)
        accepts = getattr(s.rule, "grouped_rows", None)
        if accepts is not None:  # a product: the batched first operand's leading axes, against a weight matrix
            if not (first and accepts(s.attrs) and all(np.ndim(w) <= 2 for w in others)):
                return False
        elif getattr(s.rule, "pointwise", False) and getattr(s.rule, "keeps", False):  # a parameter broadcast along them
            if not all(np.ndim(w) <= env[v].ndim - (1 if merged else 2) for v, (_, merged) in layout.items() for w in others):
                return False
        elif hasattr(s.rule, "samples_inside"):  # a rule that says so itself (a normalization over trailing axes)
            if not (first and all(s.rule.samples_inside(s.attrs, env[v].ndim, merged) for v, (_, merged) in layout.items())):
                return False
        else:
            return False
        marks.append((s, layout))
    for s, layout in marks:
        for v, (S, merged) in layout.items():
            tail = env[v].shape[1:] if merged else env[v].shape[2:]
            if not all(_same(env[v].reshape((S, n) + tail)[:, j], alone[j][v].reshape((S, n) + tail)[:, j]) for j in range(n)):
                return False
    for s, layout in marks:
        s.inner = {v: merged for v, (_, merged) in layout.items()}  # S follows each run's shapes
    return True


def _carries_rows(value):
    """Whether a value read or written by a step can hold rows of samples: a float tensor, or
    a sequence. An integer or boolean one carries no cotangent; a shape computed from the
    data's (an Expand's target, (N, 1, D) for a class token) is batched but has no rows."""
    return not isinstance(value, np.ndarray) or value.dtype.kind in "fc"


def _same(a, b):
    """Whether a and b hold the same values to 1e-4 of b's largest finite one; equal infinities
    and NaN where both are NaN count as the same."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    finite = np.abs(b[np.isfinite(b)])
    scale = max(float(finite.max()) if finite.size else 0.0, 1e-30)
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= 1e-4 * scale
    return bool(np.all(close | (a == b) | (np.isnan(a) & np.isnan(b))))


def quiet_floats(fn):
    """fn with numpy's floating-point warnings off: a graph may compute a branch that it then
    discards (the log of a negative number, replaced), and a result's own non-finite entries
    are counted in its summary."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return run


def _within_budget(fn):
    """Run a driver with its max_memory as the allocation limit of the rules (and quiet_floats)."""

    @functools.wraps(fn)
    @quiet_floats
    def run(*args, max_memory=DEFAULT_MAX_MEMORY, **kwargs):
        parallel.tune_malloc()
        with memory_limit(max_memory):
            return fn(*args, max_memory=max_memory, **kwargs)

    return run


# ---- input Jacobian ---------------------------------------------------------------------------


@_within_budget
def input_jacobian(model, x, wrt=None, of=None, mode="auto", dtype=np.float32, outputs=None, flat=False,
                   max_memory=DEFAULT_MAX_MEMORY, target=None, return_result=False, on_block=None, straight_through=False,
                   sample_axes=None, one_by_one=False):
    """Jacobian of output `of` with respect to input `wrt` for every sample.

    Shape (N, *out_shape, *in_shape), or (N, n_out, n_in) with `flat`; with `outputs`
    (a slice of the flattened per-sample output) the output axes become one of that size.
    `target` (default: an array in memory) receives the result block by block of samples,
    in order, so that a file target keeps memory bounded; `on_block(result, a, b, block, rows)` sees each
    (`rows`: the block's range of rows, all of them unless one sample's rows are over the budget).
    `straight_through`: quantize-dequantize pairs pass derivatives as the identity inside the
    integer range (see rules.straight_through), instead of their true derivative, zero.
    `sample_axes` ({input: axis}, for a model given by path) names inputs whose data carries
    the samples on another axis than the first; with `one_by_one` each sample runs alone, as a
    batch of one (see model.load).
    """
    t0 = time.perf_counter()
    model = load(model, max_bytes=max_memory, sample_axes=sample_axes, one_by_one=one_by_one)
    dtype = np.dtype(dtype)
    of_v = model.output(of)
    wrt_v = model.value(wrt) if wrt is not None else _first_float(model, of_v.name)
    if not wrt_v.is_float:
        raise UsageError(f"'{wrt_v.name}' is not a float tensor; it cannot be differentiated")
    feeds, N = prepare_feeds(model, x, dtype, of=[of_v.name, wrt_v.name])
    moved, plan, (est, y1, per_run, run_size, wrt_shapes) = _prepared_output(model, of_v.name, [wrt_v.name], dtype, False,
                                                                             feeds, N, straight_through)
    out_shape = y1.shape[1:]
    in_shape = feeds[wrt_v.name].shape[1:] if wrt_v.name in feeds else wrt_shapes[wrt_v.name]
    n_out, n_in = math.prod(out_shape), math.prod(in_shape)
    sel = _output_rows(outputs, of_v.name, out_shape)
    n_sel = sel.size
    if mode not in ("auto", "forward", "reverse"):
        raise UsageError(f"mode must be auto, forward or reverse, not {mode!r}")

    def chunks(mode):  # directions (inputs forward, outputs reverse), samples and directions per chunk
        T = n_in if mode == "forward" else n_sel
        extra = (n_sel if mode == "forward" else n_in) * dtype.itemsize
        return (T,) + choose_chunks(per_run, T, est, max_memory, extra_per_sd=extra, run_size=run_size)

    notes = ([moved] if moved else []) + _output_notes(model, of, of_v) + _run_notes(model, run_size) + _derivative_notes(plan)
    if mode == "auto":
        mode = "forward" if n_in < n_sel else "reverse"
        if mode == "forward" and chunks(mode)[2] < n_in:  # forward fills columns: a sample must fit whole
            mode = "reverse"
            notes.append("reverse mode: forward mode would need all of one sample's directions at once, over the "
                         "memory budget, and only rows can be written in parts")
    T, n_c, t_c = chunks(mode)
    if mode == "forward" and t_c < T:
        raise MemoryBudgetError(
            f"forward mode fills one sample's Jacobian ({n_sel} x {n_in}) by columns, all {n_in} directions at once, "
            f"and those take more than --max-memory ({gib(max_memory)}) allows: use --mode reverse or raise --max-memory"
        )

    if outputs is None and not flat:
        shape = (N, *out_shape, *in_shape)
    else:
        shape = (N, n_sel, *in_shape) if not flat else (N, n_sel, n_in)
    if not plan.depends and not plan.quantized:  # a quantizer on the way has its own note
        notes.append(f"output '{of_v.name}' does not depend on input '{wrt_v.name}': the Jacobian is zero")
    res = Result(None, shape, "input", of_v.name, wrt_v.name, mode, out_shape, in_shape, sel,
                 outputs=np.empty((N, *out_shape), dtype), chunks=(n_c, t_c), estimate=est, notes=notes, dtype=dtype,
                 labels=_element_labels(model, wrt_v.name, in_shape))

    def fill(env, Jb, s0, s1, t_c, r0):  # directions s0..s1 into block Jb, whose directions start at r0
        n = Jb.shape[0]
        for s in range(s0, s1, t_c):
            e = min(s1, s + t_c)
            if mode == "forward":
                seed = np.zeros((e - s, n, n_in), dtype)
                seed[np.arange(e - s), :, np.arange(s, e)] = 1
                D = walk.jvp(plan, env, {wrt_v.name: seed.reshape((e - s, n) + in_shape)})
                if D is None:
                    Jb[:, :, s - r0:e - r0] = 0
                else:
                    Jb[:, :, s - r0:e - r0] = D.reshape(e - s, n, n_out)[:, :, sel].transpose(1, 2, 0)
            else:  # the cotangents' home is the block itself, in their layout (directions, samples, *in_shape)
                home = Jb[:, s - r0:e - r0, :].transpose(1, 0, 2)
                home.shape = (e - s, n) + tuple(in_shape)  # splits the contiguous last axis: a view
                walk.vjp_identity(plan, env, sel[s:e], [wrt_v.name], dtype, sinks={wrt_v.name: home})

    _fill_blocks(plan, feeds, res, T, fill, target, on_block, run_size)
    res.seconds = time.perf_counter() - t0
    return res if return_result else res.value


def _value_shape(plan, feeds, name, size=1):
    """The per-sample shape of an intermediate value differentiated with respect to; it must
    carry the sample axis first and be a float tensor. `size`: samples per run (a fixed batch)."""
    if name not in plan.batched:
        raise UsageError(f"value '{name}' does not depend on the input samples; there is nothing to differentiate")
    if not plan.depends:  # not on the way to the output: the plan need not even compute it
        raise UsageError(f"output '{plan.of}' does not depend on value '{name}'; there is nothing to differentiate")
    # two samples tell the sample axis from a dimension of 1
    n = size if size > 1 else min(2, samples_in(feeds))
    v = np.asarray(walk.primal(plan, _pad_samples(_slice_samples(feeds, 0, n), n))[name])
    if not np.issubdtype(v.dtype, np.floating):
        raise UsageError(f"value '{name}' is a {v.dtype} tensor, not a float one; it cannot be differentiated")
    _check_sample_axis(v, n, name)
    return v.shape[1:]


def _sink(block, col):
    """The columns of one parameter in a result block (samples, directions, P) as a view shaped
    (directions, samples, *param.shape): the layout of a per-sample cotangent, no copy."""
    view = block[:, :, col["offset"]: col["offset"] + col["size"]].transpose(1, 0, 2)
    view.shape = view.shape[:2] + tuple(col["shape"])  # splits the contiguous last axis: a view
    return view


class ArrayTarget:
    """The result in memory: blocks are views of one array, written once, in place."""

    def open(self, result):
        need = math.prod(result.flat_shape) * result.dtype.itemsize
        free = available_memory() if need > _MEMORY_CHECK_ABOVE else None
        if free is not None and need > free:
            raise MemoryBudgetError(
                f"the Jacobian {tuple(result.shape)} {result.dtype} takes {gib(need)}, more than the {gib(free)} of memory "
                f"available: write it to a file block by block (target=jaccli.io.FileTarget(path, 'npy'); -o on the "
                f"command line), or ask for fewer outputs, parameters or samples"
            )
        result.J = allocate(result.flat_shape, result.dtype)

    def block(self, result, a, b, rows):
        return result.J[a:b, rows[0]:rows[1]]

    def write(self, result, a, b, block, rows):
        pass


def _fill_blocks(plan, feeds, res, T, fill, target, on_block, run_size=0):
    """Fill the result block by block of samples, in order: for each, the primal pass, then
    `fill(env, rows, s0, s1, t_c, r0)` for directions s0..s1 in chunks of t_c, into rows whose
    directions start at r0. The model outputs are kept; a block is written to the target and
    reported once filled.

    Within a block the work is split over the cores (see parallel.py): by samples, each part
    with its own primal pass, or, for a block of fewer samples than cores, by directions, in
    chunks divided among the parts so that together they stay within the budget.

    When one sample's rows are more than the budget holds (res.block_rows), a block is one
    sample and that many of its rows: the blocks still come in the order of the result's bytes.

    With `run_size` (a model's fixed batch), a block is one run of that many samples, split by
    directions only; the last is padded with copies of its last sample, whose rows go nowhere.
    """
    target = target or ArrayTarget()
    N, (n_c, t_c) = res.shape[0], res.chunks
    res.block_rows = t_c if t_c < T else 0  # a chunk short of all directions: only in reverse, where they are rows
    target.open(res)
    R = res.block_rows or T
    parts = _parts(plan, res, T, n_c, t_c)
    if run_size:
        spans = [(a, min(N, a + n_c)) for a in range(0, N, n_c)]
    else:  # blocks of nearly equal size (8 samples in chunks of at most 5: two of 4, not 5 and 3), so that their parts are balanced too
        spans = parallel.split(0, N, -(-N // n_c))
    with parallel.section() if parts > 1 else contextlib.nullcontext():
        for a, b in spans:
            env = None

            def primal(lo, hi):
                f = _slice_samples(feeds, lo, hi)
                values = walk.primal(plan, _pad_samples(f, run_size) if run_size else f)
                _check_sample_axis(values[plan.of], run_size or hi - lo, res.of)
                res.outputs[lo:hi] = values[plan.of][: hi - lo]
                return values

            def samples(block, lo, hi):
                return lambda: fill(primal(lo, hi), block[lo - a:hi - a], 0, T, t_c, 0)

            def directions(env, block, s, e, step, r0):
                return lambda: fill(env, block, s, e, step, r0)

            for r0 in range(0, T, R):
                dirs = (r0, min(T, r0 + R))
                rows = dirs if R < T else (0, res.flat_shape[1])  # directions are rows when in parts
                block = target.block(res, a, b, rows)
                work = block if b - a == n_c or not run_size else np.empty((n_c,) + block.shape[1:], block.dtype)
                if b - a >= parts and R == T and not run_size:
                    parallel.run([samples(block, lo, hi) for lo, hi in parallel.split(a, b, parts)])
                else:  # k parts of `step` directions each hold no more than one chunk: n_c x t_c
                    env = primal(a, b) if env is None else env
                    k = min(parts, max(1, n_c * t_c // (b - a)))
                    step = max(1, n_c * t_c // ((b - a) * k))
                    parallel.run([directions(env, work, s, e, step, r0) for s, e in parallel.split(*dirs, k)])
                if work is not block:
                    block[...] = work[: b - a]
                target.write(res, a, b, block, rows)
                if on_block:
                    on_block(res, a, b, block, rows)


# per-core rates for guessing a block's time, and the Python time of one step of a sweep: a
# part runs every step, and the parts' Python runs one at a time (the GIL)
_CORE_FLOPS, _CORE_WRITE, _STEP_SECONDS = 50e9, 5e9, 5e-5


def _parts(plan, res, T, n_c, t_c):
    """Into how many parts a block is split: one per core, unless the block's numpy work (its
    multiply-adds and the bytes of its rows of the result) is under twice what the extra
    parts would add in Python time, or the block can be divided neither by samples nor by
    directions, or nearly all of that work is products by wide matrices and the block is of
    middling size (see _WIDE_SHARE)."""
    parts = parallel.workers()
    rows = n_c * math.prod(res.flat_shape[1:]) * res.dtype.itemsize
    madd = 2 * T * n_c / _CORE_FLOPS  # seconds of a multiply-add per sample and direction, all of them
    work = res.estimate.get("flops_per_direction", 0) * madd + rows / _CORE_WRITE
    wide = res.estimate.get("wide_flops_per_direction", 0) * madd
    python = (len(plan.steps) + len(plan.active_steps)) * -(-T // t_c) * _STEP_SECONDS
    if parts == 1 or work < 2 * parts * python:
        return 1
    if n_c < parts and t_c < parts:
        return 1
    if wide >= _WIDE_SHARE * work and work < _WIDE_BELOW:
        return 1
    return parts


# A block whose work is nearly all products by wide matrices (an MLP's input Jacobian) runs as
# one part, with BLAS's own threads: they share the packed matrix, where two parts each pack
# it and contend (an MLP 784-256-256-10's input Jacobian, 32 to 256 samples, 4 to 29 ms of
# work: one part 0.73-0.99x the time of two, measured side by side). Above some tens of
# milliseconds the two come out even, and parts also spread the elementwise passes.
_WIDE_SHARE, _WIDE_BELOW = 0.9, 0.05


_MEMORY_CHECK_ABOVE = 64 << 20  # bytes of result below which reading /proc/meminfo costs more than it could save


def available_memory():
    """Bytes of memory the kernel reckons available (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def allocate(shape, dtype):
    """A result array. A large one is in anonymous memory advised for huge pages: it is written
    exactly once, and faulting its memory in 4 KiB pages would cost more than computing it.

    And a large result's memory is kept when the result is freed (once no view of it is left),
    for the next result of the same size: a loop of calls (batches of samples) then writes
    into memory already faulted in, where fresh memory costs a zeroing pass by the kernel, as
    long as writing the result. At most _POOL_BYTES are kept this way, never more than a
    quarter of the memory available; JACCLI_MALLOC=0 turns it off (see parallel.tune_malloc).
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 64 << 20 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype)
    with _pool_lock:
        m = _pool.pop(nbytes, None)
    if m is None:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
    if os.environ.get("JACCLI_MALLOC", "1") == "0":
        return np.frombuffer(m, dtype).reshape(shape)  # the array keeps the mapping alive
    owner = (ctypes.c_char * nbytes).from_buffer(m)  # every view of the result holds it
    weakref.finalize(owner, _release, m).atexit = False
    return np.frombuffer(owner, dtype).reshape(shape)


_pool: dict[int, mmap.mmap] = {}  # size: the mapping of a freed result, in the order freed
_pool_lock = threading.Lock()
_POOL_BYTES = 2 << 30


def _release(m):
    """A freed result's mapping: kept for reuse within the pool's bounds, the oldest dropped
    (a dropped mapping is unmapped when its last reference goes)."""
    free = available_memory()
    cap = _POOL_BYTES if free is None else min(_POOL_BYTES, free // 4)
    if len(m) > cap:
        return
    with _pool_lock:
        _pool.pop(len(m), None)
        _pool[len(m)] = m
        while sum(map(len, _pool.values())) > cap:
            _pool.pop(next(iter(_pool)))


def _first_float(model, of=None):
    """The first float input (that the output `of` depends on, if given)."""
    inputs = model.inputs if of is None else model.inputs_of([of])
    if not inputs:
        raise _constant(of)
    for v in inputs:
        if v.is_float:
            return v
    entry = _float_entry(model, of)
    hint = f": name a float value inside the graph with --wrt (wrt= in Python), such as {entry}" if entry else ""
    raise UsageError(f"the model has no float input to differentiate with respect to{hint}")


def _constant(name):
    return UsageError(f"'{name}' depends on no model input: it is the same for every sample, with nothing to "
                      f"differentiate per sample")


def _float_entry(model, of=None):
    """Where the inputs first become floats on the way to output `of`, described for a hint: the
    first Gather from a float table by indices that come from the inputs (token ids looked up
    in an embedding), or onnxruntime's fused EmbedLayerNormalization, or a text pipeline's
    TfIdfVectorizer, or the first Cast of an
    input to a float type (an image's integer pixels); failing those, the first Cast to a float
    type of a value made from the inputs (a one-hot Equal, as Magika encodes a file's bytes; a
    transformer's mask cast comes before its embeddings, which are the better answer); None if
    none. Only values that the output depends on through more than their shapes count (a
    lookup whose Shape makes position ids does not)."""
    nodes = model.nodes if of is None else model.ancestors([of])
    reach = {of}
    for n in reversed(nodes):
        if n.op_type not in _SHAPE_ONLY and any(o in reach for o in n.outputs):
            reach.update(n.inputs)
    inputs = {v.name for v in model.inputs}
    from_inputs = set(inputs)  # values that depend on the inputs' values, not only on their shapes
    derived = None  # the first Cast to float of a value made from the inputs: the last resort
    for n in nodes:
        if n.op_type in _SHAPE_ONLY or not any(v in from_inputs for v in n.inputs):
            continue
        from_inputs.update(n.outputs)
        if of is not None and n.outputs[0] not in reach:
            continue
        table = model.initializers.get(n.inputs[0]) if n.inputs else None
        if n.op_type == "Gather" and table is not None and np.issubdtype(table.dtype, np.floating) and n.inputs[1] in from_inputs:
            return f"the embeddings '{n.outputs[0]}'"
        if n.op_type == "Cast" and n.attrs.get("to") in _FLOAT_TYPES:
            if n.inputs[0] in inputs:
                return f"'{n.outputs[0]}', input '{n.inputs[0]}' cast to float"
            derived = derived or f"'{n.outputs[0]}', the first float value made from the inputs (a one-hot encoding of bytes, say)"
        if n.op_type == "EmbedLayerNormalization":  # onnxruntime's optimizer fused the lookup and its norm
            return f"the normalised embeddings '{n.outputs[0]}'"
        if n.op_type == "TfIdfVectorizer":  # a text pipeline's n-gram counts (scikit-learn's vectorizers)
            return f"the n-gram counts '{n.outputs[0]}'"
    return derived


_SHAPE_ONLY = ("Shape", "Size")  # operators that read only their input's shape
_STRING = 8  # onnx's TensorProto.STRING
_FLOAT_TYPES = {1, 10, 11, 16, "FLOAT", "DOUBLE", "FLOAT16"}  # TensorProto's float types; opset 1's Cast names them


def samples_first(model, of, feeds, dtype=np.float32):
    """The value whose Jacobian is taken for output `of`, and a note for the summary (the drivers
    ask where their run finds its first axis not the samples', see _prepared_output; check asks
    first, to lay out its oracle's model): `of` itself where its first axis is the samples'
    (the usual export); else `of` with its samples
    moved first (see Model.samples_first), and the note says where they were. Time-major
    outputs (T, N, C), as OCR models' CTC heads and recurrent layers without batch_first write
    them, have the samples on axis 1: the probe finds the one axis that goes from 1 to 2 with
    two copies of the first sample. A model run one sample at a time (its batch fixed at 1)
    gives its whole output to that sample: its one axis of size 1 is taken out, or, with none
    or several, the output is kept whole. Anything else is left to the usual error."""
    shapes = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(feeds.items()))
    key = ("samples first", of, np.dtype(dtype).str, shapes)
    if key not in model.plans:
        model.plans[key] = _find_sample_axis(model, of, feeds, dtype)
    axis, rank = model.plans[key]
    if axis is False:
        return of, None
    where = "has no sample axis; each sample's output is the whole output of its run" if axis is None else \
        f"carries the samples on axis {axis}; each sample's output is its slice along that axis"
    return model.samples_first(of, axis, rank), f"output '{of}' {where}"


def _find_sample_axis(model, of, feeds, dtype):
    """(axis, rank) of output `of` for samples_first: axis False where its first axis is the
    samples' or nothing better is found, None where a run of one sample keeps the whole output."""
    size = model.fixed_batch()[1]
    if size and size > 1:
        return False, 0  # runs of a fixed batch: the first axis or the usual error
    plan = Plan(model, of, [], dtype)
    cast = {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in feeds.items()}
    try:
        y1 = np.asarray(walk.primal(plan, _slice_samples(cast, 0, 1))[of])
        if y1.ndim and y1.shape[0] == 1:
            return False, 0
        if size == 1:
            ones = [a for a, d in enumerate(y1.shape) if d == 1]
            return (ones[0] if len(ones) == 1 else None), y1.ndim
        y2 = np.asarray(walk.primal(plan, _copies(cast, 0, 2))[of])
    except (JaccliError, ValueError, TypeError):  # an error of the model, or an output that is no tensor (a sequence)
        return False, 0  # the usual run reports it
    grew = [a for a in range(y1.ndim) if y2.ndim == y1.ndim and (y1.shape[a], y2.shape[a]) == (1, 2)]
    if len(grew) != 1 or any(p != q for a, (p, q) in enumerate(zip(y1.shape, y2.shape)) if a != grew[0]):
        return False, 0
    return grew[0], y1.ndim


def _check_sample_axis(y, n, name):
    if y.ndim == 0 or y.shape[0] != n:
        raise SampleAxisError(
            f"output '{name}' has shape {y.shape} for {n} sample(s): its axis 0 is not the sample axis, "
            f"so per-sample Jacobians cannot be paired with the input's samples"
        )


# ---- per-sample parameter Jacobian ------------------------------------------------------------


@_within_budget
def param_jacobian(model, x, params=None, of=None, dtype=np.float32, outputs=None, max_memory=DEFAULT_MAX_MEMORY,
                   target=None, return_result=False, on_block=None, straight_through=False, sample_axes=None,
                   one_by_one=False):
    """Per-sample Jacobian of output `of` with respect to the parameters: (N, *out_shape, P).
    `straight_through`, `sample_axes` and `one_by_one` as for input_jacobian.

    Columns follow the model's initializer order, each tensor flattened in C order. By default
    the parameters are the float initializers of rank >= 1 that reach the output through
    differentiable inputs (Model.parameters: not a shape's or a scale's constants; exporters keep
    constants such as 0.5 as 0-d initializers); `params` (glob patterns) selects among all float
    initializers that reach it so, 0-d ones included. Returns (array, column map). `target` and
    `on_block` as for input_jacobian.
    """
    t0 = time.perf_counter()
    model = load(model, max_bytes=max_memory, sample_axes=sample_axes, one_by_one=one_by_one)
    dtype = np.dtype(dtype)
    of_v = model.output(of)
    out_notes = _output_notes(model, of, of_v)
    names = model.parameters(of_v.name)
    if params:  # patterns choose among all float initializers, 0-d ones included
        pats = [params] if isinstance(params, str) else list(params)
        names = [n for n in model.parameters(of_v.name, scalars=True) if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        if not names:
            raise UsageError(f"no parameter matches {', '.join(pats)} (see `jaccli inspect` for their names)")
    if not names:
        integer = _integer_ops(model.nodes) or _dequantized_weights(model)
        ml = sorted({n.op_type for n in model.ancestors([of_v.name]) if n.domain == "ai.onnx.ml"})
        raise UsageError(f"output '{of_v.name}' depends on no float parameter" + (
            f": its weights are integers, quantized ({', '.join(integer[:3])}{' ...' if len(integer) > 3 else ''}); take "
            f"the parameter Jacobian of the float model"
            if integer else f": its ai.onnx.ml operators ({', '.join(ml)}) hold their coefficients as "
                            f"attributes, not tensors" if ml else ""))
    feeds, N = prepare_feeds(model, x, dtype, of=[of_v.name])
    moved, plan, (est, y1, per_run, run_size, _) = _prepared_output(model, of_v.name, names, dtype, True, feeds, N,
                                                                    straight_through)
    of = plan.of
    if of not in plan.batched:
        raise DataError(f"output '{of_v.name}' does not depend on the input samples")
    out_shape = y1.shape[1:]
    sel = _output_rows(outputs, of_v.name, out_shape)
    n_sel = sel.size

    columns, off = [], 0
    for n in names:
        columns.append({**model.parameter_entry(n), "offset": off})
        off += columns[-1]["size"]
    P = off
    T = n_sel
    n_c, t_c = choose_chunks(per_run, T, est, max_memory, extra_per_sd=P * dtype.itemsize, run_size=run_size)
    shape = (N, *out_shape, P) if outputs is None else (N, n_sel, P)
    notes = (([moved] if moved else []) + out_notes + (list(plan.notes) if N > 1 else []) + _run_notes(model, run_size)
             + _derivative_notes(plan))
    if not params:
        marked = sorted(model.exported_constants().intersection(model.parameters(of_v.name, scalars=True)))
        marked = [n for n in marked if model.initializers[n].ndim > 0]
        if marked:
            notes.append(f"{len(marked)} float initializer{'s' if len(marked) > 1 else ''} reaching '{of_v.name}' "
                         f"{'are buffers or constants' if len(marked) > 1 else 'is a buffer or a constant'} by the marks "
                         f"torch.export left in the model, not parameters: {', '.join(marked[:4])}"
                         f"{' ...' if len(marked) > 4 else ''} (--params selects by name)")
        if model.export_removed:
            notes.append(removed_note(model.export_removed))
    fused = {n: bn for n, bn in model.export_fused.items() if n in names}
    if fused:
        notes.append(fused_note(fused))
    zero = [c["name"] for c in columns if c["name"] not in plan.active]
    if zero:
        notes.append(f"output '{of_v.name}' does not depend on {', '.join(zero)}: their columns are zero")
    res = Result(None, shape, "params", of_v.name, names, "reverse", out_shape, (), sel, columns,
                 np.empty((N, *out_shape), dtype), chunks=(n_c, t_c), estimate=est, notes=notes, dtype=dtype)

    def fill(env, Jb, s0, s1, t_c, r0):  # directions s0..s1 into block Jb (samples, rows from r0, P)
        for s in range(s0, s1, t_c):
            e = min(s1, s + t_c)
            # where rows mix samples, one sample's seed at a time, in a run of one or of a fixed batch
            for j in range(len(Jb)) if plan.rows_mix_samples else [None]:
                rows = Jb if j is None else Jb[j:j + 1]
                sinks = {col["name"]: _sink(rows[:, s - r0:e - r0], col) for col in columns}
                seed = walk.identity_seed(sel[s:e], env[of], dtype)
                if j is not None:
                    seed[:, :j] = seed[:, j + 1:] = 0
                walk.vjp(plan, env, seed, names, sinks)

    _fill_blocks(plan, feeds, res, T, fill, target, on_block, run_size)
    res.seconds = time.perf_counter() - t0
    return res if return_result else (res.value, columns)
