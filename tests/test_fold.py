"""BatchNormalization merged into the convolution before it (inference graphs): the same outputs
as onnxruntime, the same Jacobians as central differences, and no merge where it would be wrong."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.model import load
from jaccli.plan import Plan

from gradcheck import N, fd_input_jacobian, ort_forward, rel_err

RNG = np.random.default_rng(3)


def conv_bn(bias=True, conv_also_read=False, group=1):
    c, m = 4, 4
    inits = {"W": RNG.standard_normal((m, c // group, 3, 3)), "gamma": RNG.uniform(0.5, 2, m),
             "beta": RNG.standard_normal(m), "mean": RNG.standard_normal(m), "var": RNG.uniform(0.5, 2, m)}
    if bias:
        inits["B"] = RNG.standard_normal(m)
    nodes = [helper.make_node("Conv", ["x", "W"] + (["B"] if bias else []), ["c"], pads=[1, 1, 1, 1], group=group),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], epsilon=1e-3),
             helper.make_node("Tanh", ["b"], ["y"])]
    if conv_also_read:  # the convolution's output is read by another node too: it must stay
        nodes[-1] = helper.make_node("Tanh", ["b"], ["t"])
        nodes.append(helper.make_node("Add", ["t", "c"], ["y"]))
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def ops(plan):
    return [s.node.op_type for s in plan.steps]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_folded_conv_matches_oracle_and_differences(bias, group):
    model = conv_bn(bias, group=group)
    m = load(model)
    assert ops(Plan(m, "y", ["x"])) == ["Conv", "Tanh"]
    x = RNG.standard_normal((N, 4, 5, 5))
    y = jaccli.input_jacobian(m, x.astype(np.float32), return_result=True).outputs
    want, _ = ort_forward(model, {"x": x})
    assert rel_err(y, want) < 1e-5
    J = jaccli.input_jacobian(m, x, dtype=np.float64, flat=True)
    assert rel_err(J, fd_input_jacobian(model, {"x": x}, "x")) < 1e-6


def test_no_fold_where_the_convolution_output_is_read_twice():
    model = conv_bn(conv_also_read=True)
    m = load(model)
    assert "BatchNormalization" in ops(Plan(m, "y", ["x"]))
    x = RNG.standard_normal((N, 4, 5, 5))
    J = jaccli.input_jacobian(m, x, dtype=np.float64, flat=True)
    assert rel_err(J, fd_input_jacobian(model, {"x": x}, "x")) < 1e-6


def test_no_fold_of_parameters_being_differentiated():
    m = load(conv_bn())
    assert "BatchNormalization" in ops(Plan(m, "y", ["W", "gamma"], per_sample=True))
    assert ops(Plan(m, "c", ["x"])) == ["Conv"]  # the convolution's own output asked for: no BatchNormalization
    assert ops(Plan(m, "b", ["x"])) == ["Conv"]  # the normalised output asked for: merged


@pytest.mark.parametrize("act,attrs,swapped", [("Relu", {}, True), ("LeakyRelu", {"alpha": 0.1}, True), ("Tanh", {}, True),
                                               ("LeakyRelu", {"alpha": -0.5}, False), ("Elu", {}, False)])
def test_max_pool_runs_before_a_monotone_activation(act, attrs, swapped):
    """Conv -> activation -> MaxPool: for a nondecreasing activation the plan pools first (the same
    values, a quarter of them to activate); not for a decreasing one or one it does not know."""
    from gradcheck import check_whole_model, one_input_model

    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node(act, ["c"], ["a"], **attrs),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "G"], ["y"], transB=1)]
    inits = {"W": RNG.standard_normal((3, 2, 3, 3)).astype(np.float32), "B": RNG.standard_normal(3).astype(np.float32),
             "G": RNG.standard_normal((2, 3 * 3 * 3)).astype(np.float32)}
    m = one_input_model(nodes, inits, (2, 5, 5))
    plan = Plan(load(m), "y", ["x"])
    order = [s.node.op_type for s in plan.steps]
    assert (order.index("MaxPool") < order.index(act)) == swapped, order
    assert check_whole_model(m, RNG.standard_normal((N, 2, 5, 5))) == ["W", "B", "G"]
