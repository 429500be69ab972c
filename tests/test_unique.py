"""Unique: all four outputs as onnxruntime gives them (flattened or along an axis, sorted or in
order of first occurrence, floats and integers, with repeats), the distinct values'
derivatives, and what a model that applies it across its samples is told."""

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from gradcheck import check_rule, one_input_model
from onnx import TensorProto, helper, save

from jaccli.cli import main
from jaccli.rules.shape import Unique


def onnxruntime_unique(X, attrs):
    t = TensorProto.FLOAT if X.dtype == np.float32 else TensorProto.INT64
    node = helper.make_node("Unique", ["X"], ["Y", "indices", "inverse", "counts"], **attrs)
    outputs = [helper.make_tensor_value_info("Y", t, None)] + [helper.make_tensor_value_info(n, TensorProto.INT64, None)
                                                              for n in ("indices", "inverse", "counts")]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", t, None)], outputs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 8
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": X})


def test_unique_is_onnxruntimes():
    rng = np.random.default_rng(0)
    for trial in range(200):
        nd = int(rng.integers(1, 4))
        shape = tuple(rng.integers(1, 5, nd))
        X = rng.integers(-3, 3, shape)  # small integers: many repeats, of elements and of whole slices
        X = X.astype(np.int64) if trial % 3 == 1 else (X + (trial % 3 == 2) * rng.uniform(0, 1e-3, shape)).astype(np.float32)
        attrs = {"sorted": int(rng.integers(0, 2))}
        if trial % 4:
            attrs["axis"] = int(rng.integers(-nd, nd))
        ref, ours = onnxruntime_unique(X, attrs), Unique.forward(X, **attrs)
        for name, a, b in zip(("Y", "indices", "inverse_indices", "counts"), ref, ours):
            assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), (trial, attrs, name)


@pytest.mark.parametrize("attrs", [{}, {"sorted": 0}, {"axis": 1}, {"axis": 0, "sorted": 0}, {"axis": -1}])
def test_the_distinct_values_differentiate(attrs):
    """Distinct values: Y is X's elements (or slices) reordered, a gather."""
    rng = np.random.default_rng(1)
    check_rule(Unique, [rng.standard_normal((3, 4))], attrs, [0], rng)


def test_unique_across_the_samples_is_refused(tmp_path):
    """Flattened, the distinct values of the whole batch have no sample axis; along axis 1,
    sorted, the columns' order follows the first sample: alone, the second sample's differs."""
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for attrs, why in (({}, "its axis 0 is not the sample axis"), ({"axis": 1}, "mixes samples")):
        save(one_input_model([helper.make_node("Unique", ["x"], ["y"], **attrs)], {}, (4,), opset=11), tmp_path / "m.onnx")
        r = CliRunner().invoke(main, ["input", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")])
        assert r.exit_code != 0 and why in r.output and "Traceback" not in r.output, r.output


def test_a_model_that_gathers_at_unique_indices(tmp_path):
    """Unique of a constant index list, the columns gathered there: the Jacobian picks them."""
    idx = np.array([3, 0, 3, 1], np.int64)
    nodes = [helper.make_node("Unique", ["idx"], ["cols"], sorted=0), helper.make_node("Gather", ["x", "cols"], ["y"], axis=1)]
    save(one_input_model(nodes, {"idx": idx}, (4,), opset=11), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32))
    r = CliRunner().invoke(main, ["input", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "J.npy"), "-q"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(tmp_path / "J.npy"), np.broadcast_to(np.eye(4)[[3, 0, 1]], (2, 3, 4)))
