"""GatherBlockQuantized (onnxruntime-genai's block-quantized embeddings): its rows against
onnxruntime's (2, 4 and 8 bits, with and without zero points, a last block cut short), its
derivative in the scales, and per-sample parameter Jacobians of a small embedding model
through `jaccli check`."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from gradcheck import check_rule
from onnx import TensorProto, helper, numpy_helper, save

from jaccli.cli import main
from jaccli.errors import UnsupportedOpError
from jaccli.rules.quant import GatherBlockQuantized


def pack(codes, bits):
    """Codes along the last axis, packed low bits first into bytes."""
    per = 8 // bits
    out = np.zeros(codes.shape[:-1] + (-(-codes.shape[-1] // per),), np.uint8)
    for j in range(per):
        part = codes[..., j::per]
        out[..., :part.shape[-1]] |= (part << (bits * j)).astype(np.uint8)
    return out


def table(rng, R, C, bits, block, zero_points):
    blocks = -(-C // block)
    data = pack(rng.integers(0, 1 << bits, (R, C)).astype(np.uint8), bits)
    scales = rng.uniform(0.1, 1, (R, blocks)).astype(np.float32)
    zp = pack(rng.integers(0, 1 << bits, (R, blocks)).astype(np.uint8), bits) if zero_points else None
    return data, scales, zp


CASES = [(10, 64, 4, 16, True), (10, 64, 4, 32, False), (10, 64, 8, 16, True), (10, 64, 8, 32, False), (7, 48, 4, 32, True),
         (10, 64, 2, 16, True)]


@pytest.mark.parametrize("R, C, bits, block, zero_points", CASES)
def test_rows_are_onnxruntimes(R, C, bits, block, zero_points):
    rng = np.random.default_rng(0)
    data, scales, zp = table(rng, R, C, bits, block, zero_points)
    ids = rng.integers(0, R, (2, 3)).astype(np.int64)
    names = ["data", "ids", "scales"] + (["zp"] if zero_points else [])
    node = helper.make_node("GatherBlockQuantized", names, ["y"], domain="com.microsoft", bits=bits, block_size=block)
    types = {"data": TensorProto.UINT8, "ids": TensorProto.INT64, "scales": TensorProto.FLOAT, "zp": TensorProto.UINT8}
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, types[n], None) for n in names],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    feeds = {"data": data, "ids": ids, "scales": scales, **({"zp": zp} if zero_points else {})}
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ours = GatherBlockQuantized.forward(data, ids, scales, zp, bits=bits, block_size=block)
    assert ours.shape == ref.shape == (2, 3, C)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("R, C, bits, block, zero_points", CASES[:2] + CASES[4:5])
def test_the_scales_differentiate(R, C, bits, block, zero_points):
    rng = np.random.default_rng(1)
    data, scales, zp = table(rng, R, C, bits, block, zero_points)
    ids = rng.integers(0, R, (2, 3)).astype(np.int64)
    check_rule(GatherBlockQuantized, [data, ids, scales.astype(np.float64), zp], {"bits": bits, "block_size": block}, [2], rng)


def four_bit_table(rng, R, C, block, signed, zero_points):
    """A table of int4 or uint4 codes, one a value (ml_dtypes'), and zero points alike."""
    import ml_dtypes

    t, lo, hi = (ml_dtypes.int4, -8, 8) if signed else (ml_dtypes.uint4, 0, 16)
    blocks = -(-C // block)
    zp = rng.integers(lo, hi, (R, blocks)).astype(t) if zero_points else None
    return rng.integers(lo, hi, (R, C)).astype(t), rng.uniform(0.1, 1, (R, blocks)).astype(np.float32), zp


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("zero_points", [True, False])
def test_int4_and_uint4_tables(signed, zero_points):
    """Tables of int4 and uint4 codes (one a value, as onnx holds them): rows as onnxruntime's,
    whose zero points are 0 when absent, for uint4 too; the derivative in the scales as
    differences give it."""
    rng = np.random.default_rng(3)
    data, scales, zp = four_bit_table(rng, 7, 48, 32, signed, zero_points)
    ids = rng.integers(0, 7, (2, 3)).astype(np.int64)
    names = ["data", "ids", "scales"] + (["zp"] if zero_points else [])
    inits = [numpy_helper.from_array(data, "data"), numpy_helper.from_array(scales, "scales")] + (
        [numpy_helper.from_array(zp, "zp")] if zero_points else [])
    node = helper.make_node("GatherBlockQuantized", names, ["y"], domain="com.microsoft", block_size=32)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    ours = GatherBlockQuantized.forward(data, ids, scales, zp, block_size=32)
    assert ours.shape == ref.shape == (2, 3, 48)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    check_rule(GatherBlockQuantized, [data, ids, scales.astype(np.float64), zp], {"block_size": 32}, [2], rng)


def test_other_tables_are_refused():
    with pytest.raises(UnsupportedOpError, match="int8 data"):
        GatherBlockQuantized.forward(np.zeros((4, 8), np.int8), np.array([0]), np.ones((4, 1), np.float32), block_size=16)
    with pytest.raises(UnsupportedOpError, match="gathered on axis 0"):
        GatherBlockQuantized.forward(np.zeros((4, 8), np.uint8), np.array([0]), np.ones((4, 1), np.float32), block_size=16,
                                     gather_axis=1)


@pytest.mark.parametrize("codes", ["packed", "int4"])
def test_an_embedding_model_per_sample(tmp_path, codes):
    """Token ids -> a 4-bit table (packed in bytes, or int4) -> tanh -> a linear layer: the
    scales' and the layer's per-sample Jacobians pass onnxruntime's differences; there is no
    float input."""
    rng = np.random.default_rng(2)
    data, scales, _ = table(rng, 12, 32, 4, 16, False) if codes == "packed" else four_bit_table(rng, 12, 32, 16, True, False)
    inits = [numpy_helper.from_array(data, "table"), numpy_helper.from_array(scales, "scales"),
             numpy_helper.from_array(rng.standard_normal((32, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("GatherBlockQuantized", ["table", "ids", "scales"], ["emb"], domain="com.microsoft", bits=4,
                              block_size=16),
             helper.make_node("Tanh", ["emb"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    save(m, tmp_path / "m.onnx")
    np.save(tmp_path / "ids.npy", rng.integers(0, 12, (4, 5)).astype(np.int64))
    args = [str(tmp_path / "m.onnx"), str(tmp_path / "ids.npy")]
    r = CliRunner().invoke(main, ["params", *args, "-o", str(tmp_path / "G.npy"), "-q"])
    assert r.exit_code == 0, r.output
    cols = json.loads((tmp_path / "G.columns.json").read_text())["columns"]
    assert [c["name"] for c in cols] == ["scales", "W"] and np.load(tmp_path / "G.npy").shape == (4, 5, 3, 24 + 96)
    r = CliRunner().invoke(main, ["check", *args, "--params", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"], r.output
