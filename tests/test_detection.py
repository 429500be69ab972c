"""Object detection's operators: NonMaxSuppression, RoiAlign and MaxRoiPool against onnxruntime,
RoiAlign's and MaxRoiPool's derivatives against differences, a small two-stage detector
(boxes kept by NonMaxSuppression, their features pooled by RoiAlign) and a Fast R-CNN head
(MaxRoiPool over given boxes) through the CLI."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from gradcheck import check_rule
from onnx import TensorProto, helper, numpy_helper

from jaccli.rules.detection import MaxRoiPool, NonMaxSuppression, RoiAlign


def _session(node, inputs, opset, out=TensorProto.FLOAT):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                          [helper.make_tensor_value_info(node.output[0], out, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # its warning that RoiAlign's max mode changed in 1.13
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_non_max_suppression_keeps_the_boxes_onnxruntime_keeps():
    """Random boxes in both formats, degenerate and touching ones, tied scores, every optional
    input present or not: the same indices in the same order."""
    rng = np.random.default_rng(0)
    optional = [("max_output_boxes_per_class", TensorProto.INT64), ("iou_threshold", TensorProto.FLOAT),
                ("score_threshold", TensorProto.FLOAT)]
    kept = 0
    for trial in range(150):
        B, C, S = rng.integers(1, 3), rng.integers(1, 4), rng.integers(0, 25)
        center, given = int(rng.integers(0, 2)), int(rng.integers(0, 4))
        boxes = rng.uniform(0, 10, (B, S, 4)).astype(np.float32)
        if trial % 3 == 0:
            boxes = np.round(boxes)
        scores = rng.uniform(0, 1, (B, C, S)).astype(np.float32)
        if trial % 4 == 0:
            scores = np.round(scores * 4) / 4
        values = [np.array(rng.integers(0, 8), np.int64), np.array(rng.uniform(0, 0.8), np.float32),
                  np.array(rng.uniform(-0.1, 0.7), np.float32)][:given]
        node = helper.make_node("NonMaxSuppression", ["boxes", "scores"] + [n for n, _ in optional[:given]], ["y"],
                                center_point_box=center)
        s = _session(node, [("boxes", TensorProto.FLOAT), ("scores", TensorProto.FLOAT)] + optional[:given], 11,
                     TensorProto.INT64)
        ref = s.run(None, {"boxes": boxes, "scores": scores, **{n: v for (n, _), v in zip(optional, values)}})[0]
        ours = NonMaxSuppression.forward(boxes, scores, *values, center_point_box=center)
        assert ours.dtype == np.int64 and ours.shape == ref.shape and (ours == ref).all(), trial
        kept += len(ref)
    assert kept > 300  # most trials keep boxes


def _roi_case(rng, scale=1.0):
    N, C, H, W, R = rng.integers(1, 3), rng.integers(1, 4), rng.integers(2, 12), rng.integers(2, 12), rng.integers(1, 6)
    X = rng.standard_normal((N, C, H, W)).astype(np.float32)
    corner = rng.uniform(-3, max(H, W) / scale + 3, (R, 2))
    rois = np.concatenate([corner, corner + rng.uniform(0, 8, (R, 2)) / scale], 1).astype(np.float32)
    return X, rois, rng.integers(0, N, R).astype(np.int64)


@pytest.mark.parametrize("opset", [10, 16])
def test_roi_align_forward_as_onnxruntime(opset):
    """Boxes inside, across and outside the borders, narrower than a pixel, at four scales; both
    modes, every coordinate mode, fixed and adaptive sampling grids."""
    rng = np.random.default_rng(opset)
    seen = set()
    for trial in range(80):
        scale = float(rng.choice([1.0, 0.5, 0.25, 0.37]))
        X, rois, bi = _roi_case(rng, scale)
        if trial % 5 == 0:
            rois[:, 2:] = rois[:, :2] + (rois[:, 2:] - rois[:, :2]) * 0.05
        attrs = dict(mode=str(rng.choice(["avg", "max"])), output_height=int(rng.integers(1, 4)),
                     output_width=int(rng.integers(1, 4)), sampling_ratio=int(rng.integers(0, 3)), spatial_scale=scale)
        full = dict(attrs)
        if opset == 16:
            attrs["coordinate_transformation_mode"] = full["coordinate_transformation_mode"] = str(
                rng.choice(["half_pixel", "output_half_pixel"]))
        node = helper.make_node("RoiAlign", ["X", "rois", "bi"], ["Y"], **attrs)
        s = _session(node, [("X", TensorProto.FLOAT), ("rois", TensorProto.FLOAT), ("bi", TensorProto.INT64)], opset)
        ref = s.run(None, {"X": X, "rois": rois, "bi": bi})[0]
        ours = RoiAlign.forward(X, rois, bi, **full)
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6, err_msg=str(attrs))
        seen.add((attrs["mode"], full.get("coordinate_transformation_mode"), attrs["sampling_ratio"] > 0))
    assert len(seen) == (4 if opset == 10 else 8)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("coordinates", ["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_derivatives(mode, coordinates, sampling_ratio):
    """In the features and in the boxes' corners (scaled), boxes partly outside the image."""
    rng = np.random.default_rng(sampling_ratio)
    attrs = dict(coordinate_transformation_mode=coordinates, mode=mode, output_height=2, output_width=3,
                 sampling_ratio=sampling_ratio, spatial_scale=0.9)
    for _ in range(3):
        corner = rng.uniform(-1, 6, (4, 2))
        rois = np.concatenate([corner, corner + rng.uniform(0.5, 5, (4, 2))], 1)
        check_rule(RoiAlign, [rng.standard_normal((2, 3, 7, 8)), rois, rng.integers(0, 2, 4)], attrs, diff=(0, 1), rng=rng)


def detector(S=12, H=10):
    """One image (3, H, H), no batch axis (as torchvision's detectors take it): features by a
    convolution, S anchor boxes shifted by the image's mean features, scored by a linear layer;
    NonMaxSuppression keeps at most 3; RoiAlign pools the features over the kept boxes."""
    rng = np.random.default_rng(7)
    anchors = np.concatenate([c := rng.uniform(0, H - 4, (S, 2)), c + rng.uniform(1.5, 4, (S, 2))], 1)[None]
    inits = {"w": rng.standard_normal((4, 3, 3, 3)) * 0.3, "wc": rng.standard_normal((4, S)), "ws": rng.standard_normal((4, 4)),
             "anchors": anchors, "axes0": np.array([0]), "k": np.array(3), "iou": np.array(0.3, np.float32),
             "shape": np.array([1, 1, S]), "two": np.array(2), "zero": np.array(0)}
    inits = [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in inits.items()]
    n = helper.make_node
    nodes = [
        n("Unsqueeze", ["image", "axes0"], ["x"]),
        n("Conv", ["x", "w"], ["feat"], pads=[1, 1, 1, 1]),
        n("GlobalAveragePool", ["feat"], ["pooled"]),
        n("Flatten", ["pooled"], ["f"]),  # (1, 4)
        n("MatMul", ["f", "wc"], ["logits"]),
        n("Sigmoid", ["logits"], ["s"]),
        n("Reshape", ["s", "shape"], ["scores"]),  # (1, 1, S)
        n("MatMul", ["f", "ws"], ["shift"]),  # (1, 4): the boxes move with the image
        n("Add", ["anchors", "shift"], ["boxes"]),  # (1, S, 4), [y1, x1, y2, x2]
        n("NonMaxSuppression", ["boxes", "scores", "k", "iou"], ["sel"]),
        n("Gather", ["sel", "two"], ["box_index"], axis=1),
        n("Gather", ["sel", "zero"], ["batch_index"], axis=1),
        n("Squeeze", ["boxes", "axes0"], ["boxes1"]),
        n("Gather", ["boxes1", "box_index"], ["yxyx"]),
        n("Split", ["yxyx"], ["y1", "x1", "y2", "x2"], axis=1, num_outputs=4),
        n("Concat", ["x1", "y1", "x2", "y2"], ["rois"], axis=1),  # RoiAlign's (x1, y1, x2, y2)
        n("RoiAlign", ["feat", "rois", "batch_index"], ["pooled_rois"], output_height=2, output_width=2, sampling_ratio=2),
    ]
    g = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, H, H])],
                          [helper.make_tensor_value_info("pooled_rois", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


def test_a_two_stage_detector_through_the_cli(tmp_path):
    """Its image has no batch axis: --sample-axis image=none. The kept boxes are constant near
    the image, their corners move with it: the Jacobian passes onnxruntime's differences, for
    the image and for the parameters."""
    import onnx
    from click.testing import CliRunner

    from jaccli.cli import main

    onnx.save(detector(), tmp_path / "det.onnx")
    np.save(tmp_path / "image.npy", np.random.default_rng(1).uniform(0, 1, (3, 10, 10)).astype(np.float32))
    r = CliRunner().invoke(main, ["input", str(tmp_path / "det.onnx"), str(tmp_path / "image.npy")])
    assert r.exit_code != 0 and "mixes samples" in r.output and "--sample-axis '*=none'" in r.output, r.output
    args = [str(tmp_path / "det.onnx"), str(tmp_path / "image.npy"), "--sample-axis", "image=none"]
    r = CliRunner().invoke(main, ["input", *args, "-o", str(tmp_path / "J.npy"), "-q"])
    assert r.exit_code == 0, r.output
    J = np.load(tmp_path / "J.npy")
    assert J.shape == (1, 3, 4, 2, 2, 3, 10, 10) and np.abs(J).max() > 0
    r = CliRunner().invoke(main, ["params", *args, "-o", str(tmp_path / "G.npy"), "-q"])
    assert r.exit_code == 0, r.output
    # the convolution, the shift and the anchors; not the scores' weights: only NonMaxSuppression's choice reads them
    assert np.load(tmp_path / "G.npy").shape == (1, 3, 4, 2, 2, 4 * 3 * 3 * 3 + 4 * 4 + 12 * 4)
    for kind in ([], ["--params"]):
        r = CliRunner().invoke(main, ["check", *args, *kind, "--json"])
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        assert report["ok"] and report["rows"][0]["max_abs"] > 0.01, report


def _roi_pool_case(rng, trial):
    N, C, H, W, R = (int(v) for v in (rng.integers(1, 3), rng.integers(1, 4), rng.integers(2, 12), rng.integers(2, 12),
                                      rng.integers(1, 6)))
    scale = [1.0, 0.5, 0.25, 2.0][trial % 4]
    corner = rng.uniform(-4, max(H, W) / scale + 4, (R, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(-2, 10, (R, 2)) / scale], 1)
    if trial % 3 == 0:
        boxes = np.round(boxes * 2) / 2  # corners at halves: rounding's ties
    rois = np.concatenate([rng.integers(0, N, (R, 1)), boxes], 1).astype(np.float32)
    return (N, C, H, W), rois, [int(rng.integers(1, 4)), int(rng.integers(1, 4))], scale


def test_max_roi_pool_is_onnxruntimes():
    """Boxes inside, across and beyond the image's edges (empty bins give 0), malformed ones,
    corners at halves, tied pixels: the same values."""
    rng = np.random.default_rng(4)
    for trial in range(150):
        shape, rois, pooled, scale = _roi_pool_case(rng, trial)
        X = rng.standard_normal(shape).astype(np.float32)
        if trial % 5 == 0:
            X = np.round(X)  # ties: the first in the scan wins
        node = helper.make_node("MaxRoiPool", ["X", "rois"], ["Y"], pooled_shape=pooled, spatial_scale=scale)
        ref = _session(node, [("X", TensorProto.FLOAT), ("rois", TensorProto.FLOAT)], 11).run(None, {"X": X, "rois": rois})[0]
        ours = MaxRoiPool.forward(X, rois, pooled_shape=pooled, spatial_scale=scale)
        assert ours.shape == ref.shape and np.array_equal(ours, ref), trial


def test_max_roi_pool_differentiates_in_the_features():
    rng = np.random.default_rng(5)
    for trial in range(6):
        shape, rois, pooled, scale = _roi_pool_case(rng, trial)
        X = rng.permutation(np.prod(shape)).reshape(shape) / np.prod(shape)  # distinct: no ties
        check_rule(MaxRoiPool, [X, rois], {"pooled_shape": pooled, "spatial_scale": scale}, [0], rng)


def test_a_fast_rcnn_head_through_the_cli(tmp_path):
    """One image, features by a convolution, MaxRoiPool over three given boxes (one partly
    outside), a linear layer per box: the Jacobians pass onnxruntime's differences."""
    import onnx
    from click.testing import CliRunner

    from jaccli.cli import main

    rng = np.random.default_rng(8)
    rois = np.array([[0, 1, 1, 6, 5], [0, 3, 0, 9, 9], [0, 6, 6, 12, 11]], np.float32)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)) * 0.3, "rois": rois, "fc": rng.standard_normal((16, 5)),
             "axes0": np.array([0]), "flat": np.array([3, 16])}
    inits = [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in inits.items()]
    n = helper.make_node
    nodes = [n("Unsqueeze", ["image", "axes0"], ["x"]), n("Conv", ["x", "w"], ["feat"], pads=[1, 1, 1, 1]),
             n("MaxRoiPool", ["feat", "rois"], ["pooled"], pooled_shape=[2, 2]), n("Reshape", ["pooled", "flat"], ["f"]),
             n("MatMul", ["f", "fc"], ["y"])]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "head.onnx")
    np.save(tmp_path / "image.npy", rng.uniform(0, 1, (3, 10, 10)).astype(np.float32))
    args = [str(tmp_path / "head.onnx"), str(tmp_path / "image.npy"), "--sample-axis", "image=none"]
    for kind in ([], ["--params"]):
        r = CliRunner().invoke(main, ["check", *args, *kind, "--json"])
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        assert report["ok"] and report["rows"][0]["max_abs"] > 0.01, report
