"""A large result's memory is reused for the next result of its size once no view of it is
left, and never while one is."""

import gc

import numpy as np
import pytest

from jaccli import drivers

SHAPE = (3, 1 << 22)  # 48 MiB of float32: above the 64 MiB threshold as float64


def _address(a):
    return a.__array_interface__["data"][0]


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.delenv("JACCLI_MALLOC", raising=False)
    drivers._pool.clear()
    yield
    drivers._pool.clear()


def test_freed_result_is_reused():
    a = drivers.allocate(SHAPE, np.float64)
    where = _address(a)
    del a
    gc.collect()
    b = drivers.allocate(SHAPE, np.float64)
    assert _address(b) == where


def test_a_live_view_keeps_the_memory():
    a = drivers.allocate(SHAPE, np.float64)
    a[...] = 7.0
    view = a.reshape(-1)[::5]
    del a
    gc.collect()
    b = drivers.allocate(SHAPE, np.float64)
    b[...] = -1.0
    assert not np.shares_memory(b, view)
    assert (view == 7.0).all()
    del view, b
    gc.collect()
    assert len(drivers._pool) == 1  # the last one freed is kept; one of each size at most


def test_other_sizes_and_the_switch(monkeypatch):
    a = drivers.allocate(SHAPE, np.float64)
    where = _address(a)
    del a
    gc.collect()
    b = drivers.allocate((SHAPE[0] + 1, SHAPE[1]), np.float64)  # another size: fresh memory
    assert _address(b) != where
    monkeypatch.setenv("JACCLI_MALLOC", "0")
    c = drivers.allocate(SHAPE, np.float64)  # the pooled mapping is taken, but not given back
    del c
    gc.collect()
    assert SHAPE[0] * SHAPE[1] * 8 not in drivers._pool


def test_pool_is_bounded(monkeypatch):
    monkeypatch.setattr(drivers, "_POOL_BYTES", 150 << 20)
    for rows in (3, 4, 5):  # 96, 128 and 160 MiB
        a = drivers.allocate((rows, 1 << 22), np.float64)
        del a
        gc.collect()
    assert sum(map(len, drivers._pool.values())) <= 150 << 20
    assert list(drivers._pool) == [4 << 25]  # the newest that fits; the older one dropped
