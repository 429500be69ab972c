"""Every operator test case of the onnx package (onnx.backend.test.case.node, some 1,900 small
models with inputs and the outputs onnx's reference implementation gives them): jaccli's
forward kernels give those outputs (as scripts/coverage.py compares them: output_error), or
refuse the model in one line that names what is not supported (an operator, attribute or
type), never fail otherwise.

The outputs are the reference implementation's, a second oracle beside onnxruntime (which the
rule tests use); where the two disagree jaccli follows onnxruntime, and those cases are listed
with the reason."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import jaccli
from jaccli.errors import JaccliError, UnsupportedOpError

from coverage import forward_error, wrap_one_sample  # the latter: the whole input as one sample

SMALL = 200  # entries of an input differentiated, and of the output, at most

# Cases whose outputs jaccli does not reproduce, on purpose.
DIFFERENT = {
    # onnxruntime (the oracle) computes these differently from the reference implementation
    "test_resize_downsample_scales_linear_align_corners": "onnxruntime's align_corners divides by the output's length",
    "test_resize_downsample_scales_cubic_align_corners": "onnxruntime's align_corners divides by the output's length",
    "test_maxunpool_export_with_output_shape": "onnxruntime places the values in the output_shape's rows differently",
    # a cast to float8 E8M0 (powers of two) rounds to the nearest (ml_dtypes'), not up as round_mode
    # asks, and has no zero, which saturation would make the smallest power
    **{f"test_cast_e8m0_{src}_to_FLOAT8E8M0": "E8M0: rounded to the nearest power, zero to NaN" for src in ("FLOAT", "FLOAT16")},
}


def _cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case import node

        return node.collect_testcases(None)


CASES = _cases()
assert not set(DIFFERENT) - {c.name for c in CASES}, set(DIFFERENT) - {c.name for c in CASES}


def _array(a):
    return numpy_helper.to_array(a) if isinstance(a, onnx.TensorProto) else a


def _feeds(case):
    """The case's inputs by name (its graph inputs that are not initializers)."""
    inits = {t.name for t in case.model.graph.initializer}
    names = [v.name for v in case.model.graph.input if v.name not in inits]
    return dict(zip(names, (_array(a) for a in case.data_sets[0][0])))


def _small_floats(case, feeds, at_least):
    """The names of the case's float inputs of at most SMALL entries; the test is skipped with
    fewer than `at_least`, or with a sequence among the inputs."""
    floats = [k for k, v in feeds.items()
              if isinstance(v, np.ndarray) and v.dtype in (np.float32, np.float64) and 0 < v.size <= SMALL]
    if len(floats) < at_least or case.name in DIFFERENT or not all(isinstance(v, np.ndarray) for v in feeds.values()):
        pytest.skip(f"fewer than {at_least} float inputs of at most {SMALL} entries, or a sequence input")
    return floats


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_gives_the_reference_outputs(case):
    try:
        worst = forward_error(case.model, _feeds(case), [_array(a) for a in case.data_sets[0][1]])
    except UnsupportedOpError as e:  # refused in one line: an operator, attribute or type it does not support
        assert "\n" not in str(e)
        return
    if case.name in DIFFERENT:
        assert worst > 1, f"now equal to the reference: drop it from DIFFERENT ({DIFFERENT[case.name]})"
    else:
        assert worst <= 1, worst




@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_and_reverse_mode_agree(case):
    """The input Jacobian of each case's first float input (of up to SMALL entries, at its first
    float output), as one sample, in float64: forward and reverse mode give the same numbers
    (NaN where the derivative is undefined in both). Their rules are written apart, so a wrong
    one shows, as the softmax of a row masked whole did (NaN in reverse mode only)."""
    feeds = _feeds(case)
    floats = _small_floats(case, feeds, 1)
    feeds = {k: v[None] for k, v in feeds.items()}
    try:
        model = jaccli.load(wrap_one_sample(case.model))
        of = model.output(None).name
        with np.errstate(all="ignore"):
            J = [jaccli.input_jacobian(model, feeds, wrt=floats[0], of=of, dtype=np.float64, mode=mode, flat=True)
                 for mode in ("forward", "reverse")]
    except JaccliError as e:
        assert "\n" not in str(e)
        return
    if J[0].size > SMALL * SMALL:
        return
    scale = max(np.abs(J[0][np.isfinite(J[0])]).max(initial=0.0), 1e-300)
    np.testing.assert_allclose(J[1], J[0], rtol=1e-9, atol=1e-12 * scale, equal_nan=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_parameter_is_an_input_by_another_path(case):
    """Each case's second float input (of up to SMALL entries) made a parameter: the
    per-sample parameter Jacobian of the one sample (the rules' per-sample cotangents, Ctx.keep)
    equals the input Jacobian with respect to that input (their plain ones), in float64."""
    feeds = _feeds(case)
    w = _small_floats(case, feeds, 2)[1]
    feeds = {k: v[None].astype(np.float32) if k == w else v[None] for k, v in feeds.items()}
    as_param = wrap_one_sample(case.model)
    as_param.graph.input.remove(next(v for v in as_param.graph.input if v.name == w))
    as_param.graph.initializer.append(numpy_helper.from_array(feeds[w], w))
    try:
        model = jaccli.load(wrap_one_sample(case.model))
        of = model.output(None).name
        with np.errstate(all="ignore"):
            J = jaccli.input_jacobian(model, feeds, wrt=w, of=of, dtype=np.float64, mode="reverse", flat=True)
            G, _ = jaccli.param_jacobian(as_param, {k: v for k, v in feeds.items() if k != w}, params=[w], of=of,
                                         dtype=np.float64)
    except JaccliError as e:
        assert "\n" not in str(e)
        return
    scale = max(np.abs(J[np.isfinite(J)]).max(initial=0.0), 1e-300)
    np.testing.assert_allclose(np.reshape(G, -1), np.reshape(J, -1), rtol=1e-9, atol=1e-12 * scale, equal_nan=True)
