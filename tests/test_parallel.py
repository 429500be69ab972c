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
