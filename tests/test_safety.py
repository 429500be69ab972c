"""Bad data, hostile models, interrupted runs: one clear line, the right exit code, no debris."""

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.cli import main
from jaccli.errors import JaccliError, MemoryBudgetError, ModelError

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(os.path.dirname(HERE), "sample_models")
MLP = os.path.join(MODELS, "mlp_classifier.onnx")
MLP_X = os.path.join(MODELS, "mlp_classifier.npy")
JACCLI = os.path.join(os.path.dirname(sys.executable), "jaccli")


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def one_error_line(r, code, *words):
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.output
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in r.output


def raw_tensor(name, dims):
    """A float TensorProto that declares `dims` and holds no data (no size validation)."""
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(dims)
    return t


def tiny_model(nodes, inputs, outputs, inits=(), opset=17, **kw):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], **kw)
    m.ir_version = 8
    return m


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])


# ---- bad data ---------------------------------------------------------------------------------


def test_wrong_shape_names_file_and_expectation(tmp_path):
    f = tmp_path / "x.npy"
    np.save(f, np.zeros((4, 7), np.float32))
    one_error_line(cli("input", MLP, f), 1, str(f), "float32[N×8]", "axis 1 is 7, not 8")


def test_wrong_dtype(tmp_path):
    f = tmp_path / "x.npy"
    np.save(f, np.zeros((4, 8), np.complex64))
    one_error_line(cli("input", MLP, f), 1, "complex64", "expected numbers")
    np.save(f, np.array([["a"] * 8]))
    one_error_line(cli("input", MLP, f), 1, "expected numbers")


def test_empty_file(tmp_path):
    f = tmp_path / "x.npy"
    f.write_bytes(b"")
    one_error_line(cli("input", MLP, f), 1, str(f), "empty")


def test_truncated_npy(tmp_path):
    f = tmp_path / "x.npy"
    np.save(f, np.zeros((40, 8), np.float32))
    f.write_bytes(f.read_bytes()[:300])
    one_error_line(cli("input", MLP, f), 1, str(f), ".npy")


def test_pickled_object_array_is_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    f = tmp_path / "x.npy"
    np.save(f, np.array([Boom()], dtype=object), allow_pickle=True)
    one_error_line(cli("input", MLP, f), 1, "pickled")
    assert not (tmp_path / "pwned").exists()
    g = tmp_path / "x.npz"
    np.savez(g, x=np.array([Boom()], dtype=object))
    one_error_line(cli("input", MLP, g), 1, "pickled")
    assert not (tmp_path / "pwned").exists()
    h = tmp_path / "x.pkl"
    h.write_bytes(pickle.dumps(np.zeros((2, 8))))
    r = cli("input", MLP, h)
    assert r.exit_code == 1 and "Traceback" not in r.output


def test_csv_ragged_and_non_numeric(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("1,2,3,4,5,6,7,8\n1,2,3\n")
    one_error_line(cli("input", MLP, f), 1, "row 2 has 3 values")
    f.write_text("1,2,3,4,5,6,7,8\n1,2,3,4,5,six,7,8\n")
    one_error_line(cli("input", MLP, f), 1, "non-numeric", "'six'")


@pytest.mark.parametrize("how", ["comma", "spaces", "tabs", "semicolons", "commented header", "header"])
def test_csv_as_numpy_and_spreadsheets_write_it(tmp_path, how):
    """np.savetxt's default separates by spaces and comments its header with '#'; spreadsheets
    write tabs or semicolons: each reads as the same rows."""
    from jaccli.io import read_data

    x = np.load(MLP_X)[:5]
    f = tmp_path / "x.csv"
    if how == "header":
        f.write_text("a,b,c,d,e,f,g,h\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in x) + "\n")
    else:
        kw = {"comma": {"delimiter": ","}, "spaces": {}, "tabs": {"delimiter": "\t"}, "semicolons": {"delimiter": ";"},
              "commented header": {"delimiter": ",", "header": "a,b,c,d,e,f,g,h"}}[how]
        np.savetxt(f, x, fmt="%.9g", **kw)
    np.testing.assert_array_equal(read_data(f).astype(np.float32), x)  # 9 digits: every float32 exactly
    r = cli("input", MLP, f, "-o", tmp_path / "J.npy", "-q")
    assert r.exit_code == 0 and np.load(tmp_path / "J.npy").shape[0] == 5, r.output


def test_nan_and_inf_warn_with_count_or_refuse_when_strict(tmp_path):
    x = np.load(MLP_X)
    x[0, 0], x[3, 2], x[5, 1] = np.nan, np.inf, -np.inf
    f = tmp_path / "x.npy"
    np.save(f, x)
    r = cli("input", MLP, f, "-q")
    assert r.exit_code == 0 and "warning" in r.output and "3 NaN or Inf" in r.output
    one_error_line(cli("input", MLP, f, "--strict"), 1, "3 NaN or Inf", "--strict")


def test_one_array_for_a_model_with_two_inputs(tmp_path):
    x2 = helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 3])
    m = tiny_model([helper.make_node("Add", ["x", "x2"], ["y"])], [X, x2], [Y])
    onnx.save(m, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    one_error_line(cli("input", tmp_path / "m.onnx", tmp_path / "x.npy"), 1, "2 inputs", ".npz")
    np.savez(tmp_path / "xx.npz", x=np.ones((2, 3)), x2=np.ones((2, 3)))
    assert cli("input", tmp_path / "m.onnx", tmp_path / "xx.npz", "--wrt", "x2", "-q").exit_code == 0


def test_usage_errors_exit_2(tmp_path):
    one_error_line(cli("input", MLP, MLP_X, "--outputs", "9:"), 2, "--outputs")
    one_error_line(cli("params", MLP, MLP_X, "--param", "nothing*"), 2, "no parameter matches")
    one_error_line(cli("input", MLP, MLP_X, "-o", tmp_path / "J.weird"), 2, "--format")
    assert cli("input", MLP, MLP_X, "--max-memory", "lots").exit_code == 2


# ---- bad models -------------------------------------------------------------------------------


def test_not_an_onnx_file(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_text("this is not a model\n" * 10)
    one_error_line(cli("input", f, MLP_X), 1, str(f))
    f.write_bytes(b"")
    one_error_line(cli("inspect", f), 1, str(f))


def test_truncated_protobuf(tmp_path):
    f = tmp_path / "m.onnx"
    with open(MLP, "rb") as m:
        f.write_bytes(m.read()[:700])
    one_error_line(cli("input", f, MLP_X), 1, str(f))


def test_unknown_operator_and_domain(tmp_path):
    m = tiny_model([helper.make_node("Frobnicate", ["x"], ["y"], name="frob1")], [X], [Y])
    onnx.save(m, tmp_path / "op.onnx")
    one_error_line(cli("input", tmp_path / "op.onnx", MLP_X), 1, "frob1", "Frobnicate", "opset 17", "not supported",
                   "not an ONNX operator", "onnxruntime rejects the model too")  # tf2onnx's StatefulPartitionedCall
    m = tiny_model([helper.make_node("Gelu", ["x"], ["y"], name="g1", domain="com.example")], [X], [Y])
    onnx.save(m, tmp_path / "dom.onnx")
    one_error_line(cli("input", tmp_path / "dom.onnx", MLP_X), 1, "g1", "com.example")


def test_unsupported_operator_fails_before_computing(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Frobnicate", ["h"], ["y"], name="late")]
    onnx.save(tiny_model(nodes, [X], [Y]), tmp_path / "m.onnx")
    r = cli("inspect", tmp_path / "m.onnx")
    assert r.exit_code == 1 and "unsupported" in r.output and "late" in r.output


def test_a_tree_ensemble_missing_its_attributes_is_refused_in_one_line(tmp_path):
    """A TreeEnsemble (ai.onnx.ml opset 5) that names no trees: one line naming the node."""
    tree = helper.make_node("TreeEnsemble", ["x"], ["y"], name="trees", domain="ai.onnx.ml", n_targets=1)
    m = tiny_model([tree], [X], [Y])
    m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 5))
    onnx.save(m, tmp_path / "trees.onnx")
    one_error_line(cli("input", tmp_path / "trees.onnx", np_file(tmp_path)), 1, "trees", "TreeEnsemble")


def test_a_random_draw_is_refused_with_the_reason(tmp_path):
    """A VAE's reparameterisation exported as RandomNormalLike: one line says why (and Bernoulli,
    which ONNX defines as a function drawing RandomUniformLike, the same)."""
    for op in ("RandomNormalLike", "Bernoulli"):
        nodes = [helper.make_node("Sigmoid", ["x"], ["p"]), helper.make_node(op, ["p"], ["r"], name="draw"),
                 helper.make_node("Mul", ["x", "r"], ["y"])]
        onnx.save(tiny_model(nodes, [X], [Y], opset=15), tmp_path / "draw.onnx")
        one_error_line(cli("input", tmp_path / "draw.onnx", np_file(tmp_path)), 1, "Random", "one draw only")


def test_tf2onnx_complex_operators_are_refused_with_the_reason(tmp_path):
    """tf2onnx writes ComplexAbs for tf.abs of an STFT: not an ONNX operator (onnxruntime refuses
    the model too); the line says so and what exports instead."""
    nodes = [helper.make_node("ComplexAbs", ["x"], ["y"], name="cabs")]
    onnx.save(tiny_model(nodes, [X], [Y]), tmp_path / "c.onnx")
    one_error_line(cli("input", tmp_path / "c.onnx", np_file(tmp_path)), 1, "cabs", "not an ONNX operator", "STFT")


def test_integer_operators_of_quantized_models_are_refused_with_the_reason(tmp_path):
    """onnxruntime has integer operators jaccli does not run (QLinearReduceMean): one line says why,
    and what format jaccli runs instead."""
    q = helper.make_tensor_value_info("q", TensorProto.UINT8, ["N", 3])
    nodes = [helper.make_node("QLinearReduceMean", ["q", "s", "z", "s", "z"], ["i"], name="qsm", domain="com.microsoft",
                              axes=[1], keepdims=1),
             helper.make_node("Cast", ["i"], ["y"], to=1)]
    inits = [onnx.numpy_helper.from_array(np.float32(0.1), "s"), onnx.numpy_helper.from_array(np.uint8(0), "z")]
    m = tiny_model(nodes, [q], [Y], inits)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(m, tmp_path / "qop.onnx")
    one_error_line(cli("input", tmp_path / "qop.onnx", np_file(tmp_path)), 1, "qsm", "QDQ", "QLinearConv")


def test_training_dropout_is_refused(tmp_path):
    """A model exported in training mode drops at random: refused in one line (with a ratio of 0
    it is the identity, see the op cases)."""
    nodes = [helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="drop")]
    m = tiny_model(nodes, [X], [Y])
    m.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.1, np.float32), "r"),
                                onnx.numpy_helper.from_array(np.array(True), "t")])
    onnx.save(m, tmp_path / "drop.onnx")
    one_error_line(cli("input", tmp_path / "drop.onnx", np_file(tmp_path)), 1, "training_mode", "eval mode")


@pytest.mark.parametrize("opset,sizes", [(13, [2, 2]), (13, [1, 1]), (13, [4, -1]), (11, [2, 2])])
def test_split_sizes_that_do_not_fit_the_axis_are_refused(tmp_path, opset, sizes):
    """Split sizes that do not add up to the axis (the TorchScript exporter bakes a mixture of
    experts' token counts for the traced batch into them): onnxruntime refuses to run such a
    model, and so does jaccli, in one line naming the node, where numpy's split would cut
    pieces short or leave some empty."""
    import onnxruntime as ort

    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    if opset >= 13:
        node = helper.make_node("Split", ["x", "s"], ["y", "z"], name="cut", axis=1)
        inits = [numpy_helper.from_array(np.array(sizes, np.int64), "s")]
    else:
        node, inits = helper.make_node("Split", ["x"], ["y", "z"], name="cut", axis=1, split=sizes), []
    m = tiny_model([node], [X], outs, inits, opset=opset)
    onnx.save(m, tmp_path / "split.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(Exception):  # the oracle refuses it too
        ort.InferenceSession(str(tmp_path / "split.onnx")).run(None, {"x": x})
    one_error_line(cli("input", tmp_path / "split.onnx", np_file(tmp_path), "--of", "y"), 1, "cut", "Split",
                   "do not add up to the length 3")


def test_cycle(tmp_path):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2"),
             helper.make_node("Identity", ["b"], ["y"], name="n3")]
    m = tiny_model(nodes, [X], [Y])
    onnx.save(m, tmp_path / "m.onnx")
    one_error_line(cli("input", tmp_path / "m.onnx", np_file(tmp_path)), 1, "cycle")


def np_file(tmp_path, shape=(2, 3)):
    f = tmp_path / "x3.npy"
    np.save(f, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    return f


def test_missing_initializer(tmp_path):
    m = tiny_model([helper.make_node("Add", ["x", "bias"], ["y"], name="add")], [X], [Y])
    onnx.save(m, tmp_path / "m.onnx")
    one_error_line(cli("input", tmp_path / "m.onnx", np_file(tmp_path)), 1, "'add'", "'bias'", "no node, input or initializer")


def _external_model(tmp_path, location):
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "12")):
        e = w.external_data.add()
        e.key, e.value = k, v
    m = tiny_model([helper.make_node("Mul", ["x", "w"], ["y"])], [X], [Y], [w])
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    with open(d / "m.onnx", "wb") as f:
        f.write(m.SerializeToString())
    return d / "m.onnx"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, how):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(3, dtype=np.float32).tobytes())
    if how == "dotdot":
        loc = "../secret.bin"
    elif how == "absolute":
        loc = str(secret)
    else:
        (tmp_path / "model").mkdir()
        os.symlink(secret, tmp_path / "model" / "link.bin")
        loc = "link.bin"
    path = _external_model(tmp_path, loc)
    one_error_line(cli("input", path, np_file(tmp_path)), 1, "outside the model's folder", "refused")


def test_external_data_inside_the_folder_loads_and_bad_lengths_are_refused(tmp_path):
    path = _external_model(tmp_path, "w.bin")
    (tmp_path / "model" / "w.bin").write_bytes(np.full(3, 2.0, np.float32).tobytes())
    J = jaccli.input_jacobian(path, np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(J[0], 2 * np.eye(3))
    (tmp_path / "model" / "w.bin").write_bytes(b"\0" * 8)  # shorter than the tensor
    one_error_line(cli("input", path, np_file(tmp_path)), 1, "needs 12 bytes")


def test_declared_shape_over_budget_is_refused_before_allocating(tmp_path):
    big = raw_tensor("w", [100_000, 100_000])
    m = tiny_model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], [big])
    with open(tmp_path / "m.onnx", "wb") as f:
        f.write(m.SerializeToString())
    one_error_line(cli("input", tmp_path / "m.onnx", np_file(tmp_path)), 1, "'w'", "37.25 GiB", "--max-memory")


def test_constant_of_shape_over_budget_is_refused_before_allocating(tmp_path):
    shape = numpy_helper.from_array(np.array([200_000, 200_000], np.int64), "s")
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["z"], name="cos"),
             helper.make_node("Add", ["x", "z"], ["y"])]
    m = tiny_model(nodes, [X], [Y], [shape])
    onnx.save(m, tmp_path / "m.onnx")
    t0 = time.perf_counter()
    one_error_line(cli("input", tmp_path / "m.onnx", np_file(tmp_path), "--max-memory", "1GiB"), 1, "ConstantOfShape", "over --max-memory")
    assert time.perf_counter() - t0 < 5


def test_model_over_2gb_with_external_data_loads(tmp_path):
    """Two 1 GiB weight tensors in a sparse external file, over 2 GiB in all: memory-mapped, not copied."""
    n = 2**28 + 2**20  # floats per tensor: just over 1 GiB each, over 2 GiB together (protobuf's limit)
    d = tmp_path / "big"
    d.mkdir()
    with open(d / "weights.bin", "wb") as f:
        f.truncate(2 * n * 4)  # sparse: zeros, no disk blocks
    inits = []
    for i, name in enumerate(("w1", "w2")):
        t = raw_tensor(name, [n])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", "weights.bin"), ("offset", str(i * n * 4)), ("length", str(n * 4))):
            e = t.external_data.add()
            e.key, e.value = k, v
        inits.append(t)
    idx = numpy_helper.from_array(np.array([0, 1, 2], np.int64), "idx")
    nodes = [helper.make_node("Gather", ["w1", "idx"], ["a"]), helper.make_node("Gather", ["w2", "idx"], ["b"]),
             helper.make_node("Add", ["x", "a"], ["xa"]), helper.make_node("Mul", ["xa", "b"], ["y"])]
    m = tiny_model(nodes, [X], [Y], inits + [idx])
    with open(d / "m.onnx", "wb") as f:
        f.write(m.SerializeToString())
    assert os.path.getsize(d / "weights.bin") > 2**31
    r = cli("input", d / "m.onnx", np_file(tmp_path), "-q")
    assert r.exit_code == 0, r.output


# ---- outputs ----------------------------------------------------------------------------------


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_error_leaves_existing_output_untouched_and_no_debris(tmp_path):
    out = tmp_path / "J.npy"
    out.write_bytes(b"precious")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 5), np.float32))
    before = _listing(tmp_path)
    for fmt in ("J.npy", "J.csv", "J.npz"):
        r = cli("input", MLP, bad, "-o", tmp_path / fmt)
        assert r.exit_code == 1
    assert out.read_bytes() == b"precious"
    assert _listing(tmp_path) == before


def _big_job(tmp_path):
    """A run that takes several seconds: the CNN's parameter Jacobian over many samples, in chunks."""
    x = np.random.default_rng(0).standard_normal((20000, 1, 12, 12)).astype(np.float32)
    np.save(tmp_path / "many.npy", x)
    return [JACCLI, "params", os.path.join(MODELS, "cnn.onnx"), str(tmp_path / "many.npy"), "-o",
            str(tmp_path / "G.npy"), "-q", "--max-memory", "64MiB"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_leaves_nothing_half_written(tmp_path, sig, code):
    (tmp_path / "G.npy").write_bytes(b"old result")
    p = subprocess.Popen(_big_job(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(n.endswith(".part.npy") for n in os.listdir(tmp_path)):
        time.sleep(0.05)
    assert any(n.endswith(".part.npy") for n in os.listdir(tmp_path)), "the job never started writing"
    time.sleep(0.3)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err.decode()
    assert b"Traceback" not in err
    assert (tmp_path / "G.npy").read_bytes() == b"old result"
    assert not [n for n in os.listdir(tmp_path) if ".part" in n]


def test_binary_output_to_a_terminal_is_refused(tmp_path):
    import pty

    master, slave = pty.openpty()
    p = subprocess.run([JACCLI, "input", MLP, MLP_X, "-o", "-", "-q"], stdout=slave, stderr=subprocess.PIPE, timeout=60)
    os.close(slave)
    os.close(master)
    assert p.returncode == 2
    assert b"terminal" in p.stderr and b"Traceback" not in p.stderr


def test_broken_pipe_is_quiet(tmp_path):
    p = subprocess.run(f"{JACCLI} input {MLP} {MLP_X} -o - --format csv -q | head -c 10 > /dev/null",
                       shell=True, capture_output=True, timeout=60)
    assert b"Traceback" not in p.stderr and b"Error" not in p.stderr


def test_library_errors_are_jaccli_errors():
    with pytest.raises(ModelError):
        jaccli.input_jacobian(b"not a model", np.zeros((1, 3)))
    with pytest.raises(JaccliError):
        jaccli.input_jacobian(MLP, np.zeros((1, 5)))
    with pytest.raises(MemoryBudgetError):
        jaccli.param_jacobian(os.path.join(MODELS, "cnn.onnx"), np.zeros((2, 1, 12, 12)), max_memory=1000)


def test_data_from_a_fifo_is_read_like_stdin(tmp_path):
    """bash process substitution, <(...), gives a path to a pipe."""
    fifo = tmp_path / "x.fifo"
    os.mkfifo(fifo)
    code = f"data = open({MLP_X!r}, 'rb').read(); open({str(fifo)!r}, 'wb').write(data)"
    writer = subprocess.Popen([sys.executable, "-c", code])
    r = cli("input", MLP, fifo, "-o", tmp_path / "J.npy", "-q")
    writer.wait(timeout=30)
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "J.npy"), jaccli.input_jacobian(MLP, np.load(MLP_X)), rtol=1e-6)
