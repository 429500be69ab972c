"""ai.onnx.ml models as skl2onnx exports them: Scaler -> LinearClassifier with a probability tensor
output (no ZipMap), and LinearRegressor; forward against onnxruntime, Jacobians against differences."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from gradcheck import rel_err
from onnx import TensorProto, helper, numpy_helper

import jaccli

RNG = np.random.default_rng(3)


def classifier(n_classes, post, n_features=4):
    rows = 1 if n_classes == 2 else n_classes
    nodes = [
        helper.make_node("Scaler", ["x"], ["xs"], domain="ai.onnx.ml", offset=list(RNG.standard_normal(n_features)),
                         scale=list(RNG.uniform(0.5, 2, n_features))),
        helper.make_node("LinearClassifier", ["xs"], ["label", "probabilities"], domain="ai.onnx.ml",
                         coefficients=list(RNG.standard_normal(rows * n_features)), intercepts=list(RNG.standard_normal(rows)),
                         classlabels_ints=list(range(n_classes)), post_transform=post),
    ]
    g = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_features])],
                          [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                           helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("n_classes,post", [(3, "SOFTMAX"), (3, "LOGISTIC"), (3, "NONE"), (2, "LOGISTIC"), (2, "NONE")])
def test_linear_classifier_scores(n_classes, post):
    m = classifier(n_classes, post)
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    label, probs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    from jaccli import walk
    from jaccli.plan import Plan

    model = jaccli.load(m)
    env = walk.primal(Plan(model, "probabilities", [], np.float32), {"x": x})
    np.testing.assert_allclose(env["probabilities"], probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(env["label"], label)
    x64 = x.astype(np.float64)
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x64, of="probabilities", mode=mode, dtype="float64")
        fd = np.stack([(_probs(m, x64 + e) - _probs(m, x64 - e)) / 2e-6 for e in (np.eye(4)[j] * 1e-6 for j in range(4))], -1)
        assert rel_err(J, fd) < 1e-6


def _probs(m, x):
    from jaccli import walk
    from jaccli.plan import Plan

    model = jaccli.load(m)
    return walk.primal(Plan(model, "probabilities", [], np.float64), {"x": x})["probabilities"]


def test_classifier_through_the_cli(tmp_path):
    import onnx
    from click.testing import CliRunner

    from jaccli.cli import main

    onnx.save(classifier(3, "SOFTMAX"), tmp_path / "clf.onnx")
    np.save(tmp_path / "x.npy", RNG.standard_normal((6, 4)).astype(np.float32))
    r = CliRunner().invoke(main, ["input", str(tmp_path / "clf.onnx"), str(tmp_path / "x.npy"), "--of", "probabilities",
                                  "-o", str(tmp_path / "J.npy"), "-q"])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "J.npy").shape == (6, 3, 4)
    r = CliRunner().invoke(main, ["check", str(tmp_path / "clf.onnx"), str(tmp_path / "x.npy"), "--of", "probabilities"])
    assert r.exit_code == 0, r.output


def with_zipmap(n_classes=3):
    """As skl2onnx exports a classifier by default: the probabilities go through a ZipMap into a
    sequence of maps, and the only tensor output is the integer label."""
    from onnx import helper as h

    m = classifier(n_classes, "SOFTMAX")
    g = m.graph
    g.node.append(h.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                              classlabels_int64s=list(range(n_classes))))
    del g.output[1]
    seq = h.make_sequence_type_proto(h.make_map_type_proto(TensorProto.INT64, h.make_tensor_type_proto(TensorProto.FLOAT, [])))
    g.output.append(h.make_value_info("output_probability", seq))
    return m


def test_zipmap_models_differentiate_the_probabilities_it_maps(tmp_path):
    """A ZipMap's output (a map per sample) stands for the probabilities it reads: by default,
    by its name and by theirs, each the same Jacobian, against differences, with a note."""
    import onnx
    from click.testing import CliRunner

    from jaccli.cli import main

    zm = with_zipmap()
    onnx.save(zm, tmp_path / "zm.onnx")
    # its own generator: the data must not depend on which tests ran before (where the classifier
    # saturates, float32 differences of its probabilities are mostly rounding)
    np.save(tmp_path / "x.npy", np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32))
    x = np.load(tmp_path / "x.npy").astype(np.float64)
    fd = np.stack([(_probs(zm, x + e) - _probs(zm, x - e)) / 2e-6
                   for e in (np.eye(4)[j] * 1e-6 for j in range(4))], -1)
    for k, of in enumerate([[], ["--of", "output_probability"], ["--of", "probabilities"]]):
        r = CliRunner().invoke(main, ["input", str(tmp_path / "zm.onnx"), str(tmp_path / "x.npy"), *of,
                                      "-o", str(tmp_path / f"J{k}.npy"), "--json"])
        assert r.exit_code == 0, r.output
        notes = " ".join(json.loads(r.output)["notes"])
        assert ("'output_probability' is a ZipMap" in notes and "in the order 0, 1, 2" in notes) == (k < 2), notes
        J = np.load(tmp_path / f"J{k}.npy")
        assert J.shape == (5, 3, 4) and rel_err(J, fd) < 1e-4
    r = CliRunner().invoke(main, ["check", str(tmp_path / "zm.onnx"), str(tmp_path / "x.npy"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and [row["output"] for row in report["rows"]] == ["probabilities"]
    r = CliRunner().invoke(main, ["input", str(tmp_path / "zm.onnx"), str(tmp_path / "x.npy"), "--of", "label",
                                  "-o", str(tmp_path / "L.npy"), "--json"])
    assert r.exit_code == 0 and "'label' is int64[N], integers" in " ".join(json.loads(r.output)["notes"]), r.output
    assert not np.load(tmp_path / "L.npy").any()
    r = CliRunner().invoke(main, ["params", str(tmp_path / "zm.onnx"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "G.npy")])
    assert r.exit_code == 0, r.output  # the linear model's coefficients are parameters; the Scaler's are not
    names = [c["name"] for c in json.loads((tmp_path / "G.columns.json").read_text())["columns"]]
    assert names == ["label.coefficients", "label.intercepts"], names  # a node without a name: its first output's


def svm_regressor(kernel, n_supports=5, n_features=4, one_class=0):
    attrs = dict(coefficients=list(RNG.standard_normal(n_supports if n_supports else n_features)),
                 kernel_params=[0.3, 0.5, 3.0], kernel_type=kernel, n_supports=n_supports, rho=[0.25], one_class=one_class)
    if n_supports:
        attrs["support_vectors"] = list(RNG.standard_normal(n_supports * n_features))
    g = helper.make_graph([helper.make_node("SVMRegressor", ["x"], ["y"], domain="ai.onnx.ml", **attrs)], "svr",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_features])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("kernel,n_supports,one_class", [("RBF", 5, 0), ("POLY", 5, 0), ("SIGMOID", 5, 0), ("LINEAR", 5, 0),
                                                         ("LINEAR", 0, 0), ("RBF", 5, 1)])
def test_svm_regressor(kernel, n_supports, one_class):
    """skl2onnx's SVR: the kernels as onnxruntime computes them, and their input Jacobians."""
    from gradcheck import fd_input_jacobian, our_forward

    m = svm_regressor(kernel, n_supports, one_class=one_class)
    x = RNG.standard_normal((6, 4))
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.astype(np.float32)})[0]
    assert rel_err(our_forward(m, {"x": x[:3]}, np.float32), want[:3]) < 1e-5
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x[:3], dtype="float64", flat=True, mode=mode)
        fd = fd_input_jacobian(m, {"x": x[:3]}, "x")
        assert np.abs(J - fd).max() <= 1e-6 * max(1.0, np.abs(fd).max())


def test_array_feature_extractor_of_a_table_by_per_sample_indices():
    """A nearest-neighbours model reads its training targets (a parameter table) at per-sample
    indices through ArrayFeatureExtractor: each sample's parameter Jacobian is its own, nonzero
    at its indices; the forward is onnxruntime's."""
    from onnx import numpy_helper

    table = np.array([0.5, -1.0, 2.0], np.float32)
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"]),
             helper.make_node("ArrayFeatureExtractor", ["T", "i"], ["z"], domain="ai.onnx.ml"),
             helper.make_node("Reshape", ["z", "shape"], ["r"]), helper.make_node("Mul", ["r", "v"], ["y"])]
    g = helper.make_graph(nodes, "knn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(table, "T"), numpy_helper.from_array(np.array([2], np.int64), "k"),
                           numpy_helper.from_array(np.array([-1, 2], np.int64), "shape")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    r = jaccli.param_jacobian(m, x, return_result=True)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(r.outputs, sess.run(None, {"x": x})[0], rtol=1e-6)
    idx = np.argsort(-x, axis=1)[:, :2]
    expected = np.zeros((4, 2, 3), np.float32)
    for n in range(4):
        for j in range(2):
            expected[n, j, idx[n, j]] = x[n, idx[n, j]]  # d(table[i] * v) / d table[i] = v
    np.testing.assert_allclose(r.value, expected, rtol=1e-6)


_LE_INPUT = {"int": np.array([[3, 1], [7, 9], [4, 3]], np.int64), "float": np.array([[0.5, np.nan], [2.0, 7.5], [-1.0, 0.5]], np.float32),
             "str": np.array([["b", "a"], ["z", "q"], ["c", "b"]], object)}
_LE_ELEM = {"int": TensorProto.INT64, "float": TensorProto.FLOAT, "str": TensorProto.STRING}


@pytest.mark.parametrize("opset, kin, vout, attrs", [
    (2, "int", "float", dict(keys_int64s=[3, 7, 4, 8], values_floats=[1.5, 2.0, 3.0, 20.0])),  # IsolationForest's leaves
    (2, "int", "float", dict(keys_int64s=[3, 7], values_floats=[1.5, 2.0], default_float=-4.0)),
    (2, "str", "int", dict(keys_strings=["a", "b", "c", "a"], values_int64s=[10, 11, 12, 13], default_int64=-7)),
    (2, "float", "float", dict(keys_floats=[0.5, np.nan, 7.5], values_floats=[1.0, 2.0, 3.0])),  # NaN finds no key
    (4, "float", "float", dict(keys_floats=[0.5, np.nan, 7.5, 0.5], values_floats=[1.0, 2.0, 3.0, 4.0])),  # NaN its key; the first 0.5
    (2, "int", "str", dict(keys_int64s=[1, 3, 9], values_strings=["x", "y", "z"], default_string="none")),
    (1, "str", "int", dict(classes_strings=["a", "b", "c"], default_int64=-2)),
    (1, "int", "str", dict(classes_strings=["p", "q", "r", "s"], default_string="?")),
    (4, "int", "float", dict(keys_tensor=numpy_helper.from_array(np.array([3, 9, 4], np.int64)),
                             values_tensor=numpy_helper.from_array(np.array([0.25, 0.5, 0.75], np.float32)),
                             default_tensor=numpy_helper.from_array(np.array([9.0], np.float32)))),
    (4, "str", "int", dict(keys_tensor=numpy_helper.from_array(np.array(["a", "c"], object)),
                           values_tensor=numpy_helper.from_array(np.array([5, 6], np.int64)))),
])
def test_label_encoder_matches_onnxruntime(opset, kin, vout, attrs):
    """LabelEncoder in its forms (opset 1's classes, opset 2's key and value lists, opset 4's
    tensors; integers, floats with a NaN key (which matches from opset 4), a repeated key,
    strings; with and without defaults), as onnxruntime computes it; a float lookup's
    Jacobian is zero."""
    from gradcheck import our_forward

    x = _LE_INPUT[kin]
    node = helper.make_node("LabelEncoder", ["x"], ["y"], domain="ai.onnx.ml", **attrs)
    g = helper.make_graph([node], "le", [helper.make_tensor_value_info("x", _LE_ELEM[kin], [3, 2])],
                          [helper.make_tensor_value_info("y", _LE_ELEM[vout], [3, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", opset)])
    m.ir_version = 8
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = our_forward(m, {"x": x}, np.float32)
    assert got.dtype.kind == want.dtype.kind and got.shape == want.shape
    if vout == "float":
        np.testing.assert_array_equal(got, want)
    else:
        assert got.tolist() == want.tolist()
    if kin == vout == "float":
        assert not jaccli.input_jacobian(m, x[[0, 2]]).any()


def test_a_string_input_from_an_npz(tmp_path):
    """A pipeline with a float column and a string one (a ColumnTransformer's OneHotEncoder):
    the strings come from the .npz as a text array, and the Jacobian with respect to the
    float input flows around the categories. Strings saved as Python objects (pickled) are
    not loaded, and the message says how to save them; numbers for a string input are refused."""
    from click.testing import CliRunner

    from jaccli.cli import main

    W = RNG.standard_normal((4, 2)).astype(np.float32)
    nodes = [helper.make_node("OneHotEncoder", ["c"], ["h"], domain="ai.onnx.ml", cats_strings=["red", "green", "blue"]),
             helper.make_node("Reshape", ["h", "shape"], ["hf"]), helper.make_node("Concat", ["a", "hf"], ["z"], axis=1),
             helper.make_node("MatMul", ["z", "W"], ["y"])]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 1]),
                                           helper.make_tensor_value_info("c", TensorProto.STRING, ["N", 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    import onnx

    onnx.save(m, tmp_path / "m.onnx")
    a, c = RNG.standard_normal((5, 1)).astype(np.float32), np.array([["red"], ["blue"], ["teal"], ["green"], ["red"]])
    np.savez(tmp_path / "d.npz", a=a, c=c)
    run = lambda *args: CliRunner().invoke(main, [str(v) for v in args])  # noqa: E731
    r = run("input", tmp_path / "m.onnx", tmp_path / "d.npz", "--wrt", "a", "-o", tmp_path / "J.npy")
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "J.npy")[:, :, 0], np.broadcast_to(W[0], (5, 2)), rtol=1e-6)
    np.savez(tmp_path / "p.npz", a=a, c=c.astype(object))
    r = run("input", tmp_path / "m.onnx", tmp_path / "p.npz", "--wrt", "a", "-o", tmp_path / "J2.npy")
    assert r.exit_code == 1 and "dtype=str" in r.output and not (tmp_path / "J2.npy").exists(), r.output
    np.savez(tmp_path / "n.npz", a=a, c=np.ones((5, 1)))
    r = run("input", tmp_path / "m.onnx", tmp_path / "n.npz", "--wrt", "a", "-o", tmp_path / "J3.npy")
    assert r.exit_code == 1 and "takes strings" in r.output, r.output


@pytest.mark.parametrize("cats, dtype, zeros", [
    ("cats_int64s", np.int64, 1), ("cats_int64s", np.float32, 1), ("cats_strings", str, 1), ("cats_int64s", np.int64, 0),
])
def test_one_hot_encoder_matches_onnxruntime(cats, dtype, zeros):
    """scikit-learn's OneHotEncoder on categorical columns (a float column as its integer part; a
    value of no category all zeros, or refused with zeros=0); in a pipeline, the Jacobian of the
    other columns flows around it."""
    from gradcheck import our_forward

    from jaccli.errors import JaccliError

    values = [3, 1, 7, 4] if cats == "cats_int64s" else ["b", "a", "z", "c"]
    x = np.array([[1, 3], [7, 9], [4, 1]])
    x = x.astype(dtype) + (0.6 if dtype == np.float32 else 0) if dtype != str else np.array([["a", "b"], ["z", "q"], ["c", "a"]])
    elem = {np.int64: TensorProto.INT64, np.float32: TensorProto.FLOAT, str: TensorProto.STRING}[dtype]
    node = helper.make_node("OneHotEncoder", ["x"], ["y"], domain="ai.onnx.ml", zeros=zeros, **{cats: values})
    g = helper.make_graph([node], "ohe", [helper.make_tensor_value_info("x", elem, [3, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    if not zeros:  # 9 is no category
        with pytest.raises(JaccliError, match="none of the categories"):
            our_forward(m, {"x": x})
        return
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = our_forward(m, {"x": x}, np.float32)
    assert got.dtype == want.dtype and want.sum() == 5
    np.testing.assert_array_equal(got, want)


def passes_check_params(tmp_path, monkeypatch, m, x, *options):
    """check --params passes against onnxruntime (perturbing weights where it reads them, in
    the attributes), and FAILs a Jacobian 10% wrong."""
    import onnx
    from click.testing import CliRunner
    from gradcheck import wrong_by_ten_percent

    from jaccli.cli import main

    onnx.save(m, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    args = ["check", "--params", *options, str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "against onnxruntime's central differences" in " ".join(r.output.split()), r.output
    wrong_by_ten_percent(monkeypatch, "param_jacobian")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "FAIL" in r.output, r.output


def rule_checks_in_every_input(rule, xs, attrs, seed):
    """A one-output rule straight on arrays xs (its weights among them): its JVP in all of them
    against central differences of its forward, its VJP by <u, J v> = <J^T u, v>."""
    from jaccli.rules import Ctx

    rng = np.random.default_rng(seed)
    cx = Ctx(tuple(xs), (rule.forward(*xs, **attrs),), (True,) * len(xs), (False,) * len(xs), rule)
    V = [rng.standard_normal((2,) + a.shape) for a in xs]
    Ydot = rule.jvp(cx, *V, **attrs)
    for t in range(2):
        fd = (rule.forward(*[a + 1e-6 * v[t] for a, v in zip(xs, V)], **attrs)
              - rule.forward(*[a - 1e-6 * v[t] for a, v in zip(xs, V)], **attrs)) / 2e-6
        assert np.abs(Ydot[t] - fd).max() <= 1e-6 * max(1.0, np.abs(fd).max())
    U = rng.standard_normal((2,) + cx.y[0].shape)
    bars = rule.vjp(cx, U, **attrs)
    lhs, rhs = (U * Ydot).sum(), sum((b * v).sum() for b, v in zip(bars, V) if b is not None)
    assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs))


_TREE_NODES = dict(
    nodes_treeids=[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    nodes_nodeids=[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4],
    nodes_featureids=[0, 1, 2, 0, 0, 0, 0, 2, 1, 0, 0, 0],
    nodes_values=[0.1, -0.2, 0.3, 0, 0, 0, 0, 0.0, 0.5, 0, 0, 0],
    nodes_modes=["BRANCH_LEQ", "BRANCH_GT", "BRANCH_LT", "LEAF", "LEAF", "LEAF", "LEAF",
                 "BRANCH_GTE", "BRANCH_NEQ", "LEAF", "LEAF", "LEAF"],
    nodes_truenodeids=[1, 3, 5, 0, 0, 0, 0, 1, 3, 0, 0, 0],
    nodes_falsenodeids=[2, 4, 6, 0, 0, 0, 0, 2, 4, 0, 0, 0],
    nodes_missing_value_tracks_true=[0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
)
_LEAVES = [(0, 3), (0, 4), (0, 5), (0, 6), (1, 2), (1, 3), (1, 4)]


def tree_regressor(aggregate="SUM", n_targets=2, base=True, post="NONE", scale=1.0, linear=True, as_tensor=False):
    """Two trees over 3 features, every branch mode, a missing value sent the true way, leaves
    with weights for one or both targets (the second tree's first leaf has none for target 1)."""
    nodes = _TREE_NODES
    leaves = _LEAVES
    targets = dict(target_treeids=[], target_nodeids=[], target_ids=[], target_weights=[])
    for k, (t, n) in enumerate(leaves):
        for j in range(n_targets):
            if (t, n) == (1, 2) and j == 1:
                continue
            targets["target_treeids"].append(t)
            targets["target_nodeids"].append(n)
            targets["target_ids"].append(j)
            targets["target_weights"].append(scale * (k + 1) * (1 if j == 0 else -0.5))
    extra = {"base_values": [0.25, -1.0][:n_targets]} if base else {}
    if as_tensor:  # ml opset 3's tensor forms of the float attributes
        nodes = dict(nodes)
        for name, table in (("nodes_values", nodes), ("target_weights", targets), ("base_values", extra)):
            if name in table:
                v = table.pop(name)
                table[name + "_as_tensor"] = helper.make_tensor(name, TensorProto.FLOAT, [len(v)], v)
    tree = helper.make_node("TreeEnsembleRegressor", ["x"], ["t"], domain="ai.onnx.ml", n_targets=n_targets,
                            aggregate_function=aggregate, post_transform=post, **nodes, **targets, **extra)
    W = RNG.standard_normal((3, n_targets)).astype(np.float32)
    lin = helper.make_node("MatMul", ["x", "W"], ["l"])
    out = [helper.make_node("Add", ["t", "l"], ["y"])] if linear else [helper.make_node("Identity", ["t"], ["y"])]
    g = helper.make_graph([tree, lin] + out, "trees",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_targets])],
                          [helper.make_tensor(name="W", data_type=TensorProto.FLOAT, dims=W.shape, vals=W.ravel())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    m.ir_version = 8
    return m, W


@pytest.mark.parametrize("aggregate,n_targets,base,post", [("SUM", 2, True, "NONE"), ("AVERAGE", 2, False, "NONE"),
                                                           ("MIN", 2, True, "NONE"), ("MAX", 2, False, "NONE"),
                                                           ("SUM", 1, True, "NONE"), ("AVERAGE", 1, True, "PROBIT"),
                                                           ("SUM", 1, False, "LOGISTIC"), ("SUM", 2, True, "SOFTMAX"),
                                                           ("SUM", 2, True, "as_tensor")])
def test_tree_ensemble_regressor(aggregate, n_targets, base, post):
    """Forward against onnxruntime on points on both sides of every split, at the thresholds and
    with missing values; the input Jacobian is the linear model's beside it (the trees pass zero),
    and the summary says why."""
    from gradcheck import our_forward

    kw = dict(scale=0.05 if post == "PROBIT" else 1.0, as_tensor=post == "as_tensor")  # PROBIT: scores in (0, 1)
    post = "NONE" if post == "as_tensor" else post
    trees, _ = tree_regressor(aggregate, n_targets, base, post, linear=False, **kw)
    x = RNG.standard_normal((64, 3)).astype(np.float32)
    x[:7] = [[0.1, -0.2, 0.3], [0.1, 0.5, 0.0], [np.nan, 1, 1], [-1, np.nan, -1], [-1, 0, np.nan], [2, 0.5, np.nan],
             [0.2, 0.5, 0.0]]
    want = ort.InferenceSession(trees.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(our_forward(trees, {"x": x}, np.float32), want, rtol=1e-5, atol=1e-5)
    m, W = tree_regressor(aggregate, n_targets, base, post, **kw)
    J = jaccli.input_jacobian(m, x[7:])
    np.testing.assert_allclose(J, np.broadcast_to(W.T, J.shape), rtol=1e-6)


def test_tree_ensemble_note(tmp_path):
    """The summary says why the trees pass nothing."""
    from click.testing import CliRunner

    from jaccli.cli import main

    m, _ = tree_regressor()
    import onnx

    onnx.save(m, tmp_path / "t.onnx")
    np.save(tmp_path / "x.npy", RNG.standard_normal((4, 3)).astype(np.float32))
    r = CliRunner().invoke(main, ["input", str(tmp_path / "t.onnx"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "J.npy")])
    assert r.exit_code == 0, r.output
    assert "TreeEnsembleRegressor lies on the way" in " ".join(r.output.split())


TREE_WEIGHT_CASES = [("SUM", 2, True, "NONE"), ("AVERAGE", 2, False, "NONE"), ("MIN", 2, True, "NONE"),
                     ("MAX", 2, False, "NONE"), ("AVERAGE", 1, True, "PROBIT"), ("SUM", 2, True, "LOGISTIC"),
                     ("SUM", 2, True, "SOFTMAX"), ("SUM", 1, False, "NONE")]


@pytest.mark.parametrize("aggregate,n_targets,base,post", TREE_WEIGHT_CASES)
def test_tree_regressor_weights_are_parameters(aggregate, n_targets, base, post):
    """A tree ensemble regressor's leaf weights and base values are parameters (a per-sample
    gradient of XGBoost's or a random forest's prediction): the per-sample Jacobian against
    float64 differences of jaccli's forward over them, for every aggregate and post transform;
    the rule's JVP against the same differences and its VJP by <u, J v> = <J^T u, v>. The input
    Jacobian is the linear model's beside it, and the summary's note on the trees' zero
    derivative is for the input Jacobian only."""
    from jaccli.oracle import _forward
    from jaccli.rules import lookup

    m, W = tree_regressor(aggregate, n_targets, base, post, scale=0.05 if post == "PROBIT" else 1.0)
    x = RNG.standard_normal((6, 3))
    model = jaccli.load(m)
    r = jaccli.param_jacobian(model, x, dtype="float64", return_result=True)
    G, cols = r.value, r.columns
    names = [c["name"] for c in cols]
    assert names == ["W", "t.target_weights"] + ["t.base_values"] * base  # a node without a name: its output's
    assert not any("lies on the way" in note for note in r.notes), r.notes
    theta = {n: model.initializers[n].astype(np.float64) for n in names}

    def f(name, j, step):
        return _forward(model, {"x": x}, "y", np.float64, {**theta, name: theta[name] + step * np.eye(theta[name].size)[j].reshape(theta[name].shape)})

    fd = np.stack([(f(c["name"], j, 1e-6) - f(c["name"], j, -1e-6)) / 2e-6 for c in cols for j in range(c["size"])], -1)
    assert G.shape == fd.shape and rel_err(G, fd) < 1e-7
    assert (G[..., cols[1]["offset"]:] != 0).any()
    J = jaccli.input_jacobian(model, x, dtype="float64", return_result=True)
    np.testing.assert_allclose(J.value, np.broadcast_to(W.T, J.value.shape), rtol=1e-6)
    assert any("TreeEnsembleRegressor lies on the way" in note for note in J.notes), J.notes

    attrs = dict(next(n for n in model.nodes if n.op_type == "TreeEnsembleRegressor").attrs)  # the weights moved out
    rule_checks_in_every_input(lookup("TreeEnsembleRegressor", 1, "ai.onnx.ml"), [x] + [theta[n] for n in names[1:]], attrs, 12)


@pytest.mark.parametrize("aggregate,n_targets,base,post", [TREE_WEIGHT_CASES[0], TREE_WEIGHT_CASES[2], TREE_WEIGHT_CASES[4]])
def test_tree_regressor_parameters_checked_against_onnxruntime(tmp_path, monkeypatch, aggregate, n_targets, base, post):
    """check --params perturbs the leaf weights where onnxruntime reads them, in the attributes;
    a Jacobian 10% wrong FAILs."""
    m, _ = tree_regressor(aggregate, n_targets, base, post, scale=0.05 if post == "PROBIT" else 1.0, linear=False)
    passes_check_params(tmp_path, monkeypatch, m, RNG.standard_normal((6, 3)))


def test_tree_regressor_weights_as_tensors_stay_attributes():
    """ml opset 3's *_as_tensor forms are not moved (onnxruntime reads them as tensors): the
    trees' weights are no parameters, the linear model's are."""
    m, _ = tree_regressor(post="NONE", as_tensor=True)
    G, cols = jaccli.param_jacobian(m, RNG.standard_normal((3, 3)))
    assert [c["name"] for c in cols] == ["W"]


def svm_classifier(kernel, per_class, labels_out=False, platt=None):
    """A kernel SVC as skl2onnx writes it: support vectors grouped by class, one coefficient row per
    other class, one rho per pair of classes; the scores (and, with labels_out, the labels) out.
    platt: the scale of Platt's slopes prob_a, for probabilities (SVC(probability=True))."""
    k, V = len(per_class), sum(per_class)
    pairs = k * (k - 1) // 2
    probs = {} if platt is None else {"prob_a": list(-platt * RNG.uniform(0.5, 1.5, pairs)),
                                      "prob_b": list(RNG.uniform(-0.3, 0.3, pairs))}
    node = helper.make_node("SVMClassifier", ["x"], ["label", "scores"], domain="ai.onnx.ml", kernel_type=kernel,
                            kernel_params=[0.4, 0.5, 3.0], vectors_per_class=per_class, classlabels_ints=list(range(10, 10 + k)),
                            coefficients=list(RNG.uniform(-1, 1, (k - 1) * V)), rho=list(RNG.uniform(-0.5, 0.5, pairs)),
                            support_vectors=list(RNG.standard_normal(V * 4)), post_transform="NONE", **probs)
    outs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k if k > 2 or platt else 2])]
    if labels_out:
        outs.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    g = helper.make_graph([node], "svc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("kernel,per_class", [("RBF", [2, 1, 2]), ("POLY", [1, 2, 2, 1]), ("SIGMOID", [2, 3, 1]),
                                              ("LINEAR", [2, 2, 1]), ("RBF", [2, 3]), ("LINEAR", [1, 2])])
def test_svm_classifier(kernel, per_class):
    """scikit-learn's SVC (without probabilities): scores per pair of classes ((-s, s) for two), the
    labels by votes, as onnxruntime computes them; the scores' input Jacobian against differences."""
    from gradcheck import fd_input_jacobian, our_forward

    m = svm_classifier(kernel, per_class, labels_out=True)
    x = RNG.standard_normal((8, 4))
    scores, labels = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.astype(np.float32)})
    assert rel_err(our_forward(m, {"x": x}, np.float32), scores) < 1e-5
    del m.graph.output[0]
    np.testing.assert_array_equal(our_forward(m, {"x": x}, np.float32), labels)
    m = svm_classifier(kernel, per_class)
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x[:3], dtype="float64", flat=True, mode=mode)
        assert rel_err(J, fd_input_jacobian(m, {"x": x[:3]}, "x")) < 1e-6


@pytest.mark.parametrize("kernel,per_class,platt", [("RBF", [2, 1, 2], 2.0), ("POLY", [1, 2, 2, 1], 1.0), ("RBF", [2, 3], 2.0),
                                                    ("SIGMOID", [2, 1, 2], 40.0), ("LINEAR", [3, 2, 1, 2, 2], 3.0)])
def test_svm_classifier_probabilities(kernel, per_class, platt):
    """scikit-learn's SVC(probability=True): Platt's probability per pair, coupled into the classes'
    probabilities by onnxruntime's sweeps (each sample stops on its own, after a different
    number of them), and labels by votes, as onnxruntime gives them; their input Jacobian, in
    both modes, against differences. Steep slopes (40) clip some pairs' probabilities at 1e-7."""
    from gradcheck import fd_input_jacobian, our_forward

    m = svm_classifier(kernel, per_class, labels_out=True, platt=platt)
    x = RNG.standard_normal((16, 4))
    scores, labels = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.astype(np.float32)})
    assert np.abs(our_forward(m, {"x": x}, np.float32) - scores).max() < 2e-6
    del m.graph.output[0]
    np.testing.assert_array_equal(our_forward(m, {"x": x}, np.float32), labels)
    m = svm_classifier(kernel, per_class, platt=platt)
    for mode in ("forward", "reverse"):
        J = jaccli.input_jacobian(m, x[:3], dtype="float64", flat=True, mode=mode)
        assert rel_err(J, fd_input_jacobian(m, {"x": x[:3]}, "x")) < 1e-6


def test_svm_probability_coupling():
    """The coupling's sweeps and their forward-mode slopes, on their own: the slopes against
    differences of the probabilities computed, at scores where some pairs clip (slope 0) and
    samples stop after different numbers of sweeps."""
    from jaccli.rules.ml import _coupled

    for k in (2, 3, 5):
        m = k * (k - 1) // 2
        Z = RNG.standard_normal((6, m)) * 3
        A, B = -RNG.uniform(1, 3, m), RNG.uniform(-0.3, 0.3, m)
        A[0] = -12.0  # steep: pair 0 clips where |z| is large
        P, L = _coupled(Z, A, B, k, slopes=True)
        np.testing.assert_allclose(P.sum(-1), 1, atol=1e-12)
        F = np.zeros_like(L)
        for p in range(m):
            e = np.zeros(m)
            e[p] = 1e-6
            F[:, :, p] = (_coupled(Z + e, A, B, k)[0] - _coupled(Z - e, A, B, k)[0]) / 2e-6
        assert np.abs(L - F).max() < 1e-8 * max(1.0, np.abs(F).max())


@pytest.mark.parametrize("classes,weighted,base,post,signs", [
    (3, [0, 1, 2], [0.1, -0.2, 0.3], "SOFTMAX", 1), (3, [0, 2], [], "NONE", 1), (4, [0, 1, 2, 3], [], "LOGISTIC", -1),
    (2, [0, 1], [], "NONE", 1), (2, [0], [0.2], "LOGISTIC", -1), (2, [0], [], "NONE", 1), (2, [0], [], "NONE", -1),
    (2, [0], [0.05], "NONE", 1), (2, [0, 1], [0.3, 0.3], "NONE", -1), (2, [0], [0.1, 0.4], "PROBIT", 1),
    ("strings", [0, 1, 2], [], "NONE", 1)])
def test_tree_ensemble_classifier(classes, weighted, base, post, signs):
    """A tree classifier's scores and labels as onnxruntime gives them, in its conventions for two
    classes (one weighted class, base values of one or two, signs of the weights), several
    classes and string labels; the scores' Jacobian is zero."""
    from gradcheck import our_forward

    m, k = tree_classifier(classes, weighted, base, post, signs)
    x = RNG.standard_normal((64, 3)).astype(np.float32)
    x[:3] = [[0.1, -0.2, 0.3], [np.nan, 1, 1], [-1, 0, np.nan]]
    scores, label = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    tol = 1e-3 if post == "PROBIT" else 1e-5  # onnxruntime's inverse erf is an approximation (Winitzki's), ours exact
    np.testing.assert_allclose(our_forward(m, {"x": x}, np.float32), scores, rtol=tol, atol=1e-6)
    del m.graph.output[0]
    np.testing.assert_array_equal(our_forward(m, {"x": x}, np.float32), label)
    m.graph.output.insert(0, helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k]))
    assert not jaccli.input_jacobian(m, x[3:8], of="scores").any()


def tree_classifier(classes, weighted, base, post, signs):
    """A tree classifier over _TREE_NODES: (model with outputs scores and label, number of classes)."""
    labels = {"classlabels_strings": ["a", "b", "c"]} if classes == "strings" else {"classlabels_int64s": list(range(5, 5 + classes))}
    w = dict(class_treeids=[], class_nodeids=[], class_ids=[], class_weights=[])
    for n, (t, leaf) in enumerate(_LEAVES):
        for c in weighted:
            w["class_treeids"].append(t)
            w["class_nodeids"].append(leaf)
            w["class_ids"].append(c)
            w["class_weights"].append((0.09 * ((n + c) % 5) + 0.02) * (signs if n % 2 else 1))
    extra = {"base_values": base} if base else {}
    node = helper.make_node("TreeEnsembleClassifier", ["x"], ["label", "scores"], domain="ai.onnx.ml", post_transform=post,
                            **_TREE_NODES, **w, **labels, **extra)
    k = 3 if classes == "strings" else classes
    label_type = TensorProto.STRING if classes == "strings" else TensorProto.INT64
    g = helper.make_graph([node], "trees", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k]),
                           helper.make_tensor_value_info("label", label_type, ["N"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    m.ir_version = 8
    return m, k


@pytest.mark.parametrize("classes,weighted,base,post", [(3, [0, 1, 2], [0.1, -0.2, 0.3], "SOFTMAX"), (3, [0, 2], [], "NONE"),
                                                        (4, [0, 1, 2, 3], [0.1, 0.2, -0.1, 0.05], "LOGISTIC")])
def test_tree_classifier_weights_are_parameters(tmp_path, monkeypatch, classes, weighted, base, post):
    """A tree classifier's class weights and base values (more than two classes: XGBoost's,
    LightGBM's, a random forest's) are parameters: the scores' per-sample Jacobian against
    float64 differences of jaccli's forward over them, and check --params against onnxruntime
    (a 10% wrong Jacobian FAILs). Two classes' stay attributes (onnxruntime's conventions for
    them are not differentiated), and their refusal says so in one line."""
    from jaccli.oracle import _forward

    m, k = tree_classifier(classes, weighted, base, post, 1)
    x = RNG.standard_normal((6, 3))
    model = jaccli.load(m)
    G, cols = jaccli.param_jacobian(model, x, of="scores", dtype="float64")
    names = [c["name"] for c in cols]
    assert names == ["label.class_weights"] + ["label.base_values"] * bool(base)  # named after its first output
    theta = {n: model.initializers[n].astype(np.float64) for n in names}

    def f(name, j, step):
        return _forward(model, {"x": x}, "scores", np.float64, {**theta, name: theta[name] + step * np.eye(theta[name].size)[j]})

    fd = np.stack([(f(c["name"], j, 1e-6) - f(c["name"], j, -1e-6)) / 2e-6 for c in cols for j in range(c["size"])], -1)
    assert G.shape == fd.shape and rel_err(G, fd) < 1e-7 and G.any()
    two, _ = tree_classifier(2, [0, 1], [], "NONE", 1)
    assert not jaccli.load(two).attribute_params
    with pytest.raises(jaccli.errors.UsageError, match="TreeEnsembleClassifier"):
        jaccli.param_jacobian(two, x, of="scores")
    passes_check_params(tmp_path, monkeypatch, m, x, "--of", "scores")


def tree_ensemble5(aggregate=1, post=0, n_targets=3, dtype=np.float32, n_trees=4, depth=3, seed=0):
    """ai.onnx.ml opset 5's TreeEnsemble: random trees over 4 features whose branch nodes use every
    mode (BRANCH_LEQ ... BRANCH_NEQ, and BRANCH_MEMBER on small sets of levels of feature 3, a
    category), some sending missing values the true way; each leaf weights one target. The last
    tree is a single leaf."""
    r = np.random.default_rng(seed)
    nodes = {k: [] for k in ("featureids", "modes", "splits", "truenodeids", "trueleafs", "falsenodeids", "falseleafs",
                             "missing")}
    leaf_w, leaf_t, members, roots = [], [], [], []

    def leaf():
        leaf_w.append(float(r.normal()))
        leaf_t.append(int(r.integers(n_targets)))
        return len(leaf_w) - 1

    def branch(d):
        i = len(nodes["modes"])
        mode = int(r.integers(7))
        nodes["featureids"].append(3 if mode == 6 else int(r.integers(4)))  # categories: feature 3, integers
        nodes["modes"].append(mode)
        nodes["splits"].append(float(np.round(r.normal(), 1)) if mode not in (4, 5) else float(r.integers(-2, 3)))
        nodes["missing"].append(int(r.integers(2)))
        if mode == 6:
            members.extend([float(v) for v in r.choice([-2.0, -1.0, 0.0, 1.0, 2.0], 2, replace=False)] + [np.nan])
        for k in ("truenodeids", "trueleafs", "falsenodeids", "falseleafs"):
            nodes[k].append(0)
        for side in ("true", "false"):
            is_leaf = d == 1 or r.random() < 0.3
            nodes[f"{side}nodeids"][i] = leaf() if is_leaf else branch(d - 1)
            nodes[f"{side}leafs"][i] = int(is_leaf)
        return i

    for t in range(n_trees):
        if t == n_trees - 1:  # a single leaf: a root whose branches both reach it
            i = len(nodes["modes"])
            for k, v in (("featureids", 0), ("modes", 0), ("splits", 0.0), ("missing", 0), ("trueleafs", 1), ("falseleafs", 1)):
                nodes[k].append(v)
            j = leaf()
            nodes["truenodeids"].append(j)
            nodes["falsenodeids"].append(j)
            roots.append(i)
        else:
            roots.append(branch(depth))
    tt = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    tensor = lambda name, v, t=tt: helper.make_tensor(name, t, [len(v)], v)  # noqa: E731
    attrs = dict(aggregate_function=aggregate, post_transform=post, n_targets=n_targets, tree_roots=roots,
                 nodes_featureids=nodes["featureids"], nodes_truenodeids=nodes["truenodeids"],
                 nodes_trueleafs=nodes["trueleafs"], nodes_falsenodeids=nodes["falsenodeids"],
                 nodes_falseleafs=nodes["falseleafs"], nodes_missing_value_tracks_true=nodes["missing"],
                 nodes_modes=tensor("nodes_modes", nodes["modes"], TensorProto.UINT8),
                 nodes_splits=tensor("nodes_splits", nodes["splits"]), leaf_targetids=leaf_t,
                 leaf_weights=tensor("leaf_weights", leaf_w))
    if members:
        attrs["membership_values"] = tensor("membership_values", members)
    node = helper.make_node("TreeEnsemble", ["x"], ["t"], domain="ai.onnx.ml", **attrs)
    W = r.standard_normal((4, n_targets)).astype(dtype)
    g = helper.make_graph([node, helper.make_node("MatMul", ["x", "W"], ["l"]), helper.make_node("Add", ["t", "l"], ["y"])],
                          "trees5", [helper.make_tensor_value_info("x", tt, ["N", 4])],
                          [helper.make_tensor_value_info("y", tt, ["N", n_targets]),
                           helper.make_tensor_value_info("t", tt, ["N", n_targets])], [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.ml", 5)])
    m.ir_version = 10
    return m, W


@pytest.mark.parametrize("aggregate,post,n_targets,dtype", [(1, 0, 3, np.float32), (0, 0, 3, np.float64), (2, 0, 3, np.float32),
                                                            (3, 0, 2, np.float64), (1, 2, 1, np.float32), (1, 1, 3, np.float32),
                                                            (1, 2, 3, np.float32), (1, 3, 3, np.float64), (1, 1, 1, np.float32)])
def test_tree_ensemble_opset5(aggregate, post, n_targets, dtype):
    """Forward against onnxruntime (post_transform as it reads it, see ml._POSTS), on levels that
    hit the splits and the sets exactly and on missing values; the input Jacobian is the linear
    model's beside the trees (they pass zero), with the note."""
    for seed in range(3):
        m, W = tree_ensemble5(aggregate, post, n_targets, dtype, seed=seed)
        x = RNG.integers(-2, 3, (200, 4)).astype(dtype)  # on the splits and the set members
        x[:60, :3] += RNG.choice([0.0, 0.05, -0.05], (60, 3)).astype(dtype)
        x[np.arange(60, 100), np.arange(40) % 4] = np.nan  # a missing value in each feature
        want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["t"], {"x": x})[0]
        trees = jaccli.input_jacobian(m, x, of="t", dtype=dtype, return_result=True)  # apart: x @ W is NaN where x is
        np.testing.assert_allclose(trees.outputs, want, rtol=1e-6, atol=1e-6)
        r = jaccli.input_jacobian(m, x, dtype=dtype, return_result=True)
        assert any("TreeEnsemble lies on the way" in n for n in r.notes), r.notes
        ok = ~np.isnan(x).any(axis=1)
        np.testing.assert_allclose(r.value[ok], np.broadcast_to(W.T, r.value[ok].shape), rtol=1e-6)


def _ml_session(node, inputs, out_type):
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
             np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32, np.dtype(object): TensorProto.STRING}
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, types[a.dtype], None) for n, a in zip(node.input, inputs)],
                          [helper.make_tensor_value_info(node.output[0], out_type, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, dict(zip(node.input, inputs)))[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32])
@pytest.mark.parametrize("shapes,dims", [(((4, 3), (4, 2)), [3, 2]), (((4, 3), (4, 2)), [2, 4]), (((4, 3, 2), (4, 1)), [6, 1]),
                                         (((5,),), [5]), (((4, 3), (4, 2), (4, 4)), [1, 2, 6])])
def test_feature_vectorizer(dtype, shapes, dims):
    """Inputs side by side, cut or zero-padded to inputdimensions, flattened, a 1-D one a row: as
    onnxruntime; linear in each float input."""
    from gradcheck import check_rule

    from jaccli.rules.ml import FeatureVectorizer

    rng = np.random.default_rng(len(dims))
    xs = [(rng.standard_normal(s) * 5).astype(dtype) for s in shapes]
    node = helper.make_node("FeatureVectorizer", [f"x{i}" for i in range(len(xs))], ["y"], domain="ai.onnx.ml",
                            inputdimensions=dims)
    ref = _ml_session(node, xs, TensorProto.FLOAT)
    ours = FeatureVectorizer.forward(*xs, inputdimensions=dims)
    assert ours.shape == ref.shape and np.array_equal(ours.astype(np.float32), ref)
    if np.dtype(dtype).kind == "f" and len(shapes[0]) > 1:
        check_rule(FeatureVectorizer, [x.astype(np.float64) for x in xs], dict(inputdimensions=dims),
                   diff=tuple(range(len(xs))), rng=rng)


def test_category_mapper_and_a_spark_like_pipeline(tmp_path):
    """Strings to integers and back, as onnxruntime; then a pipeline of a categorical column
    mapped to its code and two numeric columns assembled by FeatureVectorizer into a linear
    regression: the Jacobian in each numeric input is its coefficients, the code's is absent."""
    import onnx
    from click.testing import CliRunner

    from jaccli.cli import main
    from jaccli.rules.ml import CategoryMapper

    cats = dict(cats_strings=["a", "bb", "c"], cats_int64s=[3, 7, 11])
    x = np.array([["a", "zz"], ["c", "bb"]], object)
    node = helper.make_node("CategoryMapper", ["x"], ["y"], domain="ai.onnx.ml", default_int64=-5, **cats)
    assert np.array_equal(CategoryMapper.forward(x, default_int64=-5, **cats), _ml_session(node, [x], TensorProto.INT64))
    i = np.array([3, 4, 11], np.int64)
    node = helper.make_node("CategoryMapper", ["x"], ["y"], domain="ai.onnx.ml", default_string="no", **cats)
    assert CategoryMapper.forward(i, default_string="no", **cats).tolist() == _ml_session(node, [i], TensorProto.STRING).tolist()

    n = helper.make_node
    coef = [0.5, -2.0, 3.0, 0.25]
    nodes = [n("CategoryMapper", ["kind"], ["code"], domain="ai.onnx.ml", default_int64=0, **cats),
             n("Cast", ["code"], ["codef"], to=TensorProto.FLOAT),
             n("FeatureVectorizer", ["a", "b", "codef"], ["features"], domain="ai.onnx.ml", inputdimensions=[2, 1, 1]),
             n("LinearRegressor", ["features"], ["y"], domain="ai.onnx.ml", coefficients=coef, intercepts=[1.0])]
    g = helper.make_graph(nodes, "pipe", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
                                          helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 1]),
                                          helper.make_tensor_value_info("kind", TensorProto.STRING, ["N", 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "pipe.onnx")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "x.npz", a=rng.standard_normal((4, 2)).astype(np.float32), b=rng.standard_normal((4, 1)).astype(np.float32),
             kind=np.array([["a"], ["c"], ["zz"], ["bb"]]))
    for wrt, want in (("a", coef[:2]), ("b", coef[2:3])):
        r = CliRunner().invoke(main, ["input", str(tmp_path / "pipe.onnx"), str(tmp_path / "x.npz"), "--wrt", wrt,
                                      "-o", str(tmp_path / f"J{wrt}.npy"), "-q"])
        assert r.exit_code == 0, r.output
        assert np.allclose(np.load(tmp_path / f"J{wrt}.npy"), np.broadcast_to(np.array(want, np.float32), (4, 1, len(want))))
    r = CliRunner().invoke(main, ["check", str(tmp_path / "pipe.onnx"), str(tmp_path / "x.npz"), "--wrt", "b", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"], r.output


# ---- the coefficients of the linear models as parameters --------------------------------------------------------


def linear_model(kind, rows, classes, post, n_features=4, rng=None):
    """A LinearClassifier (or LinearRegressor, `rows` targets) with its coefficients and intercepts
    as attributes, as skl2onnx writes scikit-learn's linear models."""
    rng = rng or np.random.default_rng(8)
    attrs = {"coefficients": list(rng.standard_normal(rows * n_features)), "intercepts": list(rng.standard_normal(rows)),
             "post_transform": post}
    if kind == "LinearClassifier":
        attrs["classlabels_ints"] = list(range(classes))
        outs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes])]
        node = helper.make_node(kind, ["x"], ["label", "scores"], domain="ai.onnx.ml", name=kind, **attrs)
    else:
        attrs["targets"] = rows
        outs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", rows])]
        node = helper.make_node(kind, ["x"], ["scores"], domain="ai.onnx.ml", name=kind, **attrs)
    g = helper.make_graph([node], "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_features])], outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    return m


LINEAR = [("LinearClassifier", 3, 3, "SOFTMAX"), ("LinearClassifier", 3, 3, "LOGISTIC"), ("LinearClassifier", 3, 3, "NONE"),
          ("LinearClassifier", 1, 2, "LOGISTIC"), ("LinearClassifier", 1, 2, "NONE"), ("LinearClassifier", 2, 2, "SOFTMAX"),
          ("LinearRegressor", 1, 0, "NONE"), ("LinearRegressor", 2, 0, "NONE")]


@pytest.mark.parametrize("kind,rows,classes,post", LINEAR)
def test_linear_model_coefficients_are_parameters(kind, rows, classes, post):
    """The attributes become parameters (a per-sample gradient of a logistic regression): the
    per-sample Jacobian against float64 differences of jaccli's forward over them, the forward
    as onnxruntime's; and the input Jacobian, unchanged, against differences."""
    from jaccli.oracle import _forward

    m = linear_model(kind, rows, classes, post)
    x = RNG.standard_normal((5, 4))
    model = jaccli.load(m)
    assert sorted(model.attribute_params) == [f"{kind}.coefficients", f"{kind}.intercepts"]
    G, cols = jaccli.param_jacobian(model, x, of="scores", dtype="float64")
    assert [c["name"] for c in cols] == [f"{kind}.coefficients", f"{kind}.intercepts"]
    assert [c["size"] for c in cols] == [rows * 4, rows]
    theta = {c["name"]: model.initializers[c["name"]].astype(np.float64) for c in cols}
    fd = []
    for c in cols:
        for j in range(c["size"]):
            plus, minus = ({**theta, c["name"]: theta[c["name"]] + s * 1e-6 * np.eye(c["size"])[j]} for s in (1, -1))
            fd.append((_forward(model, {"x": x}, "scores", np.float64, plus) - _forward(model, {"x": x}, "scores", np.float64, minus)) / 2e-6)
    fd = np.stack(fd, -1)
    assert G.shape == fd.shape and rel_err(G, fd) < 1e-7
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["scores"], {"x": x.astype(np.float32)})[0]
    np.testing.assert_allclose(_forward(model, {"x": x}, "scores", np.float64).reshape(want.shape), want, rtol=1e-5, atol=1e-6)
    J = jaccli.input_jacobian(model, x, of="scores", dtype="float64")
    Jfd = np.stack([(_forward(model, {"x": x + e}, "scores", np.float64) - _forward(model, {"x": x - e}, "scores", np.float64)) / 2e-6
                    for e in (np.eye(4)[j] * 1e-6 for j in range(4))], -1)
    assert rel_err(J, Jfd) < 1e-7


@pytest.mark.parametrize("kind,rows,classes,post", [LINEAR[0], LINEAR[3], LINEAR[6]])
def test_linear_model_parameters_checked_against_onnxruntime(tmp_path, monkeypatch, kind, rows, classes, post):
    """check --params perturbs the coefficients where onnxruntime reads them, in the attributes; a
    Jacobian 10% wrong FAILs."""
    import onnx
    from click.testing import CliRunner
    from gradcheck import wrong_by_ten_percent

    from jaccli.cli import main

    onnx.save(linear_model(kind, rows, classes, post), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", RNG.standard_normal((4, 4)).astype(np.float32))
    args = ["check", "--params", "--of", "scores", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "against onnxruntime's central differences" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0 and f"{kind}.coefficients, {kind}.intercepts: weights that ai.onnx.ml" in " ".join(r.output.split())
    wrong_by_ten_percent(monkeypatch, "param_jacobian")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "FAIL" in r.output, r.output


@pytest.mark.parametrize("kind,rows,classes,post", LINEAR)
def test_linear_model_rules_in_every_input(kind, rows, classes, post):
    """The rules straight on arrays, the coefficients and intercepts as inputs: the JVP in all
    three against central differences of the forward, the VJP by <u, J v> = <J^T u, v>."""
    from jaccli.rules import Ctx, lookup

    rule = lookup(kind, 1, "ai.onnx.ml")
    rng = np.random.default_rng(9)
    attrs = {"post_transform": post, **({"classlabels_ints": list(range(classes))} if classes else {"targets": rows})}
    xs = [rng.standard_normal((5, 4)), rng.standard_normal(rows * 4), rng.standard_normal(rows)]

    def scores(args):
        out = rule.forward(*args, **attrs)
        return out[1] if isinstance(out, tuple) else out

    outs = rule.forward(*xs, **attrs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cx = Ctx(tuple(xs), outs, (True, True, True), (False, False, False), rule)
    V = [rng.standard_normal((2,) + a.shape) for a in xs]
    Ydot = rule.jvp(cx, *V, **attrs)
    Ydot = Ydot[-1] if isinstance(Ydot, tuple) else Ydot
    for t in range(2):
        fd = (scores([a + 1e-6 * v[t] for a, v in zip(xs, V)]) - scores([a - 1e-6 * v[t] for a, v in zip(xs, V)])) / 2e-6
        assert rel_err(Ydot[t], fd) < 1e-6
    U = rng.standard_normal((2,) + scores(xs).shape)
    bars = rule.vjp(cx, *((None, U) if classes else (U,)), **attrs)
    lhs, rhs = (U * Ydot).sum(), sum((b * v).sum() for b, v in zip(bars, V))
    assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs))


SVR_CASES = [("RBF", 5, 0), ("POLY", 5, 0), ("SIGMOID", 5, 0), ("LINEAR", 5, 0), ("LINEAR", 0, 0), ("RBF", 5, 1)]


@pytest.mark.parametrize("kernel,n_supports,one_class", SVR_CASES)
def test_svm_regressor_weights_are_parameters(kernel, n_supports, one_class):
    """An SVR's dual coefficients and rho are parameters: the per-sample Jacobian against float64
    differences of jaccli's forward over them (zero for a one-class sign), and the rule's JVP and
    VJP in every input."""
    from jaccli.oracle import _forward
    from jaccli.rules import lookup

    m = svm_regressor(kernel, n_supports, one_class=one_class)
    x = RNG.standard_normal((5, 4))
    model = jaccli.load(m)
    G, cols = jaccli.param_jacobian(model, x, dtype="float64")
    names = [c["name"] for c in cols]
    assert names == ["y.coefficients", "y.rho"]  # a node without a name: its output's
    theta = {n: model.initializers[n].astype(np.float64) for n in names}
    fd = np.stack([(_forward(model, {"x": x}, "y", np.float64, {**theta, c["name"]: theta[c["name"]] + 1e-6 * np.eye(c["size"])[j]})
                    - _forward(model, {"x": x}, "y", np.float64, {**theta, c["name"]: theta[c["name"]] - 1e-6 * np.eye(c["size"])[j]}))
                   / 2e-6 for c in cols for j in range(c["size"])], -1)
    assert G.shape == fd.shape and (rel_err(G, fd) < 1e-7 if fd.any() else not G.any())
    attrs = {a.name: helper.get_attribute_value(a) for a in m.graph.node[0].attribute if a.name not in ("coefficients", "rho")}
    attrs["kernel_type"] = attrs["kernel_type"].decode()
    rule_checks_in_every_input(lookup("SVMRegressor", 1, "ai.onnx.ml"), [x, theta["y.coefficients"], theta["y.rho"]], attrs, 10)


def test_svm_regressor_parameters_checked_against_onnxruntime(tmp_path, monkeypatch):
    passes_check_params(tmp_path, monkeypatch, svm_regressor("RBF", 5), RNG.standard_normal((4, 4)))


def test_linear_model_without_intercepts():
    """No intercepts attribute: the coefficients alone become a parameter (input 1), and the node
    still loads (its inputs are counted as the one the schema allows)."""
    m = linear_model("LinearRegressor", 1, 0, "NONE")
    node = m.graph.node[0]
    kept = [a for a in node.attribute if a.name != "intercepts"]
    del node.attribute[:]
    node.attribute.extend(kept)
    x = RNG.standard_normal((3, 4))
    G, cols = jaccli.param_jacobian(m, x, dtype="float64")
    assert [c["name"] for c in cols] == ["LinearRegressor.coefficients"]
    np.testing.assert_allclose(G[:, 0], x)  # y = x . w: its gradient in w is x
