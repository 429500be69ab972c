"""Real-world shapes: fixed batch dimensions, graphs that mix samples, several inputs and outputs,
outputs that do not depend on the input, and the quirks of old exports."""

import math
import re

import numpy as np
import onnx
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx import load as onnx_load

import jaccli
import jaccli.errors
from gradcheck import N, batch_at_once, check_whole_model, one_input_model
from jaccli.errors import DataError


def model(nodes, inputs, outputs, inits=(), opset=13):
    g = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 12)).astype(np.float32)


def fixed_batch_model():
    """Declared batch 1 with a Reshape to [1, -1] baked in, as model zoos export."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    return model(nodes, [x], [y], [init("shape", np.array([1, -1], np.int64)), init("W", W)])


def test_fixed_batch_of_one_works_for_many_samples():
    x = RNG.standard_normal((5, 3, 2, 2)).astype(np.float32)
    r = jaccli.input_jacobian(fixed_batch_model(), x, return_result=True)
    assert r.value.shape == (5, 3, 3, 2, 2)
    assert r.chunks[0] == 1  # one sample per run
    for n in range(5):
        expected = W * (x[n].ravel() > 0)
        np.testing.assert_allclose(r.value[n].reshape(3, 12), expected, rtol=1e-6)
    G, cols = jaccli.param_jacobian(fixed_batch_model(), x)
    assert G.shape == (5, 3, 36)
    np.testing.assert_allclose(G[2, 1, 12:24], np.maximum(x[2].ravel(), 0), rtol=1e-6)


@pytest.mark.parametrize("params", [False, True])
def test_check_of_a_fixed_batch_of_one(tmp_path, params):
    """check runs our forward, as the oracle, one sample at a time for such a model (it failed
    on the baked-in Reshape)."""
    from onnx import save

    from jaccli.oracle import check

    path = str(tmp_path / "fixed.onnx")
    save(fixed_batch_model(), path)
    d = check(path, RNG.standard_normal((4, 3, 2, 2)).astype(np.float32), params=params)
    assert d["ok"] and d["samples"] == 3, d


def batch_of_four(target=(4, -1), reduce=False):
    """Declared batch 4, baked into a Reshape (as a dynamo export without a dynamic batch axis
    writes it); with `reduce`, a mean over the batch as well: samples mixed."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Reshape", ["t", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["g"], transB=1)]
    if reduce:
        nodes += [helper.make_node("ReduceMean", ["g"], ["m"], axes=[0], keepdims=1), helper.make_node("Sub", ["g", "m"], ["y"])]
    else:
        nodes += [helper.make_node("Identity", ["g"], ["y"])]
    return model(nodes, [x], [y], [init("shape", np.array(target, np.int64)), init("W", W)])


@pytest.mark.parametrize("n", [1, 4, 7, 9])
def test_a_batch_fixed_above_one_runs_in_runs_of_it(n):
    """A batch of 4 baked into a Reshape: the graph runs on 4 samples only. Runs of 4, the last
    padded: every sample's Jacobians are right, whatever the number of samples, in memory and
    written to a file block by block."""
    x = RNG.standard_normal((n, 3, 2, 2)).astype(np.float32)
    r = jaccli.input_jacobian(batch_of_four(), x, return_result=True)
    assert r.value.shape == (n, 3, 3, 2, 2) and r.chunks[0] == 4
    assert any("runs of 4 samples" in note for note in r.notes)
    np.testing.assert_allclose(r.outputs, np.tanh(x.reshape(n, 12)) @ W.T, rtol=1e-5)
    G, cols = jaccli.param_jacobian(batch_of_four(), x)
    assert G.shape == (n, 3, 36)
    for k in range(n):
        d = 1 - np.tanh(x[k].ravel()) ** 2
        np.testing.assert_allclose(r.value[k].reshape(3, 12), W * d, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(G[k], np.kron(np.eye(3), np.tanh(x[k].ravel())), rtol=1e-5, atol=1e-7)


def _declared_dynamic(m):
    """The model with its input's batch declared symbolic, though its graph bakes one in."""
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return m


def test_a_batch_baked_in_though_declared_symbolic():
    """A batch of 4 baked into a Reshape while the input declares a symbolic batch (tf2onnx
    keeps the signature's None; a TorchScript export given dynamic_axes bakes a Python int):
    the graph runs on 4 samples at once, not on one; samples mixed are still refused. (Its
    runs, on data of 4 samples and of other sizes: test_a_batch_baked_in_found_from_its_constants.)"""
    x = RNG.standard_normal((4, 3, 2, 2)).astype(np.float32)
    with pytest.raises(DataError, match="mixes samples"):
        jaccli.input_jacobian(_declared_dynamic(batch_of_four(reduce=True)), x)


@pytest.mark.parametrize("n", [1, 3, 4, 6, 9])
def test_a_batch_baked_in_found_from_its_constants(tmp_path, n):
    """That graph on data of its baked batch, 4 samples (they run at once), or of another size
    (a TorchScript export of x.view(4, -1) given a dynamic batch, run on 6 samples): neither one
    sample nor all of them run, and the Reshape's constant says 4. Runs of 4, padded, as for a
    declared batch, and said so; the Jacobians, the outputs and `check` are right. Where no size
    among the constants gives a row per sample, each its own (samples mixed by a mean over the
    batch), the error is the usual one line."""
    from onnx import save

    from jaccli.oracle import check

    x = RNG.standard_normal((n, 3, 2, 2)).astype(np.float32)
    r = jaccli.input_jacobian(_declared_dynamic(batch_of_four()), x, return_result=True)
    assert r.value.shape == (n, 3, 3, 2, 2) and r.chunks[0] == 4
    assert any("runs of 4 samples" in note and "though its inputs declare none" in note for note in r.notes), r.notes
    np.testing.assert_allclose(r.outputs, np.tanh(x.reshape(n, 12)) @ W.T, rtol=1e-5)
    G, _ = jaccli.param_jacobian(_declared_dynamic(batch_of_four()), x)
    for k in range(n):
        d = 1 - np.tanh(x[k].ravel()) ** 2
        np.testing.assert_allclose(r.value[k].reshape(3, 12), W * d, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(G[k], np.kron(np.eye(3), np.tanh(x[k].ravel())), rtol=1e-5, atol=1e-7)
    path = str(tmp_path / "baked.onnx")
    save(_declared_dynamic(batch_of_four()), path)
    assert check(path, x)["ok"]
    if n not in (1, 4):  # 4: the usual refusal (above); one sample among copies of itself cannot show a mix
        with pytest.raises(jaccli.errors.ModelError, match="first sample alone") as e:
            jaccli.input_jacobian(_declared_dynamic(batch_of_four(reduce=True)), x)
        assert "\n" not in str(e.value)


def test_a_fixed_batch_that_runs_on_one_sample_with_the_wrong_rows():
    """A batch of 4 baked into a constant that the sample is added to (as an Expand to the
    traced batch writes it) runs on one sample, but gives four rows: runs of 4 then."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    nodes = [helper.make_node("Add", ["x", "C"], ["s"]), helper.make_node("Tanh", ["s"], ["y"])]
    C = np.tile(RNG.standard_normal((1, 3)).astype(np.float32), (4, 1))
    xs = RNG.standard_normal((5, 3)).astype(np.float32)
    r = jaccli.input_jacobian(model(nodes, [x], [y], [init("C", C)]), xs, return_result=True)
    assert r.chunks[0] == 4
    np.testing.assert_allclose(r.value, np.stack([np.diag(1 - np.tanh(v + C[0]) ** 2) for v in xs]), rtol=1e-5)


def test_inspect_names_a_fixed_batch(tmp_path):
    from click.testing import CliRunner
    from onnx import save

    from jaccli.cli import main

    save(batch_of_four(), str(tmp_path / "b4.onnx"))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "b4.onnx")])
    assert r.exit_code == 0 and "declares a batch of 4" in r.output and "runs of 4" in r.output.replace("\n", " ")


def test_a_fixed_batch_written_to_a_file(tmp_path):
    from jaccli.io import FileTarget

    x = RNG.standard_normal((6, 3, 2, 2)).astype(np.float32)
    path = str(tmp_path / "J.npy")
    t = FileTarget(path, "npy")
    t.commit(jaccli.input_jacobian(batch_of_four(), x, target=t, return_result=True))
    np.testing.assert_array_equal(np.load(path), jaccli.input_jacobian(batch_of_four(), x))
    assert np.load(path).shape == (6, 3, 3, 2, 2)


def test_a_fixed_batch_over_the_budget_is_refused_in_one_line():
    """Rows in parts come one sample at a time, but a run holds four samples: refused, where
    it would otherwise write the rows out of order; with room for the run, the same result."""
    from jaccli.errors import MemoryBudgetError

    x = RNG.standard_normal((6, 3, 2, 2)).astype(np.float32)
    with pytest.raises(MemoryBudgetError, match="a run of 4 samples .* with all 3 directions"):
        jaccli.input_jacobian(batch_of_four(), x, max_memory=3000)
    np.testing.assert_array_equal(jaccli.input_jacobian(batch_of_four(), x, max_memory=8000), jaccli.input_jacobian(batch_of_four(), x))


def test_a_fixed_batch_whose_rows_mix_samples():
    """Rows of all four samples in one axis before a MatMul (as exporters flatten (N, S, D) to
    (N*S, D)), then a state with a row per position in the batch (as tf2onnx bakes an RNN's
    initial state): the parameter Jacobian seeds one sample at a time in each run of four, and
    is each sample's own, at its place in its run (the state's rows of that place)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5, 2])
    V = RNG.standard_normal((3, 2)).astype(np.float32)
    S = RNG.standard_normal((20, 2)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["f"]), helper.make_node("MatMul", ["f", "V"], ["m"]),
             helper.make_node("Add", ["m", "S"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Reshape", ["t", "back"], ["y"])]
    m = model(nodes, [x], [y], [init("flat", np.array([20, 3], np.int64)), init("back", np.array([4, 5, 2], np.int64)),
                                init("V", V), init("S", S)])
    xs = RNG.standard_normal((6, 5, 3)).astype(np.float32)
    r = jaccli.param_jacobian(m, xs, return_result=True)
    assert r.chunks[0] == 4 and r.value.shape == (6, 5, 2, 46)
    assert any("one sample at a time" in note for note in r.notes)
    for k in range(6):
        rows = slice(k % 4 * 5, k % 4 * 5 + 5)  # the state's rows at the sample's place in its run
        d = 1 - np.tanh(xs[k] @ V + S[rows]) ** 2  # (5, 2): y[s, j] = tanh(sum_i x[s, i] V[i, j] + S[5 p + s, j])
        dV = np.einsum("si,jl,sj->sjil", xs[k], np.eye(2), d).reshape(5, 2, 6)
        dS = np.zeros((5, 2, 20, 2), np.float32)
        dS[:, :, rows][np.arange(5), :, np.arange(5)] = np.einsum("jl,sj->sjl", np.eye(2), d)
        np.testing.assert_allclose(r.value[k], np.concatenate([dV, dS.reshape(5, 2, 40)], -1), rtol=1e-5, atol=1e-7)


def test_check_of_a_fixed_batch_above_one(tmp_path):
    """onnxruntime holds the model to its declared batch: the oracle runs it in padded runs."""
    from onnx import save

    from jaccli.oracle import check

    path = str(tmp_path / "fixed4.onnx")
    save(batch_of_four(), path)
    x = RNG.standard_normal((5, 3, 2, 2)).astype(np.float32)
    for params in (False, True):
        d = check(path, x, params=params, samples=5)
        assert d["ok"] and d["oracle"] == "onnxruntime", d


@pytest.mark.parametrize("kind", ["reduce", "shape"])
def test_a_fixed_batch_that_cannot_be_run_is_refused_in_one_line(kind):
    """A fixed batch whose samples mix (a mean over it), or whose graph runs on neither one
    sample nor the batch (a Reshape to 3 rows of a batch of 4), is refused in one line."""
    m = batch_of_four(reduce=True) if kind == "reduce" else batch_of_four(target=(3, 16))
    with pytest.raises(DataError, match="mixes samples" if kind == "reduce" else "sample"):
        jaccli.input_jacobian(m, RNG.standard_normal((6, 3, 2, 2)).astype(np.float32))


def test_a_graph_that_mixes_samples_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    m = model([helper.make_node("Softmax", ["x"], ["y"], axis=0)], [x], [y])
    data = RNG.standard_normal((3, 4))
    with pytest.raises(DataError, match="mixes samples.*--sample-axis '\\*=none'"):
        jaccli.input_jacobian(m, data)
    # its way out: the rows are the parts of one instance, softmax over them
    J = jaccli.input_jacobian(m, data, sample_axes={"*": "none"}, dtype=np.float64)
    S = np.exp(data) / np.exp(data).sum(axis=0)
    want = np.einsum("cd,ic,ij->icjd", np.eye(4), S, np.eye(3)) - np.einsum("cd,ic,jc->icjd", np.eye(4), S, S)
    np.testing.assert_allclose(J[0], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opset", [13, 20])
def test_a_gelu_after_a_transpose_of_many_values(opset):
    """A GELU on a transposed map, as timm's PVT-v2 has it after its depthwise convolution
    (Transpose, then Div and Erf, or the Gelu op): more values than erf takes at once, so it goes
    in pieces, on an input whose layout the Transpose set. Each sample's output is onnxruntime's,
    the model is not taken for mixing samples, and the Jacobian equals runs of one sample."""
    from gradcheck import ort_forward, our_forward

    S, C = 600, 64  # 2 samples x 38,400 values: over erf's 65,536 at once
    if opset >= 20:
        act = [helper.make_node("Gelu", ["t"], ["y"])]
    else:
        act = [helper.make_node("Div", ["t", "r2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
               helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["t", "e1"], ["h"]),
               helper.make_node("Mul", ["h", "half"], ["y"])]
    consts = {"r2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)} if opset < 20 else {}
    m = one_input_model([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1])] + act, consts, (S, C), opset)
    x = RNG.standard_normal((2, S, C)).astype(np.float32)
    ref, _ = ort_forward(m, {"x": x})
    np.testing.assert_allclose(our_forward(m, {"x": x}, np.float32), ref, rtol=1e-5, atol=1e-6)
    J = jaccli.input_jacobian(m, x, outputs="0:3", dtype=np.float64)
    one = np.concatenate([jaccli.input_jacobian(m, x[i:i + 1], outputs="0:3", dtype=np.float64) for i in range(2)])
    np.testing.assert_allclose(J, one, rtol=1e-12, atol=0)
    # y[0, 0, k] = gelu(x[0, k, 0]): its derivative at the input it reads
    t = x[:, :3, 0].astype(np.float64)
    want = 0.5 * (1 + np.vectorize(math.erf)(t / np.sqrt(2))) + t * np.exp(-t * t / 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(J[:, np.arange(3), np.arange(3), 0], want, rtol=1e-6)  # sqrt(2) a float32 constant


def test_an_output_that_cancels_is_not_taken_for_mixing_samples():
    """Sample 0's output is a difference of terms of 1e3 that cancels to float32's rounding.
    In float32 a batch of two (a matrix product) and sample 0 alone (a vector product) round
    it differently, by more than the probe's tolerance of its own size; in float64 they agree.
    The probe looks again in float64 before it calls the model sample-mixing."""
    W = (np.random.default_rng(3).standard_normal((16, 1)) * 1e3).astype(np.float32)
    xs = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    b = -(xs[:1].astype(np.float64) @ W).ravel().astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    m = model(nodes, [x], [y], [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    np.testing.assert_array_equal(jaccli.input_jacobian(m, xs)[:, 0], np.broadcast_to(W.T, (2, 16)))


def test_batch_norm_training_style_statistics_are_refused():
    # statistics over the batch computed by hand: ReduceMean over axis 0
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[0], keepdims=1), helper.make_node("Sub", ["x", "mu"], ["y"])]
    with pytest.raises(DataError, match="mixes samples"):
        jaccli.input_jacobian(model(nodes, [x], [y]), RNG.standard_normal((3, 4)))


def two_in_two_out():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])
    y1 = helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 3])
    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("Mul", ["a", "b"], ["y1"]), helper.make_node("Tanh", ["b"], ["y2"])]
    return model(nodes, [a, b], [y1, y2])


def test_several_inputs_and_outputs_with_wrt_and_of():
    m = two_in_two_out()
    a, b = RNG.standard_normal((4, 3)), RNG.standard_normal((4, 3))
    J = jaccli.input_jacobian(m, {"a": a, "b": b}, wrt="b", of="y1", dtype="float64")
    np.testing.assert_allclose(J[1], np.diag(a[1]))
    J = jaccli.input_jacobian(m, {"a": a, "b": b}, wrt="b", of="y2", dtype="float64")
    np.testing.assert_allclose(J[2], np.diag(1 - np.tanh(b[2]) ** 2))


def test_only_the_inputs_an_output_depends_on_need_data(tmp_path):
    """y2 = tanh(b) reads b alone: a plain array is b's, for the Jacobian, the parameters and the
    check alike; y1 = a * b needs both, and says so in one line."""
    from onnx import save

    from jaccli.oracle import check

    m = two_in_two_out()
    b = RNG.standard_normal((4, 3))
    J = jaccli.input_jacobian(m, b, of="y2", dtype="float64")
    np.testing.assert_allclose(J[1], np.diag(1 - np.tanh(b[1]) ** 2))
    save(m, str(tmp_path / "m.onnx"))
    assert check(str(tmp_path / "m.onnx"), b, of="y2")["ok"]
    with pytest.raises(DataError, match=r"depends on 2 inputs \(a, b\)"):
        jaccli.input_jacobian(m, b, of="y1")
    with pytest.raises(DataError, match="no array for model input 'a'"):
        jaccli.input_jacobian(m, {"b": b}, of="y1")
    with pytest.raises(DataError, match=r"depends on 2 inputs"):  # the check of every output needs them all
        check(str(tmp_path / "m.onnx"), b)
    const = model([helper.make_node("Tanh", ["x"], ["y"]), helper.make_node("Relu", ["c"], ["k"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("k", TensorProto.FLOAT, None)],
                  [init("c", np.ones(2, np.float32))])
    with pytest.raises(jaccli.errors.UsageError, match="'k' depends on no model input"):
        jaccli.input_jacobian(const, b, of="k")


def test_an_output_that_does_not_depend_on_the_input_gives_zeros_and_a_note():
    m = two_in_two_out()
    r = jaccli.input_jacobian(m, {"a": RNG.standard_normal((2, 3)), "b": RNG.standard_normal((2, 3))},
                              wrt="a", of="y2", return_result=True)
    assert not r.value.any()
    assert any("does not depend" in n for n in r.notes)


def test_identity_wired_shared_weights_constants_and_initializers_listed_as_inputs():
    # equal weights wired through Identity (the TorchScript exporter keeps one tensor of equal
    # parameters: each copy is a parameter of its own, see model.identities_untied), a Constant
    # node, and (as old exports do) the weights also listed among the graph inputs
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    w_in = helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    Wv = RNG.standard_normal((4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["W"], ["W_tied"]),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "W_tied"], ["u"]),
        helper.make_node("Mul", ["u", "half"], ["y"]),
    ]
    m = model(nodes, [x, w_in], [y], [init("W", Wv)])
    xv = RNG.standard_normal((3, 4))
    assert [v.name for v in jaccli.load(m).inputs] == ["x"]
    G, cols = jaccli.param_jacobian(m, xv, dtype="float64")
    assert [c["name"] for c in cols] == ["W", "W_tied"] and jaccli.load(m).untied_weights == 1
    from gradcheck import fd_param_jacobian

    fd = fd_param_jacobian(m, {"x": xv}, ["W", "W_tied"], {"W": Wv, "W_tied": Wv}, n=3)
    np.testing.assert_allclose(G, fd, rtol=1e-6, atol=1e-9)
    h = np.tanh(xv @ Wv)  # the second product's weight alone: its column is 0.5 * h outer e_k
    np.testing.assert_allclose(G[:, :, 16:].reshape(3, 4, 4, 4), 0.5 * np.einsum("ni,kl->nkil", h, np.eye(4)), atol=1e-9)



def test_a_fill_value_broadcast_by_expand_is_no_parameter():
    """paddle2onnx writes paddle.full's value (an RNN's zero initial state) as a one-element
    initializer that an Expand broadcasts to (directions, N, hidden): a constant, left out of
    the default parameters as 0-d ones are, and selectable by name. A one-element bias is a
    parameter; so is a fill value that something else reads too."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Expand", ["h0", "s"], ["h"]),
             helper.make_node("Add", ["x", "h"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    inits = {"h0": np.array([0.25], np.float32), "W": RNG.standard_normal((3, 1)).astype(np.float32),
             "b": np.array([0.5], np.float32)}
    m = one_input_model(nodes, inits, (3,))
    x = RNG.standard_normal((N, 3))
    assert check_whole_model(m, x) == ["W", "b"]
    assert check_whole_model(m, x, params=["h0", "W"]) == ["h0", "W"]
    shared = one_input_model(nodes[:-1] + [helper.make_node("Add", ["m", "h0"], ["y"])], inits, (3,))
    assert check_whole_model(shared, x) == ["h0", "W"]


def test_a_class_token_expanded_to_the_batch_keeps_samples_batched():
    """A ViT's class token: a (1, 1, D) parameter expanded to (N, 1, D) by a shape built from
    the data's, then put before the patches. The shape is batched (it holds N) but carries no
    rows: the per-sample parameter Jacobian runs the batch at once (before, one sample at a time,
    10x slower for a ViT), and equals its differences and runs of one sample."""
    D = 3
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]), helper.make_node("Concat", ["n1", "one_d"], ["target"], axis=0),
             helper.make_node("Expand", ["cls", "target"], ["c"]), helper.make_node("Concat", ["c", "x"], ["seq"], axis=1),
             helper.make_node("MatMul", ["seq", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("ReduceMean", ["t"], ["y"], axes=[1], keepdims=0)]
    inits = {"zero": np.array(0, np.int64), "axes0": np.array([0], np.int64), "one_d": np.array([1, D], np.int64),
             "cls": RNG.standard_normal((1, 1, D)).astype(np.float32),
             "W": RNG.standard_normal((D, 2)).astype(np.float32)}
    batch_at_once(one_input_model(nodes, inits, (4, D)), RNG.standard_normal((N, 4, D)), ["cls", "W"])


def test_position_embeddings_from_the_sequence_length_are_shared_by_the_samples():
    """GPT-2 as TorchScript exports it: position ids are a range over the sequence's length,
    read from the data's shape, (1, T), and gather position embeddings (1, T, D) added to every
    sample. They depend on no sample, yet on the data: the probe finds them the same for any
    samples and plans them shared, so the per-sample parameter Jacobian runs the batch at once
    (before, one sample at a time: GPT-2, 64 samples, 300 ms against 15), equal to differences
    and to runs of one sample."""
    T, D = 4, 3
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["t"], axis=0),
             helper.make_node("Range", ["zero", "t", "one"], ["r"]), helper.make_node("Unsqueeze", ["r", "axes0"], ["ids"]),
             helper.make_node("Gather", ["wpe", "ids"], ["pos"], axis=0), helper.make_node("Add", ["x", "pos"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["m"]), helper.make_node("Tanh", ["m"], ["y"])]
    inits = {"one": np.array(1, np.int64), "zero": np.array(0, np.int64), "axes0": np.array([0], np.int64),
             "wpe": RNG.standard_normal((6, D)).astype(np.float32), "W": RNG.standard_normal((D, 2)).astype(np.float32)}
    batch_at_once(one_input_model(nodes, inits, (T, D)), RNG.standard_normal((N, T, D)), ["wpe", "W"])


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_position_embeddings_resized_to_the_images_grid_are_shared_by_the_samples(mode):
    """DINOv2 and YOLOS (transformers) as TorchScript exports them: a grid of position
    embeddings (1, D, h, w) resized to the images' patch grid, whose size is read from the
    data's shape, and added to every sample's patches. The Resize's sizes came from the data,
    so its output was taken for batched, and the per-sample parameter Jacobian refused it
    ('per-sample parameter cotangents through Resize are not supported'). Its output has a
    sample axis only if its input has; against differences and runs of one sample."""
    D, H, W_ = 2, 3, 4
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "two", "four"], ["hw"]),
             helper.make_node("Concat", ["lead", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["pos", "", "", "sizes"], ["p"], mode=mode),
             helper.make_node("Add", ["x", "p"], ["h"]), helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["ht", "Wm"], ["m"]), helper.make_node("Tanh", ["m"], ["y"])]
    inits = {"two": np.array([2], np.int64), "four": np.array([4], np.int64), "lead": np.array([1, D], np.int64),
             "pos": RNG.standard_normal((1, D, 2, 2)).astype(np.float32), "Wm": RNG.standard_normal((D, 2)).astype(np.float32)}
    batch_at_once(one_input_model(nodes, inits, (D, H, W_)), RNG.standard_normal((N, D, H, W_)), ["pos", "Wm"])


def test_a_parameter_cast_like_the_data_stays_shared():
    """jax2onnx at opset 23 casts its constants like the data (CastLike's second input): that
    gives them the data's type, not its samples. They were taken for batched, and the
    per-sample parameter Jacobian refused the CastLike; it equals differences and runs of one."""
    D = 3
    nodes = [helper.make_node("CastLike", ["scale", "x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["m"]), helper.make_node("Tanh", ["m"], ["y"])]
    inits = {"scale": RNG.standard_normal(D).astype(np.float32), "W": RNG.standard_normal((D, 2)).astype(np.float32)}
    batch_at_once(one_input_model(nodes, inits, (D,), opset=23), RNG.standard_normal((N, D)), ["scale", "W"])


def _time_major_projections(T, E, F, H, scramble=False):
    """torch's multi-head attention as TorchScript exports it: the batch-first sequence
    transposed to (T, N, E), normalized there (nn.TransformerEncoderLayer's LayerNorm, as
    batch_first=False runs it), projected by a MatMul and a bias Add (samples on axis 1),
    flattened to (T*N, F) for a Gemm (a sample's rows N apart), and turned back. `scramble`
    reshapes (N, T, E) to (T, N, E) without the transpose instead: rows of several samples in
    each slice, which only runs of one sample can take."""
    n = helper.make_node
    nodes = [n("Reshape", ["x", "tne"], ["xt"]) if scramble else n("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             n("LayerNormalization", ["xt", "ls", "lb"], ["xn"], axis=-1),
             n("MatMul", ["xn", "W1"], ["p"]), n("Add", ["b1", "p"], ["q"]), n("Tanh", ["q"], ["t"]),
             n("Reshape", ["t", "rows"], ["r"]), n("Gemm", ["r", "W2", "b2"], ["g"], transB=1),
             n("Reshape", ["g", "back"], ["u"]),
             n("Reshape", ["u", "ntf"], ["y"]) if scramble else n("Transpose", ["u"], ["y"], perm=[1, 0, 2])]
    inits = {"ls": 1 + 0.2 * RNG.standard_normal(E).astype(np.float32), "lb": 0.2 * RNG.standard_normal(E).astype(np.float32),
             "W1": RNG.standard_normal((E, F)).astype(np.float32), "b1": RNG.standard_normal(F).astype(np.float32),
             "W2": RNG.standard_normal((H, F)).astype(np.float32), "b2": RNG.standard_normal(H).astype(np.float32),
             "tne": np.array([T, -1, E]), "rows": np.array([-1, F]), "back": np.array([T, -1, H]), "ntf": np.array([-1, T, H])}
    return one_input_model(nodes, inits, (T, E), opset=17)


@pytest.mark.parametrize("scramble", [False, True])
def test_samples_on_axis_1_and_interleaved_rows_run_the_batch_at_once(scramble):
    """The projections' per-sample parameter cotangents, with the samples moved first for each
    rule: equal to differences and to runs of one sample, the whole batch at once (before, one
    sample at a time: a ViT with nn.TransformerEncoderLayer, 32 samples, 48 ms against 3.3).
    A layout that only looks so (the scrambled one) still runs one sample at a time."""
    m = _time_major_projections(3, 4, 5, 2, scramble)
    batch_at_once(m, RNG.standard_normal((N, 3, 4)), ["ls", "lb", "W1", "b1", "W2", "b2"], at_once=not scramble)


def test_a_bias_added_to_interleaved_rows():
    """A time-major sequence flattened to (S*N, D) for a MatMul, its bias added to those rows
    after it (tf2onnx's Dense, time-major): the Add sees them as (N, S, H), not as N*S samples
    (which failed, broadcasting the rows against the samples)."""
    S, D, H = 3, 4, 5
    n = helper.make_node
    nodes = [n("Transpose", ["x"], ["xt"], perm=[1, 0, 2]), n("Reshape", ["xt", "rows"], ["r"]), n("MatMul", ["r", "W"], ["p"]),
             n("Add", ["p", "b"], ["q"]), n("Tanh", ["q"], ["t"]), n("Reshape", ["t", "back"], ["u"]),
             n("Transpose", ["u"], ["y"], perm=[1, 0, 2])]
    inits = {"W": RNG.standard_normal((D, H)).astype(np.float32), "b": RNG.standard_normal(H).astype(np.float32),
             "rows": np.array([-1, D]), "back": np.array([S, -1, H])}
    batch_at_once(one_input_model(nodes, inits, (S, D)), RNG.standard_normal((N, S, D)), ["W", "b"])


def test_local_functions_are_inlined():
    """Newer exporters put repeated blocks into model-local functions."""
    f = helper.make_function("local", "ScaledTanh", ["X", "S"], ["Y"],
                             [helper.make_node("Tanh", ["X"], ["T"]), helper.make_node("Mul", ["T", "S"], ["Y"])],
                             opset_imports=[helper.make_opsetid("", 13)])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    g = helper.make_graph([helper.make_node("ScaledTanh", ["x", "s"], ["y"], domain="local")], "m", [x], [y],
                          [init("s", np.array([2.0, 3.0, 4.0], np.float32))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("local", 1)], functions=[f])
    m.ir_version = 8
    xv = RNG.standard_normal((2, 3))
    J = jaccli.input_jacobian(m, xv, dtype="float64")
    np.testing.assert_allclose(J[1], np.diag([2.0, 3.0, 4.0] * (1 - np.tanh(xv[1]) ** 2)), rtol=1e-12)
    G, cols = jaccli.param_jacobian(m, xv, dtype="float64")
    assert cols[0]["name"] == "s"
    np.testing.assert_allclose(G[1], np.diag(np.tanh(xv[1])), rtol=1e-12)


def test_float16_models_compute_in_the_working_dtype():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 2])
    Wv = RNG.standard_normal((2, 3)).astype(np.float16)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Sigmoid", ["h"], ["y"])]
    m = model(nodes, [x], [y], [init("W", Wv)])
    xv = RNG.standard_normal((4, 3)).astype(np.float16)
    J = jaccli.input_jacobian(m, xv, dtype="float64")
    assert J.dtype == np.float64
    h = xv.astype(np.float64) @ Wv.astype(np.float64).T
    s = 1 / (1 + np.exp(-h))
    np.testing.assert_allclose(J[0], (s[0] * (1 - s[0]))[:, None] * Wv.astype(np.float64), rtol=1e-10)


def test_token_id_model_per_sample_parameter_jacobian():
    """Integer token ids only (no float input): per-sample parameter Jacobian through an embedding
    table, a position embedding, LayerNorm and a projection, against differences."""
    S, V, D = 5, 11, 4
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", S])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    vals = {"emb": RNG.standard_normal((V, D)), "pos": RNG.standard_normal((S, D)), "g": 1 + 0.2 * RNG.standard_normal(D),
            "b": 0.1 * RNG.standard_normal(D), "W": RNG.standard_normal((D, 2))}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0), helper.make_node("Add", ["e", "pos"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "W"], ["p"]), helper.make_node("ReduceMean", ["p", "ax"], ["y"], keepdims=0)]

    def build(v):
        return model(nodes, [ids], [y], [init(k, np.asarray(a, np.float64)) for k, a in v.items()] +
                     [init("ax", np.array([1], np.int64))], opset=18)

    tokens = np.array([[1, 3, 3, 7, 0], [10, 2, 1, 1, 5]], np.int64)  # repeated ids on purpose
    with pytest.raises(jaccli.errors.UsageError, match="no float input"):
        jaccli.input_jacobian(build(vals), tokens)
    from jaccli.oracle import check

    with pytest.raises(jaccli.errors.UsageError, match="no float input"):  # `jaccli check` of the input Jacobian too
        check(build(vals), tokens)
    G, cols = jaccli.param_jacobian(build(vals), tokens, dtype="float64")
    from gradcheck import our_forward

    eps = 1e-6
    for c in cols:
        base = vals[c["name"]]
        for j in range(0, base.size, 3):
            d = np.zeros(base.size)
            d[j] = eps
            plus = dict(vals, **{c["name"]: base + d.reshape(base.shape)})
            minus = dict(vals, **{c["name"]: base - d.reshape(base.shape)})
            fd = (our_forward(build(plus), {"ids": tokens}) - our_forward(build(minus), {"ids": tokens})) / (2 * eps)
            np.testing.assert_allclose(G[:, :, c["offset"] + j], fd, rtol=1e-6, atol=1e-8)


def test_opset_3_model_with_consumed_inputs_and_old_signatures():
    """2017-era exports: consumed_inputs everywhere, Cast to a type name, Pad with attributes,
    BatchNormalization with is_test and spatial, Clip with attributes, Sum of two inputs."""
    import onnx

    from gradcheck import ort_forward, our_forward

    C = 3
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 6, 6])
    inits = [init("s", 1 + 0.2 * RNG.standard_normal(C).astype(np.float32)), init("b", RNG.standard_normal(C).astype(np.float32)),
             init("m", RNG.standard_normal(C).astype(np.float32) * 0.1), init("v", RNG.uniform(0.5, 1.5, C).astype(np.float32))]
    nodes = [
        helper.make_node("Cast", ["x"], ["xc"], to="FLOAT"),
        helper.make_node("BatchNormalization", ["xc", "s", "b", "m", "v"], ["bn"], consumed_inputs=[0, 0, 0, 1, 1],
                         is_test=1, spatial=1, epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["r"], consumed_inputs=[0]),
        helper.make_node("Sigmoid", ["bn"], ["sg"], consumed_inputs=[0]),
        helper.make_node("Sum", ["r", "sg"], ["sm"], consumed_inputs=[0, 0]),
        helper.make_node("Clip", ["sm"], ["cl"], min=-1.0, max=1.5, consumed_inputs=[0]),
        helper.make_node("Pad", ["cl"], ["y"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant", value=0.0),
    ]
    listed = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]  # IR 3: all inputs
    g = helper.make_graph(nodes, "old", [x] + listed, [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 3)])
    m.ir_version = 3
    xv = RNG.standard_normal((2, C, 4, 4)).astype(np.float32)
    # no oracle runs this model (onnxruntime refuses the string Cast, onnx's converter has no Cast 5->6
    # adapter, the reference evaluator no BatchNormalization 3): compare with its opset-7 twin
    twin_nodes = []
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name not in ("consumed_inputs", "is_test")}
        if n.op_type == "Cast":
            attrs["to"] = TensorProto.FLOAT
        twin_nodes.append(helper.make_node(n.op_type, list(n.input), list(n.output), **attrs))
    twin = helper.make_model(helper.make_graph(twin_nodes, "twin", [x], [y], inits), opset_imports=[helper.make_opsetid("", 7)])
    twin.ir_version = 3
    ours = our_forward(m, {"x": xv}, np.float32)
    ref, oracle = ort_forward(twin, {"x": xv})
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6, err_msg=oracle)
    J = jaccli.input_jacobian(m, xv.astype(np.float64), dtype="float64", flat=True)
    e = 1e-6
    n = xv[0].size
    fd = np.stack([((our_forward(m, {"x": xv + d}) - our_forward(m, {"x": xv - d})) / (2 * e)).reshape(2, -1)
                   for d in (np.eye(n)[j].reshape(xv.shape[1:]) * e for j in range(n))], -1)
    assert np.abs(J - fd).max() / np.abs(fd).max() < 1e-6
    assert onnx.helper  # the model is built with onnx.helper only


@pytest.mark.parametrize("dim", [-1, 0])
def test_a_batch_declared_as_minus_one_or_zero_is_dynamic(tmp_path, dim):
    """Some converters write an unknown batch as -1 or 0: not a fixed batch, for the drivers
    and for check's runs of onnxruntime alike."""
    from onnx import save

    from jaccli.oracle import check

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, 3])
    m = model([helper.make_node("Tanh", ["x"], ["y"])], [x], [y])
    xs = RNG.standard_normal((5, 3)).astype(np.float32)
    assert jaccli.load(m).fixed_batch() == (None, None)
    np.testing.assert_allclose(jaccli.input_jacobian(m, xs), np.stack([np.diag(1 - np.tanh(v) ** 2) for v in xs]), rtol=1e-5)
    save(m, str(tmp_path / "m.onnx"))
    assert check(str(tmp_path / "m.onnx"), xs)["ok"]


@pytest.mark.parametrize("op, layout", [("LSTM", 0), ("GRU", 1), ("RNN", 0), ("LSTM", 1)])
def test_a_fixed_batch_recurrent_state_as_parameters(tmp_path, op, layout):
    """A dynamo export with a fixed batch keeps an RNN's initial state as an initializer with a
    row per place in the batch: a parameter, whose per-sample cotangent is the sample's row,
    checked against onnxruntime's differences. Time-major (layout 0) behind a Transpose, as
    torch writes a batch-first LSTM, or batch-major."""
    from onnx import save

    from jaccli.oracle import check

    B, S, C, H = 3, 4, 2, 3
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, C])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [init("W", RNG.standard_normal((1, gates * H, C)).astype(np.float32)),
             init("R", RNG.standard_normal((1, gates * H, H)).astype(np.float32) / 2)]
    inits += [init(s, RNG.standard_normal((1, B, H) if layout == 0 else (B, 1, H)).astype(np.float32)) for s in states]
    swap = dict(perm=[1, 0, 2])
    if layout == 0:
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], **swap),
                 helper.make_node(op, ["xt", "W", "R", "", ""] + states, ["", "h"], hidden_size=H),
                 helper.make_node("Transpose", ["h"], ["y"], **swap)]
    else:
        nodes = [helper.make_node(op, ["x", "W", "R", "", ""] + states, ["", "y"], hidden_size=H, layout=1)]
    path = str(tmp_path / "rnn.onnx")
    save(model(nodes, [x], [y], inits, opset=14), path)
    xs = RNG.standard_normal((5, S, C)).astype(np.float32)
    G, cols = jaccli.param_jacobian(path, xs)
    assert [c["name"] for c in cols] == ["W", "R"] + states and G.shape == (5, 1, H, (gates * (C + H) + len(states) * B) * H)
    d = check(path, xs, params=True, samples=5)
    assert d["ok"], d


@pytest.mark.parametrize("kept", ["updates", "data"])
def test_a_fixed_batch_state_scattered_in_as_parameters(tmp_path, kept):
    """HF's RWKV writes its state into the shifted sequence in place (`shifted[:, 0] = state`):
    the dynamo exporter makes that a ScatterElements along axis 1 whose updates (or, the other
    way round, whose data) is a folded initializer with a row per place of the fixed batch. Its
    per-sample cotangent is the sample's row, checked against onnxruntime's differences; a
    scatter along the samples' own axis is still refused in one line."""
    from onnx import save

    from jaccli.errors import UnsupportedOpError
    from jaccli.oracle import check

    B, S, C = 3, 4, 2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, C])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rows = (B, 1, C) if kept == "updates" else (B, S, C)
    inits = [init("W", RNG.standard_normal((C, C)).astype(np.float32)),
             init("state", RNG.standard_normal(rows).astype(np.float32)),
             init("at", np.zeros((B, 1, C), np.int64) if kept == "updates" else np.ones((B, 1, C), np.int64))]
    data, updates = ("t", "state") if kept == "updates" else ("state", "t1")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Tanh", ["m"], ["t"]),
             helper.make_node("Slice", ["t", "zero", "one", "one"], ["t1"]),
             helper.make_node("ScatterElements", [data, "at", updates], ["s"], axis=1),
             helper.make_node("Mul", ["s", "t"], ["y"])]
    inits += [init("zero", np.array([0], np.int64)), init("one", np.array([1], np.int64))]
    path = str(tmp_path / "scatter.onnx")
    save(model(nodes, [x], [y], inits, opset=14), path)
    xs = RNG.standard_normal((5, S, C)).astype(np.float32)
    G, cols = jaccli.param_jacobian(path, xs)
    assert [c["name"] for c in cols] == ["W", "state"] and G.shape == (5, S, C, C * C + math.prod(rows))
    d = check(path, xs, params=True, samples=5)
    assert d["ok"], d
    own = init("at", np.broadcast_to(np.arange(B).reshape(B, 1, 1), (B, 1, C)).astype(np.int64))  # row n to row n
    along = model([n if n.op_type != "ScatterElements" else helper.make_node("ScatterElements", [data, "at", updates], ["s"], axis=0)
                   for n in nodes], [x], [y], [own if i.name == "at" else i for i in inits], opset=14)
    with pytest.raises(UnsupportedOpError, match="samples' axis"):
        jaccli.param_jacobian(along, xs)


def test_an_operator_written_before_its_opset(monkeypatch):
    """torch's TorchScript exporter at opset 8 writes ConstantOfShape, which ONNX defines from
    opset 9 on: its first version is what it can only mean. An operator whose older version
    ONNX does define, but jaccli does not, is still refused (none is, since Scan at opset 8 came:
    Abs's rules made to start at 6 stand in for one)."""
    from jaccli import rules
    from jaccli.errors import UnsupportedOpError
    from jaccli.rules import lookup

    value = numpy_helper.from_array(np.array([2.0], np.float32))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("ConstantOfShape", ["s"], ["c"], value=value),
             helper.make_node("Mul", ["x", "c"], ["y"])]
    xs = RNG.standard_normal((4, 3)).astype(np.float32)
    J = jaccli.input_jacobian(model(nodes, [x], [y], opset=8), xs)
    np.testing.assert_allclose(J, np.broadcast_to(2 * np.eye(3), (4, 3, 3)))
    monkeypatch.setitem(rules._REGISTRY, ("", "Abs"), [(6, lookup("Abs", 6))])
    with pytest.raises(UnsupportedOpError, match="older than jaccli supports"):
        lookup("Abs", 1, "", "a")  # Abs-1 (with consumed_inputs) exists in ONNX


def test_layer_normalization_written_into_an_older_opset(tmp_path):
    """onnxruntime's transformer optimizer writes LayerNormalization (opset 17) into a ViT or
    GPT-2 exported at opset 14, leaving its attributes to their defaults: those of its first
    version (axis -1, epsilon 1e-5), as onnxruntime computes it."""
    from onnx import save

    from jaccli.oracle import check

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [init("g", RNG.standard_normal(6).astype(np.float32)), init("b", RNG.standard_normal(6).astype(np.float32))]
    path = str(tmp_path / "ln.onnx")
    save(model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"])], [x], [y], inits, opset=14), path)
    xs = RNG.standard_normal((4, 3, 6)).astype(np.float32) * 0.01  # small: epsilon shows
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": xs})[0]
    from gradcheck import our_forward

    np.testing.assert_allclose(our_forward(onnx_load(path), {"x": xs}, np.float32), want, rtol=1e-4, atol=1e-5)
    for params in (False, True):
        assert check(path, xs, params=params)["ok"]


def test_check_of_a_fixed_batch_with_a_row_per_place(tmp_path):
    """A fixed batch of 2 with a constant that has a row per place (x * (x + p), p (2, 3): an old
    onnx test model): a sample's Jacobian is the one at its place in its run, and check's
    differences perturb each sample at its own place."""
    from onnx import save

    from jaccli.oracle import check

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    p = RNG.standard_normal((2, 3)).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "p"], ["s"]), helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Tanh", ["m"], ["y"])]
    path = str(tmp_path / "places.onnx")
    save(model(nodes, [x], [y], [init("p", p)]), path)
    xs = RNG.standard_normal((5, 3)).astype(np.float32)
    J = jaccli.input_jacobian(path, xs)
    for k in range(5):
        q = p[k % 2]
        np.testing.assert_allclose(J[k], np.diag((1 - np.tanh(xs[k] * (xs[k] + q)) ** 2) * (2 * xs[k] + q)), rtol=1e-5, atol=1e-6)
    for params in (False, True):
        assert check(path, xs, samples=5, params=params)["ok"]


def test_integer_pixels_hint_at_their_cast():
    """An image model taking uint8 pixels (tf2onnx's and many zoo models' input) has no float
    input: the refusal names the input's Cast to float, and --wrt that value gives the Jacobian
    of the same model fed floats."""
    W = init("w", RNG.standard_normal((2, 3, 3, 3)))
    scale = init("s", np.array(255.0))
    tail = [helper.make_node("Transpose", ["f"], ["t"], perm=[0, 3, 1, 2]), helper.make_node("Div", ["t", "s"], ["u"]),
            helper.make_node("Conv", ["u", "w"], ["c"]), helper.make_node("Tanh", ["c"], ["y"])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    pixels = model([helper.make_node("Cast", ["img"], ["f"], to=TensorProto.FLOAT)] + tail,
                   [helper.make_tensor_value_info("img", TensorProto.UINT8, ["N", 5, 5, 3])], [y], [W, scale])
    floats = model(tail, [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", 5, 5, 3])], [y], [W, scale])
    img = RNG.integers(0, 256, (2, 5, 5, 3)).astype(np.uint8)
    with pytest.raises(jaccli.errors.UsageError, match="such as 'f', input 'img' cast to float"):
        jaccli.input_jacobian(pixels, img)
    J = jaccli.input_jacobian(pixels, img, wrt="f", dtype="float64")
    np.testing.assert_allclose(J, jaccli.input_jacobian(floats, img.astype(np.float64), dtype="float64"), rtol=1e-12)


def test_one_hot_bytes_hint_at_their_cast():
    """Bytes one-hot encoded in the graph (Equal against 0..255, then a Cast, as Magika's export
    does): the refusal names the Cast, and --wrt it gives the Jacobian in the encoding."""
    nodes = [helper.make_node("Unsqueeze", ["b", "ax"], ["bu"]), helper.make_node("Equal", ["bu", "codes"], ["hot"]),
             helper.make_node("Cast", ["hot"], ["onehot"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["onehot", "E"], ["e"]), helper.make_node("Tanh", ["e"], ["y"])]
    m = model(nodes, [helper.make_tensor_value_info("b", TensorProto.INT32, ["N", 6])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
              [init("ax", np.array([-1], np.int64)), init("codes", np.arange(4, dtype=np.int32)),
               init("E", RNG.standard_normal((4, 2)).astype(np.float32))])
    b = RNG.integers(0, 4, (3, 6)).astype(np.int32)
    with pytest.raises(jaccli.errors.UsageError, match="such as 'onehot', the first float value made from the inputs"):
        jaccli.input_jacobian(m, b)
    assert jaccli.input_jacobian(m, b, wrt="onehot").shape == (3, 6, 2, 6, 4)
    # a transformer's mask, cast to float before its embeddings are looked up: the embeddings are the hint
    nodes = [helper.make_node("Greater", ["b", "zero"], ["keep"]), helper.make_node("Cast", ["keep"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["E", "b"], ["emb"]), helper.make_node("Unsqueeze", ["mask", "ax"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["y"])]
    m = model(nodes, [helper.make_tensor_value_info("b", TensorProto.INT32, ["N", 6])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
              [init("ax", np.array([-1], np.int64)), init("zero", np.int32(0)), init("E", RNG.standard_normal((4, 2)).astype(np.float32))])
    with pytest.raises(jaccli.errors.UsageError, match="such as the embeddings 'emb'"):
        jaccli.input_jacobian(m, b)


def test_a_parameter_tiled_along_the_samples():
    """Keras's class token, tf.tile(cls, [batch, 1, 1]) before a Concat with the patches: Tile's
    repeats come from the input's shape, and the token's per-sample Jacobian is its own sample's
    rows of the cotangent."""
    from gradcheck import fd_param_jacobian

    vals = {"cls": RNG.standard_normal((1, 1, 4)), "W": RNG.standard_normal((4, 2))}
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "z", "o"], ["n"]),
             helper.make_node("Concat", ["n", "ones"], ["reps"], axis=0), helper.make_node("Tile", ["cls", "reps"], ["c"]),
             helper.make_node("Concat", ["c", "x"], ["t"], axis=1), helper.make_node("Tanh", ["t"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["y"])]
    consts = [init("ones", np.array([1, 1], np.int64)), init("z", np.array([0], np.int64)), init("o", np.array([1], np.int64))]
    m = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init(k, v) for k, v in vals.items()] + consts)
    x = RNG.standard_normal((3, 3, 4))
    G, cols = jaccli.param_jacobian(m, x, dtype="float64")
    assert [c["name"] for c in cols] == ["cls", "W"]
    want = fd_param_jacobian(m, {"x": x}, ["cls", "W"], vals)
    assert np.abs(G.reshape(want.shape) - want).max() < 1e-8 * np.abs(want).max()


def test_a_fixed_batch_class_token_joined_to_the_patches(tmp_path):
    """A dynamo export traced at batch 3 writes a class token's expand with a constant shape:
    Expand(cls, (3, 1, D)) is a value with a row per place, joined to the patches by a Concat.
    Its per-sample cotangent is the sample's own row, checked against onnxruntime's differences
    on 5 samples (two runs, the last padded)."""
    from onnx import save

    from jaccli.oracle import check

    B, S, D = 3, 4, 5
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [init("cls", RNG.standard_normal((1, 1, D)).astype(np.float32)), init("shape", np.array([B, 1, D], np.int64)),
             init("W", RNG.standard_normal((D, 2)).astype(np.float32)), init("ax", np.array([1], np.int64))]
    nodes = [helper.make_node("Expand", ["cls", "shape"], ["c"]), helper.make_node("Concat", ["c", "x"], ["t"], axis=1),
             helper.make_node("Tanh", ["t"], ["h"]), helper.make_node("ReduceMean", ["h", "ax"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["y"])]
    path = str(tmp_path / "cls.onnx")
    save(model(nodes, [x], [y], inits, opset=18), path)
    xs = RNG.standard_normal((5, S, D)).astype(np.float32)
    G, cols = jaccli.param_jacobian(path, xs)
    assert [c["name"] for c in cols] == ["cls", "W"]
    for params in (False, True):
        d = check(path, xs, params=params, samples=5)
        assert d["ok"], d


@pytest.mark.parametrize("producer", ["Tanh", "TopK"])
def test_wrt_a_value_read_twice(producer):
    """--wrt a value inside the graph that two nodes read (a normalised embedding read by the
    attention and by the residual): in reverse mode its cotangent is the sum of both, and its
    producer (of one output or several) must not take it away."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    make = helper.make_node("Tanh", ["x"], ["h"]) if producer == "Tanh" else \
        helper.make_node("TopK", ["x", "k"], ["h", "idx"], axis=1)
    nodes = [make, helper.make_node("Mul", ["h", "h"], ["sq"]), helper.make_node("Add", ["sq", "h"], ["y"])]
    m = model(nodes, [x], [y], [init("k", np.array([4], np.int64))], opset=13)
    xs = RNG.standard_normal((3, 4))
    h = np.tanh(xs) if producer == "Tanh" else -np.sort(-xs, axis=1)
    want = np.stack([np.diag(2 * v + 1) for v in h])
    for mode in ("forward", "reverse"):
        np.testing.assert_allclose(jaccli.input_jacobian(m, xs, wrt="h", mode=mode, dtype="float64"), want, rtol=1e-12)


def test_a_bert_after_onnxruntimes_transformer_optimizer(tmp_path):
    """What onnxruntime.transformers.optimizer makes of a BERT exported with eager attention:
    EmbedLayerNormalization (token and segment ids, its mask index) into Attention. Token ids
    alone: the refusal names the normalised embeddings; the input Jacobian there and the
    per-sample parameter Jacobian pass check against onnxruntime."""
    from onnx import save

    from jaccli.oracle import check

    S, H, V = 6, 8, 20
    rng = np.random.default_rng(7)
    f32 = {k: rng.standard_normal(s).astype(np.float32) * c for k, s, c in
           [("word", (V, H), 1), ("pos", (S, H), 1), ("seg", (2, H), 1), ("gamma", (H,), 1), ("beta", (H,), 1),
            ("W", (H, 3 * H), 0.4), ("b", (3 * H,), 1)]}
    ints = [helper.make_tensor_value_info(n, TensorProto.INT32, ["N", S]) for n in ("ids", "segs", "mask")]
    nodes = [helper.make_node("EmbedLayerNormalization", ["ids", "segs", "word", "pos", "seg", "gamma", "beta", "mask"],
                              ["emb", "mask_index"], domain="com.microsoft", epsilon=1e-12),
             helper.make_node("Attention", ["emb", "W", "b", "mask_index"], ["att"], domain="com.microsoft", num_heads=2),
             helper.make_node("ReduceMean", ["att"], ["y"], axes=[1], keepdims=0)]
    g = helper.make_graph(nodes, "bert", ints, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [init(k, v) for k, v in f32.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    path = str(tmp_path / "bert_opt.onnx")
    save(m, path)
    feeds = {"ids": rng.integers(0, V, (3, S)).astype(np.int32), "segs": rng.integers(0, 2, (3, S)).astype(np.int32),
             "mask": np.array([[1] * S, [1] * 4 + [0] * 2, [1] * 5 + [0]], np.int32)}
    with pytest.raises(jaccli.errors.UsageError, match="the normalised embeddings 'emb'"):
        jaccli.input_jacobian(path, feeds)
    for d in (check(path, feeds, wrt="emb"), check(path, feeds, params=True)):
        assert d["ok"], d


def test_the_embeddings_hint_skips_lookups_read_for_their_shape():
    """onnxruntime's optimizer can leave a word-embedding Gather whose output only a Shape reads
    (for position ids) beside the fused EmbedLayerNormalization: the hint names what the output
    depends on, and --wrt a value off the output's way is refused in one line."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["dead"]), helper.make_node("Shape", ["dead"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["len"]), helper.make_node("Range", ["zero", "len", "step"], ["pos"]),
             helper.make_node("Gather", ["ptable", "pos"], ["p"]), helper.make_node("Gather", ["table2", "ids"], ["e"]),
             helper.make_node("Add", ["e", "p"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    inits = [init("table", RNG.standard_normal((5, 3))), init("table2", RNG.standard_normal((5, 3))),
             init("ptable", RNG.standard_normal((4, 3))), init("one", np.array(1, np.int64)),
             init("zero", np.array(0, np.int64)), init("step", np.array(1, np.int64))]
    m = model(nodes, [ids], [y], inits)
    tokens = RNG.integers(0, 5, (2, 4))
    with pytest.raises(jaccli.errors.UsageError, match="such as the embeddings 'e'"):
        jaccli.input_jacobian(m, tokens)
    with pytest.raises(jaccli.errors.UsageError, match="does not depend on value 'dead'"):
        jaccli.input_jacobian(m, tokens, wrt="dead")
    J = jaccli.input_jacobian(m, tokens, wrt="e", dtype="float64")
    assert J.shape == (2, 4, 3, 4, 3)


def test_the_sample_probe_compares_like_with_like():
    """The probe that runs samples together and alone: a different shape is a different output
    (not an error), equal infinities are the same value (a PROBIT of 1), opposite ones are not."""
    from jaccli.drivers import _same

    assert not _same(np.ones(3), np.ones(4))
    assert not _same(np.ones((2, 3)), np.ones(3))
    assert _same(np.array([np.inf, 1.0, np.nan]), np.array([np.inf, 1.0 + 1e-7, np.nan]))
    assert not _same(np.array([np.inf]), np.array([-np.inf]))
    assert not _same(np.array([1.0, 2.0]), np.array([1.0, 2.1]))


@pytest.mark.parametrize("declared", [1, "N"])
def test_a_parameter_jacobian_of_one_sample_where_the_graph_bakes_a_batch_of_one(declared):
    """A parameter Jacobian of one sample ran it twice, to see whether rows mix samples: a graph
    that reshapes to a batch of 1 (chython-rxnmap's transformer) failed there, declared or not."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [declared, 3, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [declared, 3])
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Reshape", ["t", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    m = model(nodes, [x], [y], [init("shape", np.array([1, 12], np.int64)), init("W", W)])
    data = RNG.standard_normal((1, 3, 2, 2)).astype(np.float32)
    G, cols = jaccli.param_jacobian(m, data)
    f = np.tanh(data.reshape(1, 12))
    np.testing.assert_allclose(G[0], np.einsum("ij,k->ijk", np.eye(3), f[0]).reshape(3, 36), rtol=1e-6)


@pytest.mark.parametrize("op", ["Slice", "Split", "Pad", "Reshape"])
def test_a_parameter_cut_to_the_inputs_length(op):
    """A table cut to the sequence's length, read from the input's shape (a positional
    embedding; an ONNX function's rotary cache cut to the head size): the cut has no sample
    axis, so the per-sample cotangent forms where it meets the input. Against differences."""
    rng = np.random.default_rng(4)
    n = helper.make_node
    nodes = [n("Shape", ["x"], ["shape"]), n("Gather", ["shape", "one"], ["S"]), n("Sub", ["ten", "S"], ["rest"])]
    if op == "Slice":
        nodes.append(n("Slice", ["P", "zero", "S", "zero"], ["cut"]))
    elif op == "Split":
        nodes += [n("Concat", ["S", "rest"], ["sizes"], axis=0), n("Split", ["P", "sizes"], ["cut", "unused"], axis=0)]
    elif op == "Reshape":  # a flat table viewed as (S, 3)
        nodes += [n("Concat", ["S", "three"], ["rows"], axis=0), n("Slice", ["P", "zero", "six", "zero"], ["first"]),
                  n("Reshape", ["first", "rows"], ["cut"])]
    else:  # a short table padded up to the input's length
        nodes += [n("Sub", ["S", "four"], ["grow"]), n("Concat", ["zero", "zero", "grow", "zero"], ["pads"], axis=0),
                  n("Slice", ["P", "zero", "four", "zero"], ["short"]), n("Pad", ["short", "pads"], ["cut"])]
    nodes += [n("Mul", ["x", "cut"], ["xp"]), n("Tanh", ["xp"], ["y"])]
    inits = {"P": rng.standard_normal((10, 3)).astype(np.float32), "zero": np.array([0]), "one": np.array([1]),
             "ten": np.array([10]), "four": np.array([4]), "three": np.array([3]), "six": np.array([6])}
    model = one_input_model(nodes, inits, (6, 3), opset=13)
    assert check_whole_model(model, rng.standard_normal((N, 6, 3)).astype(np.float32)) == ["P"]


def test_a_batch_baked_into_sequence_lengths():
    """tf2onnx's reverse_sequence with constant lengths: a vector of one length per place in the
    batch it was exported with (4), its input declared symbolic. Data of 6 samples runs in runs
    of 4; sample k is reversed as the length at its place, k % 4, says."""
    lengths = [5, 3, 4, 2]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 3])
    nodes = [helper.make_node("ReverseSequence", ["x", "L"], ["r"], batch_axis=0, time_axis=1),
             helper.make_node("Tanh", ["r"], ["y"])]
    m = model(nodes, [x], [y], [init("L", np.array(lengths, np.int64))])
    xs = RNG.standard_normal((6, 5, 3)).astype(np.float32)
    r = jaccli.input_jacobian(m, xs, return_result=True)
    assert r.chunks[0] == 4 and any("runs of 4 samples" in note for note in r.notes), r.notes
    for k in range(6):
        n = lengths[k % 4]
        order = list(range(n))[::-1] + list(range(n, 5))  # output step t reads input step order[t]
        want = np.zeros((5, 3, 5, 3))
        for t in range(5):
            want[t, :, order[t], :] = np.diag(1 - np.tanh(xs[k, order[t]]) ** 2)
        np.testing.assert_allclose(r.value[k], want, rtol=1e-5, atol=1e-7)


def optional_input_model():
    """y = tanh(x + b) where the optional graph input b holds a tensor, else tanh(x): an If on
    OptionalHasElement, as an exporter writes a forward(x, b=None)."""
    N3 = ["N", 3]
    b = helper.make_value_info("b", helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, N3)))
    add = helper.make_graph([helper.make_node("OptionalGetElement", ["b"], ["bb"]), helper.make_node("Add", ["x", "bb"], ["s1"])],
                            "with_b", [], [helper.make_tensor_value_info("s1", TensorProto.FLOAT, N3)])
    keep = helper.make_graph([helper.make_node("Identity", ["x"], ["s2"])], "without_b", [],
                             [helper.make_tensor_value_info("s2", TensorProto.FLOAT, N3)])
    nodes = [helper.make_node("OptionalHasElement", ["b"], ["has"]),
             helper.make_node("If", ["has"], ["s"], then_branch=add, else_branch=keep), helper.make_node("Tanh", ["s"], ["y"])]
    return model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, N3), b],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, N3)], opset=18)


def test_an_optional_graph_input_left_out(tmp_path):
    """A graph input of optional type may be left out of the data, as onnxruntime allows: it is
    empty. Given one array (an .npy), it goes to the input that must have one; given an .npz,
    the optional one may be there or not. The Jacobians, and `check` against onnxruntime."""
    from onnx import save

    from jaccli.oracle import check

    m = optional_input_model()
    x, b = RNG.standard_normal((5, 3)).astype(np.float32), RNG.standard_normal((5, 3)).astype(np.float32)
    for feeds, s in ((x, x), ({"x": x}, x), ({"x": x, "b": b}, x + b)):
        J = jaccli.input_jacobian(m, feeds, wrt="x")
        np.testing.assert_allclose(J, np.stack([np.diag(1 - np.tanh(v) ** 2) for v in s]), rtol=1e-5, atol=1e-7)
    save(m, str(tmp_path / "opt.onnx"))
    assert check(str(tmp_path / "opt.onnx"), x)["ok"]
    assert jaccli.load(m).inputs[1].describe() == "optional float32[N×3]"  # as inspect shows it


def _marked(m, name, **props):
    """Record metadata on value `name` as torch.onnx.export's torch.export path does."""
    vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    helper.set_metadata_props(vi, props)
    m.graph.value_info.append(vi)


def test_torch_export_marks_say_which_initializers_are_parameters(tmp_path):
    """torch.onnx.export from torch.export (dynamo=True, the default since torch 2.9) records
    each initializer's kind in the program's signature, and its optimizer the values a folded
    one came from. Parameters: those marked PARAMETER, one folded from a parameter (a weight
    transposed for a MatMul), and an unmarked one under a module path (a weight with a
    BatchNormalization folded in loses its mark); not a buffer, a val_<n> folded from the
    exporter's own constants (InstanceNormalization's ones in a GroupNorm) or from a graph
    value's shape (LayerNorm's ones without an affine weight), nor an unmarked val_<n>. Those
    are left out with a note, and stay selectable by name. The marks of folding alone (a batch
    fixed at export) tell as much, with the nodes' records of their calls naming the
    parameters; without marks, every one is a parameter as before."""
    kind, folded = "pkg.torch.export.graph_signature.InputSpec.kind", "pkg.onnxscript.optimizer.folded_from"
    names = ["val_1", "lin.bias", "val_5", "val_7", "bn.running_var", "fused.weight", "val_9"]
    nodes = [helper.make_node("MatMul", ["x", "val_1"], ["h"]), helper.make_node("Add", ["h", "lin.bias"], ["a"]),
             helper.make_node("Tanh", ["a"], ["t"])]
    for k, n in enumerate(names[2:]):
        nodes.append(helper.make_node("Mul" if k % 2 == 0 else "Add", [f"t{k}" if k else "t", n], [f"t{k + 1}" if k < 4 else "y"]))
    inits = {n: RNG.uniform(0.5, 1.5, (4, 3) if n == "val_1" else (3,)).astype(np.float32) for n in names}
    plain = one_input_model(nodes, inits, (4,))
    m = one_input_model(nodes, inits, (4,))
    m.ir_version = 10
    _marked(m, "lin.bias", **{kind: "PARAMETER"})
    _marked(m, "bn.running_var", **{kind: "BUFFER"})
    _marked(m, "val_1", **{folded: "['val_0', 'weight']"})  # the root module's weight, transposed
    _marked(m, "val_5", **{folded: "['val_2', 'val_3']"})
    _marked(m, "val_7", **{folded: "['t', 'val_6']"})
    _marked(m, "x", **{kind: "USER_INPUT"})
    x = RNG.standard_normal((N, 4))
    assert check_whole_model(m, x) == ["val_1", "lin.bias", "fused.weight"]
    r = jaccli.param_jacobian(m, x, return_result=True)
    assert any("4 float initializers" in n and "bn.running_var, val_5, val_7, val_9" in n for n in r.notes)
    assert [c.get("folded_from") for c in r.columns] == [["weight"], None, None]  # the column map says whence
    from click.testing import CliRunner

    from jaccli.cli import main

    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    for args in (["params", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "G.npy")],
                 ["inspect", str(tmp_path / "m.onnx")]):
        out = CliRunner().invoke(main, args, terminal_width=200).output
        assert "val_1 (folded from weight)" in out and "val_5" not in out.split("note:")[0], out
    assert check_whole_model(m, x, params=["val_*"]) == ["val_1", "val_5", "val_7", "val_9"]
    assert check_whole_model(plain, x) == names
    assert jaccli.load(plain).export_roles == {}
    # a batch fixed at export: every parameter folded (an LSTM's weights reordered per gate), no
    # kind left; a folded initial state of zeros is still a constant
    folds = one_input_model(nodes, inits, (4,))
    folds.ir_version = 10
    for name, roots in (("val_1", "['val_0', 'weight']"), ("val_5", "['val_2', 'zeros']"), ("val_7", "['scale', 'val_6']")):
        _marked(folds, name, **{folded: roots})
    assert check_whole_model(folds, x) == ["val_1", "lin.bias", "val_5", "val_7", "bn.running_var", "fused.weight"]
    # the nodes' records of their calls name their arguments: torch.zeros's value is no
    # parameter; a parameter that no call left reads (scale, all its uses folded) still is
    call = "%lstm : [num_users=1] = call_function[target=torch.ops.aten.lstm.input](args = (%x, [%zeros], [%p_weight]))"
    helper.set_metadata_props(folds.graph.node[0], {"pkg.torch.onnx.fx_node": call})
    assert check_whole_model(folds, x) == ["val_1", "lin.bias", "val_7", "bn.running_var", "fused.weight"]


def _calls(m, records, scopes=(), more=()):
    """Record the exported program's signature on the graph (the parameters the calls name, and
    `more`), each node's call, and its name scopes, as torch.onnx.export's torch.export path does."""
    params = sorted({p for r in records if r for p in re.findall(r"%(p_\w+)", r)} | set(more))
    signature = "\n# inputs\n" + "".join(f"{p}: PARAMETER target='{p[2:].replace('_', '.')}'\n" for p in params)
    signature += "b_bn_running_var: BUFFER target='bn.running_var'\n"  # a buffer folded away: neither missing nor merged
    helper.set_metadata_props(m.graph, {"pkg.torch.export.ExportedProgram.graph_signature": signature + "x: USER_INPUT\n"})
    n = len(m.graph.node)
    for node, record, scope in zip(m.graph.node, list(records) + [None] * n, list(scopes) + [None] * n):
        props = {"pkg.torch.onnx.fx_node": f"%v = call_function[target=f](args = ({record}))"} if record else {}
        helper.set_metadata_props(node, {**props, **({"pkg.torch.onnx.name_scopes": repr(scope)} if scope else {})})


def test_parameters_that_torch_export_merged_are_apart_and_those_it_removed_are_named(tmp_path):
    """torch.export's optimizer keeps one tensor of several equal ones (a fresh model's
    LayerNorm weights, all ones; the layers of a fresh nn.TransformerEncoder, deep copies), and
    removes what it can fold away (a zero bias). The program's signature lists every parameter,
    each node's record names those its call takes, and a folded initializer what it came from.
    A node reading another call's tensor (or one folded from it), which a node of that call
    reads too, while its own call takes a lacking parameter of the same last name, reads a copy
    under that name (a folded one's as <val>#<k>), so each has its own columns, as in the
    model exported. Not where two lacking ones share the last name, nor a tensor no node of its
    own call reads (a convolution with a BatchNormalization fused in, under the normalization's
    record). A node with no record (a Split the optimizer made) takes the lacking parameters of
    the module its readers' name scopes share, or, where they lie in like modules of several
    layers each lacking one, a copy per layer. Those the file lacks are named, with a note."""
    from click.testing import CliRunner

    from jaccli.cli import main

    # per step: the tensor the model exported reads, the one the optimized file reads, the
    # node's record of its call, and the name scopes of the Sin that reads it
    steps = [("ln1.weight", "ln1.weight", "p_ln1_weight", None),
             ("ln2.weight", "ln1.weight", "p_ln2_weight", None),
             ("out.weight", "out.weight", "p_out_weight, %p_out_bias", None),
             ("ln4.weight", "ln1.weight", "p_ln4_weight, %p_ln9_weight", None),  # two lacking weights: which?
             ("val_7", "val_7", "p_lin_weight", None),
             ("ln5.weight", "ln1.weight", "p_lin_weight, %p_ln5_weight", None),
             ("ln6.weight", "ln1.weight", None, ["", "ln6", "sin"]),
             ("ln7.weight", "ln1.weight", "p_ln7_weight, %p_ln7_bias", None),
             ("ln1.weight", "ln1.weight", None, ["", "out", "sin"]),  # module out lacks no weight
             ("val_8", "val_7", "p_lin2_weight", None),
             ("conv.weight", "conv.weight", "p_bn_weight", None),  # no call of its own reads it
             ("val_9", "val_9", "p_lin_weight", None),  # folded from two parameters: whose?
             ("val_10", "val_9", "p_lin6_weight", None),
             ("ln1.weight", "ln1.weight", "p_ln1_weight, %p_ln10_weight", None),  # its own call's
             ("blk.g2", "ln1.weight", "p_blk_g2", None),  # no last name alike: the one lacking for the one read
             ("pp", "pp", None, None),  # pp = ln1.weight * val_7, its record names ln11.weight: both weights, which?
             ("ln8.weight", "ln1.weight", None, ["", "ln8", "sin"])]  # and a Cos in module zz, lacking one too
    nodes, merged, records, scopes, prev = [], [], [], [], "x"
    for k, (was, now, record, scope) in enumerate(steps):
        nodes.append(helper.make_node("Mul", [prev, was], [f"m{k}"]))
        merged.append(helper.make_node("Mul", [prev, now], [f"m{k}"]))
        nodes.append(helper.make_node("Sin", [f"m{k}"], [prev := f"s{k}"]))
        merged.append(nodes[-1])
        records += [record and f"%{prev}, %{record}", None]
        scopes += [None, scope]
    tail = [helper.make_node("Cos", [f"m{k}"], ["c"]), helper.make_node("Add", [prev, "c"], ["y0"])]
    scopes += [["", "zz", "cos"], None]
    # one node that the optimizer shared (it merged blk.0's weight and blk.1's, then their products,
    # now alike), read by a Sin and a Cos: the weights the model read for each, the node's own
    # scopes and its readers'
    shares = [("blk.0.weight", "blk.1.weight", None, "blk.0", "blk.1"),  # a copy per layer
              ("ln1.weight", "ln1.weight", None, "blk.2", "blk.3"),  # blk.3 lacks none: one node
              ("blk.4.weight", "blk.4.weight", "blk.4", "blk.4", "blk.5")]  # its own scope tells
    truth_tail, merged_tail = list(tail), list(tail)
    for k, (a, b, own, ra, rb) in enumerate(shares):
        z, ends = f"y{k}", lambda u0, u1: [helper.make_node("Sin", [u0], [f"a{k}"]), helper.make_node("Cos", [u1], [f"b{k}"]),  # noqa: E731
                                            helper.make_node("Add", [f"a{k}", f"b{k}"], [f"y{k + 1}" if k < 2 else "y"])]
        truth_tail += [helper.make_node("Mul", [z, a], [f"u{k}"]), helper.make_node("Mul", [z, b], [f"w{k}"])] + ends(f"u{k}", f"w{k}")
        merged_tail += [helper.make_node("Mul", [z, "ln1.weight"], [f"u{k}"])] + ends(f"u{k}", f"u{k}")
        scopes += [own and ["", own, "mul"], ["", ra, "sin"], ["", rb, "cos"], None]
    product = helper.make_node("Mul", ["ln1.weight", "val_7"], ["pp"])
    nodes, merged, records, scopes = [product] + nodes, [product] + merged, ["%pp, %p_ln11_weight"] + records, [None] + scopes
    one = RNG.uniform(0.5, 1.5, 3).astype(np.float32)
    inits = {was: one.copy() for was, now, _, _ in steps if now == "ln1.weight"}
    inits.update({n: RNG.uniform(0.5, 1.5, 3).astype(np.float32) for n in ("out.weight", "val_7", "conv.weight", "val_9")})
    inits["val_10"] = inits["val_9"].copy()
    inits.update({n: one.copy() for n in ("blk.0.weight", "blk.1.weight", "blk.4.weight")})
    inits["val_8"] = inits["val_7"].copy()
    x = RNG.standard_normal((N, 3))
    G0, cols0 = jaccli.param_jacobian(one_input_model(nodes + truth_tail, inits, (3,)), x, dtype=np.float64)
    truth = {c["name"]: G0[..., c["offset"]:c["offset"] + c["size"]] for c in cols0}
    m = one_input_model(merged + merged_tail,
                        {k: inits[k] for k in ("ln1.weight", "out.weight", "val_7", "conv.weight", "val_9")}, (3,))
    m.ir_version = 10
    more = ["p_ln6_weight", "p_ln8_weight", "p_zz_weight", "p_conv_weight"] + [f"p_blk_{k}_weight" for k in (0, 1, 2, 4, 5)]
    _calls(m, records, scopes, more)
    _marked(m, "val_7", **{"pkg.onnxscript.optimizer.folded_from": "['lin.weight', 'val_3']"})  # lin.weight transposed, say
    _marked(m, "val_9", **{"pkg.onnxscript.optimizer.folded_from": "['lin.weight', 'out.weight']"})
    apart = ["ln2.weight", "ln5.weight", "ln6.weight", "ln7.weight", "val_7#1", "blk.g2", "blk.4.weight", "blk.0.weight",
             "blk.1.weight"]
    assert check_whole_model(m, x) == ["ln1.weight", "out.weight", "val_7", "conv.weight", "val_9"] + apart
    r = jaccli.param_jacobian(m, x, dtype=np.float64, return_result=True)
    G = {c["name"]: r.J[..., c["offset"]:c["offset"] + c["size"]] for c in r.columns}
    for name in ["out.weight", "val_7", "conv.weight"] + apart:
        np.testing.assert_allclose(G[name], truth[{"val_7#1": "val_8"}.get(name, name)], rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(G["ln1.weight"], truth["ln1.weight"] + truth["ln4.weight"] + truth["ln8.weight"],
                               rtol=1e-12)  # merged still
    np.testing.assert_allclose(G["val_9"], truth["val_9"] + truth["val_10"], rtol=1e-12)
    assert [c.get("folded_from") for c in r.columns if c["name"].startswith("val_7")] == [["lin.weight"], ["lin2.weight"]]
    model = jaccli.load(m)
    removed = ["blk.2.weight", "blk.5.weight", "bn.weight", "lin6.weight", "ln10.weight", "ln11.weight", "ln4.weight",
               "ln7.bias", "ln8.weight", "ln9.weight", "out.bias", "zz.weight"]
    assert (model.unmerged_weights, model.export_removed) == (9, removed)
    assert any("12 parameters of the model torch.export wrote are not in the file under their own name" in n and ", ".join(removed[:4]) + " ..." in n
               for n in r.notes), r.notes
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx")], terminal_width=300).output
    assert "9 parameters that torch.export's optimizer merged" in out and "not in the file" in out and "ln2.weight" in out, out
    # without the signature, the records of the calls name what the file lacks, as they call it
    del m.graph.metadata_props[:]
    assert jaccli.load(m).export_removed == ["p_blk_g2", "p_bn_weight", "p_lin2_weight", "p_lin6_weight", "p_ln10_weight", "p_ln11_weight", "p_ln2_weight",
                                             "p_ln4_weight", "p_ln5_weight", "p_ln7_bias", "p_ln7_weight", "p_ln9_weight",
                                             "p_out_bias"]
    assert check_whole_model(m, x) == ["ln1.weight", "out.weight", "val_7", "conv.weight", "val_9"]


def test_a_value_folded_from_a_buffer_is_no_parameter_by_the_program_signature():
    """torch.export folds what is computed from a buffer or a parameter alone (exp of a
    temperature buffer, exp of a scale parameter) into initializers named for the call (exp,
    exp_1), recording the folded-away names; the program's signature in the graph's metadata
    says which of those is a buffer, and names every parameter: a value folded from none (a
    rotary embedding's cos table, from arange and cos) is a constant. Without it, a name under
    a module path counts as a parameter, as before, and so does one of a call's result."""
    nodes = [helper.make_node("Mul", ["x", "exp"], ["a"]), helper.make_node("Mul", ["a", "exp_1"], ["b"]),
             helper.make_node("Mul", ["b", "cos_1"], ["c"]), helper.make_node("Add", ["c", "val_8"], ["y"])]
    inits = {n: RNG.uniform(0.5, 1.5, 3).astype(np.float32) for n in ("exp", "exp_1", "cos_1", "val_8")}
    m = one_input_model(nodes, inits, (3,))
    m.ir_version = 10
    # a rotary embedding's table: folded from values computed on the way (the optimizer lists them all,
    # down to the first), and from a constant it folded before (val_8, listed after it)
    for name, roots in (("exp", ["blk.temp"]), ("exp_1", ["blk.scale"]), ("cos_1", ["arange", "cos", "val_8"]),
                        ("val_8", ["arange"])):
        _marked(m, name, **{"pkg.onnxscript.optimizer.folded_from": repr(roots)})
    x = RNG.standard_normal((N, 3))
    assert check_whole_model(m, x) == ["exp", "exp_1", "cos_1", "val_8"]  # without the signature: what is arange?
    helper.set_metadata_props(m.graph, {"pkg.torch.export.ExportedProgram.graph_signature":
                                        "\n# inputs\np_blk_scale: PARAMETER target='blk.scale'\n"
                                        "b_blk_temp: BUFFER target='blk.temp'\nx: USER_INPUT\n"})
    assert check_whole_model(m, x) == ["exp_1"]
    assert jaccli.load(m).export_removed == []  # both folded: neither is missing
    # records that go round in a circle, or down a chain longer than any export's: no endless search
    _marked(m, "exp", **{"pkg.onnxscript.optimizer.folded_from": "['val_8', 'exp_1']"})
    _marked(m, "val_8", **{"pkg.onnxscript.optimizer.folded_from": "['exp', 'cos_1']"})
    assert {"exp", "exp_1"} <= set(jaccli.load(m).parameters("y"))  # exp from blk.scale, through exp_1
    chain = one_input_model([helper.make_node("Mul", ["x", "val_0"], ["y"])],
                            {f"val_{k}": np.ones(3, np.float32) for k in range(2000)}, (3,))
    for k in range(2000):
        _marked(chain, f"val_{k}", **{"pkg.onnxscript.optimizer.folded_from": repr([f"val_{k + 1}"])})
    assert jaccli.load(chain).parameters("y") == ["val_0"]


def test_a_folding_record_is_read_as_a_list_of_names_or_not_at_all():
    """The record is the file's, so untrusted: only a list (or tuple) of names counts, read as a
    literal (never evaluated), nested too deep or over a megabyte it is ignored."""
    from jaccli.model import _folded_from

    assert _folded_from("['val_0', 'weight']") == ["val_0", "weight"]
    assert _folded_from("('a',)") == ["a"]
    for bad in ("", "{'a': 1}", "__import__('os').system('true')", "[" * 100_000, repr(["w"] * 300_000)):
        assert _folded_from(bad) is None



def _blocks(model, x):
    """{parameter: its per-sample columns, shaped (N, *out, *its shape)} of a model."""
    G, cols = jaccli.param_jacobian(model, x, dtype=np.float64)
    return {c["name"]: G[..., c["offset"]:c["offset"] + c["size"]].reshape(G.shape[:-1] + tuple(c["shape"]))
            for c in cols}


def _chain(steps):
    """Nodes from x to y, u <- Tanh(u @ w) for each step w, or Tanh(w @ u) for ("first", w), or
    Tanh(u + w) for ("add", w)."""
    nodes = []
    for k, step in enumerate(steps):
        how, w = step if isinstance(step, tuple) else ("second", step)
        u, v = ("x" if k == 0 else f"u{k}"), ("y" if k == len(steps) - 1 else f"u{k + 1}")
        op, args = {"second": ("MatMul", [u, w]), "first": ("MatMul", [w, u]), "add": ("Add", [u, w])}[how]
        nodes += [helper.make_node(op, args, [f"p{k}"]), helper.make_node("Tanh", [f"p{k}"], [v])]
    return nodes


def _copy(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def test_weights_an_exporter_stored_transposed_are_read_in_their_own_layout(tmp_path):
    """torch.export's optimizer folds a Linear's weight transposed (for a MatMul: a Linear on
    inputs of rank 3, a transformer's) into an initializer val_<n>, recording the parameter it
    came from; the MatMul's record says its call is linear(x, W). jaccli reads the parameter
    back in its own layout, under its own name, through a Transpose: its columns are the
    folded ones transposed; so too a matrix named for a transpose in the program (t_3: x @
    W.t()), whoever reads it, and a GroupNorm's or a PReLU's vector, folded as (C, 1), or
    a value named for a reshape (unsqueeze_4: a layer scale's gamma[:, None]), read through
    a Reshape, without the unit axes. Not a value named for another call (exp_2). A folded value that is exactly the transpose of a parameter the file
    holds (a head tied to the embedding) is read as that parameter's Transpose, so its columns
    are the sum of both uses. Left as they were: a record of another parameter's call, of
    another call, or with the parameter where the call takes no weight; a reader that is no
    MatMul's second input; a value folded from a parameter and a buffer, or from two
    parameters; one that differs from the held parameter's transpose."""
    from click.testing import CliRunner

    from jaccli.cli import main

    rng = np.random.default_rng(3)  # its own: values that keep a deep chain of Tanh far from saturation
    w = {k: rng.uniform(-0.6, 0.6, (5, 5)).astype(np.float32) for k in
         ("val_1", "head.weight", "val_3", "val_4", "q.weight", "val_6", "val_7", "val_8", "k.weight")}
    w["val_2"] = w["head.weight"].T.copy()  # tied: the head's weight, transposed
    w["val_9"] = w["k.weight"].T.copy()  # folded from k.weight and a scale of ones, say: no tie
    w.update({k: rng.uniform(-0.3, 0.3, (5, 1)).astype(np.float32) for k in ("val_10", "val_11", "val_12", "val_13")})
    w.update({k: rng.uniform(-0.6, 0.6, (5, 5)).astype(np.float32) for k in ("t_3", "view_2", "exp_2")})  # x @ W.t()
    w["unsqueeze_4"] = rng.uniform(-0.3, 0.3, (5, 1)).astype(np.float32)  # a layer scale's gamma[:, None]
    w["val_5"] = w["q.weight"].T.copy()
    w["val_5"][0, 1] += 1e-3  # not quite the transpose of its root
    steps = ["val_1", "val_2", "head.weight", "val_3", "val_4", ("add", "val_4"), "val_5", "q.weight", "val_6",
             ("first", "val_7"), "val_8", "val_9", "k.weight", ("add", "val_10"), ("add", "val_11"), ("add", "val_12"),
             ("add", "val_13"), ("add", "val_13"), "t_3", "view_2", "exp_2", ("add", "unsqueeze_4")]
    plain = one_input_model(_chain(steps), w, (5, 5))
    plain.ir_version = 10
    x = rng.standard_normal((N, 5, 5))
    truth = _blocks(plain, x)
    m = _copy(plain)
    linear = "%linear = call_function[target=torch.ops.aten.linear.default](args = (%u, %{}), kwargs = {{}})"
    records = {"val_1": linear.format("p_lin_weight"), "val_2": linear.format("p_head_weight"),
               "val_3": linear.format("p_lin_weight"),  # another parameter's call
               "val_4": linear.format("p_w4"), "val_5": linear.format("p_q_weight"), "val_6": linear.format("p_w6"),
               "val_7": linear.format("p_w7"),
               "val_8": "%mm = call_function[target=torch.ops.aten.mm.default](args = (%u, %p_w8), kwargs = {})",
               "val_10": "%g = call_function[target=torch.ops.aten.group_norm.default](args = (%u, 2, %p_gn_weight, "
                         "%p_gn_bias, 1e-05, False), kwargs = {})",  # a GroupNorm's scale, as (C, 1, 1)
               "val_11": "%p = call_function[target=torch.ops.aten.prelu.default](args = (%u, %p_pr_weight), kwargs = {})",
               "val_12": "%g = call_function[target=torch.ops.aten.group_norm.default](args = (%p_w12, 2, %u, %p_gn_bias, "
                         "1e-05, False), kwargs = {})",  # not where it takes its weight
               "val_13": "%g = call_function[target=torch.ops.aten.group_norm.default](args = (%u, 2, %p_gn3_weight, "
                         "%p_gn_bias, 1e-05, False), kwargs = {})"}
    second = [n for n in m.graph.node if "val_13" in n.input][1]  # val_13's second reader: no record
    for n in m.graph.node:  # a call's record is on each of its nodes (a linear's Add of its bias too)
        for v in set(n.input) & set(records) if n is not second else ():
            helper.set_metadata_props(n, {"pkg.torch.onnx.fx_node": records[v]})
    roots = {"val_1": ["lin.weight"], "val_2": ["head.weight"], "val_3": ["w3"], "val_4": ["w4"], "val_5": ["q.weight"],
             "val_6": ["w6", "bn.running_var"], "val_7": ["w7"], "val_8": ["w8"], "val_9": ["k.weight", "k.scale"],
             "val_10": ["gn.weight", "val_0", "val_1"], "val_11": ["pr.weight"], "val_12": ["w12"], "val_13": ["gn3.weight"],
             "t_3": ["wt"], "view_2": ["wv"], "exp_2": ["we"], "unsqueeze_4": ["ws"]}  # and its shape
    for v, r in roots.items():
        _marked(m, v, **{"pkg.onnxscript.optimizer.folded_from": repr(r)})
    params = ["lin.weight", "head.weight", "q.weight", "w3", "w4", "w6", "w7", "w8", "k.weight", "k.scale",
              "gn.weight", "pr.weight", "w12", "gn3.weight", "wt", "wv", "we", "ws"]
    helper.set_metadata_props(m.graph, {"pkg.torch.export.ExportedProgram.graph_signature": "\n# inputs\n" + "".join(
        f"p_{p.replace('.', '_')}: PARAMETER target='{p}'\n" for p in params) + "x: USER_INPUT\n"})
    got = check_whole_model(m, x)
    assert got == ["lin.weight", "head.weight", "val_3", "val_4", "q.weight", "val_6", "val_7", "val_8", "k.weight",
                   "val_9", "gn.weight", "pr.weight", "val_12", "val_13", "wt", "wv", "exp_2", "ws", "val_5"]
    ours = _blocks(m, x)
    for name, v in (("lin.weight", "val_1"), ("wt", "t_3")):
        np.testing.assert_allclose(ours[name], np.swapaxes(truth[v], -1, -2), rtol=1e-12, atol=0)
    np.testing.assert_allclose(ours["head.weight"], truth["head.weight"] + np.swapaxes(truth["val_2"], -1, -2),
                               rtol=1e-12, atol=0)
    for name, v in (("gn.weight", "val_10"), ("pr.weight", "val_11"), ("ws", "unsqueeze_4")):  # vectors, (5,)
        np.testing.assert_allclose(ours[name], truth[v].reshape(truth[v].shape[:-2] + (5,)), rtol=1e-12, atol=0)
    np.testing.assert_allclose(ours["wv"], truth["view_2"], rtol=1e-12, atol=0)  # a reshape to its own shape
    for name in [n for n in got[2:] if n.startswith(("val_", "q.", "k."))]:
        np.testing.assert_allclose(ours[name], truth[name], rtol=1e-12, atol=0, err_msg=name)
    model = jaccli.load(m)
    assert model.restored_weights == 7 and np.array_equal(model.initializers["lin.weight"], w["val_1"].T)
    assert model.export_origins == {r: [p for p in roots[r] if p in params] for r in got[2:] if r in roots}
    # external data: read from the model's folder
    onnx.save_model(_copy(m), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    external = jaccli.load(str(tmp_path / "m.onnx"))
    assert external.restored_weights == 7 and np.array_equal(external.initializers["lin.weight"], w["val_1"].T)
    assert isinstance(external.initializers["lin.weight"], np.memmap)  # read in place: a large model is not copied
    np.testing.assert_array_equal(jaccli.param_jacobian(external, x, dtype=np.float64)[0],
                                  jaccli.param_jacobian(m, x, dtype=np.float64)[0])
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx")], terminal_width=300).output
    assert "7 parameters that the exporter stored in another layout" in out, out


def test_a_torchscript_fold_that_is_a_held_weight_transposed_is_read_as_its_transpose(tmp_path):
    """The TorchScript exporter names a folded value onnx::<op>_<n>: where one is exactly the
    transpose of one parameter the file holds (an output layer tied to the embedding, read
    through W^T), it is read as that parameter's Transpose, and their derivatives add up in
    its columns. Not where two parameters are such transposes, nor where it is all of one
    value (a fresh model's ones), nor under a name of the model's own. The column map names
    the nodes that read such a value (the exporter names a node for its module's scope)."""
    rng = np.random.default_rng(4)
    w = {k: rng.uniform(-0.6, 0.6, (5, 5)).astype(np.float32) for k in ("emb.weight", "a.weight", "own")}
    w["onnx::MatMul_7"] = w["emb.weight"].T.copy()
    w["b.weight"] = w["a.weight"].copy()
    w["onnx::MatMul_8"] = w["a.weight"].T.copy()  # a.weight's transpose and b.weight's alike
    w["ln.ones"] = np.full((5, 5), 0.2, np.float32)
    w["onnx::MatMul_9"] = np.full((5, 5), 0.2, np.float32)
    w["mine"] = w["own"].T.copy()  # a name of the model's: its own parameter
    w["onnx::MatMul_10"] = w["own"] + 1
    w["onnx::MatMul_11"] = w["onnx::MatMul_10"].T.copy()  # both folded: neither is the model's
    w["bias"] = rng.uniform(-0.6, 0.6, 5).astype(np.float32)
    w["onnx::Add_12"] = w["bias"].copy()  # of rank 1: no transpose
    m = one_input_model(_chain([("add" if v.endswith(("bias", "Add_12")) else "second", v) for v in w]), w, (5, 5))
    x = rng.standard_normal((N, 5, 5))
    got = check_whole_model(m, x)
    assert got == [r for r in w if r != "onnx::MatMul_7"]
    plain = _copy(m)
    for t in plain.graph.initializer:
        t.name = t.name.replace("onnx::", "folded_")
    for n in plain.graph.node:
        n.input[:] = [v.replace("onnx::", "folded_") for v in n.input]
    truth, ours = _blocks(plain, x), _blocks(m, x)
    np.testing.assert_allclose(ours["emb.weight"], truth["emb.weight"] + np.swapaxes(truth["folded_MatMul_7"], -1, -2),
                               rtol=1e-12, atol=0)
    for name in got[1:]:
        np.testing.assert_allclose(ours[name], truth[name.replace("onnx::", "folded_")], rtol=1e-12, atol=0, err_msg=name)
    assert jaccli.load(m).restored_weights == 1
    for k, n in enumerate(m.graph.node):  # the exporter's names: the module's scope, /<module>/MatMul
        n.name = f"/blk.{k // 2}/{n.op_type}"
    r = jaccli.param_jacobian(m, x, return_result=True)
    assert {c["name"]: c.get("read_by") for c in r.columns if "read_by" in c or c["name"] == "own"} == {
        "onnx::MatMul_8": ["/blk.5/MatMul"], "onnx::MatMul_9": ["/blk.7/MatMul"], "onnx::MatMul_10": ["/blk.9/MatMul"],
        "onnx::MatMul_11": ["/blk.10/MatMul"], "onnx::Add_12": ["/blk.12/Add"], "own": None}
    from click.testing import CliRunner

    from jaccli.cli import main

    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx")], terminal_width=300).output
    assert "onnx::MatMul_8 (read by /blk.5/MatMul)" in out and "own (" not in out, out
    listed = _copy(m)  # an old export lists its initializers among the graph's inputs
    listed.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in m.graph.initializer)
    assert check_whole_model(listed, x) == got


def test_weights_torch_export_folded_a_batchnorm_into_are_named_so(tmp_path):
    """torch.export's optimizer folds an eval-mode BatchNorm into the convolution before it: the
    Conv keeps the layer's names (c.weight) for W·γ/√(σ²+ε), and the BatchNorm's record of its
    call. Their columns are then the derivatives with respect to the folded values, not torch's
    with respect to c.weight: the column map, the tables and a note say so. Not for a
    BatchNormalization node (nothing folded), nor a Conv with its own record."""
    from click.testing import CliRunner

    from jaccli.cli import main

    inits = {"c.weight": RNG.standard_normal((4, 2, 3, 3)).astype(np.float32), "c.bias": np.ones(4, np.float32),
             "d.weight": RNG.standard_normal((4, 4, 1, 1)).astype(np.float32)}
    inits.update({f"e.{k}": RNG.uniform(0.5, 1.5, 4).astype(np.float32) for k in ("weight", "bias", "mean", "var")})
    nodes = [helper.make_node("Conv", ["x", "c.weight", "c.bias"], ["h"]),
             helper.make_node("Conv", ["h", "d.weight"], ["k"]),
             helper.make_node("BatchNormalization", ["k", "e.weight", "e.bias", "e.mean", "e.var"], ["y"])]
    m = one_input_model(nodes, inits, (2, 5, 5))
    m.ir_version = 10
    bn = ("%bn = call_function[target=torch.ops.aten._native_batch_norm_legit_no_training.default](args = ({}, %p_{}_weight, "
          "%p_{}_bias, %b_{}_running_mean, %b_{}_running_var, 0.1, 1e-05), kwargs = {{}})")
    records = [bn.format("%conv2d", *"bbbb"), "%conv2d_1 = call_function[target=torch.ops.aten.conv2d.default](args = "
               "(%h, %p_d_weight), kwargs = {})", bn.format("%conv2d_1", *"eeee")]
    for n, r in zip(m.graph.node, records):
        helper.set_metadata_props(n, {"pkg.torch.onnx.fx_node": r})
    signature = "".join(f"p_{k}_weight: PARAMETER target='{k}.weight'\np_{k}_bias: PARAMETER target='{k}.bias'\n" for k in "bcde")
    signature += "".join(f"b_{k}_running_{s}: BUFFER target='{k}.running_{s}'\n" for k in "be" for s in ("mean", "var"))
    helper.set_metadata_props(m.graph, {"pkg.torch.export.ExportedProgram.graph_signature": "\n# inputs\n" + signature})
    x = RNG.standard_normal((N, 2, 5, 5))
    assert check_whole_model(m, x) == ["c.weight", "c.bias", "d.weight", "e.weight", "e.bias"]
    folded = ["b.weight", "b.bias", "b.running_mean", "b.running_var"]
    r = jaccli.param_jacobian(m, x, return_result=True)
    assert [c.get("batchnorm_folded_in") for c in r.columns] == [folded, folded, None, None, None]
    assert any(n.startswith("c.bias, c.weight: torch.export's optimizer folded a BatchNorm (b.bias, b.running_mean, "
                            "b.running_var, b.weight) into them") for n in r.notes), r.notes
    assert not any("folded a BatchNorm" in n for n in jaccli.param_jacobian(m, x, params=["d.*"], return_result=True).notes)
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx")], terminal_width=300).output
    assert "c.weight (BatchNorm b folded in)" in out and "d.weight (" not in out and "folded a BatchNorm" in out, out
    del m.graph.metadata_props[:]  # without the signature: as the record names them
    assert jaccli.load(m).export_fused["c.weight"] == ["p_b_weight", "p_b_bias", "b_b_running_mean", "b_b_running_var"]


def test_recurrent_weights_torch_export_folded_are_torchs_again():
    """torch.export's optimizer folds an LSTM layer's weight_ih_l0 and weight_ih_l0_reverse
    into the node's W, (directions, 4 x hidden, inputs), its gates in ONNX's order (i, o, f, c
    for torch's i, f, g, o), and bias_ih and bias_hh into B. Where the node's record says its
    call is torch's lstm, the parameters are initializers again in torch's layout and names,
    gathered into the node's: their columns are the folded ones, rows in torch's order. Not
    without the record, nor where the folded weight lacks a direction's parameter, nor where
    another node reads it."""
    rng = np.random.default_rng(5)
    H, I, D = 3, 2, 2
    w = {"val_1": rng.uniform(-0.5, 0.5, (D, 4 * H, I)), "val_2": rng.uniform(-0.5, 0.5, (D, 4 * H, H)),
         "val_3": rng.uniform(-0.5, 0.5, (D, 8 * H))}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    lstm = helper.make_node("LSTM", ["xt", "val_1", "val_2", "val_3"], ["h"], hidden_size=H, direction="bidirectional")
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]), lstm,
             helper.make_node("Transpose", ["h"], ["y"], perm=[2, 0, 1, 3])]
    plain = one_input_model(nodes, w, (4, I), opset=18)
    plain.ir_version = 10
    x = rng.standard_normal((N, 4, I))
    truth = _blocks(plain, x)
    params = [f"{p}_l0{r}" for r in ("", "_reverse") for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def exported(roots):
        m = _copy(plain)
        args = ", ".join(f"%p_rnn_{p}" for p in params)
        helper.set_metadata_props(m.graph.node[1], {"pkg.torch.onnx.fx_node": "%lstm = call_function[target=torch.ops."
                                                    f"aten.lstm.input](args = (%x, [%zeros, %zeros_1], [{args}], True, 1, "
                                                    "0.0, False, True, True), kwargs = {})"})
        for v, r in roots.items():
            _marked(m, v, **{"pkg.onnxscript.optimizer.folded_from": repr(r + ["val_7", "zeros"])})
        helper.set_metadata_props(m.graph, {"pkg.torch.export.ExportedProgram.graph_signature": "\n# inputs\n" + "".join(
            f"p_rnn_{p}: PARAMETER target='rnn.{p}'\n" for p in params) + "x: USER_INPUT\n"})
        return m

    rows = np.concatenate([np.arange(k * H, (k + 1) * H) for k in (0, 3, 1, 2)])
    roots = {"val_1": ["rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse"], "val_2": ["rnn.weight_hh_l0", "rnn.weight_hh_l0_reverse"],
             "val_3": ["rnn.bias_ih_l0", "rnn.bias_hh_l0", "rnn.bias_ih_l0_reverse", "rnn.bias_hh_l0_reverse"]}
    m = exported(roots)
    assert check_whole_model(m, x) == ["rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse", "rnn.weight_hh_l0",
                                       "rnn.weight_hh_l0_reverse", "rnn.bias_ih_l0", "rnn.bias_hh_l0",
                                       "rnn.bias_ih_l0_reverse", "rnn.bias_hh_l0_reverse"]
    ours = _blocks(m, x)
    for d, r in enumerate(("", "_reverse")):
        for v, name, part in (("val_1", "weight_ih", slice(None)), ("val_2", "weight_hh", slice(None)),
                              ("val_3", "bias_ih", slice(0, 4 * H)), ("val_3", "bias_hh", slice(4 * H, 8 * H))):
            if v == "val_3":  # (..., D, 8H): a direction's row is bias_ih then bias_hh
                np.testing.assert_allclose(ours[f"rnn.{name}_l0{r}"][..., rows], truth[v][..., d, part], rtol=1e-12, atol=0)
            else:  # (..., D, 4H, inputs)
                np.testing.assert_allclose(ours[f"rnn.{name}_l0{r}"][..., rows, :], truth[v][..., d, :, :], rtol=1e-12, atol=0)
    assert jaccli.load(m).restored_weights == 8
    del m.graph.node[1].metadata_props[:]  # no record of a torch call: what the node's tensors are, untold
    assert jaccli.load(m).parameters("y") == ["val_1", "val_2", "val_3"]
    # W lacking its reverse direction's parameter, and R read by another node too: folded values still
    m = exported({**roots, "val_1": ["rnn.weight_ih_l0"]})
    m.graph.node.append(helper.make_node("Neg", ["val_2"], ["r_too"]))
    assert check_whole_model(m, x) == ["val_1", "val_2", "rnn.bias_ih_l0", "rnn.bias_hh_l0",
                                       "rnn.bias_ih_l0_reverse", "rnn.bias_hh_l0_reverse"]
