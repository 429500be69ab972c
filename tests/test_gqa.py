"""GroupQueryAttention (onnxruntime's LLM attention) on a prompt: its outputs against
onnxruntime's (grouped heads, scale, local window, packed QKV, rotary embeddings in both
layouts), its derivatives against differences, and a small attention layer built around it
(projections, rotary caches, sequence lengths read from the input) through jaccli's checks."""

import numpy as np
import onnxruntime as ort
import pytest
from gradcheck import N, check_rule, check_whole_model, one_input_model
from onnx import TensorProto, helper, numpy_helper

from jaccli.rules.contrib import GroupQueryAttention

B, S, HQ, HKV, D = 2, 5, 4, 2, 16  # onnxruntime's CPU kernel takes heads of a multiple of 16
CASES = [({}, False, False, 0), ({"scale": 0.3}, False, False, 0), ({"local_window_size": 2}, False, False, 0),
         ({}, True, False, 0), ({}, False, True, 0), ({}, False, True, 1), ({"local_window_size": 3}, True, True, 0)]
IDS = ["plain", "scale", "window", "packed", "rotary", "rotary-interleaved", "packed-rotary-window"]


def inputs(rng, packed, rotary):
    x = {"q": rng.standard_normal((B, S, (HQ + 2 * HKV) * D if packed else HQ * D)).astype(np.float32)}
    if not packed:
        x["k"] = rng.standard_normal((B, S, HKV * D)).astype(np.float32)
        x["v"] = rng.standard_normal((B, S, HKV * D)).astype(np.float32)
    x["sl"], x["tl"] = np.full(B, S - 1, np.int32), np.array(S, np.int32)
    if rotary:
        angles = rng.uniform(0, 3, (32, D // 2))
        x["cos"], x["sin"] = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return x


def node_attrs(attrs, rotary, interleaved):
    return dict(attrs, num_heads=HQ, kv_num_heads=HKV, do_rotary=int(rotary), **({"rotary_interleaved": interleaved} if rotary else {}))


def as_args(x):
    args = [x["q"], x.get("k"), x.get("v"), None, None, x["sl"], x["tl"], x.get("cos"), x.get("sin")]
    while args[-1] is None:
        args.pop()
    return args


@pytest.mark.parametrize("attrs, packed, rotary, interleaved", CASES, ids=IDS)
def test_gqa_is_onnxruntimes(attrs, packed, rotary, interleaved):
    x = inputs(np.random.default_rng(0), packed, rotary)
    names = ["q"] + (["", ""] if packed else ["k", "v"]) + ["", "", "sl", "tl"] + (["cos", "sin"] if rotary else [])
    node = helper.make_node("GroupQueryAttention", names, ["y", "present_key", "present_value"], domain="com.microsoft",
                            **node_attrs(attrs, rotary, interleaved))
    vi = lambda n, t=TensorProto.FLOAT: helper.make_tensor_value_info(n, t, None)  # noqa: E731
    g = helper.make_graph([node], "g", [vi(n, TensorProto.INT32 if n in ("sl", "tl") else TensorProto.FLOAT) for n in names if n],
                          [vi("y"), vi("present_key"), vi("present_value")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    ours = GroupQueryAttention.forward(*as_args(x), n_outputs=3, **node_attrs(attrs, rotary, interleaved))
    for r, o in zip(ref, ours):
        assert r.shape == o.shape
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs, packed, rotary, interleaved", CASES, ids=IDS)
def test_gqa_differentiates(attrs, packed, rotary, interleaved):
    rng = np.random.default_rng(1)
    args = as_args(inputs(rng, packed, rotary))
    diff = [k for k in range(3) if k < len(args) and args[k] is not None]
    args = [a.astype(np.float64) if k in diff else a for k, a in enumerate(args)]
    check_rule(GroupQueryAttention, args, node_attrs(attrs, rotary, interleaved), diff, rng)


def test_a_past_state_is_refused():
    x = inputs(np.random.default_rng(2), False, False)
    with pytest.raises(Exception, match="a past state or padded sequences"):
        GroupQueryAttention.forward(x["q"], x["k"], x["v"], None, None, x["sl"] - 1, x["tl"], num_heads=HQ, kv_num_heads=HKV)


def attention_layer(output):
    """x (N, S, 8) -> Q, K, V projections -> GroupQueryAttention (4 query heads, 2 key-value
    heads of 16, rotary) with seqlens_k and total_sequence_length read from x -> `output`."""
    rng = np.random.default_rng(3)
    angles = rng.uniform(0, 3, (16, D // 2))
    inits = {"Wq": rng.standard_normal((8, HQ * D)) * 0.4, "Wk": rng.standard_normal((8, HKV * D)) * 0.4,
             "Wv": rng.standard_normal((8, HKV * D)) * 0.4, "cos": np.cos(angles), "sin": np.sin(angles),
             "zero": np.array(0.0), "one": np.array(1.0), "i0": np.array(0), "i1": np.array(1), "ax1": np.array([1])}
    inits = [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in inits.items()]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "Wq"], ["q"]), n("MatMul", ["x", "Wk"], ["k"]), n("MatMul", ["x", "Wv"], ["v"]),
             n("Mul", ["x", "zero"], ["z"]), n("Add", ["z", "one"], ["ones"]), n("Gather", ["ones", "i0"], ["row"], axis=2),
             n("ReduceSum", ["row", "ax1"], ["length"], keepdims=0), n("Sub", ["length", "one"], ["last"]),
             n("Cast", ["last"], ["sl"], to=TensorProto.INT32), n("Shape", ["x"], ["shape"]), n("Gather", ["shape", "i1"], ["S"]),
             n("Cast", ["S"], ["tl"], to=TensorProto.INT32),
             n("GroupQueryAttention", ["q", "k", "v", "", "", "sl", "tl", "cos", "sin"], ["attn", "present_key", "present_value"],
               domain="com.microsoft", num_heads=HQ, kv_num_heads=HKV, do_rotary=1),
             n("Transpose", ["present_key"], ["kt"], perm=[0, 2, 1, 3]), n("Reshape", ["kt", "flat"], ["kf"]),
             n("Concat", ["attn", "kf"], ["both"], axis=-1),  # both reach the output: their cotangents add
             n("Identity", [output], ["y"])]
    inits.append(numpy_helper.from_array(np.array([0, S, HKV * D]), "flat"))
    m = one_input_model(nodes, inits, (S, 8), opset=17)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


@pytest.mark.parametrize("output", ["attn", "present_key", "present_value", "both"])
def test_an_attention_layer_differentiates(output):
    """Forward against onnxruntime; input Jacobian in both modes and the projections'
    per-sample Jacobians against float64 differences (the rotary caches are tables, not
    differentiated; present_key and present_value do not depend on Wq: zero columns)."""
    x = np.random.default_rng(4).standard_normal((N, S, 8)).astype(np.float32)
    assert check_whole_model(attention_layer(output), x) == ["Wq", "Wk", "Wv"]
