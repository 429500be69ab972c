"""Models saved by onnxruntime at ORT_ENABLE_ALL on x86, in its NCHWc layout (com.microsoft.nchwc):
read as the standard operators they fuse, they compute what onnxruntime computes, and their
Jacobians are the original model's."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gradcheck import rel_err
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli import nchwc

pytestmark = pytest.mark.skipif(not nchwc.block_size(), reason="onnxruntime has no NCHWc kernels on this machine")


def original(opset=14):
    """Convolutions with every activation onnxruntime fuses, a residual Add (its Sum input), a
    depthwise convolution of 24 channels (padded to the block), a Concat (a ReorderInput after
    it), the four pools and nearest and linear upsampling."""
    rng = np.random.default_rng(0)
    inits = {}

    def w(name, o, i, k):
        inits[name] = (rng.standard_normal((o, i, k, k)) * (1.5 / np.sqrt(i * k * k))).astype(np.float32)
        inits[name + "_b"] = (rng.standard_normal(o) * 0.1).astype(np.float32)
        return [name, name + "_b"]

    n = helper.make_node
    nodes = [
        n("Conv", ["x"] + w("c1", 24, 3, 3), ["a1"], pads=[1, 1, 1, 1]), n("Relu", ["a1"], ["r1"]),
        n("Conv", ["r1"] + w("c2", 24, 24, 3), ["a2"], pads=[1, 1, 1, 1]), n("Add", ["a2", "r1"], ["s2"]), n("Relu", ["s2"], ["r2"]),
        n("Conv", ["r2"] + w("dw", 24, 1, 3), ["a3"], pads=[1, 1, 1, 1], group=24), n("Clip", ["a3", "lo", "hi"], ["r3"]),
        n("Conv", ["r3"] + w("c4", 32, 24, 1), ["a4"]), n("LeakyRelu", ["a4"], ["r4"], alpha=0.2),
        n("MaxPool", ["r4"], ["p4"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["p4"] + w("c5", 32, 32, 3), ["a5"], pads=[1, 1, 1, 1]), n("HardSigmoid", ["a5"], ["r5"], alpha=0.2, beta=0.4),
        n("Conv", ["r5"] + w("c6", 16, 32, 3), ["a6"], pads=[1, 1, 1, 1]), n("HardSwish", ["a6"], ["r6"]),
        n("Mul", ["r6", "two"], ["m6"]), n("Concat", ["r6", "m6"], ["k6"], axis=1),
        n("Conv", ["k6"] + w("c7", 32, 32, 3), ["a7"], pads=[1, 1, 1, 1]), n("Tanh", ["a7"], ["r7"]),
        n("Resize", ["r7", "", "scales"], ["u7"], mode="nearest", nearest_mode="floor", coordinate_transformation_mode="asymmetric"),
        n("Conv", ["u7"] + w("c8", 16, 32, 3), ["a8"], pads=[1, 1, 1, 1]), n("Sigmoid", ["a8"], ["r8"]),
        n("Resize", ["r8", "", "scales"], ["u8"], mode="linear", coordinate_transformation_mode="half_pixel"),
        n("Conv", ["u8"] + w("c9", 16, 16, 3), ["a9"], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("AveragePool", ["a9"], ["p9"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["p9"] + w("c10", 16, 16, 1), ["a10"]),
        n("GlobalAveragePool", ["a10"], ["g1"]), n("GlobalMaxPool", ["a10"], ["g2"]), n("Add", ["g1", "g2"], ["g"]),
        n("Flatten", ["g"], ["y"]),
    ]
    inits.update(lo=np.float32(0), hi=np.float32(6), two=np.float32(2), scales=np.array([1, 1, 2, 2], np.float32))
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("nchwc")
    onnx.save(original(), d / "original.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(d / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(d / "original.onnx"), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 3, 12, 12)).astype(np.float32)
    np.save(d / "x.npy", x)
    return d, x


def test_onnxruntime_wrote_every_nchwc_operator(models):
    d, _ = models
    assert nchwc.counts(onnx.load(d / "optimized.onnx")).keys() == {
        "Conv", "ReorderInput", "ReorderOutput", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Upsample"}
    activations = {helper.get_attribute_value(a).decode() for node in onnx.load(d / "optimized.onnx").graph.node
                   for a in node.attribute if a.name == "activation"}
    assert activations == {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh", "Sigmoid"}
    assert any(len(node.input) == 4 for node in onnx.load(d / "optimized.onnx").graph.node if node.op_type == "Conv")


def test_forward_as_onnxruntime_and_jacobians_as_the_originals(models):
    from jaccli import walk
    from jaccli.plan import Plan

    d, x = models
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(str(d / "optimized.onnx"), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    m = jaccli.load(d / "optimized.onnx")
    assert rel_err(walk.primal(Plan(m, "y", [], np.float32), {"x": x})["y"], ref) < 1e-5
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x, mode=mode, dtype="float64")
        # to float32 rounding: HardSwish is written x * HardSigmoid(x) with alpha 1/6 in float32
        assert rel_err(J, jaccli.input_jacobian(d / "original.onnx", x, mode=mode, dtype="float64")) < 1e-6
    G, cols = jaccli.param_jacobian(m, x, dtype="float64")
    G0, cols0 = jaccli.param_jacobian(d / "original.onnx", x, dtype="float64")
    # each original parameter is the leading corner of one of the file's (renamed, its channels
    # padded): there, the columns are the original's
    assert len(cols) == len(cols0)
    inits = jaccli.load(d / "original.onnx").initializers
    for c0 in cols0:
        w0 = inits[c0["name"]]
        corner = tuple(slice(0, n) for n in w0.shape)
        match = [c for c in cols if len(c["shape"]) == w0.ndim and all(a >= b for a, b in zip(c["shape"], w0.shape))
                 and np.array_equal(m.initializers[c["name"]][corner], w0)]
        assert len(match) == 1, c0["name"]
        c = match[0]
        ours = G[..., c["offset"]:c["offset"] + c["size"]].reshape(G.shape[:-1] + tuple(c["shape"]))[(Ellipsis,) + corner]
        theirs = G0[..., c0["offset"]:c0["offset"] + c0["size"]].reshape(G0.shape[:-1] + w0.shape)
        assert rel_err(ours, theirs) < 1e-6, c0["name"]


def test_check_and_inspect(models):
    from click.testing import CliRunner

    from jaccli.cli import main

    d, _ = models
    for extra in ([], ["--params"]):
        r = CliRunner().invoke(main, ["check", str(d / "optimized.onnx"), str(d / "x.npy"), "--json"] + extra)
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        assert report["ok"] and report["oracle_dtype"] == "float64", report
    r = CliRunner().invoke(main, ["inspect", str(d / "optimized.onnx"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["nchwc"]["Conv"] == 10


@pytest.mark.parametrize("B", [8, 16])
def test_weights_unblocked(B):
    """Both layouts of a reordered weight, built here from a known OIHW weight."""
    rng = np.random.default_rng(B)
    O, I, k = 2 * B, 2 * B, 3
    W = rng.standard_normal((O, I, k, k))
    bo = W.reshape(O // B, B, I, k, k).transpose(0, 2, 3, 4, 1).reshape(O, I, k, k)  # [O/B][I][kh][kw][Bo]
    bibo = W.reshape(O // B, B, I // B, B, k, k).transpose(0, 2, 4, 5, 3, 1).reshape(O, I, k, k)  # [O/B][I/B][kh][kw][Bi][Bo]
    assert np.array_equal(nchwc._unblock(bo, False, B), W)
    assert np.array_equal(nchwc._unblock(bibo, True, B), W)
