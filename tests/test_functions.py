"""Operators jaccli has no rule for, but which ONNX defines as functions of other operators
(opset 23's Attention, CenterCropPad, MeanVarianceNormalization, HannWindow, opset 27's
LinearAttention and CausalConvWithState, opset 28's SwiGLU, ai.onnx.preview's FlexAttention
with its modifier sub-graphs): the loader replaces them with
their function bodies. The forward pass matches onnxruntime's own kernels for those operators
(onnx's reference evaluator's for an opset onnxruntime does not run), and the Jacobians match
central differences."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.model import load

from gradcheck import N, fd_input_jacobian, fd_param_jacobian, ort_forward, our_forward, rel_err

RNG = np.random.default_rng(23)


def make(nodes, inits, x_shape, y_shape, opset):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape])],
                          [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def center_crop_pad():
    """A crop of one axis and a pad of another, in one operator (its body slices and pads), after
    a weight so that there is a parameter to differentiate."""
    inits = {"s": 1 + 0.3 * RNG.standard_normal(6), "shape": np.array([3, 8], np.int64)}
    nodes = [helper.make_node("Mul", ["x", "s"], ["z"]), helper.make_node("CenterCropPad", ["z", "shape"], ["y"], axes=[1, 2])]
    return make(nodes, inits, (5, 6), (3, 8), 18), {"s": inits["s"]}


def attention():
    """Causal self-attention, 2 heads of 4, through the Attention operator on 4-D inputs."""
    inits = {f"W{c}": RNG.standard_normal((8, 8)) / 3 for c in "qkv"}
    inits["heads"] = np.array([0, 5, 2, 4], np.int64)
    nodes = []
    for c in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"W{c}"], [f"{c}0"]), helper.make_node("Reshape", [f"{c}0", "heads"], [f"{c}1"]),
                  helper.make_node("Transpose", [f"{c}1"], [c], perm=[0, 2, 1, 3])]
    nodes.append(helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1))
    return make(nodes, inits, (5, 8), (2, 5, 4), 23), {k: v for k, v in inits.items() if k != "heads"}


def mvn():
    nodes = [helper.make_node("Tanh", ["x"], ["c"]), helper.make_node("MeanVarianceNormalization", ["c"], ["y"], axes=[1, 2])]
    return make(nodes, {}, (3, 4), (3, 4), 13), {}


def hann_window():
    """A spectrogram's window made in the graph: HannWindow's body refers to its output type, an
    attribute the node leaves to its default, and at opset 18 the body (written for 17) is
    converted, which needs the type of its size, an initializer."""
    inits = {"size": np.array(8, np.int64), "step": np.array(4, np.int64)}
    nodes = [helper.make_node("HannWindow", ["size"], ["w"]), helper.make_node("STFT", ["x", "step", "w"], ["y"])]
    return make(nodes, inits, (32, 1), (7, 5, 2), 18), {}


def linear_attention():
    """Gated delta-rule linear attention (Qwen3.5's), 2 query heads sharing one key-value head, its
    decay and update rate made from the input; only its output is used. onnx 1.23's shape
    inference fails on a node that leaves out the state output, which the body needs types from."""
    inits = {"Wq": RNG.standard_normal((8, 8)) / 3, "Wk": RNG.standard_normal((8, 4)) / 3, "Wv": RNG.standard_normal((8, 4)) / 3,
             "Wg": RNG.standard_normal((8, 1)), "Wb": RNG.standard_normal((8, 1))}
    nodes = [helper.make_node("MatMul", ["x", f"W{c}"], [c]) for c in "qkv"]
    nodes += [helper.make_node("MatMul", ["x", "Wg"], ["g0"]), helper.make_node("Sigmoid", ["g0"], ["g1"]),
              helper.make_node("Log", ["g1"], ["g"]),  # a decay in log space, below 0
              helper.make_node("MatMul", ["x", "Wb"], ["b0"]), helper.make_node("Sigmoid", ["b0"], ["beta"]),
              helper.make_node("LinearAttention", ["q", "k", "v", "", "g", "beta"], ["y"], q_num_heads=2, kv_num_heads=1,
                               update_rule="gated_delta")]
    return make(nodes, inits, (5, 8), (5, 8), 27), inits


def causal_conv():
    """Mamba's causal depthwise convolution with its SiLU, no past state given, the state left out."""
    inits = {"W": RNG.standard_normal((4, 1, 3)), "B": RNG.standard_normal(4)}
    nodes = [helper.make_node("CausalConvWithState", ["x", "W", "B"], ["y"], activation="silu")]
    return make(nodes, inits, (4, 7), (4, 7), 27), inits


def swiglu():
    """Llama's gated feed-forward activation on two projections."""
    inits = {"Wa": RNG.standard_normal((6, 5)) / 2, "Wb": RNG.standard_normal((6, 5)) / 2}
    nodes = [helper.make_node("MatMul", ["x", "Wa"], ["a"]), helper.make_node("MatMul", ["x", "Wb"], ["b"]),
             helper.make_node("SwiGLU", ["a", "b"], ["y"], alpha=1.3)]
    return make(nodes, inits, (6,), (5,), 28), inits


def flex_attention():
    """ai.onnx.preview's FlexAttention (torch's flex_attention): 2 query heads sharing one
    key-value head, a score modifier that caps the scores softly (tanh, as Gemma's), and a
    probability modifier that squares them."""
    inits = {"Wq": RNG.standard_normal((8, 8)) / 3, "Wk": RNG.standard_normal((8, 4)) / 3, "Wv": RNG.standard_normal((8, 4)) / 3,
             "q_heads": np.array([0, 5, 2, 4], np.int64), "kv_heads": np.array([0, 5, 1, 4], np.int64),
             "back": np.array([0, 5, 8], np.int64)}
    nodes = []
    for c, shape in (("q", "q_heads"), ("k", "kv_heads"), ("v", "kv_heads")):
        nodes += [helper.make_node("MatMul", ["x", f"W{c}"], [f"{c}0"]), helper.make_node("Reshape", [f"{c}0", shape], [f"{c}1"]),
                  helper.make_node("Transpose", [f"{c}1"], [c], perm=[0, 2, 1, 3])]
    score_mod = helper.make_graph(
        [helper.make_node("Constant", [], ["cap"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
         helper.make_node("Div", ["s", "cap"], ["s1"]), helper.make_node("Tanh", ["s1"], ["s2"]),
         helper.make_node("Mul", ["s2", "cap"], ["s_out"])], "score_mod",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)], [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)])
    prob_mod = helper.make_graph([helper.make_node("Mul", ["p", "p"], ["p_out"])], "prob_mod",
                                 [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)],
                                 [helper.make_tensor_value_info("p_out", TensorProto.FLOAT, None)])
    nodes += [helper.make_node("FlexAttention", ["q", "k", "v"], ["a"], domain="ai.onnx.preview", score_mod=score_mod,
                               prob_mod=prob_mod),
              helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["at", "back"], ["y"])]
    m = make(nodes, inits, (5, 8), (5, 8), 23)
    m.opset_import.append(helper.make_opsetid("ai.onnx.preview", 1))
    return m, {k: inits[k] for k in ("Wq", "Wk", "Wv")}


CASES = {"CenterCropPad": center_crop_pad, "Attention": attention, "MeanVarianceNormalization": mvn,
         "HannWindow": hann_window, "LinearAttention": linear_attention, "CausalConvWithState": causal_conv,
         "SwiGLU": swiglu, "FlexAttention": flex_attention}
NEWER = {"LinearAttention": 27, "CausalConvWithState": 27, "SwiGLU": 28}  # the opsets that brought them, which onnx may not know yet
PREVIEW = {"FlexAttention"}  # ai.onnx.preview's, which onnxruntime does not run


def _case(name):
    if onnx.defs.onnx_opset_version() < NEWER.get(name, 0) or (name in PREVIEW and not onnx.defs.has(name, "ai.onnx.preview")):
        pytest.skip(f"onnx {onnx.__version__} has no {name}")
    return CASES[name]()


@pytest.mark.parametrize("name", CASES)
def test_expanded_forward_matches_onnxruntime(name):
    m, _ = _case(name)
    loaded = load(m)
    assert name.split("+")[0] not in {n.op_type for n in loaded.nodes}  # replaced by its body
    assert set(loaded.expanded) == set(name.split("+"))  # and said so (jaccli inspect prints it)
    x = RNG.standard_normal((N, *[d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]]))
    want, oracle = ort_forward(m, {"x": x.astype(np.float32)})
    assert oracle == "onnxruntime" or name in NEWER or name in PREVIEW
    assert rel_err(our_forward(m, {"x": x}, np.float32), want) < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_expanded_jacobians_match_differences(name):
    m, inits = _case(name)
    x = RNG.standard_normal((N, *[d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]]))
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x, dtype=np.float64, flat=True, mode=mode)
        assert rel_err(J, fd_input_jacobian(m, {"x": x}, "x")) < 1e-6
    if inits:
        names = list(inits)  # the model's initializer order, as the columns
        G, _ = jaccli.param_jacobian(m, x, dtype=np.float64, params=names)
        want = fd_param_jacobian(m, {"x": x}, names, inits)
        assert rel_err(G.reshape(want.shape), want) < 1e-6
