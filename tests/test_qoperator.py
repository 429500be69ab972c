"""onnxruntime's static quantization in the QOperator format (QLinearConv, QLinearMatMul, QGemm,
QLinearAdd, QLinearMul, QLinearSigmoid, QLinearLeakyRelu, QLinearConcat and the QLinear pools).
Their forward equals onnxruntime's, integer for integer; their integers pass no derivative (the
Jacobian is zero, and the summary says why); with --straight-through the Jacobian equals the one
of the same quantization written in the QDQ format, whose float operators have FD-checked rules."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaccli

RNG = np.random.default_rng(23)
QOPS = {"QLinearConv", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
        "QLinearGlobalAveragePool", "QGemm", "QLinearMatMul"}


def attention():
    """Single-head self-attention on (N, 6, 8): projections, q k^T, Softmax, times v, a residual Add."""
    n = helper.make_node
    nodes = [n("MatMul", ["x", "Wq"], ["q"]), n("MatMul", ["x", "Wk"], ["k"]), n("MatMul", ["x", "Wv"], ["v"]),
             n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), n("MatMul", ["q", "kt"], ["s"]), n("Softmax", ["s"], ["p"], axis=-1),
             n("MatMul", ["p", "v"], ["o"]), n("Add", ["o", "x"], ["y"])]
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [_init("Wq", 8, 8, s=0.5), _init("Wk", 8, 8, s=0.5), _init("Wv", 8, 8)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_attention_with_qlinear_softmax(tmp_path):
    """A quantized attention block: QLinearMatMul of two activations and QLinearSoftmax, integer for
    integer as onnxruntime; forward and reverse mode agree on its straight-through Jacobian. (Its QDQ
    twin is another quantization: it gives the probabilities the scale 1/255, QLinearSoftmax 1/256.)"""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    calib = RNG.standard_normal((16, 1, 6, 8)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": c} for c in calib])

        def get_next(self):
            return next(self.it, None)

    onnx.save(attention(), tmp_path / "attn.onnx")
    path = tmp_path / "attn_q.onnx"
    quantize_static(str(tmp_path / "attn.onnx"), str(path), Reader(), quant_format=QuantFormat.QOperator)
    assert {"QLinearSoftmax", "QLinearMatMul"} <= {n.op_type for n in onnx.load(path).graph.node}
    x = RNG.standard_normal((12, 6, 8)).astype(np.float32)
    a = jaccli.input_jacobian(str(path), x, straight_through=True, return_result=True)
    np.testing.assert_array_equal(a.outputs, ort_run(path, x))
    assert np.abs(a.value).max() > 0
    fwd = jaccli.input_jacobian(str(path), x, straight_through=True, mode="forward")
    np.testing.assert_allclose(fwd, a.value, rtol=1e-4, atol=1e-6 * np.abs(a.value).max())


def _init(name, *shape, s=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * s).astype(np.float32), name)


def float_cnn(avgpool=True):
    """Conv-ReLU, MaxPool, a residual Add, swish (Sigmoid, Mul), a grouped Conv, LeakyRelu, Concat,
    AveragePool, GlobalAveragePool, Gemm-ReLU, MatMul: each a QLinear operator once quantized."""
    n = helper.make_node
    nodes = [n("Conv", ["x", "W1", "b1"], ["c1"], pads=[1] * 4), n("Relu", ["c1"], ["r1"]),
             n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             n("Conv", ["p1", "W2", "b2"], ["c2"], pads=[1] * 4), n("Relu", ["c2"], ["r2"]),
             n("Conv", ["r2", "W3"], ["c3"], pads=[1] * 4, group=2), n("Add", ["c3", "p1"], ["a"]),
             n("Sigmoid", ["a"], ["sg"]), n("Mul", ["a", "sg"], ["sw"]),
             n("Conv", ["sw", "W4", "b4"], ["c4"]), n("LeakyRelu", ["c4"], ["lr"], alpha=0.1),
             n("Concat", ["lr", "sw"], ["cat"], axis=1)]
    if avgpool:
        nodes.append(n("AveragePool", ["cat"], ["ap"], kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1]))
    nodes += [n("GlobalAveragePool", ["ap" if avgpool else "cat"], ["g"]), n("Flatten", ["g"], ["f"]),
              n("Gemm", ["f", "Wf", "bf"], ["h"], transB=1), n("Relu", ["h"], ["hr"]), n("MatMul", ["hr", "Wm"], ["y"])]
    inits = [_init("W1", 8, 3, 3, 3), _init("b1", 8), _init("W2", 8, 8, 3, 3, s=0.15), _init("b2", 8),
             _init("W3", 8, 4, 3, 3, s=0.2), _init("W4", 4, 8, 1, 1), _init("b4", 4), _init("Wf", 12, 12), _init("bf", 12),
             _init("Wm", 12, 5)]
    g = helper.make_graph(nodes, "qcnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def quantized(tmp_path, fmt, per_channel=False, activation="QUInt8", avgpool=True, contrib=False):
    """The CNN quantized by quantize_static in format `fmt`, calibrated on the same 16 samples;
    `contrib`: its QDQ pairs com.microsoft's (extra_options UseQDQContribOps)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            r = np.random.default_rng(5)
            self.it = iter([{"x": r.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(16)])

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp_path / "f.onnx", tmp_path / f"{fmt}_{per_channel}_{activation}_{avgpool}_{contrib}.onnx"
    if not src.exists():
        onnx.save(float_cnn(avgpool), src)
    quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=per_channel,
                    activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
                    extra_options={"UseQDQContribOps": True} if contrib else None)
    return dst


def data(n=24):
    return RNG.standard_normal((n, 3, 12, 12)).astype(np.float32)


def ort_run(path, x, name="x"):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]


@pytest.mark.parametrize("per_channel, activation", [(False, "QUInt8"), (True, "QUInt8"), (True, "QInt8")])
def test_forward_equals_onnxruntime_and_the_jacobian_is_zero(per_channel, activation, tmp_path):
    q = quantized(tmp_path, "QOperator", per_channel, activation)
    ops = {n.op_type for n in onnx.load(q).graph.node}
    assert QOPS | {"QLinearAveragePool"} <= ops, ops
    x = data()
    r = jaccli.input_jacobian(str(q), x, return_result=True)
    np.testing.assert_array_equal(r.outputs, ort_run(q, x))  # integer for integer, so the floats are equal
    assert not r.value.any()
    assert any("QuantizeLinear" in n and "--straight-through" in n for n in r.notes), r.notes
    assert not any("does not depend" in n for n in r.notes), r.notes  # it does, through integers
    quantized_weights = r"weights are integers, quantized \(QGemm, QLinearAdd, QLinearAveragePool \.\.\.\)"
    with pytest.raises(jaccli.errors.UsageError, match=quantized_weights):
        jaccli.param_jacobian(str(q), x)


@pytest.mark.parametrize("per_channel", [False, True])
def test_straight_through_equals_the_qdq_model(per_channel, tmp_path):
    """Without the AveragePool (whose output the two formats quantize to different scales) the QOperator
    and QDQ models compute the same integers; so their straight-through Jacobians are the same.

    Both run in float64: the QOperator model's integers exactly, the QDQ model's float operators
    nearly. Where a value lies within rounding of a tie between two levels, the two still round
    it apart (seen in one sample of 24 for some of the weights the test order draws; in float32
    the convolutions' summation order moved it to two): a level flips by one step, at the
    output or inside, where it changes which levels the straight-through Jacobian passes. One
    such sample is allowed; every other must be equal."""
    qop = quantized(tmp_path, "QOperator", per_channel, avgpool=False)
    qdq = quantized(tmp_path, "QDQ", per_channel, avgpool=False)
    x = data()
    a = jaccli.input_jacobian(str(qop), x, straight_through=True, return_result=True, dtype=np.float64)
    b = jaccli.input_jacobian(str(qdq), x, straight_through=True, return_result=True, dtype=np.float64)
    np.testing.assert_array_equal(a.outputs.astype(np.float32), ort_run(qop, x))  # float32 levels, rounded once
    tol = dict(rtol=1e-4, atol=1e-5 * np.abs(b.value).max())
    same = (a.outputs == b.outputs).all(axis=1) & np.array([np.allclose(u, v, **tol) for u, v in zip(a.value, b.value)])
    assert same.sum() >= len(x) - 1, np.nonzero(~same)[0]
    step = np.abs(np.diff(np.unique(b.outputs))).min()  # the output's quantization step
    assert np.abs(a.outputs - b.outputs).max() <= step * 1.001
    assert np.abs(b.value).max() > 0
    assert any("QLinearConv" in n and "float operators" in n for n in a.notes), a.notes
    np.testing.assert_allclose(a.value[same], b.value[same], **tol)
    fwd = jaccli.input_jacobian(str(qop), x, straight_through=True, mode="forward")
    np.testing.assert_allclose(fwd, a.value, rtol=1e-4, atol=1e-5 * np.abs(b.value).max())


@pytest.mark.parametrize("activation", ["QUInt8", "QInt16"])
def test_com_microsofts_qdq_pairs_are_the_standard_ones(activation, tmp_path):
    """onnxruntime's quantizer writes com.microsoft's QuantizeLinear and DequantizeLinear when
    asked (UseQDQContribOps) or for types the default domain's opset lacks. They compute what
    the standard pairs compute: the same outputs and straight-through Jacobians as the model
    quantized the standard way, a zero Jacobian by default, and parameters refused in one line."""
    ms = quantized(tmp_path, "QDQ", False, activation, avgpool=False, contrib=True)
    std = quantized(tmp_path, "QDQ", False, activation, avgpool=False)
    assert {n.domain for n in onnx.load(ms).graph.node if "Quantize" in n.op_type} == {"com.microsoft"}
    x = data(8)
    r = jaccli.input_jacobian(str(ms), x, return_result=True)
    assert not r.value.any() and any("--straight-through" in n for n in r.notes), r.notes
    basic = ort.SessionOptions()  # as check runs it: at ORT_ENABLE_ALL its fusions compute another function (16-bit: 10 steps off)
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    want = ort.InferenceSession(str(ms), basic, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(r.outputs, want, atol=1e-4)
    a = jaccli.input_jacobian(str(ms), x, straight_through=True, dtype=np.float64, return_result=True)
    b = jaccli.input_jacobian(str(std), x, straight_through=True, dtype=np.float64, return_result=True)
    np.testing.assert_array_equal(a.outputs, b.outputs)
    np.testing.assert_array_equal(a.value, b.value)
    assert np.abs(a.value).max() > 0


def test_weights_stored_as_integers_are_named_when_no_float_parameter_is_left():
    """A QDQ model whose weights are integers that a DequantizeLinear reads, with per-tensor (0-d)
    scales: no float parameter; the refusal says why."""
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"]), helper.make_node("MatMul", ["x", "W"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(RNG.integers(-9, 9, (4, 3)).astype(np.int8), "Wq"), _scalar("s", 0.1, np.float32)])
    with pytest.raises(jaccli.errors.UsageError, match=r"weights are integers, quantized \(DequantizeLinear of integer"):
        jaccli.param_jacobian(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), data(2)[:, 0, 0, :4])


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_nhwc_transformers_qlinear_conv(per_channel, tmp_path):
    """Saved at ORT_ENABLE_ALL, a quantized CNN's QLinearConv nodes become com.microsoft's with
    channels_last (Transposes around them): the same integers as onnxruntime's, and the same
    straight-through Jacobian as the model before."""
    q = quantized(tmp_path, "QOperator", per_channel, avgpool=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "nhwc.onnx")
    ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    nhwc = tmp_path / "nhwc.onnx"
    convs = [n for n in onnx.load(nhwc).graph.node if n.op_type == "QLinearConv"]
    assert convs and all(n.domain == "com.microsoft" and helper.get_attribute_value(n.attribute[
        [a.name for a in n.attribute].index("channels_last")]) == 1 for n in convs)
    x = data(8)
    a = jaccli.input_jacobian(str(nhwc), x, straight_through=True, return_result=True, dtype=np.float64)
    np.testing.assert_array_equal(a.outputs.astype(np.float32), ort_run(nhwc, x))
    b = jaccli.input_jacobian(str(q), x, straight_through=True, return_result=True, dtype=np.float64)
    np.testing.assert_array_equal(a.outputs, b.outputs)
    np.testing.assert_allclose(a.value, b.value, rtol=1e-12, atol=1e-12 * np.abs(b.value).max())
    assert np.abs(b.value).max() > 0


# ---- one operator at a time, against its QDQ counterpart: Q -> QLinear op -> DQ  vs  Q -> DQ -> float op -> Q -> DQ


def _scalar(name, v, dtype):
    return numpy_helper.from_array(np.asarray(v, dtype), name)


def single(op, float_op, inputs, out_scale, out_zp, attrs=None, float_attrs=None, domain="com.microsoft", out_shape=None,
           layout="binary", weights=()):
    """The QLinear model and its QDQ counterpart for one operator. inputs: [(name, shape, scale, zero point)]
    of float data, each quantized first; weights: [(name, float array, scale, zp)] stored quantized."""
    n = helper.make_node
    zdt = np.uint8 if all(isinstance(z, (int, np.integer)) and z >= 0 for _, _, _, z in inputs) else np.int8
    inits, qnodes, dnodes, gin = [], [], [], []
    qargs = []
    for name, shape, s, z in inputs:
        gin.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        inits += [_scalar(f"{name}_s", s, np.float32), _scalar(f"{name}_z", z, zdt)]
        qnodes.append(n("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
        dnodes.append(n("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_r"]))
        qargs.append([f"{name}_q", f"{name}_s", f"{name}_z"])
    for name, w, s, z in weights:
        wq = np.clip(np.rint(w / s) + z, -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(wq, f"{name}_q"), _scalar(f"{name}_s", s, np.float32),
                  _scalar(f"{name}_z", z, np.int8)]
        dnodes.append(n("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_r"]))
        qargs.append([f"{name}_q", f"{name}_s", f"{name}_z"])
    float_out = out_scale is None
    if not float_out:
        inits += [_scalar("y_s", out_scale, np.float32), _scalar("y_z", out_zp, zdt)]
    flat = [a for trio in qargs for a in trio]
    if layout == "concat":
        qin = ["y_s", "y_z"] + flat
    elif layout == "gemm":
        qin = flat + ([""] if float_out else ["", "y_s", "y_z"])
    else:
        qin = flat + ([] if float_out else ["y_s", "y_z"])
    outq = "y" if float_out else "y_q"
    qlin = qnodes + [n(op, qin, [outq], domain=domain, **(attrs or {}))]
    fl = qnodes + dnodes + [n(float_op, [f"{a[0][:-2]}_r" for a in qargs], ["y" if float_out else "y_f"], **(float_attrs or {}))]
    if not float_out:
        qlin.append(n("DequantizeLinear", ["y_q", "y_s", "y_z"], ["y"]))
        fl += [n("QuantizeLinear", ["y_f", "y_s", "y_z"], ["y_q"]), n("DequantizeLinear", ["y_q", "y_s", "y_z"], ["y"])]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)]
    models = []
    for nodes in (qlin, fl):
        m = helper.make_model(helper.make_graph(nodes, op, gin, out, inits),
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 8
        models.append(m)
    return models


SINGLE = {
    "avgpool": lambda: single("QLinearAveragePool", "AveragePool", [("x", ["N", 3, 7, 7], 0.02, 128)], 0.013, 120,
                              dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
                              dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])),
    "avgpool_count_pad": lambda: single("QLinearAveragePool", "AveragePool", [("x", ["N", 2, 6, 6], 0.02, 100)], 0.01, 90,
                                        dict(kernel_shape=[2, 3], pads=[1, 0, 1, 1], count_include_pad=1),
                                        dict(kernel_shape=[2, 3], pads=[1, 0, 1, 1], count_include_pad=1)),
    "global_avgpool": lambda: single("QLinearGlobalAveragePool", "GlobalAveragePool", [("x", ["N", 4, 5, 5], 0.03, 128)],
                                     0.006, 128, dict(channels_last=0)),
    "add_int8": lambda: single("QLinearAdd", "Add", [("x", ["N", 4, 6], 0.02, -3), ("u", ["N", 4, 6], 0.015, 5)], 0.03, 2),
    "add_uint8_broadcast_last": lambda: single("QLinearAdd", "Add", [("x", ["N", 4, 6], 0.031, 17),
                                                                    ("u", ["N", 4, 1], 0.0123, 200)], 0.021, 77),
    "mul_broadcast": lambda: single("QLinearMul", "Mul", [("x", ["N", 4, 6], 0.02, 128), ("u", ["N", 1, 6], 0.015, 120)],
                                    0.0004, 128),
    "sigmoid": lambda: single("QLinearSigmoid", "Sigmoid", [("x", ["N", 9], 0.04, 128)], 1 / 256, 0),
    "leakyrelu": lambda: single("QLinearLeakyRelu", "LeakyRelu", [("x", ["N", 9], 0.04, 128)], 0.025, 100, dict(alpha=0.2),
                                dict(alpha=0.2)),
    "softmax_uint8": lambda: single("QLinearSoftmax", "Softmax", [("x", ["N", 3, 8], 0.05, 128)], 1 / 256, 0,
                                    dict(axis=-1, opset=13), dict(axis=-1)),
    "softmax_int8_middle_axis": lambda: single("QLinearSoftmax", "Softmax", [("x", ["N", 5, 3], 0.08, -4)], 1 / 256, -128,
                                               dict(axis=1, opset=13), dict(axis=1)),
    "softmax_coarse_levels": lambda: single("QLinearSoftmax", "Softmax", [("x", ["N", 7], 1.0, 0)], 0.0041, 0,
                                            dict(axis=-1, opset=13), dict(axis=-1)),
    "softmax_opset12": lambda: single("QLinearSoftmax", "Softmax", [("x", ["N", 9], 0.1, 128)], 1 / 256, 0,
                                      dict(axis=1, opset=12), dict(axis=1)),
    "concat": lambda: single("QLinearConcat", "Concat", [("x", ["N", 2, 3], 0.02, 128), ("u", ["N", 4, 3], 0.05, 110)],
                             0.03, 128, dict(axis=1), dict(axis=1), layout="concat"),
    "matmul_two_activations": lambda: single("QLinearMatMul", "MatMul", [("x", ["N", 3, 8], 0.03, 128),
                                                                         ("u", ["N", 8, 5], 0.02, 128)], 0.1, 128, domain=""),
    "gemm_float_output": lambda: single("QGemm", "Gemm", [("x", ["N", 6], 0.03, 128)], None, None,
                                        dict(transB=1, alpha=0.5), dict(transB=1, alpha=0.5), layout="gemm",
                                        weights=[("W", RNG.standard_normal((4, 6)).astype(np.float32), 0.02, 0)]),
}


def _data_for(model, n=16):
    """Float data for each input, spread over a little more than the quantized range (some saturate)."""
    feeds = {}
    for v in model.graph.input:
        shape = [n if not d.dim_value else d.dim_value for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = (RNG.standard_normal(shape) * 1.5).astype(np.float32)
    return feeds


@pytest.mark.parametrize("case", sorted(SINGLE))
def test_each_operator_against_onnxruntime_and_its_qdq_counterpart(case):
    qm, fm = SINGLE[case]()
    feeds = _data_for(qm)
    sess = ort.InferenceSession(qm.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)[0]
    x = feeds if len(feeds) > 1 else next(iter(feeds.values()))
    r = jaccli.input_jacobian(qm, x, return_result=True)
    np.testing.assert_array_equal(r.outputs, want)
    for wrt in feeds:
        a = jaccli.input_jacobian(qm, x, wrt=wrt, straight_through=True, return_result=True)
        b = jaccli.input_jacobian(fm, x, wrt=wrt, straight_through=True, return_result=True)
        same = np.isclose(a.outputs, b.outputs, rtol=1e-5, atol=0)  # a tie may round apart, and saturate in one only
        assert same.mean() > 0.75 and np.abs(b.value).max() > 0  # ratios of scales 2/3 and 1/2 tie often
        np.testing.assert_allclose(a.value[same], b.value[same], rtol=1e-5, atol=1e-6 * np.abs(b.value).max())


def test_channels_last_pools_equal_the_nchw_ones():
    """channels_last=1 (onnxruntime's NHWC transformer) computes what the NCHW pool computes on the moved axes."""
    x = (RNG.standard_normal((5, 6, 6, 3)) * 1.5).astype(np.float32)
    for op, attrs in (("QLinearAveragePool", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])), ("QLinearGlobalAveragePool", {})):
        models = []
        for last in (1, 0):
            shape = ["N", 6, 6, 3] if last else ["N", 3, 6, 6]
            m, _ = single(op, "Identity", [("x", shape, 0.02, 128)], 0.011, 125, dict(attrs, channels_last=last))
            models.append(m)
        xs = (x, np.moveaxis(x, -1, 1))
        if op == "QLinearAveragePool":  # onnxruntime runs channels_last for this one
            sess = ort.InferenceSession(models[0].SerializeToString(), providers=["CPUExecutionProvider"])
            np.testing.assert_array_equal(jaccli.input_jacobian(models[0], x, return_result=True).outputs,
                                          sess.run(None, {"x": x})[0])
        (a, b) = (jaccli.input_jacobian(m, v, straight_through=True, return_result=True) for m, v in zip(models, xs))
        np.testing.assert_array_equal(np.moveaxis(a.outputs, -1, 1), b.outputs)
        n = len(x)
        ja = a.value.reshape((n,) + a.outputs.shape[1:] + x.shape[1:])
        jb = b.value.reshape((n,) + b.outputs.shape[1:] + xs[1].shape[1:])
        k = a.outputs.ndim - 1  # output axes per sample
        ja = np.moveaxis(ja, k, 1)  # output channels second
        ja = np.moveaxis(ja, -1, 1 + k)  # input channels first of the input axes
        np.testing.assert_allclose(ja, jb, rtol=1e-6, atol=1e-7)


def test_qlinear_where_against_onnxruntime_and_its_qdq_counterpart():
    """QLinearWhere picks from X or Y, each requantized to Z's scale (X here shares it: copied)."""
    n = helper.make_node
    C = helper.make_tensor_value_info("c", TensorProto.BOOL, ["N", 5])
    ins = [C] + [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["N", 5]) for v in ("x", "u")]
    inits = [_scalar("xs", 0.02, np.float32), _scalar("xz", 128, np.uint8), _scalar("us", 0.05, np.float32),
             _scalar("uz", 100, np.uint8), _scalar("zs", 0.02, np.float32), _scalar("zz", 128, np.uint8)]
    quant = [n("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), n("QuantizeLinear", ["u", "us", "uz"], ["uq"])]
    qlin = quant + [n("QLinearWhere", ["c", "xq", "xs", "xz", "uq", "us", "uz", "zs", "zz"], ["zq"], domain="com.microsoft"),
                    n("DequantizeLinear", ["zq", "zs", "zz"], ["y"])]
    qdq = quant + [n("DequantizeLinear", ["xq", "xs", "xz"], ["xr"]), n("DequantizeLinear", ["uq", "us", "uz"], ["ur"]),
                   n("Where", ["c", "xr", "ur"], ["w"]), n("QuantizeLinear", ["w", "zs", "zz"], ["zq"]),
                   n("DequantizeLinear", ["zq", "zs", "zz"], ["y"])]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    models = []
    for nodes in (qlin, qdq):
        m = helper.make_model(helper.make_graph(nodes, "where", ins, out, inits),
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 8
        models.append(m)
    feeds = {"c": RNG.random((20, 5)) < 0.5, "x": (RNG.standard_normal((20, 5)) * 2).astype(np.float32),
             "u": (RNG.standard_normal((20, 5)) * 4).astype(np.float32)}
    want = ort.InferenceSession(models[0].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for wrt in ("x", "u"):
        a, b = (jaccli.input_jacobian(m, feeds, wrt=wrt, straight_through=True, return_result=True) for m in models)
        np.testing.assert_array_equal(a.outputs, want)
        same = a.outputs == b.outputs  # u's levels, 2.5 of z's, tie: half even in one, in float in the other
        assert same.mean() > 0.9 and np.abs(a.value).max() > 0
        np.testing.assert_allclose(a.value[same], b.value[same], rtol=1e-6, atol=1e-6 * np.abs(b.value).max())
