"""Models saved by onnxruntime at its highest optimization level (ORT_ENABLE_ALL, the default of
SessionOptions, with `optimized_model_filepath`) on x86: their convolutions and pools are in the
domain com.microsoft.nchwc, on tensors whose channels are blocked (NCHWc: channels padded to a
multiple of the machine's block, 8 or 16, and stored block by block) and with weights reordered
for those blocks. Such a file runs only on a machine with the same block size, as onnxruntime
warns when it writes one.

`plain` rewrites them as the standard operators they fuse, on NCHW tensors with the padded
channels kept (zeros from zero weights, which the next convolution's zero weights ignore):

- ReorderInput: the channels padded with zeros (NHWC transposed first);
- Conv: Conv with its weight reordered back to OIHW, then Add of its Sum input, then its
  activation (Relu, Sigmoid, Tanh, LeakyRelu, Clip, HardSigmoid, HardSwish);
- MaxPool, AveragePool, GlobalMaxPool, GlobalAveragePool: themselves;
- Upsample: Resize (nearest by floor, or linear);
- ReorderOutput: the real channels sliced out (NHWC transposed after).

The block size is the one onnxruntime uses on this machine, asked of it once."""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError

DOMAIN = "com.microsoft.nchwc"


@functools.lru_cache(maxsize=1)
def block_size():
    """The channel block onnxruntime's NCHWc kernels use here: a ReorderInput of a (1, 32, 1, 2)
    ramp, read back in memory order, puts the second pixel of channel 0 at the block's end."""
    import onnxruntime as ort

    g = helper.make_graph([helper.make_node("ReorderInput", ["x"], ["y"], domain=DOMAIN)], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 1, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)])
    m.ir_version = 8
    x = np.arange(64, dtype=np.float32).reshape(1, 32, 1, 2)  # x[c, w] = 2c + w
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        y = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    except Exception:
        return 0
    at = np.flatnonzero(y.ravel() == 1)  # memory [c / B][w][c % B]: pixel 1 of channel 0 at index B
    return int(at[0]) if at.size else 0


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def _unblock(w, blocked_input, B):
    """A weight reordered for NCHWc (shape as stored: (O_pad, I, kh, kw)) back to OIHW: OIHWBo
    ([O/B][I][kh][kw][Bo]) for a plain input or a depthwise filter, OIHWBiBo ([O/B][I/B][kh][kw][Bi][Bo])
    for a blocked input."""
    O, I = w.shape[:2]
    k = w.shape[2:]
    flat = w.reshape(-1)
    if blocked_input:
        v = flat.reshape((O // B, I // B) + k + (B, B))  # ..., Bi, Bo
        nk = len(k)
        order = (0, 3 + nk, 1, 2 + nk) + tuple(range(2, 2 + nk))
        return np.ascontiguousarray(v.transpose(order)).reshape(w.shape)
    v = flat.reshape((O // B, I) + k + (B,))
    order = (0, 2 + len(k), 1) + tuple(range(2, 2 + len(k)))
    return np.ascontiguousarray(v.transpose(order)).reshape(w.shape)


class _Writer:
    def __init__(self, proto):
        self.proto, self.nodes, self.count = proto, [], 0
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)

    def name(self, base):
        self.count += 1
        return f"{base}__nchwc{self.count}"

    def const(self, base, array):
        name = self.name(base)
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name)))
        return name

    def add(self, op, inputs, output, base, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.name(base), **attrs))
        return output


def _activation(w, x, out, node, attrs):
    act = _text(attrs.get("activation", ""))
    params = list(attrs.get("activation_params", []))
    base = node.name or node.output[0]
    if not act:
        return w.add("Identity", [x], out, base)
    if act in ("Relu", "Sigmoid", "Tanh"):
        return w.add(act, [x], out, base)
    if act == "LeakyRelu":
        return w.add("LeakyRelu", [x], out, base, alpha=params[0] if params else 0.01)
    if act == "HardSigmoid":
        return w.add("HardSigmoid", [x], out, base, **(dict(alpha=params[0], beta=params[1]) if params else {}))
    if act == "HardSwish":  # x * HardSigmoid(x, 1/6, 1/2)
        gate = w.add("HardSigmoid", [x], w.name(base), base, alpha=1 / 6, beta=0.5)
        return w.add("Mul", [x, gate], out, base)
    if act == "Clip":
        lo, hi = (params + [-np.inf, np.inf][len(params):])[:2] if params else (-np.inf, np.inf)
        if w.opset >= 11:
            return w.add("Clip", [x, w.const(base, np.float32(lo)), w.const(base, np.float32(hi))], out, base)
        return w.add("Clip", [x], out, base, min=float(lo), max=float(hi))
    raise ModelError(f"node '{node.name}': onnxruntime's NCHWc Conv with activation {act} is not supported")


def counts(proto):
    """{operator: nodes} of the model's com.microsoft.nchwc nodes."""
    out = {}
    for n in proto.graph.node:
        if n.domain == DOMAIN:
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def plain(proto):
    """The model with its com.microsoft.nchwc nodes as standard operators (see the module's text),
    or the model itself if it has none."""
    if not any(n.domain == DOMAIN for n in proto.graph.node):
        return proto
    B = block_size()
    if not B:
        raise ModelError("the model was saved by onnxruntime with its NCHWc layout (com.microsoft.nchwc), which "
                         "onnxruntime on this machine does not run: save it at ORT_ENABLE_EXTENDED, or use the original")
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    inits = {t.name: t for t in m.graph.initializer}
    blocked = set()  # values in the blocked layout (channels padded)
    w = _Writer(m)
    for node in m.graph.node:
        if node.domain != DOMAIN:
            w.nodes.append(node)
            continue
        a, op, base = _attrs(node), node.op_type, node.name or node.output[0]
        x, y = node.input[0], node.output[0]
        if op in ("ReorderInput", "Upsample") and w.opset < 11:
            raise ModelError(f"node '{node.name}': onnxruntime's NCHWc {op} in a model of opset {w.opset} is not "
                             f"supported (from opset 11)")
        if op == "ReorderInput":  # pads: begins 0; ends 0, (-C) mod B, 0, 0
            if a.get("channels_last"):
                x = w.add("Transpose", [x], w.name(base), base, perm=[0, 3, 1, 2])
            c = w.add("Gather", [w.add("Shape", [x], w.name(base), base), w.const(base, np.int64(1))], w.name(base), base, axis=0)
            pad = w.add("Mod", [w.add("Neg", [c], w.name(base), base), w.const(base, np.int64(B))], w.name(base), base)
            pad = w.add("Reshape", [pad, w.const(base, np.array([1]))], w.name(base), base)
            pads = w.add("Concat", [w.const(base, np.zeros(5, np.int64)), pad, w.const(base, np.zeros(2, np.int64))],
                         w.name(base), base, axis=0)
            w.add("Pad", [x, pads], y, base)
        elif op == "ReorderOutput":
            channels_last = a.get("channels_last")
            sliced = w.name(base) if channels_last else y
            w.add("Slice", [x, w.const(base, np.array([0])), w.const(base, np.array([a["channels"]])), w.const(base, np.array([1]))],
                  sliced, base)
            if channels_last:
                w.add("Transpose", [sliced], y, base, perm=[0, 2, 3, 1])
        elif op == "Conv":
            weight = node.input[1]
            if weight not in inits:
                raise ModelError(f"node '{node.name}': onnxruntime's NCHWc Conv without a constant weight")
            group = int(a.get("group", 1))
            t = inits[weight]
            plain_w = _unblock(numpy_helper.to_array(t), x in blocked and group == 1, B)
            t.CopyFrom(numpy_helper.from_array(plain_w.astype(numpy_helper.to_array(t).dtype), weight))
            conv = {k: v for k, v in a.items() if k not in ("activation", "activation_params")}
            if group > 1:
                conv["group"] = plain_w.shape[0]  # depthwise: the padded channels too, each with its zero filter
            ins = [x, weight] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
            out = w.add("Conv", ins, w.name(base), base, **conv)
            if len(node.input) > 3 and node.input[3]:
                out = w.add("Add", [out, node.input[3]], w.name(base), base)
            _activation(w, out, y, node, a)
        elif op in ("MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"):
            w.add(op, [x], y, base, **a)
        elif op == "Upsample":
            mode = _text(a.get("mode", "nearest"))
            scales = w.const(base, np.asarray(a["scales"], np.float32))
            extra = dict(nearest_mode="floor") if mode == "nearest" else {}
            w.add("Resize", [x, "", scales], y, base, mode=mode, **extra,
                  coordinate_transformation_mode=_text(a.get("coordinate_transformation_mode", "asymmetric")))
        else:
            raise ModelError(f"node '{node.name}': onnxruntime's NCHWc operator {op} is not supported")
        if op != "ReorderOutput":
            blocked.add(y)
    del m.graph.node[:]
    m.graph.node.extend(w.nodes)
    return m
