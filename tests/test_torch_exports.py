"""Models exported from PyTorch (sample_models/export_torch.py: TorchScript exporter at opsets 13
and 17, torch.export at 18), checked without PyTorch: against the outputs and the Jacobians that
torch.func computed at export time (float64), and with `jaccli check` against onnxruntime."""

import glob
import os

import numpy as np
import pytest
from click.testing import CliRunner
from gradcheck import compare_param_jacobian

import jaccli
from jaccli.cli import main

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_models", "torch")
FILES = sorted(glob.glob(os.path.join(HERE, "*_opset*.onnx")))


def _data(path):
    name = os.path.basename(path).rsplit("_opset", 1)[0]
    return os.path.join(HERE, f"{name}.npy"), np.load(os.path.join(HERE, f"{name}_ref.npz"))


def test_all_exports_are_present():
    names = {os.path.basename(f) for f in FILES}
    for model in ("gelu_mlp", "resnet_bn", "transformer"):
        for opset in (13, 17, 18):
            assert f"{model}_opset{opset}.onnx" in names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_outputs_and_input_jacobian_match_torch(path):
    data, ref = _data(path)
    x = np.load(data)
    r = jaccli.input_jacobian(path, x, dtype="float64", return_result=True)
    np.testing.assert_allclose(r.outputs, ref["outputs"], rtol=1e-5, atol=1e-6)
    J = r.value
    assert J.shape == ref["input_jacobian"].shape
    assert np.abs(J - ref["input_jacobian"]).max() / np.abs(ref["input_jacobian"]).max() < 1e-6


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_per_sample_parameter_jacobian_matches_torch(path):
    """Every initializer that holds a torch parameter as it is (same values, same layout) against
    torch.func's per-sample rows; the TorchScript exporter keeps them all, torch.export transposes
    some weights and folds BatchNormalization into the convolutions, which are then skipped."""
    data, ref = _data(path)
    k = ref["param_jacobian"].shape[1]
    G, cols = jaccli.param_jacobian(path, np.load(data), dtype="float64", outputs=f"0:{k}")
    compared = compare_param_jacobian(G, cols, jaccli.load(path), ref)
    if "opset18" in path:
        assert compared >= 2  # the head at least; BatchNormalization is folded into the convolutions
    else:
        assert compared == len(ref["param_names"])


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
@pytest.mark.parametrize("kind", ["input", "params"])
def test_jaccli_check_passes(path, kind):
    data, _ = _data(path)
    args = ["check", path, data, "--samples", "2"] + (["--params"] if kind == "params" else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
