"""com.microsoft operators. onnxruntime's fusions for a diffusion model's UNet and VAE (optimize_model
with model_type "unet" or "vae", as optimized Stable Diffusion exports ship): NhwcConv, GroupNorm,
SkipGroupNorm, BiasSplitGelu and BiasAdd, which onnxruntime runs on CUDA only. Each one-node
model's forward is checked against onnxruntime running the standard operators it fuses, and its
input and per-sample parameter Jacobians against central differences of jaccli's float64 forward.
And the older contrib operators that the default domain took over later, against onnxruntime's
own kernels of them."""

import numpy as np
import pytest
from gradcheck import fd_input_jacobian, fd_param_jacobian, our_forward, rel_err
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.model import load

RNG = np.random.default_rng(11)
MS = "com.microsoft"


def _model(nodes, inputs, inits, opset=21):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = 10
    return m


def _ort(model, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(["y"], {k: v.astype(np.float32) for k, v in feeds.items()})[0]


def _check(fused, standard, feeds, wrt="x"):
    """The fused model's forward against onnxruntime's of the standard one; its input Jacobian
    in both modes and its per-sample parameter Jacobian against differences of its forward."""
    np.testing.assert_allclose(our_forward(fused, feeds, np.float32), _ort(standard, feeds), rtol=2e-5, atol=2e-5)
    fd = fd_input_jacobian(fused, feeds, wrt)
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(fused, feeds, wrt=wrt, mode=mode, dtype=np.float64, flat=True)
        assert rel_err(J, fd) < 1e-6, mode
    G, cols = jaccli.param_jacobian(fused, feeds, dtype=np.float64)
    names = [c["name"] for c in cols]
    fdp = fd_param_jacobian(fused, feeds, names, load(fused).initializers, n=len(feeds[wrt]))
    assert rel_err(G.reshape(fdp.shape), fdp) < 1e-6
    return names


@pytest.mark.parametrize("group,strides", [(1, [1, 1]), (2, [2, 1])])
def test_nhwc_conv(group, strides):
    """Conv on channels-last data, its weight (M, kh, kw, C/group) as the optimizer transposes it."""
    W = RNG.standard_normal((4, 3, 3, 4 // group))
    B = RNG.standard_normal(4)
    conv = dict(kernel_shape=[3, 3], pads=[1, 0, 1, 1], strides=strides, group=group)
    fused = _model([helper.make_node("NhwcConv", ["x", "W", "B"], ["y"], domain=MS, **conv)], [("x", ["N", 5, 6, 4])],
                   {"W": W, "B": B})
    standard = _model([helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2]),
                       helper.make_node("Conv", ["xc", "Wc", "B"], ["yc"], **conv),
                       helper.make_node("Transpose", ["yc"], ["y"], perm=[0, 2, 3, 1])], [("x", ["N", 5, 6, 4])],
                      {"Wc": W.transpose(0, 3, 1, 2), "B": B})
    assert _check(fused, standard, {"x": RNG.standard_normal((3, 5, 6, 4))}) == ["W", "B"]


def _group_norm(src, out, activation, channels_last):
    """The standard operators of a GroupNorm of `src`: (transposed,) GroupNormalization-21, (SiLU)."""
    nodes, x = [], src
    if channels_last:
        nodes.append(helper.make_node("Transpose", [x], [x + "c"], perm=[0, 3, 1, 2]))
        x = x + "c"
    nodes.append(helper.make_node("GroupNormalization", [x, "gamma", "beta"], ["u"], epsilon=1e-3, num_groups=2))
    y = "u"
    if activation:
        nodes += [helper.make_node("Sigmoid", ["u"], ["sg"]), helper.make_node("Mul", ["u", "sg"], ["a"])]
        y = "a"
    nodes.append(helper.make_node("Transpose", [y], [out], perm=[0, 2, 3, 1]) if channels_last else helper.make_node("Identity", [y], [out]))
    return nodes


@pytest.mark.parametrize("activation,channels_last", [(0, 1), (1, 1), (1, 0)])
def test_group_norm(activation, channels_last):
    """GroupNorm over groups of channels, channels last by default, SiLU with activation=1."""
    shape = ["N", 3, 4, 6] if channels_last else ["N", 6, 3, 4]
    inits = {"gamma": 1 + 0.3 * RNG.standard_normal(6), "beta": RNG.standard_normal(6)}
    attrs = dict(epsilon=1e-3, groups=2, activation=activation, channels_last=channels_last)
    fused = _model([helper.make_node("GroupNorm", ["x", "gamma", "beta"], ["y"], domain=MS, **attrs)], [("x", shape)], inits)
    standard = _model(_group_norm("x", "y", activation, channels_last), [("x", shape)], inits)
    x = RNG.standard_normal([3] + shape[1:])
    assert _check(fused, standard, {"x": x}) == ["gamma", "beta"]


@pytest.mark.parametrize("skip_rank,sum_read", [(4, False), (2, True)])
def test_skip_group_norm(skip_rank, sum_read):
    """s = x + skip + bias, then GroupNorm with SiLU; the sum s as a second output that the next
    node reads (a residual). The skip per pixel, or per channel only (N, C): a time embedding."""
    inits = {"gamma": 1 + 0.3 * RNG.standard_normal(6), "beta": RNG.standard_normal(6), "bias": RNG.standard_normal(6)}
    shape = ["N", 3, 4, 6]
    skip_shape = shape if skip_rank == 4 else ["N", 6]
    outs = ["g", "s"] if sum_read else ["g"]
    tail = [helper.make_node("Mul", ["g", "s"], ["y"])] if sum_read else [helper.make_node("Identity", ["g"], ["y"])]
    fused = _model([helper.make_node("SkipGroupNorm", ["x", "gamma", "beta", "skip", "bias"], outs, domain=MS, epsilon=1e-3,
                                     groups=2, activation=1, channels_last=1)] + tail,
                   [("x", shape), ("skip", skip_shape)], inits)
    k = "skip"
    pre = []
    if skip_rank == 2:
        pre = [helper.make_node("Unsqueeze", ["skip", "axes"], ["skip4"])]
        k = "skip4"
    standard = _model(pre + [helper.make_node("Add", ["x", k], ["xs"]), helper.make_node("Add", ["xs", "bias"], ["s"])]
                      + _group_norm("s", "g", 1, 1) + tail, [("x", shape), ("skip", skip_shape)],
                      {**inits, **({"axes": np.array([1, 2])} if skip_rank == 2 else {})})
    if skip_rank == 2:  # the axes must stay int64
        standard.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([1, 2], np.int64), "axes"))
    feeds = {"x": RNG.standard_normal([3] + shape[1:]), "skip": RNG.standard_normal([3] + skip_shape[1:])}
    assert _check(fused, standard, feeds) == ["gamma", "beta", "bias"]
    fd = fd_input_jacobian(fused, feeds, "skip")
    assert rel_err(jaccli.input_jacobian(fused, feeds, wrt="skip", dtype=np.float64, flat=True), fd) < 1e-6


def test_bias_split_gelu():
    """Y = A * gelu(B), A and B the halves of x + bias: a GEGLU feed-forward."""
    bias = RNG.standard_normal(8)
    fused = _model([helper.make_node("BiasSplitGelu", ["x", "bias"], ["y"], domain=MS)], [("x", ["N", 3, 8])], {"bias": bias})
    standard = _model([helper.make_node("Add", ["x", "bias"], ["u"]), helper.make_node("Split", ["u"], ["a", "b"], axis=-1, num_outputs=2),
                       helper.make_node("Gelu", ["b"], ["gb"]), helper.make_node("Mul", ["a", "gb"], ["y"])],
                      [("x", ["N", 3, 8])], {"bias": bias})
    assert _check(fused, standard, {"x": RNG.standard_normal((3, 3, 8))}) == ["bias"]


def test_bias_add():
    """Y = x + bias + skip."""
    bias = RNG.standard_normal(4)
    fused = _model([helper.make_node("BiasAdd", ["x", "bias", "skip"], ["y"], domain=MS)], [("x", ["N", 3, 4]), ("skip", ["N", 3, 4])],
                   {"bias": bias})
    standard = _model([helper.make_node("Add", ["x", "bias"], ["u"]), helper.make_node("Add", ["u", "skip"], ["y"])],
                      [("x", ["N", 3, 4]), ("skip", ["N", 3, 4])], {"bias": bias})
    feeds = {"x": RNG.standard_normal((3, 3, 4)), "skip": RNG.standard_normal((3, 3, 4))}
    assert _check(fused, standard, feeds) == ["bias"]


# ---- contrib operators that the default domain took over later --------------------------------------


def _contrib(nodes, x_shape, inits, opset=13):
    """The nodes, their output scaled by a parameter s (so that every case has one)."""
    nodes = [helper.make_node(n.op_type, list(n.input), ["y0" if o == "y" else o for o in n.output], domain=n.domain,
                              **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in nodes]
    m = _model(nodes + [helper.make_node("Mul", ["y0", "s"], ["y"])], [("x", ["N", *x_shape])], {"s": [1.5]}, opset)
    m.graph.initializer.extend([numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return m


CONTRIB = {
    "TransposeMatMul": ([helper.make_node("TransposeMatMul", ["x", "W"], ["y"], domain=MS, transB=1, alpha=0.5)], (3, 4),
                        {"W": RNG.standard_normal((5, 4)).astype(np.float32)}),
    "GridSample": ([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]), helper.make_node("Tanh", ["t"], ["grid"]),
                    helper.make_node("GridSample", ["x", "grid"], ["y"], domain=MS, align_corners=0, padding_mode="border")],
                   (2, 4, 6), {}),
    "Trilu": ([helper.make_node("Trilu", ["x", "k"], ["y"], domain=MS, upper=0)], (3, 4), {"k": np.array(1, np.int64)}),
    "GatherND": ([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 2, 0]),
                  helper.make_node("GatherND", ["t", "idx"], ["g"], domain=MS), helper.make_node("Transpose", ["g"], ["y"], perm=[1, 0])],
                 (3, 4), {"idx": np.array([[0, 1], [2, 3], [2, 0]], np.int64)}),
    "Pad": ([helper.make_node("Pad", ["x", "pads", "v"], ["y"], domain=MS, mode="reflect")], (3, 4),
            {"pads": np.array([[0, 1, 2, 0, 1, 1]], np.int64), "v": np.array(0.0, np.float32)}),
    "Range": ([helper.make_node("Range", ["zero", "three"], ["r"], domain=MS), helper.make_node("Cast", ["r"], ["rf"], to=1),
               helper.make_node("Mul", ["x", "rf"], ["y"])], (3,), {"zero": np.array(0, np.int64), "three": np.array(3, np.int64)}),
    "ExpandDims": ([helper.make_node("ExpandDims", ["x", "axis"], ["e"], domain=MS), helper.make_node("Mul", ["e", "e"], ["y"])],
                   (3, 4), {"axis": np.array(-2, np.int32)}),
}


@pytest.mark.parametrize("op", sorted(CONTRIB))
def test_contrib_operators_the_default_domain_took_over(op):
    """com.microsoft's older TransposeMatMul, GridSample, Trilu, GatherND, Pad, Range and ExpandDims
    compute as onnxruntime's kernels of them do, and differentiate as the standard operators."""
    from gradcheck import check_whole_model

    nodes, shape, inits = CONTRIB[op]
    m = _contrib(nodes, shape, inits)
    assert [n.domain for n in m.graph.node if n.op_type == op] == [MS]
    check_whole_model(m, RNG.standard_normal((3, *shape)))


@pytest.mark.parametrize("metric", [None, "sqeuclidean", "euclidean"])
def test_cdist(metric):
    """CDist, as skl2onnx writes a nearest-neighbours model or a Gaussian process with
    optim="cdist": the distances from each sample to the training points, a parameter whose
    per-sample cotangents are each sample's own; forward as onnxruntime's kernel."""
    from gradcheck import check_rule, check_whole_model

    from jaccli.rules.contrib import CDist

    attrs = {} if metric is None else {"metric": metric}
    nodes = [helper.make_node("CDist", ["x", "train"], ["d"], domain=MS, **attrs), helper.make_node("Neg", ["d"], ["nd"]),
             helper.make_node("Exp", ["nd"], ["y"])]
    train = RNG.standard_normal((5, 3))
    m = _model(nodes, [("x", ["N", 3])], {"train": train}, opset=13)
    x = RNG.standard_normal((3, 3))  # gradcheck's three samples
    x[1] = train[3] + 0.1
    assert check_whole_model(m, x) == ["train"]
    check_rule(CDist, [x, train], attrs, diff=(0, 1), rng=RNG)  # both tangents at once, and the adjoint
