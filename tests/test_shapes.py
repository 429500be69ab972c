"""Real-world shapes: fixed batch dimensions, graphs that mix samples, several inputs and outputs,
outputs that do not depend on the input, and the quirks of old exports."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.errors import DataError


def model(nodes, inputs, outputs, inits=(), opset=13):
    g = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 12)).astype(np.float32)


def fixed_batch_model():
    """Declared batch 1 with a Reshape to [1, -1] baked in, as model zoos export."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    return model(nodes, [x], [y], [init("shape", np.array([1, -1], np.int64)), init("W", W)])


def test_fixed_batch_of_one_works_for_many_samples():
    x = RNG.standard_normal((5, 3, 2, 2)).astype(np.float32)
    r = jaccli.input_jacobian(fixed_batch_model(), x, return_result=True)
    assert r.value.shape == (5, 3, 3, 2, 2)
    assert r.chunks[0] == 1  # one sample per run
    for n in range(5):
        expected = W * (x[n].ravel() > 0)
        np.testing.assert_allclose(r.value[n].reshape(3, 12), expected, rtol=1e-6)
    G, cols = jaccli.param_jacobian(fixed_batch_model(), x)
    assert G.shape == (5, 3, 36)
    np.testing.assert_allclose(G[2, 1, 12:24], np.maximum(x[2].ravel(), 0), rtol=1e-6)


def test_a_graph_that_mixes_samples_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    m = model([helper.make_node("Softmax", ["x"], ["y"], axis=0)], [x], [y])
    with pytest.raises(DataError, match="mixes samples"):
        jaccli.input_jacobian(m, RNG.standard_normal((3, 4)))


def test_batch_norm_training_style_statistics_are_refused():
    # statistics over the batch computed by hand: ReduceMean over axis 0
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[0], keepdims=1), helper.make_node("Sub", ["x", "mu"], ["y"])]
    with pytest.raises(DataError, match="mixes samples"):
        jaccli.input_jacobian(model(nodes, [x], [y]), RNG.standard_normal((3, 4)))


def two_in_two_out():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])
    y1 = helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 3])
    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("Mul", ["a", "b"], ["y1"]), helper.make_node("Tanh", ["b"], ["y2"])]
    return model(nodes, [a, b], [y1, y2])


def test_several_inputs_and_outputs_with_wrt_and_of():
    m = two_in_two_out()
    a, b = RNG.standard_normal((4, 3)), RNG.standard_normal((4, 3))
    J = jaccli.input_jacobian(m, {"a": a, "b": b}, wrt="b", of="y1", dtype="float64")
    np.testing.assert_allclose(J[1], np.diag(a[1]))
    J = jaccli.input_jacobian(m, {"a": a, "b": b}, wrt="b", of="y2", dtype="float64")
    np.testing.assert_allclose(J[2], np.diag(1 - np.tanh(b[2]) ** 2))


def test_an_output_that_does_not_depend_on_the_input_gives_zeros_and_a_note():
    m = two_in_two_out()
    r = jaccli.input_jacobian(m, {"a": RNG.standard_normal((2, 3)), "b": RNG.standard_normal((2, 3))},
                              wrt="a", of="y2", return_result=True)
    assert not r.value.any()
    assert any("does not depend" in n for n in r.notes)


def test_identity_wired_shared_weights_constants_and_initializers_listed_as_inputs():
    # tied weights through Identity, a Constant node, and (as old exports do) the weights also
    # listed among the graph inputs
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    w_in = helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    Wv = RNG.standard_normal((4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["W"], ["W_tied"]),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "W_tied"], ["u"]),
        helper.make_node("Mul", ["u", "half"], ["y"]),
    ]
    m = model(nodes, [x, w_in], [y], [init("W", Wv)])
    xv = RNG.standard_normal((3, 4))
    assert [v.name for v in jaccli.load(m).inputs] == ["x"]
    G, cols = jaccli.param_jacobian(m, xv, dtype="float64")
    assert [c["name"] for c in cols] == ["W"]
    eps = 1e-6
    from gradcheck import our_forward

    def with_weight(Wnew):  # a new model, so that the tied copy moves with W
        return model(nodes, [x, w_in], [y], [init("W", Wnew)])

    fd = np.zeros((3, 4, 16))
    for j in range(16):
        d = np.zeros(16)
        d[j] = eps
        fd[:, :, j] = (our_forward(with_weight(Wv + d.reshape(4, 4)), {"x": xv}) -
                       our_forward(with_weight(Wv - d.reshape(4, 4)), {"x": xv})) / (2 * eps)
    np.testing.assert_allclose(G, fd, rtol=1e-6, atol=1e-9)
