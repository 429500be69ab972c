"""MelWeightMatrix, the mel filter bank of a spectrogram front end: its matrix against
onnxruntime's, the inputs both refuse, and a log-mel model (HannWindow, STFT, power, the
filter bank, log, a linear layer) whose Jacobians pass differences."""

import numpy as np
import onnxruntime as ort
import pytest
from gradcheck import N, check_whole_model, one_input_model
from onnx import TensorProto, helper, numpy_helper

from jaccli.errors import ModelError
from jaccli.rules.spectral import MelWeightMatrix

INPUTS = [("bins", TensorProto.INT64), ("dft", TensorProto.INT64), ("rate", TensorProto.INT64),
          ("low", TensorProto.FLOAT), ("high", TensorProto.FLOAT)]


def onnxruntime_mel(args, datatype):
    node = helper.make_node("MelWeightMatrix", [n for n, _ in INPUTS], ["y"], output_datatype=datatype)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in INPUTS],
                          [helper.make_tensor_value_info("y", datatype, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # its error for the refused ones is raised, not logged
    s = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {n: np.array(v, np.int64 if t == TensorProto.INT64 else np.float32) for (n, t), v in zip(INPUTS, args)}
    return s.run(None, feeds)[0]


@pytest.mark.parametrize("args", [(8, 64, 16000, 0.0, 8000.0), (40, 512, 16000, 20.0, 7600.0), (80, 400, 16000, 0.0, 8000.0),
                                  (128, 2048, 44100, 30.0, 22050.0), (64, 64, 8000, 100.0, 4000.0), (0, 64, 16000, 0.0, 8000.0)])
@pytest.mark.parametrize("datatype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_mel_weight_matrix_is_onnxruntimes(args, datatype):
    """Typical front ends (Whisper's 80 bins of a 400-point DFT among them), filters narrower
    than a DFT bin (64 bins of a 64-point DFT: single-bin triangles), and none at all."""
    ref = onnxruntime_mel(args, datatype)
    ours = MelWeightMatrix.forward(*map(np.array, args), output_datatype=datatype)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape == (args[1] // 2 + 1, args[0])
    np.testing.assert_array_equal(ours, ref)
    if args[0] == 64:
        assert (ours.max(axis=0) == 1).all() and ((ours > 0).sum(axis=0) == 1).any()


@pytest.mark.parametrize("args", [(12, 64, 16000, 0.0, 16000.0), (12, 64, 16000, 0.0, 9000.0), (4, 64, 16000, -500.0, 8000.0)])
def test_mel_filters_past_the_spectrum_are_refused_as_onnxruntime_refuses_them(args):
    with pytest.raises(Exception, match="out of range"):
        onnxruntime_mel(args, TensorProto.FLOAT)
    with pytest.raises(ModelError, match="do not fit the 33 bins of a 64-point DFT"):
        MelWeightMatrix.forward(*map(np.array, args))


def log_mel_model():
    """x (N, 64) -> frames of 32 every 16 under a Hann window -> power (N, 3, 17) -> 6 mel bins
    -> log -> a linear layer (6 -> 4): y (N, 3, 4)."""
    c = lambda name, v: numpy_helper.from_array(np.array(v), name)  # noqa: E731
    inits = [c("axis", [-1]), c("size", np.int64(32)), c("step", np.int64(16)), c("last", [-1]), c("bins", np.int64(6)),
             c("dft", np.int64(32)), c("rate", np.int64(16000)), c("low", np.float32(0)), c("high", np.float32(8000)),
             c("eps", np.float32(1e-3)), numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32), "W")]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axis"], ["signal"]),
        helper.make_node("HannWindow", ["size"], ["window"]),
        helper.make_node("STFT", ["signal", "step", "window", "size"], ["spectrum"]),
        helper.make_node("Mul", ["spectrum", "spectrum"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "last"], ["power"], keepdims=0),
        helper.make_node("MelWeightMatrix", ["bins", "dft", "rate", "low", "high"], ["mel"]),
        helper.make_node("MatMul", ["power", "mel"], ["mels"]),
        helper.make_node("Add", ["mels", "eps"], ["shifted"]),
        helper.make_node("Log", ["shifted"], ["logmel"]),
        helper.make_node("MatMul", ["logmel", "W"], ["y"]),
    ]
    return one_input_model(nodes, inits, (64,), opset=17)


def test_a_log_mel_front_end_differentiates():
    """Forward against onnxruntime; input Jacobian in both modes and the linear layer's
    per-sample parameter Jacobian against float64 differences."""
    x = np.random.default_rng(1).standard_normal((N, 64)).astype(np.float32)
    assert check_whole_model(log_mel_model(), x) == ["W"]
