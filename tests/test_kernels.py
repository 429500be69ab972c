"""Kernels that reorganise work for BLAS give numpy's own results."""

import numpy as np
import pytest

from jaccli.rules.linalg import mm

RNG = np.random.default_rng(11)


@pytest.mark.parametrize("sa, sb", [
    ((5, 2, 3, 4, 6), (2, 3, 6, 7)),  # directions on A, a batch of small matrices B
    ((2, 3, 4, 6), (5, 2, 3, 6, 7)),  # directions on B
    ((5, 7, 2, 4, 6), (2, 6, 7)),
    ((5, 4, 6), (6, 7)),  # B a matrix
    ((4, 6), (5, 6, 7)),
    ((3, 2, 4, 6), (1, 6, 7)),  # broadcast batch: numpy's matmul
])
def test_mm_is_matmul(sa, sb):
    A, B = RNG.standard_normal(sa), RNG.standard_normal(sb)
    np.testing.assert_allclose(mm(A, B), A @ B, rtol=1e-12, atol=1e-12)
