"""One sample's Jacobian larger than the memory budget: blocks are rows of one sample, the
results are those of a run with memory to spare, and requests that cannot fit are refused
up front with one line, leaving no file behind."""

import json
import os
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import jaccli
from jaccli import drivers
from jaccli import io as jio
from jaccli.cli import main
from jaccli.errors import MemoryBudgetError

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sample_models")
CNN, CNN_X = os.path.join(MODELS, "cnn.onnx"), os.path.join(MODELS, "cnn.npy")
TINY = 40_000  # bytes: the cnn's rows of one sample (3 outputs) do not fit, one direction does


def cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "split-over-threads"])
@pytest.mark.parametrize("kind", ["params", "input"])
def test_rows_in_parts_match_a_roomy_run(kind, split, tmp_path, monkeypatch):
    if split:  # every block's rows divided among three parts
        monkeypatch.setattr(drivers, "_STEP_SECONDS", 0)
        monkeypatch.setattr(drivers.parallel, "workers", lambda: 3)
    x = np.load(CNN_X)[:5]
    run = jaccli.param_jacobian if kind == "params" else jaccli.input_jacobian
    extra = {} if kind == "params" else {"mode": "reverse"}
    small = run(CNN, x, max_memory=TINY, return_result=True, **extra)
    roomy = run(CNN, x, return_result=True, **extra)
    assert 0 < small.block_rows < small.flat_shape[1] and roomy.block_rows == 0
    np.testing.assert_allclose(small.value, roomy.value, rtol=1e-5, atol=1e-7)

    np.save(tmp_path / "x.npy", x)
    for fmt in ("npy", "npz", "csv"):
        out = tmp_path / f"J.{fmt}"
        r = cli([kind, CNN, tmp_path / "x.npy", "-o", out, "--max-memory", TINY, "--json"] + (["--mode", "reverse"] if kind == "input" else []))
        assert r.exit_code == 0, r.output
        if fmt == "npy":
            got = np.load(out)
        elif fmt == "npz":
            got = np.load(out)["jacobian"]
        else:  # rows are (sample, output) lines, in order
            lines = out.read_text().splitlines()[1:]
            assert [ln.split(",")[:2] for ln in lines[:4]] == [["0", "y[0]"], ["0", "y[1]"], ["0", "y[2]"], ["1", "y[0]"]]
            got = np.array([[float(v) for v in ln.split(",")[2:]] for ln in lines]).reshape(roomy.value.shape)
        np.testing.assert_allclose(got.reshape(roomy.value.shape), roomy.value, rtol=1e-5, atol=1e-7)
    d = json.loads(r.output)
    want = np.sqrt((roomy.J.astype(np.float64) ** 2).sum(axis=(1, 2)))
    assert d["stats"]["frobenius_norm"]["max"] == pytest.approx(want.max(), rel=1e-5)
    assert d["stats"]["frobenius_norm"]["min"] == pytest.approx(want.min(), rel=1e-5)
    assert "spectral_norm" not in d["stats"] and any("in parts" in n for n in d["notes"])


def _wide_model(path, n_in=4, n_out=3000):
    """y = tanh(x @ W): few inputs, many outputs, so auto mode would go forward."""
    W = np.random.default_rng(0).standard_normal((n_in, n_out)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])], "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        [helper.make_tensor("W", TensorProto.FLOAT, W.shape, W.ravel())])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_forward_mode_cannot_be_in_parts_so_auto_goes_reverse(tmp_path):
    path = str(_wide_model(tmp_path / "wide.onnx"))
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    roomy = jaccli.input_jacobian(path, x, return_result=True)
    assert roomy.mode == "forward"
    for budget in np.geomspace(2e4, 2e6, 25).astype(int):  # the budgets where forward no longer fits
        try:
            jaccli.input_jacobian(path, x, mode="forward", max_memory=budget)
        except MemoryBudgetError as e:
            if "by columns" not in str(e):
                continue  # not even one direction fits
            r = jaccli.input_jacobian(path, x, max_memory=budget, return_result=True)
            assert r.mode == "reverse" and r.block_rows and any("reverse mode" in n for n in r.notes)
            np.testing.assert_allclose(r.value, roomy.value, rtol=1e-5, atol=1e-7)
            return
    pytest.fail("no budget between 20 kB and 2 MB refused forward mode")


def test_a_file_the_disk_cannot_hold_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(jio.os, "statvfs", lambda p: SimpleNamespace(f_bavail=10, f_frsize=4096))
    out = tmp_path / "G.npy"
    r = cli(["params", CNN, CNN_X, "-o", out])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "free in" in r.output and "--outputs" in r.output
    assert os.listdir(tmp_path) == []


def test_an_array_memory_cannot_hold_is_refused(monkeypatch):
    monkeypatch.setattr(drivers, "available_memory", lambda: 1000)
    monkeypatch.setattr(drivers, "_MEMORY_CHECK_ABOVE", 0)
    with pytest.raises(MemoryBudgetError, match="memory available: write it to a file"):
        jaccli.param_jacobian(CNN, np.load(CNN_X))
    r = cli(["params", CNN, CNN_X, "-q"])  # no -o: nothing is held but one block
    assert r.exit_code == 0, r.output


def test_the_python_api_streams_to_a_file(tmp_path):
    """The README's recipe: a FileTarget from Python, rows in parts, committed into place."""
    x = np.load(CNN_X)[:5]
    t = jio.FileTarget(str(tmp_path / "G.npy"), "npy")
    r = jaccli.param_jacobian(CNN, x, max_memory=TINY, target=t, return_result=True)
    assert r.J is None and r.block_rows and not (tmp_path / "G.npy").exists()
    t.commit(r)
    G, _ = jaccli.param_jacobian(CNN, x)
    np.testing.assert_allclose(np.load(tmp_path / "G.npy").reshape(G.shape), G, rtol=1e-5, atol=1e-7)


def test_a_directions_memory_does_not_grow_with_depth():
    """A (co)tangent lives from the step that makes it to the last that reads it: the estimate
    of one direction's working set for a chain of layers is that of a few layers, whatever the
    depth (it once summed every later value too, and refused a torchvision MaxViT at 224 x 224
    under the default 2 GiB that it runs in 1.1 GiB)."""
    from jaccli import walk
    from jaccli.model import load
    from jaccli.plan import Plan

    def chain(depth):
        nodes = [helper.make_node("Tanh", [f"h{i}"], [f"h{i + 1}"]) for i in range(depth)]
        g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["N", 256])],
                              [helper.make_tensor_value_info(f"h{depth}", TensorProto.FLOAT, ["N", 256])])
        m = load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
        plan = Plan(m, f"h{depth}", ["h0"], np.float32)
        return plan.estimate(walk.primal(plan, {"h0": np.ones((2, 256), np.float32)}), 2)

    shallow, deep = chain(4), chain(40)
    assert deep["bytes_primal"] == 41 / 5 * shallow["bytes_primal"]  # every value is kept for the sweeps
    assert deep["bytes_per_direction"] == shallow["bytes_per_direction"] <= 3 * 256 * 4
