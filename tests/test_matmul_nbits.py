"""onnxruntime's weight-only quantization (MatMulNBitsQuantizer): MatMulNBits, weights of 2, 4 or 8
bits in blocks along K. Forward against onnxruntime, accuracy_level 4's int8 rounding of A included;
derivatives against differences; a quantized MLP against the float one with the dequantized weights."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from gradcheck import check_rule, rel_err
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.rules.quant import MatMulBnb4, MatMulNBits, MatMulNBitsThrough, _int8_product

MS = "com.microsoft"


def quantize(W, bits, block_size, rng, zero_points="packed"):
    """W (K, N), a MatMul's weight, as MatMulNBits stores it: levels packed low-first (N, blocks,
    bytes), scales (N, blocks), zero points packed, as floats, or absent (the default 2^(bits-1)).
    Returns (B, scales, zero_points, the dequantized W (K, N))."""
    K, N = W.shape
    blocks = -(-K // block_size)
    Wt = np.zeros((N, blocks * block_size))
    Wt[:, :K] = W.T
    Wb = Wt.reshape(N, blocks, block_size)
    top = (1 << bits) - 1
    lo, hi = Wb.min(-1), Wb.max(-1)
    scale = (np.maximum(hi - lo, 1e-6) / top).astype(np.float32)
    if zero_points == "none":
        zp = np.full((N, blocks), 1 << (bits - 1))
        scale = (np.maximum(np.abs(Wb).max(-1), 1e-6) / (1 << (bits - 1))).astype(np.float32)
    else:
        zp = np.clip(np.rint(-lo / scale), 0, top)
        if zero_points == "float":
            zp = (zp + rng.uniform(-0.4, 0.4, zp.shape)).astype(np.float32)
    q = np.clip(np.rint(Wb / scale[..., None] + zp[..., None]), 0, top).astype(np.int64)
    per = 8 // bits
    B = np.zeros((N, blocks, block_size // per), np.int64)
    for j in range(per):
        B |= q[..., j::per] << (j * bits)
    deq = ((q - zp[..., None]) * scale[..., None]).reshape(N, -1)[:, :K].T
    if zero_points == "packed":
        zq = np.zeros((N, -(-blocks // per) * per), np.int64)
        zq[:, :blocks] = zp
        packed = np.zeros((N, zq.shape[1] // per), np.int64)
        for j in range(per):
            packed |= zq[:, j::per] << (j * bits)
        zp_out = packed.astype(np.uint8)
    else:
        zp_out = None if zero_points == "none" else zp
    return B.astype(np.uint8), scale, zp_out, deq.astype(np.float32)


def node_model(K, N, bits, block_size, accuracy_level, B, scales, zp, bias, rank=2):
    names = ["A", "B", "s", "z" if zp is not None else "", "", "b" if bias is not None else ""]
    while not names[-1]:
        names.pop()
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales, "s")]
    inits += [numpy_helper.from_array(zp, "z")] if zp is not None else []
    inits += [numpy_helper.from_array(bias, "b")] if bias is not None else []
    node = helper.make_node("MatMulNBits", names, ["Y"], domain=MS, K=K, N=N, bits=bits, block_size=block_size,
                            accuracy_level=accuracy_level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["N"] + ["S"] * (rank - 2) + [K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return m


CASES = [(bits, level, zp, K, bs) for bits in (2, 4, 8) for level in (0, 4) for zp in ("packed", "none", "float")
         for K, bs in ((64, 16), (100, 32), (300, 256)) if not (bits == 8 and zp == "float")]  # onnxruntime refuses that one


@pytest.mark.parametrize("bits,level,zp,K,block_size", CASES)
def test_forward_as_onnxruntime(bits, level, zp, K, block_size):
    """Every width, both accuracy levels (4: A rounded to int8 per row and block, except with
    float zero points), zero points packed, absent or float, K a multiple of the block or not,
    with a bias, on a batch of sequences."""
    rng = np.random.default_rng(bits * 10 + level)
    N = 12
    B, s, z, _ = quantize(rng.standard_normal((K, N)), bits, block_size, rng, zp)
    bias = rng.standard_normal(N).astype(np.float32)
    m = node_model(K, N, bits, block_size, level, B, s, z, bias, rank=3)
    A = rng.standard_normal((3, 5, K)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    ours = MatMulNBits.forward(A, B, s, z, None, bias, K=K, N=N, bits=bits, block_size=block_size, accuracy_level=level)
    assert ours.dtype == np.float32
    assert rel_err(ours, ref) < 1e-6
    plain = MatMulNBits.forward(A, B, s, z, None, bias, K=K, N=N, bits=bits, block_size=block_size)
    rounds = _int8_product(dict(bits=bits, block_size=block_size, accuracy_level=level), z)
    assert rounds == (level == 4 and zp != "float" and (bits != 2 or block_size == 32))
    assert (rel_err(plain, ref) > 1e-4) == rounds  # A's int8 rounding is not a float product's


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("zp", ["packed", "float"])
def test_derivatives(level, zp):
    """In A, the scales and the bias. At accuracy_level 4, where A is rounded to int8, A's
    derivative is zero: its scale (each block's max |a| / 127) is taken as a constant, as
    DynamicQuantizeLinear's is, so the differences are taken with A fixed."""
    rng = np.random.default_rng(level)
    K, N, bs = 40, 6, 16
    B, s, z, _ = quantize(rng.standard_normal((K, N)), 4, bs, rng, zp)
    attrs = dict(K=K, N=N, bits=4, block_size=bs, accuracy_level=level)
    inputs = [rng.standard_normal((3, 2, K)), B, s.astype(np.float64), z, None, rng.standard_normal(N)]
    rounds = level == 4 and zp != "float"
    check_rule(MatMulNBits, inputs, attrs, diff=(2, 5) if rounds else (0, 2, 5), rng=rng)
    from jaccli.rules import Ctx

    cx = Ctx(tuple(inputs), (MatMulNBits.forward(*inputs, **attrs),), (True,) + (False,) * 5, (False,) * 6, MatMulNBits)
    dA = MatMulNBits.jvp(cx, np.ones((1,) + inputs[0].shape), **attrs)
    assert (dA is None) == rounds
    cx = Ctx(tuple(inputs), cx.y, (True,) + (False,) * 5, (False,) * 6, MatMulNBitsThrough)
    assert MatMulNBitsThrough.jvp(cx, np.ones((1,) + inputs[0].shape), **attrs) is not None


def mlp(level, rng, zp="packed"):
    """x (N, 48) -> MatMulNBits -> Gelu -> MatMulNBits (+ bias) -> y (N, 5), and its float twin with
    the dequantized weights."""
    W1, W2 = rng.standard_normal((48, 32)) * 0.3, rng.standard_normal((32, 5)) * 0.3
    b2 = rng.standard_normal(5).astype(np.float32)
    B1, s1, z1, D1 = quantize(W1, 4, 16, rng, zp)
    B2, s2, z2, D2 = quantize(W2, 4, 16, rng, zp)
    n = helper.make_node

    def graph(nodes, inits):
        g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items() if v is not None])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(MS, 1)])
        m.ir_version = 9
        return m

    quantized = graph([n("MatMulNBits", ["x", "B1", "s1", "z1" if z1 is not None else ""], ["h"], domain=MS, K=48, N=32,
                         block_size=16, accuracy_level=level),
                       n("Gelu", ["h"], ["g"]),
                       n("MatMulNBits", ["g", "B2", "s2", "z2" if z2 is not None else "", "", "b2"], ["y"], domain=MS, K=32,
                         N=5, block_size=16, accuracy_level=level)],
                      {"B1": B1, "s1": s1, "z1": z1, "B2": B2, "s2": s2, "z2": z2, "b2": b2})
    plain = graph([n("MatMul", ["x", "W1"], ["h"]), n("Gelu", ["h"], ["g"]), n("MatMul", ["g", "W2"], ["m"]),
                   n("Add", ["m", "b2"], ["y"])], {"W1": D1, "W2": D2, "b2": b2})
    return quantized, plain


def test_a_quantized_mlp_differentiates_as_the_float_one_with_its_weights_dequantized():
    rng = np.random.default_rng(5)
    quantized, plain = mlp(0, rng)
    x = rng.standard_normal((6, 48)).astype(np.float32)
    y = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y_plain = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert rel_err(y, y_plain) < 1e-5
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(quantized, x, mode=mode, dtype="float64")
        # to the float32 rounding of the twin's weights
        assert rel_err(J, jaccli.input_jacobian(plain, x, mode=mode, dtype="float64")) < 1e-6
    G, cols = jaccli.param_jacobian(quantized, x, dtype="float64")
    assert [c["name"] for c in cols] == ["s1", "s2", "b2"]
    # the bias's columns are the float model's; the scales' are W's columns times its levels
    Gp, cols_p = jaccli.param_jacobian(plain, x, dtype="float64")
    assert rel_err(G[..., -5:], Gp[..., -5:]) < 1e-6


@pytest.mark.parametrize("what", ["input", "params"])
def test_check_passes_on_the_quantized_mlp(what, tmp_path):
    import onnx
    from click.testing import CliRunner

    from jaccli.cli import main

    rng = np.random.default_rng(6)
    onnx.save(mlp(0, rng, "float")[0], tmp_path / "q.onnx")
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 48)).astype(np.float32))
    r = CliRunner().invoke(main, ["check", str(tmp_path / "q.onnx"), str(tmp_path / "x.npy"), "--json"]
                           + (["--params"] if what == "params" else []))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["ok"]


def test_accuracy_level_4_rounds_a_and_straight_through_is_the_float_product(tmp_path):
    """A rounded to int8 in the product: the Jacobian in x is zero, with the note; straight through,
    that of accuracy_level 0."""
    rng = np.random.default_rng(7)
    q4, _ = mlp(4, np.random.default_rng(8))
    x = rng.standard_normal((5, 48)).astype(np.float32)
    y = ort.InferenceSession(q4.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    r = jaccli.input_jacobian(q4, x, return_result=True)
    assert rel_err(r.outputs, y) < 1e-5
    assert not r.value.any() and any("MatMulNBits lies on the way to the output: at accuracy_level 4" in n for n in r.notes), r.notes
    J = jaccli.input_jacobian(q4, x, straight_through=True, return_result=True, dtype="float64")
    assert np.abs(J.value).max() > 0.1 and any("straight through: 2 MatMulNBits node(s) at accuracy_level 4" in n for n in J.notes), J.notes
    # one product: straight through, exactly the float product's Jacobian
    B, s, z, _ = quantize(rng.standard_normal((48, 7)), 4, 16, rng)
    one = [node_model(48, 7, 4, 16, level, B, s, z, None) for level in (0, 4)]
    J4 = jaccli.input_jacobian(one[1], x, straight_through=True, dtype="float64")
    assert rel_err(J4, jaccli.input_jacobian(one[0], x, dtype="float64")) < 1e-12
    assert not jaccli.input_jacobian(one[1], x).any()


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("zp", ["none", "float"])
def test_g_idx(level, zp):
    """g_idx (act-order GPTQ): column k's scale and zero point are its block g_idx[k]'s, not
    k // block_size's. Forward as onnxruntime's (at accuracy_level 4 too, where onnxruntime then
    does not round A to int8); the derivatives in A, the scales and the bias as differences give
    them. Integer zero points with g_idx are refused in one line (onnxruntime ignores them)."""
    rng = np.random.default_rng(5 + level)
    K, N, bs = 64, 6, 16
    B, s, z, _ = quantize(rng.standard_normal((K, N)), 4, bs, rng, zp)
    g = rng.permutation(np.arange(K) // bs).astype(np.int32)
    m = node_model(K, N, 4, bs, level, B, s, z, None)
    names = list(m.graph.node[0].input) + [""] * (4 - len(m.graph.node[0].input))
    m.graph.node[0].ClearField("input")
    m.graph.node[0].input.extend(names[:4] + ["g"])
    m.graph.initializer.append(numpy_helper.from_array(g, "g"))
    A = rng.standard_normal((3, K)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    attrs = dict(K=K, N=N, bits=4, block_size=bs, accuracy_level=level)
    assert rel_err(MatMulNBits.forward(A, B, s, z, g, **attrs), ref) < 1e-6
    assert rel_err(MatMulNBits.forward(A, B, s, z, None, **attrs), ref) > 0.1  # the blocks' order matters
    assert not _int8_product(attrs, z, g)
    inputs = [rng.standard_normal((3, 2, K)), B, s.astype(np.float64), z, g, rng.standard_normal(N)]
    check_rule(MatMulNBits, inputs, attrs, diff=(0, 2, 5), rng=rng)


def test_g_idx_with_integer_zero_points_is_refused_in_one_line(tmp_path):
    import onnx
    from click.testing import CliRunner

    from jaccli.cli import main

    rng = np.random.default_rng(9)
    B, s, z, _ = quantize(rng.standard_normal((32, 4)), 4, 16, rng)
    m = node_model(32, 4, 4, 16, 0, B, s, z, None)
    m.graph.node[0].input.extend(["g"])
    m.graph.initializer.append(numpy_helper.from_array((np.arange(32) // 16).astype(np.int32), "g"))
    onnx.save(m, tmp_path / "g.onnx")
    np.save(tmp_path / "x.npy", rng.standard_normal((2, 32)).astype(np.float32))
    r = CliRunner().invoke(main, ["input", str(tmp_path / "g.onnx"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "J.npy")])
    assert r.exit_code != 0 and "g_idx" in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "J.npy").exists()


def bnb4_model(x_shape, W, quant_type, block_size, tmp_path):
    """A MatMul of weight W (K, N) quantized by onnxruntime's MatMulBnb4Quantizer: (model, quantized)."""
    import onnx
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    n = helper.make_node
    g = helper.make_graph([n("MatMul", ["x", "W"], ["m"]), n("Tanh", ["m"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    q = MatMulBnb4Quantizer(onnx.ModelProto.FromString(m.SerializeToString()), quant_type, block_size)
    q.process()
    return m, q.model.model


@pytest.mark.parametrize("quant_type", [0, 1])  # FP4, NF4
@pytest.mark.parametrize("K, N, block_size", [(32, 6, 16), (24, 5, 64)])
def test_matmul_bnb4(quant_type, K, N, block_size, tmp_path):
    """onnxruntime's MatMulBnb4Quantizer (QLoRA's 4-bit FP4 and NF4 codes, an absmax per block of
    the transposed weight's elements; a last block cut short): forward as onnxruntime's, the input
    Jacobian as the float model's with the dequantized weight, and the per-sample Jacobian in
    the absmax values, parameters, as differences give it."""
    from gradcheck import fd_param_jacobian
    from jaccli.model import load

    rng = np.random.default_rng(quant_type + K)
    W = (rng.standard_normal((K, N)) * 0.3).astype(np.float32)
    _, q = bnb4_model((3, K), W, quant_type, block_size, tmp_path)
    assert [v.op_type for v in q.graph.node] == ["MatMulBnb4", "Tanh"]
    x = rng.standard_normal((4, 3, K)).astype(np.float32)
    ref = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    r = jaccli.input_jacobian(q, x, dtype=np.float64, return_result=True)
    np.testing.assert_allclose(r.outputs, ref, rtol=1e-5, atol=1e-6)
    inits = load(q).initializers
    B, absmax = (v for k, v in inits.items() if k.endswith("_Bnb4")), (v for k, v in inits.items() if k.endswith("_absmax"))
    from jaccli.rules.quant import _bnb4_weight

    Wd = _bnb4_weight(next(B), next(absmax), dict(K=K, N=N, block_size=block_size, quant_type=quant_type), np.float64).T
    assert np.abs(Wd - W).max() < 0.3 * np.abs(W).max()  # near the weight it quantizes
    g = helper.make_graph([helper.make_node("MatMul", ["x", "Wd"], ["m"]), helper.make_node("Tanh", ["m"], ["y"])], "f",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(Wd, "Wd")])
    f = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    f.ir_version = 8
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(q, x, dtype=np.float64, mode=mode)
        assert rel_err(J, jaccli.input_jacobian(f, x, dtype=np.float64)) < 1e-12
    G, cols = jaccli.param_jacobian(q, x, dtype=np.float64)
    assert [c["name"] for c in cols] == ["W_absmax"]
    fd = fd_param_jacobian(q, {"x": x}, ["W_absmax"], inits, n=4)
    assert np.abs(fd).max() > 0 and rel_err(G.reshape(fd.shape), fd) < 1e-6
    check_rule(MatMulBnb4, [x[:2].astype(np.float64), *(inits[n] for n in q.graph.node[0].input[1:])],
               dict(K=K, N=N, block_size=block_size, quant_type=quant_type), (0, 2), rng)


def test_matmul_bnb4_transposed_for_training_is_refused():
    from jaccli.errors import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match="transB=0") as e:
        MatMulBnb4.forward(np.ones((2, 6), np.float32), np.zeros(96, np.uint8), np.ones(12, np.float32), K=32, N=6,
                           block_size=16, quant_type=1, transB=0)
    assert "\n" not in str(e.value)
