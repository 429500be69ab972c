"""Load and validate an ONNX model: opsets, attribute defaults from the schema, names, parameters."""

from __future__ import annotations

import ast
import collections
import heapq
import os
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    domain: str
    inputs: tuple  # '' marks an absent optional input
    outputs: tuple
    attrs: dict  # explicit attributes and schema defaults, as python / numpy values
    explicit: frozenset  # names of the attributes the file sets itself
    opset: int


@dataclass(frozen=True)
class ValueInfo:
    name: str
    elem_type: int
    shape: tuple | None  # ints, or None / str for a dimension the file leaves open
    optional: bool = False  # a graph input of optional type: the data may leave it out (empty)

    @property
    def is_float(self):
        return self.elem_type in FLOAT_TYPES

    def describe(self):
        dims = "?" if self.shape is None else "×".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        kind = "string" if self.elem_type == TensorProto.STRING else (
            helper.tensor_dtype_to_np_dtype(self.elem_type).name if self.elem_type else "?")
        return f"{'optional ' if self.optional else ''}{kind}[{dims}]"


@dataclass(eq=False)
class Graph:
    """A node's sub-graph (If's branches, Loop's body): its nodes in order, its own constants,
    its formal inputs and outputs (names), and the outer values it reads (`free`, in order of
    first use). The node lists `free` after its own inputs, so the outer graph orders and
    differentiates them as any other input."""

    name: str
    nodes: list
    initializers: dict
    inputs: tuple
    outputs: tuple
    free: tuple
    opsets: dict
    plans: dict = field(default_factory=dict, repr=False)  # the rules' sub-plans, by what they differentiate


@dataclass
class Model:
    """A loaded, validated model; `nodes` are in topological order."""

    path: str | None
    opsets: dict
    nodes: list
    initializers: dict  # name -> numpy array
    inputs: list  # ValueInfo of real inputs (initializers listed as inputs excluded)
    outputs: list
    value_info: dict = field(default_factory=dict)  # name -> ValueInfo from shape inference
    producer: str = ""
    plans: dict = field(default_factory=dict, repr=False)  # cache of the drivers: plans, probes, parameters
    expanded: dict = field(default_factory=dict)  # operator -> nodes replaced by its ONNX function body
    appended: dict = field(default_factory=dict)  # value -> (NodeProto, initializers) that samples_first added
    baked_batch: int = 0  # the one batch size a graph with a symbolic batch runs on, once found (see drivers._measure)
    held_weights: int = 0  # float Constant nodes made initializers (see weights_as_initializers)
    hoisted_weights: int = 0  # float initializers of sub-graphs moved into the main graph (sub_initializers_hoisted)
    untied_weights: int = 0  # Identity copies of an initializer made initializers of their own (identities_untied)
    unmerged_weights: int = 0  # parameters torch.export's optimizer merged into an equal one, apart (export_merges_untied)
    restored_weights: int = 0  # parameters an exporter stored in another layout, in their own (export_layouts_restored)
    nchwc: dict = field(default_factory=dict)  # onnxruntime's NCHWc operators read as standard ones (see jaccli.nchwc)
    sample_axes: dict = field(default_factory=dict)  # input -> the axis of its samples in the model's layout, where not 0
    one_by_one: bool = False  # each sample runs alone, as a batch of one (load's one_by_one)
    attribute_params: dict = field(default_factory=dict)  # parameter -> (node's first output, attribute): ml_coefficients_as_inputs
    export_roles: dict = field(default_factory=dict)  # initializer -> "parameter" or "constant", as torch.export marks them
    export_origins: dict = field(default_factory=dict)  # a folded parameter -> the parameters it was folded from
    export_removed: list = field(default_factory=list)  # parameters of a torch.export model its file lacks (_removed)
    export_fused: dict = field(default_factory=dict)  # a parameter -> the BatchNorm's tensors folded into it (_batchnorm_folded)

    def input(self, name):
        return _pick(self.inputs, name, "input")

    def value(self, name):
        """A graph input, or any value a node produces (an input Jacobian with respect to the
        embeddings of token ids, say)."""
        from .errors import UsageError

        if any(v.name == name for v in self.inputs):
            return self.input(name)
        if any(name in n.outputs for n in self.nodes):
            return self.value_info.get(name) or ValueInfo(name, TensorProto.FLOAT, None)
        raise UsageError(f"the model has no input or value named '{name}' (inputs: {', '.join(v.name for v in self.inputs)})")

    def output(self, name):
        """A graph output by name (for one that a ZipMap makes, the probabilities it reads), or any
        value a node produces (a Jacobian of an intermediate); by default the first float tensor
        output, or else the first ZipMap's probabilities."""
        from .errors import UsageError

        if name is None:
            floats = [v for v in self.outputs if v.is_float]
            zipped = [v.name for v in self.outputs if self.zipmap(v.name)]
            if not floats and zipped:  # a classifier's probabilities, as scikit-learn's converter writes them
                return self.output(zipped[0])
            if not floats:
                raise UsageError(f"the model has no float tensor output; name a float value with --of "
                                 f"(outputs: {', '.join(v.describe() + ' ' + v.name for v in self.outputs)})")
            return floats[0]
        zipmap = self.zipmap(name)
        if zipmap is not None:
            return self.value(zipmap.inputs[0])
        for v in self.outputs:
            if v.name == name:
                return v
        if any(name in n.outputs for n in self.nodes):
            return self.value_info.get(name) or ValueInfo(name, TensorProto.FLOAT, None)
        raise UsageError(f"the model has no output or value named '{name}' (outputs: {', '.join(v.name for v in self.outputs)})")

    def zipmap(self, name):
        """The ZipMap node that makes graph output `name` (a sequence of {class: probability} maps, one
        per sample) of the tensor of probabilities it reads, or None. That tensor, (N, classes), stands
        for the output: the maps hold its values and nothing else."""
        if not any(v.name == name for v in self.outputs):
            return None
        return next((n for n in self.nodes if n.op_type == "ZipMap" and name in n.outputs and n.inputs), None)

    def float_inputs(self):
        return [v for v in self.inputs if v.is_float]

    def inputs_of(self, targets):
        """The graph inputs that the values `targets` depend on, in the graph's order (an input
        that only another output reads need not be fed)."""
        read = set(targets) | {v for n in self.ancestors(targets) for v in n.inputs}
        return [v for v in self.inputs if v.name in read]

    def ancestors(self, targets):
        """Nodes (topological order) that the values `targets` depend on; kept per targets (a
        call walks the graph, and every Jacobian's feeds ask), and per number of nodes (the
        graph only grows: samples_first appends)."""
        key = ("ancestors", tuple(targets), len(self.nodes))
        if key not in self.plans:
            self.plans[key] = self._ancestors(targets)
        return list(self.plans[key])

    def _ancestors(self, targets):
        producer = {o: i for i, n in enumerate(self.nodes) for o in n.outputs}
        keep, stack = set(), [producer[t] for t in targets if t in producer]
        while stack:
            i = stack.pop()
            if i in keep:
                continue
            keep.add(i)
            stack.extend(producer[v] for v in self.nodes[i].inputs if v in producer)
        return [self.nodes[i] for i in sorted(keep)]

    def samples_first(self, of, axis, rank):
        """The name of a value that is `of` (of rank `rank`) with its samples on the first axis,
        made by a node appended to the graph (see samples_first_node); the node is made once."""
        opset = self.opsets.get("", 1)  # a model of ai.onnx.ml alone: the first
        node, inits = samples_first_node(of, axis, rank, opset)
        if node.output[0] not in self.appended:
            g = helper.make_graph([node], "samples first", [], [])
            self.nodes += _nodes(g, {**self.opsets, "": opset}, "samples first", None, None)
            self.initializers.update({t.name: numpy_helper.to_array(t) for t in inits})
            self.appended[node.output[0]] = (node, inits)
        return node.output[0]

    def fixed_batch(self):
        """The input whose batch axis is declared as the smallest number (exported without a
        dynamic batch), and that number; (None, None) if every batch is symbolic."""
        whole = [v for v in self.inputs if self.sample_axes.get(v.name) == NO_SAMPLE_AXIS]
        if whole:  # its data is one sample: runs of one, whatever its declared shape (it may have none)
            return whole[0], 1
        if self.one_by_one and self.inputs:  # as if exported with a batch of one
            return self.inputs[0], 1
        fixed = [v for v in self.inputs if v.shape and isinstance(v.shape[0], int) and v.shape[0] > 0]  # -1 and 0: unknown
        v = min(fixed, key=lambda v: v.shape[0], default=None)
        if v is None and self.baked_batch:  # declared symbolic, but the graph runs on one batch size only
            return self.inputs[0], self.baked_batch
        return (v, v.shape[0]) if v is not None else (None, None)

    def parameters(self, of, scalars=False):
        """Float initializers that reach output `of` through a differentiable input slot, in file
        order; 0-d ones (exporters store constants such as GELU's 0.5 that way) only with `scalars`,
        and so one-element ones that only Expands read, fill values broadcast to a shape
        (paddle2onnx writes an RNN's zero initial state so, from paddle.full), and one-element ones
        that some node also reads where no derivative flows: a threshold or a bound (optimizers that
        share constants by value, onnxruntime's and onnxslim's, give GPT-2's mask the same 0 that
        its Equal compares with). Not those holding an infinity, a NaN or a finite stand-in for
        one: an attention mask of 0 and -inf, or of torch.finfo(dtype).min, is no parameter."""
        key = ("parameters", of, scalars)
        if key not in self.plans:
            self.plans[key] = self._parameters(of, scalars)
        return list(self.plans[key])

    def _parameters(self, of, scalars):
        reach = _reached(self.ancestors([of]), {of})  # values a derivative flows back to from `of`
        constants = set() if scalars else self._fill_values() | self._compared() | self.exported_constants()
        return [n for n, a in self.initializers.items()
                if n in reach and np.issubdtype(a.dtype, np.floating) and (scalars or a.ndim > 0) and n not in constants
                and not _infinite(a)]

    def parameter_entry(self, name):
        """A parameter's name, shape and size, and, for one torch.export's optimizer folded, the
        parameters it was folded from, or the BatchNorm's tensors it folded into it; for one the
        TorchScript exporter folded, the nodes that read it: a column map's and `inspect`'s
        entry."""
        a = self.initializers[name]
        entry = {"name": name, "shape": list(a.shape), "size": int(a.size)}
        if name in self.export_origins:
            entry["folded_from"] = list(self.export_origins[name])
        if name in self.export_fused:
            entry["batchnorm_folded_in"] = list(self.export_fused[name])
        if name.startswith("onnx::"):  # the TorchScript exporter's name for a value it folded (a Linear's weight
            # transposed): the nodes that read it name the module, /bert/encoder/layer.0/attention/self/query/MatMul
            readers = self.plans.get("readers")  # {value: the names of the nodes that read it}, made once
            if readers is None:
                readers = self.plans["readers"] = collections.defaultdict(list)
                for n in self.nodes:
                    for v in dict.fromkeys(n.inputs):
                        readers[v].append(n.name)
            if readers.get(name):
                entry["read_by"] = readers[name][:4]
        return entry

    def exported_constants(self):
        """Initializers that a torch.export-based export marks as no parameter (see _export_roles)."""
        return {n for n, role in self.export_roles.items() if role == "constant"}

    def _fill_values(self):
        """One-element initializers that every reader takes as the data of an Expand."""
        ones = {n for n, a in self.initializers.items() if a.size == 1}
        other = {v for node in self.nodes for k, v in enumerate(node.inputs) if v in ones and (node.op_type != "Expand" or k != 0)}
        read = {v for node in self.nodes for v in node.inputs if v in ones}
        return read - other

    def _compared(self):
        """One-element initializers that some node reads in a slot no derivative flows through."""
        from .rules import lookup

        ones = {n for n, a in self.initializers.items() if a.size == 1}
        out = set()
        for node in self.nodes:
            if ones.isdisjoint(node.inputs):
                continue
            try:
                skip = lookup(node.op_type, node.opset, node.domain, node.name).nondiff
            except Exception:
                continue
            out.update(v for k, v in enumerate(node.inputs) if k in skip and v in ones)
        return out


def _reached(nodes, targets):
    """The values among `nodes` (in order) that a derivative flows back to from `targets`: not
    those read only as a shape, a scale, an index or a count. A node's sub-graph passes on the
    outer values (its `free` inputs) that a derivative reaches from the sub-graph's outputs."""
    from .rules import lookup, straight_through

    reach = set(targets)
    for node in reversed(nodes):
        if not any(o in reach for o in node.outputs):
            continue
        try:
            r = straight_through(lookup(node.op_type, node.opset, node.domain, node.name))  # the columns
            skip = r.nondiff | r.buffers  # are the same with --straight-through and without
        except Exception:
            skip = frozenset()
        graphs = [g for g in node.attrs.values() if isinstance(g, Graph)]
        free = {v for g in graphs for v in g.free}
        inside = set().union(*(_reached(g.nodes, g.outputs) for g in graphs)) if graphs else set()
        start = len(node.inputs) - len(free) if graphs else len(node.inputs)  # the free values come last
        reach.update(v for k, v in enumerate(node.inputs) if v and k not in skip and (k < start or v in inside))
    return reach


def _infinite(a):
    """Whether a float array holds an infinity, a NaN, or a finite stand-in for an infinity:
    a value beyond half the type's largest (torch.finfo(dtype).min fills attention masks), or
    beyond 1e30 in the wider types."""
    if not np.isfinite(a).all():
        return True
    limit = min(float(np.finfo(a.dtype).max) / 2, 1e30)
    return bool(a.size) and float(np.abs(a).max()) >= limit


def samples_first_node(of, axis, rank, opset):
    """An ONNX node (and the initializers it reads) that makes output `of` carry the samples
    on its first axis: a Transpose that moves axis `axis` first, or, where `axis` is None (the
    whole output of a run of one sample is that sample's), an Unsqueeze that adds one."""
    new = f"{of}:samples-first"
    if axis is not None:
        return helper.make_node("Transpose", [of], [new], perm=[axis] + [a for a in range(rank) if a != axis]), []
    if opset < 13:
        return helper.make_node("Unsqueeze", [of], [new], axes=[0]), []
    axes = numpy_helper.from_array(np.array([0], np.int64), f"{new}:axes")
    return helper.make_node("Unsqueeze", [of, axes.name], [new]), [axes]


def weights_as_initializers(proto):
    """The model with its float Constant nodes made initializers, where it has no float
    initializer: an exporter that stores every weight as a Constant node (paddle2onnx, as
    PaddleOCR's models ship) leaves the parameter Jacobian nothing to differentiate otherwise.
    Those inside sub-graphs too (spox's Silero VAD keeps a whole network in each branch of an
    If): they become initializers of the main graph, under names of their own, which the
    sub-graphs read from outside, as parameters read inside a body. A model with float
    initializers keeps its Constant nodes as they are (an exporter's constants beside its
    weights: a mask, an epsilon). Returns (model, count)."""
    if any(t.data_type in FLOAT_TYPES for t in proto.graph.initializer):
        return proto, 0
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    taken = _names(m.graph)
    held = []
    _hold(m.graph, m.graph, held, taken, top=True)
    return (m, len(held)) if held else (proto, 0)


def subgraphs(node):
    """The sub-graphs of a NodeProto (If's branches, Loop's and Scan's body), in attribute order."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def sub_initializers_hoisted(proto):
    """The model with the float initializers of its sub-graphs (a Loop's or Scan's body, an If's
    branches) moved into the main graph, which the sub-graphs then read from outside: they are
    weights of the model like any other (jax2onnx keeps a fori_loop's Linear inside its body),
    and the same in every iteration. A name kept where it is the only one of its kind in the
    model, as ONNX asks of every name; else a new one. Returns (model, count)."""
    if not any(subgraphs(n) for n in proto.graph.node):
        return proto, 0
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    defined = collections.Counter(_definitions(m.graph))
    taken = set(defined)
    moved = []

    def visit(g):
        for n in g.node:
            for sub in subgraphs(n):
                inputs = {v.name for v in sub.input}
                keep = []
                for t in sub.initializer:
                    if t.data_type not in FLOAT_TYPES or t.name in inputs:
                        keep.append(t)
                        continue
                    name = t.name if defined[t.name] == 1 else _fresh(f"{sub.name or 'body'}/{t.name}", taken)
                    if name != t.name:
                        _rename_reads(sub, t.name, name)
                    h = onnx.TensorProto()
                    h.CopyFrom(t)
                    h.name = name
                    m.graph.initializer.append(h)
                    moved.append(name)
                del sub.initializer[:]
                sub.initializer.extend(keep)
                visit(sub)

    visit(m.graph)
    return (m, len(moved)) if moved else (proto, 0)


def identities_untied(proto):
    """The model with every Identity that copies a float initializer read more than once replaced
    by an initializer of its own, under the Identity's output name, next to its source. The
    TorchScript exporter keeps one tensor of parameters that are equal when exported (a fresh
    model's zero biases; a BatchNormalization's scale and running variance, all ones) and ties
    the others to it by Identity nodes named as the model's parameters: each is then a parameter
    (or a buffer) apart, as in the model exported, and the columns are the model's parameters.
    An initializer copied once and read nowhere else keeps its Identity (a renamed weight).
    Returns (model, count)."""
    g = proto.graph
    floats = {t.name for t in g.initializer if t.data_type in FLOAT_TYPES}
    outputs = {o.name for o in g.output}
    copies = collections.defaultdict(list)  # initializer -> the Identity nodes that copy it
    reads = collections.Counter()  # initializer -> other reads, sub-graphs' included
    for n in g.node:
        if (n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.input and n.input[0] in floats
                and n.output[0] not in outputs):
            copies[n.input[0]].append(n.output[0])
            continue
        reads.update(v for v in n.input if v in floats)
        reads.update(v for v in reads_of_subgraphs(n) if v in floats)
    untie = {src: outs for src, outs in copies.items() if len(outs) + (reads[src] > 0) >= 2}
    if not untie:
        return proto, 0
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    tied = {o for outs in untie.values() for o in outs}
    nodes = [n for n in m.graph.node if not (n.op_type == "Identity" and n.output[0] in tied)]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    inits = []
    for t in m.graph.initializer:
        inits.append(t)
        for out in untie.get(t.name, ()):
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = out
            inits.append(c)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return m, len(tied)


def export_merges_untied(proto):
    """The model with every parameter that torch.export's optimizer merged into an equal one
    apart again. onnxscript's optimizer keeps one initializer of several equal ones (a fresh
    model's LayerNorm weights, all ones, and its zero biases; every layer of a fresh
    nn.TransformerEncoder, deep copies of one), so the nodes of one parameter's call read
    another's tensor, or the value folded from it (a weight transposed).

    The program's signature names every parameter (see _signature_parameters), a node's record
    of its call those the call takes (see _program_names), and a folding record what a folded
    initializer came from. A node reads a merged tensor where it reads a tensor (or one folded
    from it) of another call's parameter, which a node of that call reads too, while its own
    call takes a parameter of the same last name (weight, bias, in_proj_bias) that the file
    lacks, or, where none has it, the one parameter its call lacks for the one such tensor it
    reads (a block's layer scale g2, merged with g1): it then reads a copy under the lacking
    one's name (a folded one's copy as `<val>#<k>`, folded from it). A node with no record (a Split the optimizer made of a
    fresh attention's zero input bias) takes the lacking parameters of its module, by the
    record of its name scopes or else the one its readers' records share (see _module); one
    whose readers lie in like modules of several layers (blocks.0.attn, blocks.1.attn), each
    lacking such a parameter, is one node the optimizer made of one per layer (a Split of a
    zero bias): a copy of it per layer reads that layer's. A tensor that no node of its own
    call reads is no merge: BatchNormalization fused into a convolution leaves the
    convolution's weight under its name, read by a node with the BatchNormalization's record.
    Where two lacking parameters share the last name, nothing changes. Returns (model, count)."""
    g = proto.graph
    signature = _signature_parameters(g)
    if not signature:
        return proto, 0
    fx_of = {target: fx for fx, target in signature.items()}
    floats = {t.name: t for t in g.initializer if t.data_type in FLOAT_TYPES}
    meta = _initializer_metadata(g, floats)
    stands = {v: [v] if v in fx_of else [r for r in _folded_from(meta.get(v, {}).get(_FOLDED_FROM)) or () if r in fx_of]
              for v in floats}  # the parameters each is, or was folded from (besides the exporter's constants)
    stands = {v: fx_of[s[0]] for v, s in stands.items() if len(s) == 1}  # the call that takes it
    taken = {o for n in g.node for o in n.output} | {v.name for v in g.input}
    held = _with_fold_roots(g, (t.name for t in g.initializer))
    lacked = {t for t in fx_of if t not in held and t not in taken}
    calls = [{p for p in _call_names(n) if p.startswith("p_")} for n in g.node]  # the parameters each node's call takes
    owned = {v for n, named in zip(g.node, calls) for v in n.input if v in stands and stands[v] in named}
    readers_at = collections.defaultdict(list)  # value -> the indices of the nodes that read it
    for j, n in enumerate(g.node):
        for v in n.input:
            readers_at[v].append(j)
    readers = {v: [g.node[j] for j in js] for v, js in readers_at.items()}
    def leaf(name):
        return name.rpartition(".")[2]

    def in_module(module):  # the lacking parameters of a module
        return [t for t in lacked if module is not None and t.rpartition(".")[0] == module]

    def renamed(n, named, lacking):  # {initializer read: the lacking parameter it stands for}
        foreign = [v for v in dict.fromkeys(n.input) if v in owned and stands[v] not in named]
        r = {}
        for v in foreign:
            match = [t for t in lacking if leaf(t) == leaf(signature[stands[v]])]
            if len(match) == 1:
                r[v] = match[0]
        if named and len(foreign) == len(lacking) == 1:  # one for the other, by a call's record: a layer
            # scale g2 merged with g1 (not by a module: the one it lacks may be another kind, a bias)
            r = {foreign[0]: lacking[0]}
        return {v: t for v, t in r.items() if list(r.values()).count(t) == 1}

    renames, clones = [], {}  # per node its renames; node index -> [(readers, renames)] of its copies
    for i, (n, named) in enumerate(zip(g.node, calls)):
        if named:
            renames.append(renamed(n, named, [signature[fx] for fx in named if signature.get(fx) in lacked]))
            continue
        renames.append(renamed(n, named, in_module(_module(n, readers))))
        groups = collections.defaultdict(list)  # its readers by module: one node the optimizer shared between layers
        for j in (j for o in n.output for j in readers_at.get(o, ())):
            groups[_own_module(g.node[j])].append(j)
        if not renames[-1] and len(groups) > 1 and None not in groups and len({re.sub(r"\d+", "#", k) for k in groups}) == 1:
            split = [(js, renamed(n, named, in_module(module))) for module, js in groups.items()]
            if all(r for _, r in split):  # each layer lacks its own: the optimizer's one node stands for one per layer
                clones[i] = split
    names, copies = {}, {}  # (source, the parameter it stands for) -> the copy's name; that name -> the pair
    for r in renames + [r for split in clones.values() for _, r in split]:
        for v, t in r.items():
            if (v, t) not in names:  # a folded value's copy: val_92#1, val_92#2, ...
                names[v, t] = t if v in fx_of else f"{v}#{sum(u == v for u, _ in names) + 1}"
                copies[names[v, t]] = (v, t)
            r[v] = names[v, t]
    if not copies:
        return proto, 0
    return _apart(proto, renames, clones, copies, floats), len(copies)


def export_layouts_restored(proto, base=None):
    """The model with each parameter that an exporter stored in another layout (folded a
    Transpose or a Reshape of it into a new initializer) read in its own layout, under its own
    name, through that Transpose or Reshape: its columns are then the parameter's, in the
    framework's layout (torch.func's). Two cases:

    - by torch.export's records: the initializer was folded from one parameter (see
      _export_roles) that the file lacks, and else only from the exporter's constants, and
      every node that reads it has a record of its call that takes that parameter where
      _FOLDED_ARGUMENTS says how the exporter stores it: a Linear's weight transposed, read as
      a MatMul's second input (x @ W^T: a Linear on inputs of rank 3, each of a
      transformer's); a GroupNorm's or PReLU's vector shaped to broadcast over the channels,
      (C, 1, 1). Or, whoever reads it, it is a matrix named for a transpose in the program
      (t, permute_2: x @ W.t(), W.T), the name that the optimizer keeps, or a value named for
      a reshape (view_3: a layer scale's gamma.view(1, -1, 1, 1)). A reshaped parameter is
      read back without the value's unit axes (its own shape is not in the file: a vector's,
      as torch's layer scales and norms' weights are);
    - by value: the initializer (torch.export's folded so from one parameter, or a TorchScript
      export's onnx::<op>_<n>, its name for a folded value) is exactly the transpose of a
      parameter that the file holds, not all of one value: a tied weight (an embedding shared
      with the output layer) read through its transpose too, whose derivatives then add up in
      one parameter's columns.

    Tensors in external data are compared as read from `base` (without it, not tied); one
    restored stays where it is, marked to be read as its transpose (see _external): a large
    model's weights are not copied. Returns (model, count)."""
    g = proto.graph
    floats = {t.name: t for t in g.initializer if t.data_type in _TRANSPOSABLE}
    signature = _signature_parameters(g)
    fx_of = {target: fx for fx, target in signature.items()}
    meta = _initializer_metadata(g, floats)
    readers = collections.defaultdict(list)
    for n in g.node:
        for v in n.input:
            readers[v].append(n)
    arrays = {}

    def array(name):  # None where its data cannot be read here
        if name not in arrays:
            t = floats[name]
            try:
                arrays[name] = (None if t.data_location == TensorProto.EXTERNAL and base is None
                                else np.asarray(tensor_array(t, "model", base)))
            except ModelError:
                arrays[name] = None
        return arrays[name]

    def transposed(v, r):  # whether v is exactly r transposed, and r not all of one value
        a, b = array(v), array(r)
        return (a is not None and b is not None and a.shape == b.shape[::-1] and b.size > 1
                and np.array_equal(a[0], b[:, 0])  # a row first: many same-shaped weights are compared
                and bool(np.any(b != b.flat[0])) and np.array_equal(a, b.T))

    def layout(v, r):  # how every reader's call takes parameter r, stored as v: "transposed", "flat" or None
        ways = set()
        for n in readers[v]:
            op, args = _call_arguments(n)
            ways |= {_FOLDED_ARGUMENTS.get(op, {}).get(k) for k, a in enumerate(args) if a == "%" + fx_of[r]} or {None}
            if "transposed" in ways and not (n.op_type == "MatMul" and list(n.input).index(v) == 1 and len(floats[v].dims) == 2):
                return None
        return ways.pop() if len(ways) == 1 else None

    held = set(_definitions(g))  # names taken: a restored parameter's must be new
    plan = {}  # initializer -> (the parameter it is stored from, "transposed" or "flat", or None where the file holds it)
    for v, t in floats.items():
        if v in fx_of or not readers[v]:
            continue
        roots = _folded_from(meta.get(v, {}).get(_FOLDED_FROM))
        if roots is not None:  # one parameter, and the exporter's constants (a Reshape's shape)
            candidates = [r for r in roots if r in fx_of and r != v]
            candidates = candidates if len(candidates) == 1 and all(r in candidates or _TEMPORARY.match(r) for r in roots) else []
        else:
            candidates = [r for r, u in floats.items() if v.startswith("onnx::") and not r.startswith("onnx::")
                          and u.data_type == t.data_type and tuple(u.dims) == tuple(t.dims)[::-1]]
        held_ones = [r for r in candidates if len(t.dims) == 2 and r in floats and transposed(v, r)]
        if len(held_ones) == 1:
            plan[v] = (held_ones[0], None)
        elif len(candidates) == 1 and candidates[0] not in held:
            way = layout(v, candidates[0]) or _layout_by_name(v, t.dims)
            if way == "flat" or (way == "transposed" and (t.data_location == TensorProto.EXTERNAL or array(v) is not None)):
                plan[v] = (candidates[0], way)
    if not plan:
        return proto, 0
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    inits, nodes = [], []
    for t in m.graph.initializer:
        if t.name not in plan:
            inits.append(t)
            continue
        r, way = plan[t.name]
        if way == "transposed" and t.data_location == TensorProto.EXTERNAL:  # read in place, as its transpose
            inits.append(_retitled(t, r, list(t.dims)[::-1], {_STORED_TRANSPOSED: "1"}))
        elif way == "transposed":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(array(t.name).T), r))
        elif way == "flat":  # the same data without the unit axes (a vector), shaped as stored by a Reshape
            inits += [_retitled(t, r, [d for d in t.dims if d != 1] or [1]),
                      numpy_helper.from_array(np.array(t.dims, np.int64), f"{t.name}.shape")]
        nodes.append(helper.make_node("Reshape", [r, f"{t.name}.shape"], [t.name], name=f"{t.name}.reshaped")
                     if way == "flat" else
                     helper.make_node("Transpose", [r], [t.name], name=f"{t.name}.transposed", perm=[1, 0]))
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    inputs = [v for v in m.graph.input if v.name not in plan]  # old exports list initializers among the inputs
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    nodes += list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m, len(plan)


def _retitled(t, name, dims=None, marks=None):
    """A copy of tensor t (its data, inline or external, as it is) under another name, with
    other dims, and only `marks` for metadata."""
    c = onnx.TensorProto()
    c.CopyFrom(t)
    c.name = name
    if dims is not None:
        c.dims[:] = dims
    del c.metadata_props[:]
    if marks:
        helper.set_metadata_props(c, marks)
    return c


_TRANSPOSABLE = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}
_STORED_TRANSPOSED = "jaccli.stored_transposed"  # an external tensor's mark: its data is its transpose's
# the names torch.export gives the value of a transpose or a reshape in the program (x @ W.t(), W.T;
# a layer scale's gamma.view(1, -1, 1, 1)), which its optimizer keeps for the initializer it folds it into
_TRANSPOSED = re.compile(r"(t|permute|transpose)(_\d+)?$")
_RESHAPED = re.compile(r"(view|reshape|_unsafe_view|unsqueeze|squeeze|flatten)(_\d+)?$")


def _layout_by_name(name, dims):
    """How a value folded from one parameter alone holds it, by its name (see _TRANSPOSED):
    "transposed" (a matrix), "flat" (reshaped), or None."""
    if len(dims) == 2 and _TRANSPOSED.match(name):
        return "transposed"
    return "flat" if _RESHAPED.match(name) else None


# per torch call, the arguments its ONNX nodes read in another layout, folded by the exporter
_FOLDED_ARGUMENTS = {"linear": {1: "transposed"}, "group_norm": {2: "flat", 3: "flat"}, "prelu": {1: "flat"}}
_CALL = re.compile(r"call_function\[target=torch\.ops\.aten\.(\w+)\.\w+\]\(args = \((.*)\), kwargs = ")


def _call_arguments(node):
    """(the aten operator, its arguments' texts) of a node's record of its call, torch.export's
    ("%linear = call_function[target=torch.ops.aten.linear.default](args = (%x, %p_l_weight),
    kwargs = {})": ("linear", ["%x", "%p_l_weight"])), or ("", [])."""
    m = _CALL.search(_metadata(node).get(_FX_NODE, ""))
    if not m:
        return "", []
    args, depth, start = [], 0, 0
    text = m.group(2)
    for k, ch in enumerate(text + ","):
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            args.append(text[start:k].strip())
            start = k + 1
    return m.group(1), args


def export_recurrent_restored(proto, base=None):
    """The model with the weights of each LSTM, GRU and RNN that torch.export wrote read as
    torch holds them, under their own names: its optimizer folds a layer's weight_ih_l<k> (and
    weight_ih_l<k>_reverse) into the ONNX node's W, (directions, gates x hidden, inputs), with
    ONNX's order of the gates (LSTM: i, o, f, c for torch's i, f, g, o; GRU: z, r, h for r, z,
    n); weight_hh into R; bias_ih and bias_hh into B, one row per direction. Where the node's
    record says its call is torch's lstm, gru or rnn, each of W, R and B read by it alone was
    folded from exactly those parameters (and the exporter's constants), and its shape is the
    node's, the parameters are initializers again, gathered into the node's layout by Gather,
    Concat and Reshape nodes: their columns are torch.func's. Returns (model, count)."""
    g = proto.graph
    signature = _signature_parameters(g)
    if not signature:
        return proto, 0
    fx_of = {target: fx for fx, target in signature.items()}
    kinds = {target: kind for kind, target in _signature(g).values()}
    floats = {t.name: t for t in g.initializer if t.data_type in _TRANSPOSABLE}
    meta = _initializer_metadata(g, floats)
    held = set(_definitions(g))
    reads = collections.Counter(v for n in g.node for v in n.input)
    added, nodes, restored = [], [], {}  # new initializers and nodes; folded initializer -> its parameters
    for n in g.node:
        op, _ = _call_arguments(n)
        if n.op_type not in _GATES or n.domain not in ("", "ai.onnx") or op not in _RECURRENT_CALLS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        D = 2 if attrs.get("direction", b"forward") == b"bidirectional" else 1
        gates, H = _GATES[n.op_type], attrs.get("hidden_size")
        for slot, parts in ((1, ("weight_ih",)), (2, ("weight_hh",)), (3, ("bias_ih", "bias_hh"))):
            v = n.input[slot] if len(n.input) > slot else ""
            if v not in floats or reads[v] != 1 or v in fx_of or v in restored or not H:
                continue
            roots = _folded_from(meta.get(v, {}).get(_FOLDED_FROM)) or []
            params = sorted(r for r in roots if r in fx_of)
            if any(r in kinds and r not in fx_of for r in roots) or not params:
                continue  # a buffer among them, or no parameter
            stem = next((r for r in params if parts[0] in r), "").rpartition(parts[0])  # (module., weight_ih, _l0...)
            layer = re.match(r"_l\d+", stem[2])
            if not stem[1] or not layer:
                continue
            names = [[f"{stem[0]}{part}{layer.group(0)}{'_reverse' if d else ''}" for part in parts] for d in range(D)]
            dims = tuple(floats[v].dims)
            want = (D, len(gates) * H * len(parts)) if slot == 3 else (D, len(gates) * H)
            if sorted(x for row in names for x in row) != params or dims[:2] != want or len(dims) != (2 if slot == 3 else 3):
                continue
            if any(x in held for row in names for x in row):
                continue
            if floats[v].data_location == TensorProto.EXTERNAL and base is None:
                continue
            V = np.asarray(tensor_array(floats[v], "model", base))
            rows = np.concatenate([np.arange(k * H, (k + 1) * H) for k in gates])  # ONNX's row j is torch's rows[j]
            pieces = []
            for d, row in enumerate(names):
                parts_of_d = []
                for k, name in enumerate(row):
                    stored = V[d] if slot != 3 else V[d, k * len(gates) * H:(k + 1) * len(gates) * H]
                    torch_held = np.empty_like(stored)
                    torch_held[rows] = stored
                    added.append(numpy_helper.from_array(np.ascontiguousarray(torch_held), name))
                    parts_of_d.append(f"{v}.{name}")
                    nodes.append(helper.make_node("Gather", [name, f"{v}.rows"], [parts_of_d[-1]], axis=0))
                if len(parts_of_d) > 1:
                    nodes.append(helper.make_node("Concat", parts_of_d, [f"{v}.{d}.joined"], axis=0))
                    parts_of_d = [f"{v}.{d}.joined"]
                pieces.append(f"{v}.{d}" if D > 1 else v)
                nodes.append(helper.make_node("Reshape", [parts_of_d[0], f"{v}.shape"], [pieces[-1]]))
            if D > 1:
                nodes.append(helper.make_node("Concat", pieces, [v], axis=0))
            added += [numpy_helper.from_array(rows.astype(np.int64), f"{v}.rows"),
                      numpy_helper.from_array(np.array((1,) + dims[1:], np.int64), f"{v}.shape")]
            restored[v] = [x for row in names for x in row]
    if not restored:
        return proto, 0
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    inits = [t for t in m.graph.initializer if t.name not in restored] + added
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    nodes += list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m, sum(len(p) for p in restored.values())


_GATES = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}  # ONNX's gates, in order, as torch's blocks
_RECURRENT_CALLS = {"lstm", "gru", "rnn_tanh", "rnn_relu"}


def _apart(proto, renames, clones, copies, tensors):
    """The model with each node reading its renamed inputs ([{input: copy}] per node), node k
    of `clones` replaced by a copy per group of its readers ({k: [(readers' indices,
    renames)]}), each under outputs of its own (`<output>#<c>`) that its group reads, and the
    copies of tensors ({copy: (source, the parameter it stands for)}) added."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    nodes = []
    for n, r in zip(m.graph.node, renames):  # detached from the graph's list, rewritten below
        nodes.append(onnx.NodeProto())
        nodes[-1].CopyFrom(n)
        nodes[-1].input[:] = [r.get(v, v) for v in n.input]
    out = []
    for k, n in enumerate(nodes):
        if k not in clones:
            out.append(n)
            continue
        for c, (rs, r) in enumerate(clones[k], 1):
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = f"{n.name}#{c}"
            copy.input[:] = [r.get(v, v) for v in n.input]
            new = {o: f"{o}#{c}" for o in n.output if o}
            copy.output[:] = [new.get(o, o) for o in n.output]
            for j in rs:
                nodes[j].input[:] = [new.get(v, v) for v in nodes[j].input]
            out.append(copy)
    del m.graph.node[:]
    m.graph.node.extend(out)
    for name, (source, target) in copies.items():
        m.graph.initializer.append(_retitled(tensors[source], name))
        if name != target:  # a folded value's copy: folded from the lacking parameter
            vi = helper.make_tensor_value_info(name, tensors[source].data_type, None)
            helper.set_metadata_props(vi, {_FOLDED_FROM: repr([target])})
            m.graph.value_info.append(vi)
    return m


def _module(n, readers):
    """The module whose call node n came from, by its own record of name scopes (see _scopes),
    or else the module that its readers' records share; None where neither tells."""
    own = _scopes(n)
    if own is None:
        theirs = [s for s in (_scopes(r) for o in n.output for r in readers.get(o, ())) if s is not None]
        if not theirs:
            return None
        own = []
        for level in zip(*theirs):  # the scopes they share, outermost first
            if any(s != level[0] for s in level):
                break
            own.append(level[0])
    return own[-1] if own else None


def _own_module(n):
    """The module of node n's call by its own record of name scopes alone, or None."""
    own = _scopes(n)
    return own[-1] if own else None


def _scopes(n):
    """The modules of node n's call, outermost first, by torch.export's record of its name
    scopes (['', 'blocks.0', 'blocks.0.norm', 'layer_norm']: the last is the call), or None."""
    names = _folded_from(_metadata(n).get(_NAME_SCOPES))
    return names[:-1] if names else None


def _metadata(item):
    """An initializer's or node's metadata as a dict (none before IR version 10)."""
    return {p.key: p.value for p in getattr(item, "metadata_props", ())}


def _signature_parameters(g):
    """{name in the program's calls: name in the model} of the parameters that the exported
    program's signature lists (see _signature)."""
    return {fx: target for fx, (kind, target) in _signature(g).items() if kind == "PARAMETER"}


def _signature(g):
    """{name in the program's calls: (kind, name in the model)} of the inputs that the exported
    program's signature lists, as torch.onnx.export records it in the graph's metadata
    ("p_l_weight: PARAMETER target='l.weight'", "b_bn_running_var: BUFFER target=..."); empty
    without it."""
    text = _metadata(g).get(_SIGNATURE, "")
    if len(text) > 64 * _RECORD_LIMIT:
        return {}
    return {fx: (kind, target) for fx, kind, target in re.findall(r"^(\w+): (\w+) target='([^'\n]*)'", text, re.MULTILINE)}


def weights_rewritten(proto, base=None):
    """The rewrites of the weights that load makes, in its order: float Constant nodes made
    initializers (weights_as_initializers), sub-graphs' float initializers read from the main
    graph (sub_initializers_hoisted), and Identity copies of an initializer apart
    (identities_untied), parameters torch.export's optimizer merged, apart
    (export_merges_untied), and parameters an exporter stored transposed or reshaped, in their
    own layout (export_layouts_restored, reading external data from `base`), a recurrent
    layer's among them (export_recurrent_restored). The oracle's model and
    the tests' are rewritten the same way, so that a parameter has the same name in each.
    Returns (model, (held, hoisted, untied, unmerged, restored)), how many of each."""
    proto, held = weights_as_initializers(proto)
    proto, hoisted = sub_initializers_hoisted(proto)
    proto, untied = identities_untied(proto)
    proto, unmerged = export_merges_untied(proto)
    proto, restored = export_layouts_restored(proto, base)
    proto, recurrent = export_recurrent_restored(proto, base)
    return proto, (held, hoisted, untied, unmerged, restored + recurrent)


def _classes(n):
    """The number of class labels of a classifier node."""
    return max((len(a.ints) or len(a.strings) for a in n.attribute if a.name.startswith("classlabels_")), default=0)


# per operator: the attributes made inputs 1 and 2, in order, and which nodes (all, where None):
# a tree classifier's of more than two classes (onnxruntime's two-class conventions are not
# differentiated, see rules.ml)
_ML_WEIGHTS = {"LinearClassifier": (("coefficients", "intercepts"), None),
               "LinearRegressor": (("coefficients", "intercepts"), None),
               "SVMRegressor": (("coefficients", "rho"), None),
               "TreeEnsembleRegressor": (("target_weights", "base_values"), None),
               "TreeEnsembleClassifier": (("class_weights", "base_values"), lambda n: _classes(n) > 2)}


def ml_coefficients_as_inputs(proto):
    """The trained weights of ai.onnx.ml's linear models, SVM regressor and tree ensembles
    (scikit-learn's linear and logistic regressions through skl2onnx; an SVR's dual
    coefficients and offset; the leaf weights and base values of gradient-boosted and random
    forest regressors and classifiers of more than two classes, XGBoost's and LightGBM's through
    onnxmltools) moved from attributes into float initializers that the node reads as inputs 1
    and 2 (_ML_WEIGHTS), so that they are parameters (a per-sample gradient of a logistic
    regression). Their names: the node's, or its first output's, with the attribute's
    (.coefficients, .intercepts, .rho, ...). Returns (model, {parameter: (the node's first
    output, attribute)}); the model itself when there are none. onnxruntime runs the original
    model (see oracle.AttributeOracle)."""

    def movable(n):
        if n.domain != "ai.onnx.ml" or n.op_type not in _ML_WEIGHTS or len(n.input) != 1:
            return False
        names, when = _ML_WEIGHTS[n.op_type]
        return any(a.name == names[0] and a.floats for a in n.attribute) and (when is None or when(n))

    if not any(movable(n) for n in proto.graph.node):
        return proto, {}
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    taken = set(_definitions(m.graph))
    moved = {}
    for n in m.graph.node:
        if not movable(n):
            continue
        names = _ML_WEIGHTS[n.op_type][0]
        values = {a.name: np.asarray(a.floats, np.float32) for a in n.attribute if a.name in names}
        keep = [a for a in n.attribute if a.name not in values]
        for attr in names:
            if attr not in values:
                continue
            name, k = f"{n.name or n.output[0]}.{attr}", 1
            while name in taken:
                name, k = f"{n.name or n.output[0]}.{attr}.{k}", k + 1
            taken.add(name)
            m.graph.initializer.append(numpy_helper.from_array(values[attr], name))
            n.input.append(name)
            moved[name] = (n.output[0], attr)
        del n.attribute[:]
        n.attribute.extend(keep)
    return m, moved


def reads_of_subgraphs(node):
    """Every name that the nodes of a node's sub-graphs (If, Loop, Scan) read, at any depth."""
    names = set()
    for sub in subgraphs(node):
        for n in sub.node:
            names.update(i for i in n.input if i)
            names |= reads_of_subgraphs(n)
    return names


def _definitions(g):
    """Every name graph g and its sub-graphs define (inputs, initializers, node outputs), once
    per definition."""
    names = [v.name for v in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output if o]
    for n in g.node:
        for sub in subgraphs(n):
            names += _definitions(sub)
    return names


def _held(n):
    """Whether node n is a Constant holding a float tensor (inline, not external data)."""
    return (n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 and n.attribute[0].name == "value"
            and n.attribute[0].t.data_type in FLOAT_TYPES and not n.attribute[0].t.HasField("data_location") and bool(n.output[0]))


def _hold(g, main, held, taken, top=False):
    """Graph g's float Constant nodes (and its sub-graphs') moved into the main graph's
    initializers; a sub-graph's under a new name, which its reads then use."""
    kept, outputs = [], {o.name for o in g.output}
    for n in g.node:
        if not _held(n) or (not top and n.output[0] in outputs):  # a branch that returns a constant keeps it
            kept.append(n)
            for sub in subgraphs(n):
                _hold(sub, main, held, taken)
            continue
        t = onnx.TensorProto()
        t.CopyFrom(n.attribute[0].t)
        t.name = n.output[0]
        if not top:  # a name of the main graph's, unique in the model: the sub-graph reads it from outside
            t.name = _fresh(f"{g.name or 'body'}/{n.output[0]}", taken)
            _rename_reads(g, n.output[0], t.name)
        main.initializer.append(t)
        held.append(t.name)
    del g.node[:]
    g.node.extend(kept)


def _names(g):
    """Every value name of graph g and its sub-graphs."""
    names = {v.name for v in list(g.input) + list(g.output) + list(g.value_info)} | {t.name for t in g.initializer}
    for n in g.node:
        names.update(n.output)
        for sub in subgraphs(n):
            names |= _names(sub)
    return names


def _fresh(name, taken):
    k, new = 1, name
    while new in taken:
        k, new = k + 1, f"{name}#{k}"
    taken.add(new)
    return new


def _pick(items, name, kind):
    from .errors import UsageError

    if name is None:
        return items[0]
    for v in items:
        if v.name == name:
            return v
    raise UsageError(f"the model has no {kind} named '{name}' (it has: {', '.join(v.name for v in items)})")


def load(source, max_bytes=None, sample_axes=None, one_by_one=False) -> Model:
    """A Model from a path, raw bytes or an onnx.ModelProto; ModelError on anything malformed.

    Tensors in external data are memory-mapped from files inside the model's folder (any
    location that leaves it is refused); an inline tensor that declares more than
    `max_bytes` is refused before it is allocated. `sample_axes` ({input: axis}) names inputs
    that carry the samples on another axis than the first (see inputs_samples_first); inputs
    that declare a batch dimension there are found without it. `one_by_one`: each sample runs
    alone, as a batch of one, as if the model had been exported with a batch fixed at 1: where
    its batch statistics mix samples (a dynamically quantized model's scale over the batch, a
    branch on a batch-wide sum), each sample's Jacobian is then that of the model computing it
    alone.
    """
    if isinstance(source, Model):
        from .errors import UsageError

        if sample_axes and _given_axes(sample_axes) != source.sample_axes:
            raise UsageError("sample axes are given when a model is loaded: jaccli.load(path, sample_axes=...)")
        if one_by_one and not source.one_by_one:
            raise UsageError("one_by_one is given when a model is loaded: jaccli.load(path, one_by_one=True)")
        return source
    path = None
    if isinstance(source, onnx.ModelProto):
        proto = source
    else:
        try:
            if isinstance(source, (bytes, bytearray)):
                proto = onnx.load_from_string(bytes(source))
            else:
                path = os.fspath(source)
                if not os.path.isfile(path):
                    raise ModelError(f"{path}: no such model file")
                proto = onnx.load(path, load_external_data=False)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"{path or 'model'}: not a readable ONNX file ({_first_line(e)})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelError(f"{path or 'model'}: not an ONNX model (no graph)")
    if len(proto.functions):  # model-local functions (newer exporters): inline them into the graph
        try:
            from onnx import inliner

            proto = inliner.inline_local_functions(proto)
        except Exception as e:
            raise ModelError(f"{path or 'model'}: its local functions cannot be inlined ({_first_line(e)})") from None
    from . import nchwc

    blocked = nchwc.counts(proto)
    proto = nchwc.plain(proto)  # onnxruntime's NCHWc layout, as the standard operators it fuses
    proto, expanded = _expand_functions(proto)
    base = os.path.dirname(os.path.abspath(path)) if path else None
    proto, (held, hoisted, untied, unmerged, restored) = weights_rewritten(proto, base)
    proto, attribute_params = ml_coefficients_as_inputs(proto)
    axes = {**declared_sample_axes(proto), **_every_input(proto, sample_axes or {})}
    proto = inputs_samples_first(proto, axes, path or "model")
    model = _build(proto, path, base, max_bytes)
    model.expanded, model.held_weights, model.sample_axes = expanded, held, _given_axes(axes)
    model.hoisted_weights, model.untied_weights, model.unmerged_weights = hoisted, untied, unmerged
    model.restored_weights = restored
    model.nchwc = blocked
    model.one_by_one = bool(one_by_one)
    model.attribute_params = attribute_params
    return model


NO_SAMPLE_AXIS = "none"  # --sample-axis NAME=none: the input's data is one sample, with no axis for samples


def _every_input(proto, axes):
    """Sample axes with '*' (every input not named on its own) spelled out."""
    if "*" not in axes:
        return dict(axes)
    inits = {t.name for t in proto.graph.initializer}
    spelled = {v.name: axes["*"] for v in proto.graph.input if v.name not in inits}
    return {**spelled, **{k: v for k, v in axes.items() if k != "*"}}


def _given_axes(axes):
    """{input: axis} where the samples are not on axis 0: an int, or NO_SAMPLE_AXIS (None means it too)."""
    out = {}
    for k, v in axes.items():
        v = NO_SAMPLE_AXIS if v is None or str(v).lower() == NO_SAMPLE_AXIS else int(v)
        if v != 0:
            out[k] = v
    return out


def _dims(v):
    t = v.type.tensor_type
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim] if t.HasField("shape") else None


def _batch_like(d):
    return isinstance(d, str) and (d.lower() in ("n", "b", "bs") or "batch" in d.lower())


def declared_sample_axes(proto):
    """{input: axis} for inputs that declare their batch dimension on an axis other than their
    first (torch.onnx's dynamic axes: an RNN's state (layers, 'batch', hidden) beside an input
    ('batch', ...); a time-major sequence ('seq', 'batch', features), as recurrent layers
    without batch_first take it), where an input names one once and not first. A dimension
    counts if it is named a batch ('batch', 'batch_size'), or if another input names it first
    with a short name ('N', 'B'): alone, an 'N' on axis 1 may count points or boxes."""
    inits = {t.name for t in proto.graph.initializer}
    dims = {v.name: _dims(v) for v in proto.graph.input if v.name not in inits}
    firsts = {d[0] for d in dims.values() if d and _batch_like(d[0])}
    axes = {}
    for name, d in dims.items():
        if d and not _batch_like(d[0]):
            hits = [k for k, x in enumerate(d) if x in firsts or (isinstance(x, str) and "batch" in x.lower())]
            if len(hits) == 1:
                axes[name] = hits[0]
    return axes


def inputs_samples_first(proto, axes, where="model"):
    """The model with each input of `axes` ({name: axis}) taking its samples on the first axis:
    the input's declared shape has that axis moved first, and a Transpose puts it back where
    the graph reads it (its readers, sub-graphs included, read the Transpose's output). The
    drivers take every input samples first; the data for such an input comes in the model's
    own layout and is moved as it is read (see drivers.prepare_feeds).

    An input of NO_SAMPLE_AXIS (a graph neural network's atoms and edges, a model exported
    without a batch) gets a leading axis of 1, the model's batch, and a Gather of its one row
    where the graph reads it: its data is one sample whole (or shared by the samples of the
    other inputs), run one sample at a time."""
    axes = _given_axes(axes)
    if not axes:
        return proto
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    inits = {t.name for t in g.initializer}
    inputs = {v.name: v for v in g.input if v.name not in inits}
    moves = []
    for name, k in axes.items():
        if name not in inputs:
            raise ModelError(f"{where}: sample axis given for '{name}', which is no model input ({', '.join(inputs)})")
        if k == NO_SAMPLE_AXIS:
            moves += _one_sample_input(g, inputs[name])
            continue
        d = _dims(inputs[name])
        if d is None or not 0 < k < len(d):
            rank = "an unknown rank" if d is None else f"rank {len(d)}"
            raise ModelError(f"{where}: input '{name}' has {rank}: it cannot carry its samples on axis {k}")
        dims = inputs[name].type.tensor_type.shape.dim
        moved = [onnx.TensorShapeProto.Dimension() for _ in d]
        for j, src in enumerate([k] + [a for a in range(len(d)) if a != k]):
            moved[j].CopyFrom(dims[src])
        del dims[:]
        dims.extend(moved)
        inner = f"{name}:model-layout"
        _rename_reads(g, name, inner)
        perm = list(range(1, k + 1)) + [0] + list(range(k + 1, len(d)))  # axis 0 back to axis k
        moves.append(helper.make_node("Transpose", [name], [inner], perm=perm, name=f"{name}:to-model-layout"))
    nodes = moves + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return m


def _one_sample_input(g, v):
    """Input v declared with a leading axis of 1, and the node that takes its one row where the
    graph reads it (a Gather of index 0: every opset has it)."""
    inner, index = f"{v.name}:model-layout", f"{v.name}:the-sample"
    _rename_reads(g, v.name, inner)
    if v.type.tensor_type.HasField("shape"):  # a rank stays unknown where it was
        dims = v.type.tensor_type.shape.dim
        old = [onnx.TensorShapeProto.Dimension() for _ in dims]
        for a, b in zip(old, dims):
            a.CopyFrom(b)
        del dims[:]
        dims.add().dim_value = 1
        dims.extend(old)
    g.initializer.append(numpy_helper.from_array(np.array(0, np.int64), index))
    return [helper.make_node("Gather", [v.name, index], [inner], axis=0, name=f"{v.name}:to-model-layout")]


def _rename_reads(g, old, new):
    """Every read of value `old` in graph g, and in its nodes' sub-graphs that do not define a
    value of that name themselves, made a read of `new`."""
    for node in g.node:
        for k, v in enumerate(node.input):
            if v == old:
                node.input[k] = new
        for sub in subgraphs(node):
            own = {v.name for v in sub.input} | {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
            if old not in own:
                _rename_reads(sub, old, new)


_EXPANDED = "jaccli.expanded"  # the domain of the model-local functions made of ONNX function bodies


def _expand_functions(proto, rounds=4):
    """Nodes of an operator that jaccli has no rule for, but whose ONNX schema defines it as a
    function of other operators (opset 23's Attention and RMSNormalization, HardSwish, Mish ...),
    replaced by that function's body, so that the body's operators are differentiated. Bodies
    that depend on the node's input types are built from shape inference. Nodes that cannot be
    expanded are left as they are: `inspect` and the plan name them. Returns the model and
    {operator: how many nodes were expanded}."""
    from onnx import defs, inliner, shape_inference

    from .errors import UnsupportedOpError
    from .rules import lookup

    expanded = {}
    for _ in range(rounds):
        before = proto
        opsets = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in proto.opset_import}
        types = None
        bodies = {}  # node index: its function body
        for k, n in enumerate(proto.graph.node):
            domain = "" if n.domain == "ai.onnx" else n.domain
            if domain not in ("", "ai.onnx.preview") or domain not in opsets:  # ONNX's own operators
                continue
            try:
                lookup(n.op_type, opsets[domain], domain, n.name)
                continue
            except UnsupportedOpError:
                pass
            try:
                schema = defs.get_schema(n.op_type, opsets[domain], domain)
            except Exception:
                continue
            body = None
            opset = opsets[domain]
            static = [v for v in schema.function_opset_versions if v <= opset]
            dependent = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
            if static:  # the body written for the newest opset up to the model's
                body = schema.get_function_with_opset_version(max(static))
                if isinstance(body, bytes):
                    body = onnx.FunctionProto.FromString(body)
            elif dependent:
                if types is None:
                    types = _value_types(proto, shape_inference)
                if all(not v or v in types for v in n.input):
                    try:
                        raw = schema.get_context_dependent_function_with_opset_version(
                            max(dependent), n.SerializeToString(),
                            [types[v].SerializeToString() if v else onnx.TypeProto().SerializeToString() for v in n.input])
                        body = onnx.FunctionProto()
                        body.ParseFromString(raw)
                    except Exception:
                        body = None
            if body is not None and len(body.node):
                bodies[k] = body, schema
        if not bodies:
            return proto, expanded
        proto = _copy(proto)  # never change the caller's model
        done = dict(expanded)
        for k, (body, schema) in bodies.items():
            n = proto.graph.node[k]
            done[n.op_type] = done.get(n.op_type, 0) + 1
            _default_attributes(n, schema)
            f = proto.functions.add()
            f.CopyFrom(body)
            f.domain, f.name = _EXPANDED, f"{n.op_type}_{len(proto.functions)}"
            n.domain, n.op_type = _EXPANDED, f.name
        proto.opset_import.append(onnx.helper.make_opsetid(_EXPANDED, 1))
        _type_initializers(proto, {v for k in bodies for v in proto.graph.node[k].input})
        try:  # bodies converted to the model's opset, which needs the values' types
            proto = inliner.inline_local_functions(_inferred(proto, shape_inference), convert_version=True)
        except Exception:
            return before, expanded  # as it was: its operators are reported as unsupported
        del proto.opset_import[:]
        proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
        expanded = done
    return proto, expanded


def _default_attributes(node, schema):
    """The schema's defaults written on the node for the attributes it leaves out: a body refers
    to them by name (HannWindow's output type), and the inliner fills only those the node has."""
    have = {a.name for a in node.attribute}
    for name, a in schema.attributes.items():
        if name not in have and a.default_value.type:
            node.attribute.append(a.default_value)


def _type_initializers(proto, names):
    """Value types for the initializers among `names` that have none: onnx's inliner looks types
    up among the graph's inputs and value infos only (a HannWindow's size, an initializer)."""
    typed = {v.name for v in proto.graph.input} | {v.name for v in proto.graph.value_info}
    for t in proto.graph.initializer:
        if t.name in names and t.name not in typed:
            proto.graph.value_info.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _copy(proto):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    return m


def _inferred(proto, shape_inference):
    """The model with shape inference's value types, or as it is where inference fails."""
    try:
        return shape_inference.infer_shapes(proto)
    except Exception:
        return proto


def _value_types(proto, shape_inference):
    """{name: TypeProto} of the graph's values, from shape inference where it succeeds. Where it
    fails, it is tried again with every optional output named: some operators' inference
    writes outputs a node leaves out (onnx 1.23's for LinearAttention without its state)."""
    inferred = _inferred(proto, shape_inference)
    if inferred is proto:
        inferred = _inferred(_outputs_named(proto), shape_inference)
    g = inferred.graph
    types = {v.name: v.type for v in list(g.input) + list(g.value_info) + list(g.output)}
    for t in g.initializer:
        types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    return types


def _outputs_named(proto):
    """A copy of the model whose main-graph nodes name all the outputs their schema allows (the
    ones they leave out under names of their own), for shape inference only."""
    from onnx import defs

    proto = _copy(proto)
    opsets = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in proto.opset_import}
    for k, n in enumerate(proto.graph.node):
        domain = "" if n.domain == "ai.onnx" else n.domain
        try:
            schema = defs.get_schema(n.op_type, opsets.get(domain, 1), domain)
        except Exception:
            continue
        if any(o.option == defs.OpSchema.FormalParameterOption.Variadic for o in schema.outputs):
            continue
        names = list(n.output) + [""] * (len(schema.outputs) - len(n.output))
        del n.output[:]
        n.output.extend(v or f"jaccli.unnamed/{k}/{i}" for i, v in enumerate(names))
    return proto


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def tensor_array(t, where, base=None, max_bytes=None):
    """A TensorProto as a numpy array, checked: known type, sane dims, data that fits its shape."""
    name = t.name or "<unnamed>"
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:
        raise ModelError(f"{where}: tensor '{name}' has unknown data type {t.data_type}") from None
    dims = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in dims):
        raise ModelError(f"{where}: tensor '{name}' declares negative dimensions {dims}")
    nbytes = int(np.prod(dims, dtype=object)) * dtype.itemsize if dims else dtype.itemsize
    if t.data_location == TensorProto.EXTERNAL:
        return _external(t, name, dims, dtype, nbytes, where, base)
    if max_bytes is not None and nbytes > max_bytes:
        from .errors import MemoryBudgetError

        raise MemoryBudgetError(
            f"{where}: tensor '{name}' declares shape {dims} ({nbytes / 2**30:.2f} GiB), over --max-memory; refused"
        )
    try:
        a = numpy_helper.to_array(t)
    except Exception as e:
        raise ModelError(f"{where}: tensor '{name}' cannot be read ({_first_line(e)})") from None
    # bfloat16, which numpy holds as an opaque type (ml_dtypes): read as float32, jaccli's narrowest
    # working type, so that it is a parameter and a value like any float. (The float8 types stay as
    # they are: they are quantized values, whose type QuantizeLinear's range is read from.)
    return a.astype(np.float32) if a.dtype.kind == "V" and a.dtype.name == "bfloat16" else a


def _external(t, name, dims, dtype, nbytes, where, base):
    """Memory-map a tensor stored beside the model; refuse locations outside the model's folder."""
    if base is None:
        raise ModelError(f"{where}: tensor '{name}' uses external data, which needs the model loaded from a file")
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    base_real = os.path.realpath(base)
    full = os.path.realpath(os.path.join(base_real, loc))
    if not loc or os.path.isabs(loc) or os.path.commonpath([base_real, full]) != base_real:
        raise ModelError(f"{where}: tensor '{name}' points outside the model's folder ({loc!r}); refused")
    if not os.path.isfile(full):
        raise ModelError(f"{where}: external data file {loc!r} of tensor '{name}' is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info.get("length", nbytes))
    except ValueError:
        raise ModelError(f"{where}: tensor '{name}' has a malformed external-data offset or length") from None
    size = os.path.getsize(full)
    if offset < 0 or length != nbytes or offset + length > size:
        raise ModelError(
            f"{where}: tensor '{name}' needs {nbytes} bytes at offset {offset} of {loc!r}, which holds {size}"
        )
    if nbytes == 0:
        return np.zeros(dims, dtype)
    if _metadata(t).get(_STORED_TRANSPOSED) and len(dims) == 2:  # a weight its exporter stored transposed (see
        # export_layouts_restored): read in place, as the transpose of what is stored
        return np.memmap(full, dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=dims[::-1]).T
    return np.memmap(full, dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=dims)


def _attr_value(a, where="model"):
    if a.type == onnx.AttributeProto.TENSOR:
        return tensor_array(a.t, where)
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, list):
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
    return v


def _schema(op_type, opset, domain):
    """The operator's schema at the opset; for one written before the opset that introduced it
    (onnxruntime's optimizer writes LayerNormalization into opset-14 models), its first version,
    as the rule lookup takes; None if onnx does not know it (the rule lookup decides)."""
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except Exception:
        pass
    try:
        latest = onnx.defs.get_schema(op_type, domain=domain)
    except Exception:
        return None
    for v in range(opset + 1, latest.since_version + 1):
        try:
            return onnx.defs.get_schema(op_type, v, domain)
        except Exception:
            continue
    return latest


def _defaults(schema):
    if schema is None:
        return {}
    return {k: _attr_value(a.default_value) for k, a in schema.attributes.items() if a.default_value.type}


def _check_arity(schema, n, name, where):
    """Inputs and outputs within what the operator's schema allows."""
    if schema is None:
        return
    n_in = min(len(n.input), 1) if n.domain == "ai.onnx.ml" and n.op_type in _ML_WEIGHTS else len(n.input)  # (ml_coefficients_as_inputs)
    if n_in > schema.max_input or n_in < schema.min_input:  # '' counts: exporters pass it for unused inputs
        raise ModelError(
            f"{where}: node '{name}' ({n.op_type}, opset {schema.since_version}) has {n_in} inputs; "
            f"the operator takes {schema.min_input} to {schema.max_input}"
        )
    if len(n.output) > schema.max_output or len(n.output) < 1:
        raise ModelError(f"{where}: node '{name}' ({n.op_type}) has {len(n.output)} outputs; the operator gives at most {schema.max_output}")


def _value_info(v) -> ValueInfo:
    optional = v.type.HasField("optional_type")  # an optional tensor: its element's type, and it may be left out
    t = v.type.optional_type.elem_type.tensor_type if optional else v.type.tensor_type
    shape = None
    if t.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return ValueInfo(v.name, t.elem_type, shape, optional)


def _build(proto, path, base=None, max_bytes=None) -> Model:
    where = path or "model"
    g = proto.graph
    opsets = {}
    for o in proto.opset_import:
        opsets[o.domain if o.domain != "ai.onnx" else ""] = o.version
    if "" not in opsets and any(n.domain in ("", "ai.onnx") for n in g.node):
        raise ModelError(f"{where}: the model imports no default ONNX opset")

    initializers = {t.name: tensor_array(t, where, base, max_bytes) for t in g.initializer}
    for c in getattr(g, "sparse_initializer", []):
        raise ModelError(f"{where}: sparse initializer '{c.values.name}' is not supported")

    inputs = [_value_info(v) for v in g.input if v.name not in initializers]
    outputs = [_value_info(v) for v in g.output]

    nodes = _nodes(g, opsets, where, base, max_bytes)
    nodes = _toposort(nodes, set(initializers) | {v.name for v in inputs}, where)
    produced = {o for n in nodes for o in n.outputs} | set(initializers) | {v.name for v in inputs}
    for v in outputs:
        if v.name not in produced:
            raise ModelError(f"{where}: graph output '{v.name}' is produced by no node")

    value_info = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            value_info[v.name] = _value_info(v)
    except Exception:
        pass  # shape inference is advisory: costs fall back to measured shapes
    model = Model(path, opsets, nodes, initializers, inputs, outputs, value_info, proto.producer_name)
    model.export_roles, model.export_origins = _export_roles(g, initializers, produced)
    model.export_removed = _removed(g, initializers, produced)
    model.export_fused = _batchnorm_folded(g, initializers)
    return model


_SIGNATURE_KIND = "pkg.torch.export.graph_signature.InputSpec.kind"
_SIGNATURE = "pkg.torch.export.ExportedProgram.graph_signature"  # the graph's: the program's inputs, kinds and names
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_FX_NODE = "pkg.torch.onnx.fx_node"  # a node's call in the exported program: its arguments' names
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # a node's modules, outermost first, and last its call
_TEMPORARY = re.compile(r"val_\d+$")  # the exporter's name for a value it made (a Constant node's among them)
_RECORD_LIMIT = 1 << 20  # characters of a folded_from record read at most


def _program_names(g):
    """The names the exported program's calls give their arguments, from the nodes' fx_node
    records (%p_blocks_0_weight for parameter blocks.0.weight, %zeros for torch.zeros's value);
    empty without them."""
    return set().union(*(_call_names(n) for n in g.node))


def _call_names(node):
    """The names in a node's record of its call (see _program_names)."""
    return set(re.findall(r"%(\w+)", _metadata(node).get(_FX_NODE, "")))


def _export_roles(g, initializers, values):
    """({initializer: "parameter" or "constant"}, {folded parameter: the names of the
    parameters it was folded from}) for a model that torch.onnx.export wrote from
    torch.export (dynamo=True, the default since torch 2.9). It records in an initializer's
    metadata the kind the exported program's signature gives it (PARAMETER, BUFFER,
    CONSTANT_TENSOR); its optimizer (onnxscript's) folds constant computations into new
    initializers, named val_<n>, recording the values each was folded from (with a batch fixed
    at export it may fold every parameter so, and no kind is left). Roles:

    - marked: a parameter if PARAMETER, not a buffer or a constant;
    - folded: a parameter if folded from one (a weight transposed for a MatMul, GroupNorm's
      scale reshaped, an LSTM's weights reordered, the exp of a logit scale): from an
      initializer that is one, from a name that the program's signature (in the graph's
      metadata) gives as a parameter's, not a buffer's or a constant's; where there is a
      signature, from nothing else (it names every parameter, and the optimizer lists the
      values a folded one came from at every step: a rotary embedding's cos and sin tables,
      folded from arange, cos and the like, are constants); without one, from any other name
      but the exporter's own (val_<n>), a graph value's (`values`: read for its shape) and a
      call's result as the nodes' records of their calls name it (%zeros; parameter
      l.weight_ih_l0 is %p_l_weight_ih_l0 there).
      So not InstanceNormalization's ones and zeros in a GroupNorm, LayerNorm's ones without
      an affine weight, an attention's scale, an LSTM's initial state from torch.zeros;
    - an unmarked val_<n>: a constant.

    Others (a weight with BatchNormalization folded in loses its mark) are left to the usual
    rule. Both empty for a model with neither kind of mark."""
    meta = _initializer_metadata(g, initializers)
    if not any(_SIGNATURE_KIND in m or _FOLDED_FROM in m for m in meta.values()):
        return {}, {}
    program = _program_names(g)
    kinds = {target: kind for kind, target in _signature(g).values()}

    def origin(root, seen):  # where a folded value came from: a parameter, or a constant
        if root in initializers:  # (a chain deeper than any export's, from an untrusted file: a parameter)
            return (role(root, seen) if len(seen) < 32 else None) or "parameter"
        if root in kinds:  # the program's signature says (a buffer folded away, a parameter)
            return "parameter" if kinds[root] == "PARAMETER" else "constant"
        if kinds:  # it names every parameter: this is a value computed on the way, whose own roots are listed too
            return "constant"
        if root in values or _TEMPORARY.match(root) or root in program:  # a parameter is %p_<path> there
            return "constant"
        return "parameter"

    def role(name, seen=frozenset()):  # an initializer's, by its marks (None: the usual rule), found once
        if name not in roles:
            m = meta.get(name, {})
            roots = _folded_from(m.get(_FOLDED_FROM))
            if _SIGNATURE_KIND in m:
                roles[name] = "parameter" if m[_SIGNATURE_KIND] == "PARAMETER" else "constant"
            elif roots is not None:  # another folded initializer among them: its role first (not round a cycle)
                sources = [r for r in roots if r != name and r not in seen and origin(r, seen | {name}) == "parameter"]
                roles[name] = "parameter" if sources else "constant"
                if sources:
                    origins[name] = sources
            else:
                roles[name] = "constant" if _TEMPORARY.match(name) else None
        return roles[name]

    roles, origins = {}, {}
    for name in initializers:
        role(name)
    roles = {k: v for k, v in roles.items() if v is not None}
    return roles, origins


def _removed(g, initializers, values):
    """The parameters of a model that torch.export wrote that the file holds no tensor for, nor
    folded into one, sorted: its optimizer removes what it can fold away (a fresh
    nn.MultiheadAttention's zero output bias leaves a Gemm without C) and keeps one tensor of
    several equal ones (see export_merges_untied). Named as the program's signature names
    them, or else as the nodes' records of their calls do (%p_<path>, the dots made
    underscores); empty without either."""
    held = _with_fold_roots(g, initializers)
    signature = _signature_parameters(g)
    if signature:
        return sorted(target for target in signature.values() if target not in held)
    held = {"p_" + re.sub(r"\W", "_", n) for n in held}
    return sorted(p for p in _program_names(g) if p.startswith("p_") and p not in held and p not in values)


def _batchnorm_folded(g, initializers):
    """{initializer: the BatchNorm's tensors} for the weights and biases into which torch.export's
    optimizer folded an eval-mode BatchNorm (a convolution's, a Linear's): the node that reads
    them keeps the BatchNorm's record of its call, not its own, and the initializers keep the
    layer's names (conv.weight) though they hold W·γ/√(σ²+ε) and the bias likewise. Named as
    the program's signature names them (bn.weight, bn.running_mean), or else as the record
    does (%p_bn_weight)."""
    targets = {fx: target for fx, (kind, target) in _signature(g).items()}
    fused = {}
    for n in g.node:
        op, args = _call_arguments(n)
        if _BATCH_NORM.match(op) and n.op_type != "BatchNormalization":
            names = [targets.get(a[1:], a[1:]) for a in args[1:] if re.fullmatch(r"%\w+", a)]
            for v in n.input:
                if v in initializers and np.issubdtype(initializers[v].dtype, np.floating):
                    fused[v] = names
    return fused


_BATCH_NORM = re.compile(r"_?(native_batch_norm|batch_norm|_native_batch_norm_legit\w*|cudnn_batch_norm|miopen_batch_norm)$")


def fused_note(fused):
    """The note on weights into which torch.export's optimizer folded a BatchNorm (see _batchnorm_folded)."""
    names = sorted(fused)
    bns = sorted({n for v in fused.values() for n in v})
    return (f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: torch.export's optimizer folded a BatchNorm "
            f"({', '.join(bns[:4])}{' ...' if len(bns) > 4 else ''}) into {'them' if len(names) > 1 else 'it'}, under the "
            f"layer's own name{'s' if len(names) > 1 else ''}: {'their' if len(names) > 1 else 'its'} columns are the "
            f"derivatives with respect to the folded values (the weight times γ/√(σ²+ε)), not to the layer's weight, and "
            f"the file holds neither γ nor σ; torch.onnx.export(..., optimize=False) keeps them apart")


def removed_note(removed):
    """The note on parameters of a torch.export model that its file lacks (see _removed)."""
    k = len(removed)
    return (f"{k} parameter{'s' if k > 1 else ''} of the model torch.export wrote {'are' if k > 1 else 'is'} not in the "
            f"file under {'their' if k > 1 else 'its'} own name, so {'they have' if k > 1 else 'it has'} no columns of "
            f"{'their' if k > 1 else 'its'} own: its optimizer removes what it can fold away (a zero bias), of several "
            f"equal tensors (a fresh model's) keeps one, whose columns then hold the derivatives of all, and keeps a "
            f"tied parameter (an embedding shared with the output layer) under one of its names: "
            f"{', '.join(removed[:4])}{' ...' if k > 4 else ''}")


def _with_fold_roots(g, names):
    """`names` (the initializers) and the names of the values torch.export's optimizer folded
    any of them from."""
    names = set(names)
    return names.union(*(_folded_from(m.get(_FOLDED_FROM)) or () for m in _initializer_metadata(g, names).values()))


def _initializer_metadata(g, names):
    """{initializer: its metadata}, for those of `names` that have any: the exporter writes it
    on the tensor or on its value_info."""
    meta = {}
    for v in list(g.value_info) + list(g.input) + list(g.initializer):
        if v.name in names and getattr(v, "metadata_props", None):
            meta.setdefault(v.name, {}).update(_metadata(v))
    return meta


def _folded_from(text):
    """The list of names in a record (folded_from's, name_scopes': "['a', 'b']"), or None
    (none, or not such a list, or too long to be one: the file is untrusted)."""
    if not text or len(text) > _RECORD_LIMIT:
        return None
    try:
        roots = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return [str(r) for r in roots] if isinstance(roots, (list, tuple)) else None


def _nodes(g, opsets, where, base, max_bytes):
    """The graph's nodes, attributes read and defaults filled in; a sub-graph attribute becomes a
    Graph, and the outer values it reads are appended to the node's inputs."""
    nodes = []
    for k, n in enumerate(g.node):
        domain = "" if n.domain == "ai.onnx" else n.domain
        if domain not in opsets:
            raise ModelError(f"{where}: node '{n.name or k}' uses domain '{domain}', which the model does not import")
        opset = opsets[domain]
        name = n.name or f"{n.op_type}_{k}"
        schema = _schema(n.op_type, opset, domain)
        _check_arity(schema, n, name, where)
        attrs = _defaults(schema)
        free = []  # the outer values read by its sub-graphs, taken in the order of the attributes' names
        for a in sorted(n.attribute, key=lambda a: a.name):
            if a.type == onnx.AttributeProto.GRAPH:
                sub = _subgraph(a.g, opsets, f"{where}: node '{name}' attribute '{a.name}'", base, max_bytes)
                attrs[a.name] = sub
                free += [v for v in sub.free if v not in free]
                continue
            if a.type == onnx.AttributeProto.GRAPHS:
                attrs[a.name] = None  # lists of sub-graphs: the rule lookup refuses these ops
                continue
            try:
                attrs[a.name] = _attr_value(a, where)
            except Exception as e:
                raise ModelError(f"{where}: attribute '{a.name}' of node '{n.name or k}' is unreadable ({_first_line(e)})") from None
        nodes.append(Node(name, n.op_type, domain, tuple(n.input) + tuple(free), tuple(n.output), attrs,
                          frozenset(a.name for a in n.attribute), opset))
    return nodes


def _subgraph(g, opsets, where, base, max_bytes):
    """A Graph from a GraphProto attribute: the values its nodes read that neither they, its
    inputs nor its initializers provide are read from the enclosing graph."""
    initializers = {t.name: tensor_array(t, where, base, max_bytes) for t in g.initializer}
    inputs = tuple(v.name for v in g.input)
    nodes = _nodes(g, opsets, where, base, max_bytes)
    local = set(initializers) | set(inputs) | {o for n in nodes for o in n.outputs if o}
    free = []
    for n in nodes:
        free += [v for v in n.inputs if v and v not in local and v not in free]
    free += [v.name for v in g.output if v.name not in local and v.name not in free]  # an output read from outside
    nodes = _toposort(nodes, set(initializers) | set(inputs) | set(free), where)
    return Graph(g.name, nodes, initializers, inputs, tuple(v.name for v in g.output), tuple(free), opsets)


def _toposort(nodes, available, where):
    """Kahn's order; a cycle or an input produced by nothing is a ModelError naming the node."""
    producer = {}
    for i, n in enumerate(nodes):
        for o in n.outputs:
            if o:
                producer[o] = i
    deps = []
    for n in nodes:
        d = set()
        for v in n.inputs:
            if not v or v in available:
                continue
            if v not in producer:
                raise ModelError(f"{where}: node '{n.name}' ({n.op_type}) reads '{v}', which no node, input or initializer provides")
            d.add(producer[v])
        deps.append(d)
    users = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    count = [len(d) for d in deps]
    ready = [i for i, c in enumerate(count) if c == 0]  # a heap: ties keep the file's order
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            count[u] -= 1
            if count[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(nodes[i].name for i in range(len(nodes)) if count[i] > 0)
        raise ModelError(f"{where}: the graph has a cycle through node '{stuck}'")
    return [nodes[i] for i in order]
