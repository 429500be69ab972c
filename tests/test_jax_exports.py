"""Models exported from Flax by jax2onnx (sample_models/export_jax.py), checked without JAX:
against the outputs and the Jacobians that JAX's vmap(jacrev) computed at export time (float64),
and with `jaccli check` against onnxruntime. Another framework's exporter writes NHWC
convolutions behind Transposes, Loops for fori_loop and scan (a fori_loop's weights kept in the
Loop's body), and opset 23's Gelu and attention written out."""

import glob
import os

import numpy as np
import pytest
from click.testing import CliRunner

import jaccli
from jaccli.cli import main

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_models", "jax")
FILES = sorted(glob.glob(os.path.join(HERE, "*.onnx")))


def _data(path):
    name = os.path.basename(path)[: -len(".onnx")]
    return os.path.join(HERE, f"{name}.npy"), np.load(os.path.join(HERE, f"{name}_ref.npz"))


def test_all_exports_are_present():
    assert {os.path.basename(f) for f in FILES} == {f"{m}.onnx" for m in ("mlp", "fori_loop", "scan_rnn", "cnn", "attention")}


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_outputs_and_input_jacobian_match_jax(path):
    data, ref = _data(path)
    r = jaccli.input_jacobian(path, np.load(data), dtype="float64", return_result=True)
    np.testing.assert_allclose(r.outputs, ref["outputs"], rtol=1e-5, atol=1e-6)
    assert r.value.shape == ref["input_jacobian"].shape
    assert np.abs(r.value - ref["input_jacobian"]).max() / np.abs(ref["input_jacobian"]).max() < 1e-6


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_per_sample_parameter_jacobian_matches_jax(path):
    """Each initializer that holds a Flax parameter as it is (same values, same layout: a Dense
    kernel (in, out) that Gemm reads as it is) against JAX's per-sample rows: every parameter
    (the fori_loop's among them, which live in the Loop's body) but the CNN's kernels. The
    attention's key bias has a zero derivative (softmax ignores a shift of its row): both are
    negligible against the whole Jacobian there (JAX's rounding noise is 5e-8 of it)."""
    data, ref = _data(path)
    G, cols = jaccli.param_jacobian(path, np.load(data), dtype="float64")
    whole = np.abs(ref["param_jacobian"]).max()
    model = jaccli.load(path)
    sizes = [int(s) for s in ref["param_sizes"]]
    offsets = np.cumsum([0] + sizes)[:-1]
    compared = set()
    for c in cols:
        ours_value = np.asarray(model.initializers[c["name"]], np.float64).ravel()
        for k, (o, s) in enumerate(zip(offsets, sizes)):
            if k not in compared and s == c["size"] and np.allclose(ours_value, ref["param_values"][o:o + s], rtol=1e-6, atol=0):
                ours, theirs = G[:, :, c["offset"]:c["offset"] + s], ref["param_jacobian"][:, :, o:o + s]
                if np.abs(theirs).max() < 1e-6 * whole:
                    assert np.abs(ours).max() < 1e-6 * whole, c["name"]
                else:
                    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-6, c["name"]
                compared.add(k)
                break
    if os.path.basename(path) == "cnn.onnx":  # its two kernels are stored transposed for ONNX's NCHW Conv
        assert len(compared) == len(sizes) - 2
    else:
        assert len(compared) == len(sizes)


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
@pytest.mark.parametrize("kind", ["input", "params"])
def test_jaccli_check_passes(path, kind):
    data, _ = _data(path)
    args = ["check", path, data, "--samples", "2"] + (["--params"] if kind == "params" else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
