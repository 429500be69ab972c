"""Object detection's operators: NonMaxSuppression (which boxes to keep: indices, not
differentiated), RoiAlign (features pooled over boxes: bilinear, differentiable in the
features and in the boxes' coordinates) and MaxRoiPool (Fast R-CNN's: the largest feature of
each bin of a box rounded to pixels; differentiable in the features)."""

from __future__ import annotations

import numpy as np

from . import rule
from ..errors import ModelError, UnsupportedOpError
from ._util import need_no_keep


# ---- NonMaxSuppression ----------------------------------------------------------------------


def _corners(boxes, center_point_box):
    """(y1, x1, y2, x2) with y1 <= y2 and x1 <= x2, from [y1, x1, y2, x2] in either diagonal
    order, or from [x_center, y_center, width, height]."""
    if center_point_box:
        xc, yc, w, h = np.moveaxis(boxes, -1, 0)
        return yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2
    a, b, c, d = np.moveaxis(boxes, -1, 0)
    return np.minimum(a, c), np.minimum(b, d), np.maximum(a, c), np.maximum(b, d)


def _suppresses(kept, box, corners, areas, iou_threshold):
    """Whether box `box` overlaps a kept box by an IoU above the threshold (none with an empty
    intersection or union, as onnxruntime)."""
    y1, x1, y2, x2 = corners
    k = np.asarray(kept)
    h = np.minimum(y2[k], y2[box]) - np.maximum(y1[k], y1[box])
    w = np.minimum(x2[k], x2[box]) - np.maximum(x1[k], x1[box])
    inter = np.where((h > 0) & (w > 0), h * w, 0)
    union = areas[k] + areas[box] - inter
    ok = (inter > 0) & (areas[k] > 0) & (areas[box] > 0) & (union > 0)
    return bool(np.any(ok & (inter / np.where(ok, union, 1) > iou_threshold)))


@rule("NonMaxSuppression", since=10)
class NonMaxSuppression:
    """Indices (batch, class, box) of the boxes kept, per batch and class in order of falling
    score: a box is dropped when its IoU with one already kept exceeds the threshold, or when its
    score is not above score_threshold; at most max_output_boxes_per_class (absent or 0: none).
    Integers: piecewise constant, not differentiated."""

    nondiff = (0, 1, 2, 3, 4)

    def forward(boxes, scores, max_output_boxes_per_class=None, iou_threshold=None, score_threshold=None, *,
                center_point_box=0):
        limit = 0 if max_output_boxes_per_class is None or not np.size(max_output_boxes_per_class) else int(
            np.ravel(max_output_boxes_per_class)[0])
        iou = 0.0 if iou_threshold is None or not np.size(iou_threshold) else float(np.ravel(iou_threshold)[0])
        floor = None if score_threshold is None or not np.size(score_threshold) else np.ravel(score_threshold)[0]
        out = []
        for b in range(scores.shape[0]):
            corners = _corners(boxes[b], center_point_box)
            areas = (corners[2] - corners[0]) * (corners[3] - corners[1])
            for c in range(scores.shape[1]):
                s = scores[b, c]
                order = np.argsort(-s, kind="stable")  # falling score, the lower index first among equals
                if floor is not None:
                    order = order[s[order] > floor]
                kept = []
                for box in order:
                    if len(kept) >= limit:
                        break
                    if not kept or not _suppresses(kept, box, corners, areas, iou):
                        kept.append(box)
                out.extend((b, c, k) for k in kept)
        return np.array(out, dtype=np.int64).reshape(-1, 3)


# ---- RoiAlign ---------------------------------------------------------------------------------


def _roi_axis(start, end, n_out, n_in, sampling_ratio, at_least_one):
    """The sampling points of one axis for every box, as onnxruntime places them: n_out bins
    over [start, end], each sampled at `grid` evenly spaced points (sampling_ratio, or
    ceil(bin size)); a point is clamped into [0, n_in - 1] and read between its two
    neighbouring pixels. Arrays of shape (R, n_out, G), G the largest grid."""
    dtype = start.dtype
    size = end - start
    clamped = size < 1 if at_least_one else np.zeros(size.shape, bool)
    size = np.where(clamped, dtype.type(1), size)
    bin_ = size / dtype.type(n_out)
    grid = np.full(size.shape, sampling_ratio, np.int64) if sampling_ratio > 0 else np.ceil(bin_).astype(np.int64)
    G = int(grid.max(initial=0))
    p = np.arange(n_out, dtype=dtype)[None, :, None]
    i = np.arange(G, dtype=dtype)[None, None, :]
    b, g = bin_[:, None, None], grid.astype(dtype)[:, None, None]
    c = start[:, None, None] + p * b + (i + dtype.type(0.5)) * b / g
    frac = (p + (i + 0.5) / np.maximum(g, 1)) / n_out  # where c lies between start and end
    d_start = np.where(clamped[:, None, None], 1, 1 - frac)
    d_end = np.where(clamped[:, None, None], 0, frac)
    inside = (c >= -1) & (c <= n_in)
    present = np.arange(G)[None, None, :] < grid[:, None, None]
    cc = np.where(c <= 0, dtype.type(0), c)
    low = cc.astype(np.int64)
    top = low >= n_in - 1
    low = np.where(top, n_in - 1, low)
    high = np.where(top, low, low + 1)
    lo_frac = np.where(top, dtype.type(0), cc - low.astype(dtype))  # the weight of `high`
    slope = ((c > 0) & ~top).astype(dtype)  # d lo_frac / d c
    return dict(low=low, high=high, l=lo_frac, slope=slope, d_start=d_start, d_end=d_end, inside=inside,
                present=present, grid=grid)


def _roi_plan(X, rois, batch_indices, *, half_pixel, mode, output_height, output_width, sampling_ratio, spatial_scale):
    """Y[r, c, p] = sum over taps of w * X.flat[base[r, c] + pix]: the taps as (pix, w, dw), dw the
    derivatives of w in the box's (x1, y1, x2, y2) (leading axis of 4), each broadcast to (R, C, P),
    P = output_height * output_width; and base (R, C, 1). In max mode, one tap: the product
    w * pixel that wins, per output element."""
    N, C, H, W = X.shape
    dtype = X.dtype
    R = rois.shape[0]
    scale, offset = dtype.type(spatial_scale), dtype.type(0.5 if half_pixel else 0.0)
    r = rois.astype(dtype)
    x1, y1, x2, y2 = (r[:, k] * scale - offset for k in range(4))
    ay = _roi_axis(y1, y2, output_height, H, sampling_ratio, not half_pixel)
    ax = _roi_axis(x1, x2, output_width, W, sampling_ratio, not half_pixel)
    Gh, Gw = ay["low"].shape[-1], ax["low"].shape[-1]
    P, S = output_height * output_width, Gh * Gw

    def grid2(a, b):  # (R, oh, Gh) and (R, ow, Gw) -> (R, P, S)
        return (a[:, :, None, :, None] * b[:, None, :, None, :]).reshape(R, P, S)

    Y = {k: v[:, :, None, :, None] for k, v in ay.items() if k != "grid"}
    Xa = {k: v[:, None, :, None, :] for k, v in ax.items() if k != "grid"}
    valid = ((Y["inside"] & Xa["inside"]) & (Y["present"] & Xa["present"]))
    count = np.maximum(ay["grid"] * ax["grid"], 1).astype(dtype)[:, None, None]
    taps = []
    for ty, wy, dy in (("low", 1 - Y["l"], -Y["slope"]), ("high", Y["l"], Y["slope"])):
        for tx, wx, dx in (("low", 1 - Xa["l"], -Xa["slope"]), ("high", Xa["l"], Xa["slope"])):
            pix = np.where(valid, Y[ty] * W + Xa[tx], 0).reshape(R, P, S)
            w = np.where(valid, wy * wx, 0).reshape(R, P, S)
            dwy, dwx = np.where(valid, dy * wx, 0), np.where(valid, wy * dx, 0)
            dw = np.stack([(dwx * Xa["d_start"]).reshape(R, P, S), (dwy * Y["d_start"]).reshape(R, P, S),
                           (dwx * Xa["d_end"]).reshape(R, P, S), (dwy * Y["d_end"]).reshape(R, P, S)]) * spatial_scale
            taps.append((pix, w, dw))
    base = ((batch_indices.astype(np.int64)[:, None] * C + np.arange(C)) * (H * W))[:, :, None]  # (R, C, 1)
    pix = np.concatenate([t[0] for t in taps], -1)[:, None]  # (R, 1, P, K)
    w = np.concatenate([t[1] for t in taps], -1)[:, None]
    dw = np.concatenate([t[2] for t in taps], -1)[:, :, None]  # (4, R, 1, P, K)
    if mode == "avg":
        return [(pix[..., k], w[..., k] / count, dw[..., k] / count) for k in range(pix.shape[-1])], base
    # max: of every sampling point present, the largest of its four products w * pixel (points
    # outside the image give 0); the first among equals, as onnxruntime
    present = np.broadcast_to(Y["present"] & Xa["present"], valid.shape).reshape(R, 1, P, S)
    present = np.concatenate([present] * 4, -1)
    Xf = X.reshape(-1)
    best = np.zeros((R, C, P), dtype)
    at = np.zeros((R, C, P), np.int64)
    seen = np.zeros((R, C, P), bool)
    order = np.arange(pix.shape[-1]).reshape(4, S).T.ravel()  # point by point, its four taps in turn
    for k in order:
        val = w[..., k] * Xf[base + pix[..., k]]
        win = present[..., k] & (~seen | (val > best))
        best, at, seen = np.where(win, val, best), np.where(win, k, at), seen | win
    pick = at[..., None]
    def one(a):  # (R, 1, P, K) at the winning tap: (R, C, P)
        return np.take_along_axis(np.broadcast_to(a, (R, C, P, a.shape[-1])), pick, -1)[..., 0]

    pix_m, w_m = one(pix), np.where(seen, one(w), 0)
    dw_m = np.where(seen, np.stack([one(d) for d in dw]), 0)
    return [(pix_m, w_m, dw_m)], base


def _roi_gather(Xl, taps, base, coef):
    """sum over taps of coef(tap) * Xl[..., base + pix]: Xl (L, N*C*H*W) -> (L, R, C, P) (or, for a
    coef with a leading axis of 4, (4, L, R, C, P))."""
    out = None
    for tap in taps:
        v = np.take(Xl, base + tap[0], axis=-1)
        term = coef(tap)[:, None] * v if coef(tap).ndim == 4 else coef(tap) * v
        out = term if out is None else out + term
    return out


def _roi_attrs(node_attrs, X):
    a = {k: node_attrs[k] for k in ("mode", "output_height", "output_width", "sampling_ratio", "spatial_scale")}
    mode = node_attrs.get("coordinate_transformation_mode", "output_half_pixel")  # opset 10 has no such attribute
    if mode not in ("half_pixel", "output_half_pixel"):
        raise UnsupportedOpError(f"RoiAlign with coordinate_transformation_mode '{mode}' is not supported")
    if a["mode"] not in ("avg", "max"):
        raise UnsupportedOpError(f"RoiAlign with mode '{a['mode']}' is not supported (avg and max are)")
    if X.ndim != 4:
        raise UnsupportedOpError(f"RoiAlign of a {X.ndim}-D input is not supported (N, C, H, W is)")
    return dict(a, half_pixel=mode == "half_pixel")


@rule("RoiAlign", since=10)
class RoiAlign:
    """Y[r, c] = X[batch_indices[r], c] pooled over box rois[r] = (x1, y1, x2, y2) (times
    spatial_scale) into output_height x output_width bins: the mean (or, as onnxruntime, the
    largest weighted tap) of bilinear samples at grid points in each bin. Linear in X; in the
    box, piecewise smooth (the grid's size and the clamping at the borders are constant
    between jumps). Opset 10 shifts as output_half_pixel and makes a box at least one pixel
    wide; opset 16 adds coordinate_transformation_mode, half_pixel by default (the node's
    attributes come with its opset's defaults)."""

    nondiff = (2,)

    def forward(X, rois, batch_indices, **attrs):
        taps, base = _roi_plan(X, rois, batch_indices, **_roi_attrs(attrs, X))
        Y = _roi_gather(X.reshape(1, -1), taps, base, lambda t: t[1])[0]
        return Y.reshape(Y.shape[:2] + (int(attrs["output_height"]), int(attrs["output_width"]))).astype(X.dtype)

    def jvp(cx, Xdot, Rdot, _=None, **attrs):
        X, rois, bi = cx.x
        taps, base = _roi_plan(X, rois, bi, **_roi_attrs(attrs, X))
        Y = cx.y[0]
        out = None
        if Xdot is not None:
            lead = Xdot.shape[: Xdot.ndim - 4]
            out = _roi_gather(Xdot.reshape(lead + (-1,)), taps, base, lambda t: t[1]).reshape(lead + Y.shape)
        if Rdot is not None:
            slopes = _roi_gather(X.reshape(1, -1), taps, base, lambda t: t[2])[:, 0]  # (4, R, C, P)
            g = np.einsum("...rj,jrcp->...rcp", Rdot, slopes).reshape(Rdot.shape[:-2] + Y.shape)
            out = g if out is None else out + g
        return out

    def vjp(cx, Ybar, **attrs):
        need_no_keep(cx, "RoiAlign")
        X, rois, bi = cx.x
        taps, base = _roi_plan(X, rois, bi, **_roi_attrs(attrs, X))
        lead = Ybar.shape[: Ybar.ndim - 4]
        L = int(np.prod(lead))
        Yb = Ybar.reshape((L,) + Ybar.shape[-4:-2] + (-1,))  # (L, R, C, P)
        Xbar = Rbar = None
        if cx.need[0]:
            size = X.size
            flat = np.zeros(L * size, Ybar.dtype)
            rows = (np.arange(L) * size).reshape(L, 1, 1, 1)
            for pix, w, _ in taps:
                flat += np.bincount((rows + base + pix).ravel(), np.broadcast_to(Yb * w, (L,) + Yb.shape[1:]).ravel(),
                                    minlength=flat.size).astype(Ybar.dtype)
            Xbar = flat.reshape(lead + X.shape)
        if cx.need[1]:
            slopes = _roi_gather(X.reshape(1, -1), taps, base, lambda t: t[2])[:, 0]  # (4, R, C, P)
            Rbar = np.einsum("lrcp,jrcp->lrj", Yb, slopes).reshape(lead + rois.shape).astype(Ybar.dtype)
        return Xbar, Rbar, None


# ---- MaxRoiPool: Fast R-CNN's pooling, the largest element of each bin of a rounded box --------


def _roi_pool_argmax(X, rois, pooled_shape, spatial_scale):
    """For each box, channel and bin: the flat index into X of the element that wins (the first
    largest, row by row, as onnxruntime scans), or -1 for an empty bin. The box's corners are
    rounded (half away from zero), a malformed box taken as one pixel, and the bins' edges
    found in float32, as onnxruntime's kernel does."""
    N, C, H, W = X.shape
    ph, pw = (int(v) for v in pooled_shape)
    f32 = np.float32
    r = rois.astype(f32)
    batch = r[:, 0].astype(np.int64)
    if batch.size and (batch.min() < 0 or batch.max() >= N):
        raise ModelError(f"MaxRoiPool: a box's batch index is outside the input's {N} images")
    corners = r[:, 1:5] * f32(spatial_scale)
    x1, y1, x2, y2 = (np.sign(corners[:, k]) * np.floor(np.abs(corners[:, k]) + f32(0.5)) for k in range(4))
    at = np.full((len(r), C, ph, pw), -1, np.int64)
    for i in range(len(r)):
        start_h, start_w = int(y1[i]), int(x1[i])
        bin_h = f32(max(int(y2[i]) - start_h + 1, 1)) / f32(ph)
        bin_w = f32(max(int(x2[i]) - start_w + 1, 1)) / f32(pw)
        image = X[batch[i]].reshape(C, -1)
        for a in range(ph):
            h0 = min(max(int(np.floor(f32(a) * bin_h)) + start_h, 0), H)
            h1 = min(max(int(np.ceil(f32(a + 1) * bin_h)) + start_h, 0), H)
            for b in range(pw):
                w0 = min(max(int(np.floor(f32(b) * bin_w)) + start_w, 0), W)
                w1 = min(max(int(np.ceil(f32(b + 1) * bin_w)) + start_w, 0), W)
                if h1 > h0 and w1 > w0:
                    cells = (np.arange(h0, h1)[:, None] * W + np.arange(w0, w1)).ravel()
                    at[i, :, a, b] = batch[i] * C * H * W + np.arange(C) * H * W + cells[np.argmax(image[:, cells], axis=1)]
    return at


@rule("MaxRoiPool", since=1)
class MaxRoiPool:
    """Y[r, c] = the largest element of X[batch, c] in each of pooled_shape bins of box
    rois[r] = (batch, x1, y1, x2, y2) (times spatial_scale, rounded to pixels); 0 for a bin
    outside the image. A max: its derivative goes to the element that won. The boxes are
    rounded, so nothing flows to them."""

    nondiff = (1,)

    def forward(X, rois, *, pooled_shape, spatial_scale=1.0):
        at = _roi_pool_argmax(X, rois, pooled_shape, spatial_scale)
        return np.where(at >= 0, X.reshape(-1)[np.maximum(at, 0)], 0).astype(X.dtype)

    def jvp(cx, Xdot, _=None, *, pooled_shape, spatial_scale=1.0):
        X, rois = cx.x
        at = _roi_pool_argmax(X, rois, pooled_shape, spatial_scale)
        lead = Xdot.shape[: Xdot.ndim - 4]
        flat = Xdot.reshape(lead + (-1,))
        return np.where(at >= 0, flat[..., np.maximum(at, 0)], 0).astype(Xdot.dtype)

    def vjp(cx, Ybar, *, pooled_shape, spatial_scale=1.0):
        need_no_keep(cx, "MaxRoiPool")
        X, rois = cx.x
        at = _roi_pool_argmax(X, rois, pooled_shape, spatial_scale)
        lead = Ybar.shape[: Ybar.ndim - 4]
        L = int(np.prod(lead))
        won = at >= 0
        rows = (np.arange(L) * X.size)[:, None]
        flat = np.bincount((rows + at[won]).ravel(), Ybar.reshape(L, -1)[:, won.ravel()].ravel(), minlength=L * X.size)
        return flat.astype(Ybar.dtype).reshape(lead + X.shape), None
