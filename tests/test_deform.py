"""DeformConv's rule on its own (every input's tangent against differences, every cotangent as
the tangents' adjoint) and a DCN v2 block as networks build it: offsets and mask computed from
the input by convolutions, whose Jacobians pass differences. Its forward against onnxruntime is
in the operator table (tests/op_cases.py)."""

import numpy as np
import pytest
from gradcheck import N, check_rule, check_whole_model, one_input_model
from onnx import helper

from jaccli.errors import ModelError
from jaccli.rules.deform import DeformConv

GEOMETRIES = [  # C, H, W, M, kernel, group, offset_group, strides, pads, dilations, bias, mask
    (2, 5, 6, 3, (3, 3), 1, 1, [1, 1], [1, 1, 1, 1], [1, 1], True, True),
    (4, 7, 6, 4, (3, 2), 2, 2, [2, 1], [1, 0, 2, 1], [1, 2], False, True),
    (6, 6, 6, 6, (3, 3), 3, 3, [1, 1], [0, 0, 0, 0], [1, 1], True, False),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["v2", "groups-strided-dilated", "v1-depthwise"])
def test_every_input_differentiates(geometry):
    C, H, W, M, (kh, kw), g, go, strides, pads, dilations, bias, mask = geometry
    rng = np.random.default_rng(0)
    oh = (H + pads[0] + pads[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (W + pads[1] + pads[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    inputs = [rng.standard_normal((2, C, H, W)), rng.standard_normal((M, C // g, kh, kw)),
              2 * rng.standard_normal((2, go * kh * kw * 2, oh, ow)), rng.standard_normal(M) if bias else None,
              rng.uniform(0.2, 1, (2, go * kh * kw, oh, ow)) if mask else None]
    attrs = dict(group=g, offset_group=go, strides=strides, pads=pads, dilations=dilations)
    check_rule(DeformConv, inputs, attrs, [k for k, v in enumerate(inputs) if v is not None], rng)


def test_an_offset_of_the_wrong_size_is_refused():
    X, W = np.zeros((1, 2, 5, 5)), np.zeros((3, 2, 3, 3))
    with pytest.raises(ModelError, match="do not agree"):
        DeformConv.forward(X, W, np.zeros((1, 9, 3, 3)))
    with pytest.raises(ModelError, match="does not follow"):
        DeformConv.forward(X, W, np.zeros((1, 18, 5, 5)))


def dcn_block():
    """x (N, 3, 6, 6) -> offsets (a 3x3 convolution, 18 channels) and mask (a 3x3 convolution,
    sigmoid) -> DeformConv 3 -> 4 with bias -> Relu: torchvision's DCN v2 block."""
    rng = np.random.default_rng(2)
    inits = {"Wo": 0.5 * rng.standard_normal((18, 3, 3, 3)), "Wm": rng.standard_normal((9, 3, 3, 3)),
             "W": rng.standard_normal((4, 3, 3, 3)), "B": rng.standard_normal(4)}
    nodes = [helper.make_node("Conv", ["x", "Wo"], ["offset"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "Wm"], ["logits"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["logits"], ["mask"]),
             helper.make_node("DeformConv", ["x", "W", "offset", "B", "mask"], ["z"], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["z"], ["y"])]
    return one_input_model(nodes, {k: v.astype(np.float32) for k, v in inits.items()}, (3, 6, 6), opset=19)


def test_a_dcn_v2_block_differentiates():
    """Forward against onnxruntime; input Jacobian in both modes (through the offsets, the mask
    and the samples) and every parameter's per-sample Jacobian against float64 differences."""
    x = np.random.default_rng(3).standard_normal((N, 3, 6, 6)).astype(np.float32)
    assert sorted(check_whole_model(dcn_block(), x)) == ["B", "W", "Wm", "Wo"]
