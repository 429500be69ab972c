"""Resize and Upsample as separable interpolation: one (out x in) matrix per resized axis.

Linear in X, so the JVP applies the same matrices to the tangent and the VJP their transposes.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from . import rule
from ..errors import UnsupportedOpError
from ._util import check_alloc, need_no_keep


def _source_coords(n_in, n_out, scale, mode, crop=None):
    """Input coordinate of every output index, as the spec's coordinate_transformation_mode;
    `crop` is tf_crop_and_resize's (start, end) of the axis, as fractions of its length - 1."""
    x = np.arange(n_out, dtype=np.float64)
    if mode == "tf_crop_and_resize":  # in float32, as onnxruntime: a nearest pixel can turn on the last bit
        start, end = np.float32(crop[0]), np.float32(crop[1])
        if n_out == 1:
            return np.full(1, np.float32(0.5 * (float(start) + float(end)) * (n_in - 1)), np.float64)
        n, m = np.float32(n_in - 1), np.float32(n_out - 1)
        return (start * n + x.astype(np.float32) * (end - start) * n / m).astype(np.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (n_in * scale)
        return n_in / 2 * (1 - adjustment) + (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if n_out > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    raise UnsupportedOpError(f"Resize coordinate_transformation_mode {mode!r} is not supported")


def _nearest_index(c, nearest_mode):
    if nearest_mode == "round_prefer_floor":
        return np.where(c - np.floor(c) == 0.5, np.floor(c), np.round(c))
    if nearest_mode == "round_prefer_ceil":
        return np.where(c - np.floor(c) == 0.5, np.ceil(c), np.round(c))
    if nearest_mode == "floor":
        return np.floor(c)
    if nearest_mode == "ceil":
        return np.ceil(c)
    raise UnsupportedOpError(f"Resize nearest_mode {nearest_mode!r} is not supported")


def _keys(d, a):
    """Keys' cubic convolution kernel at distances d >= 0."""
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0))


def _cubic_weights(t, a):
    """Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(c)."""
    return _keys(np.stack([1 + t, t, 1 - t, 2 - t], axis=-1), a)


def _antialias_taps(c, scale, mode, a):
    """Taps (n_out, n) and their weights for an antialiased linear or cubic filter, stretched by
    1 / scale when downsampling and normalised to sum 1, as onnx's reference computes them: the
    taps are the n input indexes nearest to c, the left one preferred."""
    s = min(scale, 1.0)
    start = int(np.floor(-1 / s) + 1) if mode == "linear" else int(np.floor(-2 / s) + 1)
    n = 2 - 2 * start
    left = np.ceil(c).astype(int) - 1  # the tap left of c, or c's own index when c is whole
    ratio = c - left  # in (0, 1]
    offsets = np.arange(n) + start
    d = np.abs((offsets[None, :] - ratio[:, None]) * s)
    W = np.clip(1 - d, 0, 1) if mode == "linear" else _keys(d, a)
    return left[:, None] + offsets[None, :], W / W.sum(axis=1, keepdims=True)


def interpolation_matrix(n_in, n_out, scale, mode, ctm, nearest_mode, cubic_coeff_a, exclude_outside, antialias=0,
                         crop=None):
    """(n_out, n_in) matrix M with y = M @ x along one axis. With tf_crop_and_resize the rows
    whose coordinate falls outside the input are zero: those outputs take the extrapolation value."""
    M = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    c = _source_coords(n_in, n_out, scale, ctm, crop)
    outside = (c < 0) | (c > n_in - 1) if crop is not None else None
    if antialias and mode in ("linear", "cubic"):
        idx, W = _antialias_taps(c, scale, mode, cubic_coeff_a)
        if exclude_outside:
            W = W * ((idx >= 0) & (idx < n_in))
            W = W / W.sum(axis=1, keepdims=True)
        np.add.at(M, (np.repeat(rows, idx.shape[1]), np.clip(idx, 0, n_in - 1).ravel()), W.ravel())
    elif mode == "nearest":
        M[rows, np.clip(_nearest_index(c, nearest_mode), 0, n_in - 1).astype(int)] = 1
    elif mode == "linear":
        c = np.clip(c, 0, n_in - 1)
        x0 = np.floor(c).astype(int)
        x1 = np.minimum(x0 + 1, n_in - 1)
        w = c - x0
        np.add.at(M, (rows, x0), 1 - w)
        np.add.at(M, (rows, x1), w)
    elif mode == "cubic":
        x0 = np.floor(c).astype(int)
        W = _cubic_weights(c - x0, cubic_coeff_a)
        for k, off in enumerate((-1, 0, 1, 2)):
            idx = x0 + off
            inside = (idx >= 0) & (idx < n_in)
            w = W[:, k] * (inside if exclude_outside else 1)
            np.add.at(M, (rows, np.clip(idx, 0, n_in - 1)), w)
        if exclude_outside:
            M /= M.sum(axis=1, keepdims=True)
    else:
        raise UnsupportedOpError(f"Resize mode {mode!r} is not supported")
    if crop is not None:
        M[outside] = 0
    return M


def _apply(X, mats, ndim):
    """Apply per-axis matrices {axis: M} along the primal axes (counted from the end)."""
    for ax, M in mats.items():
        a = X.ndim - ndim + ax
        X = np.moveaxis(np.tensordot(X, M.astype(X.dtype), axes=([a], [1])), -1, a)
    return X


class _ResizeBase:
    """Shared derivative: the interpolation is linear in X."""

    nondiff = (1, 2, 3)
    # the output has a sample axis only if X has: sizes read from the data's shape interpolate a
    # parameter to the images' grid (a ViT's position embeddings: DINOv2, YOLOS) for all samples alike
    batch_from_data = True

    def jvp(cx, Xdot, *_, **attrs):
        return _apply(Xdot, cx.rule.matrices(cx.x, attrs), cx.x[0].ndim)

    def vjp(cx, Ybar, **attrs):
        mats = {a: M.T for a, M in cx.rule.matrices(cx.x, attrs).items()}
        return (_apply(Ybar, mats, cx.x[0].ndim),) + (None,) * (len(cx.x) - 1)


def _plan(shape, scales, sizes, axes=None, policy="stretch"):
    """Output size and scale per axis from either scales or sizes (with keep_aspect_ratio_policy
    not_larger or not_smaller, one scale for all the axes, the smallest or the largest)."""
    nd = len(shape)
    axes = list(range(nd)) if axes is None or np.size(axes) == 0 else [int(a) % nd for a in np.ravel(axes)]
    out, sc = list(shape), [1.0] * nd
    if sizes is not None and np.size(sizes) and policy in ("not_larger", "not_smaller"):
        ratios = [int(n) / shape[a] for a, n in zip(axes, np.ravel(sizes))]
        r = min(ratios) if policy == "not_larger" else max(ratios)
        for a in axes:
            out[a], sc[a] = int(np.floor(r * shape[a] + 0.5)), r
    elif sizes is not None and np.size(sizes):
        for a, n in zip(axes, np.ravel(sizes)):
            out[a], sc[a] = int(n), int(n) / shape[a]
    elif scales is not None and np.size(scales):
        for a, s in zip(axes, np.ravel(scales)):  # sizes in float32, as onnxruntime takes them:
            # 3 x float32(5/3) is 5 there, and 4.9999999 in float64
            out[a], sc[a] = int(np.float32(s) * np.float32(shape[a])), float(s)
    return out, sc


def _matrices(shape, out, sc, mode, ctm, nearest_mode, a, exclude, antialias=0, crops=None):
    crops = crops or [None] * len(shape)
    return {
        ax: interpolation_matrix(n, m, s, mode, ctm, nearest_mode, a, exclude, antialias, crop)
        for ax, (n, m, s, crop) in enumerate(zip(shape, out, sc, crops))
        if m != n or s != 1.0
    }


def _crops(shape, roi, axes, sc):
    """tf_crop_and_resize's (start, end) for every axis, from roi: the starts of the axes
    resized (all of them, or `axes`), then their ends. An axis not among them, or of scale 1, is
    kept whole (None), as onnxruntime keeps an axis of scale 1 whatever its roi (the spec would
    crop it)."""
    nd = len(shape)
    axes = list(range(nd)) if axes is None or np.size(axes) == 0 else [int(a) % nd for a in np.ravel(axes)]
    roi = np.ravel(np.asarray([] if roi is None else roi, np.float64))
    if roi.size != 2 * len(axes):
        raise UnsupportedOpError(f"Resize tf_crop_and_resize needs a roi of {2 * len(axes)} values (the starts of the "
                                 f"axes resized, then their ends), not {roi.size}")
    crops = [None] * nd
    for k, a in enumerate(axes):
        if sc[a] != 1.0:
            crops[a] = (float(roi[k]), float(roi[len(axes) + k]))
    return crops


def _outside(shape, out, crops):
    """Where tf_crop_and_resize's output falls outside the input on any axis (bool, broadcast to
    the output), which takes the extrapolation value."""
    mask = np.zeros((1,) * len(out), bool)
    for ax, (n, m, crop) in enumerate(zip(shape, out, crops)):
        if crop is None:
            continue
        c = _source_coords(n, m, 1.0, "tf_crop_and_resize", crop)
        mask = mask | ((c < 0) | (c > n - 1)).reshape((1,) * ax + (m,) + (1,) * (len(out) - ax - 1))
    return mask


@rule("Resize", since=10)
class Resize10(_ResizeBase):
    """Y = X resized by `scales` (nearest or linear, asymmetric coordinates as in opset 10)."""

    def forward(X, scales, *, mode="nearest"):
        return _apply(X, Resize10.matrices((X, scales), {"mode": mode}), X.ndim)

    def matrices(x, attrs):
        X, scales = x[0], x[1]
        out, sc = _plan(X.shape, scales, None)
        check_alloc(out, X.dtype, "Resize")
        return _matrices(X.shape, out, sc, attrs.get("mode", "nearest"), "asymmetric", "floor", -0.75, 0)


@rule("Resize", since=11)
class Resize11(_ResizeBase):
    """Y = X resized to `sizes` or by `scales` (nearest, linear or cubic), as the spec's modes."""

    def forward(X, roi=None, scales=None, sizes=None, *, antialias=0, axes=None, coordinate_transformation_mode="half_pixel",
                cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, keep_aspect_ratio_policy="stretch",
                mode="nearest", nearest_mode="round_prefer_floor"):
        attrs = dict(antialias=antialias, axes=axes, coordinate_transformation_mode=coordinate_transformation_mode,
                     cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside,
                     keep_aspect_ratio_policy=keep_aspect_ratio_policy, mode=mode, nearest_mode=nearest_mode)
        planned = Resize11.plan((X, roi, scales, sizes), attrs)
        Y = _apply(X, Resize11.matrices((X, roi, scales, sizes), attrs, planned), X.ndim)
        _, out, _, crops = planned
        if crops:  # outside the input: the extrapolation value
            Y = np.where(_outside(X.shape, out, crops), np.asarray(extrapolation_value, Y.dtype), Y)
        return Y

    def opaque(attrs):
        """tf_crop_and_resize reads the roi, the crop box, where its derivative is not written: a
        roi that depends on what is differentiated is refused (the other modes ignore it)."""
        if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
            return {1: "the derivative in tf_crop_and_resize's roi (the crop box) is not supported; it is in the image"}
        return {}

    def plan(x, attrs):
        """X, the output's size and scale per axis, and tf_crop_and_resize's crops (or None)."""
        X, roi, scales, sizes = list(x) + [None] * (4 - len(x))
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy not in ("stretch", "not_larger", "not_smaller"):
            raise UnsupportedOpError(f"Resize keep_aspect_ratio_policy {policy!r} is not supported")
        out, sc = _plan(X.shape, scales, sizes, attrs.get("axes"), policy)
        check_alloc(out, X.dtype, "Resize")
        crop = attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
        return X, out, sc, _crops(X.shape, roi, attrs.get("axes"), sc) if crop else None

    def matrices(x, attrs, planned=None):
        X, out, sc, crops = planned or Resize11.plan(x, attrs)
        return _matrices(X.shape, out, sc, attrs.get("mode", "nearest"),
                         attrs.get("coordinate_transformation_mode", "half_pixel"),
                         attrs.get("nearest_mode", "round_prefer_floor"), attrs.get("cubic_coeff_a", -0.75),
                         attrs.get("exclude_outside", 0), attrs.get("antialias", 0), crops)


@rule("Upsample", since=1)
class Upsample1(_ResizeBase):
    """Y = X (N, C, H, W) upsampled by height_scale and width_scale (opsets 1 to 6, experimental):
    nearest, or bilinear, with asymmetric coordinates."""

    def forward(X, *, height_scale, width_scale, mode="nearest"):
        return _apply(X, Upsample1.matrices((X,), {"height_scale": height_scale, "width_scale": width_scale, "mode": mode}),
                      X.ndim)

    def matrices(x, attrs):
        if x[0].ndim != 4:
            raise UnsupportedOpError(f"Upsample (opset 1) of a {x[0].ndim}-D input is not supported (N, C, H, W is)")
        scales = np.array([1.0, 1.0, attrs["height_scale"], attrs["width_scale"]])
        mode = "linear" if attrs.get("mode", "nearest") == "bilinear" else attrs.get("mode", "nearest")
        return Resize10.matrices((x[0], scales), {"mode": mode})


@rule("Upsample", since=7)
class Upsample7(_ResizeBase):
    """Y = X upsampled by the `scales` attribute (nearest or linear, asymmetric coordinates)."""

    def forward(X, *, scales, mode="nearest"):
        return _apply(X, Upsample7.matrices((X,), {"scales": scales, "mode": mode}), X.ndim)

    def matrices(x, attrs):
        return Resize10.matrices((x[0], np.asarray(attrs["scales"])), attrs)


@rule("Upsample", since=9)
class Upsample9(_ResizeBase):
    """Y = X upsampled by input `scales` (nearest or linear, asymmetric coordinates)."""

    def forward(X, scales, *, mode="nearest"):
        return _apply(X, Resize10.matrices((X, scales), {"mode": mode}), X.ndim)

    def matrices(x, attrs):
        return Resize10.matrices(x, attrs)


# ---- GridSample: X sampled at the points of a grid (nearest, linear or cubic; 2-D or 3-D) ------


def _keys_slope(d, a):
    """The derivative of Keys' kernel at distances d >= 0."""
    near = (3 * (a + 2) * d - 2 * (a + 3)) * d
    far = (3 * a * d - 10 * a) * d + 8 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0))


def _reflect(x, lo, hi):
    """x folded into [lo, hi] by reflections at its ends (onnxruntime's GsReflect), and the
    derivative of the fold (1 or -1)."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo), np.zeros_like(x)
    below, above = x < lo, x > hi
    d = np.where(below, lo - x, np.where(above, x - hi, 0))
    n = np.floor(d / span)
    r = d - n * span
    even = n % 2 == 0
    folded = np.where(below, np.where(even, lo + r, hi - r), np.where(above, np.where(even, hi - r, lo + r), x))
    sign = np.where(below | above, np.where(even, -1.0, 1.0), 1.0)
    return folded, sign


def _grid_axis(g, size, mode, padding, align):
    """One grid component g (N, *out) along a spatial axis of `size`: the taps of the
    interpolation as (index, weight, slope of the weight in the coordinate) and the coordinate's
    derivative in g. As onnxruntime: a coordinate beyond the borders ([-0.5, size - 0.5], or
    [0, size - 1] with align_corners) is reflected back (reflection); then each tap outside the
    image is zero (zeros), the edge pixel (border) or its reflection (reflection). With border
    the coordinate itself is not clamped (for cubic, clamping it would differ; onnx's reference
    does): far out, every tap is the edge pixel and the slopes cancel."""
    scale = (size - 1) / 2 if align else size / 2
    x = (g + 1) * scale if align else ((g + 1) * size - 1) / 2
    dx = np.full(x.shape, scale, x.dtype)
    lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
    if padding == "reflection":
        x, sign = _reflect(x, lo, hi)
        dx = dx * sign
    if mode == "nearest":
        taps = [(np.rint(x), np.ones_like(x), np.zeros_like(x))]
    elif mode == "linear":
        x0 = np.floor(x)
        t = x - x0
        taps = [(x0, 1 - t, -np.ones_like(t)), (x0 + 1, t, np.ones_like(t))]
    else:
        x0 = np.floor(x)
        t = x - x0
        A = _CUBIC_A
        taps = [(x0 - 1, _keys(1 + t, A), _keys_slope(1 + t, A)), (x0, _keys(t, A), _keys_slope(t, A)),
                (x0 + 1, _keys(1 - t, A), -_keys_slope(1 - t, A)), (x0 + 2, _keys(2 - t, A), -_keys_slope(2 - t, A))]
    out = []
    for i, w, dw in taps:
        valid = (i >= 0) & (i <= size - 1)
        if padding == "zeros":
            w, dw = np.where(valid, w, 0), np.where(valid, dw, 0)
            i = np.clip(i, 0, size - 1)
        elif padding == "border":
            i = np.clip(i, 0, size - 1)
        else:
            i = np.clip(np.trunc(_reflect(i, lo, hi)[0]), 0, size - 1)
        out.append((i.astype(np.int64), w, dw))
    return out, dx


_CUBIC_A = -0.75  # torch's and onnxruntime's bicubic kernel


def _grid_plan(X, grid, mode, padding, align):
    """Every tap of the interpolation: (flat index into the spatial axes (N, *out), weight,
    [the weight's derivative in each grid component]), and each component's coordinate
    derivative. Grid component k runs along spatial axis -1 - k (x along the width)."""
    sizes = X.shape[2:]
    nd = len(sizes)
    axes = [_grid_axis(grid[..., k], sizes[nd - 1 - k], mode, padding, align) for k in range(nd)]
    strides = [math.prod(sizes[nd - k:]) for k in range(nd)]  # component k's stride in the flat index
    taps = []
    for combo in itertools.product(*[taps_k for taps_k, _ in axes]):
        idx = sum(i * st for (i, _, _), st in zip(combo, strides))
        ws = [w for _, w, _ in combo]
        slopes = [math.prod(ws[:k]) * dw * math.prod(ws[k + 1:]) for k, (_, _, dw) in enumerate(combo)]
        taps.append((idx, math.prod(ws), slopes))
    return taps, [d for _, d in axes]


def _gather_pixels(Xf, idx):
    """Xf (*lead, N, C, pixels) at idx (N, *out): (*lead, N, C, *out)."""
    N, out = idx.shape[0], idx.shape[1:]
    flat = np.broadcast_to(idx.reshape(N, 1, -1), Xf.shape[:-1] + (idx[0].size,))
    return np.take_along_axis(Xf, flat, axis=-1).reshape(Xf.shape[:-1] + out)


def _interpolate(Xf, taps):
    return sum(_gather_pixels(Xf, idx) * w[:, None] for idx, w, _ in taps)


def _grid_slopes(X, taps):
    """dY/d(coordinate k) (N, C, *out) for each grid component k: the taps' pixels weighted by
    their weights' slopes."""
    Xf = X.reshape(X.shape[:2] + (-1,))
    pixels = [_gather_pixels(Xf, idx) for idx, _, _ in taps]
    return [sum(p * slopes[k][:, None] for p, (_, _, slopes) in zip(pixels, taps)) for k in range(X.ndim - 2)]


def _grid_attrs(mode, padding_mode, align_corners, X):
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    if mode not in ("linear", "nearest", "cubic"):
        raise UnsupportedOpError(f"GridSample with mode '{mode}' is not supported (linear, nearest and cubic are)")
    if X.ndim not in (4, 5) or (mode == "cubic" and X.ndim != 4):
        raise UnsupportedOpError(f"GridSample {mode} on a {X.ndim - 2}-D input is not supported (2-D and 3-D are; cubic 2-D)")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise UnsupportedOpError(f"GridSample with padding_mode '{padding_mode}' is not supported")
    return mode, padding_mode, bool(align_corners)


@rule("GridSample", since=16)
class GridSample:
    """Y[n, c, *p] = X[n, c] sampled at grid[n, *p] = (x, y[, z]) in [-1, 1] (x along the width),
    at the nearest pixel, (bi/tri)linearly or bicubically; outside, zeros, the border or the
    reflection. Linear in X; piecewise smooth in the grid (the nearest pixel's derivative in the
    grid is zero)."""

    def forward(X, grid, *, align_corners=0, mode="linear", padding_mode="zeros"):
        taps, _ = _grid_plan(X, grid, *_grid_attrs(mode, padding_mode, align_corners, X))
        return _interpolate(X.reshape(X.shape[:2] + (-1,)), taps).astype(X.dtype)

    def jvp(cx, Xdot, Gdot, *, align_corners=0, mode="linear", padding_mode="zeros"):
        X, grid = cx.x
        taps, d = _grid_plan(X, grid, *_grid_attrs(mode, padding_mode, align_corners, X))
        out = None
        if Xdot is not None:
            out = _interpolate(Xdot.reshape(Xdot.shape[:Xdot.ndim - X.ndim + 2] + (-1,)), taps)
        if Gdot is not None:
            for k, v in enumerate(_grid_slopes(X, taps)):
                g = v * np.expand_dims(Gdot[..., k] * d[k], 1 - grid.ndim)  # C
                out = g if out is None else out + g
        return out

    def vjp(cx, Ybar, *, align_corners=0, mode="linear", padding_mode="zeros"):
        need_no_keep(cx, "GridSample")
        X, grid = cx.x
        taps, d = _grid_plan(X, grid, *_grid_attrs(mode, padding_mode, align_corners, X))
        lead = Ybar.shape[: cx.lead(Ybar)]
        N, C = X.shape[:2]
        pixels = math.prod(X.shape[2:])
        Xbar = Gbar = None
        if cx.need[0]:  # the adjoint of a gather: each weighted cotangent added at its pixel
            rows = math.prod(lead) * N * C
            row = np.arange(rows).reshape(lead + (N, C) + (1,) * (grid.ndim - 2)) * pixels  # where each plane starts
            flat_bar = np.zeros(rows * pixels)
            for idx, w, _ in taps:
                flat_bar += np.bincount((row + idx[:, None]).ravel(), (Ybar * w[:, None]).ravel(), minlength=flat_bar.size)
            Xbar = flat_bar.astype(Ybar.dtype).reshape(lead + X.shape)
        if cx.need[1]:
            Gbar = np.stack([(Ybar * v).sum(axis=1 - grid.ndim) * d[k] for k, v in enumerate(_grid_slopes(X, taps))], axis=-1)
        return Xbar, Gbar


# ---- AffineGrid: the sampling grid of an affine map, GridSample's usual companion -------------


def _affine_base(size, align, dtype):
    """The homogeneous coordinates (x, y[, z], 1) of every output point, x along the last axis:
    (prod(size), len(size) + 1), each coordinate in [-1, 1] at pixel corners (align_corners) or
    centres. An axis of one pixel with align_corners has no corners to align: onnxruntime puts
    it at 1 (onnx's reference at -1, torch at 0); onnxruntime is the oracle."""
    def axis(s):
        if align:
            return np.linspace(-1.0, 1.0, s) if s > 1 else np.ones(s)
        return (2 * np.arange(s) + 1) / s - 1
    mesh = np.meshgrid(*[axis(s) for s in size], indexing="ij")  # (D,) H, W order
    cols = [m.ravel() for m in reversed(mesh)] + [np.ones(math.prod(size))]
    return np.stack(cols, axis=-1).astype(dtype)


@rule("AffineGrid", since=20)
class AffineGrid:
    """grid[n, ..., :] = theta[n] @ (x, y[, z], 1) at each point of the output size (N, C, H, W)
    or (N, C, D, H, W): (N, H, W, 2) or (N, D, H, W, 3). Linear in theta; the size is data."""

    nondiff = (1,)

    def forward(theta, size, *, align_corners=0):
        spatial = tuple(int(s) for s in np.ravel(size)[2:])
        base = _affine_base(spatial, align_corners, theta.dtype)
        return (base @ np.swapaxes(theta, -1, -2)).reshape(theta.shape[:-2] + spatial + (len(spatial),))

    def jvp(cx, Tdot, _=None, *, align_corners=0):
        base = _affine_base(cx.y[0].shape[1:-1], align_corners, Tdot.dtype)
        return (base @ np.swapaxes(Tdot, -1, -2)).reshape(Tdot.shape[:-2] + cx.y[0].shape[1:])

    def vjp(cx, Ybar, *, align_corners=0):
        need_no_keep(cx, "AffineGrid")
        Y = cx.y[0]
        spatial = Y.shape[1:-1]
        base = _affine_base(spatial, align_corners, Ybar.dtype)
        G = Ybar.reshape(Ybar.shape[: Ybar.ndim - Y.ndim + 1] + (-1, Y.shape[-1]))  # (*lead, N, points, nd)
        return np.swapaxes(G, -1, -2) @ base, None
