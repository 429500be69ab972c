"""Opset 1 forms of operators whose later forms jaccli runs: comparisons and logic with the
legacy `broadcast`/`axis` attributes, Tile and Split with their old inputs, the experimental
Upsample, and the recurrent cells with output_sequence. Each against its meaning written out
in numpy or against the same model at a later opset (whose rules are checked against
onnxruntime), derivatives against differences. And the sizes that Upsample-9 and Resize take
from float32 scales, as exporters of opset 9 write them, against onnxruntime."""

import numpy as np
import pytest
from gradcheck import N, check_rule, one_input_model
from onnx import helper

import jaccli
from jaccli.rules import lookup

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("op, fn", [("Equal", np.equal), ("Less", np.less), ("Greater", np.greater)])
def test_comparisons_broadcast_from_an_axis(op, fn):
    A = np.round(RNG.standard_normal((2, 3, 4)))
    B = np.round(RNG.standard_normal(3))
    rule = lookup(op, 1)
    np.testing.assert_array_equal(rule.forward(A, B, broadcast=1, axis=1), fn(A, B[:, None]))
    np.testing.assert_array_equal(rule.forward(A, A[0, 0], broadcast=1), fn(A, A[0, 0]))  # from the end


@pytest.mark.parametrize("op, fn", [("And", np.logical_and), ("Or", np.logical_or), ("Xor", np.logical_xor)])
def test_logic_broadcasts_from_an_axis(op, fn):
    A, B = RNG.random((2, 3, 4)) > 0.5, RNG.random((2, 3)) > 0.5
    np.testing.assert_array_equal(lookup(op, 1).forward(A, B, broadcast=1, axis=0), fn(A, B[:, :, None]))


def test_tile_1_repeats_along_one_axis():
    X = RNG.standard_normal((2, 3))
    rule = lookup("Tile", 1)
    np.testing.assert_array_equal(rule.forward(X, np.array(3), np.array(1)), np.concatenate([X] * 3, axis=1))
    check_rule(rule, [X, np.array(3), np.array(-1)], {}, [0], RNG)


def test_split_1_takes_its_lengths_from_the_input_or_the_attribute():
    X = RNG.standard_normal((2, 6))
    rule = lookup("Split", 1)
    for pieces in (rule.forward(X, np.array([2, 4]), axis=1, n_outputs=2), rule.forward(X, axis=1, split=[2, 4], n_outputs=2)):
        assert [p.shape for p in pieces] == [(2, 2), (2, 4)] and np.array_equal(np.concatenate(pieces, 1), X)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample_1_is_upsample_7(mode):
    X = RNG.standard_normal((1, 2, 3, 4))
    old = lookup("Upsample", 1).forward(X, height_scale=2.0, width_scale=3.0, mode=mode)
    new = lookup("Upsample", 7).forward(X, scales=[1.0, 1.0, 2.0, 3.0], mode="linear" if mode == "bilinear" else mode)
    assert old.shape == (1, 2, 6, 12)
    np.testing.assert_array_equal(old, new)
    check_rule(lookup("Upsample", 1), [X], {"height_scale": 2.0, "width_scale": 3.0, "mode": mode}, [0], RNG)


def recurrent(cell, opset, gates):
    """x (N, T, 2) -> a cell of hidden size 3 over time (time first) -> its last state (N, 3)."""
    H = 3
    inits = {"W": RNG.standard_normal((1, gates * H, 2)).astype(np.float32) * 0.5,
             "R": RNG.standard_normal((1, gates * H, H)).astype(np.float32) * 0.5,
             "B": RNG.standard_normal((1, 2 * gates * H)).astype(np.float32) * 0.1, "ax": np.array([0])}
    old = {"output_sequence": 1} if opset < 7 else {}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node(cell, ["xt", "W", "R", "B"], ["Y", "Y_h"], hidden_size=H, **old),
             helper.make_node("Squeeze", ["Y_h"] + ([] if opset < 13 else ["ax"]), ["y"], **({"axes": [0]} if opset < 13 else {}))]
    return one_input_model(nodes, inits, (4, 2), opset=opset)


@pytest.mark.parametrize("cell, gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_opset_1_cells_are_their_opset_7_selves(cell, gates):
    """The same weights at opset 1 (with output_sequence) and at opset 7: the same outputs and
    Jacobians, input and per-sample parameters."""
    state = RNG.bit_generator.state
    old = recurrent(cell, 1, gates)
    RNG.bit_generator.state = state
    new = recurrent(cell, 7, gates)
    x = RNG.standard_normal((N, 4, 2)).astype(np.float32)
    np.testing.assert_array_equal(jaccli.input_jacobian(old, x), jaccli.input_jacobian(new, x))
    G_old, cols = jaccli.param_jacobian(old, x)
    G_new, _ = jaccli.param_jacobian(new, x)
    assert [c["name"] for c in cols] == ["W", "R", "B"] and np.abs(G_old).max() > 0
    np.testing.assert_array_equal(G_old, G_new)


@pytest.mark.parametrize("op, opset", [("Upsample", 9), ("Resize", 10), ("Resize", 13)])
def test_scaled_sizes_are_taken_in_float32_as_onnxruntime_does(op, opset):
    """torch's F.interpolate(size=(5, 7)) of a 3x4 image at opset 9 writes scales 5/3 and 7/4 in
    float32: 3 x float32(5/3) is 5 in float32 (onnxruntime's size, and torch's), 4.9999999 in
    float64, floored to 4. Every scale num/den up to 11/7 on axes of 1 to 8, against onnxruntime
    (Upsample's at least 1, as its spec asks)."""
    import onnxruntime as ort

    for H in range(1, 9):
        for s in sorted({np.float32(a / b) for a in range(1, 12) for b in range(1, 8) if a >= b or op == "Resize"}):
            scales = {"s": np.array([1, 1, s, 1], np.float32)}
            ins = ["x", "s"] if op == "Upsample" or opset == 10 else ["x", "", "s"]
            m = one_input_model([helper.make_node(op, ins, ["y"], mode="nearest")], scales, (1, H, 2), opset=opset)
            x = RNG.standard_normal((1, 1, H, 2)).astype(np.float32)
            want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            if want.size:
                assert jaccli.input_jacobian(m, x).shape[1:4] == want.shape[1:], (H, s)
