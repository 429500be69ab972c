"""Models exported by the frameworks' own exporters, checked without those frameworks: against
the outputs and the Jacobians that the framework itself computed at export time (float64), and
with `jaccli check` against onnxruntime.

- PyTorch (sample_models/export_torch.py), torch.func's: the TorchScript exporter at opsets 13
  and 17, torch.export at 18 (which folds BatchNormalization into the convolutions, and stores
  a Linear's weight transposed, which jaccli reads in its own layout, as torch.func does); and
  at old opsets, 7 to 11: PixelShuffle's shape cast from float constants, an upsampling's
  scales concatenated from them, F.interpolate to a size from a model exported with a fixed
  batch of one (its float32 scales).
- jax2onnx (sample_models/export_jax.py), from Flax, JAX's vmap(jacrev): NHWC convolutions
  behind Transposes, Loops for fori_loop and scan (a fori_loop's weights kept in the Loop's
  body), opset 23's Gelu, attention written out.
- tf2onnx (sample_models/export_keras.py), from Keras, TensorFlow's GradientTape: NHWC
  convolutions, LSTM and a GRU written as a Loop, MultiHeadAttention as einsums turned MatMuls;
  a decoder's layers (GroupNormalization, PReLU, Conv2DTranspose, bilinear UpSampling2D,
  padding and cropping, UnitNormalization); a bidirectional LSTM, SimpleRNN, a GRU without
  reset_after, Permute, RepeatVector, dot-product and additive attention.
- paddle2onnx (sample_models/export_paddle.py), Paddle's paddle.grad: depthwise convolutions,
  hardswish and hardsigmoid, a bidirectional LSTM and a GRU, a transformer encoder layer.
"""

import glob
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner
from gradcheck import compare_param_jacobian

import jaccli
from jaccli.cli import main

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_models")
TORCH = {f"{m}_opset{k}" for m in ("gelu_mlp", "resnet_bn", "transformer") for k in (13, 17, 18)} | {
    "pixel_cnn_opset7", "pixel_cnn_opset11", "up_bilinear_opset11", "up_bilinear_opset13", "resize_to_opset9",
    "resize_to_opset11"}  # old opsets' shape constants and scales; resize_to exported with a fixed batch of one
EXPORTS = {  # folder: the models it must hold, and how many of the framework's parameters each stores otherwise
    "torch": (TORCH, {"resnet_bn_opset18": 15}),  # BatchNormalization folded into the convolutions
    "jax2onnx": ({"mlp", "fori_loop", "scan_rnn", "cnn", "attention"}, {"cnn": 2}),  # two kernels transposed to OIHW
    # kernels transposed to OIHW (the depthwise ones reshaped), batch norm folded into constants; LSTM's W, R and
    # B with ONNX's gate order (both directions of a Bidirectional); Conv1D's kernels as 2-D ones
    "tf2onnx": ({"cnn", "recurrent", "attention", "conv1d", "upsample", "sequence_layers"},
                {"cnn": 6, "recurrent": 3, "conv1d": 2, "upsample": 4, "sequence_layers": 6}),
    "paddle2onnx": ({"mlp", "cnn", "recurrent", "encoder"}, {"recurrent": 12}),  # the RNNs' weights stacked per direction
}
FILES = sorted(f for folder in EXPORTS for f in glob.glob(os.path.join(ROOT, folder, "*.onnx")))


def _ids(path):
    return "/".join(path.split(os.sep)[-2:])[: -len(".onnx")]


def _data(path):
    """The samples and the framework's references: NAME.npy and NAME_ref.npz beside the model
    (NAME without _opsetK: one network, several exports)."""
    stem = re.sub(r"_opset\d+$", "", path[: -len(".onnx")])
    return f"{stem}.npy", np.load(f"{stem}_ref.npz")


@pytest.mark.parametrize("folder", sorted(EXPORTS))
def test_all_exports_are_present(folder):
    assert {_ids(f).split("/")[1] for f in FILES if _ids(f).startswith(folder + "/")} == EXPORTS[folder][0]


@pytest.mark.parametrize("path", FILES, ids=_ids)
def test_outputs_and_input_jacobian_match_the_framework(path):
    data, ref = _data(path)
    r = jaccli.input_jacobian(path, np.load(data), dtype="float64", return_result=True)
    np.testing.assert_allclose(r.outputs, ref["outputs"], rtol=1e-5, atol=1e-6)
    assert r.value.shape == ref["input_jacobian"].shape
    assert np.abs(r.value - ref["input_jacobian"]).max() / np.abs(ref["input_jacobian"]).max() < 1e-6


@pytest.mark.parametrize("path", FILES, ids=_ids)
def test_per_sample_parameter_jacobian_matches_the_framework(path):
    """Each initializer that holds one of the framework's parameters as it is against the
    framework's per-sample rows (of its first outputs, as many as it stored): every parameter
    (the fori_loop's among them, which live in the Loop's body), but those an exporter stores
    in another layout (kernels transposed for ONNX's Conv, LSTM gates reordered, a depthwise
    kernel reshaped) or folds."""
    data, ref = _data(path)
    k = ref["param_jacobian"].shape[1]
    G, cols = jaccli.param_jacobian(path, np.load(data), dtype="float64", outputs=f"0:{k}")
    folder, name = _ids(path).split("/")
    matched = compare_param_jacobian(G, cols, jaccli.load(path), ref)
    assert matched == len(ref["param_sizes"]) - EXPORTS[folder][1].get(name, 0)


@pytest.mark.parametrize("path", FILES, ids=_ids)
@pytest.mark.parametrize("kind", ["input", "params"])
def test_jaccli_check_passes(path, kind):
    data, _ = _data(path)
    args = ["check", path, data, "--samples", "2"] + (["--params"] if kind == "params" else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
