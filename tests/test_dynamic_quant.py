"""onnxruntime's dynamic quantization (quantize_dynamic): DynamicQuantizeLinear, MatMulInteger and
ConvInteger. Their forward equals onnxruntime's; their integers pass no derivative (the
Jacobian is zero, and the summary says why); with --straight-through the chain differentiates
as the float model with the dequantized weights."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from gradcheck import one_input_model
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.cli import main
from jaccli.errors import DataError

RNG = np.random.default_rng(11)


def float_model(kind, batch=1, act=True):
    """A tanh MLP 8-16-4 or a ReLU CNN (3->6 channels, 3x3, stride 2, padded; then 6->4, two groups)."""
    if kind == "mlp":
        W = {"W1": RNG.standard_normal((8, 16)), "b1": RNG.standard_normal(16), "W2": RNG.standard_normal((16, 4))}
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
                 helper.make_node("Tanh" if act else "Identity", ["a"], ["t"]), helper.make_node("MatMul", ["t", "W2"], ["y"])]
        shape = [batch, 8]
    else:
        W = {"W1": RNG.standard_normal((6, 3, 3, 3)), "b1": RNG.standard_normal(6), "W2": RNG.standard_normal((4, 3, 3, 3))}
        nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
                 helper.make_node("Relu" if act else "Identity", ["c"], ["r"]),
                 helper.make_node("Conv", ["r", "W2"], ["y"], pads=[1, 0, 1, 0], group=2, dilations=[1, 2])]
        shape = [batch, 3, 9, 9]
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in W.items()]
    g = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def quantized(kind, tmp_path, weight_type="QInt8", per_channel=False, batch=1, act=True):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / f"{kind}.onnx", tmp_path / f"{kind}_q.onnx"
    f = float_model(kind, batch, act)
    onnx.save(f, src)
    quantize_dynamic(str(src), str(dst), weight_type=getattr(QuantType, weight_type), per_channel=per_channel,
                     op_types_to_quantize=["MatMul", "Conv"])
    q = onnx.load(dst)
    ops = {n.op_type for n in q.graph.node}
    assert "DynamicQuantizeLinear" in ops and ops & {"MatMulInteger", "ConvInteger"}, ops
    return q, f


def data(kind, n=4):
    return RNG.standard_normal((n, 8) if kind == "mlp" else (n, 3, 9, 9)).astype(np.float32)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("weight_type, per_channel", [("QInt8", False), ("QUInt8", False), ("QInt8", True)])
def test_forward_matches_onnxruntime_and_the_jacobian_is_zero(kind, weight_type, per_channel, tmp_path):
    q, _ = quantized(kind, tmp_path, weight_type, per_channel)
    x = data(kind)
    s = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    want = np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    r = jaccli.input_jacobian(q, x, return_result=True)
    np.testing.assert_allclose(r.outputs, want, rtol=1e-5, atol=1e-5)
    assert not r.value.any() and any("DynamicQuantizeLinear lies on the way" in n for n in r.notes), r.notes
    G, cols = jaccli.param_jacobian(q, x)  # the float parameters left (the bias; per-channel scales) are quantized
    assert cols[0]["name"] == "b1" and all(c["name"].endswith("_scale") for c in cols[1:])  # by the next product
    assert not G[..., :cols[0]["size"]].any()


def dequantized(q, f):
    """The float model with each weight replaced by what the quantized model computes with:
    (w - zero_point) * scale, per tensor or per output channel."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    m = onnx.ModelProto()
    m.CopyFrom(f)
    for t in m.graph.initializer:
        if f"{t.name}_quantized" in inits:
            w = inits[f"{t.name}_quantized"].astype(np.float64)
            zp, sc = inits[f"{t.name}_zero_point"].astype(np.float64), inits[f"{t.name}_scale"].astype(np.float64)
            axis = 0 if w.ndim == 4 else 1  # a Conv's output channels; a MatMul's columns
            shape = [1] * w.ndim
            shape[axis] = -1
            t.CopyFrom(numpy_helper.from_array(((w - zp.reshape(shape)) * sc.reshape(shape)).astype(np.float32), t.name))
    return m


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("weight_type, per_channel", [("QInt8", False), ("QUInt8", False), ("QInt8", True)])
def test_straight_through_is_the_float_model_with_dequantized_weights(kind, weight_type, per_channel, tmp_path):
    """Without activations the chain is linear: the straight-through Jacobian is exactly that of
    the float model with the dequantized weights. With them, it is near the float model's."""
    q, f = quantized(kind, tmp_path, weight_type, per_channel, act=False)
    x = data(kind)
    want = jaccli.input_jacobian(dequantized(q, f), x, dtype=np.float64)
    for mode in ("forward", "reverse"):  # the rules' JVPs and VJPs
        r = jaccli.input_jacobian(q, x, straight_through=True, dtype=np.float64, mode=mode, return_result=True)
        np.testing.assert_allclose(r.value, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())  # the reference's weights: float32
    assert any("straight through: 2 DynamicQuantizeLinear node(s)" in n for n in r.notes), r.notes
    G, _ = jaccli.param_jacobian(q, x, straight_through=True, dtype=np.float64)
    G_want, _ = jaccli.param_jacobian(dequantized(q, f), x, params=["b1"], dtype=np.float64)
    np.testing.assert_allclose(G[..., :G_want.shape[-1]], G_want, rtol=1e-6, atol=1e-6 * np.abs(G_want).max())


def test_straight_through_of_a_tanh_mlp_is_near_the_float_one(tmp_path):
    q, f = quantized("mlp", tmp_path)
    x = data("mlp")
    J = jaccli.input_jacobian(q, x, straight_through=True, dtype=np.float64)
    want = jaccli.input_jacobian(dequantized(q, f), x, dtype=np.float64)  # tanh' at the float pre-activations
    assert np.abs(J - want).max() < 0.05 * np.abs(want).max()


def test_a_dynamic_batch_mixes_samples(tmp_path):
    """The scale is the range of the whole tensor: on a batch of samples each one's output
    depends on the others. Refused in one line, not answered for the batch's range."""
    q, _ = quantized("mlp", tmp_path, batch="N")
    with pytest.raises(DataError, match="mixes samples.*--one-by-one"):
        jaccli.input_jacobian(q, data("mlp"))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_one_by_one_takes_each_sample_alone(kind, tmp_path):
    """With a dynamic batch, --one-by-one runs each sample as a batch of one: its Jacobians are
    those of runs of one sample, input and parameters; the summary says so. From the command
    line too."""
    q, _ = quantized(kind, tmp_path, batch="N")
    x = data(kind, 3)
    r = jaccli.input_jacobian(q, x, straight_through=True, one_by_one=True, return_result=True)
    alone = np.concatenate([jaccli.input_jacobian(q, x[i:i + 1], straight_through=True) for i in range(3)])
    np.testing.assert_array_equal(r.value, alone)
    assert np.abs(alone).max() > 0 and any("one by one" in n for n in r.notes)
    G = jaccli.param_jacobian(q, x, straight_through=True, one_by_one=True)[0]
    np.testing.assert_array_equal(G, np.concatenate([jaccli.param_jacobian(q, x[i:i + 1], straight_through=True)[0]
                                                     for i in range(3)]))
    onnx.save(q, tmp_path / "q.onnx")
    np.save(tmp_path / "x.npy", x)
    out = CliRunner().invoke(main, ["input", str(tmp_path / "q.onnx"), str(tmp_path / "x.npy"), "--one-by-one",
                                    "--straight-through", "-o", str(tmp_path / "J.npy")])
    assert out.exit_code == 0, out.output
    np.testing.assert_array_equal(np.load(tmp_path / "J.npy"), alone)


def test_check_one_by_one(tmp_path):
    """A smooth model whose batch statistic mixes samples, y = tanh(x W) / (1 + sum of x² over
    the batch): refused as it is; with --one-by-one `check` passes for the input and the
    parameters against onnxruntime run on one sample at a time (the quantized models' true
    derivative is zero, which differences across their levels do not see)."""
    n = helper.make_node
    nodes = [n("MatMul", ["x", "W"], ["m"]), n("Tanh", ["m"], ["t"]), n("ReduceSumSquare", ["x"], ["s"], keepdims=0),
             n("Add", ["s", "one"], ["d"]), n("Div", ["t", "d"], ["y"])]
    inits = {"W": RNG.standard_normal((5, 3)).astype(np.float32), "one": np.array(1, np.float32)}
    onnx.save(one_input_model(nodes, inits, (5,)), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", RNG.standard_normal((4, 5)).astype(np.float32))
    args = [str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")]
    assert "--one-by-one" in CliRunner().invoke(main, ["check", *args]).output
    for kind in ([], ["--params"]):
        out = CliRunner().invoke(main, ["check", *args, "--one-by-one", "--dtype", "float64", *kind])
        assert out.exit_code == 0, out.output


def single(op, inputs, attrs=None, opset=13):
    names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
    vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in zip(names, inputs) if n]
    types = [TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8] if op == "DynamicQuantizeLinear" else [TensorProto.INT32]
    g = helper.make_graph([helper.make_node(op, names, [f"o{k}" for k in range(len(types))], **(attrs or {}))], op, vis,
                          [helper.make_tensor_value_info(f"o{k}", t, None) for k, t in enumerate(types)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    feeds = {n: v for n, v in zip(names, inputs) if n}
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("case", ["per-tensor", "per-column", "batched", "no-zero-points"])
def test_matmul_integer_matches_onnxruntime(case):
    from jaccli.rules.quant import MatMulInteger

    a = RNG.integers(0, 256, (5, 7)).astype(np.uint8)
    b = RNG.integers(-128, 128, (7, 3)).astype(np.int8)
    args = {"per-tensor": [a, b, np.uint8(9), np.int8(-3)],
            "per-column": [a, b, np.uint8(3), RNG.integers(-128, 128, 3).astype(np.int8)],  # per row: onnxruntime refuses
            "batched": [RNG.integers(0, 256, (2, 5, 7)).astype(np.uint8), b, np.uint8(200), None],
            "no-zero-points": [a, RNG.integers(0, 256, (7, 3)).astype(np.uint8)]}[case]
    args = [np.asarray(v) if v is not None else None for v in args]
    np.testing.assert_array_equal(MatMulInteger.forward(*args), single("MatMulInteger", args, opset=10)[0])


@pytest.mark.parametrize("attrs", [{}, {"pads": [1, 2, 0, 1], "strides": [2, 1]}, {"group": 2, "dilations": [2, 1]},
                                   {"auto_pad": "SAME_UPPER"}])
def test_conv_integer_matches_onnxruntime(attrs):
    from jaccli.model import _defaults, _schema
    from jaccli.rules.quant import ConvInteger

    x = RNG.integers(0, 256, (2, 4, 7, 6)).astype(np.uint8)
    w = RNG.integers(0, 256, (6, 4 // attrs.get("group", 1), 3, 2)).astype(np.uint8)
    zx, zw = np.asarray(np.uint8(17)), np.asarray(np.uint8(128))
    want = single("ConvInteger", [x, w, zx, zw], attrs, opset=10)[0]
    full = {**_defaults(_schema("ConvInteger", 10, "")), **attrs}
    np.testing.assert_array_equal(ConvInteger.forward(x, w, zx, zw, **full), want)


@pytest.mark.parametrize("x", [RNG.standard_normal((3, 5)).astype(np.float32), np.abs(RNG.standard_normal(7)).astype(np.float32),
                               -np.abs(RNG.standard_normal((2, 2))).astype(np.float32), np.zeros((2, 3), np.float32)])
def test_dynamic_quantize_linear_matches_onnxruntime(x):
    from jaccli.rules.quant import DynamicQuantizeLinear

    ours = DynamicQuantizeLinear.forward(x)
    theirs = single("DynamicQuantizeLinear", [x], opset=11)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-7)
    np.testing.assert_array_equal(ours[2], theirs[2])


@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])  # zero points 0, and not
def test_onnxruntime_fusions_equal_the_unfused_model(weight_type, tmp_path):
    """onnxruntime's optimizer saves quantize_dynamic's products fused: MatMulIntegerToFloat where
    one quantized input feeds two products, DynamicQuantizeMatMul elsewhere. Forward as onnxruntime's;
    derivatives (zero through the integers, straight through, and the bias's per sample) equal the
    unfused model's, which the tests above hold to the dequantized float model."""
    n = helper.make_node
    nodes = [n("MatMul", ["x", "W1"], ["a"]), n("MatMul", ["x", "W2"], ["b"]), n("Add", ["a", "b1"], ["a1"]),
             n("Tanh", ["a1"], ["t"]), n("Mul", ["t", "b"], ["m"]), n("MatMul", ["m", "W3"], ["y"])]
    W = {"W1": RNG.standard_normal((8, 16)), "W2": RNG.standard_normal((8, 16)), "b1": RNG.standard_normal(16),
         "W3": RNG.standard_normal((16, 4))}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in W.items()]
    g = helper.make_graph(nodes, "fuse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(m, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=getattr(QuantType, weight_type))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), so, providers=["CPUExecutionProvider"])
    fused, plain = str(tmp_path / "fused.onnx"), str(tmp_path / "q.onnx")
    assert {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"} <= {v.op_type for v in onnx.load(fused).graph.node}
    x = data("mlp", 6)
    s = ort.InferenceSession(fused, providers=["CPUExecutionProvider"])
    want = np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    r = jaccli.input_jacobian(fused, x, return_result=True)
    np.testing.assert_allclose(r.outputs, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not r.value.any() and any("DynamicQuantizeLinear lies on the way" in v for v in r.notes), r.notes
    for mode in ("forward", "reverse"):
        a = jaccli.input_jacobian(fused, x, straight_through=True, mode=mode, dtype=np.float64)
        b = jaccli.input_jacobian(plain, x, straight_through=True, mode=mode, dtype=np.float64)
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    for through in (False, True):
        (Ga, ca), (Gb, cb) = (jaccli.param_jacobian(p, x, straight_through=through, dtype=np.float64) for p in (fused, plain))
        assert [c["name"] for c in ca] == [c["name"] for c in cb] == ["b1"]
        assert (np.abs(Gb).max() > 0) == through  # the last product quantizes what b1 reaches
        np.testing.assert_allclose(Ga, Gb, rtol=1e-6, atol=1e-6 * max(np.abs(Gb).max(), 1))


def test_a_fused_products_bias_cotangent_per_sample():
    """With the samples kept (a parameter Jacobian), the bias's cotangent is each sample's own: its
    rows summed over the other axes only. (A dynamically quantized model runs one sample at a time,
    so the tests above cannot tell.)"""
    from jaccli.rules import Ctx
    from jaccli.rules.quant import MatMulIntegerToFloat

    A, B = RNG.integers(0, 255, (3, 2, 4)).astype(np.uint8), RNG.integers(-127, 127, (4, 5)).astype(np.int8)
    x = (A, B, np.float32(0.1), np.float32(0.02), np.uint8(7), np.int8(0), RNG.standard_normal(5).astype(np.float32))
    y = MatMulIntegerToFloat.forward(*x)
    G = RNG.standard_normal((2,) + y.shape).astype(np.float32)  # two directions
    keep = (False,) * 6 + (True,)
    bar = MatMulIntegerToFloat.vjp(Ctx(x, (y,), (False,) * 6 + (True,), keep, rule=MatMulIntegerToFloat), G)[6]
    np.testing.assert_allclose(bar, G.sum(axis=2), rtol=1e-6)  # (directions, samples, 5)
    summed = MatMulIntegerToFloat.vjp(Ctx(x, (y,), (False,) * 6 + (True,), (False,) * 7, rule=MatMulIntegerToFloat), G)[6]
    np.testing.assert_allclose(summed, G.sum(axis=(1, 2)), rtol=1e-5)
    D = RNG.standard_normal((2, 5)).astype(np.float32)  # the bias's tangent, two directions
    Ydot = MatMulIntegerToFloat.jvp(Ctx(x, (y,), rule=MatMulIntegerToFloat), *(None,) * 6, D)
    np.testing.assert_array_equal(Ydot, np.broadcast_to(D[:, None, None, :], (2,) + y.shape))


def test_qattention_equals_attention_on_the_dequantized_input_and_weight(tmp_path):
    """quantize_dynamic makes onnxruntime's fused Attention a QAttention: forward as onnxruntime's (to
    float32 rounding), and derivatives (straight through the input, and the bias's, per sample) those
    of DynamicQuantizeLinear -> DequantizeLinear -> Attention with the dequantized weight."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    n = helper.make_node
    W, b = (RNG.standard_normal((8, 24)) * 0.4).astype(np.float32), RNG.standard_normal(24).astype(np.float32)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 8])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    weights = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")]
    attention = n("Attention", ["x", "W", "b"], ["y"], domain="com.microsoft", num_heads=2)
    f = helper.make_model(helper.make_graph([attention], "a", [x_info], [y_info], weights), opset_imports=opsets)
    f.ir_version = 8
    onnx.save(f, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["Attention"], per_channel=True)
    q = onnx.load(tmp_path / "q.onnx")
    assert "QAttention" in {v.op_type for v in q.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    Wq = (inits["W_quantized"].astype(np.float64) - inits["W_zero_point"]) * inits["W_scale"]  # per column
    ref = helper.make_model(helper.make_graph(
        [n("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]), n("DequantizeLinear", ["xq", "xs", "xz"], ["xr"]),
         n("Attention", ["xr", "Wd", "b"], ["y"], domain="com.microsoft", num_heads=2)], "ref", [x_info], [y_info],
        [numpy_helper.from_array(Wq.astype(np.float32), "Wd"), numpy_helper.from_array(b, "b")]), opset_imports=opsets)
    ref.ir_version = 8
    x = RNG.standard_normal((6, 5, 8)).astype(np.float32)
    s = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    want = np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    r = jaccli.input_jacobian(str(tmp_path / "q.onnx"), x, return_result=True)
    np.testing.assert_allclose(r.outputs, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not r.value.any()
    for mode in ("forward", "reverse"):
        a = jaccli.input_jacobian(str(tmp_path / "q.onnx"), x, straight_through=True, mode=mode, dtype=np.float64)
        e = jaccli.input_jacobian(ref, x, straight_through=True, mode=mode, dtype=np.float64)
        assert np.abs(e).max() > 0
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6 * np.abs(e).max())
    for through in (False, True):
        (Ga, ca), (Ge, _) = (jaccli.param_jacobian(m, x, params=["b"], straight_through=through, dtype=np.float64)
                             for m in (str(tmp_path / "q.onnx"), ref))
        assert [c["name"] for c in ca] == ["b"] and np.abs(Ge).max() > 0
        np.testing.assert_allclose(Ga, Ge, rtol=1e-6, atol=1e-6 * np.abs(Ge).max())


def lstm_quantized(tmp_path, direction, weight_type="QInt8", per_channel=False):
    """An LSTM (time-major X (5, N, 3), hidden 4, biases and peepholes) and what quantize_dynamic makes
    of it: a DynamicQuantizeLSTM with W and R as 8-bit integers (transposed, (D, I, 4H))."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    D, H = (2 if direction == "bidirectional" else 1), 4
    W = {"W": RNG.standard_normal((D, 4 * H, 3)) * 0.6, "R": RNG.standard_normal((D, 4 * H, H)) * 0.6,
         "B": RNG.standard_normal((D, 8 * H)) * 0.3, "P": RNG.standard_normal((D, 3 * H)) * 0.3}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in W.items()]
    node = helper.make_node("LSTM", ["x", "W", "R", "B", "", "", "", "P"], ["y"], hidden_size=H, direction=direction)
    g = helper.make_graph([node], "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    f = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    f.ir_version = 8
    onnx.save(f, tmp_path / "lstm.onnx")
    quantize_dynamic(str(tmp_path / "lstm.onnx"), str(tmp_path / "lstm_q.onnx"), weight_type=getattr(QuantType, weight_type),
                     per_channel=per_channel, op_types_to_quantize=["LSTM"])
    q = onnx.load(tmp_path / "lstm_q.onnx")
    assert [n.op_type for n in q.graph.node] == ["DynamicQuantizeLSTM"]
    return q, f


LSTM_DATA = {"sample_axes": {"x": 1}, "one_by_one": True}  # time-major; the hidden states' scale spans the batch


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("weight_type, per_channel", [("QInt8", False), ("QUInt8", False), ("QInt8", True)])
def test_dynamic_quantize_lstm_matches_onnxruntime(direction, weight_type, per_channel, tmp_path):
    """quantize_dynamic's LSTM: onnxruntime quantizes the whole input sequence with one scale and
    each step's hidden state with its own, and rescales the products of integers; jaccli's
    forward is the same to float32 rounding. x and h reach the gates only through integers:
    the input Jacobian is zero and the summary says why."""
    q, _ = lstm_quantized(tmp_path, direction, weight_type, per_channel)
    x = RNG.standard_normal((5, 3, 3)).astype(np.float32)
    s = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    r = jaccli.input_jacobian(q, x, return_result=True, **LSTM_DATA)
    for i in range(3):
        want = s.run(None, {"x": x[:, i:i + 1]})[0]
        np.testing.assert_allclose(r.outputs[i].reshape(want.shape), want, rtol=1e-5, atol=1e-6)
    assert not r.value.any() and any("DynamicQuantizeLSTM lies on the way" in n for n in r.notes), r.notes


def _lstm_inputs(q):
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    return [None if not k else inits.get(k) for k in q.graph.node[0].input], \
        {a.name: helper.get_attribute_value(a) for a in q.graph.node[0].attribute}


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_dynamic_quantize_lstm_bias_and_peepholes_against_differences(direction, tmp_path, monkeypatch):
    """The true derivative passes the cell state, the biases and the peepholes (floats), none
    through the quantized products (as DynamicQuantizeLinear's: the levels piecewise constant,
    the scale taken as a constant): the per-sample parameter Jacobian against central
    differences of the rule's own forward (which the test above checks against onnxruntime) in
    float64, its quantized products held at their values at the point."""
    from jaccli.rules import recurrent

    q, _ = lstm_quantized(tmp_path, direction, per_channel=True)
    x = RNG.standard_normal((5, 2, 3))
    G, cols = jaccli.param_jacobian(q, x, params=["B", "P"], dtype=np.float64, **LSTM_DATA)
    assert [c["name"] for c in cols] == ["B", "P"] and np.abs(G).max() > 0.01
    ins, attrs = _lstm_inputs(q)
    attrs["direction"] = attrs["direction"].decode()
    B0, P0 = ins[3].astype(np.float64), ins[7].astype(np.float64)
    real, held = recurrent._QuantizedW.pre, []
    for n in range(2):
        def f(B, P, replay):
            args = [x[:, n:n + 1]] + ins[1:]
            args[3], args[7] = B, P
            calls = iter(held) if replay else None
            monkeypatch.setattr(recurrent._QuantizedW, "pre", (lambda p, a, h: next(calls)) if replay else
                                (lambda p, a, h: held.append(real(p, a, h)) or held[-1]))
            return recurrent.DynamicQuantizeLSTM.forward(*args, **attrs)[0].ravel()
        held.clear()
        f(B0, P0, replay=False)
        fd = []
        for k in range(B0.size + P0.size):
            e = np.zeros(B0.size + P0.size)
            e[k] = 1e-6
            dB, dP = e[:B0.size].reshape(B0.shape), e[B0.size:].reshape(P0.shape)
            fd.append((f(B0 + dB, P0 + dP, True) - f(B0 - dB, P0 - dP, True)) / 2e-6)
        np.testing.assert_allclose(G[n].reshape(-1, len(fd)), np.stack(fd, axis=-1), rtol=1e-6, atol=1e-8)


def test_dynamic_quantize_lstm_straight_through(tmp_path):
    """With --straight-through, x and h pass derivatives as the LSTM with the dequantized weights,
    at the quantized forward's gates: near the float model's Jacobian, and the JVP and VJP
    (rules written apart) agree."""
    q, f = lstm_quantized(tmp_path, "bidirectional")
    x = RNG.standard_normal((5, 3, 3)).astype(np.float32)
    J = {mode: jaccli.input_jacobian(q, x, straight_through=True, mode=mode, dtype=np.float64, **LSTM_DATA)
         for mode in ("forward", "reverse")}
    np.testing.assert_allclose(J["forward"], J["reverse"], rtol=1e-10, atol=1e-12)
    want = jaccli.input_jacobian(f, x, dtype=np.float64, sample_axes={"x": 1})
    assert np.abs(J["reverse"] - want).max() < 0.05 * np.abs(want).max()
    assert np.abs(J["reverse"]).max() > 0.1


def _embed_layer_norm_model(segments):
    """onnxruntime's fused EmbedLayerNormalization (token ids, segment ids, the three tables, gamma,
    beta, a mask) and its output, float (N, S, 6); the mask index as a second output."""
    V, P, H = 10, 7, 6
    names = ["ids", "segs" if segments else "", "word", "pos", "seg" if segments else "", "gamma", "beta", "mask"]
    tables = {"word": RNG.standard_normal((V, H)), "pos": RNG.standard_normal((P, H)), "seg": RNG.standard_normal((2, H)),
              "gamma": 1 + 0.3 * RNG.standard_normal(H), "beta": 0.3 * RNG.standard_normal(H)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tables.items() if k != "seg" or segments]
    node = helper.make_node("EmbedLayerNormalization", names, ["y", "mask_index"], domain="com.microsoft", epsilon=1e-5)
    ins = [helper.make_tensor_value_info(n, TensorProto.INT32, ["N", 5]) for n in ("ids", "segs", "mask") if n in names]
    g = helper.make_graph([node], "e", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, H]),
                                             helper.make_tensor_value_info("mask_index", TensorProto.INT32, ["N"])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("segments", [True, False])
@pytest.mark.parametrize("weight_type", ["QUInt8", "QInt8"])
def test_quantized_embed_layer_normalization(segments, weight_type, tmp_path):
    """quantize_dynamic makes the fused EmbedLayerNormalization of an optimized BERT a
    QEmbedLayerNormalization (its tables, gamma and beta 8-bit, each with a scale and zero
    point): forward and mask index as onnxruntime's (a mask of 0, 1 and 2: only the ones
    count), and the per-sample Jacobian in the scales, parameters, as differences give it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from gradcheck import fd_param_jacobian, rel_err
    from jaccli.model import load
    from jaccli.rules.quant import QEmbedLayerNormalization

    onnx.save(_embed_layer_norm_model(segments), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=getattr(QuantType, weight_type),
                     op_types_to_quantize=["EmbedLayerNormalization"])
    q = onnx.load(tmp_path / "q.onnx")
    assert [n.op_type for n in q.graph.node] == ["QEmbedLayerNormalization"]
    feeds = {"ids": RNG.integers(0, 10, (4, 5)).astype(np.int32), "mask": RNG.integers(0, 3, (4, 5)).astype(np.int32)}
    if segments:
        feeds["segs"] = RNG.integers(0, 2, (4, 5)).astype(np.int32)
    y, count = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    x = [feeds.get(n) if n in feeds else (numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == n)) if n else None)
         for n in q.graph.node[0].input]
    ours = QEmbedLayerNormalization.forward(*x, epsilon=1e-5)
    np.testing.assert_allclose(ours[0], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours[1], count)
    from gradcheck import check_rule

    check_rule(QEmbedLayerNormalization, x, {"epsilon": 1e-5}, [k for k in range(8, 13) if x[k] is not None], RNG)
    scales = [n for n in q.graph.node[0].input[8:13] if n]
    G, cols = jaccli.param_jacobian(q, feeds, params=scales, dtype=np.float64)
    assert [c["name"] for c in cols] == scales
    fd = fd_param_jacobian(q, feeds, scales, load(q).initializers, n=4)
    assert np.abs(fd).max() > 0 and rel_err(G.reshape(fd.shape), fd) < 1e-6
