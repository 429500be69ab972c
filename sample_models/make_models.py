"""Build the small sample models and their data with onnx.helper (no PyTorch). Deterministic.

    python sample_models/make_models.py     # writes *.onnx and *.npy beside this script
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))


def _init(rng, name, shape, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    scale = scale if scale is not None else 1 / np.sqrt(fan_in)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inits, x_shape, y_shape, opset, name):
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="jaccli-sample")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def mlp_classifier(rng):
    """8 -> 16 (tanh) -> 16 (relu) -> 4 -> softmax; opset 13."""
    inits = [_init(rng, "fc1.weight", (16, 8)), _init(rng, "fc1.bias", (16,), 0.1),
             _init(rng, "fc2.weight", (16, 16)), _init(rng, "fc2.bias", (16,), 0.1),
             _init(rng, "fc3.weight", (4, 16)), _init(rng, "fc3.bias", (4,), 0.1)]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        helper.make_node("Tanh", ["h1"], ["a1"], name="tanh1"),
        helper.make_node("Gemm", ["a1", "fc2.weight", "fc2.bias"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Gemm", ["a2", "fc3.weight", "fc3.bias"], ["logits"], name="fc3", transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ]
    return _model(nodes, inits, [8], [4], 13, "mlp_classifier"), rng.standard_normal((32, 8)).astype(np.float32)


def regression_mlp(rng):
    """6 -> 32 (tanh) -> 32 (tanh) -> 1, a scalar output per sample; opset 17, MatMul + Add as exported by PyTorch."""
    inits = [_init(rng, "l1.weight_t", (6, 32), 1 / np.sqrt(6)), _init(rng, "l1.bias", (32,), 0.1),
             _init(rng, "l2.weight_t", (32, 32), 1 / np.sqrt(32)), _init(rng, "l2.bias", (32,), 0.1),
             _init(rng, "l3.weight_t", (32, 1), 1 / np.sqrt(32)), _init(rng, "l3.bias", (1,), 0.1)]
    nodes = [
        helper.make_node("MatMul", ["x", "l1.weight_t"], ["m1"], name="l1_mm"),
        helper.make_node("Add", ["m1", "l1.bias"], ["h1"], name="l1_add"),
        helper.make_node("Tanh", ["h1"], ["a1"], name="tanh1"),
        helper.make_node("MatMul", ["a1", "l2.weight_t"], ["m2"], name="l2_mm"),
        helper.make_node("Add", ["m2", "l2.bias"], ["h2"], name="l2_add"),
        helper.make_node("Tanh", ["h2"], ["a2"], name="tanh2"),
        helper.make_node("MatMul", ["a2", "l3.weight_t"], ["m3"], name="l3_mm"),
        helper.make_node("Add", ["m3", "l3.bias"], ["y"], name="l3_add"),
    ]
    return _model(nodes, inits, [6], [1], 17, "regression_mlp"), rng.standard_normal((64, 6)).astype(np.float32)


def cnn(rng):
    """1x12x12 -> Conv 3x3 (4) -> Relu -> MaxPool 2 -> Conv 3x3 (6, pad 1) -> Relu -> Flatten -> Gemm 3; opset 11."""
    inits = [_init(rng, "conv1.weight", (4, 1, 3, 3)), _init(rng, "conv1.bias", (4,), 0.1),
             _init(rng, "conv2.weight", (6, 4, 3, 3)), _init(rng, "conv2.bias", (6,), 0.1),
             _init(rng, "fc.weight", (3, 6 * 5 * 5)), _init(rng, "fc.bias", (3,), 0.1)]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [1, 12, 12], [3], 11, "cnn"), rng.standard_normal((16, 1, 12, 12)).astype(np.float32)


def main(out=HERE):
    for make in (mlp_classifier, regression_mlp, cnn):
        rng = np.random.default_rng(sum(map(ord, make.__name__)))  # a fixed seed per model
        model, data = make(rng)
        onnx.save(model, os.path.join(out, f"{make.__name__}.onnx"))
        np.save(os.path.join(out, f"{make.__name__}.npy"), data)
        print(f"wrote {make.__name__}.onnx and {make.__name__}.npy {data.shape}")


if __name__ == "__main__":
    main()
