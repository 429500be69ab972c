"""What `jaccli inspect` reports: names, shapes, parameters, operators and their support."""

from __future__ import annotations

from collections import Counter

from .errors import UnsupportedOpError
from .model import load
from .plan import quantizes
from .rules import lookup


def describe(path):
    from .plan import with_subgraph_nodes

    model = load(path)
    nodes = list(with_subgraph_nodes(model.nodes))  # sub-graphs' nodes (If, Loop) counted too
    counts = Counter((n.domain, n.op_type, n.opset) for n in nodes)
    first = {}
    for n in nodes:
        first.setdefault((n.domain, n.op_type, n.opset), n.name)
    ops = []
    for (domain, op, opset), c in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        try:
            lookup(op, opset, domain)
            ok = True
        except UnsupportedOpError:
            ok = (domain, op) == ("ai.onnx.ml", "ZipMap")  # its output stands for the probabilities it reads (Model.output)
        ops.append({"op": f"{domain}.{op}" if domain else op, "opset": opset, "count": c, "supported": ok,
                    "first_node": first[(domain, op, opset)]})
    params = []
    seen = set()
    for out in model.outputs:
        for name in model.parameters(out.name):
            if name not in seen:
                seen.add(name)
                params.append(model.parameter_entry(name))
    return {
        "path": str(path),
        "producer": model.producer,
        "opsets": {k or "ai.onnx": v for k, v in model.opsets.items()},
        "inputs": [{"name": v.name, "type": v.describe()} for v in model.inputs],
        "outputs": [{"name": v.name, "type": v.describe()} for v in model.outputs],
        "parameters": params,
        "n_parameters": sum(p["size"] for p in params),
        "operators": ops,
        "expanded": dict(model.expanded),  # operators replaced by their ONNX function bodies
        "nchwc": dict(model.nchwc),  # onnxruntime's NCHWc operators, read as the standard ones they fuse
        "held_weights": model.held_weights,  # float Constant nodes taken as initializers: the model's weights
        "hoisted_weights": model.hoisted_weights,  # sub-graphs' float initializers, read from the main graph
        "untied_weights": model.untied_weights,  # Identity copies of an initializer read more than once, apart
        "unmerged_weights": model.unmerged_weights,  # parameters torch.export's optimizer merged into an equal one, apart
        "restored_weights": model.restored_weights,  # parameters an exporter stored transposed or reshaped, in their own layout
        "batchnorm_folded": dict(model.export_fused),  # weights torch.export's optimizer folded a BatchNorm into
        "removed_parameters": model.export_removed,  # parameters of a torch.export model that its file lacks
        "attribute_params": sorted(model.attribute_params),  # ai.onnx.ml weights made parameters from attributes
        "sample_axes": dict(model.sample_axes),  # inputs that declare their batch on another axis than the first
        "fixed_batch": model.fixed_batch()[1],  # the smallest batch an input declares as a number, or None
        # QuantizeLinear nodes of values (not of weights): the derivatives stop there unless taken straight through
        "quantized_values": sum(quantizes(n, model.initializers) and n.inputs[0] not in model.initializers for n in model.nodes),
    }
