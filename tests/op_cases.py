"""The table of operator cases: (op, inputs, attributes, opset), sampled away from kinks."""

import numpy as np

from gradcheck import Case

i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
f32 = lambda *v: np.array(v, dtype=np.float32)  # noqa: E731

CASES = [
    # linalg
    Case("Gemm", [("x", (4,)), ("p", (3, 4)), ("p", (3,))], {"transB": 1}, 13, id="Gemm-transB"),
    Case("Gemm", [("x", (4,)), ("p", (4, 3)), ("p", (1, 3))], {"alpha": 0.5, "beta": 2.0}, 11, id="Gemm-alpha-beta"),
    Case("Gemm", [("x", (4,)), ("p", (3, 4))], {"transB": 1}, 11, id="Gemm-noC"),
    Case("MatMul", [("x", (5,)), ("p", (5, 3))], id="MatMul-2d"),
    Case("MatMul", [("x", (2, 5)), ("p", (5, 3))], id="MatMul-3d-param"),
    Case("MatMul", [("x", (2, 5)), ("x", (5, 3))], id="MatMul-batched-both"),
    Case("MatMul", [("x", (4, 5)), ("p", (5,))], id="MatMul-vector"),
    Case("MatMul", [("p", (2, 5)), ("x", (5, 3))], id="MatMul-param-left"),
    Case("MatMul", [("x", (2, 3, 5)), ("p", (2, 5, 2))], id="MatMul-broadcast-batch"),
    # binary elementwise
    Case("Add", [("x", (3, 4)), ("p", (4,))], id="Add-bias"),
    Case("Add", [("x", (3, 1)), ("x", (1, 4))], id="Add-broadcast-both"),
    Case("Sub", [("x", (3, 4)), ("p", (3, 1))], id="Sub"),
    Case("Mul", [("x", (3, 4)), ("p", (4,))], id="Mul-param"),
    Case("Mul", [("x", (3, 4)), ("x", (3, 4))], id="Mul-both"),
    Case("Div", [("x", (3, 4)), ("p", (4,))], data="positive", id="Div-param"),
    Case("Div", [("x", (3, 4)), ("x", (3, 4))], data="positive", id="Div-both"),
    Case("Pow", [("x", (3, 4)), ("p", (4,))], data="positive", id="Pow-param-exponent"),
    Case("Pow", [("x", (3, 4)), ("c", f32(2.0))], data="positive", id="Pow-square"),
    # unary elementwise
    Case("Neg", [("x", (3, 4))]),
    Case("Relu", [("x", (3, 4))], data="away", opset=14),
    Case("LeakyRelu", [("x", (3, 4))], {"alpha": 0.1}, data="away"),
    Case("Sigmoid", [("x", (3, 4))]),
    Case("Tanh", [("x", (3, 4))]),
    Case("Exp", [("x", (3, 4))]),
    Case("Log", [("x", (3, 4))], data="positive"),
    Case("Sqrt", [("x", (3, 4))], data="positive"),
    Case("Erf", [("x", (3, 4))]),
    Case("Softplus", [("x", (3, 4))]),
    Case("Elu", [("x", (3, 4))], {"alpha": 0.7}, data="away"),
    Case("Clip", [("x", (3, 4)), ("c", f32(-0.5)), ("c", f32(0.8))], opset=13, data="away", id="Clip-13-inputs"),
    Case("Clip", [("x", (3, 4)), ("", None), ("c", f32(0.3))], opset=12, data="away", id="Clip-12-max-only"),
    Case("Clip", [("x", (3, 4))], {"min": -0.4, "max": 0.6}, opset=6, data="away", id="Clip-6-attrs"),
    # normalisation
    Case("Softmax", [("x", (3, 4))], {"axis": -1}, opset=13, id="Softmax-13"),
    Case("Softmax", [("x", (3, 4))], {"axis": 1}, opset=11, id="Softmax-11-coerced"),
    Case("LogSoftmax", [("x", (3, 4))], {"axis": 1}, opset=13, id="LogSoftmax-13"),
    Case("LogSoftmax", [("x", (3, 4))], {"axis": 1}, opset=11, id="LogSoftmax-11-coerced"),
    Case("BatchNormalization", [("x", (3, 4, 4)), ("p", (3,)), ("p", (3,)), ("c", f32(0.1, -0.2, 0.3)), ("c", f32(0.5, 1.5, 2.0))],
         {"epsilon": 1e-3}, opset=15, id="BatchNormalization-15"),
    Case("BatchNormalization", [("x", (3, 5)), ("p", (3,)), ("p", (3,)), ("c", f32(0.1, -0.2, 0.3)), ("c", f32(0.5, 1.5, 2.0))],
         opset=9, id="BatchNormalization-9-2d"),
    # convolution
    Case("Conv", [("x", (2, 6, 6)), ("p", (3, 2, 3, 3)), ("p", (3,))], {"kernel_shape": [3, 3]}, opset=11, id="Conv-2d"),
    Case("Conv", [("x", (2, 7, 7)), ("p", (3, 2, 3, 3))], {"strides": [2, 2], "pads": [1, 1, 1, 1]}, id="Conv-stride-pad"),
    Case("Conv", [("x", (2, 7, 7)), ("p", (3, 2, 3, 3))], {"dilations": [2, 2], "pads": [1, 0, 2, 1]}, id="Conv-dilated-asym"),
    Case("Conv", [("x", (4, 6, 6)), ("p", (6, 2, 3, 3)), ("p", (6,))], {"group": 2}, id="Conv-groups"),
    Case("Conv", [("x", (3, 6, 6)), ("p", (3, 1, 3, 3))], {"group": 3, "auto_pad": "SAME_UPPER"}, id="Conv-depthwise-same"),
    Case("Conv", [("x", (2, 7, 7)), ("p", (3, 2, 2, 2))], {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, id="Conv-same-lower"),
    Case("Conv", [("x", (2, 9)), ("p", (3, 2, 3)), ("p", (3,))], {"pads": [1, 1]}, id="Conv-1d"),
    # pooling
    Case("MaxPool", [("x", (2, 6, 6))], {"kernel_shape": [2, 2], "strides": [2, 2]}, data="distinct", opset=12, id="MaxPool-2x2"),
    Case("MaxPool", [("x", (2, 5, 5))], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, data="distinct", id="MaxPool-overlap-pad"),
    Case("MaxPool", [("x", (2, 5, 5))], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, data="distinct", id="MaxPool-ceil"),
    Case("MaxPool", [("x", (2, 7, 7))], {"kernel_shape": [2, 2], "dilations": [2, 2]}, data="distinct", id="MaxPool-dilated"),
    Case("MaxPool", [("x", (2, 8))], {"kernel_shape": [3], "strides": [2], "auto_pad": "SAME_UPPER"}, data="distinct", id="MaxPool-1d-same"),
    Case("AveragePool", [("x", (2, 6, 6))], {"kernel_shape": [2, 2], "strides": [2, 2]}, id="AveragePool-2x2"),
    Case("AveragePool", [("x", (2, 5, 5))], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, id="AveragePool-pad-excluded"),
    Case("AveragePool", [("x", (2, 5, 5))], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, id="AveragePool-pad-included"),
    Case("AveragePool", [("x", (2, 5, 5))], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, id="AveragePool-ceil"),
    Case("GlobalAveragePool", [("x", (3, 4, 5))]),
    Case("GlobalMaxPool", [("x", (3, 4, 5))], data="distinct"),
    # shape and layout
    Case("Flatten", [("x", (3, 4))], {"axis": 1}, id="Flatten-1"),
    Case("Flatten", [("x", (3, 2, 2))], {"axis": -3}, opset=11, id="Flatten-negative-axis"),
    Case("Reshape", [("x", (3, 4)), ("c", i64(0, 2, -1))], opset=13, id="Reshape"),
    Case("Reshape", [("x", (3, 4)), ("c", i64(0, 12))], opset=14, id="Reshape-14-copy-dim"),
    Case("Transpose", [("x", (3, 4, 2))], {"perm": [0, 2, 1, 3]}),
    Case("Concat", [("x", (3, 4)), ("x", (2, 4))], {"axis": 1}, id="Concat"),
    Case("Concat", [("x", (3, 4)), ("x", (3, 1)), ("x", (3, 2))], {"axis": -1}, id="Concat-three"),
    Case("Identity", [("x", (3, 4))]),
    Case("Dropout", [("x", (3, 4))], opset=13, id="Dropout-13"),
    Case("Dropout", [("x", (3, 4))], {"ratio": 0.3}, opset=10, id="Dropout-10"),
    Case("Gather", [("x", (5, 2)), ("c", i64(4, 0, 4, -1))], {"axis": 1}, id="Gather-repeats"),
    Case("Gather", [("x", (5, 2)), ("c", np.array(1, np.int64))], {"axis": 2}, id="Gather-scalar"),
    Case("Unsqueeze", [("x", (3, 4))], {"axes": [1, -1]}, opset=11, id="Unsqueeze-11"),
    Case("Unsqueeze", [("x", (3, 4)), ("c", i64(2))], opset=13, id="Unsqueeze-13"),
    Case("Squeeze", [("x", (1, 4, 1))], {"axes": [1]}, opset=11, id="Squeeze-11"),
    Case("Squeeze", [("x", (1, 4, 1)), ("c", i64(-1, 1))], opset=13, id="Squeeze-13"),
    Case("Cast", [("x", (3, 4))], {"to": 1}, opset=13, id="Cast-float"),
    # reductions
    Case("ReduceMean", [("x", (3, 4))], {"axes": [1], "keepdims": 0}, opset=13, id="ReduceMean-13-attr"),
    Case("ReduceMean", [("x", (3, 4)), ("c", i64(-1))], opset=18, id="ReduceMean-18-input"),
    Case("ReduceSum", [("x", (3, 4))], {"axes": [1, 2]}, opset=11, id="ReduceSum-11-attr"),
    Case("ReduceSum", [("x", (3, 4)), ("c", i64(1))], {"keepdims": 0}, opset=13, id="ReduceSum-13-input"),
    Case("ReduceSum", [("x", (3, 4))], {"noop_with_empty_axes": 1}, opset=13, id="ReduceSum-13-noop"),
]
