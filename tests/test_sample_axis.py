"""Outputs whose first axis is not the samples', and weights kept in Constant nodes: exporters'
layouts that the drivers take as they are.

- Time-major outputs (T, N, C), as OCR models' CTC heads and recurrent layers without
  batch_first write them: the probe finds the samples' axis and the Jacobian is taken of the
  output with that axis moved first. The reference is the same network written batch-first.
- A model whose batch is fixed at 1 gives its whole output to its one sample, whatever its
  layout: its one axis of size 1 is taken out, or the output is kept whole.
- A model that stores every weight as a Constant node (paddle2onnx) has them as parameters.
"""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.errors import DataError
from jaccli.oracle import check

from gradcheck import wrong_by_ten_percent

RNG = np.random.default_rng(5)
W = RNG.standard_normal((4, 5)).astype(np.float32)
B = RNG.standard_normal(5).astype(np.float32)


def model(nodes, x_shape, y_shape, inits, opset=13):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def weights():
    return [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")]


def batch_first():
    """x (N, T, 4) -> tanh(x W + B) (N, T, 5)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["a"]),
             helper.make_node("Tanh", ["a"], ["y"])]
    return model(nodes, ["N", 3, 4], ["N", 3, 5], weights())


def time_major(inside):
    """The same network with a time-major output (T, N, 5): transposed at the end, or (`inside`)
    before the product, so that the layer's own values are time-major too (its weight's
    per-sample cotangents cannot then be told apart in a batch)."""
    if inside:
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]), helper.make_node("MatMul", ["xt", "W"], ["h"]),
                 helper.make_node("Add", ["h", "B"], ["a"]), helper.make_node("Tanh", ["a"], ["y"])]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["a"]),
                 helper.make_node("Tanh", ["a"], ["t"]), helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0, 2])]
    return model(nodes, ["N", 3, 4], [3, "N", 5], weights())


X = RNG.standard_normal((4, 3, 4)).astype(np.float32)


@pytest.mark.parametrize("inside", [False, True])
def test_a_time_major_output_gives_the_batch_first_jacobians(inside):
    want = jaccli.input_jacobian(batch_first(), X)
    r = jaccli.input_jacobian(time_major(inside), X, return_result=True)
    assert r.value.shape == (4, 3, 5, 3, 4) == want.shape
    np.testing.assert_allclose(r.value, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.outputs, np.tanh(X @ W + B), rtol=1e-6)  # the outputs, samples first too
    assert any("carries the samples on axis 1" in n for n in r.notes), r.notes
    G_want, cols = jaccli.param_jacobian(batch_first(), X)
    G, cols2 = jaccli.param_jacobian(time_major(inside), X)
    assert cols == cols2
    np.testing.assert_allclose(G, G_want, rtol=1e-5, atol=1e-7)  # float32 products in another order


@pytest.mark.parametrize("params", [False, True])
def test_check_of_a_time_major_output(params, monkeypatch):
    """The oracle's output is laid out as ours (the same node appended to its model); a Jacobian
    10% off still FAILs."""
    d = check(time_major(True), X, params=params)
    assert d["ok"] and d["oracle"].startswith("onnxruntime") and d["rows"][0]["output"] == "y", d
    wrong_by_ten_percent(monkeypatch, "param_jacobian" if params else "input_jacobian")
    assert not check(time_major(True), X, params=params)["ok"]


def batch_one(shape_out, declared=None):
    """Declared batch 1, its output reshaped to `shape_out` (the batch squeezed, or moved), and
    declared as `declared` (a rank short, as a CRNN's export declares its (T, 1, C) output)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Reshape", ["t", "s"], ["y"])]
    inits = weights()[:1] + [numpy_helper.from_array(np.array(shape_out, np.int64), "s")]
    if declared:  # the target shape computed from the input's, whose length is left open, as that export does
        nodes[2:2] = [helper.make_node("Shape", ["t"], ["st"]), helper.make_node("Gather", ["st", "one"], ["T"]),
                      helper.make_node("Concat", ["T", "rest"], ["s"], axis=0)]
        inits = weights()[:1] + [numpy_helper.from_array(np.array([1], np.int64), "one"),
                                 numpy_helper.from_array(np.array(shape_out[1:], np.int64), "rest")]
    return model(nodes, [1, "T" if declared else 3, 4], list(declared or shape_out), inits)


@pytest.mark.parametrize("shape_out, per_sample, declared", [((15,), (15,), None), ((3, 1, 5), (3, 5), None),
                                                             ((3, 1, 5), (3, 5), [1, "T"]), ((3, 5), (3, 5), None),
                                                             ((1, 15, 1), (15, 1), None)])
def test_a_fixed_batch_of_one_gives_its_whole_output_to_its_sample(shape_out, per_sample, declared):
    """Squeezed (15,), or (3, 5): no axis of 1, the whole output; (3, 1, 5): its one axis of 1
    taken out; (1, 15, 1): the first axis is the samples', as before. The oracle runs the node
    that moves the axis, whatever the output's declared shape."""
    want = jaccli.input_jacobian(batch_first(), X)[..., :].reshape(4, 15, 3, 4)
    r = jaccli.input_jacobian(batch_one(shape_out, declared), X, return_result=True)
    assert r.value.shape == (4, *per_sample, 3, 4)
    np.testing.assert_allclose(r.value.reshape(4, 15, 3, 4), want * _without_bias_factor(), rtol=1e-5, atol=1e-6)
    d = check(batch_one(shape_out, declared), X)
    assert d["ok"] and d["oracle"].startswith("onnxruntime"), d


def _without_bias_factor():
    """batch_one has no bias: the batch-first Jacobian rescaled by the tanh slopes without it."""
    with_bias = 1 - np.tanh(X @ W + B) ** 2
    without = 1 - np.tanh(X @ W) ** 2
    return (without / with_bias).reshape(4, 15, 1, 1)


def test_an_output_without_a_sample_axis_is_still_refused():
    """A dynamic batch whose output does not grow with the samples (a mean over them, reshaped)
    is refused in one line, as before."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0, 1], keepdims=0), helper.make_node("Tanh", ["m"], ["y"])]
    with pytest.raises(DataError, match="not the sample axis"):
        jaccli.input_jacobian(model(nodes, ["N", 3, 4], [4], []), X)


def held_in_constants():
    """batch_first with its weights in Constant nodes and no initializer, as paddle2onnx writes."""
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W)),
             helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(B)),
             helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32)))]
    nodes += [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["a"]),
              helper.make_node("Tanh", ["a"], ["t"]), helper.make_node("Mul", ["t", "half"], ["y"])]
    return model(nodes, ["N", 3, 4], ["N", 3, 5], [])


def test_weights_held_in_constant_nodes_are_parameters(tmp_path):
    G_want, cols_want = jaccli.param_jacobian(batch_first(), X)
    G, cols = jaccli.param_jacobian(held_in_constants(), X)
    assert [c["name"] for c in cols] == ["W", "B"]  # the scalar 0.5 is no parameter, as an initializer would not be
    np.testing.assert_allclose(G, 0.5 * G_want, rtol=1e-6, atol=1e-7)
    d = check(held_in_constants(), X, params=True)
    assert d["ok"] and d["oracle"].startswith("onnxruntime"), d
    from onnx import save

    from jaccli.inspect import describe

    save(held_in_constants(), str(tmp_path / "m.onnx"))
    info = describe(str(tmp_path / "m.onnx"))
    assert info["held_weights"] == 3 and [p["name"] for p in info["parameters"]] == ["W", "B"]


def test_constant_nodes_beside_initializers_stay_constants():
    """A model with float initializers keeps its Constant nodes as constants (an exporter's
    masks and epsilons beside its weights)."""
    m = held_in_constants()
    m.graph.node[0].CopyFrom(helper.make_node("Identity", ["W0"], ["W"]))
    m.graph.initializer.append(numpy_helper.from_array(W, "W0"))
    _, cols = jaccli.param_jacobian(m, X)
    assert [c["name"] for c in cols] == ["W0"]


def test_the_oracles_model_runs_whatever_the_declared_shape():
    """A CRNN's export declares its (T, 1, C) output as (1, T): onnxruntime's type inference of
    the appended Transpose would read the declared rank and refuse, so the declaration goes."""
    import onnxruntime as ort

    from jaccli.model import load
    from jaccli.oracle import _with_appended
    from jaccli.drivers import prepare_feeds, samples_first

    m = batch_one((3, 1, 5), [1, "T"])
    loaded = load(m)
    feeds, _ = prepare_feeds(loaded, X, np.float32)
    name, note = samples_first(loaded, "y", feeds)
    assert name != "y" and "axis 1" in note
    proto = _with_appended(m, name, loaded.appended[name])
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = s.run([name], {"x": X[:1]})[0]
    np.testing.assert_allclose(y, np.tanh(X[:1] @ W).reshape(1, 3, 5), rtol=1e-6)



def test_ancestors_kept_as_the_graph_grows():
    """Model.ancestors is kept per targets and per number of nodes: the node that samples_first
    appends is an ancestor of its output at once, and the kept answers stay the graph's."""
    from jaccli.drivers import prepare_feeds, samples_first
    from jaccli.model import load

    loaded = load(batch_one((3, 1, 5), [1, "T"]))
    before = [n.name for n in loaded.ancestors(["y"])]
    assert before == [n.name for n in loaded._ancestors(["y"])]
    feeds, _ = prepare_feeds(loaded, X, np.float32)
    name, _ = samples_first(loaded, "y", feeds)
    assert [n.name for n in loaded.ancestors(["y"])] == before
    assert [n.name for n in loaded.ancestors([name])] == [n.name for n in loaded._ancestors([name])] == before + [
        loaded.nodes[-1].name]


# ---- inputs with the samples on another axis: a recurrent state (layers, N, hidden) ----------------

A = RNG.standard_normal((4, 3)).astype(np.float32)


def with_state(batch_dim="batch", samples_first_state=False):
    """y = tanh(x A + state[0] + 2 state[1]) (N, 3) and state_out = tanh(state) * y, (2, N, 3):
    the input x (N, 4) beside a state (2, N, 3) whose batch is declared as `batch_dim`
    (torch.onnx's dynamic axes; None leaves it open, as some exporters do). With
    `samples_first_state`, the reference: the same network taking the state as (N, 2, 3)."""
    nodes = [helper.make_node("Transpose", ["s"], ["state"], perm=[1, 0, 2])] if samples_first_state else []
    nodes += [helper.make_node("MatMul", ["x", "A"], ["h"]),
              helper.make_node("Gather", ["state", "zero"], ["s0"], axis=0), helper.make_node("Gather", ["state", "one"], ["s1"], axis=0),
              helper.make_node("Mul", ["s1", "two"], ["s1b"]), helper.make_node("Sum", ["h", "s0", "s1b"], ["a"]),
              helper.make_node("Tanh", ["a"], ["y"]), helper.make_node("Tanh", ["state"], ["ts"]),
              helper.make_node("Mul", ["ts", "y"], ["state_out"])]
    inits = [numpy_helper.from_array(A, "A"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.float32(2), "two")]
    state = helper.make_tensor_value_info("s", TensorProto.FLOAT, [batch_dim, 2, 3]) if samples_first_state else \
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch_dim, 3])
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4]), state],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 3]),
                           helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, batch_dim, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


XS = RNG.standard_normal((5, 4)).astype(np.float32)
STATE = RNG.standard_normal((2, 5, 3)).astype(np.float32)  # the model's layout: samples on axis 1


@pytest.mark.parametrize("declared", ["batch", None])
@pytest.mark.parametrize("wrt, of", [("x", "y"), ("state", "y"), ("state", "state_out")])
def test_a_state_with_its_samples_on_axis_1(declared, wrt, of):
    """Found from the declared batch dimension, or named (sample_axes): the data comes in the
    model's layout, and the Jacobians equal those of the network that takes the state samples
    first."""
    ref = jaccli.input_jacobian(with_state(samples_first_state=True), {"x": XS, "s": STATE.transpose(1, 0, 2)},
                                wrt="s" if wrt == "state" else wrt, of=of)
    axes = None if declared else {"state": 1}
    J = jaccli.input_jacobian(with_state(declared), {"x": XS, "state": STATE}, wrt=wrt, of=of, sample_axes=axes)
    assert J.shape == ref.shape
    np.testing.assert_allclose(J, ref, rtol=1e-6, atol=1e-7)
    d = check(with_state(declared), {"x": XS, "state": STATE}, wrt=wrt, of=of, sample_axes=axes)
    assert d["ok"] and d["oracle"].startswith("onnxruntime"), d


def test_a_state_left_open_is_refused_with_the_way_out():
    """Undeclared, its axis 1 holds the samples but axis 0 is read as them: refused in one line
    that names --sample-axis, not answered for the wrong samples."""
    with pytest.raises(DataError, match="--sample-axis state=AXIS"):
        jaccli.input_jacobian(with_state(None), {"x": XS, "state": STATE})


def test_a_state_of_a_batch_fixed_at_one_is_refused_with_its_axis_named():
    """Exported with a batch of one (Silero VAD's OpenVINO export: input [1, 576], state
    [2, 1, 128]), the state's samples sit on its axis of size 1, which nothing declares: the
    refusal names --sample-axis with that axis; so named, each sample runs alone and its
    Jacobians are those of the network that takes the state samples first."""
    with pytest.raises(DataError, match=r"axis 1 is 5, not 1; if axis 1 holds the samples .* --sample-axis state=1"):
        jaccli.input_jacobian(with_state(1), {"x": XS, "state": STATE})
    ref = jaccli.input_jacobian(with_state(samples_first_state=True), {"x": XS, "s": STATE.transpose(1, 0, 2)}, wrt="s")
    J = jaccli.input_jacobian(with_state(1), {"x": XS, "state": STATE}, wrt="state", sample_axes={"state": 1})
    np.testing.assert_allclose(J, ref, rtol=1e-6, atol=1e-7)


def test_sample_axis_on_the_command_line(tmp_path):
    from click.testing import CliRunner
    from onnx import save

    from jaccli.cli import main

    path, data = str(tmp_path / "m.onnx"), str(tmp_path / "x.npz")
    save(with_state(None), path)
    np.savez(data, x=XS, state=STATE)
    run = lambda *a: CliRunner().invoke(main, [str(v) for v in a])  # noqa: E731
    r = run("input", path, data, "--wrt", "state", "--sample-axis", "state=1", "-o", tmp_path / "J.npy", "-q")
    assert r.exit_code == 0, r.output
    want = jaccli.input_jacobian(with_state(samples_first_state=True), {"x": XS, "s": STATE.transpose(1, 0, 2)}, wrt="s")
    np.testing.assert_allclose(np.load(tmp_path / "J.npy"), want, rtol=1e-6, atol=1e-7)
    r = run("check", path, data, "--wrt", "state", "--sample-axis", "state=1")
    assert r.exit_code == 0 and "pass" in r.output, r.output
    for bad, words in ((["--sample-axis", "state"], "NAME=AXIS"), (["--sample-axis", "nosuch=1"], "no model input"),
                       (["--sample-axis", "state=3"], "rank 3")):
        r = run("input", path, data, *bad)
        assert r.exit_code != 0 and any(w in r.output for w in [words]) and "Traceback" not in r.output, r.output
    r = run("inspect", str(tmp_path / "declared.onnx")) if save(with_state(), str(tmp_path / "declared.onnx")) is None else None
    assert "input 'state' declares its batch on axis 1" in r.output.replace("\n", " "), r.output


def samples_last():
    """z (2, 3, N), samples last, read inside an If's branch (a sub-graph reads it from the outer
    graph): y = tanh(z) * W3, also (2, 3, N)."""
    W3 = RNG.standard_normal((2, 3, 1)).astype(np.float32)
    then = helper.make_graph([helper.make_node("Tanh", ["z"], ["t"]), helper.make_node("Mul", ["t", "W3"], ["r"])], "then", [],
                             [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["z"], ["r2"])], "else", [], [helper.make_tensor_value_info("r2", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["yes"], ["y"], then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, "batch_size"]),
                                       helper.make_tensor_value_info("w", TensorProto.FLOAT, ["batch_size", 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, "batch_size"])],
                          [numpy_helper.from_array(W3, "W3"), numpy_helper.from_array(np.array(True), "yes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m, W3


def test_samples_on_the_last_axis_read_inside_a_branch():
    """Declared on axis 2 (beside an input 'w' that declares it first): moved back to axis 2 for
    the graph, and read so inside the If's branch; the output, samples last too, is moved first."""
    m, W3 = samples_last()
    z = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    J = jaccli.input_jacobian(m, {"z": z, "w": np.zeros((4, 1), np.float32)}, wrt="z")
    assert J.shape == (4, 2, 3, 2, 3)
    for n in range(4):
        np.testing.assert_allclose(J[n].reshape(6, 6), np.diag(((1 - np.tanh(z[..., n]) ** 2) * W3[..., 0]).ravel()), rtol=1e-5,
                                   atol=1e-7)
    d = check(m, {"z": z, "w": np.zeros((4, 1), np.float32)}, wrt="z")
    assert d["ok"], d


def test_a_0d_input_beside_the_samples():
    """A 0-d input (Silero VAD's sample rate) has no samples: check feeds it whole to every
    perturbed copy, wherever it comes among the inputs."""
    nodes = [helper.make_node("Cast", ["rate"], ["r"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "r"], ["m"]),
             helper.make_node("Tanh", ["m"], ["y"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("rate", TensorProto.INT64, []),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    feeds = {"rate": np.array(2, np.int64), "x": XS}
    J = jaccli.input_jacobian(m, feeds, wrt="x")
    np.testing.assert_allclose(J, np.stack([np.diag(2 * (1 - np.tanh(2 * x) ** 2)) for x in XS]), rtol=1e-5)
    assert check(m, feeds, wrt="x")["ok"]


def test_sample_axes_for_a_loaded_model_are_its_own():
    """A model loaded without them is not quietly read with other sample axes."""
    from jaccli.errors import UsageError

    m = jaccli.load(with_state(None))
    with pytest.raises(UsageError, match="jaccli.load"):
        jaccli.input_jacobian(m, {"x": XS, "state": STATE}, sample_axes={"state": 1})
    m = jaccli.load(with_state(None), sample_axes={"state": 1})
    assert jaccli.input_jacobian(m, {"x": XS, "state": STATE}, sample_axes={"state": 1}).shape == (5, 3, 4)


def lstm(layout):
    """One LSTM layer, input 4, hidden 3, over 5 steps: time-major (layout 0: X (seq, batch, 4),
    Y (seq, 1, batch, 3)) as torch exports nn.LSTM without batch_first, with dynamic axes
    named 'seq' and 'batch'; or batch-first (layout 1), the reference."""
    rng = np.random.default_rng(8)
    W, R, Bb = (rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((1, 12, 4), (1, 12, 3), (1, 24)))
    x_dims = ["seq", "batch", 4] if layout == 0 else ["batch", "seq", 4]
    g = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=3, layout=layout)], "lstm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R"), numpy_helper.from_array(Bb, "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def test_a_time_major_sequence_found_from_its_declared_batch():
    """x declared ('seq', 'batch', 4): its samples are on axis 1, its data comes time-major, and
    the output (seq, 1, batch, 3) is moved too. Each sample's Jacobian, (5, 1, 3) by (5, 4),
    equals that of the batch-first LSTM, and check passes on the time-major one."""
    xs = RNG.standard_normal((3, 5, 4)).astype(np.float32)  # (batch, seq, 4)
    want = jaccli.input_jacobian(lstm(1), xs)
    r = jaccli.input_jacobian(lstm(0), xs.transpose(1, 0, 2), return_result=True)
    assert r.value.shape == want.shape == (3, 5, 1, 3, 5, 4)
    np.testing.assert_allclose(r.value, want, rtol=1e-5, atol=1e-7)
    assert jaccli.load(lstm(0)).sample_axes == {"x": 1}
    G_want, _ = jaccli.param_jacobian(lstm(1), xs)
    G, _ = jaccli.param_jacobian(lstm(0), xs.transpose(1, 0, 2))
    np.testing.assert_allclose(G, G_want, rtol=1e-5, atol=1e-7)
    assert check(lstm(0), xs.transpose(1, 0, 2))["ok"]


def test_an_n_alone_is_not_taken_for_the_batch():
    """A fixed batch of 1 with ('N' points, 3) after it: N counts points, not samples (without
    another input that declares N first); a 'batch' there is the batch."""
    def points(dims):
        g = helper.make_graph([helper.make_node("ReduceMax", ["p"], ["y"], axes=[1], keepdims=0)], "pts",
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        return m

    assert jaccli.load(points([1, "N", 3])).sample_axes == {}
    assert jaccli.load(points([1, "batch_size", 3])).sample_axes == {"p": 1}


def test_weights_held_in_the_branches_of_an_if():
    """Spox's Silero VAD keeps a network in each branch of an If, its weights as Constant nodes:
    they become parameters (read inside the branch), the taken branch's columns equal the
    network's with initializers, the other's are zero; check passes."""
    W2 = RNG.standard_normal((4, 5)).astype(np.float32)

    def branch(name, w):
        nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)),
                 helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["out"])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])

    nodes = [helper.make_node("Constant", [], ["yes"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["yes"], ["y"], then_branch=branch("then", W), else_branch=branch("else", W2))]
    m = model(nodes, ["N", 3, 4], ["N", 3, 5], [])
    plain = model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])], ["N", 3, 4], ["N", 3, 5],
                  [numpy_helper.from_array(W, "W")])
    G, cols = jaccli.param_jacobian(m, X)
    want, _ = jaccli.param_jacobian(plain, X)
    at = {c["name"]: slice(c["offset"], c["offset"] + c["size"]) for c in cols}
    assert set(at) == {"then/W", "else/W"}
    np.testing.assert_allclose(G[..., at["then/W"]], want, rtol=1e-6, atol=1e-7)
    assert not G[..., at["else/W"]].any()
    assert check(m, X, params=True)["ok"]


# ---- inputs with no sample axis (--sample-axis NAME=none) ----------------------------------------
A_NODES = RNG.standard_normal((5, 5)).astype(np.float32)  # a graph's mixing of its 5 nodes
W_NODES = RNG.standard_normal((3, 2)).astype(np.float32)


def graph_model(batched):
    """y = tanh(A x W) over a graph of 5 nodes with 3 features: x (5, 3) and y (5, 2), exported
    without a batch; or the same with one, x (N, 5, 3), each sample a whole graph (the reference)."""
    nodes = [helper.make_node("MatMul", ["A", "x"], ["ax"]), helper.make_node("MatMul", ["ax", "W"], ["h"]),
             helper.make_node("Tanh", ["h"], ["y"])]
    lead = ["N"] if batched else []
    return model(nodes, lead + ["nodes", 3], lead + ["nodes", 2],
                 [numpy_helper.from_array(A_NODES, "A"), numpy_helper.from_array(W_NODES, "W")])


def test_a_model_without_a_batch_takes_its_data_as_one_sample(tmp_path):
    """The data of an input of no sample axis is one sample whole: its input and parameter
    Jacobians are those of the same network with a batch, given that graph as its one sample;
    and they are the derivative by hand."""
    x = RNG.standard_normal((5, 3)).astype(np.float32)
    r = jaccli.input_jacobian(graph_model(False), x, sample_axes={"x": "none"}, return_result=True)
    want = jaccli.input_jacobian(graph_model(True), x[None])
    assert r.value.shape == (1, 5, 2, 5, 3)
    np.testing.assert_allclose(r.value, want, rtol=1e-6, atol=1e-7)
    y = np.tanh(A_NODES @ x @ W_NODES)
    np.testing.assert_allclose(r.value[0], np.einsum("ik,ij,lk->ikjl", 1 - y ** 2, A_NODES, W_NODES), rtol=1e-5, atol=1e-6)
    G, cols = jaccli.param_jacobian(graph_model(False), x, sample_axes={"x": None})  # None says it too
    G_want, _ = jaccli.param_jacobian(graph_model(True), x[None])
    assert [c["name"] for c in cols] == ["A", "W"]
    np.testing.assert_allclose(G, G_want, rtol=1e-6, atol=1e-7)
    assert check(graph_model(False), x, sample_axes={"*": "none"})["ok"]
    unshaped = graph_model(False)
    unshaped.graph.input[0].type.tensor_type.ClearField("shape")  # no rank to tell the sample axis by
    np.testing.assert_allclose(jaccli.input_jacobian(unshaped, x, sample_axes={"x": "none"}), want, rtol=1e-6, atol=1e-7)


def test_an_input_without_samples_is_shared_by_the_others_samples():
    """y = tanh(x W + c V): x has samples, the context c (4,) none; each sample's Jacobians, c's
    included, are those of the model given c copied into every sample."""
    V = RNG.standard_normal((4, 5)).astype(np.float32)

    def ctx_model(c_shape):
        nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["c", "V"], ["b"]),
                 helper.make_node("Add", ["a", "b"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
        g = helper.make_graph(nodes, "ctx", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                             helper.make_tensor_value_info("c", TensorProto.FLOAT, c_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(V, "V")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        return m

    x, c = RNG.standard_normal((6, 4)).astype(np.float32), RNG.standard_normal(4).astype(np.float32)
    copied = {"x": x, "c": np.repeat(c[None], 6, axis=0)}
    for wrt in ("x", "c"):
        r = jaccli.input_jacobian(ctx_model([4]), {"x": x, "c": c}, wrt=wrt, sample_axes={"c": "none"}, return_result=True)
        want = jaccli.input_jacobian(ctx_model(["N", 4]), copied, wrt=wrt, return_result=True)
        np.testing.assert_allclose(r.outputs, want.outputs, rtol=1e-5, atol=1e-6)  # runs of one sample: float32 rounding
        np.testing.assert_allclose(r.value, want.value, rtol=1e-5, atol=1e-6)


def test_no_sample_axis_on_the_command_line(tmp_path):
    """--sample-axis NAME=none and '*=none'; without it, the refusal says so (the graph fails on
    one sample, and on all five its nodes mix, as a batch's samples must not)."""
    from click.testing import CliRunner
    from onnx import save

    from jaccli.cli import main

    path, data = str(tmp_path / "g.onnx"), str(tmp_path / "x.npy")
    save(graph_model(False), path)
    x = RNG.standard_normal((5, 3)).astype(np.float32)
    np.save(data, x)
    run = lambda *a: CliRunner().invoke(main, [str(v) for v in a])  # noqa: E731
    want = jaccli.input_jacobian(graph_model(True), x[None])
    for spec in ("x=none", "*=none", "x=NONE"):
        r = run("input", path, data, "--sample-axis", spec, "-o", tmp_path / "J.npy", "-q")
        assert r.exit_code == 0, r.output
        np.testing.assert_allclose(np.load(tmp_path / "J.npy"), want, rtol=1e-6, atol=1e-7)
    r = run("check", path, data, "--sample-axis", "x=none")
    assert r.exit_code == 0 and "pass" in r.output, r.output
    r = run("input", path, data, "-o", tmp_path / "J.npy")  # it runs on all five, where its nodes mix: a batch, refused
    assert r.exit_code == 1 and "--sample-axis '*=none'" in " ".join(r.output.split()) and "Traceback" not in r.output
    r = run("input", path, data, "--sample-axis", "x=nothing")
    assert r.exit_code != 0 and "NAME=none" in r.output and "Traceback" not in r.output, r.output


def test_inspect_names_an_input_without_a_sample_axis():
    from rich.console import Console

    from jaccli.inspect import describe
    from jaccli.report import render_inspect

    info = describe(jaccli.load(graph_model(False), sample_axes={"x": None}))
    assert info["sample_axes"] == {"x": "none"}
    console = Console(record=True, width=200)
    render_inspect(console, info)
    assert "input 'x' has no sample axis" in console.export_text()


@pytest.mark.parametrize("inner", ["MatMul", "RNN"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_batch_of_one_squeezed_away(inner, n):
    """A model traced with a batch of one that squeezes it away: (1, T, B, D) -> (T, B, D). Its
    values have no sample axis; the first axis, or a recurrence's batch axis, holds rows of
    the one sample. Per-sample parameter cotangents were kept along them, as if they were
    samples: a crash, for one sample or several. Now the run of one sample shows it, and each
    sample runs alone with plain cotangents."""
    from gradcheck import fd_param_jacobian

    T_, B_, D, H = 2, 3, 4, 2
    inits = {"W": 0.5 * RNG.standard_normal((D, H)), "axis": np.array([0], np.int64)}
    if inner == "MatMul":
        body = [helper.make_node("MatMul", ["s", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["t"])]
    else:
        inits.update(Wr=0.5 * RNG.standard_normal((1, H, D)), R=0.5 * RNG.standard_normal((1, H, H)))
        body = [helper.make_node("RNN", ["s", "Wr", "R"], ["t"], hidden_size=H)]  # (T, 1, B, H)
    nodes = [helper.make_node("Squeeze", ["x", "axis"], ["s"]), *body, helper.make_node("Unsqueeze", ["t", "axis"], ["y"])]
    m = model(nodes, [1, T_, B_, D], None, [numpy_helper.from_array(np.asarray(v, np.float32 if v.dtype.kind == "f" else v.dtype), k)
                                             for k, v in inits.items()])
    x = RNG.standard_normal((n, T_, B_, D))
    names = ["W"] if inner == "MatMul" else ["Wr", "R"]
    r = jaccli.param_jacobian(m, x, params=names, dtype=np.float64, return_result=True)
    want = np.concatenate([fd_param_jacobian(m, {"x": x[i:i + 1]}, names, inits, n=1) for i in range(n)])
    assert np.abs(r.J.reshape(want.shape) - want).max() < 1e-6 * np.abs(want).max()


def test_an_output_of_two_rows_is_not_taken_for_two_samples():
    """The first two rows of the batch, x[0:2]: for the probe's pair, two rows as two samples;
    with three or more it stays two. Refused in one line (the probe's run with the last sample
    beside the pair took it for samples and failed on its third row)."""
    g = helper.make_graph([helper.make_node("Slice", ["x", "zero", "two", "zero"], ["y"])], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("zero", 0), ("two", 2))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    for n in (3, 5):
        with pytest.raises(jaccli.errors.SampleAxisError, match=r"has shape \(2, 3\) for 3 sample"):
            jaccli.input_jacobian(m, RNG.standard_normal((n, 3)))
