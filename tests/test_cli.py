"""Whole models through the CLI, against central differences that onnxruntime computes."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import jaccli
from jaccli.cli import main
from jaccli.errors import MemoryBudgetError

from gradcheck import wrong_by_ten_percent

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(os.path.dirname(HERE), "sample_models")
NAMES = ["mlp_classifier", "regression_mlp", "cnn"]


def paths(name):
    return os.path.join(MODELS, f"{name}.onnx"), os.path.join(MODELS, f"{name}.npy")


def ort_input_fd(model_path, x, h=1e-3):
    """Central differences of onnxruntime's float32 forward: (N, n_out, n_in), at steps h and h/4."""
    s = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    n_in = x[0].size
    out = []
    for step in (h, h / 4):
        cols = []
        for j in range(n_in):
            d = np.zeros(n_in, np.float32)
            d[j] = step
            d = d.reshape(x.shape[1:])
            yp = s.run(None, {name: (x + d).astype(np.float32)})[0].astype(np.float64)
            ym = s.run(None, {name: (x - d).astype(np.float32)})[0].astype(np.float64)
            cols.append(((yp - ym) / (2 * step)).reshape(len(x), -1))
        out.append(np.stack(cols, axis=-1))
    return out


def close_to_fd(J, fds, tol):
    err = np.minimum(*(np.abs(J - fd) for fd in fds))
    return err.max() / np.abs(fds[0]).max() < tol


def _look(ours, fds, n_entries, y):
    """A look at a Jacobian (oracle._Look) from differences alone: the perturbed points' means
    at the unperturbed outputs (no jump alike on both sides)."""
    from jaccli.oracle import _Look

    return _Look(ours, fds, [np.zeros(ours.shape)] * len(fds), n_entries, y, None, None)


def run(args, input=None):
    r = CliRunner().invoke(main, args, input=input, catch_exceptions=False)
    return r


def fails_when_ten_percent_wrong(monkeypatch, *args):
    """`jaccli check ARGS` with our input Jacobian made 10% wrong: exit 1, and a FAIL."""
    wrong_by_ten_percent(monkeypatch, "input_jacobian")
    r = run(["check", *args])
    assert r.exit_code == 1 and "FAIL" in r.output, r.output


@pytest.mark.parametrize("name", NAMES)
def test_input_jacobian_cli_matches_onnxruntime_differences(name, tmp_path):
    model, data = paths(name)
    out = tmp_path / "J.npy"
    r = run(["input", model, data, "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    J = np.load(out)
    x = np.load(data)
    y = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert J.shape == (len(x), *y.shape[1:], *x.shape[1:])
    fds = ort_input_fd(model, x[:4].astype(np.float64))
    assert close_to_fd(J[:4].reshape(4, y[0].size, -1), fds, 1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_float64_jacobian_matches_within_1e6(name, tmp_path):
    model, data = paths(name)
    x = np.load(data)[:3].astype(np.float64)
    J64 = jaccli.input_jacobian(model, x, dtype="float64", flat=True)
    # float64 differences of our own forward, which test_rules checks against onnxruntime
    from gradcheck import our_forward
    import onnx

    m = onnx.load(model)
    n_in = x[0].size
    fd = np.stack([(our_forward(m, {"x": x + e}) - our_forward(m, {"x": x - e})).reshape(3, -1) / 2e-6
                   for e in (np.eye(n_in)[j].reshape(x.shape[1:]) * 1e-6 for j in range(n_in))], axis=-1)
    assert np.abs(J64 - fd).max() / np.abs(fd).max() < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_params_cli_writes_column_map_and_matches_api(name, tmp_path):
    model, data = paths(name)
    out = tmp_path / "G.npy"
    r = run(["params", model, data, "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    G = np.load(out)
    cols = json.loads((tmp_path / "G.columns.json").read_text())["columns"]
    G2, cols2 = jaccli.param_jacobian(model, np.load(data))
    np.testing.assert_array_equal(G, G2)
    assert cols == cols2
    assert G.shape[-1] == sum(c["size"] for c in cols)
    assert [c["offset"] for c in cols] == list(np.cumsum([0] + [c["size"] for c in cols])[:-1])


@pytest.mark.parametrize("name", NAMES)
def test_check_command_passes_and_can_fail(name, monkeypatch):
    model, data = paths(name)
    for extra in ([], ["--params"]):
        r = run(["check", model, data, *extra])
        assert r.exit_code == 0, r.output
        assert "pass" in r.output
    # below what the oracle's own rounding can resolve, the verdict is at most unclear
    r = run(["check", model, data, "--tolerance", "1e-12"])
    assert ("FAIL" in r.output) == (r.exit_code == 1)
    # a Jacobian that is wrong by 10% fails, input and parameter alike
    for fn in ("input_jacobian", "param_jacobian"):
        wrong_by_ten_percent(monkeypatch, fn)
    for extra in ([], ["--params"]):
        r = run(["check", model, data, *extra])
        assert r.exit_code == 1 and "FAIL" in r.output, r.output


def test_check_falls_back_to_the_reference_evaluator(tmp_path, monkeypatch):
    """onnxruntime refuses a dilated convolution with auto_pad SAME; the check then uses onnx's
    reference evaluator, says so, and still catches a wrong Jacobian."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2], auto_pad="SAME_UPPER")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(m, model)
    np.save(data, rng.standard_normal((2, 3, 8)).astype(np.float32))
    with pytest.raises(Exception):
        ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": np.load(data)})
    for extra in ([], ["--params"]):
        r = run(["check", model, data, *extra])
        assert r.exit_code == 0 and "pass" in r.output and "reference evaluator" in r.output, r.output
    fails_when_ten_percent_wrong(monkeypatch, model, data)


@pytest.mark.parametrize("io", ["float16", "float32"])
def test_half_precision_models(tmp_path, io):
    """Weights in float16, and inputs in float16 or cast to it: jaccli computes in one float type
    throughout, and so does the check's oracle (onnxruntime's differences in float16 would be
    noise)."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    H = TensorProto.FLOAT16
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float16), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "b")]
    nodes = [helper.make_node("Gemm", ["xh", "W", "b"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    if io == "float32":
        nodes = [helper.make_node("Cast", ["x"], ["xh"], to=H)] + nodes[:1] + [helper.make_node("Tanh", ["h"], ["t"]),
                                                                             helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT)]
    else:
        nodes = [helper.make_node("Identity", ["x"], ["xh"])] + nodes
    t = TensorProto.FLOAT if io == "float32" else H
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, ["N", 5])], [helper.make_tensor_value_info("y", t, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(m, model)
    x = rng.standard_normal((3, 5))
    np.save(data, x.astype(np.float16 if io == "float16" else np.float32))
    for extra in ([], ["--params"]):
        r = run(["check", model, data, *extra])
        assert r.exit_code == 0 and "pass" in r.output, r.output
    J = jaccli.input_jacobian(model, np.load(data), dtype=np.float64)
    W, b = (numpy_helper.to_array(i).astype(np.float64) for i in inits)
    xs = np.load(data).astype(np.float64)
    want = (1 - np.tanh(xs @ W + b) ** 2)[:, :, None] * W.T[None]
    np.testing.assert_allclose(J, want, rtol=1e-12)


@pytest.mark.parametrize("name", ["cnn", "mlp_classifier"])
def test_models_saved_by_onnxruntimes_optimizer(tmp_path, name):
    """onnxruntime's extended optimizations fuse Conv and Gemm with their activations
    (com.microsoft FusedConv, FusedGemm): same Jacobians as the model before."""
    import onnx

    model, data = paths(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node if n.domain == "com.microsoft"}
    assert fused & {"FusedConv", "FusedGemm"}
    x = np.load(data)
    np.testing.assert_allclose(jaccli.input_jacobian(opts.optimized_model_filepath, x), jaccli.input_jacobian(model, x),
                               rtol=1e-5, atol=1e-7)
    G, cols = jaccli.param_jacobian(opts.optimized_model_filepath, x)
    G0, cols0 = jaccli.param_jacobian(model, x)
    assert sorted(c["name"] for c in cols) == sorted(c["name"] for c in cols0)
    for c in cols:
        c0 = next(d for d in cols0 if d["name"] == c["name"])
        np.testing.assert_allclose(G[..., c["offset"]: c["offset"] + c["size"]], G0[..., c0["offset"]: c0["offset"] + c0["size"]],
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ["Erf", "GridSample"])
def test_reference_evaluator_in_double_precision(op):
    """onnx's reference evaluator computes Erf and GridSample's coordinates in float32 whatever
    the input type; the oracle's float64 evaluator has exact kernels for both, which agree with
    math.erf and with our float64 GridSample (an independent implementation) to rounding."""
    from onnx import TensorProto, helper

    from jaccli.oracle import Reference

    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 1, 5, 6)) * 2}
    if op == "Erf":
        nodes, want = [helper.make_node("Erf", ["x"], ["y"])], np.vectorize(math.erf)(feeds["x"])
    else:
        feeds["grid"] = rng.uniform(-1.1, 1.1, (2, 4, 3, 2))
        nodes = [helper.make_node("GridSample", ["x", "grid"], ["y"], align_corners=0)]
        want = None
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in feeds.items()],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
    m.ir_version = 8
    if want is None:
        from gradcheck import our_forward

        want = our_forward(m, feeds, np.float64)
    got = Reference(m, np.float64).run(feeds, ["y"])[0]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


def test_oracle_runs_sample_by_sample_when_its_batch_is_wrong():
    """An oracle whose batched output is not one row per sample (the reference evaluator's Loop
    over a sequence) is run one sample at a time; the unbatched values go with every sample."""
    from jaccli.oracle import _run_batched

    class Dropping:
        batch = None  # the model's batch is not fixed

        def run(self, feeds, outputs):
            x, w = feeds["x"], feeds["w"]
            return [(x * w).sum(axis=0, keepdims=True)]  # right for one sample, wrong for several

    class DroppingTheAxis(Dropping):
        def run(self, feeds, outputs):  # one sample's row without its sample axis
            return [super().run(feeds, outputs)[0][0]]

    x, w = np.arange(6.0).reshape(3, 2), np.array([1.0, 10.0])
    np.testing.assert_array_equal(_run_batched(Dropping(), {"x": x}, "y", {"w": w}), x * w)
    np.testing.assert_array_equal(_run_batched(DroppingTheAxis(), {"x": x}, "y", {"w": w}).reshape(3, 2), x * w)


def test_input_jacobian_with_respect_to_the_embeddings(tmp_path):
    """Token ids have no derivative; the embeddings they look up do: --wrt names them, and the
    refusal without it says so. The Jacobian equals the input Jacobian of the same network
    fed the embeddings directly."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    E, W = rng.standard_normal((10, 4)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    tail = [helper.make_node("MatMul", ["emb", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
            helper.make_node("ReduceMean", ["t"], ["y"], axes=[1], keepdims=0)]

    def model(nodes, inp, path):
        g = helper.make_graph(nodes, "g", [inp], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        save(m, path)
        return str(path)

    tokens = model([helper.make_node("Gather", ["E", "ids"], ["emb"])] + tail,
                   helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5]), tmp_path / "tokens.onnx")
    direct = model(tail, helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 5, 4]), tmp_path / "direct.onnx")
    ids = rng.integers(0, 10, (3, 5))
    np.save(tmp_path / "ids.npy", ids)
    want = jaccli.input_jacobian(direct, E[ids])
    for mode in ("forward", "reverse"):
        got = jaccli.input_jacobian(tokens, ids, wrt="emb", mode=mode)
        assert got.shape == (3, 3, 5, 4)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    r = run(["input", tokens, str(tmp_path / "ids.npy")])
    assert r.exit_code != 0 and "--wrt" in r.output and "'emb'" in r.output, r.output
    r = run(["input", tokens, str(tmp_path / "ids.npy"), "--wrt", "emb", "-o", str(tmp_path / "J.npy"), "--quiet"])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "J.npy"), want, rtol=1e-6, atol=1e-7)
    r = run(["input", tokens, str(tmp_path / "ids.npy"), "--wrt", "ids"])
    assert r.exit_code != 0 and "not a float tensor" in r.output


def test_check_with_respect_to_the_embeddings(tmp_path, monkeypatch):
    """check --wrt a value inside the graph: the oracle's model takes the embeddings as an input,
    while the token ids still feed a mask past them (which must not move with the embeddings),
    for each of two outputs. A wrong Jacobian FAILs; --wrt with --params is refused in one line."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(0, np.int64), "zero")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"]), helper.make_node("MatMul", ["emb", "W"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]), helper.make_node("Greater", ["ids", "zero"], ["keep"]),
             helper.make_node("Cast", ["keep"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask"], ["mask3"], axes=[2]), helper.make_node("Mul", ["t", "mask3"], ["tm"]),
             helper.make_node("ReduceSum", ["tm"], ["y"], axes=[1], keepdims=0),
             helper.make_node("ReduceMean", ["t"], ["y2"], axes=[2], keepdims=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y", "y2")], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 8
    model, data = str(tmp_path / "tokens.onnx"), str(tmp_path / "ids.npy")
    save(m, model)
    np.save(data, rng.integers(0, 10, (3, 5)))
    r = run(["check", model, data, "--wrt", "emb"])
    assert r.exit_code == 0 and r.output.count("pass") >= 2 and "y2" in r.output, r.output
    fails_when_ten_percent_wrong(monkeypatch, model, data, "--wrt", "emb")
    r = run(["check", model, data, "--wrt", "emb", "--params"])
    assert r.exit_code == 2 and "--wrt" in r.output and "Traceback" not in r.output, r.output


def test_check_calls_differences_below_the_oracles_rounding_unclear():
    from jaccli.oracle import verdict

    row = {"entry_error": 0.04, "directional_error": 0.09, "max_abs_error": 1e-5, "max_abs_direction_error": 2e-5, "noise": 6e-5}
    assert verdict(row, 1e-3) == "unclear"
    assert verdict({**row, "max_abs_error": 1e-4}, 1e-3) == "FAIL"
    assert verdict({**row, "entry_error": 1e-4, "directional_error": 5e-3}, 1e-3) == "pass"


def test_check_perturbs_without_a_dense_matrix_of_directions():
    """check's directions are held as entries and dense rows (a model of 13 M parameters asked
    for 66 rows of 13 M values, twice, and was killed for memory): the products with our
    Jacobian and the perturbed points equal those of the dense matrix they stand for, and the
    largest entry skips NaN as before."""
    from jaccli.oracle import DIRECTIONS, _Directions, _max_abs

    rng = np.random.default_rng(3)
    base = rng.standard_normal(50) * 3
    pick = np.array([2, 7, 41])
    D = _Directions(base, pick, np.random.default_rng(9))
    dense = np.zeros((3, 50))
    dense[np.arange(3), pick] = np.maximum(1.0, np.abs(base[pick]))
    dense = np.concatenate([dense, np.random.default_rng(9).standard_normal((DIRECTIONS, 50)) * np.sqrt(np.mean(base ** 2))])
    J = rng.standard_normal((2, 4, 50)).astype(np.float32)
    assert len(D) == 3 + DIRECTIONS
    np.testing.assert_allclose(D.of(J, block=16), J.astype(np.float64) @ dense.T, rtol=1e-12)
    points = np.array(list(D.points(base, 0.25)))
    np.testing.assert_allclose(points, np.concatenate([base + 0.25 * dense, base - 0.25 * dense]), rtol=1e-14)
    J[0, 1, 5], J[1, 2, 9] = np.nan, -7.0
    m = _max_abs(J, block=8)
    assert m.shape == (2, 50) and m[1, 9] == 7.0 and np.isfinite(m).all()
    np.testing.assert_allclose(_max_abs(J, J - 1.0, block=8), 1.0, rtol=1e-6)


def test_check_runs_its_oracle_on_the_perturbed_points_a_budget_at_a_time(monkeypatch):
    """check's perturbed points (some 140 per sample and step) went to onnxruntime in one batch:
    a 1-D U-Net on 7500-long signals, 360 MiB a sample, was killed for memory. The runs now hold
    what the budget allows (from the plan's bytes per sample), and the check is the same."""
    import jaccli.oracle as oracle

    assert oracle._points_per_run({"bytes_primal": 360 * 2**20}) == 1
    assert oracle._points_per_run({"bytes_primal": 2**20}) == 512 and oracle._points_per_run({}) > 512
    model, data = paths("mlp_classifier")
    x = np.load(data)[:2]
    whole = oracle.check(model, x, samples=2)
    sizes = []
    run = oracle._run_batched

    def spy(o, feeds, name, extra=None, run_size=None):
        if run_size is None:
            return run(o, feeds, name, extra)
        sizes.append(min(samples_in(feeds), run_size))
        real = o.run
        o.run = lambda f, names: (sizes.append(samples_in(f)), real(f, names))[1]
        try:
            return run(o, feeds, name, extra, run_size)
        finally:
            o.run = real

    from jaccli.drivers import samples_in

    monkeypatch.setattr(oracle, "_points_per_run", lambda estimate, *_: 5)
    monkeypatch.setattr(oracle, "_run_batched", spy)
    parts = oracle.check(model, x, samples=2)
    assert sizes and max(sizes) <= 5 and sum(s == 5 for s in sizes) > 10
    for a, b in zip(whole["rows"], parts["rows"]):
        for key in ("entry_error", "directional_error", "max_abs_error"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-15), key


def test_check_calls_errors_within_the_oracles_own_step_spread_unclear():
    """A float32 oracle on a deep ReLU network: its differences at the three steps disagree with
    each other (rounding, kinks crossed inside a step) by more than ours disagrees with the
    nearest of them. It cannot tell, so the verdict is unclear; a Jacobian off by 30%, far
    outside that spread, still FAILs."""
    from jaccli.oracle import _row, verdict

    rng = np.random.default_rng(0)
    true = rng.standard_normal((2, 3, 12))  # (samples, outputs, 8 entries + 4 directions)
    fds = [true + 0.01 * rng.standard_normal(true.shape) * w for w in (1.0, 2.0, 4.0)]
    y = np.zeros((2, 3))
    row = _row("y", _look(true, fds, 8, y), y)
    assert row["entry_error"] > 1e-3 and row["max_abs_error"] <= row["entry_spread"]
    assert verdict(row, 1e-3) == "unclear"
    assert verdict(_row("y", _look(1.3 * true, fds, 8, y), y), 1e-3) == "FAIL"
    steady = [true + 1e-7 * k for k in range(3)]  # differences that agree: the same error is a FAIL
    assert verdict(_row("y", _look(true + 0.05, steady, 8, y), y), 1e-3) == "FAIL"


def test_second_look_weighs_the_oracles_verdict():
    """Where the oracle does not pass ours, a second look against jaccli's own float64 forward
    at fine steps: its FAIL is a FAIL; its pass makes the oracle's FAIL unclear, but only where
    the forward passes agree (a wrong forward kernel is not excused) and the Jacobian asked
    for is within the tolerance of the float64 one (a rule that loses precision in float32
    is not excused)."""
    from jaccli.oracle import verdict

    failing = {"entry_error": 0.05, "directional_error": 0.06, "max_abs_error": 0.5, "max_abs_direction_error": 0.6,
               "noise": 1e-6, "entry_spread": 1e-3, "direction_spread": 1e-3, "forward_error": 1e-7, "forward_scale": 1.0}
    own = {"verdict": "pass", "precision": 1e-6}
    assert verdict(failing, 1e-3) == "FAIL"
    assert verdict({**failing, "own": own}, 1e-3) == "unclear"
    assert verdict({**failing, "own": own, "forward_error": 2e-3}, 1e-3) == "FAIL"
    # a float32 oracle's Sigmoid (exact to about 1e-7 absolute) on a map of probabilities near 0
    assert verdict({**failing, "own": own, "forward_error": 1.3e-7, "forward_scale": 3.5e-4}, 1e-3) == "unclear"
    assert verdict({**failing, "own": own, "forward_error": 1e-6, "forward_scale": 3.5e-4}, 1e-3) == "FAIL"
    tiny = {**failing, "own": own, "forward_scale": 1e-4, "forward_floor": 4 * float(np.finfo(np.float32).eps)}
    assert verdict({**tiny, "forward_error": 1.1e-7}, 1e-3) == "unclear"  # within 4 float32 ulps of 1
    assert verdict({**tiny, "forward_error": 1e-6}, 1e-3) == "FAIL"
    assert verdict({**failing, "own": {**own, "precision": 5e-3}}, 1e-3) == "FAIL"  # the float32 Jacobian itself is off
    assert verdict({**failing, "own": {"verdict": "FAIL"}}, 1e-3) == "FAIL"
    unclear = {**failing, "entry_spread": 1.0, "direction_spread": 1.0}
    assert verdict(unclear, 1e-3) == verdict({**unclear, "own": own}, 1e-3) == "unclear"
    assert verdict({**unclear, "own": {"verdict": "FAIL"}}, 1e-3) == "FAIL"


def test_a_quantized_output_is_not_judged_by_differences(tmp_path):
    """Where every path to an output passes a QuantizeLinear (a TFLite int8 model through
    tf2onnx), the Jacobian is zero by construction, where it exists, and differences only cross
    the levels' jumps: random directions cross them at every step (a TFLite int8 LSTM's 158
    quantizers, even at 1e-8). Such a row is unclear, never FAIL, says why, and takes no second
    look; a float path beside the quantizer is judged as before."""
    from onnx import TensorProto, helper, numpy_helper, save

    from jaccli.oracle import check, verdict

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    inits = [numpy_helper.from_array(np.array(1 / 256, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z"),
             numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Sigmoid", ["m"], ["p"]),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    path = str(tmp_path / "qdq.onnx")
    save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)]), path)
    xs = rng.standard_normal((3, 8)).astype(np.float32)
    d = check(path, xs, params=True)
    row = d["rows"][0]
    assert row["quantized_zero"] == "QuantizeLinear" and "own" not in row and row["max_abs"] > 1  # jumps: levels / 2h
    assert verdict(row, d["tolerance"]) == "unclear" and d["ok"]
    crossed = {**row, "own": {"verdict": "FAIL", "precision": 0.0}}  # a second look whose steps crossed levels too
    assert verdict(crossed, d["tolerance"]) == "unclear" and verdict({**crossed, "quantized_zero": None}, d["tolerance"]) == "FAIL"
    np.save(tmp_path / "x.npy", xs)
    r = CliRunner().invoke(main, ["check", path, str(tmp_path / "x.npy"), "--params"], terminal_width=200)
    assert r.exit_code == 0 and "passes a QuantizeLinear" in " ".join(r.output.split())
    beside = nodes[:3] + [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]), helper.make_node("Add", ["d", "m"], ["y"])]
    save(helper.make_model(helper.make_graph(beside, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)]), path)
    assert "quantized_zero" not in check(path, xs, params=True)["rows"][0]


def test_an_oracle_whose_output_has_another_shape_is_passed_over():
    """A float64 Resize by scales of float32(7 / 6) on a width of 6 (a bicubic tf.image.resize
    through tf2onnx, in float64): onnxruntime has no double Resize, and onnx's reference
    evaluator floors 6 * 7/6 in float64 to 6 where onnxruntime (in float32) and jaccli take 7.
    Its differences cannot judge ours: the check passes over it, to jaccli's own forward with a
    note why, instead of failing on an index (IndexError before)."""
    from onnx import TensorProto, helper, numpy_helper

    from jaccli.oracle import check

    nodes = [helper.make_node("Resize", ["x", "roi", "sc"], ["y"], mode="cubic", cubic_coeff_a=-0.5, exclude_outside=1)]
    inits = [numpy_helper.from_array(np.array([], np.float64), "roi"),
             numpy_helper.from_array(np.array([1, 1, 1.5, 7 / 6], np.float32), "sc")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 2, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    d = check(m, np.random.default_rng(0).standard_normal((3, 2, 6, 6)), dtype=np.float64)
    assert d["ok"] and d["oracle"] == "jaccli's own forward" and "108 values a sample, jaccli 126" in d["oracle_note"]


def test_the_second_looks_jumps_grow_by_its_own_steps():
    """The second look's steps are decades apart (1e-6, 1e-7, 1e-8): a jump there grows tenfold
    from step to step, not fourfold as at the oracle's steps, and is not judged either."""
    from jaccli.oracle import FINE, _jumps, _row, _steps

    jump = [np.full((1, 1, 2), 0.5 / (2 * h)) for h in FINE]
    assert _jumps(jump, 0.0, ratio=FINE[0] / FINE[1]).all() and not _jumps(jump, 0.0).any()
    jump4 = [np.full((1, 1, 2), 0.5 / (2 * h)) for h in _steps(np.float32)]
    assert _jumps(jump4, 0.0).all() and not _jumps(jump4, 0.0, ratio=10.0).any()
    y = np.zeros((1, 1))
    assert _row("y", _look(np.zeros((1, 1, 2)), jump, 1, y), y, ratio=FINE[0] / FINE[1])["jumps"] == 2


def test_check_takes_a_second_look_where_the_oracle_cannot_tell(tmp_path, monkeypatch):
    """Steps far too large for the oracle (its differences then carry the curvature): the
    check does not pass, the second look at fine steps against our own float64 forward does,
    and the verdict is unclear, exit 0, with the second look's line. A Jacobian 10% off fails
    the second look too."""
    import jaccli.oracle as oracle

    model, data = paths("mlp_classifier")
    monkeypatch.setattr(oracle, "_steps", lambda dtype: (0.8, 0.6, 0.4))
    d = oracle.check(model, np.load(data))
    row = d["rows"][0]
    assert d["ok"] and row["own"]["verdict"] == "pass" and verdict_of(row, d) == "unclear", row
    assert row["own"]["entry_error"] < 1e-5 and row["own"]["directional_error"] < 1e-5 and row["own"]["precision"] < 1e-5
    r = run(["check", model, data])
    assert r.exit_code == 0 and "second look" in r.output and "unclear" in r.output, r.output
    fails_when_ten_percent_wrong(monkeypatch, model, data)


def test_a_second_look_over_the_memory_budget_is_skipped_with_a_line(tmp_path, monkeypatch):
    """The second look's Jacobian is in float64, twice the first look's memory: over --max-memory
    (PaddleOCR's layout model at 800x608, 3.2 GiB) it is skipped with a line saying so, and the
    first look's verdict stands (here a FAIL: steps too large for the oracle), where it used to
    end the check with that error. --max-memory reaches every Jacobian the check takes; with
    room, the second look makes the verdict unclear."""
    import jaccli.oracle as oracle

    model, data = paths("mlp_classifier")
    monkeypatch.setattr(oracle, "_steps", lambda dtype: (0.8, 0.6, 0.4))  # the oracle cannot tell: a second look
    seen = []
    real = oracle.input_jacobian

    def budget(*a, max_memory, **k):
        seen.append(max_memory)
        if k.get("dtype") == np.float64 and max_memory < 1 << 30:
            raise MemoryBudgetError("one sample and one direction need about 3.2 GiB with temporaries, over --max-memory")
        return real(*a, max_memory=max_memory, **k)

    monkeypatch.setattr(oracle, "input_jacobian", budget)
    r = run(["check", model, data, "--max-memory", "512MiB"])
    assert r.exit_code == 1 and "second look (y) skipped, the verdict is the oracle's" in r.output, r.output  # its FAIL
    assert set(seen) == {512 << 20}
    r = run(["check", model, data, "--max-memory", "4GiB"])
    assert r.exit_code == 0 and "skipped" not in r.output and "second look (y): jaccli's" in r.output, r.output


def test_the_reference_evaluator_is_held_to_the_memory_budget(monkeypatch):
    """onnx's reference evaluator builds im2col matrices a kernel's width times its input: on one
    sample of a 1-D U-Net over 7500-long EEG signals it took more than the machine's 24 GiB, and
    the check was killed. Its runs may now add only the budget to the process (RLIMIT_AS): one
    that would take more raises MemoryError and the check falls back to onnxruntime in float32.
    And the oracle's points per run count what one sample's run took when it was chosen."""
    import onnx.reference

    import jaccli.oracle as oracle

    model, data = paths("cnn")
    assert oracle.check(model, np.load(data)[:2])["oracle"] == "the onnx reference evaluator"  # no float64 Conv in onnxruntime
    real = onnx.reference.ReferenceEvaluator.run

    def greedy(self, *a, **k):  # 8 GiB: more than the budget, less than the machine would grant without it
        np.empty(8 << 30, np.uint8)
        return real(self, *a, **k)

    monkeypatch.setattr(onnx.reference.ReferenceEvaluator, "run", greedy)
    d = oracle.check(model, np.load(data)[:2])
    assert d["ok"] and d["oracle"] == "onnxruntime" and d["oracle_dtype"] == "float32", d
    y, peak = oracle._peak_bytes(lambda: np.ones(10 ** 7))
    assert 8e7 <= peak < 1.2e8
    o = oracle.Reference.__new__(oracle.Reference)
    o.point_bytes = 1e8
    assert oracle._points_per_run({"bytes_primal": 1e6}, o, 1e9) == 10


def test_the_report_says_when_the_float32_jacobian_is_off_from_the_float64_one():
    """A second look whose float32 Jacobian is further than the tolerance from the float64 one
    (Inception v3 with random weights, outputs near 1e12: 3e-2) gets a note naming
    --dtype float64; one within it gets none."""
    from rich.console import Console

    from jaccli.report import render_check

    row = {"output": "y", "entry_error": 0.05, "directional_error": 0.06, "max_abs_error": 0.5, "max_abs_direction_error": 0.6,
           "max_abs": 10.0, "noise": 1e-6, "entry_spread": 1.0, "direction_spread": 1.0, "forward_error": 1e-7, "forward_scale": 1.0,
           "own": {"verdict": "pass", "steps": [1e-6, 1e-7, 1e-8], "precision": 3e-2, "entry_error": 1e-9, "directional_error": 1e-9}}
    d = {"kind": "input", "samples": 2, "dtype": "float32", "step": 1e-3, "oracle": "onnxruntime", "oracle_dtype": "float32",
         "tolerance": 1e-3, "rows": [row], "ok": True}
    for precision, said in ((3e-2, True), (1e-7, False)):
        row["own"]["precision"] = precision
        console = Console(record=True, width=200)
        render_check(console, d)
        assert ("--dtype float64" in console.export_text()) == said


def verdict_of(row, d):
    from jaccli.oracle import verdict

    return verdict(row, d["tolerance"])


def test_check_leaves_out_where_the_model_jumps(tmp_path, monkeypatch):
    """A categorical column cast to an integer (a scikit-learn pipeline's one-hot input) at
    integer data: every difference across it grows as 1/step. Those are not judged (no
    derivative exists there) and said so; a wrong Jacobian still FAILs on the other columns."""
    from onnx import TensorProto, helper, numpy_helper, save

    w = numpy_helper.from_array(np.array([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0]], np.float32), "w")
    nodes = [helper.make_node("Cast", ["x"], ["k"], to=TensorProto.INT64), helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Mul", ["t", "kf"], ["p"]),
             helper.make_node("MatMul", ["p", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(m, model)
    x = np.random.default_rng(0).uniform(0.2, 0.8, (3, 3)).astype(np.float32) + np.array([1, 2, 3], np.float32)
    x[:, 1] = [1, 2, 3]  # column 1 exactly at its integers: x - h truncates to the integer below
    np.save(data, x)
    r = run(["check", model, data, "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["jumps"] > 0 and row["entries_judged"] and not row["directions_judged"]
    r = run(["check", model, data])
    assert r.exit_code == 0 and "pass" in r.output and "jump" in r.output, r.output
    fails_when_ten_percent_wrong(monkeypatch, model, data)


def passes_leaving_out_ties(monkeypatch, model, data, x):
    """`jaccli check` of the model on x passes, with some entries left out as moving a kink or
    a branch and the rest (directions too) judged; with our Jacobian 10% wrong it FAILs."""
    np.save(data, x)
    r = run(["check", model, data, "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["branch_points"] > 0 and row["entries_judged"] and row["directions_judged"], row
    fails_when_ten_percent_wrong(monkeypatch, model, data)


def _at_zero_model(nodes, batch="N"):
    """x (batch, 4) through `nodes` (which make p) and a weight: y = p @ w."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0], [-1.0, 0.5]], np.float32), "w")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    g = helper.make_graph(nodes + [helper.make_node("MatMul", ["p", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, zero])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("mask", ["x != 0", "x.bool()"])
def test_check_leaves_out_what_moves_a_comparison_tied_at_the_point(tmp_path, monkeypatch, mask):
    """A mask of the padding, x != 0 (Keras's Masking through tf2onnx), or x cast to a boolean
    (torch's x.bool()), on data padded with exact zeros. There the point takes the masked branch,
    whose derivative jaccli gives (as TensorFlow does); any move off zero unmasks it, and the
    model is continuous across (sin x + x is 0 at 0): differences see the other branch's
    derivative, 2, with no jump to give it away. Those columns are not judged, and said so; a
    wrong Jacobian still FAILs on the others."""
    from onnx import TensorProto, helper, save

    made = ([helper.make_node("Equal", ["x", "zero"], ["pad"]), helper.make_node("Not", ["pad"], ["mask"])] if mask == "x != 0"
            else [helper.make_node("Cast", ["x"], ["mask"], to=TensorProto.BOOL)])
    nodes = made + [helper.make_node("Sin", ["x"], ["s"]), helper.make_node("Add", ["s", "x"], ["u"]),
                    helper.make_node("Where", ["mask", "u", "zero"], ["p"])]
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(_at_zero_model(nodes), model)
    x = np.random.default_rng(0).uniform(0.2, 0.8, (3, 4)).astype(np.float32)
    x[:, 2:] = 0  # padded
    np.save(data, x)
    r = run(["check", model, data, "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["branch_points"] > 0 and row["ties_at"] and row["entries_judged"] and row["directions_judged"]
    r = run(["check", model, data])
    assert r.exit_code == 0 and "branch of the model" in " ".join(r.output.split()), r.output
    fails_when_ten_percent_wrong(monkeypatch, model, data)


@pytest.mark.parametrize("kink", ["Clip", "Relu", "Max", "Clip in runs of one"])
def test_check_leaves_out_what_moves_a_kink_at_the_point(tmp_path, monkeypatch, kink):
    """Images in [0, 1] with black and white pixels, clipped to [0, 1] (or through a Relu, or a
    Max with 0) first: at a pixel of exactly 0 or 1 jaccli's derivative is one side's (0 for a
    Relu at 0, as torch's), and central differences give the mean of both slopes, 0.5, at every
    step; those check FAILed. The columns that move a kink are not judged, and said so; a
    wrong Jacobian still FAILs on the others. A model exported with a batch of one is searched
    in runs of one."""
    from onnx import helper, save

    node = {"Clip": helper.make_node("Clip", ["x", "zero", "one"], ["p"]), "Relu": helper.make_node("Relu", ["x"], ["p"]),
            "Max": helper.make_node("Max", ["x", "zero"], ["p"])}[kink.split()[0]]
    m = _at_zero_model([helper.make_node("Add", ["zero", "zero"], ["zz"]), helper.make_node("Exp", ["zz"], ["one"]), node],
                       batch=1 if "runs" in kink else "N")
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(m, model)
    x = np.random.default_rng(0).uniform(0.2, 0.8, (3, 4)).astype(np.float32)
    x[:, 0], x[:, 1] = 0, 1  # black and white pixels
    np.save(data, x)
    r = run(["check", model, data, "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["branch_points"] > 0 and row["entries_judged"], row
    r = run(["check", model, data])
    assert r.exit_code == 0 and "kink" in " ".join(r.output.split()), r.output
    fails_when_ten_percent_wrong(monkeypatch, model, data)


def _distance_graph(k=2):
    """scikit-learn's KNeighborsTransformer as skl2onnx writes it: each sample's distances to the
    training points S (a parameter), sqrt of the summed squares, kept for its k nearest (TopK's
    indices compared with every point's index)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    S = rng.standard_normal((5, 3)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["x", "one"], ["x1"]), helper.make_node("Sub", ["x1", "S"], ["diff"]),
             helper.make_node("ReduceSumSquare", ["diff", "two"], ["sq"], keepdims=0), helper.make_node("Sqrt", ["sq"], ["d"]),
             helper.make_node("TopK", ["d", "k"], ["near", "which"], largest=0),
             helper.make_node("Unsqueeze", ["which", "two"], ["which1"]), helper.make_node("Equal", ["which1", "points"], ["hit"]),
             helper.make_node("Cast", ["hit"], ["hitf"], to=TensorProto.FLOAT), helper.make_node("Unsqueeze", ["near", "two"], ["near1"]),
             helper.make_node("Mul", ["hitf", "near1"], ["kept"]), helper.make_node("ReduceSum", ["kept", "one"], ["y"], keepdims=0)]
    inits = {"S": S, "one": np.array([1], np.int64), "two": np.array([2], np.int64), "k": np.array([k], np.int64),
             "points": np.arange(5, dtype=np.int64)}
    g = helper.make_graph(nodes, "knn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                          [numpy_helper.from_array(v, n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m, S


@pytest.mark.parametrize("params", [False, True])
def test_check_leaves_out_a_distance_of_zero(tmp_path, params):
    """A nearest-neighbours model checked on its own training points: a sample's distance to
    itself is the square root of 0, which has no derivative (jaccli's is NaN), and the squared
    distance under it is flat there, so no first-order probe found the kink; and the Equal of
    TopK's integer indices made the probe itself fail. check --params FAILed (infinitely off).
    Those columns are not judged, and the random directions leave them be."""
    from onnx import save

    m, S = _distance_graph()
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(m, model)
    x = np.random.default_rng(5).standard_normal((3, 3)).astype(np.float32)
    x[0], x[2] = S[1], S[4]  # training points
    np.save(data, x)
    args = ["check", model, data] + (["--params"] if params else [])
    r = run(args + ["--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["branch_points"] > 0 and row["entries_judged"] and row["directions_judged"], row
    r = run(args)
    assert r.exit_code == 0 and "a distance of 0" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize("pool", ["MaxPool", "ReduceMax", "GlobalMaxPool"])
def test_check_leaves_out_ties_of_a_maximum(tmp_path, monkeypatch, pool):
    """Images with a white patch (exactly 1.0) and a flat channel (0.3 throughout), max-pooled
    (or their maximum over the map taken): a window's maximum is tied. jaccli's derivative
    follows the first, as onnxruntime's indices and torch do, and central differences give
    each tied element half (a raised one takes the maximum, a lowered one leaves it). check
    FAILed (0.90 off). The tied elements are not judged; a wrong Jacobian still FAILs."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    node = {"MaxPool": helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            "ReduceMax": helper.make_node("ReduceMax", ["x"], ["p"], axes=[2, 3]),
            "GlobalMaxPool": helper.make_node("GlobalMaxPool", ["x"], ["p"])}[pool]
    width = 16 if pool == "MaxPool" else 4
    nodes = [node, helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(rng.standard_normal((width, 3)).astype(np.float32), "W")])
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    x = rng.uniform(0, 0.9, (3, 4, 4, 4)).astype(np.float32)
    x[:, 0, :2, :2] = 1.0  # a white patch
    x[:, 1] = 0.3  # a flat channel; the others' maxima are their own
    passes_leaving_out_ties(monkeypatch, model, data, x)


def test_check_leaves_out_ties_of_topk(tmp_path, monkeypatch):
    """TopK of rows with two equal values (saturated scores): which output each takes is a
    choice (jaccli's, the lower index first, as onnxruntime's), and differences give each half
    of both outputs. check FAILed (0.67 off); those elements are not judged now."""
    from onnx import helper, numpy_helper, save

    nodes = [helper.make_node("TopK", ["x", "k"], ["p", "i"], axis=-1)]
    m = _at_zero_model(nodes)
    m.graph.initializer.append(numpy_helper.from_array(np.array([4], np.int64), "k"))
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(m, model)
    x = np.random.default_rng(0).uniform(0.2, 0.8, (3, 4)).astype(np.float32)
    x[:, 0] = x[:, 1] = 0.9  # tied
    passes_leaving_out_ties(monkeypatch, model, data, x)


def test_check_leaves_out_weights_at_a_kink(tmp_path, monkeypatch):
    """Weights clipped to [-1, 1] with some exactly at the bounds (as quantization-aware
    training leaves them), and a Relu of a weight that is exactly 0: `check --params` FAILed
    there (differences give half the slope). Those entries are not judged, and said so; a
    wrong parameter Jacobian still FAILs."""
    from gradcheck import wrong_by_ten_percent
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    W = rng.uniform(-0.9, 0.9, (6, 3)).astype(np.float32)
    W[0, 0], W[1, 2], W[2, 1] = 1, -1, 0
    nodes = [helper.make_node("Clip", ["W", "lo", "hi"], ["Wc"]), helper.make_node("MatMul", ["x", "Wc"], ["z"]),
             helper.make_node("Relu", ["W"], ["Wr"]), helper.make_node("ReduceSum", ["Wr"], ["s"], keepdims=0),
             helper.make_node("Add", ["z", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array(-1, np.float32), "lo"),
                           numpy_helper.from_array(np.array(1, np.float32), "hi")])
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    np.save(data, rng.standard_normal((3, 6)).astype(np.float32))
    r = run(["check", "--params", model, data, "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["branch_points"] > 0 and row["entries_judged"], row
    wrong_by_ten_percent(monkeypatch, "param_jacobian")
    r = run(["check", "--params", model, data])
    assert r.exit_code == 1 and "FAIL" in r.output, r.output


def test_check_leaves_out_where_the_model_jumps_alike_on_both_sides(tmp_path, monkeypatch):
    """A jump that is the same on both sides of the point, with no comparison: whether x is not
    zero, as a bool cast back to float, times (1 + x). At x = 0 both neighbours are 1 +- h, so
    central differences are 1 at every step (no growth as 1/step), where jaccli's derivative of
    the branch taken is 0; the two points' mean stays 1 above the value at every step."""
    from onnx import TensorProto, helper, save

    nodes = [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BOOL), helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("Exp", ["x"], ["e"]), helper.make_node("Mul", ["e", "bf"], ["p"])]
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(_at_zero_model(nodes), model)
    x = np.random.default_rng(0).uniform(0.2, 0.8, (3, 4)).astype(np.float32)
    x[:, 1] = 0
    np.save(data, x)
    r = run(["check", model, data, "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["jumps"] > 0 and not row["branch_points"] and row["entries_judged"]
    fails_when_ten_percent_wrong(monkeypatch, model, data)


def test_jumps_are_differences_growing_as_one_over_the_step():
    from jaccli.oracle import _jumps, verdict

    h = np.array([4.0, 1.0, 0.25])
    jump = 0.3 / (2 * h)  # a step of 0.3 at the point: the differences 0.3 / 2h
    smooth, kink = np.full(3, 1.7), np.array([0.5, 0.9, 1.0])
    fds = [np.array([[[j, s, k, -j]]]) for j, s, k in zip(jump, smooth, kink)]
    fds[2][0, 0, 3] = -jump[2] * 7  # no longer growing as 1/step
    assert _jumps(fds, noise=1e-3).ravel().tolist() == [True, False, False, False]
    assert not _jumps(fds, noise=1.0).any()  # within the oracle's rounding, nothing is called a jump
    row = {"entry_error": 0.0, "directional_error": 0.0, "max_abs_error": 0.0, "max_abs_direction_error": 0.0, "noise": 0.0,
           "entries_judged": False, "directions_judged": False}
    assert verdict(row, 1e-3) == "unclear"
    assert verdict({**row, "entries_judged": True, "entry_error": 5e-3, "max_abs_error": 5e-3}, 1e-3) == "FAIL"  # alone: within tol
    assert verdict({**row, "entries_judged": True, "entry_error": 5e-4}, 1e-3) == "pass"


def test_modes_agree_and_flat_and_outputs(tmp_path):
    model, data = paths("cnn")
    x = np.load(data)
    Jf = jaccli.input_jacobian(model, x, mode="forward")
    Jr = jaccli.input_jacobian(model, x, mode="reverse")
    np.testing.assert_allclose(Jf, Jr, rtol=1e-4, atol=1e-6)
    assert Jf.shape == (16, 3, 1, 12, 12)
    flat = jaccli.input_jacobian(model, x, flat=True)
    assert flat.shape == (16, 3, 144)
    sub = jaccli.input_jacobian(model, x, outputs="1:3")
    np.testing.assert_allclose(sub, Jr[:, 1:3], rtol=1e-5, atol=1e-7)
    G, cols = jaccli.param_jacobian(model, x, outputs="2")
    Gall, _ = jaccli.param_jacobian(model, x)
    np.testing.assert_allclose(G[:, 0], Gall[:, 2], rtol=1e-5, atol=1e-7)


def test_param_glob_selects_tensors():
    model, data = paths("mlp_classifier")
    G, cols = jaccli.param_jacobian(model, np.load(data), params=["fc3.*"])
    assert [c["name"] for c in cols] == ["fc3.weight", "fc3.bias"]
    Gall, allcols = jaccli.param_jacobian(model, np.load(data))
    off = next(c["offset"] for c in allcols if c["name"] == "fc3.weight")
    np.testing.assert_array_equal(G, Gall[..., off: off + G.shape[-1]])


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 1e-5)])
def test_tiny_memory_budget_gives_the_same_result(dtype, rtol):
    # chunks change BLAS blocking, so float32 agrees to rounding, float64 to 1e-12: relative to
    # each entry, or, for an entry that is a sum of larger terms cancelling, to the largest
    # entry (float32's rounding of terms near 1 is 6e-8; a difference of 1.8e-7 was seen)
    model, data = paths("cnn")
    x = np.load(data)
    r_full = jaccli.input_jacobian(model, x, dtype=dtype, return_result=True)
    r_small = jaccli.input_jacobian(model, x, dtype=dtype, max_memory=200_000, return_result=True)
    assert r_small.chunks[0] < r_full.chunks[0]
    np.testing.assert_allclose(r_small.value, r_full.value, rtol=rtol, atol=rtol * 0.1 * np.abs(r_full.value).max())
    G = jaccli.param_jacobian(model, x, dtype=dtype, return_result=True)
    G2 = jaccli.param_jacobian(model, x, dtype=dtype, max_memory=300_000, return_result=True)
    assert G2.chunks < G.chunks
    np.testing.assert_allclose(G2.value, G.value, rtol=rtol, atol=rtol * 0.1 * np.abs(G.value).max())


# ---- formats ----------------------------------------------------------------------------------


def test_output_formats_round_trip(tmp_path):
    model, data = paths("mlp_classifier")
    ref = jaccli.input_jacobian(model, np.load(data))
    for fmt in ("npy", "npz", "csv"):
        out = tmp_path / f"J.{fmt}"
        assert run(["input", model, data, "-o", str(out), "-q"]).exit_code == 0
        if fmt == "npy":
            got = np.load(out)
        elif fmt == "npz":
            z = np.load(out)
            got = z["jacobian"]
            assert z["outputs"].shape == (32, 4)
        else:
            lines = out.read_text().splitlines()
            header = lines[0].split(",")
            assert header[:3] == ["sample", "output", "x[0]"]
            assert len(lines) == 1 + 32 * 4
            got = np.array([[float(v) for v in ln.split(",")[2:]] for ln in lines[1:]]).reshape(ref.shape)
        np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_params_npz_holds_column_map(tmp_path):
    model, data = paths("regression_mlp")
    out = tmp_path / "G.npz"
    assert run(["params", model, data, "-o", str(out), "-q"]).exit_code == 0
    z = np.load(out)
    cols = json.loads(bytes(z["columns"]).decode())
    assert [c["name"] for c in cols][:2] == ["l1.weight_t", "l1.bias"]
    assert z["jacobian"].shape == (64, 1, sum(c["size"] for c in cols))


def test_params_csv_names_parameter_entries(tmp_path):
    model, data = paths("regression_mlp")
    out = tmp_path / "G.csv"
    assert run(["params", model, data, "-o", str(out), "-q", "--param", "l3.*"]).exit_code == 0
    header = out.read_text().splitlines()[0].split(",")
    assert header[:4] == ["sample", "output", "l3.weight_t[0][0]", "l3.weight_t[1][0]"]
    assert header[-1] == "l3.bias[0]" and len(header) == 2 + 33


def test_input_formats(tmp_path):
    model, data = paths("cnn")
    x = np.load(data)[:5]
    ref = jaccli.input_jacobian(model, x)
    np.savez(tmp_path / "x.npz", x=x)
    np.savetxt(tmp_path / "x.csv", x.reshape(5, -1), delimiter=",", header=",".join(f"f{i}" for i in range(144)), comments="")
    np.savetxt(tmp_path / "xh.csv", x.reshape(5, -1), delimiter=",")
    np.save(tmp_path / "one.npy", x[0])
    for src in ("x.npz", "x.csv", "xh.csv"):
        out = tmp_path / f"J-{src}.npy"
        r = run(["input", model, str(tmp_path / src), "-o", str(out), "-q"])
        assert r.exit_code == 0, r.output
        np.testing.assert_allclose(np.load(out), ref, rtol=1e-5, atol=1e-7)
    out = tmp_path / "one.out.npy"
    assert run(["input", model, str(tmp_path / "one.npy"), "-o", str(out), "-q"]).exit_code == 0
    np.testing.assert_allclose(np.load(out), ref[:1], rtol=1e-5, atol=1e-7)  # one sample takes other BLAS paths than five


def test_stdin_and_stdout_with_runner(tmp_path):
    model, data = paths("mlp_classifier")
    with open(data, "rb") as f:
        raw = f.read()
    r = CliRunner().invoke(main, ["input", model, "-", "-o", "-", "-q"], input=raw)
    assert r.exit_code == 0
    import io

    J = np.load(io.BytesIO(r.stdout_bytes))
    np.testing.assert_allclose(J, jaccli.input_jacobian(model, np.load(data)), rtol=1e-6)


def test_real_pipeline_through_subprocess(tmp_path):
    model, data = paths("regression_mlp")
    jaccli_bin = os.path.join(os.path.dirname(sys.executable), "jaccli")
    cmd = (f"cat {data} | {jaccli_bin} input {model} - -o - | "
           f"{sys.executable} -c \"import io,numpy,sys; J=numpy.load(io.BytesIO(sys.stdin.buffer.read())); print(J.shape, float(abs(J).sum()))\"")
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ref = jaccli.input_jacobian(model, np.load(data))
    shape, total = p.stdout.strip().rsplit(" ", 1)
    assert shape == str(ref.shape)
    assert abs(float(total) - float(np.abs(ref).sum())) < 1e-3
    assert "Input Jacobian" in p.stderr  # the summary went to stderr, the data to stdout


def test_json_summary(tmp_path):
    model, data = paths("regression_mlp")
    r = run(["params", model, data, "--json"])
    d = json.loads(r.output)
    assert d["jacobian_shape"] == [64, 1, 6 * 32 + 32 + 32 * 32 + 32 + 32 + 1]
    assert abs(sum(p["grad_norm_share"] for p in d["parameters"]) - 1) < 1e-9
    assert d["stats"]["frobenius_norm"]["min"] > 0


def test_inspect_and_ops():
    model, _ = paths("cnn")
    r = run(["inspect", model])
    assert r.exit_code == 0
    for word in ("conv1.weight", "MaxPool", "supported", "float32[N×1×12×12]"):
        assert word in r.output
    r = run(["ops"])
    assert "Conv" in r.output and "BatchNormalization" in r.output


def test_errors_are_one_line(tmp_path):
    model, data = paths("mlp_classifier")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 5), np.float32))
    r = CliRunner().invoke(main, ["input", model, str(bad), "-o", str(tmp_path / "J.npy")])
    assert r.exit_code == 1
    assert r.output.startswith("Error:") and "axis 1 is 5, not 8" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "J.npy").exists()
    r = CliRunner().invoke(main, ["input", model, data, "--wrt", "nope"])
    assert r.exit_code == 2 and "no input or value named 'nope'" in r.output  # a usage error


@pytest.mark.parametrize("params", [False, True])
def test_check_of_a_model_no_runtime_runs(tmp_path, monkeypatch, params):
    """An early export's ConstantFill runs in neither onnxruntime nor onnx's reference evaluator:
    check falls back on jaccli's own float64 forward, says so, and still fails a wrong Jacobian."""
    from onnx import TensorProto, helper, numpy_helper, save

    from jaccli.oracle import check

    nodes = [helper.make_node("ConstantFill", [], ["c"], shape=[1], value=0.5),
             helper.make_node("Mul", ["x", "c"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["m"]),
             helper.make_node("Tanh", ["m"], ["y"])]
    W = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 7)])
    m.ir_version = 3
    path = str(tmp_path / "old.onnx")
    save(m, path)
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    d = check(path, x, params=params)
    assert d["ok"] and d["oracle"] == "jaccli's own forward" and "ConstantFill" in d["oracle_note"], d
    wrong_by_ten_percent(monkeypatch, "param_jacobian" if params else "input_jacobian")
    assert not check(path, x, params=params)["ok"]


def test_a_zero_from_below_prints_as_zero():
    """check's 'within ... of the float64 one' printed '-0' when the difference was a negative zero."""
    from jaccli.report import _fmt

    assert _fmt(-0.0) == "0" and _fmt(0.0) == "0" and _fmt(-2.5e-7) == "-2.5e-07" and _fmt(float("inf")) == "∞"


def test_check_spreads_its_rows_over_many_outputs(tmp_path, monkeypatch):
    """A Jacobian's cost grows with its rows: over 64 output elements, check takes every n-th
    (and says so), and a wrong rule is still caught; --outputs chooses others."""
    from gradcheck import one_input_model
    from onnx import helper, save

    import jaccli.oracle as oracle

    rng = np.random.default_rng(3)
    W = rng.standard_normal((6, 150)).astype(np.float32)
    m = one_input_model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])], {"W": W}, (6,))
    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")
    save(m, model)
    np.save(data, rng.standard_normal((2, 6)).astype(np.float32))
    seen = []
    real = oracle.input_jacobian
    monkeypatch.setattr(oracle, "input_jacobian", lambda *a, **k: seen.append(k["outputs"]) or real(*a, **k))
    r = run(["check", model, data, "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["rows"] == {"slice": "::3", "checked": 50, "of": 150} and set(seen) == {"::3"}
    r = run(["check", model, data])
    assert "50 of its 150 output elements, evenly spread (--outputs ::3)" in " ".join(r.output.split())
    seen.clear()
    r = run(["check", model, data, "--outputs", "0:5", "--json"])
    assert r.exit_code == 0 and "rows" not in json.loads(r.output)["rows"][0] and set(seen) == {"0:5"}
    monkeypatch.undo()
    fails_when_ten_percent_wrong(monkeypatch, model, data)


def test_a_graph_that_mixes_samples_the_probe_pair_hides(tmp_path):
    """x minus its minimum over the batch, with samples 0 and 1 the same: the probe's pair
    cannot tell (each is its own minimum), the last sample can. Refused in one line, from the
    API and from the command line, and no output file is left behind."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("ReduceMin", ["x"], ["m"], axes=[0], keepdims=1),
                           helper.make_node("Sub", ["x", "m"], ["d"]), helper.make_node("Mul", ["d", "w"], ["y"])],
                          "mix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor("w", TensorProto.FLOAT, [3], [0.5, -1.0, 2.0])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path, data, out = tmp_path / "mix.onnx", tmp_path / "x.npy", tmp_path / "J.npy"
    path.write_bytes(m.SerializeToString())
    x = np.array([[1, 0, 0], [1, 0, 0], [2, 3, 3]], np.float32)
    np.save(data, x)
    for fn in (jaccli.input_jacobian, jaccli.param_jacobian):
        with pytest.raises(jaccli.errors.DataError, match="sample 2 changes when another sample is in the same batch"):
            fn(str(path), x)
        fn(str(path), x[:2])  # the pair alone is fine: it does not mix
    r = CliRunner().invoke(main, ["input", str(path), str(data), "-o", str(out)])
    assert r.exit_code != 0 and "sample 2 changes" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".J.npy")]


def _shape_constants_model():
    """y = Resize(Reshape(x @ W, shape)) as the TorchScript exporter writes it: the Reshape's
    shape a float constant cast to int64 (opsets 7 and 8), the Resize's scales concatenated from
    float constants (opset 11 on). Float initializers of rank 1 that reach y, but only as a shape
    and a scale."""
    from gradcheck import one_input_model
    from onnx import TensorProto, helper

    f = np.float32
    inits = {"W": np.random.default_rng(0).standard_normal((6, 8)).astype(f), "shape": np.array([-1, 2, 2, 2], f),
             "one": np.array([1, 1], f), "two": np.array([2, 2], f), "roi": np.array([], f)}
    n = helper.make_node
    nodes = [n("MatMul", ["x", "W"], ["m"]), n("Cast", ["shape"], ["shape64"], to=TensorProto.INT64),
             n("Reshape", ["m", "shape64"], ["r"]), n("Concat", ["one", "two"], ["scales"], axis=0),
             n("Resize", ["r", "roi", "scales"], ["y"], mode="linear")]
    return one_input_model(nodes, inits, (6,))


def test_shape_and_scale_constants_are_no_parameters(tmp_path):
    """Only W is a parameter; `check --params` passes (it perturbed the shape and the scales,
    which changed the output's shape, and failed with an internal error)."""
    import onnx

    onnx.save(_shape_constants_model(), tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    G, cols = jaccli.param_jacobian(str(tmp_path / "m.onnx"), x)
    assert [c["name"] for c in cols] == ["W"] and G.shape == (3, 2, 4, 4, 48)
    r = CliRunner().invoke(main, ["check", "--params", "--json", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")])
    assert r.exit_code == 0 and json.loads(r.output)["ok"], r.output


def test_an_empty_output_is_one_line(tmp_path):
    """A Resize by 0.4 of an axis of 2 leaves none of it (as onnxruntime has it): no Jacobian,
    one line, no file."""
    from gradcheck import one_input_model
    from onnx import helper, save

    scales = {"s": np.array([1, 1, 0.4, 1], np.float32)}
    save(one_input_model([helper.make_node("Resize", ["x", "", "s"], ["y"])], scales, (1, 2, 2)), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((3, 1, 2, 2), np.float32))
    r = CliRunner().invoke(main, ["input", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "J.npy")])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and not (tmp_path / "J.npy").exists(), r.output
    assert "output 'y' is empty for these samples (shape (1, 0, 2) a sample)" in r.output, r.output


def test_check_passes_over_outputs_with_nothing_to_check(tmp_path):
    """A recurrent cell's state that depends on no parameter, an output made of the weights alone,
    one of a second input: `check` checks the others and names these, where it stopped at the
    first with an error (exit 2). With none left, the error stands."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    W = rng.standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Identity", ["x"], ["state"]),
         helper.make_node("Tanh", ["W"], ["w"]), helper.make_node("Neg", ["u"], ["v"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info("u", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "state", "w", "v")], [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((3, 4)).astype(np.float32), u=rng.standard_normal((3, 2)).astype(np.float32))
    for args, checked, skipped in ((["--params"], ["y"], ["state", "w", "v"]), ([], ["y", "state"], ["w", "v"])):
        r = CliRunner().invoke(main, ["check", "--json", *args, str(tmp_path / "m.onnx"), str(tmp_path / "x.npz")])
        d = json.loads(r.output)
        assert r.exit_code == 0 and d["ok"], r.output
        assert [row["output"] for row in d["rows"]] == checked
        assert [line.split("'")[1] for line in d["skipped"]] == skipped
    r = CliRunner().invoke(main, ["check", "--params", "--of", "state", str(tmp_path / "m.onnx"), str(tmp_path / "x.npz")])
    assert r.exit_code == 2 and "depends on no float parameter" in r.output
