"""Cotangents written in place: per-sample parameter cotangents straight into the result (through a weight's Transpose,
by a MatMul whose samples are a batch axis) agree with central differences, and a parameter
read twice is still summed over its readers."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaccli

from gradcheck import N, fd_input_jacobian, fd_param_jacobian, rel_err

RNG = np.random.default_rng(5)


def model(twice=False, perm=None):
    W = RNG.standard_normal((5, 4)) if perm is None else RNG.standard_normal((4, 1, 5)).astype(np.float64)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], **({} if perm is None else {"perm": perm}))]
    if perm is not None:
        nodes.append(helper.make_node("Reshape", ["Wt", "shape"], ["Wm"]))
    w = "Wm" if perm is not None else "Wt"
    nodes.append(helper.make_node("MatMul", ["x", w], ["h"]))
    if twice:  # the transposed weight read again: its cotangent has two terms
        nodes.append(helper.make_node("MatMul", ["x", w], ["g"]))
        nodes.append(helper.make_node("Mul", ["h", "g"], ["y"]))
    else:
        nodes.append(helper.make_node("Tanh", ["h"], ["y"]))
    inits = {"W": W}
    if perm is not None:
        inits["shape"] = np.array([4, 5], np.int64)
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 5])],
                          [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m, {k: v for k, v in inits.items() if v.dtype != np.int64}


@pytest.mark.parametrize("twice", [False, True])
@pytest.mark.parametrize("perm", [None, [2, 1, 0]])
def test_parameter_behind_transpose(twice, perm):
    m, inits = model(twice, perm)
    x = RNG.standard_normal((N, 3, 4))
    G, cols = jaccli.param_jacobian(m, x, dtype=np.float64, params=["W"])
    want = fd_param_jacobian(m, {"x": x}, ["W"], inits)
    assert rel_err(G.reshape(want.shape), want) < 1e-6


def test_shared_cotangents_are_not_overwritten(monkeypatch):
    """Add hands one cotangent to both its inputs; the rules after it (which overwrite a
    cotangent they alone hold) must leave it intact for the other branch. (The graph is all
    pointwise, one diagonal region: taken step by step here, as a region in test_regions.)"""
    from jaccli.plan import Plan

    monkeypatch.setattr(Plan, "_diagonal_regions", lambda self: {})
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Tanh", ["h"], ["a"]),
             helper.make_node("Sigmoid", ["h"], ["b"]), helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]), helper.make_node("Add", ["r", "h"], ["y"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    x = RNG.standard_normal((N, 6))
    x[np.abs(x) < 0.1] = 0.5  # away from Relu's kink
    for mode in ("reverse", "forward"):
        J = jaccli.input_jacobian(m, x, dtype=np.float64, flat=True, mode=mode)
        assert rel_err(J, fd_input_jacobian(m, {"x": x}, "x")) < 1e-6


@pytest.mark.parametrize("axis", [1, -1])
def test_split_pieces_assembled_in_place(axis):
    """Split's input cotangent is assembled where its readers write: a piece read once by a
    Reshape (written there directly), a piece read twice (summed, then copied), a piece no one
    reads (zero)."""
    shape = (6, 4) if axis == 1 else (4, 6)
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=axis),
             helper.make_node("Reshape", ["a", "flat"], ["af"]), helper.make_node("Tanh", ["af"], ["ta"]),
             helper.make_node("Mul", ["b", "b"], ["bb"]), helper.make_node("Sin", ["b"], ["sb"]),
             helper.make_node("Add", ["bb", "sb"], ["s"]), helper.make_node("Reshape", ["s", "flat"], ["sf"]),
             helper.make_node("Concat", ["ta", "sf"], ["y"], axis=1)]
    inits = [numpy_helper.from_array(np.array([2, 2, 2], np.int64), "sizes"), numpy_helper.from_array(np.array([0, -1], np.int64), "flat")]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    x = RNG.standard_normal((N, *shape))
    want = fd_input_jacobian(m, {"x": x}, "x")
    assert np.abs(want.reshape(N, 16, *shape)[..., 4:, :] if axis == 1 else want.reshape(N, 16, *shape)[..., 4:]).max() == 0
    for mode in ("reverse", "forward"):
        J = jaccli.input_jacobian(m, x, dtype=np.float64, flat=True, mode=mode)
        assert rel_err(J, want) < 1e-6


@pytest.mark.parametrize("time_major,op", [(False, "Gemm"), (False, "MatMul"), (True, "Gemm")])
def test_rows_that_are_a_flattened_sequence(time_major, op):
    """torch.onnx's exporters flatten (N, S, D) to (N*S, D) before a Linear's Gemm, tf2onnx and
    jax2onnx before a Dense's MatMul or Gemm (and a time-major model to (S*N, D)): the product's
    rows are not the samples. Where they are each sample's S rows in turn, the per-sample
    parameter cotangents sum them, the batch at once; where they interleave the samples
    (time-major, a sample's rows N apart), the walker moves them first for the rule, the
    batch at once too (it ran one sample per run before)."""
    S, D, H = 3, 4, 5
    nodes, x_in = [], "x"
    if time_major:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]))
        x_in = "xt"
    if op == "Gemm":
        nodes += [helper.make_node("Reshape", [x_in, "rows"], ["r"]), helper.make_node("Gemm", ["r", "W", "b"], ["g"], transB=1),
                  helper.make_node("Tanh", ["g"], ["t"]), helper.make_node("Reshape", ["t", "back"], ["u"])]
    else:  # tf2onnx's Tensordot: the weight as (D, H), the rows back to a sequence, then the bias
        nodes += [helper.make_node("Reshape", [x_in, "rows"], ["r"]), helper.make_node("Transpose", ["W"], ["Wt"]),
                  helper.make_node("MatMul", ["r", "Wt"], ["p"]), helper.make_node("Reshape", ["p", "back"], ["q"]),
                  helper.make_node("Add", ["q", "b"], ["g"]), helper.make_node("Tanh", ["g"], ["u"])]
    if time_major:
        nodes.append(helper.make_node("Transpose", ["u"], ["y"], perm=[1, 0, 2]))
    else:
        nodes[-1].output[0] = "y"
    inits = {"W": RNG.standard_normal((H, D)), "b": RNG.standard_normal(H)}
    back = np.array([S, -1, H] if time_major else [-1, S, H], np.int64)
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", S, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", S, H])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
                          + [numpy_helper.from_array(np.array([-1, D], np.int64), "rows"), numpy_helper.from_array(back, "back")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    x = RNG.standard_normal((N, S, D))
    r = jaccli.param_jacobian(m, x, dtype=np.float64, return_result=True)
    want = fd_param_jacobian(m, {"x": x}, ["W", "b"], inits)
    assert rel_err(r.J, want) < 1e-6
    assert r.chunks[0] == N and not any("one sample at a time" in n for n in r.notes)
    one = jaccli.param_jacobian(m, x[:1], dtype=np.float64, return_result=True)  # one sample: probed twice over
    assert rel_err(one.J, want[:1]) < 1e-6


def test_a_batch_of_matrices_that_merges_the_samples_behind_patches():
    """MobileViT (transformers) unfolds a feature map into patches with the samples behind the
    pixels of a patch, (P*N, L, D), and its transformer's Linears are MatMuls of that batch of
    matrices by a weight: the per-sample parameter cotangents sum each sample's P matrices.
    They were taken per matrix, and the result's block refused them (an internal error)."""
    P, L, D, H = 4, 3, 5, 2
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2, 3]),  # (P, N, L, D)
             helper.make_node("Reshape", ["xt", "merged"], ["r"]),  # (P*N, L, D)
             helper.make_node("MatMul", ["r", "W"], ["p"]), helper.make_node("Tanh", ["p"], ["t"]),
             helper.make_node("Reshape", ["t", "back"], ["u"]), helper.make_node("Transpose", ["u"], ["y"], perm=[1, 0, 2, 3])]
    inits = {"W": RNG.standard_normal((D, H))}
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", P, L, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", P, L, H])],
                          [numpy_helper.from_array(inits["W"].astype(np.float32), "W"),
                           numpy_helper.from_array(np.array([-1, L, D], np.int64), "merged"),
                           numpy_helper.from_array(np.array([P, -1, L, H], np.int64), "back")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    x = RNG.standard_normal((N, P, L, D))
    r = jaccli.param_jacobian(m, x, dtype=np.float64, return_result=True)
    assert rel_err(r.J, fd_param_jacobian(m, {"x": x}, ["W"], inits)) < 1e-6
    assert r.chunks[0] == N and not any("one sample at a time" in n for n in r.notes)


@pytest.mark.parametrize("case", ["two_steps", "bidirectional"])
def test_a_first_axis_as_long_as_the_probe(case):
    """The probe tells the samples' rows by a run of two samples. A first axis that happens to
    be two long is not theirs: a time-major sequence of two steps, a bidirectional LSTM's final
    states (2, N, H), both fed to a MatMul with a weight. The run of one sample tells them
    apart (that axis keeps its length); such a product runs one sample at a time. Once taken
    for the samples, these crashed for any other number of samples and were wrong for two."""
    I, H = 3, 4
    if case == "two_steps":
        x_shape, inits = (2, I), {"W": RNG.standard_normal((I, H))}
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]), helper.make_node("MatMul", ["xt", "W"], ["h"]),
                 helper.make_node("Tanh", ["h"], ["t"]), helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0, 2])]
    else:
        x_shape = (5, I)
        inits = {"Wl": 0.5 * RNG.standard_normal((2, 4 * H, I)), "R": 0.5 * RNG.standard_normal((2, 4 * H, H)),
                 "W": RNG.standard_normal((H, 2))}
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
                 helper.make_node("LSTM", ["xt", "Wl", "R"], ["", "hn"], hidden_size=H, direction="bidirectional"),
                 helper.make_node("MatMul", ["hn", "W"], ["z"]), helper.make_node("Transpose", ["z"], ["zt"], perm=[1, 0, 2]),
                 helper.make_node("Flatten", ["zt"], ["y"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    for n in (1, 2, 5):
        x = RNG.standard_normal((n, *x_shape))
        r = jaccli.param_jacobian(m, x, dtype=np.float64, return_result=True)
        assert rel_err(r.J, fd_param_jacobian(m, {"x": x}, list(inits), inits, n=n)) < 1e-6, n
        if n > 1:
            assert r.chunks[0] == 1 and any("one sample at a time" in note for note in r.notes)


def test_a_sample_free_product_of_parameters_in_a_run_of_one_sample():
    """A Gemm of two parameters, read by batched values (torch's dynamo exporter folds Swin-v2's
    position MLP up to such a product: its hidden layer becomes an initializer), in a graph
    that runs one sample at a time (a time-major sequence of two steps). The rules give plain
    cotangents there, and Gemm writes its A's in place into the destination offered: that
    crashed when it was the result's (T, 1, *shape), with the sample axis; the walker now
    offers the sinks of such a run without it."""
    I, H, K = 3, 4, 5
    inits = {"W": RNG.standard_normal((I, H)), "A": RNG.standard_normal((2, K)), "B": RNG.standard_normal((H, K))}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]), helper.make_node("MatMul", ["xt", "W"], ["h"]),
             helper.make_node("Gemm", ["A", "B"], ["g"], transB=1), helper.make_node("Unsqueeze", ["g", "one"], ["g1"]),
             helper.make_node("Add", ["h", "g1"], ["s"]), helper.make_node("Tanh", ["s"], ["t"]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0, 2])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, I])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
                          + [numpy_helper.from_array(np.array([1], np.int64), "one")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    for n in (1, 2, 5):
        x = RNG.standard_normal((n, 2, I))
        r = jaccli.param_jacobian(m, x, dtype=np.float64, return_result=True)
        assert [c["name"] for c in r.columns] == ["W", "A", "B"]
        assert rel_err(r.J, fd_param_jacobian(m, {"x": x}, list(inits), inits, n=n)) < 1e-6, n
        if n > 1:
            assert any("one sample at a time" in note for note in r.notes)
