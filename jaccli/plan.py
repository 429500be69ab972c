"""The symbolic step: order, rule lookup, constant folding, activity, costs and memory.

Nothing here computes a derivative. A Plan says which nodes run, which are active (depend
on what we differentiate with respect to and reach the output of interest), which values
carry the sample axis, and what one sample and one direction cost in flops and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper

from .errors import JaccliError, ModelError, UnsupportedOpError
from .model import FLOAT_TYPES, Graph, Model
from .rules import lookup, straight_through


@dataclass
class Step:
    node: object
    rule: type
    attrs: dict
    inputs: tuple
    outputs: tuple
    active: bool = False
    diff_in: tuple = ()  # input k is active and differentiable
    keep: tuple = ()  # input k needs a per-sample cotangent (parameter into a batched node)
    grouped: bool = False  # its first input's rows are the samples' merged with another axis, sample by
    # sample, which the rule's per-sample cotangents follow (set by the drivers' probe: drivers._grouped)
    inner: dict = field(default_factory=dict)  # {batched value: merged}: it holds slices of the samples ahead of
    # them, (S, N, ...), or merged, (S*N, ...); the walker moves the samples first (drivers._samples_inside)


@dataclass(frozen=True)
class Region:
    """Pointwise steps (in order) from the value `entry` to the value `exit` (see Plan._diagonal_regions)."""

    steps: tuple
    entry: str
    exit: str


class Plan:
    """How to evaluate output `of` and differentiate it with respect to the values in `wrt`.

    `per_sample` asks for per-sample cotangents of values without a sample axis (the
    per-sample parameter Jacobian); otherwise `wrt` are data inputs.
    """

    def __init__(self, model: Model, of, wrt, dtype=np.float32, per_sample=False, unbatched=(), through=False, shared=()):
        # `of`: one value, or several (a sub-graph's outputs; self.of is then the first).
        # `unbatched`: data inputs without a sample axis (a sub-graph's inputs from outside)
        # `shared`: values computed from the data's shape, not its samples, which the drivers' probe
        # found the same for any samples (drivers._shared_values): they have no sample axis either
        self.outs = (of,) if isinstance(of, str) else tuple(of)
        self.model, self.of, self.wrt, self.dtype = model, self.outs[0], tuple(wrt), np.dtype(dtype)
        self.per_sample = per_sample
        self._unbatched, self._through, self.shared = unbatched, through, frozenset(shared)
        self.notes = []  # what the drivers learn of the graph when they first run it, for the summary
        self.rows_mix_samples = False  # set by the drivers' probe: per-sample cotangents one sample at a time
        data_inputs = {v.name for v in model.inputs}
        self.optional_inputs = tuple(v.name for v in model.inputs if v.optional)  # graph inputs the data may leave out
        nodes = model.ancestors(self.outs)
        require_rules(nodes)

        wrt_set = set(self.wrt)
        self.consts = {
            k: _as_compute(v, self.dtype) for k, v in model.initializers.items() if k not in wrt_set
        }
        self.params = {k: _as_compute(model.initializers[k], self.dtype) for k in self.wrt if k in model.initializers}
        steps = []
        for node in nodes:
            rule = lookup(node.op_type, node.opset, node.domain, node.name)
            if through:  # quantize-dequantize pairs differentiated as the identity (see rules.straight_through)
                rule = straight_through(rule)
            step = Step(node, rule, self._attrs(node, rule), node.inputs, node.outputs)
            if all((not v) or v in self.consts for v in node.inputs):
                self._fold(step)
            else:
                steps.append(step)
        self.steps = steps = self._pool_before_activation(self._fold_batchnorm(steps))

        # values with the sample axis: graph inputs and all that depends on them (shapes too), but
        # for steps whose output has one only if their data has (slices, pieces, paddings: rules'
        # batch_from_data), where what is read from a shape is their bounds, not a sample axis
        batched = set(data_inputs) - set(unbatched)
        for s in steps:
            by_data = getattr(s.rule, "batch_from_data", False)
            if any(v in batched for k, v in enumerate(s.inputs) if v and not (by_data and k in s.rule.nondiff)):
                batched.update(o for o in s.outputs if o not in self.shared)
        self.batched = batched
        for s in steps:  # rules that run sub-graphs need to know which of their inputs have a sample axis
            if getattr(s.rule, "needs_batched", False):
                s.attrs = {**s.attrs, "batched": tuple(bool(v) and v in batched for v in s.inputs)}

        # activity: forward from wrt through differentiable slots, backward from `of`
        fwd = set(wrt_set)
        for s in steps:
            for k, why in s.rule.opaque(s.attrs).items():  # read without a derivative (see rules._finish)
                if k < len(s.inputs) and s.inputs[k] in fwd:
                    raise UnsupportedOpError(f"node '{s.node.name}': {s.node.op_type} (opset {s.node.opset}): {why}")
            if any(v in fwd for k, v in enumerate(s.inputs) if v and k not in s.rule.nondiff):
                fwd.update(s.outputs)
        bwd = set(self.outs)
        for s in reversed(steps):
            if any(o in bwd for o in s.outputs):
                bwd.update(v for k, v in enumerate(s.inputs) if v and k not in s.rule.nondiff)
        self.active = (fwd & bwd) | (set(self.outs) & fwd)
        for s in steps:
            s.active = any(o in self.active for o in s.outputs)
            s.diff_in = tuple(bool(v) and v in self.active and k not in s.rule.nondiff for k, v in enumerate(s.inputs))
            s.keep = tuple(
                d and per_sample and v not in batched and s.outputs[0] in batched for d, v in zip(s.diff_in, s.inputs)
            )
            if s.active and any(s.diff_in) and not s.rule.differentiable:  # not the producer of a value differentiated with respect to
                raise UnsupportedOpError(
                    f"node '{s.node.name}': {s.node.op_type} (opset {s.node.opset}) has no derivative rule, "
                    f"but lies between the output and what is differentiated"
                )
            if any(s.keep) and not getattr(s.rule, "keeps", False):
                raise UnsupportedOpError(
                    f"node '{s.node.name}': per-sample parameter cotangents through {s.node.op_type} are not supported"
                )
        self.active_steps = [s for s in steps if s.active]
        # a quantization between what is differentiated and the output (every step leads to the output):
        # its integer output is piecewise constant, and stops the derivatives unless taken straight through
        found = [s.node.op_type for s in steps if quantizes(s.node, model.initializers) and s.inputs[0] in fwd]
        self.quantizer_ops = " or ".join(sorted(set(found)))  # what the notes name
        self.quantized = not through and len(found) > 0  # a QuantizeLinear stops the derivatives
        self.through = len(found) if through else 0  # those taken straight through
        # piecewise-constant operators (tree ensembles) that the derivatives reach: they pass zero
        self.flat = sorted({s.node.op_type for s in self.active_steps  # in its data, input 0 (a tree's weights are smooth)
                            if getattr(s.rule, "piecewise_constant", False) and s.diff_in[:1] == (True,)})
        self.depends = any(o in fwd for o in self.outs)  # False: the output does not depend on wrt at all
        self._liveness()
        self.regions = self._diagonal_regions()
        # steps whose outputs are pieces of their (batched) input: {output: (step, index)}
        self.pieces = {o: (st, k) for st in self.active_steps if hasattr(st.rule, "piece_axis") and st.diff_in[:1] == (True,)
                       and st.inputs[0] in self.batched and not any(st.keep) for k, o in enumerate(st.outputs) if o}

    def in_float64(self):
        """The same plan, computing in float64."""
        return Plan(self.model, self.outs, self.wrt, np.float64, self.per_sample, self._unbatched, self._through, self.shared)

    # ---- construction helpers ----------------------------------------------------------------

    def _attrs(self, node, rule):
        # consumed_inputs (opsets 1-5) was an in-place hint with no effect on the result; a rule names
        # others of its old forms that change nothing in what it computes (ignored_attrs)
        ignored = ("consumed_inputs",) + tuple(getattr(rule, "ignored_attrs", ()))
        attrs = {k: _as_compute(v, self.dtype) if isinstance(v, np.ndarray) else v for k, v in node.attrs.items()
                 if k not in ignored}
        if node.op_type == "Cast" and isinstance(attrs.get("to"), str):  # opsets 1-5 name the type
            attrs["to"] = getattr(TensorProto, attrs["to"].upper(), attrs["to"])
        if node.op_type == "Cast" and attrs.get("to") in FLOAT_TYPES:
            attrs["to"] = helper.np_dtype_to_tensor_dtype(self.dtype)
        if rule.attrs is None:
            return attrs
        if "n_outputs" in rule.attrs:  # a few ops (Split) depend on how many outputs the node has
            attrs["n_outputs"] = len(node.outputs)
        unknown = sorted(k for k in node.explicit if k not in rule.attrs and attrs.get(k) is not None and k in attrs)
        if unknown:
            raise UnsupportedOpError(
                f"node '{node.name}': attribute '{unknown[0]}' of {node.op_type} (opset {node.opset}) is not supported"
            )
        return {k: v for k, v in attrs.items() if k in rule.attrs}

    def _fold(self, step):
        """Evaluate a node whose inputs are all constants, once, now."""
        args = [self.consts[v] if v else None for v in step.inputs]
        try:
            out = run_forward(step, args)
        except JaccliError:
            raise
        except Exception as e:
            raise ModelError(f"node '{step.node.name}' ({step.node.op_type}) fails on its constant inputs: {e}") from None
        for name, value in zip(step.outputs, out):
            if name:
                self.consts[name] = _as_compute(value, self.dtype)

    def _fold_batchnorm(self, steps):
        """Merge an inference BatchNormalization into the convolution before it, where the
        convolution's output feeds nothing else and every tensor of both is a constant (so never
        for parameters being differentiated): W' = W * a, B' = B * a + (beta - mean * a) with
        a = gamma / sqrt(var + eps), per output channel. One node, not two, in every sweep."""
        readers = _readers(steps)
        drop = set()
        for s in steps:
            if s.node.op_type != "Conv" or s.node.domain not in ("", "ai.onnx") or len(s.inputs) < 2:
                continue
            y = s.outputs[0]
            bn = readers.get(y, [])
            if y in self.outs or len(bn) != 1 or bn[0].node.op_type != "BatchNormalization" or bn[0].inputs[0] != y:
                continue
            bn = bn[0]
            if bn.attrs.get("training_mode") or not bn.attrs.get("spatial", 1) or len([o for o in bn.outputs if o]) != 1:
                continue
            names = [s.inputs[1], *(s.inputs[2:3])] + list(bn.inputs[1:5])
            if len(bn.inputs) < 5 or not all(v and v in self.consts for v in names):
                continue
            W = self.consts[s.inputs[1]]
            B = self.consts[s.inputs[2]] if len(s.inputs) > 2 and s.inputs[2] else np.zeros(W.shape[0], W.dtype)
            gamma, beta, mean, var = (self.consts[v] for v in bn.inputs[1:5])
            a = gamma / np.sqrt(var + W.dtype.type(bn.attrs.get("epsilon", 1e-5)))
            w_name, b_name = f"{s.inputs[1]}*{bn.node.name}", f"{y}+{bn.node.name}"
            self.consts[w_name] = (W * a.reshape((-1,) + (1,) * (W.ndim - 1))).astype(W.dtype)
            self.consts[b_name] = (B * a + (beta - mean * a)).astype(W.dtype)
            s.inputs = (s.inputs[0], w_name, b_name)
            s.outputs = (bn.outputs[0],) + tuple(s.outputs[1:])
            drop.add(id(bn))
        return [s for s in steps if id(s) not in drop]

    def _pool_before_activation(self, steps):
        """MaxPool after a nondecreasing pointwise activation (Relu, LeakyRelu with alpha >= 0,
        Sigmoid, Tanh): max(f(x)) = f(max(x)), so the pool runs first and the activation on its
        output, a quarter of the values for a 2x2 pool, in every sweep. Only where the
        activation's output feeds that MaxPool alone (and is neither output nor differentiated)
        and the pool's indices are not asked for. The derivatives agree wherever they exist."""
        readers = _readers(steps)
        swapped = {}
        for s in steps:
            op = s.node.op_type
            if s.node.domain not in ("", "ai.onnx") or op not in _MONOTONE or len(s.outputs) != 1:
                continue
            if op == "LeakyRelu" and s.attrs.get("alpha", 0.01) < 0:
                continue
            v = s.outputs[0]
            pool = readers.get(v, [])
            if v in self.outs or v in self.wrt or len(pool) != 1 or pool[0].node.op_type != "MaxPool":
                continue
            pool = pool[0]
            if pool.inputs[0] != v or len([o for o in pool.outputs if o]) != 1 or pool.node.domain not in ("", "ai.onnx"):
                continue
            pooled = f"{pool.outputs[0]}<{s.node.name}"  # the pool of the activation's input
            swapped[id(s)] = None
            swapped[id(pool)] = (Step(pool.node, pool.rule, pool.attrs, (s.inputs[0],), (pooled,)),
                                 Step(s.node, s.rule, s.attrs, (pooled,), (pool.outputs[0],)))
        out = []
        for s in steps:
            if id(s) not in swapped:
                out.append(s)
            elif swapped[id(s)] is not None:
                out.extend(swapped[id(s)])
        return out

    def _liveness(self):
        """Index of the last active step that reads each value (for freeing (co)tangents)."""
        last = {}
        for i, s in enumerate(self.active_steps):
            for v in s.inputs:
                if v:
                    last[v] = i
        self.last_use = last
        uses = {}
        for s in self.active_steps:
            for v, d in zip(s.inputs, s.diff_in):
                if d:
                    uses[v] = uses.get(v, 0) + 1
        self.uses = uses  # how many active steps pull a cotangent into each value
        # parameters read once, by a Transpose whose output is read once (exporters keep a
        # weight's transpose in the graph): {output: (parameter, perm)}, so that the reader of
        # the output can write the parameter's cotangent in its place
        self.param_transposes = {}
        for s in self.active_steps:
            src, dst = (s.inputs[0], s.outputs[0]) if s.inputs else (None, None)
            if s.node.op_type == "Transpose" and s.diff_in[0] and src in self.params and uses.get(src) == 1 and uses.get(dst) == 1:
                nd = self.params[src].ndim
                perm = s.attrs.get("perm")
                self.param_transposes[dst] = (src, list(perm) if perm is not None and len(perm) else list(range(nd))[::-1])
        needed = {v for s in self.active_steps for v in s.inputs + s.outputs if v} | set(self.outs)
        last_fwd = {}
        for i, s in enumerate(self.steps):
            for v in s.inputs:
                if v:
                    last_fwd[v] = i
        self.free_after = [
            [v for v, j in last_fwd.items() if j == i and v not in needed and v not in self.consts] for i in range(len(self.steps))
        ]

    def _diagonal_regions(self):
        """Groups of two or more pointwise steps (GELU's Div, Erf, Add, Mul, Mul; SiLU's Sigmoid
        and Mul) that lead from one active value, the entry, to one other, the exit, with every
        value in between read inside the group only. Their Jacobian is diagonal, so the walkers
        take it as one vector d = the group's tangent along ones (one JVP on primal-sized
        arrays) and multiply the tangents or cotangents once, where step by step would make a
        pass or two over them per step. Shapes are known only at run time: a region applies
        when its exit has its entry's shape (then no active value in it is broadcast).
        {id(step): Region} for every step of a region."""
        producer = {o: s for s in self.active_steps for o in s.outputs if o}
        readers = {}
        for s in self.active_steps:
            for v, d in zip(s.inputs, s.diff_in):
                if d:
                    readers.setdefault(v, set()).add(id(s))
        order = {id(s): i for i, s in enumerate(self.active_steps)}

        def candidate(s):
            return s.rule.pointwise and len(s.outputs) == 1 and not any(s.keep) and id(s) not in taken

        def entries(group):
            made = {s.outputs[0] for s in group}
            return {v for s in group for v, d in zip(s.inputs, s.diff_in) if d and v not in made}

        taken, regions = set(), {}
        for s in reversed(self.active_steps):
            if not candidate(s):
                continue
            group, members, grown = [s], {id(s)}, True
            while grown:
                grown = False
                for v in entries(group):
                    p = producer.get(v)
                    if p is not None and v not in self.outs and candidate(p) and readers[v] <= members:
                        group.append(p)
                        members.add(id(p))
                        grown = True
            ins = entries(group)
            if len(group) >= 2 and len(ins) == 1 and next(iter(ins)) in self.batched:
                group.sort(key=lambda g: order[id(g)])
                region = Region(tuple(group), next(iter(ins)), s.outputs[0])
                taken |= members
                regions.update({id(g): region for g in group})
        return regions

    # ---- estimates from one measured primal pass ----------------------------------------------

    def estimate(self, env, n):
        """Per-sample figures from a primal pass `env` over n samples.

        Returns dict(bytes_primal, bytes_per_direction, flops_per_direction,
        wide_flops_per_direction), each per sample: bytes of the kept intermediates, peak bytes
        of live (co)tangents and a step's temporaries for one direction, multiply-adds for one
        direction, and those of them in products by a wide 2-D matrix (see _wide_product).
        """
        item = self.dtype.itemsize

        def per_sample(v):
            a = env.get(v)
            if a is None or not hasattr(a, "size"):
                return 0
            return a.size / n if v in self.batched else a.size  # unbatched cotangents are per sample

        primal = sum(a.size for k, a in env.items() if k in self.batched and hasattr(a, "size")) * item / n
        made = {v: i for i, s in enumerate(self.active_steps) for v in s.outputs if v}  # inputs: from the start
        peak, flops, wide = 0.0, 0.0, 0.0
        for i, s in enumerate(self.active_steps):
            # a (co)tangent lives from the step that makes it to the last that reads it, either way
            live = sum(per_sample(v) for v, j in self.last_use.items() if made.get(v, -1) < i <= j and v in self.active)
            # what the step makes, and its rule's temporaries: a derivative, a product, of its operands' size
            work = sum(per_sample(o) for o in s.outputs) + sum(per_sample(v) for v in set(s.inputs) if v in self.active) \
                + _workspace(s, env, n)
            peak = max(peak, live + work)
            f = _flops(s, env, n)
            flops += f
            wide += f if _wide_product(s, env) else 0.0
        return {"bytes_primal": primal, "bytes_per_direction": peak * item, "flops_per_direction": flops,
                "wide_flops_per_direction": wide}


def require_rules(nodes):
    """Look up the rule of every node; UnsupportedOpError naming the first that has none."""
    missing = []
    for node in with_subgraph_nodes(nodes):
        try:
            lookup(node.op_type, node.opset, node.domain, node.name)
        except UnsupportedOpError as e:
            missing.append(e)
    if missing:
        more = f" (and {len(missing) - 1} more unsupported node(s); see `jaccli inspect`)" if len(missing) > 1 else ""
        raise UnsupportedOpError(f"{missing[0]}{more}")


def _readers(steps):
    """{value: the steps that read it}."""
    readers = {}
    for s in steps:
        for v in s.inputs:
            if v:
                readers.setdefault(v, []).append(s)
    return readers


_MONOTONE = ("Relu", "LeakyRelu", "Sigmoid", "Tanh")  # nondecreasing: they commute with a max


def with_subgraph_nodes(nodes):
    """The nodes, each followed by the nodes of its sub-graphs (If's branches, Loop's body)."""
    for node in nodes:
        yield node
        for g in node.attrs.values():
            if isinstance(g, Graph):
                yield from with_subgraph_nodes(g.nodes)


def run_forward(step, args):
    """The forward kernel of a step as a tuple of outputs."""
    out = step.rule.forward(*_trim(args), **step.attrs)
    out = out if isinstance(out, tuple) else (out,)
    if len(out) < len(step.outputs) and any(step.outputs[len(out):]):
        k = next(i for i in range(len(out), len(step.outputs)) if step.outputs[i])
        raise UnsupportedOpError(f"node '{step.node.name}': output {k} ('{step.outputs[k]}') of {step.node.op_type} "
                                 f"(opset {step.node.opset}) is not supported")
    return out


def _trim(args):
    """Drop trailing absent optional inputs, so rules see their own defaults."""
    args = list(args)
    while args and args[-1] is None:
        args.pop()
    return args


def _as_compute(a, dtype):
    if a is None:  # an empty optional
        return None
    if isinstance(a, list):  # a sequence
        return [_as_compute(e, dtype) for e in a]
    a = np.asarray(a)
    return a.astype(dtype) if np.issubdtype(a.dtype, np.floating) and a.dtype != dtype else a


def _workspace(s, env, n):
    """Transient elements per sample and direction beyond the outputs (im2col windows, deformed samples)."""
    if s.node.op_type == "Conv" and len(s.inputs) > 1:
        W = env.get(s.inputs[1])
        Y = env.get(s.outputs[0])
        if W is not None and Y is not None:
            return (Y.size / n) / W.shape[0] * W[0].size
    if s.node.op_type == "DeformConv":
        X, W, Y = (env.get(v) for v in (s.inputs[0], s.inputs[1], s.outputs[0]))
        if X is not None and W is not None and Y is not None:
            # its columns, C * K * O per sample, three times: the samples, a corner's term, the masked columns
            return 3 * X.shape[1] * W[0, 0].size * Y[0, 0].size
    return 0


def _wide_product(s, env, least=64):
    """Whether a step is a product by a 2-D matrix of at least `least` rows and columns (a Gemm,
    or a MatMul by a weight): one BLAS call over every sample and direction, large enough for
    BLAS to thread well; not a MatMul of stacked small matrices (attention's), looped over."""
    if s.node.op_type not in ("Gemm", "MatMul"):
        return False
    B = env.get(s.inputs[1])
    return B is not None and np.ndim(B) == 2 and min(np.shape(B)) >= least


def _flops(s, env, n):
    """Multiply-adds per sample and direction of a step (matrix products dominate)."""
    Y = env.get(s.outputs[0])
    if Y is None or not hasattr(Y, "size"):
        return 0
    out = Y.size / n
    op = s.node.op_type
    if op in ("Gemm", "MatMul"):
        A = env.get(s.inputs[0])
        k = A.shape[-1] if A is not None and A.ndim else 1
        if op == "Gemm" and s.attrs.get("transA"):
            k = A.shape[0]
        return out * k
    if op in ("Conv", "DeformConv"):
        W = env.get(s.inputs[1])
        return out * (W[0].size if W is not None else 1)
    return out


# their integer outputs (DynamicQuantizeMatMul's: inside it) stop derivatives (see Plan.quantized)
QUANTIZERS = ("QuantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM")


def quantizes(node, constants):
    """Whether the node rounds its first input to integers: a quantizer, or a MatMulNBits whose
    accuracy_level 4 has onnxruntime round A to int8 in its product (see rules.quant)."""
    if node.op_type == "MatMulNBits":
        from .rules.quant import _int8_product

        zp = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
        return _int8_product(node.attrs, None if zp is None else constants.get(zp))
    return node.op_type in QUANTIZERS
