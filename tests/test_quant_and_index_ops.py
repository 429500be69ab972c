"""Operators that need a graph around them to be checked: index producers folded on constants
(NonZero, EyeLike) and quantization (DequantizeLinear of weights, a QuantizeLinear round trip).
Forward against onnxruntime; Jacobians against float64 central differences of our forward."""

import numpy as np
import onnxruntime as ort
import pytest
from gradcheck import fd_input_jacobian, fd_param_jacobian, one_input_model, ort_forward, our_forward, rel_err
from onnx import helper, numpy_helper

import jaccli
from jaccli.errors import UnsupportedOpError
from jaccli.model import load


def _check(model, x, params=False):
    feeds = {"x": x}
    ref, oracle = ort_forward(model, feeds)
    np.testing.assert_allclose(our_forward(model, feeds, np.float32), ref, rtol=1e-5, atol=1e-5, err_msg=oracle)
    J = jaccli.input_jacobian(model, feeds, dtype=np.float64, flat=True)
    assert rel_err(J, fd_input_jacobian(model, feeds, "x")) < 1e-6
    if params:
        G, cols = jaccli.param_jacobian(model, feeds, params=params, dtype=np.float64)
        names = [c["name"] for c in cols]
        fd = fd_param_jacobian(model, feeds, names, load(model).initializers)
        assert rel_err(G.reshape(fd.shape), fd) < 1e-6
        return G, cols
    return J


rng = np.random.default_rng(0)
X = rng.standard_normal((3, 4))


def test_nonzero_selects_columns():
    nodes = [helper.make_node("NonZero", ["mask"], ["nz"]),
             helper.make_node("Squeeze", ["nz", "zero"], ["idx"]),
             helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)]
    m = one_input_model(nodes, {"mask": np.array([1, 0, 1, 1], np.int64), "zero": np.array([0], np.int64)}, (4,), 13)
    J = _check(m, X)
    assert J.shape == (3, 3, 4) and J[0, 1, 2] == 1 and J[0, 1, 1] == 0


@pytest.mark.parametrize("k", [0, 1, -1])
def test_eyelike_mask(k):
    nodes = [helper.make_node("EyeLike", ["shape_of"], ["eye"], k=k),
             helper.make_node("Mul", ["x", "eye"], ["y"])]
    m = one_input_model(nodes, {"shape_of": np.zeros((3, 4), np.float32)}, (3, 4), 13)
    _check(m, rng.standard_normal((3, 3, 4)))


@pytest.mark.parametrize("opset,axis,scale_shape,ms", [(10, None, (), False), (13, 1, (3,), False), (13, 0, (4,), False),
                                                       (21, 0, (2, 3), False), (13, None, (3,), True), (13, 0, (4,), True)])
def test_dequantized_weights(opset, axis, scale_shape, ms):
    """y = x @ dequantize(Wq): the parameters are the float scales. Also com.microsoft's
    DequantizeLinear of int16 weights (onnxruntime's quantizer writes it for 16-bit types), its
    axis 1 by default."""
    Wq = rng.integers(-100, 100, (4, 3)).astype(np.int16 if ms else np.int8)
    scale = rng.uniform(0.01, 0.05, scale_shape).astype(np.float32)
    zp = np.zeros(scale_shape, Wq.dtype) + Wq.dtype.type(3)
    attrs = {} if axis is None else {"axis": axis}
    if opset == 21:
        attrs["block_size"] = 2
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "scale", "zp"], ["W"], domain="com.microsoft" if ms else "", **attrs),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    m = one_input_model(nodes, {"Wq": Wq, "scale": scale, "zp": zp}, (4,), opset)
    if ms:
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    G, cols = _check(m, X, params="scale")
    assert [c["name"] for c in cols] == ["scale"]


def test_quantize_round_trip_is_piecewise_constant():
    """x -> QuantizeLinear -> DequantizeLinear: forward as onnxruntime; the derivative is zero
    (the fake-quantized value is a step function of x)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"]),
             helper.make_node("Add", ["d", "x"], ["y"])]
    m = one_input_model(nodes, {"s": np.float32(0.37), "zp": np.int8(-2)}, (4,), 13)
    x = X.astype(np.float32) * 10  # some values saturate at -128 or 127
    x[0, 0] = 60.0
    ref, _ = ort_forward(m, {"x": x})
    np.testing.assert_allclose(our_forward(m, {"x": x}, np.float32), ref, rtol=1e-6)
    J = jaccli.input_jacobian(m, {"x": x}, flat=True)
    np.testing.assert_array_equal(J, np.broadcast_to(np.eye(4, dtype=np.float32), J.shape))


def test_quantize_divides_in_float32():
    """x / scale is taken in float32, as onnxruntime takes it: 0.5 / float32(5 / 255) is 25.5
    there, which rounds to the even 26; in float64 it is just below, and rounded to 25 (onnx's
    test_dynamicquantizelinear_expanded)."""
    m = one_input_model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"])],
                        {"s": np.float32(5 / 255), "zp": np.uint8(153)}, (6,), 13)
    x = np.array([[0, 2, -3, -2.5, 1.34, 0.5]], np.float32)
    got = our_forward(m, {"x": x}, np.float32)
    np.testing.assert_array_equal(got, ort_forward(m, {"x": x})[0])
    assert got[0, -1] == 179


@pytest.mark.parametrize("how", ["input_as_shape", "input", "attribute"])
def test_constant_fill(how):
    """The experimental ConstantFill of early exports (no oracle has it any more): the shape from the
    input's values, from the input, or from the attribute, then extra_shape."""
    attrs = {"value": 0.5, "extra_shape": [4]}
    if how == "input_as_shape":
        nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s"], ["n"], starts=[0], ends=[1]),
                 helper.make_node("ConstantFill", ["n"], ["c"], input_as_shape=1, **attrs)]
    elif how == "input":
        nodes = [helper.make_node("ReduceSum", ["x"], ["r"], axes=[1], keepdims=0),
                 helper.make_node("ConstantFill", ["r"], ["c"], **attrs)]
    else:
        nodes = [helper.make_node("ConstantFill", [], ["c"], shape=[1], **attrs)]
    nodes.append(helper.make_node("Mul", ["x", "c"], ["y"]))
    m = one_input_model(nodes, {}, (4,), opset=7)
    J = jaccli.input_jacobian(m, X, flat=True)
    np.testing.assert_allclose(our_forward(m, {"x": X}, np.float64), 0.5 * X)
    np.testing.assert_allclose(J, np.broadcast_to(0.5 * np.eye(4), J.shape))


@pytest.mark.parametrize("attrs", [{"kernel_shape": [2, 2], "strides": [2, 2]},
                                   {"kernel_shape": [3, 3], "strides": [2, 1], "pads": [1, 1, 1, 1]},
                                   {"kernel_shape": [2, 2], "storage_order": 1},
                                   {"kernel_shape": [2, 3], "strides": [2, 2], "ceil_mode": 1}])
def test_max_pool_indices(attrs):
    """MaxPool's second output: the maxima's places in X flattened, as onnxruntime gives them; an
    export of MaxUnpool scatters the values back there."""
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "i"], **attrs),
             helper.make_node("Cast", ["i"], ["y"], to=1)]
    m = one_input_model(nodes, {}, (2, 5, 6), opset=12)
    x = np.random.default_rng(0).permutation(3 * 2 * 5 * 6).reshape(3, 2, 5, 6).astype(np.float64)  # no ties
    ref, oracle = ort_forward(m, {"x": x})
    np.testing.assert_array_equal(our_forward(m, {"x": x}, np.float32), ref, err_msg=oracle)


@pytest.mark.parametrize("explicit_shape", [False, True])
def test_max_unpool(explicit_shape):
    """MaxPool's values, scaled, put back at its indices: forward as onnxruntime, derivatives as
    differences (zero away from the maxima)."""
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "i"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Mul", ["p", "w"], ["pw"]),
             helper.make_node("MaxUnpool", ["pw", "i"] + (["s"] if explicit_shape else []), ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    inits = {"w": np.float32(1.5)}
    shape = (2, 4, 6)
    if explicit_shape:  # x's own shape, a row and a column more than the pooling covers
        nodes.insert(0, helper.make_node("Shape", ["x"], ["s"]))
        shape = (2, 5, 7)
    m = one_input_model(nodes, inits, shape, opset=11)
    x = np.random.default_rng(1).permutation(3 * int(np.prod(shape))).reshape((3,) + shape) / 10.0
    ref, _ = ort_forward(m, {"x": x})
    np.testing.assert_allclose(our_forward(m, {"x": x}, np.float32), ref, rtol=1e-6)
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, {"x": x}, mode=mode, dtype=np.float64, flat=True)
        assert rel_err(J, fd_input_jacobian(m, {"x": x}, "x")) < 1e-6


def test_an_output_a_rule_does_not_give_is_named(monkeypatch):
    """A node output that its rule does not compute: one line naming it, not an internal error."""
    from jaccli.rules.pool import MaxPool

    monkeypatch.setattr(MaxPool, "forward", staticmethod(lambda X, **a: X[..., ::2, ::2]))
    m = one_input_model([helper.make_node("MaxPool", ["x"], ["p", "i"], kernel_shape=[2, 2], strides=[2, 2]),
                         helper.make_node("Cast", ["i"], ["y"], to=1)], {}, (1, 4, 4), opset=12)
    with pytest.raises(UnsupportedOpError, match="output 1 \\('i'\\) of MaxPool"):
        jaccli.input_jacobian(m, X.reshape(3, 1, 2, 2).repeat(2, axis=2).repeat(2, axis=3)[:, :, :4, :4])


def test_skip_layer_normalization_with_its_sum_read():
    """The fused residual sum (output 3) read by the next node, as a chain of SkipLayerNorms does:
    its cotangent joins the normalisation's."""
    from gradcheck import check_whole_model
    from onnx import helper as h

    nodes = [h.make_node("Tanh", ["x"], ["t"]),
             h.make_node("SkipLayerNormalization", ["x", "t", "g", "b", "c"], ["n", "", "", "s"], domain="com.microsoft", epsilon=1e-5),
             h.make_node("Mul", ["s", "n"], ["y"])]
    rng = np.random.default_rng(2)
    inits = {k: rng.standard_normal(6).astype(np.float32) for k in ("g", "b", "c")}
    m = one_input_model(nodes, inits, (2, 6))
    m.opset_import.append(h.make_opsetid("com.microsoft", 1))
    assert check_whole_model(m, rng.standard_normal((3, 2, 6))) == ["g", "b", "c"]


@pytest.mark.parametrize("fill", [-np.inf, np.finfo(np.float32).min])
def test_a_mask_of_infinities_is_no_parameter(fill):
    """An additive attention mask stored as a float initializer (0 and -inf, or 0 and
    torch.finfo(float32).min, as torch's dynamo exporter folds a causal mask) reaches the output
    through an Add, but is no parameter."""
    mask = np.triu(np.full((4, 4), fill, np.float32), 1)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["s"]), helper.make_node("Add", ["s", "mask"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    m = one_input_model(nodes, {"W": np.eye(4, dtype=np.float32), "mask": mask}, (4, 4))
    G, cols = jaccli.param_jacobian(m, np.random.default_rng(0).standard_normal((3, 4, 4)))
    assert [c["name"] for c in cols] == ["W"] and np.isfinite(G).all()


def test_a_zero_shared_by_a_comparison_and_a_mask_is_no_parameter():
    """GPT-2's causal mask after an optimizer that shares constants by value (onnxslim,
    onnxruntime): Where(Equal(tril, 0), -inf, 0), the same one-element 0 compared with and
    taken as the mask's value. It is a constant, not a parameter: as one, the check's random
    directions moved the comparison with it, and a correct Jacobian FAILed."""
    tril = np.tril(np.ones((4, 4), np.float32))
    nodes = [helper.make_node("Equal", ["tril", "zero"], ["masked"]),
             helper.make_node("Where", ["masked", "ninf", "zero"], ["mask"]),
             helper.make_node("MatMul", ["x", "W"], ["s"]), helper.make_node("Add", ["s", "mask"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    W = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    m = one_input_model(nodes, {"W": W, "tril": tril, "zero": np.zeros(1, np.float32),
                                "ninf": np.full(1, -np.inf, np.float32)}, (4, 4))
    x = np.random.default_rng(0).standard_normal((3, 4, 4)).astype(np.float32)
    G, cols = jaccli.param_jacobian(m, x)
    assert [c["name"] for c in cols] == ["W"]
    assert jaccli.check(m, x, params=True)["ok"]
    assert [c["name"] for c in jaccli.param_jacobian(m, x, params="*")[1]] == ["W", "zero"]


@pytest.mark.parametrize("scale_shape,attrs", [((), {}), ((3,), {"axis": 1}), ((2, 3), {"axis": 0, "block_size": 2})])
def test_dequantize_tangent_of_the_scale_has_lead_axes(scale_shape, attrs):
    """Linear in the scale: the tangent of a scale direction is the dequantization by it, for
    each of several directions at once (forward mode)."""
    from jaccli.rules import Ctx
    from jaccli.rules.elementwise import DequantizeLinear21, _dequantize_forward

    rng = np.random.default_rng(4)
    Wq, zp = rng.integers(-50, 50, (4, 3)).astype(np.int8), np.zeros(scale_shape, np.int8) + np.int8(2)
    S, Sdot = rng.uniform(0.1, 1, scale_shape), rng.standard_normal((5,) + scale_shape)
    cx = Ctx((Wq, S, zp), (_dequantize_forward(Wq, S, zp, **attrs),))
    got = DequantizeLinear21.jvp(cx, None, Sdot, None, **attrs)
    want = np.stack([_dequantize_forward(Wq, d, zp, **attrs) for d in Sdot])
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("op, attrs, dtype", [
    ("BitwiseAnd", {}, np.int32), ("BitwiseOr", {}, np.int64), ("BitwiseXor", {}, np.uint8), ("BitwiseNot", {}, np.int16),
    ("BitShift", {"direction": "LEFT"}, np.uint32), ("BitShift", {"direction": "RIGHT"}, np.uint8),
])
def test_integer_bit_operators_match_onnxruntime(op, attrs, dtype):
    """Integer operators carry no derivative, but a graph may compute indices or masks with them."""
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype)
    a = rng.integers(max(info.min, -1000), min(info.max, 1000), (3, 4), endpoint=True).astype(dtype)
    b = rng.integers(0, 7, (3, 4)).astype(dtype)
    names = ["a"] if op == "BitwiseNot" else ["a", "b"]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g = helper.make_graph([helper.make_node(op, names, ["y"], **attrs)], "bits",
                          [helper.make_tensor_value_info(n, elem, [3, 4]) for n in names],
                          [helper.make_tensor_value_info("y", elem, [3, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"a": a, "b": b}
    feeds = {n: feeds[n] for n in names}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = our_forward(m, feeds)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.uint64, np.float32])
@pytest.mark.parametrize("largest", [1, 0])
def test_top_k_of_integers_at_their_extremes(dtype, largest):
    """TopK of integers, zero and the type's extremes among them: the largest ordered from a key
    that does not wrap (the negation of 0 is the largest unsigned value's neighbour, of the most
    negative signed value itself), ties in index order. Against onnxruntime where it has a
    kernel for the type, else against a stable sort."""
    from jaccli.rules.shape import TopK

    info = np.iinfo(dtype) if dtype != np.float32 else np.finfo(dtype)
    x = np.array([[0, 1, info.max, info.min, 3, 1], [info.min, 2, 0, info.max, info.max, 5]], dtype)
    v, i = TopK.forward(x, np.array([4], np.int64), axis=1, largest=largest)
    want_i = np.array([sorted(range(6), key=lambda j: (-int(r[j]) if largest else int(r[j]), j))[:4] for r in x])
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(v, np.take_along_axis(x, want_i, axis=1))
    if dtype in (np.int64, np.int32, np.float32):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        g = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, largest=largest)], "topk",
                              [helper.make_tensor_value_info("x", elem, [2, 6])],
                              [helper.make_tensor_value_info("v", elem, None), helper.make_tensor_value_info("i", 7, None)],
                              [numpy_helper.from_array(np.array([4], np.int64), "k")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
        theirs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_array_equal(v, theirs[0])
        np.testing.assert_array_equal(i, theirs[1])


@pytest.mark.parametrize("axis", [0, 2, -2])
def test_flatten_at_the_rank_and_at_zero_matches_onnxruntime(axis):
    """Flatten's axis runs from -r to r: at r the result is (size, 1), at 0 (1, size). A GPT-2
    exported with its attention mask flattens a (batch, sequence) mask with axis 2 before
    gathering from it; r taken modulo r as 0 had given (1, size), and a Gather out of range."""
    x = np.arange(14, dtype=np.float32).reshape(2, 7)
    g = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"], axis=axis)], "flat",
                          [helper.make_tensor_value_info("x", 1, [2, 7])], [helper.make_tensor_value_info("y", 1, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = our_forward(m, {"x": x}, np.float32)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def _fake_quant_model(per_channel, clip, domain=""):
    """h = tanh(x @ W); y = DequantizeLinear(QuantizeLinear(h)) (uint8, zero point 128, a scale small
    enough that some h saturate; in `domain`: com.microsoft's, as onnxruntime's quantizer writes
    them with UseQDQContribOps), or, with `clip`, y = clip(h) to the same range: the function
    whose derivative the straight-through estimator takes."""
    rng = np.random.default_rng(2)
    s = np.array([0.004, 0.006, 0.005], np.float32) if per_channel else np.array(0.005, np.float32)
    zp = np.full(s.shape, 128, np.uint8)
    W = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Tanh", ["m"], ["h"])]
    inits = [numpy_helper.from_array(W, "W")]
    if clip:
        lo, hi = (0 - 128) * s, (255 - 128) * s
        nodes += [helper.make_node("Max", ["h", "lo"], ["c"]), helper.make_node("Min", ["c", "hi"], ["y"])]
        inits += [numpy_helper.from_array(lo.astype(np.float32), "lo"), numpy_helper.from_array(hi.astype(np.float32), "hi")]
    else:
        attrs = {"axis": 1} if per_channel else {}
        nodes += [helper.make_node("QuantizeLinear", ["h", "s", "zp"], ["q"], domain=domain, **attrs),
                  helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], domain=domain, **attrs)]
        inits += [numpy_helper.from_array(s, "s"), numpy_helper.from_array(zp, "zp")]
    g = helper.make_graph(nodes, "fq", [helper.make_tensor_value_info("x", 1, ["N", 4])],
                          [helper.make_tensor_value_info("y", 1, ["N", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)] + ([helper.make_opsetid(domain, 1)] if domain else []))


@pytest.mark.parametrize("domain", ["", "com.microsoft"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_straight_through_quantization(per_channel, domain):
    """By default a quantize-dequantize pair stops the derivatives (its integer is piecewise
    constant), and the result says so. With straight_through, input and per-sample parameter
    Jacobians are those of the clipped function: identity inside the integer range, zero where
    it saturates (both occur in this data). The same for com.microsoft's pair, whose forward
    matches onnxruntime's."""
    fq, clipped = _fake_quant_model(per_channel, False, domain), _fake_quant_model(per_channel, True)
    x = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float32)
    np.testing.assert_allclose(our_forward(fq, {"x": x}, np.float32), ort_forward(fq, {"x": x})[0], rtol=1e-6)
    r = jaccli.input_jacobian(fq, x, return_result=True)
    assert not r.value.any() and any("--straight-through" in n for n in r.notes)
    J = jaccli.input_jacobian(fq, x, straight_through=True, dtype="float64", return_result=True)
    want = jaccli.input_jacobian(clipped, x, dtype="float64")
    assert (want == 0).any() and (want != 0).any()  # saturated and passing entries
    np.testing.assert_allclose(J.value, want, rtol=1e-10, atol=1e-12)
    assert any(n.startswith("straight through") for n in J.notes)
    G, cols = jaccli.param_jacobian(fq, x, params=["W"], straight_through=True, dtype="float64")
    Gc, _ = jaccli.param_jacobian(clipped, x, params=["W"], dtype="float64")
    np.testing.assert_allclose(G, Gc, rtol=1e-10, atol=1e-12)
    for mode in ("forward", "reverse"):
        np.testing.assert_allclose(jaccli.input_jacobian(fq, x, straight_through=True, mode=mode, dtype="float64"), want,
                                   rtol=1e-10, atol=1e-12)


def test_straight_through_from_the_command_line(tmp_path):
    from click.testing import CliRunner
    from onnx import save

    from jaccli.cli import main

    save(_fake_quant_model(False, False), str(tmp_path / "fq.onnx"))
    x = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for extra in ([], ["--straight-through"]):
        r = CliRunner().invoke(main, ["params", str(tmp_path / "fq.onnx"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "G.npy"),
                                      "--param", "W", *extra])
        assert r.exit_code == 0, r.output
        assert ("straight through" in r.output) == bool(extra) and ("--straight-through" in r.output) != bool(extra)
        assert bool(np.load(tmp_path / "G.npy").any()) == bool(extra)


def test_straight_through_a_pair_with_an_infinite_scale():
    """onnxruntime's static quantization of a causal attention calibrates the masked scores'
    pair (-inf among them) to a scale of inf: it dequantizes to NaN, the softmax of NaN is NaN,
    and the next quantizer makes a level of it. The straight-through derivative of that branch
    is zero (it was NaN for every input: 0 x inf in the pair, NaN x 0 at the next quantizer),
    and the model's is its other branch's, both modes, input and parameters."""
    n = helper.make_node
    inits = {"W": np.random.default_rng(7).standard_normal((3, 3)).astype(np.float32), "V": np.eye(3, dtype=np.float32),
             "mask": np.array([[True, False, True]]), "ninf": np.array(-np.inf, np.float32),
             "s_inf": np.array(np.inf, np.float32), "s": np.array(1 / 255, np.float32), "zp": np.array(0, np.uint8)}
    nodes = [n("MatMul", ["x", "W"], ["a"]), n("Where", ["mask", "a", "ninf"], ["w"]),
             n("QuantizeLinear", ["w", "s_inf", "zp"], ["wq"]), n("DequantizeLinear", ["wq", "s_inf", "zp"], ["wd"]),
             n("Softmax", ["wd"], ["p"]), n("QuantizeLinear", ["p", "s", "zp"], ["pq"]),
             n("DequantizeLinear", ["pq", "s", "zp"], ["pd"]), n("MatMul", ["x", "V"], ["b"]), n("Add", ["pd", "b"], ["y"])]
    m = one_input_model(nodes, inits, (3,), opset=13)
    x = np.random.default_rng(8).standard_normal((4, 3)).astype(np.float32)
    assert np.isfinite(ort_forward(m, {"x": x})[0]).all()
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x, straight_through=True, mode=mode)
        np.testing.assert_array_equal(J, np.broadcast_to(np.eye(3, dtype=np.float32), J.shape))  # the branch b = x V
    G, cols = jaccli.param_jacobian(m, x, straight_through=True)
    assert [c["name"] for c in cols] == ["W", "V"] and np.isfinite(G).all() and not G[..., :9].any()


def test_inspect_names_quantized_values(tmp_path):
    """`jaccli inspect` of a QDQ model says where derivatives stop and what passes them."""
    import json

    from click.testing import CliRunner
    from onnx import save

    from jaccli.cli import main

    save(_fake_quant_model(False, False), str(tmp_path / "fq.onnx"))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "fq.onnx"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["quantized_values"] == 1, r.output
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "fq.onnx")])
    assert "--straight-through" in r.output
    save(_fake_quant_model(False, True), str(tmp_path / "clip.onnx"))
    assert json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "clip.onnx"), "--json"]).output)["quantized_values"] == 0


@pytest.mark.parametrize("qtype, scale, zp", [("int4", 0.1, -1), ("uint4", 0.1, 8), ("float8_e4m3fn", 0.002, 0),
                                              ("float8_e5m2", 1.6e-5, 0)])
def test_quantize_to_four_bits_and_float8(qtype, scale, zp):
    """QuantizeLinear to int4 and uint4 (opset 21) and to float8 (19: x / scale rounded by the
    cast to float8, saturated at its largest finite value), paired with a DequantizeLinear:
    forward as onnxruntime's. The pair stops the derivatives; straight through, the Jacobian is
    that of h clipped where its level is inside the type's range (both sides of it occur in
    this data)."""
    import ml_dtypes

    t = np.dtype(getattr(ml_dtypes, qtype))
    rng = np.random.default_rng(5)
    W = rng.standard_normal((4, 3)).astype(np.float32)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    info = ml_dtypes.finfo(t) if qtype.startswith("float") else ml_dtypes.iinfo(t)
    half = 0 if qtype.startswith("float") else 0.5  # an integer's levels are rounded: h / scale half a level out still in
    lo, hi = (float(info.min) - zp - half) * scale, (float(info.max) - zp + half) * scale
    # and a sample whose first h is 0.3 of a level past the largest: in for an integer, out for a float
    a = np.arctanh((float(info.max) - zp + 0.3) * scale)
    x = np.concatenate([x, (a * W[:, 0] / (W[:, 0] @ W[:, 0]))[None].astype(np.float32)])
    h = np.tanh(x @ W)
    assert (h < lo).any() and (h > hi).any() and ((h > lo) & (h < hi)).any()
    assert (np.abs(h[:-1] - lo) > 1e-3).all() and (np.abs(h[:-1] - hi) > 1e-3).all()

    def model(pair):
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Tanh", ["m"], ["h"])]
        if pair:
            nodes += [helper.make_node("QuantizeLinear", ["h", "s", "zp"], ["q"]),
                      helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
            inits = {"W": W, "s": np.float32(scale), "zp": np.array(zp).astype(t)}
        else:
            nodes += [helper.make_node("Clip", ["h", "lo", "hi"], ["y"])]
            inits = {"W": W, "lo": np.float32(lo), "hi": np.float32(hi)}
        return one_input_model(nodes, inits, (4,), 21)

    fq = model(True)
    np.testing.assert_allclose(our_forward(fq, {"x": x}, np.float32), ort_forward(fq, {"x": x})[0], rtol=1e-6)
    assert not jaccli.input_jacobian(fq, x).any()
    want = jaccli.input_jacobian(model(False), x, dtype="float64")
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(fq, x, straight_through=True, mode=mode, dtype="float64")
        np.testing.assert_allclose(J, want, rtol=1e-10, atol=1e-12)


def test_bitcast():
    """BitCast (opset 26) reads a value's bits as another type of the same width, as
    onnxruntime does, in a float32 run and in a float64 one (where a float32 value is held in
    float64). Of an integer input, its float is data like any other: y = tanh(x) * f, where
    f = bitcast(bits), differentiated in x as differences give it. Of a float that depends
    on x (its sign bit masked: |tanh(x)|) its derivative is not zero: it is refused in one line."""
    from gradcheck import fd_input_jacobian

    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    bits = rng.standard_normal((3, 4)).astype(np.float32).view(np.int32)
    n = helper.make_node
    nodes = [n("Tanh", ["x"], ["a"]), n("BitCast", ["bits"], ["f"], to=1), n("Mul", ["a", "f"], ["y"]),
             n("BitCast", ["a"], ["i"], to=6), n("BitwiseAnd", ["i", "mask"], ["j"]), n("BitCast", ["j"], ["abs"], to=1)]
    g = helper.make_graph(nodes, "bits", [helper.make_tensor_value_info("x", 1, ["N", 4]), helper.make_tensor_value_info("bits", 6, ["N", 4])],
                          [helper.make_tensor_value_info("y", 1, ["N", 4]), helper.make_tensor_value_info("abs", 1, ["N", 4])],
                          [numpy_helper.from_array(np.array(0x7FFFFFFF, np.int32), "mask")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 26)])
    m.ir_version = 10
    feeds = {"x": x, "bits": bits}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(want[1], np.abs(np.tanh(x)), rtol=1e-6)
    from jaccli import walk
    from jaccli.plan import Plan

    for dt in (np.float32, np.float64):
        for name, w in zip(("y", "abs"), want):
            env = walk.primal(Plan(load(m), name, [], dt), {"x": x.astype(dt), "bits": bits})
            np.testing.assert_allclose(env[name], w, rtol=1e-6)
    J = jaccli.input_jacobian(m, feeds, of="y", wrt="x", dtype=np.float64, flat=True)
    assert rel_err(J, fd_input_jacobian(m, feeds, "x")) < 1e-6
    with pytest.raises(UnsupportedOpError, match="BitCast") as e:
        jaccli.input_jacobian(m, feeds, of="abs", wrt="x")
    assert "\n" not in str(e.value)
