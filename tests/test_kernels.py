"""Kernels that reorganise work for BLAS give numpy's own results."""

import math

import numpy as np
import pytest

from jaccli.rules._util import pad_spatial
from jaccli.rules.elementwise import _erf
from jaccli.rules.linalg import mm, per_sample_outer

RNG = np.random.default_rng(11)


@pytest.mark.parametrize("sa, sb", [
    ((5, 2, 3, 4, 6), (2, 3, 6, 7)),  # directions on A, a batch of small matrices B
    ((2, 3, 4, 6), (5, 2, 3, 6, 7)),  # directions on B
    ((5, 7, 2, 4, 6), (2, 6, 7)),
    ((5, 4, 6), (6, 7)),  # B a matrix
    ((4, 6), (5, 6, 7)),
    ((3, 2, 4, 6), (1, 6, 7)),  # broadcast batch: numpy's matmul
    ((5, 8, 1), (1, 6)),  # outer products (a contraction over one): multiplied, not through BLAS
    ((3, 1, 8, 1), (2, 1, 6)),  # ... broadcasting their batch axes as matmul does
    ((8, 1), (4, 1, 6)),
])
def test_mm_is_matmul(sa, sb):
    A, B = RNG.standard_normal(sa), RNG.standard_normal(sb)
    want = A @ B
    got = mm(A, B)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if A.shape[-1] == 1:  # one product per entry: exactly numpy's, in float32 too
        np.testing.assert_array_equal(mm(A.astype(np.float32), B.astype(np.float32)),
                                      A.astype(np.float32) @ B.astype(np.float32))


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("lead,M,K,N", [((), 5, 3, 4), ((3,), 5, 3, 4), ((2, 3), 4, 7, 5), ((2,), 3, 300, 250)])
def test_per_sample_outer(trans, lead, M, K, N):
    """Every path (no lead axis, one einsum per direction, one per sample and direction for large
    products), into a fresh array and into a strided view of a result."""
    rng = np.random.default_rng(0)
    A, G = rng.standard_normal((M, K)), rng.standard_normal(lead + (M, N))
    want = np.einsum("...mn,mk->...mnk" if trans else "...mn,mk->...mkn", G, A)
    np.testing.assert_allclose(per_sample_outer(A, G, trans), want, rtol=1e-12)
    R = np.zeros((M,) + lead + (2 + N * K,))  # samples first, as a result block is
    dest = np.moveaxis(R[..., 1:1 + N * K], 0, -2).reshape(lead + (M,) + want.shape[-2:])
    assert np.shares_memory(dest, R)
    per_sample_outer(A, G, trans, out=dest)
    np.testing.assert_allclose(dest, want, rtol=1e-12)
    assert not R[..., 0].any() and not R[..., -1].any()


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-15), (np.float32, 5e-7)])
def test_erf_is_math_erf(dtype, tol):
    """The vectorised erf against math.erf: both of double precision's ranges and their joins,
    single precision's clip, tiny, huge and non-finite values, and the sign of zero."""
    x = np.concatenate([np.linspace(-30, 30, 60001), np.geomspace(1e-30, 1, 301), [1, 8, 27, 4, 4.5, 3e38]])
    x = np.concatenate([x, -x, [0.0, -0.0, np.inf, -np.inf]]).astype(dtype)
    want = np.array([math.erf(float(v)) for v in x])
    got = _erf(x)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol if dtype == np.float32 else 0)
    assert np.signbit(_erf(np.array([-0.0], dtype)))[0] and np.isnan(_erf(np.array([np.nan], dtype)))[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("view", ["transposed", "strided", "fortran"])
def test_erf_in_pieces_of_any_layout(dtype, view):
    """A large input goes in pieces: a transposed, strided or Fortran-ordered one too (numpy's
    elementwise results keep a transposed operand's layout, as a GELU's Div does after a
    Transpose), each element at its own place."""
    from jaccli.rules.elementwise import _ERF_PIECE

    base = RNG.standard_normal((3, 2 * _ERF_PIECE // 64 + 5, 64)).astype(dtype)
    X = {"transposed": base.transpose(0, 2, 1), "strided": base[:, ::2, :], "fortran": np.asfortranarray(base)}[view]
    assert X.size > 2 * _ERF_PIECE
    np.testing.assert_array_equal(_erf(X), _erf(np.ascontiguousarray(X)))
    np.testing.assert_allclose(_erf(X), np.vectorize(math.erf)(X.astype(np.float64)), rtol=5e-7, atol=5e-7)


@pytest.mark.parametrize("shape, begin, end, value", [
    ((2, 3, 5, 6), (1, 2), (0, 3), 0.0),
    ((2, 3, 5, 6, 4), (1, 0, 2), (2, 1, 0), -np.inf),  # a max pool's padding, 3-D
    ((4, 7), (3,), (1,), 1.5),
    ((2, 2, 2, 2), (2, 2), (2, 2), np.nan),  # pads wider than the data
    ((1, 2, 3, 4), (0, 0), (0, 0), 0.0),  # none: X itself
])
def test_pad_spatial_is_np_pad(shape, begin, end, value):
    """The written-out padding: every border slab and corner holds `value`, the inside X."""
    X = RNG.standard_normal(shape).astype(np.float32)
    want = np.pad(X, [(0, 0)] * (X.ndim - len(begin)) + list(zip(begin, end)), constant_values=value)
    got = pad_spatial(X, begin, end, value)
    assert got.dtype == X.dtype
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError):
        pad_spatial(X, (-1,) + tuple(begin[1:]), end)


@pytest.mark.parametrize("kernel, strides, begin, end", [((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 3), (2, 1), (0, 1), (1, 2)),
                                                         ((3,), (2,), (1,), (0,))])
def test_channels_last_convolution_in_tiles(kernel, strides, begin, end):
    """_conv1_channels_last over tiles of images (two, two, then one: the padded input reused
    from tile to tile, its borders zero) gives one tile's result, which is the sum over offsets."""
    from jaccli.rules.conv import _conv1_channels_last, _out_size

    B, C, M = 5, 3, 4
    sp = (4, 5)[:len(kernel)]
    X = RNG.standard_normal((B, C) + sp)
    W = RNG.standard_normal((M, C) + kernel)
    out = _out_size([n + b + e for n, b, e in zip(sp, begin, end)], kernel, strides, [1] * len(kernel))
    dt = np.dtype(np.float64)
    whole = _conv1_channels_last(X, W.reshape(M, -1), kernel, strides, [1] * len(kernel), begin, end, out, dt)
    two = _conv1_channels_last(X, W.reshape(M, -1), kernel, strides, [1] * len(kernel), begin, end, out, dt,
                               tile_bytes=2 * C * math.prod(kernel) * math.prod(out) * 8)
    np.testing.assert_allclose(two, whole, rtol=1e-13)
    Xp = pad_spatial(X, begin, end)
    want = np.zeros((B, M) + tuple(out))
    for off in np.ndindex(*kernel):
        win = Xp[(Ellipsis,) + tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(off, strides, out))]
        want += np.einsum("mc,bc...->bm...", W[(slice(None), slice(None)) + off], win)
    np.testing.assert_allclose(whole, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel, strides, dilations, begin, end", [((3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
                                                                    ((2, 3), (1, 2), (2, 1), (0, 1), (1, 2)),
                                                                    ((3,), (3,), (1,), (2,), (0,))])
def test_channels_last_input_cotangent_is_the_adjoint(kernel, strides, dilations, begin, end):
    """_input_cotangent_channels_last is the adjoint of the convolution: <conv(X), G> = <X, cot(G)>,
    over tiles of rows (two, two, then one) as at once."""
    from jaccli.rules.conv import _conv1_channels_last, _input_cotangent_channels_last, _out_size

    L, C, M = 5, 3, 4
    sp = (5, 6)[:len(kernel)]
    X = RNG.standard_normal((L, C) + sp)
    W = RNG.standard_normal((M, C) + kernel)
    out = _out_size([n + b + e for n, b, e in zip(sp, begin, end)], kernel, strides, dilations)
    G = RNG.standard_normal((L, M) + tuple(out))
    Y = _conv1_channels_last(X, W.reshape(M, -1), kernel, strides, dilations, begin, end, out, np.dtype(np.float64))
    whole = _input_cotangent_channels_last(G, W, sp, strides, dilations, begin, end)
    tiles = _input_cotangent_channels_last(G, W, sp, strides, dilations, begin, end,
                                           tile_bytes=2 * C * math.prod(kernel) * math.prod(out) * 8)
    assert whole.shape == X.shape
    np.testing.assert_allclose(tiles, whole, rtol=1e-13)
    np.testing.assert_allclose(np.vdot(Y, G), np.vdot(X, whole), rtol=1e-12)


def test_depthwise_matrices_are_kept_by_the_kernel_s_values(monkeypatch):
    """The dense depthwise matrices kept from call to call are found by the kernel's values and
    the geometry: a kernel changed in place gets new ones; the kept ones stay within their budget,
    the least recently used dropped first."""
    from jaccli.rules import conv

    monkeypatch.setattr(conv, "_DW_KEPT", conv.collections.OrderedDict())
    X = RNG.standard_normal((2, 3, 4, 4))
    W = RNG.standard_normal((3, 1, 3, 3))
    geometry = ([1, 1], [1, 1], [1, 1], [4, 4])

    def dense():
        return conv._dw_dense(X, W, geometry[0], geometry[1], geometry[2], geometry[3], np.dtype(np.float64))

    def direct():
        Xp = pad_spatial(X, (1, 1), (1, 1))
        return sum(Xp[:, :, i:i + 4, j:j + 4] * W[:, 0, i, j][:, None, None] for i in range(3) for j in range(3))

    np.testing.assert_allclose(dense(), direct(), rtol=1e-12)
    assert len(conv._DW_KEPT) == 1
    np.testing.assert_allclose(dense(), direct(), rtol=1e-12)  # from the kept matrices
    W[1] += 1.0  # in place: the same array, other values
    np.testing.assert_allclose(dense(), direct(), rtol=1e-12)
    assert len(conv._DW_KEPT) == 2
    first = next(iter(conv._DW_KEPT))
    monkeypatch.setattr(conv, "_DW_KEPT_BYTES", 2 * 3 * 16 * 16 * 8)  # room for two
    W[2] -= 1.0
    dense()
    assert len(conv._DW_KEPT) == 2 and first not in conv._DW_KEPT
    from jaccli.rules._util import memory_limit

    with memory_limit(8 * 3 * 16 * 16 * 8):  # an eighth of --max-memory: room for one
        W[0] *= 2.0
        dense()
    assert len(conv._DW_KEPT) == 1
