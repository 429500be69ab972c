"""Convolution in 1-D, 2-D and 3-D: row windows and shifted GEMMs at stride 1, im2col otherwise.
The input cotangent of a stride-1 convolution is itself a convolution, of the cotangent."""

from __future__ import annotations

import collections
import math
import threading

import numpy as np

from . import _util, rule
from ..errors import UnsupportedOpError
from ._util import (add, conv_geometry, crop_or_pad, lead_flat, pad_spatial, sum_trailing, unpad, window_slices, windows,
                    windows_adjoint)


def _cols(X, kernel, strides, dilations, begin, end):
    """(B, C, *sp) -> windows (B, C, *out, *kernel), a strided view of the padded input."""
    return windows(pad_spatial(X, begin, end), kernel, strides, dilations)


def _apply(cols, W, group):
    """Windows (B, C, *out, *k) against kernel (M, C/g, *k) -> (B, M, *out)."""
    nd = W.ndim - 2
    B, C = cols.shape[:2]
    out = cols.shape[2 : 2 + nd]
    M = W.shape[0]
    if group == 1:
        # contract C and the kernel axes: (B, *out, C*k) @ (C*k, M)
        P = np.moveaxis(cols, 1, 1 + nd).reshape(B * math.prod(out), -1)
        Y = P @ W.reshape(M, -1).T
        return np.moveaxis(Y.reshape(B, *out, M), -1, 1)
    g = group
    P = cols.reshape(B, g, C // g, *out, *W.shape[2:])
    P = np.moveaxis(P, 2, 2 + nd).reshape(B, g, math.prod(out), -1)  # (B, g, O, Cg*k)
    Wg = W.reshape(g, M // g, -1)  # (g, Mg, Cg*k)
    Y = P @ np.swapaxes(Wg, -1, -2)  # (B, g, O, Mg)
    return np.swapaxes(Y, -1, -2).reshape(B, M, *out)


def _geometry(X, W, auto_pad, dilations, pads, strides):
    kernel = W.shape[2:]
    return conv_geometry(X.shape, kernel, strides, dilations, pads, auto_pad)


def _out_size(padded, kernel, strides, dilations):
    return [(n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(padded, kernel, strides, dilations)]


def _inner(begin, shape):
    """The unpadded part of a padded array, in its spatial axes."""
    return tuple(slice(b, b + x) for b, x in zip(begin, shape))


def _tile(item_bytes, budget=1 << 21):
    """Images per tile so that a tile's windows stay in cache."""
    return max(1, budget // max(1, item_bytes))


def _im2col(Xp, kernel, strides, dilations, out, dst):
    """Windows of the padded input Xp (B, C, *sp) copied into dst (B, C, K, *out), kernel offsets
    inside channels: the order of a kernel's (C, *kernel) axes. One slice copy per offset."""
    for k, off in enumerate(np.ndindex(*kernel)):
        dst[:, :, k] = Xp[window_slices(off, strides, dilations, out)]
    return dst


def _windows_last(off, strides, dilations, out):
    """The window of kernel offset `off`, over all outputs, in a (B, *sp, C) array."""
    return (slice(None),) + window_slices(off, strides, dilations, out)[1:] + (slice(None),)


def _conv1(X, W, strides, dilations, begin, end):
    """Convolution with one group, (B, C, *sp) -> (B, M, *out), no bias: per tile of images, the
    windows in the kernel's order and one GEMM per image, W (M, C*K) @ windows (C*K, O)."""
    M, C = W.shape[:2]
    kernel = W.shape[2:]
    K = math.prod(kernel)
    B = X.shape[0]
    dtype = np.result_type(X, W)
    out = _out_size([n + b + e for n, b, e in zip(X.shape[2:], begin, end)], kernel, strides, dilations)
    O = math.prod(out)
    if O < _FEW_OUTPUTS:
        return _conv1_images_as_columns(X, W.reshape(M, C * K).astype(dtype, copy=False), kernel, strides, dilations,
                                        begin, end, out, dtype)
    if kernel[-1] * C >= 16 and all(s == 1 for s in strides):
        return _conv1_rows(X.astype(dtype, copy=False), W.astype(dtype, copy=False), dilations, begin, end)
    Wk = W.reshape(M, C * K).astype(dtype, copy=False)
    Xp = pad_spatial(X, begin, end)
    if K == 1 and all(s == 1 for s in strides):  # pointwise: the input is its own window
        return (Wk @ Xp.reshape(B, C, O)).reshape(B, M, *out)
    Y = np.empty((B, M, O), dtype)
    step = _tile(C * K * O * dtype.itemsize)
    cols = np.empty((min(step, B), C, K, *out), dtype)
    for a in range(0, B, step):
        b = min(B, a + step)
        c = _im2col(Xp[a:b], kernel, strides, dilations, out, cols[: b - a])
        np.matmul(Wk, c.reshape(b - a, C * K, O), out=Y[a:b])
    return Y.reshape(B, M, *out)


_FEW_OUTPUTS = 64  # output positions per image below which its GEMM takes the images as columns: a deep
# layer's small map (ResNet-18 at 64x64: 2x2 by 512 channels, 3.8x faster; 4x4 by 256, 1.6x; 8x8 the same;
# 16x16 by 64, 0.75x: measured, one thread)


def _conv1_images_as_columns(X, Wk, kernel, strides, dilations, begin, end, out, dtype, tile_bytes=1 << 23):
    """Convolution with one group where each image has few output positions: per tile of
    images, their windows as the columns of one matrix, (C*K, images*O), and one GEMM by the
    kernel Wk (M, C*K). One GEMM per image would read the whole kernel for a few columns.
    With more than one kernel offset, the windows are copied from the input with its channels
    last (see _conv1_channels_last)."""
    if math.prod(kernel) > 1:
        return _conv1_channels_last(X, Wk, kernel, strides, dilations, begin, end, out, dtype, tile_bytes)
    B, C = X.shape[:2]
    M, O = Wk.shape[0], math.prod(out)
    Xp = pad_spatial(X.astype(dtype, copy=False), begin, end)
    Y = np.empty((B, M, O), dtype)
    step = _tile(Wk.shape[1] * O * dtype.itemsize, tile_bytes)
    for a in range(0, B, step):
        b = min(B, a + step)
        cols = np.empty((C, math.prod(kernel), b - a, *out), dtype)
        _im2col(Xp[a:b], kernel, strides, dilations, out, np.moveaxis(cols, 2, 0))
        R = Wk @ cols.reshape(Wk.shape[1], (b - a) * O)
        Y[a:b] = R.reshape(M, b - a, O).transpose(1, 0, 2)
    return Y.reshape(B, M, *out)


def _conv1_channels_last(X, Wk, kernel, strides, dilations, begin, end, out, dtype, tile_bytes=1 << 23):
    """The same with the input's channels last: each kernel offset's windows are one copy whose
    inner loops run over the channels, where with the channels first they run over a row of a
    small map, a few elements each (a 4x4 map by 64 channels: 0.6x the time, 2x2 by 128: 0.5x;
    7x7 with 3 to 512 channels, strided or not: 0.8-0.95x; measured). The windows are the rows
    of the GEMM's matrix, (images*O, C*K), by Wk transposed."""
    B, C = X.shape[:2]
    M, O, K = Wk.shape[0], math.prod(out), math.prod(kernel)
    padded = [n + b + e for n, b, e in zip(X.shape[2:], begin, end)]
    inner = (slice(None),) + _inner(begin, X.shape[2:]) + (slice(None),)  # in a (B, *padded, C) array
    step = _tile(C * K * O * dtype.itemsize, tile_bytes)
    Xc = np.zeros((min(step, B), *padded, C), dtype)  # its borders stay zero from tile to tile
    cols = np.empty((min(step, B), *out, C, K), dtype)
    Y = np.empty((B, M, O), dtype)
    for a in range(0, B, step):
        n = min(B, a + step) - a
        Xc[:n][inner] = np.moveaxis(X[a:a + n], 1, -1)
        for k, off in enumerate(np.ndindex(*kernel)):
            cols[:n, ..., k] = Xc[:n][_windows_last(off, strides, dilations, out)]
        R = cols[:n].reshape(n * O, C * K) @ Wk.T  # (n*O, M)
        Y[a:a + n] = R.reshape(n, O, M).transpose(0, 2, 1)
    return Y.reshape(B, M, *out)


_ROWS_TILE = 1 << 22  # bytes of a tile of _conv1_rows: a 16-channel 32x32 image's offsets take about 0.35 MB,
# so 11 images a tile. Two threads' tiles of 2 or 3 images (1 MiB) spent their time in Python, taking turns
# at the GIL: a small ResNet's input Jacobian took 14% longer, its parameter Jacobian 7% (measured); one
# thread is as fast either way, from 3 to 256 channels


def _flat_shifts(sp, kernel, dilations, out):
    """On a padded input of spatial shape `sp` flattened, the flat shift that each offset of
    `kernel` (over the leading spatial axes) reads at, and n: the flat length of the output
    rows, `out` rows of the padded grid (columns beyond `out` included)."""
    pitch = [math.prod(sp[i + 1:]) for i in range(len(sp))]
    shifts = [sum(o * d * p for o, d, p in zip(off, dilations, pitch)) for off in np.ndindex(*kernel)]
    return shifts, out[0] * pitch[0]


def _conv1_rows(X, W, dilations, begin, end, tile_bytes=_ROWS_TILE):
    """Stride-1 convolution of X (B, C, *sp), zero-padded by begin/end, by row windows. On the
    padded input flattened in space, a kernel offset reads a contiguous range at its own shift.
    So per tile of images: the padded input once per offset along the last axis (kw copies,
    stacked with the channels: K = kw*C), then one GEMM per offset along the other axes,
    W_g (M, kw*C) @ X3[:, shift_g:][:n], each on a view, summed; the output covers the padded
    grid's rows, and its columns beyond `out` are dropped as the tile is copied out.

    With few output channels (an input cotangent into a narrow layer) those GEMMs are
    nearly matrix-vector products; then one GEMM of all offsets' kernels at once,
    (G*M, kw*C) @ X3, gives G results whose shifted ranges are summed instead."""
    B, C = X.shape[:2]
    M = W.shape[0]
    kernel = W.shape[2:]
    kw, dw = kernel[-1], dilations[-1]
    sp = tuple(n + b + e for n, b, e in zip(X.shape[2:], begin, end))
    out = _out_size(sp, kernel, [1] * len(sp), dilations)
    shifts, n = _flat_shifts(sp, kernel[:-1], dilations, out)
    size = math.prod(sp)
    width = max(shifts) + n  # what the GEMMs read of each row copy
    G = len(shifts)
    stacked = G > 1 and M <= _NARROW
    W3 = np.ascontiguousarray(W.reshape(M, C, G, kw).transpose(2, 0, 3, 1)).reshape(G, M, kw * C)
    Y = np.empty((B, M, *out), X.dtype)
    step = _tile((kw * C * width + (G * M * width if stacked else 2 * M * n)) * X.dtype.itemsize, tile_bytes)
    flat = np.zeros((min(step, B), C, width + (kw - 1) * dw), X.dtype)  # zero borders stay zero
    X3 = np.empty((min(step, B), kw, C, width), X.dtype)
    acc = np.empty((min(step, B), M, n), X.dtype)
    if stacked:
        W3 = W3.reshape(G * M, kw * C)
        tmp = np.empty((min(step, B), G * M, width), X.dtype)
    else:
        tmp = np.empty((min(step, B), M, n), X.dtype) if G > 1 else None
    inner = _inner(begin, X.shape[2:])
    valid = (Ellipsis,) + tuple(slice(0, o) for o in out[1:])
    for a in range(0, B, step):
        b = min(B, a + step)
        f, x3 = flat[: b - a], X3[: b - a]
        grid = f[:, :, :size]
        grid.shape = (b - a, C) + sp  # a view (setting .shape never copies): the padded tile
        grid[(Ellipsis,) + inner] = X[a:b]
        for j in range(kw):
            x3[:, j] = f[:, :, j * dw: j * dw + width]
        x3 = x3.reshape(b - a, kw * C, width)
        y = acc[: b - a]
        if stacked:
            r = np.matmul(W3, x3, out=tmp[: b - a])
            np.copyto(y, r[:, :M, shifts[0]:shifts[0] + n])
            for g in range(1, G):
                y += r[:, g * M:(g + 1) * M, shifts[g]:shifts[g] + n]
        else:
            for g, sh in enumerate(shifts):
                if g == 0:
                    np.matmul(W3[0], x3[:, :, sh:sh + n], out=y)
                else:
                    t = tmp[: b - a]
                    np.matmul(W3[g], x3[:, :, sh:sh + n], out=t)
                    y += t
        Y[a:b] = y.reshape((b - a, M, out[0]) + sp[1:])[valid]
    return Y


_NARROW = 4  # output channels up to which _conv1_rows stacks the offsets' GEMMs


def _windows_all(X, kernel, strides, dilations, begin, end):
    """Every sample's windows (B, C*K, O), kernel offsets inside channels."""
    Xp = pad_spatial(X, begin, end)
    out = _out_size(Xp.shape[2:], kernel, strides, dilations)
    cols = np.empty(X.shape[:2] + (math.prod(kernel),) + tuple(out), X.dtype)
    _im2col(Xp, kernel, strides, dilations, out, cols)
    return cols.reshape(X.shape[0], -1, math.prod(out))


# ---- depthwise: one input channel per group -----------------------------------------------------------
# A GEMM per group would be a matrix-vector product over copied windows. Instead, per kernel offset,
# each channel's window (a strided view) times that channel's weights, summed over the offsets while a
# tile of images stays in cache. Output channel c * Mg + m is input channel c's m-th (of Mg).


def _depthwise(W, group):
    return group > 1 and W.shape[1] == 1


def _dw_weights(W, group, dtype):
    """Kernel (C * Mg, 1, *k) as (K, C, Mg, 1, ..., 1): offset k's weights, broadcasting over
    (B, C, Mg, *out)."""
    nd, K = W.ndim - 2, math.prod(W.shape[2:])
    Wk = np.moveaxis(W.reshape(-1, K), -1, 0).astype(dtype, copy=False)
    return Wk.reshape((K, group, -1) + (1,) * nd)


def _dw_inner(out, sp, strides):
    """How long the innermost loops of _dw_conv's products are: a row range of the padded grid
    at stride 1, an output row otherwise."""
    return out[0] * math.prod(sp[1:]) if all(v == 1 for v in strides) else out[-1]


def _channels_last_pays(C, M, inner):
    """Whether a depthwise convolution (one output per channel) is better taken with the channels
    innermost: on a small map, each offset's product is many loops of a few elements, where the
    channels give one loop of C (0.15-0.55x the time from twice as many channels as the row's
    elements, EfficientNet-B0's and ConvNeXt's deep layers; measured)."""
    return M == C and C >= _DW_CHANNELS_LAST * inner


_DW_CHANNELS_LAST = 2  # channels per element of the rows' loops from which a depthwise product takes them innermost


def _dw_weights_last(W, dtype):
    """A depthwise kernel (C, 1, *k) as (K, C): offset k's weight for every channel."""
    return np.ascontiguousarray(W.reshape(W.shape[0], -1).T.astype(dtype, copy=False))


def _dw_conv_channels_last(X, W, strides, dilations, begin, end, out, dtype):
    """Depthwise convolution (B, C, *sp) -> (B, C, *out), one output per channel, with the
    channels innermost: per kernel offset, its window (B, *out, C) times the offset's weights (C,)."""
    C, kernel = X.shape[1], W.shape[2:]
    Xc = np.ascontiguousarray(np.moveaxis(pad_spatial(X.astype(dtype, copy=False), begin, end), 1, -1))
    Wk = _dw_weights_last(W, dtype)
    Y = np.empty((X.shape[0], *out, C), dtype)
    t = np.empty_like(Y)
    for k, off in enumerate(np.ndindex(*kernel)):
        np.multiply(Xc[_windows_last(off, strides, dilations, out)], Wk[k], out=t if k else Y)
        if k:
            Y += t
    return np.ascontiguousarray(np.moveaxis(Y, -1, 1))


# ---- depthwise on a small map: each channel's convolution as a dense matrix ----------------------------
# On a map not much larger than the kernel (ConvNeXt's 7x7 kernels on 8x8 down to 2x2 maps), most of
# a kernel's offsets are short loops over a few positions, many of them over padding. There, channel c's
# convolution is a matrix A_c (out positions, in positions) built from its weights, and the whole layer is
# a batch of small GEMMs, one per channel: forward Y_c = X_c A_c^T, input cotangent X_c = Y_c A_c.


def _dw_dense_pays(R, C, M, in_sp, out, kernel, itemsize, kept=lambda: None):
    """Whether a depthwise convolution (one output per channel) of R rows (images, or directions
    times images) is better taken as dense per-channel matrices: building them (unless `kept()`
    finds them kept from an earlier call) and their GEMMs against the sums over kernel offsets,
    per output position and channel (the constants below), with the matrices small."""
    S, O, K = math.prod(in_sp), math.prod(out), math.prod(kernel)
    if M != C or not S or not O or C * O * S * itemsize > _DW_DENSE_BYTES:
        return False
    build = 0.0 if kept() is not None else _DW_BUILD
    return S * build + S * R * _DW_GEMM <= R * K * _DW_OFFSET


# nanoseconds per output position and channel: per input position to build the matrices (np.take), per
# input position and row in their GEMMs, per kernel offset and row in the sums over offsets; measured on
# ConvNeXt's, EfficientNet's and MobileNet's depthwise layers, float32. The matrices pay up to about two
# input positions per kernel offset for one row, five for eight rows, twelve for 24 (0.04-0.5x the time;
# a 4x4 map with a 7x7 kernel, 24 rows: 0.04-0.06x); once built, up to about forty.
_DW_BUILD, _DW_GEMM, _DW_OFFSET = 0.57, 0.0096, 0.4
_DW_DENSE_BYTES = 1 << 24  # the matrices' size at most

# Matrices built lately, by the kernel's values and the geometry: a model's depthwise layers are
# differentiated call after call with the same weights, and building their matrices costs more than their
# GEMMs (ConvNeXt-atto's 16x16 maps at 64x64 input: 1.4 ms against 0.3). Least recently used dropped first.
_DW_KEPT, _DW_KEPT_LOCK = collections.OrderedDict(), threading.Lock()
_DW_KEPT_BYTES = 1 << 25  # at most; and an eighth of the call's --max-memory (see _dw_kept_budget)


def _dw_kept_budget():
    limit = _util._MAX_BYTES.get()
    return _DW_KEPT_BYTES if limit is None else min(_DW_KEPT_BYTES, limit // 8)


def _dw_key(W, in_sp, begin, strides, dilations, out, dtype):
    return (W.tobytes(), W.shape, W.dtype.str, np.dtype(dtype).str) + tuple(map(tuple, (in_sp, begin, strides, dilations, out)))


def _dw_kept(key):
    with _DW_KEPT_LOCK:
        A = _DW_KEPT.get(key)
        if A is not None:
            _DW_KEPT.move_to_end(key)
        return A


def _dw_offsets(in_sp, begin, strides, dilations, out, kernel):
    """(O, S) int32: which kernel offset (flat) takes input position s (flat, unpadded) to output
    position o, or K (the number of offsets) where none does."""
    nd, K = len(in_sp), math.prod(kernel)
    flat = np.zeros((1,) * 2 * nd, np.int64)
    none = np.zeros((1,) * 2 * nd, bool)
    for d in range(nd):  # per axis, offset k = (s + begin - o * stride) / dilation where whole and in range
        k, r = np.divmod(np.arange(in_sp[d])[None, :] + begin[d] - np.arange(out[d])[:, None] * strides[d], dilations[d])
        shape = [1] * 2 * nd
        shape[d], shape[nd + d] = out[d], in_sp[d]
        flat = flat * kernel[d] + k.reshape(shape)
        none = none | ((r != 0) | (k < 0) | (k >= kernel[d])).reshape(shape)
    return np.where(none, K, flat).reshape(math.prod(out), math.prod(in_sp)).astype(np.int32)


def _dw_matrices(W, in_sp, begin, strides, dilations, out, dtype):
    """A depthwise kernel (C, 1, *k) as its channels' matrices (C, O, S) over the unpadded input,
    read-only: kept for later calls (_DW_KEPT) while they fit."""
    key = _dw_key(W, in_sp, begin, strides, dilations, out, dtype)
    A = _dw_kept(key)
    if A is not None:
        return A
    table = _dw_offsets(in_sp, begin, strides, dilations, out, W.shape[2:])
    Wz = np.zeros((W.shape[0], math.prod(W.shape[2:]) + 1), dtype)  # and a zero for "no offset"
    Wz[:, :-1] = W.reshape(W.shape[0], -1)
    A = np.take(Wz, table, axis=1)
    A.setflags(write=False)
    budget = _dw_kept_budget()
    if A.nbytes <= budget:
        with _DW_KEPT_LOCK:
            _DW_KEPT[key] = A
            while sum(a.nbytes for a in _DW_KEPT.values()) > budget:
                _DW_KEPT.popitem(last=False)
    return A


def _dw_dense(X, W, strides, dilations, begin, out, dtype):
    """Depthwise convolution (R, C, *sp) -> (R, C, *out), one output per channel, as per-channel GEMMs."""
    R, C = X.shape[:2]
    A = _dw_matrices(W, X.shape[2:], begin, strides, dilations, out, dtype)
    Y = np.empty((R, C, A.shape[1]), dtype)
    np.matmul(X.reshape(R, C, -1).transpose(1, 0, 2).astype(dtype, copy=False), A.transpose(0, 2, 1),
              out=Y.transpose(1, 0, 2))
    return Y.reshape(R, C, *out)


def _dw_dense_input_cotangent(Yb, W, in_sp, strides, dilations, begin):
    """Cotangent of the (unpadded) input (R, C, *in_sp) of _dw_dense from Yb (R, C, *out)."""
    R, C, out = Yb.shape[0], Yb.shape[1], Yb.shape[2:]
    A = _dw_matrices(W, in_sp, begin, strides, dilations, out, Yb.dtype)
    Xb = np.empty((R, C, A.shape[2]), Yb.dtype)
    np.matmul(Yb.reshape(R, C, -1).transpose(1, 0, 2), A, out=Xb.transpose(1, 0, 2))
    return Xb.reshape(R, C, *in_sp)


def _dw_conv(X, W, group, strides, dilations, begin, end):
    """Depthwise convolution (B, C, *sp) -> (B, C * Mg, *out). At stride 1 each offset reads a
    contiguous range of the padded input flattened in space (see _conv1_rows): whole rows."""
    kernel = W.shape[2:]
    B, C, M = X.shape[0], X.shape[1], W.shape[0]
    dtype = np.result_type(X, W)
    sp = tuple(n + b + e for n, b, e in zip(X.shape[2:], begin, end))
    out = _out_size(sp, kernel, strides, dilations)
    kept = lambda: _dw_kept(_dw_key(W, X.shape[2:], begin, strides, dilations, out, dtype))  # noqa: E731
    if _dw_dense_pays(B, C, M, X.shape[2:], out, kernel, dtype.itemsize, kept):
        return _dw_dense(X, W, strides, dilations, begin, out, dtype)
    if _channels_last_pays(C, M, _dw_inner(out, sp, strides)):
        return _dw_conv_channels_last(X, W, strides, dilations, begin, end, out, dtype)
    Wk = _dw_weights(W, group, dtype)
    flat = all(v == 1 for v in strides)
    if flat:
        shifts, n = _flat_shifts(sp, kernel, dilations, out)
        grid_out = (out[0],) + sp[1:]
        Xp = np.zeros((B, C, max(shifts) + n), dtype)  # zero borders, and zeros beyond the last row
        grid = Xp[:, :, :math.prod(sp)]
        grid.shape = (B, C) + sp  # a view (setting .shape never copies)
        grid[(Ellipsis,) + _inner(begin, X.shape[2:])] = X
        Wk = Wk.reshape(Wk.shape[:3] + (1,))
    else:
        Xp, grid_out = pad_spatial(X, begin, end), out
    Y = np.empty((B, C, M // C) + ((n,) if flat else tuple(out)), dtype)
    step = _tile(2 * M * Y[0, 0, 0].size * dtype.itemsize)
    tmp = np.empty((min(step, B),) + Y.shape[1:], dtype)
    for a in range(0, B, step):
        y = Y[a:a + step]
        t = tmp[: len(y)]
        for k, off in enumerate(np.ndindex(*kernel)):
            where = (Ellipsis, slice(shifts[k], shifts[k] + n)) if flat else window_slices(off, strides, dilations, out)
            np.multiply(Xp[a:a + step][where][:, :, None], Wk[k], out=t if k else y)
            if k:
                y += t
    if flat:
        return Y.reshape((B, M) + grid_out)[(Ellipsis,) + tuple(slice(0, o) for o in out[1:])]
    return Y.reshape(B, M, *out)


def _dw_input_cotangent(Yb, W, group, padded, strides, dilations):
    """Cotangent of the padded input from Yb (L, C * Mg, *out): per offset, the weighted cotangent
    (summed over a channel's Mg outputs) added into the window that offset read; at stride 1, into
    a contiguous range of the input flattened, from the cotangent on the padded grid's rows."""
    kernel = W.shape[2:]
    L, M, out = Yb.shape[0], Yb.shape[1], Yb.shape[2:]
    Mg = M // group
    if _channels_last_pays(group, M, _dw_inner(out, padded, strides)):  # see _dw_conv_channels_last
        Yc = np.ascontiguousarray(np.moveaxis(Yb, 1, -1))
        Wk = _dw_weights_last(W, Yb.dtype)
        Xc = np.zeros((L, *padded, M), Yb.dtype)
        t = np.empty_like(Yc)
        for k, off in enumerate(np.ndindex(*kernel)):
            Xc[_windows_last(off, strides, dilations, out)] += np.multiply(Yc, Wk[k], out=t)
        return np.ascontiguousarray(np.moveaxis(Xc, -1, 1))
    Wk = _dw_weights(W, group, Yb.dtype)
    flat = all(v == 1 for v in strides)
    if flat:
        shifts, n = _flat_shifts(padded, kernel, dilations, out)
        Yg = np.zeros((L, group, Mg, out[0]) + tuple(padded[1:]), Yb.dtype)  # zero beyond `out`
        Yg[(Ellipsis,) + tuple(slice(0, o) for o in out)] = Yb.reshape((L, group, Mg) + out)
        Yg = Yg.reshape(L, group, Mg, n)
        Wk = Wk.reshape(Wk.shape[:3] + (1,))
        Xb = np.zeros((L, group, max(shifts) + n), Yb.dtype)
    else:
        Yg = Yb.reshape(L, group, Mg, *out)
        Xb = np.zeros((L, group) + tuple(padded), Yb.dtype)
    step = _tile(3 * M * Yg[0, 0, 0].size * Yb.itemsize)
    tmp = np.empty((min(step, L),) + Yg.shape[1:], Yb.dtype)
    for a in range(0, L, step):
        y, xb = Yg[a:a + step], Xb[a:a + step]
        t = tmp[: len(y)]
        for k, off in enumerate(np.ndindex(*kernel)):
            np.multiply(y, Wk[k], out=t)
            where = (Ellipsis, slice(shifts[k], shifts[k] + n)) if flat else window_slices(off, strides, dilations, out)
            xb[where] += t[:, :, 0] if Mg == 1 else t.sum(axis=2)
    if flat:
        return Xb[:, :, :math.prod(padded)].reshape((L, group) + tuple(padded))
    return Xb


def _conv(X, W, group, strides, dilations, begin, end):
    if group == 1:
        return _conv1(X, W, strides, dilations, begin, end)
    if _depthwise(W, group):
        return _dw_conv(X, W, group, strides, dilations, begin, end)
    return _apply(_cols(X, W.shape[2:], strides, dilations, begin, end), W, group)


def _input_cotangent_stride1(Yb, W, dilations, begin, end):
    """For stride 1 the input cotangent is itself a convolution: of Yb (L, M, *out) with the kernel
    flipped in space and transposed in channels, padded by the kernel's extent less the forward
    pads. None where a forward pad exceeds the kernel's extent (that would be a crop)."""
    kernel = W.shape[2:]
    ext = [(k - 1) * d for k, d in zip(kernel, dilations)]
    pb = [x - b for x, b in zip(ext, begin)]
    pe = [x - e for x, e in zip(ext, end)]
    if min(pb + pe) < 0:
        return None
    flip = (slice(None), slice(None)) + (slice(None, None, -1),) * len(kernel)
    Wt = np.ascontiguousarray(W[flip].swapaxes(0, 1))  # (C, M, *kernel)
    return _conv1(Yb, Wt, [1] * len(kernel), dilations, pb, pe)


def _banded_pays(W, padded, dilations, waste):
    """Whether the input cotangent of a 2-D stride-1 convolution is better taken with band
    matrices: for a narrow input, where the band's zeros (padded width over kernel width, at
    most `waste`) cost less than the other ways, and the bands are small."""
    if W.ndim != 4:
        return False
    M, Cg, kh, kw = W.shape
    ow = padded[1] - (kw - 1) * dilations[1]
    return padded[1] <= waste * kw and M * ow * kh * Cg * padded[1] <= _BANDED_VALUES


_BANDED_WASTE = 3.0  # padded width over kernel width up to which a dense kernel's cotangent is banded:
# 0.5-0.7x the time of the small GEMMs up to three kernel widths, 1.2x at 3.3, 2.7x at 6 (measured)
_DW_BANDED_WASTE = 12.0  # the same for a depthwise kernel: 0.3-0.6x the sums over offsets up to
# twelve kernel widths, 1.3x at 19 (measured)
_BANDED_VALUES = 1 << 21  # the bands' size at most


def _input_cotangent_banded(Yb, W, group, padded, dilations, tile_bytes=1 << 21):
    """Cotangent of the padded input (L, C, Hp, Wp) of a 2-D stride-1 convolution from Yb
    (L, M, oh, ow), for `group` groups of Cg input and Mg output channels (one group: a dense
    kernel; one input channel per group: depthwise). An output row i (a group's Mg channels
    and ow columns) adds into input rows i + di * dh of the group's channels through a band
    matrix B (Mg * ow, kh * Cg * Wp), which holds kernel row di's weights along the diagonals
    j + dj * dw. Per group and tile of images, one GEMM of all their output rows with B (an
    input of a few kernel widths wastes little on the band's zeros), then kh shifted sums of
    whole rows."""
    L, M, oh, ow = Yb.shape
    Cg, kh, kw = W.shape[1:]
    Hp, Wp = padded
    dh, dw = dilations
    g, Mg = group, M // group
    B = np.zeros((g, Mg, ow, kh, Cg, Wp), Yb.dtype)
    Wt = W.reshape(g, Mg, Cg, kh, kw).transpose(0, 1, 3, 2, 4).astype(Yb.dtype, copy=False)  # (g, Mg, kh, Cg, kw)
    for j in range(ow):
        B[..., j, :, :, j:j + (kw - 1) * dw + 1:dw] = Wt
    B = B.reshape(g, Mg * ow, kh * Cg * Wp)
    Xt = np.zeros((g, L, Hp, Cg * Wp), Yb.dtype)  # rows last but one: each sum below adds whole rows
    step = _tile(2 * g * oh * kh * Cg * Wp * Yb.itemsize, tile_bytes)
    for a in range(0, L, step):
        y = Yb[a:a + step]
        Yt = y.reshape(len(y), g, Mg, oh, ow).transpose(1, 0, 3, 2, 4).reshape(g, -1, Mg * ow)  # copied
        R = (Yt @ B).reshape(g, len(y), oh, kh, Cg * Wp)
        for di in range(kh):
            Xt[:, a:a + step, di * dh:di * dh + oh] += R[:, :, :, di]
    X5 = Xt.reshape(g, L, Hp, Cg, Wp).transpose(1, 0, 3, 2, 4)  # (L, g, Cg, Hp, Wp), a view
    return X5[:, 0] if g == 1 else X5.reshape(L, g * Cg, Hp, Wp)


@rule("Conv", since=1)
class Conv:
    """Y = conv(X, W) + B: X (N, C, *sp), W (M, C/group, *kernel), B (M,)."""

    keeps = True

    def forward(X, W, B=None, *, auto_pad, dilations=None, group, kernel_shape=None, pads=None, strides=None):
        s, d, begin, end, _ = _geometry(X, W, auto_pad, dilations, pads, strides)
        Y = _conv(X, W, group, s, d, begin, end)
        if B is not None:
            Y = Y + B.reshape((-1,) + (1,) * (W.ndim - 2))
        return Y

    def jvp(cx, Xdot, Wdot, Bdot=None, *, auto_pad, dilations=None, group, kernel_shape=None, pads=None, strides=None):
        X, W = cx.x[0], cx.x[1]
        s, d, begin, end, _ = _geometry(X, W, auto_pad, dilations, pads, strides)
        terms = []
        if Xdot is not None:  # linear in X: the op itself on the tangent, directions folded into B
            flat, head = lead_flat(Xdot, X.ndim - 1)
            Y = _conv(flat, W, group, s, d, begin, end)
            terms.append(Y.reshape(head + Y.shape[1:]))
        if Wdot is not None:
            flat, head = lead_flat(Wdot, W.ndim)  # (L, M, C/g, *k)
            Y = _apply_many(_cols(X, W.shape[2:], s, d, begin, end), flat, group)
            terms.append(Y.reshape(head + Y.shape[1:]))
        if Bdot is not None:
            terms.append(_bias_tangent(Bdot, cx.y[0]))
        return add(*terms)

    def vjp(cx, Ybar, *, auto_pad, dilations=None, group, kernel_shape=None, pads=None, strides=None):
        X, W = cx.x[0], cx.x[1]
        s, d, begin, end, _ = _geometry(X, W, auto_pad, dilations, pads, strides)
        nd = W.ndim - 2
        kernel = W.shape[2:]
        lead = cx.lead(Ybar)
        Xbar = Wbar = Bbar = None
        if cx.need[0]:
            flat, head = lead_flat(Ybar, X.ndim - 1)  # (L, M, *out)
            padded = [n + b + e for n, b, e in zip(X.shape[2:], begin, end)]
            Xb = None
            stride1 = all(v == 1 for v in s)
            dw = _depthwise(W, group)
            # not banded where a small map is better taken otherwise: the channels innermost (depthwise),
            # the images as columns (one group: a kernel of 1280 by 320 on a 2x2 map, 0.6-0.8x the time)
            small = (dw and _channels_last_pays(group, W.shape[0], _dw_inner(flat.shape[2:], padded, s))
                     or group == 1 and math.prod(X.shape[2:]) < _FEW_OUTPUTS)
            kept = lambda: _dw_kept(_dw_key(W, X.shape[2:], begin, s, d, flat.shape[2:], flat.dtype))  # noqa: E731
            if dw and _dw_dense_pays(len(flat), group, W.shape[0], X.shape[2:], flat.shape[2:], kernel, flat.dtype.itemsize,
                                     kept):
                Xb = _dw_dense_input_cotangent(flat, W, X.shape[2:], s, d, begin)
            elif group == 1 and _cotangent_last_pays(W, flat.shape[2:], s):
                Xb = _input_cotangent_channels_last(flat, W, X.shape[2:], s, d, begin, end)
            elif stride1 and not small and _banded_pays(W, padded, d, _DW_BANDED_WASTE if dw else _BANDED_WASTE):
                Xb = unpad(_input_cotangent_banded(flat, W, group, padded, d), begin, end)
            elif group == 1 and stride1:
                Xb = _input_cotangent_stride1(flat, W, d, begin, end)
            if Xb is None:
                if group == 1 and stride1:
                    Xp = _input_cotangent_shifted(flat, W, padded, d)
                elif group == 1:
                    Xp = _input_cotangent(flat, W, padded, s, d)
                elif dw:
                    Xp = _dw_input_cotangent(flat, W, group, padded, s, d)
                else:
                    G = _cols_adjoint_input(flat, W, group)  # (L, C, *out, *k)
                    Xp = windows_adjoint(G, padded, kernel, s, d)
                Xb = unpad(Xp, begin, end)
            Xbar = Xb.reshape(head + X.shape[1:])
        if cx.need[1] and group == 1:
            Wbar = _weight_cotangent1(Ybar, _windows_all(X, kernel, s, d, begin, end), W, lead, cx.keep[1])
        elif cx.need[1]:
            cols = _cols(X, kernel, s, d, begin, end)
            Wbar = _weight_cotangent(Ybar, cols, W, group, lead, cx.keep[1])
        if len(cx.x) > 2 and cx.x[2] is not None and cx.need[2]:
            Bbar = sum_trailing(Ybar, range(Ybar.ndim - nd, Ybar.ndim), keepdims=False)  # (*lead, N, M)
            if not cx.keep[2]:
                Bbar = Bbar.sum(axis=lead)
        return Xbar, Wbar, Bbar


def _bias_tangent(Bdot, Y):
    nd = Y.ndim - 2
    lead = Bdot.ndim - 1
    D = Bdot.reshape(Bdot.shape[:lead] + (1,) + Bdot.shape[lead:] + (1,) * nd)
    return np.broadcast_to(D, Bdot.shape[:lead] + Y.shape)


def _apply_many(cols, Wflat, group):
    """Windows (B, C, *out, *k) against L kernels (L, M, C/g, *k) -> (L, B, M, *out)."""
    nd = Wflat.ndim - 3
    B, C = cols.shape[:2]
    out = cols.shape[2 : 2 + nd]
    L, M = Wflat.shape[:2]
    g = group
    P = np.moveaxis(cols.reshape(B, g, C // g, *out, *Wflat.shape[3:]), 2, 2 + nd).reshape(B, g, -1, Wflat[0, 0].size)
    Y = np.einsum("bgok,lgmk->lbgmo", P, Wflat.reshape(L, g, M // g, -1), optimize=True)
    return Y.reshape(L, B, M, *out)


def _input_cotangent(Yb, W, padded, strides, dilations, tile_bytes=1 << 21):
    """Cotangent of the padded input from Yb (L, M, *out), groups = 1: per tile of images, one
    GEMM gives every kernel offset's contribution, (K*C, M) @ (M, l*O), each added into its
    strided window of the accumulator while the tile is still in cache."""
    M, C = W.shape[:2]
    kernel = W.shape[2:]
    K = math.prod(kernel)
    L = Yb.shape[0]
    out = Yb.shape[2:]
    O = math.prod(out)
    Wk = W.reshape(M, C, K).transpose(2, 1, 0).reshape(K * C, M)  # (K*C, M)
    Xb = np.zeros((L, C) + tuple(padded), dtype=Yb.dtype)
    step = max(1, tile_bytes // max(1, K * C * O * Yb.itemsize))
    offsets = list(np.ndindex(*kernel))
    for a in range(0, L, step):
        Yt = Yb[a:a + step]
        l = Yt.shape[0]
        G = (Wk @ np.moveaxis(Yt, 1, 0).reshape(M, l * O)).reshape(K, C, l, *out)
        G = np.moveaxis(G, 2, 1)  # (K, l, C, *out): a view
        dst = Xb[a:a + l]
        for k, off in enumerate(offsets):
            dst[window_slices(off, strides, dilations, out)] += G[k]
    return Xb


def _cotangent_last_pays(W, out, strides):
    """Whether a one-group convolution's input cotangent is better taken channels last (see
    _input_cotangent_channels_last): few output positions, strided (ResNet's and YOLO's
    downsampling 3x3 convolutions onto 4x4 and 2x2 maps: 0.35-0.56x the time), or at stride 1 a
    2x2 map or smaller (512 channels: 0.6x, 64: 0.9x), and channels enough for its inner loops
    (measured, one thread: larger maps, and 3 channels, are slower so)."""
    O = math.prod(out)
    return W.shape[1] >= _LAST_CHANNELS and (O <= _LAST_STRIDE1 if all(v == 1 for v in strides) else O < _FEW_OUTPUTS)


_LAST_CHANNELS, _LAST_STRIDE1 = 16, 4  # input channels at least; output positions at most at stride 1


def _input_cotangent_channels_last(Yb, W, sp, strides, dilations, begin, end, tile_bytes=1 << 23):
    """Cotangent of the (unpadded) input (L, C, *sp) from Yb (L, M, *out), one group: per tile of
    rows, one GEMM by the kernel as it is, (rows*O, M) @ (M, C*K), then each kernel offset's
    share added into its window of the padded input with the channels last (inner loops over
    the channels). The other ways copy the kernel flipped or transposed first, which costs as
    much as the GEMM on a small map (512 by 512 by 3x3: 1.3 ms)."""
    L, M, out = Yb.shape[0], Yb.shape[1], Yb.shape[2:]
    C, kernel = W.shape[1], W.shape[2:]
    K, O = math.prod(kernel), math.prod(out)
    padded = [n + b + e for n, b, e in zip(sp, begin, end)]
    inner = (slice(None),) + _inner(begin, sp) + (slice(None),)  # in a (L, *padded, C) array
    Wk = W.reshape(M, C * K).astype(Yb.dtype, copy=False)
    step = _tile(C * K * O * Yb.itemsize, tile_bytes)
    Xb = np.empty((L, C) + tuple(sp), Yb.dtype)
    for a in range(0, L, step):
        n = min(L, a + step) - a
        G = (np.moveaxis(Yb[a:a + n], 1, -1).reshape(n * O, M) @ Wk).reshape(n, *out, C, K)
        Xc = np.zeros((n, *padded, C), Yb.dtype)
        for k, off in enumerate(np.ndindex(*kernel)):
            Xc[_windows_last(off, strides, dilations, out)] += G[..., k]
        Xb[a:a + n] = np.moveaxis(Xc[inner], -1, 1)
    return Xb


def _input_cotangent_shifted(Yb, W, padded, dilations, tile_bytes=1 << 21):
    """Cotangent of the padded input from Yb (L, M, *out), stride 1, one group. On the padded input
    flattened in space, kernel offset k reads a contiguous range at its own shift (see
    _conv1_rows); so per tile of images one GEMM gives every offset's contribution over the
    padded grid's rows, (K*C, M) @ (M, n), each added to its shifted range: contiguous adds
    where the windows' rows would be short strided ones."""
    M, C = W.shape[:2]
    kernel = W.shape[2:]
    K = math.prod(kernel)
    L, out = Yb.shape[0], Yb.shape[2:]
    shifts, n = _flat_shifts(padded, kernel, dilations, out)
    Wk = W.reshape(M, C, K).transpose(2, 1, 0).reshape(K * C, M).astype(Yb.dtype, copy=False)
    Xf = np.zeros((L, C, max(shifts) + n), Yb.dtype)
    step = _tile(K * C * n * Yb.itemsize, tile_bytes)
    grid = np.zeros((min(step, L), M, out[0]) + tuple(padded[1:]), Yb.dtype)  # zero beyond `out`
    inner = (slice(None),) * 3 + tuple(slice(0, o) for o in out[1:])
    for a in range(0, L, step):
        b = min(L, a + step)
        g = grid[: b - a]
        g[inner] = Yb[a:b]
        G = np.matmul(Wk, g.reshape(b - a, M, n)).reshape(b - a, K, C, n)
        dst = Xf[a:b]
        for k, sh in enumerate(shifts):
            dst[:, :, sh:sh + n] += G[:, k]
    return Xf[:, :, : math.prod(padded)].reshape((L, C) + tuple(padded))


def _cols_adjoint_input(Yb, W, group):
    """Cotangent of the windows from Yb (L, M, *out): (L, C, *out, *k)."""
    nd = W.ndim - 2
    L, M = Yb.shape[:2]
    out = Yb.shape[2:]
    g = group
    Cg = W.shape[1]
    Ym = np.moveaxis(Yb.reshape(L, g, M // g, -1), 2, 3)  # (L, g, O, Mg)
    Wg = W.reshape(g, M // g, -1)  # (g, Mg, Cg*k)
    G = Ym @ Wg  # (L, g, O, Cg*k)
    G = G.reshape(L, g, *out, Cg, *W.shape[2:])
    G = np.moveaxis(G, 2 + nd, 2)  # (L, g, Cg, *out, *k)
    return G.reshape(L, g * Cg, *out, *W.shape[2:])


def _weight_cotangent1(Ybar, cols, W, lead, keep):
    """Per-sample (keep) or summed kernel cotangent, one group: Ybar (*lead, N, M, *out) against
    the windows (N, C*K, O)."""
    N, M = cols.shape[0], W.shape[0]
    head = Ybar.shape[:lead]
    Yf = Ybar.reshape(head + (N, M, cols.shape[2]))
    if keep:  # one GEMM per sample over every direction: (T*M, O) @ (O, C*K)
        T = math.prod(head)
        Yn = np.moveaxis(Yf.reshape(T, N, M, cols.shape[2]), 1, 0).reshape(N, T * M, cols.shape[2])
        Wb = Yn @ np.swapaxes(cols, -1, -2)  # (N, T*M, C*K)
        return np.moveaxis(Wb.reshape((N, T) + W.shape), 0, 1).reshape(head + (N,) + W.shape)
    Wb = np.einsum("lnmo,nko->lmk", Yf.reshape((-1, N, M, cols.shape[2])), cols, optimize=True)
    return Wb.reshape(head + W.shape)


def _weight_cotangent(Ybar, cols, W, group, lead, keep):
    """Per-sample (keep) or summed kernel cotangent from Ybar (*lead, N, M, *out) and windows of X:
    per sample and group, every direction's rows in one GEMM, (T * Mg, O) @ (O, Cg * k)."""
    nd = W.ndim - 2
    N, C = cols.shape[:2]
    out = cols.shape[2 : 2 + nd]
    O = math.prod(out)
    M = W.shape[0]
    g = group
    head = Ybar.shape[:lead]
    T = math.prod(head)
    P = cols.reshape(N, g, C // g, *out, *W.shape[2:])
    P = np.moveaxis(P, 2, 2 + nd).reshape(N, g, O, -1)  # (N, g, O, Cg*k)
    Yg = Ybar.reshape(T, N, g, M // g, O)
    if keep:
        Wb = (np.moveaxis(Yg, 0, 2).reshape(N, g, T * (M // g), O) @ P).reshape(N, g, T, M // g, -1)
        return np.moveaxis(Wb, 2, 0).reshape(head + (N,) + W.shape)
    Wb = np.einsum("tngmo,ngok->tgmk", Yg, P, optimize=True)
    return Wb.reshape(head + W.shape)


# ---- ConvTranspose: the adjoint of Conv in X, with its own geometry -----------------------------


def _tconv_geometry(x_shape, W, strides, dilations, pads, output_padding, output_shape, auto_pad):
    """strides, dilations, output_padding, pad begins and ends, and the full canvas size."""
    nd = W.ndim - 2
    kernel = W.shape[2:]
    strides = list(strides) if strides else [1] * nd
    dilations = list(dilations) if dilations else [1] * nd
    output_padding = list(output_padding) if output_padding else [0] * nd
    sp = x_shape[-nd:]
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    full = [s * (n - 1) + op + e for s, n, op, e in zip(strides, sp, output_padding, ext)]
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape)[-nd:] if output_shape else [n * s for n, s in zip(sp, strides)]
        total = [f - t for f, t in zip(full, target)]
        # a target beyond the canvas, as onnxruntime takes it: an output_shape gets zeros after the
        # canvas; SAME padding with strides wider than the kernel keeps the canvas
        short = [min(t, 0) if output_shape else 0 for t in total]
        total = [max(t, 0) for t in total]
        if auto_pad == "SAME_UPPER":
            begin, end = [t // 2 for t in total], [t - t // 2 + e for t, e in zip(total, short)]
        else:
            begin, end = [t - t // 2 for t in total], [t // 2 + e for t, e in zip(total, short)]
    elif auto_pad == "VALID" or not pads:
        begin, end = [0] * nd, [0] * nd
    else:
        begin, end = list(pads[:nd]), list(pads[nd:])
    return strides, dilations, begin, end, full


def _tconv(X, W, group, s, d, begin, end, full):
    """(B, C_in, *sp) with kernel (C_in, C_out/g, *k) -> (B, C_out, *out)."""
    nd = W.ndim - 2
    B, Ci = X.shape[:2]
    g = group
    k = W.shape[2:]
    Cog = W.shape[1]
    Xg = X.reshape(B, g, Ci // g, -1)  # (B, g, Cig, S)
    Wg = W.reshape(g, Ci // g, -1)  # (g, Cig, Cog*k)
    G = np.swapaxes(Xg, -1, -2) @ Wg  # (B, g, S, Cog*k)
    G = G.reshape(B, g, *X.shape[2:], Cog, *k)
    G = np.moveaxis(G, 2 + nd, 2).reshape(B, g * Cog, *X.shape[2:], *k)  # (B, C_out, *sp, *k)
    return crop_or_pad(windows_adjoint(G, full, k, s, d), begin, end)


def _tconv_windows(Yb, full, begin, end, kernel, s, d, sp):
    """Windows of the cotangent placed back on the canvas: (B, C_out, *sp, *k)."""
    nd = len(kernel)
    canvas = crop_or_pad(Yb, [-b for b in begin], [-e for e in end])
    V = windows(canvas, kernel, s, d)
    return V[(Ellipsis,) + tuple(slice(0, n) for n in sp) + (slice(None),) * nd]


@rule("ConvTranspose", since=1)
class ConvTranspose:
    """Y = the transpose of a convolution of X with W (C_in, C_out/group, *kernel), plus B."""

    keeps = True

    def forward(X, W, B=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, output_padding=None,
                output_shape=None, pads=None, strides=None):
        s, d, begin, end, full = _tconv_geometry(X.shape, W, strides, dilations, pads, output_padding, output_shape, auto_pad)
        Y = _tconv(X, W, group, s, d, begin, end, full)
        if B is not None:
            Y = Y + B.reshape((-1,) + (1,) * (W.ndim - 2))
        return Y

    def jvp(cx, Xdot, Wdot, Bdot=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
            output_padding=None, output_shape=None, pads=None, strides=None):
        X, W = cx.x[0], cx.x[1]
        s, d, begin, end, full = _tconv_geometry(X.shape, W, strides, dilations, pads, output_padding, output_shape, auto_pad)
        terms = []
        if Xdot is not None:
            flat, head = lead_flat(Xdot, X.ndim - 1)
            Y = _tconv(flat, W, group, s, d, begin, end, full)
            terms.append(Y.reshape(head + Y.shape[1:]))
        if Wdot is not None:
            flat, head = lead_flat(Wdot, W.ndim)
            raise UnsupportedOpError("ConvTranspose: a kernel that depends on the input is not supported")
        if Bdot is not None:
            terms.append(_bias_tangent(Bdot, cx.y[0]))
        return add(*terms)

    def vjp(cx, Ybar, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, output_padding=None,
            output_shape=None, pads=None, strides=None):
        X, W = cx.x[0], cx.x[1]
        nd = W.ndim - 2
        s, d, begin, end, full = _tconv_geometry(X.shape, W, strides, dilations, pads, output_padding, output_shape, auto_pad)
        lead = cx.lead(Ybar)
        flat, head = lead_flat(Ybar, X.ndim - 1)  # (L, C_out, *out)
        V = _tconv_windows(flat, full, begin, end, W.shape[2:], s, d, X.shape[2:])  # (L, C_out, *sp, *k)
        g = group
        Ci, Cog = W.shape[0], W.shape[1]
        L = flat.shape[0]
        S = math.prod(X.shape[2:])
        Vg = np.moveaxis(V.reshape(L, g, Cog, *X.shape[2:], *W.shape[2:]), 2, 2 + nd).reshape(L, g, S, -1)  # (L, g, S, Cog*k)
        Xbar = Wbar = Bbar = None
        if cx.need[0]:
            Wg = W.reshape(g, Ci // g, -1)  # (g, Cig, Cog*k)
            Xb = Vg @ np.swapaxes(Wg, -1, -2)  # (L, g, S, Cig)
            Xbar = np.swapaxes(Xb, -1, -2).reshape(head + X.shape[1:])
        if cx.need[1]:
            N = X.shape[0]
            Xg = X.reshape(N, g, Ci // g, S)
            Vn = Vg.reshape(Ybar.shape[:lead] + (N, g, S, -1))
            if cx.keep[1]:
                Wb = Xg @ Vn  # (*lead, N, g, Cig, Cog*k)
                Wbar = Wb.reshape(Ybar.shape[:lead] + (N,) + W.shape)
            else:
                Wb = np.einsum("ngcs,lngsk->lgck", Xg, Vn.reshape((-1, N, g, S, Vn.shape[-1])), optimize=True)
                Wbar = Wb.reshape(Ybar.shape[:lead] + W.shape)
        if len(cx.x) > 2 and cx.x[2] is not None and cx.need[2]:
            Bbar = sum_trailing(Ybar, range(Ybar.ndim - nd, Ybar.ndim), keepdims=False)
            if not cx.keep[2]:
                Bbar = Bbar.sum(axis=lead)
        return Xbar, Wbar, Bbar


# ---- Col2Im: torch's Fold, the adjoint of im2col ------------------------------------------------


@rule("Col2Im", since=18)
class Col2Im:
    """Y (N, C, *image_shape) = the columns X (N, C * prod(block_shape), L) of sliding blocks added
    back into the image (torch's Fold); L runs over the blocks, C over the channels, then the
    offsets inside a block. Linear in X: its adjoint cuts the blocks out again (torch's Unfold)."""

    nondiff = (1, 2)

    def forward(input, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
        return _fold(input, *Col2Im.geometry(input, image_shape, block_shape, dilations, pads, strides))

    def geometry(X, image_shape, block_shape, dilations, pads, strides):
        """kernel, strides, dilations, pad begins and ends, the padded image and the blocks per axis."""
        image, kernel = [int(v) for v in image_shape], tuple(int(v) for v in block_shape)
        strides, dilations, begin, end, _ = conv_geometry(image, kernel, strides, dilations, pads, "NOTSET")
        padded = [n + b + e for n, b, e in zip(image, begin, end)]
        blocks = _out_size(padded, kernel, strides, dilations)
        K, L = math.prod(kernel), math.prod(blocks)
        if X.shape[-1] != L or X.shape[-2] % K:
            raise ValueError(f"columns of shape {X.shape[-2:]} do not fit {L} blocks of {K} offsets over the image {image}")
        return kernel, strides, dilations, begin, end, padded, blocks

    def jvp(cx, Xdot, *_, dilations=None, pads=None, strides=None):
        return _fold(Xdot, *Col2Im.geometry(cx.x[0], cx.x[1], cx.x[2], dilations, pads, strides))

    def vjp(cx, Ybar, *, dilations=None, pads=None, strides=None):
        kernel, strides, dilations, begin, end, _, blocks = Col2Im.geometry(cx.x[0], cx.x[1], cx.x[2], dilations, pads, strides)
        nd = len(kernel)
        V = windows(pad_spatial(Ybar, begin, end), kernel, strides, dilations)  # (..., C, *blocks, *kernel)
        V = np.moveaxis(V, range(-nd, 0), range(-2 * nd, -nd))  # (..., C, *kernel, *blocks)
        return (V.reshape(Ybar.shape[: Ybar.ndim - nd - 1] + cx.x[0].shape[-2:]), None, None)


def _fold(X, kernel, strides, dilations, begin, end, padded, blocks):
    """Col2Im of X (..., C * K, L) with leading axes: (..., C, *image)."""
    nd = len(kernel)
    G = X.reshape(X.shape[:-2] + (-1,) + kernel + tuple(blocks))  # (..., C, *kernel, *blocks)
    G = np.moveaxis(G, range(-2 * nd, -nd), range(-nd, 0))  # (..., C, *blocks, *kernel)
    return unpad(windows_adjoint(G, padded, kernel, strides, dilations), begin, end)
