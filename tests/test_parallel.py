"""Blocks split over threads give the same results as one thread (up to float32 rounding: parts
of other sizes take other BLAS paths), in every way a block can be split, and leave the
process's BLAS threading as they found it."""

import os
import sys

import numpy as np
import pytest

import jaccli
from jaccli import drivers, parallel

HERE = os.path.dirname(__file__)
MODELS = os.path.join(HERE, "..", "sample_models")


def sample(name):
    return os.path.join(MODELS, name + ".onnx"), np.load(os.path.join(MODELS, name + ".npy"))


@pytest.fixture
def threads(monkeypatch):
    """Split every block, however small, into three parts (more parts than cores is fine)."""
    monkeypatch.setattr(drivers, "_STEP_SECONDS", 0)
    monkeypatch.setattr(parallel, "workers", lambda: 3)


def same(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * np.abs(b).max())


def serial(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(parallel, "workers", lambda: 1)
        return fn()


@pytest.mark.parametrize("name", ["mlp_classifier", "cnn", "regression_mlp"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_input_jacobian_split_matches_serial(threads, monkeypatch, name, mode, n):
    path, x = sample(name)
    x = x[:n]
    got = jaccli.input_jacobian(path, x, mode=mode, return_result=True)
    want = serial(monkeypatch, lambda: jaccli.input_jacobian(path, x, mode=mode, return_result=True))
    same(got.value, want.value)
    same(got.outputs, want.outputs)


@pytest.mark.parametrize("name", ["mlp_classifier", "cnn"])
@pytest.mark.parametrize("n", [1, 5])
def test_param_jacobian_split_matches_serial(threads, monkeypatch, name, n):
    path, x = sample(name)
    x = x[:n]
    got, cols = jaccli.param_jacobian(path, x)
    want, _ = serial(monkeypatch, lambda: jaccli.param_jacobian(path, x))
    same(got, want)


def test_split_within_small_chunks(threads, monkeypatch):
    """A budget that forces chunks of few samples and directions: each part stays in its share."""
    path, x = sample("cnn")
    for max_memory in (300_000, 100_000):  # a few samples per block; one sample (split by directions)
        r = jaccli.input_jacobian(path, x[:9], return_result=True, max_memory=max_memory)
        assert r.chunks[0] < 9
        want = serial(monkeypatch, lambda: jaccli.input_jacobian(path, x[:9], max_memory=max_memory))
        same(r.value, want)


def test_an_error_in_a_part_is_raised(threads):
    def boom():
        raise ValueError("part failed")

    with pytest.raises(ValueError, match="part failed"):
        parallel.run([lambda: 1, boom, lambda: 3])
    assert parallel.run([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]


def test_split_covers_the_range():
    assert parallel.split(0, 7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert parallel.split(5, 6, 4) == [(5, 6)]


@pytest.mark.skipif(not parallel._openblas(), reason="BLAS threading cannot be controlled here")
def test_blas_threads_and_switch_interval_restored():
    get, _ = parallel._openblas()
    before, interval = get(), sys.getswitchinterval()
    with parallel.section():
        assert get() == 1 and sys.getswitchinterval() <= 5e-4
        with parallel.section():
            assert get() == 1
        assert get() == 1
    assert get() == before and sys.getswitchinterval() == interval


def wide_mlp():
    """784-256-256-10 tanh, as ONNX: every product is by a matrix at least 64 wide."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sizes, nodes, inits, h = [784, 256, 256, 10], [], [], "x"
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32), f"W{k}"))
        nodes.append(helper.make_node("Gemm", [h, f"W{k}"], [f"g{k}"], transB=1))
        h = f"g{k}"
        if k < 2:
            nodes.append(helper.make_node("Tanh", [h], [f"t{k}"]))
            h = f"t{k}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])],
                          [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("name, n, parts", [("wide_mlp", 64, 1), ("wide_mlp", 1024, 2), ("cnn", 64, 2)])
def test_wide_products_of_middling_size_run_as_one_part(monkeypatch, name, n, parts):
    """A block that is nearly all products by wide matrices, of middling size (an MLP's input
    Jacobian for 64 samples), runs as one part, on BLAS's own threads; a larger one, or a
    convolution's, in parts. Whatever the split, the same Jacobian."""
    monkeypatch.setattr(drivers, "_STEP_SECONDS", 0)
    monkeypatch.setattr(parallel, "workers", lambda: 2)
    chosen, split = [], drivers._parts
    monkeypatch.setattr(drivers, "_parts", lambda *a: chosen.append(split(*a)) or chosen[-1])
    if name == "wide_mlp":
        model, x = wide_mlp(), np.random.default_rng(1).standard_normal((n, 784)).astype(np.float32)
    else:
        model, x = sample(name)
        x = np.resize(x, (n,) + x.shape[1:])
    got = jaccli.input_jacobian(model, x)
    assert chosen == [parts]
    want = serial(monkeypatch, lambda: jaccli.input_jacobian(model, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())  # sums of 784 terms in float32
