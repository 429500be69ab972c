"""Diagonal regions: runs of pointwise steps (GELU, SiLU, a bias before them) taken as one
product by the walkers. They agree with central differences and with the same model taken
step by step, in every mode, and are not formed, or not applied, where the Jacobian would not
be diagonal."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.model import load
from jaccli.plan import Plan

from gradcheck import N, fd_input_jacobian, fd_param_jacobian, rel_err

RNG = np.random.default_rng(11)


def make(nodes, inits, x_shape, y_shape):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def gelu_silu():
    """x @ W1 + b, GELU (erf form, as exporters write it), SiLU, @ W2."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Div", ["a", "r2"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a", "e1"], ["g0"]),
             helper.make_node("Mul", ["g0", "half"], ["g"]), helper.make_node("Sigmoid", ["g"], ["sg"]),
             helper.make_node("Mul", ["g", "sg"], ["u"]), helper.make_node("MatMul", ["u", "W2"], ["y"])]
    inits = {"W1": RNG.standard_normal((5, 7)), "b": RNG.standard_normal(7), "W2": RNG.standard_normal((7, 3)),
             "r2": np.sqrt(2.0), "one": 1.0, "half": 0.5}
    return make(nodes, inits, (5,), (3,)), inits


def regions(m, wrt):
    mm = load(m)
    plan = Plan(mm, "y", wrt, per_sample=wrt != ["x"])
    found = {id(r): r for r in plan.regions.values()}
    return [[s.node.op_type for s in r.steps] for r in found.values()]


def step_by_step(monkeypatch):
    monkeypatch.setattr(Plan, "_diagonal_regions", lambda self: {})


def test_gelu_and_silu_are_one_region():
    m, _ = gelu_silu()
    assert regions(m, ["x"]) == [["Add", "Div", "Erf", "Add", "Mul", "Mul", "Sigmoid", "Mul"]]
    # a parameter read inside (the bias, differentiated per sample) is not an entry: the rest still is
    assert regions(m, ["W1", "b", "W2"]) == [["Div", "Erf", "Add", "Mul", "Mul", "Sigmoid", "Mul"]]


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_input_jacobian_through_a_region(mode, monkeypatch):
    m, _ = gelu_silu()
    x = RNG.standard_normal((N, 5))
    J = jaccli.input_jacobian(m, x, dtype=np.float64, flat=True, mode=mode)
    assert rel_err(J, fd_input_jacobian(m, {"x": x}, "x")) < 1e-6
    step_by_step(monkeypatch)
    assert rel_err(J, jaccli.input_jacobian(m, x, dtype=np.float64, flat=True, mode=mode)) < 1e-12


def test_param_jacobian_through_a_region(monkeypatch):
    m, inits = gelu_silu()
    x = RNG.standard_normal((N, 5))
    names = ["W1", "b", "W2"]
    G, _ = jaccli.param_jacobian(m, x, dtype=np.float64, params=names)
    want = fd_param_jacobian(m, {"x": x}, names, inits)
    assert rel_err(G.reshape(want.shape), want) < 1e-6
    step_by_step(monkeypatch)
    assert rel_err(G, jaccli.param_jacobian(m, x, dtype=np.float64, params=names)[0]) < 1e-12


def test_a_broadcast_active_value_is_taken_step_by_step():
    """x (N, 1) times a (1, 4) constant: each output reads the same input, the Jacobian is not
    diagonal. The region is planned (shapes are not known then) and refused at run time."""
    nodes = [helper.make_node("Mul", ["x", "c"], ["t"]), helper.make_node("Tanh", ["t"], ["y"])]
    m = make(nodes, {"c": RNG.standard_normal((1, 4))}, (1,), (4,))
    assert regions(m, ["x"]) == [["Mul", "Tanh"]]
    x = RNG.standard_normal((N, 1))
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x, dtype=np.float64, flat=True, mode=mode)
        assert J.shape == (N, 4, 1) and rel_err(J, fd_input_jacobian(m, {"x": x}, "x")) < 1e-6


def test_a_value_read_outside_ends_the_region():
    """t = tanh(x) is read by a MatMul as well: the region stops at t, and t's cotangent sums both."""
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Exp", ["t"], ["e"]),
             helper.make_node("Sin", ["e"], ["s"]), helper.make_node("MatMul", ["t", "W"], ["w"]),
             helper.make_node("Add", ["s", "w"], ["y"])]
    m = make(nodes, {"W": RNG.standard_normal((4, 4))}, (4,), (4,))
    assert regions(m, ["x"]) == [["Exp", "Sin"]]
    x = RNG.standard_normal((N, 4))
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x, dtype=np.float64, flat=True, mode=mode)
        assert rel_err(J, fd_input_jacobian(m, {"x": x}, "x")) < 1e-6
