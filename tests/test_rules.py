"""Every rule: forward against onnxruntime; JVP and VJP against float64 central differences of our
forward; per-sample parameter cotangents against per-sample differences over the parameters."""

import numpy as np
import pytest
from gradcheck import N, Case, build, fd_input_jacobian, fd_param_jacobian, ort_forward, our_forward, rel_err
from onnx import TensorProto, helper, numpy_helper
from op_cases import CASES

import jaccli
from jaccli.errors import DataError
from jaccli.model import load


# No oracle runs these: onnxruntime has no opset-6 kernel, onnx's version converter aligns B at
# axis 0 instead of `axis`, and the reference evaluator ignores `axis`. test_legacy_axis_broadcast
# checks them against the spec's definition instead.
NO_ORACLE = {"Add-6-axis"}


def time_major_twin(model):
    """onnxruntime runs recurrent ops only in layout 0: the same node between Transposes."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = m.graph.node[0]
    for a in node.attribute:
        if a.name == "layout":
            a.i = 0
    x, y = node.input[0], node.output[0]
    node.input[0], node.output[0] = "x_tm", "y_tm"
    nodes = [helper.make_node("Transpose", [x], ["x_tm"], perm=[1, 0, 2]), node,
             helper.make_node("Transpose", ["y_tm"], [y], perm=[2, 0, 1, 3])]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@pytest.mark.parametrize("case", [c for c in CASES if c.id not in NO_ORACLE], ids=repr)
def test_forward_matches_onnxruntime(case):
    model, feeds = build(case)
    ours = our_forward(model, feeds, np.float32)
    if case.attrs.get("layout") == 1:
        model = time_major_twin(model)
    ref, oracle = ort_forward(model, feeds)
    assert ours.shape == ref.shape, oracle
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=oracle)


def _graph_inputs(case):
    return [f"in{k}" for k, (kind, _) in enumerate(case.inputs) if kind == "x"]


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_input_jacobian_matches_differences(case, mode):
    model, feeds = build(case)
    for wrt in _graph_inputs(case):
        J = jaccli.input_jacobian(model, feeds, wrt=wrt, mode=mode, dtype=np.float64, flat=True)
        fd = fd_input_jacobian(model, feeds, wrt)
        assert J.shape == fd.shape
        assert rel_err(J, fd) < 1e-6, f"{case} d/d{wrt} ({mode}): {rel_err(J, fd):.2e}"


PARAM_CASES = [c for c in CASES if any(kind == "p" for kind, _ in c.inputs)]


@pytest.mark.parametrize("case", PARAM_CASES, ids=repr)
def test_per_sample_parameter_jacobian_matches_differences(case):
    model, feeds = build(case)
    G, cols = jaccli.param_jacobian(model, feeds, dtype=np.float64)
    inits = load(model).initializers
    names = [c["name"] for c in cols]
    assert names == [f"in{k}" for k, (kind, _) in enumerate(case.inputs) if kind == "p"]
    fd = fd_param_jacobian(model, feeds, names, inits)
    Gf = G.reshape(fd.shape)
    assert rel_err(Gf, fd) < 1e-6, f"{case}: {rel_err(Gf, fd):.2e}"


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_float32_close_to_float64(case):
    model, feeds = build(case)
    for wrt in _graph_inputs(case):
        J32 = jaccli.input_jacobian(model, feeds, wrt=wrt, dtype=np.float32, flat=True)
        J64 = jaccli.input_jacobian(model, feeds, wrt=wrt, dtype=np.float64, flat=True)
        assert J32.dtype == np.float32
        assert rel_err(J32.astype(np.float64), J64) < 1e-4


@pytest.mark.parametrize(
    "case",
    [
        Case("Flatten", [("x", (3, 2, 2))], {"axis": 2}, id="Flatten-axis-2"),
        Case("Reshape", [("x", (3, 4)), ("c", np.array([-1, 6], np.int64))], id="Reshape-merges-samples"),
        Case("ReduceSum", [("x", (3, 4))], {"keepdims": 0}, opset=13, id="ReduceSum-over-samples"),
    ],
    ids=repr,
)
def test_mixing_the_sample_axis_is_refused(case):
    model, feeds = build(case)
    with pytest.raises(DataError, match="not the sample axis"):
        jaccli.input_jacobian(model, feeds)


@pytest.mark.parametrize("opset", [15, 9, 13])
def test_batch_normalization_in_training_mode(opset):
    """BatchNormalization in training mode normalizes by X's own statistics: the rule on
    arrays (in X, scale and bias; 2-D and 4-D); and weight standardization as timm's NFNets
    export it (a kernel through it, then a product with the data), against onnxruntime, its
    input Jacobian in both modes and its per-sample parameter Jacobian (the kernel and gains
    through the statistics) against differences. On a batch of samples it mixes them, and
    is refused. From opset 14 the attribute training_mode=1 says so; before, the form with
    five outputs (the TorchScript exporter's at opsets 9 to 13, which onnxruntime takes for
    training mode, unless it folds the node as a constant), whose every output is checked
    against onnxruntime too."""
    import onnxruntime as ort
    from gradcheck import check_rule, check_whole_model, one_input_model

    from jaccli.rules import lookup

    rng = np.random.default_rng(2)
    train = {"training_mode": 1} if opset >= 14 else {}
    stats = ["rm", "rv"] if opset >= 14 else ["rm", "rv", "sm", "sv"]
    rule = lookup("BatchNormalization", opset)
    for shape in ((5, 3), (2, 3, 4, 2)):
        args = [rng.standard_normal(shape), rng.uniform(0.5, 1.5, 3), rng.standard_normal(3), np.zeros(3), np.ones(3)]
        check_rule(rule, args, {"epsilon": 1e-3, "training_mode": 1}, diff=(0, 1, 2), rng=rng)
    nodes = [helper.make_node("BatchNormalization", ["W", "g", "b", "m", "v"], ["Ws"] + stats, epsilon=1e-5,
                              momentum=0.0, **train),
             helper.make_node("Reshape", ["Ws", "shape"], ["W2"]), helper.make_node("Transpose", ["W2"], ["W2t"]),
             helper.make_node("MatMul", ["x", "W2t"], ["y"])]
    inits = {"W": rng.standard_normal((1, 4, 6)).astype(np.float32), "g": rng.uniform(0.5, 1.5, 4).astype(np.float32),
             "b": np.zeros(4, np.float32), "m": np.zeros(4, np.float32), "v": np.ones(4, np.float32),
             "shape": np.array([4, 6], np.int64)}
    m = one_input_model(nodes, inits, (6,), opset=opset)
    assert check_whole_model(m, rng.standard_normal((N, 6)), fold=opset >= 14) == ["W", "g", "b"]
    outs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ["y"] + stats]
    per_sample = one_input_model([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"] + stats,
                                                   momentum=0.25, **train)], inits, (4, 3), opset=opset)
    x = rng.standard_normal((3, 4, 3)).astype(np.float32)
    del per_sample.graph.output[:]
    per_sample.graph.output.extend(outs)
    ours = lookup("BatchNormalization", opset).forward(x, *(inits[k] for k in "gbmv"), epsilon=1e-5, momentum=0.25,
                                                       n_outputs=len(outs), **train)
    for a, b in zip(ours, ort.InferenceSession(per_sample.SerializeToString()).run(None, {"x": x}), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="mixes samples"):
        jaccli.input_jacobian(per_sample, x, of="y")


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_nd_rule(reduction):
    """ScatterND's indices address absolute positions (axis 0 included): checked as a rule on
    arrays, a repeated index for the reductions; the forward against onnxruntime."""
    from gradcheck import check_rule

    from jaccli.rules import lookup

    rng = np.random.default_rng(1)
    idx = np.array([[0, 1], [2, 0], [1, 1] if reduction == "none" else [0, 1]], np.int64)
    args = [rng.standard_normal((3, 2, 4)), idx, rng.standard_normal((3, 4))]
    check_rule(lookup("ScatterND", 18), args, {"reduction": reduction}, diff=(0, 2), rng=rng)
    g = helper.make_graph([helper.make_node("ScatterND", ["d", "i", "u"], ["y"], reduction=reduction)], "snd",
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, [3, 2, 4]),
                           helper.make_tensor_value_info("i", TensorProto.INT64, [3, 2]),
                           helper.make_tensor_value_info("u", TensorProto.FLOAT, [3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"d": args[0].astype(np.float32), "i": idx, "u": args[2].astype(np.float32)}
    want, _ = ort_forward(m, feeds)
    np.testing.assert_allclose(our_forward(m, feeds, np.float32), want, rtol=1e-6, atol=1e-6)


def test_legacy_axis_broadcast_follows_the_spec():
    # opset 1-6: with broadcast=1 and axis=1, B of shape (3,) lines up with A's axis 1
    case = next(c for c in CASES if c.id == "Add-6-axis")
    model, feeds = build(case)
    B = load(model).initializers["in1"].astype(np.float64)
    expected = feeds["in0"] + B[None, :, None, None]
    np.testing.assert_allclose(our_forward(model, feeds), expected, rtol=1e-12)




@pytest.mark.parametrize("case", PARAM_CASES, ids=repr)
def test_summed_parameter_cotangents(case):
    """A parameter's cotangent summed over the samples (what a graph that merges the sample axis
    with another, a TimeDistributed layer, uses) is the sum of its per-sample ones, checked above."""
    from jaccli.rules import Ctx

    step, x, params = _step(case)
    y = step.rule.forward(*x, **step.attrs)
    y = y if isinstance(y, tuple) else (y,)
    Ybar = np.random.default_rng(1).standard_normal((2,) + y[0].shape)
    need = tuple(n in params for n in step.inputs)
    per_sample = step.rule.vjp(Ctx(x, y, need, need, step.rule), Ybar, **step.attrs)
    summed = step.rule.vjp(Ctx(x, y, need, (False,) * len(need), step.rule), Ybar, **step.attrs)
    for k, n in enumerate(step.inputs):
        if n in params:
            np.testing.assert_allclose(summed[k], per_sample[k].sum(axis=1), rtol=1e-10, atol=1e-12, err_msg=n)


@pytest.mark.parametrize("case", [c for c in PARAM_CASES if c.op in ("Conv", "Attention", "MultiHeadAttention")], ids=repr)
def test_rule_in_its_parameters(case):
    """Conv, and the attentions, with tangents on their weights and biases too (a kernel computed
    from the input; forward mode through a projection's bias): JVP against differences, VJP by
    its adjoint identity."""
    from gradcheck import check_rule

    step, x, _ = _step(case)
    diff = [k for k, (kind, _) in enumerate(case.inputs) if kind in ("x", "p")]
    check_rule(step.rule, list(x), step.attrs, diff, np.random.default_rng(1))


def _step(case):
    """The case's one step, planned for its parameters; its inputs in float64; the parameters."""
    from jaccli.plan import Plan

    model, feeds = build(case)
    m = load(model)
    params = [f"in{k}" for k, (kind, _) in enumerate(case.inputs) if kind == "p"]
    step = Plan(m, m.outputs[0].name, params, np.float64, per_sample=True).steps[0]
    values = {**{k: np.asarray(v, np.float64) for k, v in m.initializers.items()}, **feeds}
    return step, tuple(values[n] if n else None for n in step.inputs), params


@pytest.mark.parametrize("case", PARAM_CASES, ids=repr)
def test_one_sample_parameter_jacobian(case):
    """Each sample alone gives its row of the batch's parameter Jacobian, checked above."""
    model, feeds = build(case)
    G, _ = jaccli.param_jacobian(model, feeds, dtype=np.float64)
    for n in (0, len(G) - 1):
        one = {k: v[n:n + 1] for k, v in feeds.items()}
        G1, _ = jaccli.param_jacobian(model, one, dtype=np.float64)
        assert rel_err(G1[0], G[n]) < 1e-10, f"{case}, sample {n}"


@pytest.mark.parametrize("waste", [0.0, 1e9], ids=["never-banded", "banded-where-2d"])
@pytest.mark.parametrize("case", [c for c in CASES if c.op == "Conv"], ids=repr)
def test_conv_input_cotangent_either_way(case, waste, monkeypatch):
    """A 2-D stride-1 convolution's input cotangent (dense or depthwise) by its band matrix, or by
    the other ways, whichever the input's width would choose (small maps' own ways aside)."""
    from jaccli.rules import conv

    monkeypatch.setattr(conv, "_BANDED_WASTE", waste)
    monkeypatch.setattr(conv, "_DW_BANDED_WASTE", waste)
    monkeypatch.setattr(conv, "_FEW_OUTPUTS", 0)
    monkeypatch.setattr(conv, "_LAST_STRIDE1", 0)
    monkeypatch.setattr(conv, "_DW_CHANNELS_LAST", 1e9)
    monkeypatch.setattr(conv, "_DW_DENSE_BYTES", 0)
    model, feeds = build(case)
    J = jaccli.input_jacobian(model, feeds, wrt="in0", mode="reverse", dtype=np.float64, flat=True)
    assert rel_err(J, fd_input_jacobian(model, feeds, "in0")) < 1e-6


@pytest.mark.parametrize("few", [0, 1 << 30], ids=["images-one-by-one", "images-as-columns"])
@pytest.mark.parametrize("dw", ["rows", "channels-last", "dense"])
@pytest.mark.parametrize("case", [c for c in CASES if c.op == "Conv"], ids=repr)
def test_conv_kernels_either_way(case, few, dw, monkeypatch):
    """A convolution's forward, JVP and VJP kernels, by whichever way the shapes choose: with
    one group, a GEMM per image or one over the images as columns (few output positions), and
    the input cotangent with the channels last (few output positions) or first; a
    depthwise one by rows, with the channels innermost, or as dense per-channel matrices (small
    maps). Forward against onnxruntime, input Jacobian in both modes and the parameters'
    against differences."""
    from gradcheck import ort_forward, our_forward

    from jaccli.rules import conv

    monkeypatch.setattr(conv, "_FEW_OUTPUTS", few)  # and the input cotangent channels last with it
    monkeypatch.setattr(conv, "_LAST_CHANNELS", 0)
    monkeypatch.setattr(conv, "_LAST_STRIDE1", few)
    monkeypatch.setattr(conv, "_DW_CHANNELS_LAST", 0 if dw == "channels-last" else 1e9)
    monkeypatch.setattr(conv, "_DW_DENSE_BYTES", 1 << 40 if dw == "dense" else 0)
    if dw == "dense":  # whatever the cost
        monkeypatch.setattr(conv, "_DW_BUILD", 0.0)
        monkeypatch.setattr(conv, "_DW_GEMM", 0.0)
    model, feeds = build(case)
    ref, oracle = ort_forward(model, feeds)
    np.testing.assert_allclose(our_forward(model, feeds, np.float32), ref, rtol=1e-5, atol=1e-5, err_msg=oracle)
    fd = fd_input_jacobian(model, feeds, "in0")
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(model, feeds, wrt="in0", mode=mode, dtype=np.float64, flat=True)
        assert rel_err(J, fd) < 1e-6, mode
    G, cols = jaccli.param_jacobian(model, feeds, dtype=np.float64)
    names = [c["name"] for c in cols]
    fdp = fd_param_jacobian(model, feeds, names, load(model).initializers)
    assert rel_err(G.reshape(fdp.shape), fdp) < 1e-6


def test_batchnorm_statistics_tied_to_parameters():
    """TorchScript ties a fresh BatchNormalization's running variance to its scale (both ones) and
    its running mean to its bias (both zeros) through Identity nodes: the copies are buffers
    apart (model.identities_untied), as in the model exported, so the parameter Jacobian does
    not follow them (as torch.func's does not); and the statistics stay buffers when they are
    initializers."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 3).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "bias")]
    nodes = [helper.make_node("Identity", ["scale"], ["var"]), helper.make_node("Identity", ["bias"], ["mean"]),
             helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-3)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    feeds = {"x": rng.standard_normal((N, 3, 2))}
    G, cols = jaccli.param_jacobian(model, feeds, dtype=np.float64)
    assert [c["name"] for c in cols] == ["scale", "bias"]
    fd = fd_param_jacobian(model, feeds, ["scale", "bias"], load(model).initializers)
    assert rel_err(G.reshape(fd.shape), fd) < 1e-6
    scale, bias = (numpy_helper.to_array(t).astype(np.float64) for t in inits)
    xhat = (feeds["x"] - bias[:, None]) / np.sqrt(scale[:, None] + 1e-3)  # the statistics held: xhat, not half of it
    np.testing.assert_allclose(G[..., :3], np.einsum("ncp,cj->ncpj", xhat, np.eye(3)), rtol=1e-6, atol=1e-6)
    J = jaccli.input_jacobian(model, feeds, dtype=np.float64, flat=True)
    assert rel_err(J, fd_input_jacobian(model, feeds, "x")) < 1e-6
    from gradcheck import check_rule

    from jaccli.rules import lookup

    stats = [rng.standard_normal(3), rng.uniform(0.5, 1.5, 3)]
    check_rule(lookup("BatchNormalization", 15), [feeds["x"], rng.uniform(0.5, 1.5, 3), rng.standard_normal(3), *stats],
               {"epsilon": 1e-3}, [0, 1, 2, 3, 4], rng)
    # spatial=0 (opsets 1-8): every statistic per activation, (C, P)
    act = [rng.uniform(0.5, 1.5, (3, 2)), rng.standard_normal((3, 2)), rng.standard_normal((3, 2)), rng.uniform(0.5, 1.5, (3, 2))]
    check_rule(lookup("BatchNormalization", 7), [feeds["x"], *act], {"epsilon": 1e-3, "spatial": 0}, [0, 1, 2, 3, 4], rng)


@pytest.mark.parametrize("mask", ["Where", "Imputer", "Mul"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_a_discarded_branch_stays_zero(mask, mode):
    """sqrt(x) computed everywhere, then kept only where x > 0: by a Where (torch.where), by an
    Imputer replacing its NaN (scikit-learn's power transform), or by a product with the
    condition. Where it is discarded, the derivative is 0, not IEEE's 0 * NaN; elsewhere
    1 / (2 sqrt(x))."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Sqrt", ["x"], ["r"]), helper.make_node("Greater", ["x", "zero"], ["pos"])]
    if mask == "Where":
        nodes.append(helper.make_node("Where", ["pos", "r", "zero"], ["y"]))
    elif mask == "Imputer":
        nodes.append(helper.make_node("Imputer", ["r"], ["y"], domain="ai.onnx.ml", imputed_value_floats=[0.0],
                                      replaced_value_float=float("nan")))
    else:  # the condition as a float times an imputed branch: a region of pointwise steps
        nodes += [helper.make_node("Imputer", ["r"], ["ri"], domain="ai.onnx.ml", imputed_value_floats=[0.0],
                                   replaced_value_float=float("nan")),
                  helper.make_node("Cast", ["pos"], ["m"], to=TensorProto.FLOAT), helper.make_node("Mul", ["ri", "m"], ["y"])]
    g = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    x = np.array([[1.0, -2.0, 0.25, -0.5], [-1.0, 4.0, -3.0, 9.0]])
    J = jaccli.input_jacobian(m, x, mode=mode, dtype=np.float64)
    expected = np.stack([np.diag(np.where(v > 0, 0.5 / np.sqrt(np.abs(v)), 0.0)) for v in x])
    np.testing.assert_allclose(J, expected, rtol=1e-12)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_a_row_masked_whole_stays_zero(op, mode):
    """Attention scores with a row masked whole (every entry -inf, a padded query): the softmax
    of that row is NaN, and a Where puts zeros in its place, as torch's safe softmax and onnx's
    Attention function do. Its cotangent row is zero and must stay so: it was NaN in reverse
    mode (S times the row's sum, 0 * NaN), and spread to every input through the products."""
    from onnx import TensorProto, helper, numpy_helper

    T, D = 4, 3
    rng = np.random.default_rng(3)
    mask = np.zeros((T, T), np.float32)
    mask[1] = -np.inf
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["x", "xt"], ["s"]),
             helper.make_node("Add", ["s", "mask"], ["sm"]), helper.make_node(op, ["sm"], ["p"], axis=-1),
             helper.make_node("IsNaN", ["p"], ["bad"]), helper.make_node("Where", ["bad", "zero", "p"], ["q"]),
             helper.make_node("MatMul", ["q", "x"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])]
    inits = {"mask": mask, "zero": np.array(0.0, np.float32), "W": rng.standard_normal((D, 2)).astype(np.float32)}
    g = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    x = rng.standard_normal((N, T, D))
    J = jaccli.input_jacobian(m, x, mode=mode, dtype=np.float64, flat=True)
    assert np.isfinite(J).all() and rel_err(J, fd_input_jacobian(m, {"x": x}, "x")) < 1e-6
    if mode == "reverse":
        G, _ = jaccli.param_jacobian(m, x, dtype=np.float64)
        fd = fd_param_jacobian(m, {"x": x}, ["W"], inits)
        assert np.isfinite(G).all() and rel_err(G.reshape(fd.shape), fd) < 1e-6


@pytest.mark.parametrize("lo,hi", [(0.05, 1.0), (-0.5, 1.5)], ids=["slopes-in-0-1", "slopes-beyond"])
def test_prelu_either_way(lo, hi):
    """PRelu with per-channel slopes (InsightFace's ResNets): with every slope in (0, 1] its
    forward is max(X, slope X) and its partials are products by 0 and 1 (numpy's where picks with
    a branch per element, 13x slower on a random sign); otherwise where. Forward against
    onnxruntime, both modes and the slopes' per-sample Jacobian against differences; and the
    same values as where, bit for bit, infinities and NaN included."""
    from gradcheck import check_whole_model, one_input_model

    from jaccli.rules import lookup

    rng = np.random.default_rng(7)
    slope = rng.uniform(lo, hi, (4, 1, 1)).astype(np.float32)
    x = rng.standard_normal((N, 4, 3, 3))
    x = np.where(np.abs(x) < 0.1, 0.1 + np.abs(x), x)  # away from the kink
    m = one_input_model([helper.make_node("PRelu", ["x", "slope"], ["y"])], {"slope": slope}, (4, 3, 3), opset=16)
    assert check_whole_model(m, x) == ["slope"]
    rule = lookup("PRelu", 16)
    v = np.concatenate([x.ravel()[:33], [0.0, -0.0, np.inf, -np.inf, np.nan]]).astype(np.float32).reshape(-1, 1, 1)
    for X in (x.astype(np.float32), v):
        S = slope if X.ndim == 4 else slope[:1]
        with np.errstate(invalid="ignore"):  # NaN in, NaN out
            np.testing.assert_array_equal(rule.forward(X, S), np.where(X > 0, X, X * S))
            pos = X > 0
            for got, want in zip(rule.partials(X, S, None, True, True), (np.where(pos, 1, S).astype(X.dtype), np.where(pos, 0, X))):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_hard_activations_derivatives_are_where_s(dtype):
    """HardSwish's and HardSigmoid's derivatives without numpy's where (a branch per element,
    6x slower on random signs) give where's values bit for bit: at the ends of the linear
    piece (HardSwish's -3 and 3), at signed zeros, infinities and NaN."""
    from jaccli.rules import lookup

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(500) * 4, [-3, 3, 0, -0.0, -2.999, 2.999, 1e-30, -1e-30, np.nan, np.inf, -np.inf]])
    for X in (x[:-3].astype(dtype), x.astype(dtype)):  # the finite way, and the one with NaN and infinities
        with np.errstate(invalid="ignore"):
            want = np.where(X <= -3, 0, np.where(X >= 3, 1, X / 3 + 0.5)).astype(dtype)
            np.testing.assert_array_equal(lookup("HardSwish", 14).deriv(X, None), want)
            assert np.array_equal(np.signbit(lookup("HardSwish", 14).deriv(X, None)), np.signbit(want))
        rule = lookup("HardSigmoid", 6)
        Y = rule.forward(X, alpha=0.2, beta=0.5)
        np.testing.assert_array_equal(rule.deriv(X, Y, alpha=0.2, beta=0.5), np.where((Y > 0) & (Y < 1), 0.2, 0).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_elu_family_without_where(dtype):
    """Elu, Selu and Celu without numpy's where (a branch per element): the forward is where's
    values bit for bit (zeros up to their sign), and the derivative is 1 above 0 and the slope
    alpha * exp(X) below, within rounding of the exact one, at the kink, at infinities and NaN;
    below -17 in float32 too, where Y + alpha (the old slope) cancelled to 0."""
    from jaccli.rules import lookup

    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(500) * 4, [-20, -40, 0, -0.0, 1e-30, -1e-30, np.nan, np.inf, -np.inf]])
    X = x.astype(dtype)
    cases = [("Elu", 6, {"alpha": 1.0}, 1.0, 1.0, 1.0), ("Elu", 6, {"alpha": 0.3}, 0.3, 1.0, 1.0),
             ("Selu", 6, {"alpha": 1.6733, "gamma": 1.0507}, 1.6733, 1.0, 1.0507), ("Celu", 12, {"alpha": 2.0}, 2.0, 2.0, 1.0)]
    for op, opset, attrs, alpha, scale, gamma in cases:
        rule = lookup(op, opset)
        with np.errstate(invalid="ignore", over="ignore"):
            a, c, g = (dtype(v) for v in (alpha, scale, gamma))
            Y = rule.forward(X, **attrs)
            want = g * np.where(X > 0, X, a * np.expm1(np.minimum(X, 0) / c))
            np.testing.assert_array_equal(Y, want, err_msg=op)
            x64 = X.astype(np.float64)
            slope = gamma * np.where(x64 > 0, 1.0, alpha / scale * np.exp(np.minimum(x64, 0) / scale))
            got = rule.deriv(X, Y, **attrs)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, slope, rtol=4 * np.finfo(dtype).eps, atol=np.finfo(dtype).smallest_subnormal, err_msg=op)


@pytest.mark.parametrize("square", ["Mul", "Pow"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_the_standard_deviation_of_a_dead_channel(square, mode):
    """Statistics pooling, as an x-vector ends (transformers' Wav2Vec2ForXVector): mean and
    standard deviation over time of ReLU features, the deviation exported as
    Sqrt(ReduceMean((h - mean)^2) * n / (n - 1)). A channel that is dead at every step is
    constant near the data, so its deviation's derivative is 0; but the square root's
    derivative at 0 is inf, and every entry of the Jacobian was NaN in reverse mode
    (inf * 0 at the square's partial), in forward mode too where the pointwise steps are one
    product (0 * inf). Against differences, in both modes, and the parameters'."""
    from onnx import TensorProto, helper, numpy_helper

    T, C = 5, 3
    rng = np.random.default_rng(4)
    inits = {"W": rng.standard_normal((2, C)).astype(np.float32), "b": np.array([0.1, -50.0, 0.2], np.float32),
             "n": np.array(T / (T - 1), np.float32), "two": np.array(2.0, np.float32), "V": rng.standard_normal((2 * C, 2)).astype(np.float32)}
    sq = (helper.make_node("Mul", ["d", "d"], ["d2"]) if square == "Mul" else helper.make_node("Pow", ["d", "two"], ["d2"]))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("Relu", ["ab"], ["h"]),  # (N, T, C), channel 1 dead
             helper.make_node("ReduceMean", ["h"], ["mu"], axes=[1], keepdims=1), helper.make_node("Sub", ["h", "mu"], ["d"]), sq,
             helper.make_node("ReduceMean", ["d2"], ["var"], axes=[1], keepdims=0), helper.make_node("Mul", ["var", "n"], ["v"]),
             helper.make_node("Sqrt", ["v"], ["sd"]), helper.make_node("ReduceMean", ["h"], ["m"], axes=[1], keepdims=0),
             helper.make_node("Concat", ["m", "sd"], ["stats"], axis=1), helper.make_node("MatMul", ["stats", "V"], ["y"])]
    g = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    x = rng.standard_normal((N, T, 2))
    J = jaccli.input_jacobian(m, x, mode=mode, dtype=np.float64, flat=True)
    assert np.isfinite(J).all() and rel_err(J, fd_input_jacobian(m, {"x": x}, "x")) < 1e-6
    if mode == "reverse":
        G, _ = jaccli.param_jacobian(m, x, dtype=np.float64, params=["W", "b", "V"])
        fd = fd_param_jacobian(m, {"x": x}, ["W", "b", "V"], inits)
        assert np.isfinite(G).all() and rel_err(G.reshape(fd.shape), fd) < 1e-6


@pytest.mark.parametrize("p", [1, 2])
def test_a_zero_vector_normalized_stays_zero(p):
    """LpNormalization of a zero vector: zero, as onnxruntime gives it (it was 0 / 0, NaN), with
    a zero derivative in both modes (none exists there; reverse mode said NaN, forward mode 0);
    the other vectors' derivatives against differences."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("LpNormalization", ["x"], ["y"], axis=-1, p=p)], "lp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    x = np.random.default_rng(4).standard_normal((N, 2, 3)) + 0.1
    x[1, 0] = 0.0
    ref, _ = ort_forward(m, {"x": x.astype(np.float32)})
    ours = our_forward(m, {"x": x}, np.float32)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert not ours[1, 0].any()
    fd = fd_input_jacobian(m, {"x": x}, "x")
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x, mode=mode, dtype=np.float64, flat=True)
        assert np.isfinite(J).all() and not J[1, :3].any() and not J[1, :, :3].any()
        others = np.ones_like(J, bool)
        others[1, :3] = others[1, :, :3] = False
        assert rel_err(J[others], fd[others]) < 1e-6


def test_an_integer_exponent_keeps_float32_work_in_float32():
    """torch's x ** 3 exports Pow with an int64 exponent: its partial must not turn the float32
    cotangents into float64, which a per-sample weight cotangent written in place refuses."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Pow", ["h", "three"], ["y"])]
    g = helper.make_graph(nodes, "pow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "W"),
                           numpy_helper.from_array(np.array(3, np.int64), "three")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    G32, _ = jaccli.param_jacobian(m, x)
    G64, _ = jaccli.param_jacobian(m, x, dtype="float64")
    assert G32.dtype == np.float32
    assert rel_err(G32.astype(np.float64), G64) < 1e-5


def test_scatter_reductions_at_ties_and_zeros():
    """Where random data never goes: two updates tie for a max (the first takes the derivative,
    so that moving both moves the result once), and a product with a zero factor (the partial in
    that factor is the product of the others; in the others, zero)."""
    from jaccli.rules import Ctx
    from jaccli.rules.shape import _REDUCE_AT, _reduce_partials

    X, U = np.array([0.0, 1.0, 2.0]), np.array([5.0, 5.0, 3.0])
    ix = (np.array([0, 0, 2]),)
    for reduction, Y, want_d, want_u in (
        ("max", [5.0, 1.0, 3.0], [0, 1, 0], [1, 0, 1]),
        ("mul", [0.0, 1.0, 6.0], [25, 1, 3], [0, 0, 2]),
    ):
        y = X.copy()
        _REDUCE_AT[reduction].at(y, ix, U)
        np.testing.assert_array_equal(y, Y)
        Pd, Pu = _reduce_partials(Ctx((X, None, U), (y,)), ix, reduction)
        np.testing.assert_array_equal(Pd, want_d)
        np.testing.assert_array_equal(Pu, want_u)


@pytest.mark.parametrize("exclusive, reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_running_products_through_zeros(exclusive, reverse):
    """CumProd where random data never goes: zeros, one and two in a row. Each partial is the
    product of the other factors of that running product, computed here by its definition; and
    the per-sample Jacobian of a scale in front (x * p), whose cotangent keeps the sample axis."""
    x = np.array([[2.0, 0.0, 3.0, 0.5, -1.5], [0.0, 0.0, 1.5, 2.0, 0.7]])
    L = x.shape[1]
    want = np.zeros((2, L, L))
    for n in range(2):
        for k in range(L):
            members = [i for i in (range(k, L) if reverse else range(k + 1)) if not (exclusive and i == k)]
            for j in members:
                want[n, k, j] = np.prod([x[n, i] for i in members if i != j])
    nodes = [helper.make_node("Mul", ["x", "p"], ["z"]), helper.make_node("CumProd", ["z", "axis"], ["y"], exclusive=exclusive, reverse=reverse)]
    g = helper.make_graph(nodes, "cumprod", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", L])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.ones(L, np.float32), "p"), numpy_helper.from_array(np.array(1, np.int64), "axis")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 26)])
    for mode in ("forward", "reverse"):
        np.testing.assert_allclose(jaccli.input_jacobian(m, x, dtype=np.float64, mode=mode), want, atol=1e-15)
    G, _ = jaccli.param_jacobian(m, x, dtype=np.float64)
    np.testing.assert_allclose(G, want * x[:, None, :], atol=1e-15)  # dz_j/dp_j = x_j at p = 1


@pytest.mark.parametrize("output", [1, 2])
def test_multi_head_attention_present_outputs(output):
    """MultiHeadAttention's present_key and present_value (K and V by head, the bias added) as the
    graph's output: their Jacobians come through the key's and value's tangents alone, and in
    reverse mode through the cotangents of those outputs with none for the attention's."""
    case = next(c for c in CASES if c.id == "ms-MultiHeadAttention-cross-bias")
    case = Case(case.op, case.inputs, case.attrs, case.opset, outputs=3, domain=case.domain, id="present")
    m, feeds = build(case)
    m.graph.output[0].name = f"out{output}"
    want = fd_input_jacobian(m, feeds, "in1")
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, feeds, dtype=np.float64, wrt="in1", mode=mode, flat=True)
        assert rel_err(J, want) < 1e-6
    names = [i.name for i in m.graph.initializer]
    G, _ = jaccli.param_jacobian(m, feeds, dtype=np.float64, params=names)
    from onnx import numpy_helper as nh
    inits = {i.name: nh.to_array(i).astype(np.float64) for i in m.graph.initializer}
    assert rel_err(G.reshape(want.shape[0], -1, G.shape[-1]), fd_param_jacobian(m, feeds, names, inits).reshape(want.shape[0], -1, G.shape[-1])) < 1e-6


@pytest.mark.parametrize("a, b", [((3, 2, 5), (5, 3)), ((2, 5), (3, 5, 4)), ((5,), (3, 5, 4)), ((3, 2, 5), (5,)), ((4, 5), (5,)),
                                  ((5,), (5, 3)), ((5,), (5,)), ((2, 3, 4, 5), (5, 3)), ((3, 1, 2, 5), (4, 5, 3))])
def test_matmul_rule_in_both_operands(a, b):
    """MatMul with tangents on both operands, whatever their ranks: a weight shared by a batch of
    matrices, a vector against a batch (forward mode through a parameter had paired the
    directions with the batch)."""
    from gradcheck import check_rule

    from jaccli.rules import lookup

    rng = np.random.default_rng(3)
    check_rule(lookup("MatMul", 13), [rng.standard_normal(a), rng.standard_normal(b)], {}, diff=(0, 1), rng=rng)


def test_a_bfloat16_weight_is_a_parameter():
    """A bfloat16 initializer (numpy holds it as an opaque type) is read as float32: the MatMul's
    weight is then a parameter like any other, its per-sample Jacobian the sample's features."""
    W = helper.make_tensor("W", TensorProto.BFLOAT16, [3, 2], [0.5, -1.0, 2.0, 0.25, 1.5, -0.75])
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16), helper.make_node("MatMul", ["xb", "W"], ["h"]),
             helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [W])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    G, cols = jaccli.param_jacobian(m, x)
    assert [c["name"] for c in cols] == ["W"]
    want = np.einsum("ni,jk->njik", x, np.eye(2)).reshape(2, 2, 6)
    np.testing.assert_allclose(G, want, rtol=1e-6)
    np.testing.assert_allclose(jaccli.input_jacobian(m, x), np.broadcast_to(numpy_helper.to_array(W).astype(np.float32).T, (2, 2, 3)))


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_max_pool_follows_the_first_maximum(mode):
    """Each window's derivative follows its first maximum, as onnxruntime's Indices do: windows
    of tied values (small integers), and windows whose values are all -inf, tied with the padding,
    where the padding never wins. The input Jacobian is one-hot at onnxruntime's index, in both modes."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (3, 2, 5, 6)).astype(np.float32)
    x[0, 0, :2] = -np.inf  # the first row of windows: all -inf, the padding's offsets first
    from gradcheck import one_input_model

    node = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    model = one_input_model([node], {}, (2, 5, 6), opset=12)
    model.graph.output.append(helper.make_tensor_value_info("i", TensorProto.INT64, None))
    y, i = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.isneginf(y[0, 0, 0]).all()
    J = jaccli.input_jacobian(model, {"x": x}, of="y", mode=mode, dtype=np.float64, flat=True)  # (N, 18, 60)
    want = np.zeros(J.shape)
    n, j = np.indices(i.reshape(len(x), -1).shape)
    want[n, j, i.reshape(len(x), -1) - n * x[0].size] = 1
    np.testing.assert_array_equal(J, want)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_max_pool_window_of_padding_only(mode):
    """Pads as large as the kernel (onnxruntime refuses them, the spec does not): a window of
    padding only is -inf whatever the input, its Jacobian row zero; the others one-hot at their
    maximum."""
    from gradcheck import one_input_model

    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[1, 1], pads=[2, 0, 0, 0])
    model = one_input_model([node], {}, (1, 4, 4), opset=12)
    J = jaccli.input_jacobian(model, {"x": x}, mode=mode, dtype=np.float64, flat=True)  # (N, 5 * 3, 16)
    rows = J.reshape(2, 5, 3, 16)
    assert not rows[:, 0].any()
    np.testing.assert_array_equal(np.abs(rows[:, 1:]).sum(axis=-1), 1)
    xp = np.pad(x[:, 0], ((0, 0), (2, 0), (0, 0)), constant_values=-np.inf)
    y = np.lib.stride_tricks.sliding_window_view(xp, (2, 2), axis=(1, 2)).max(axis=(-2, -1))  # (N, 5, 3)
    np.testing.assert_array_equal(np.einsum("njk,nk->nj", J, x.reshape(2, -1))[:, 3:], y.reshape(2, -1)[:, 3:])


def _sequences_model(cell, direction, S, I, H):
    """One recurrent node in layout 0 (onnxruntime's) between Transposes: x (N, S, I), initial
    states (N, D, H) and per-sample sequence lengths in; out, (N, -1): its output sequence and
    final states, samples first, flattened and joined."""
    G, D = {"LSTM": 4, "GRU": 3, "RNN": 1}[cell], 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(11)
    inits = {"W": rng.standard_normal((D, G * H, I)) / 2, "R": rng.standard_normal((D, G * H, H)) / 2,
             "B": rng.standard_normal((D, 2 * G * H)) / 2}
    states = ["h0", "c0"] if cell == "LSTM" else ["h0"]
    outs = ["Y", "Yh", "Yc"] if cell == "LSTM" else ["Y", "Yh"]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2])]
    nodes += [helper.make_node("Transpose", [s], [s + "t"], perm=[1, 0, 2]) for s in states]
    nodes.append(helper.make_node(cell, ["xt", "W", "R", "B", "lens"] + [s + "t" for s in states], [o + "t" for o in outs],
                                  hidden_size=H, direction=direction))
    for o in outs:
        nodes += [helper.make_node("Transpose", [o + "t"], [o + "n"], perm=[2, 0, 1, 3] if o == "Y" else [1, 0, 2]),
                  helper.make_node("Flatten", [o + "n"], [o + "f"])]
    nodes.append(helper.make_node("Concat", [o + "f" for o in outs], ["out"], axis=1))
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", S, I]), helper.make_tensor_value_info("lens", TensorProto.INT32, ["N"])]
    ins += [helper.make_tensor_value_info(s, TensorProto.FLOAT, ["N", D, H]) for s in states]
    g = helper.make_graph(nodes, "m", ins, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    feeds = {"x": rng.standard_normal((N, S, I)), "lens": np.array([S, 0, S - 2], np.int32)}
    feeds.update({s: rng.standard_normal((N, D, H)) for s in states})
    return m, feeds, inits, states


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_recurrent_sequences_shorter_than_the_input(cell, direction):
    """sequence_lens (tf2onnx writes them for a Keras mask): a sequence takes no step past its
    end, its state held and its outputs zeros there, the reverse direction starting at its
    last step; an empty one's final states are zeros, as onnxruntime gives them. Forward
    against onnxruntime; Jacobians in the input, the initial states and the weights against
    differences."""
    m, feeds, inits, states = _sequences_model(cell, direction, S=5, I=3, H=2)
    want, oracle = ort_forward(m, feeds)
    assert oracle == "onnxruntime"
    np.testing.assert_allclose(our_forward(m, feeds, np.float32), want, rtol=1e-5, atol=1e-5)
    for wrt in ["x", *states]:
        for mode in ("forward", "reverse"):
            J = jaccli.input_jacobian(m, feeds, wrt=wrt, mode=mode, dtype=np.float64, flat=True)
            assert rel_err(J, fd_input_jacobian(m, feeds, wrt)) < 1e-6, (wrt, mode)
    G, cols = jaccli.param_jacobian(m, feeds, dtype=np.float64)
    names = [c["name"] for c in cols]
    assert names == list(inits)
    fd = fd_param_jacobian(m, feeds, names, load(m).initializers)
    assert rel_err(G.reshape(fd.shape), fd) < 1e-6


@pytest.mark.parametrize("ctm", ["tf_crop_and_resize", "half_pixel"])
def test_a_resize_roi_that_is_differentiated(ctm):
    """Only tf_crop_and_resize reads Resize's roi. A roi differentiated (here a second input,
    one box for all the samples) has a derivative there, the crop box's, which is not written:
    refused in one line rather than given as zero. Any other mode ignores the roi: its
    derivative is zero. A roi that is a constant is never a parameter (tf2onnx's crop boxes are
    float constants joined by a Concat), and the image's Jacobian is as differences give it."""
    from gradcheck import one_input_model

    rng = np.random.default_rng(3)
    node = helper.make_node("Resize", ["x", "roi", "", "sizes"], ["r"], mode="linear", axes=[2, 3],
                            coordinate_transformation_mode=ctm)
    inits = {"one": np.array([1.0, 1.0], np.float32), "sizes": np.array([4, 5], np.int64),
             "W": rng.standard_normal((5, 2)).astype(np.float32)}
    nodes = [helper.make_node("Concat", ["box", "one"], ["roi"], axis=0), node, helper.make_node("MatMul", ["r", "W"], ["y"])]
    model = one_input_model(nodes, inits, (2, 3, 6), opset=18)
    model.graph.input.append(helper.make_tensor_value_info("box", TensorProto.FLOAT, [2]))
    feeds = {"x": rng.standard_normal((N, 2, 3, 6)), "box": np.array([0.1, -0.2], np.float32)}
    J = jaccli.input_jacobian(model, feeds, dtype=np.float64, flat=True, sample_axes={"box": None})
    assert rel_err(J, fd_input_jacobian(model, feeds, "x")) < 1e-6
    assert [c["name"] for c in jaccli.param_jacobian(model, feeds, sample_axes={"box": None})[1]] == ["W"]
    if ctm == "tf_crop_and_resize":
        with pytest.raises(jaccli.errors.UnsupportedOpError, match="roi") as e:
            jaccli.input_jacobian(model, feeds, wrt="box", sample_axes={"box": None})
        assert "\n" not in str(e.value)
    else:
        assert not jaccli.input_jacobian(model, feeds, wrt="box", sample_axes={"box": None}).any()
