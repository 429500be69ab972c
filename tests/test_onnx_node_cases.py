"""Every operator test case of the onnx package (onnx.backend.test.case.node, some 1,900 small
models with inputs and the outputs onnx's reference implementation gives them): jaccli's
forward kernels give those outputs, or refuse the model in one line (an unsupported operator
or type), never fail otherwise.

The outputs are the reference implementation's, a second oracle beside onnxruntime (which the
rule tests use); where the two disagree jaccli follows onnxruntime, and those cases are listed
with the reason."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import jaccli
from jaccli import walk
from jaccli.errors import JaccliError
from jaccli.plan import Plan

RTOL, ATOL = 1e-3, 1e-4
NARROW = {"bfloat16": 1e-2, "float16": 2e-3}  # outputs of narrow float types: their rounding

# Cases whose outputs jaccli does not reproduce, on purpose.
DIFFERENT = {
    # onnxruntime (the oracle) computes these differently from the reference implementation
    "test_resize_downsample_scales_linear_align_corners": "onnxruntime's align_corners divides by the output's length",
    "test_resize_downsample_scales_cubic_align_corners": "onnxruntime's align_corners divides by the output's length",
    "test_maxunpool_export_with_output_shape": "onnxruntime places the values in the output_shape's rows differently",
    # casts to a narrower float type keep the working precision (float32 or float64): a
    # Jacobian is taken of the model's function, whose rounding has no derivative
    **{f"test_{op}_{src}_to_FLOAT8E5M2{x}": "a float8 cast keeps the working precision (no saturation at its range)"
       for op, x in (("cast", ""), ("castlike", ""), ("castlike", "_expanded")) for src in ("FLOAT", "FLOAT16")},
    **{f"test_cast_e8m0_{src}_to_FLOAT8E8M0": "a float8 cast keeps the working precision" for src in ("FLOAT", "FLOAT16")},
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


def _worst(got, want):
    """Largest |got - want| / (atol + rtol |want|) (at most 1 passes), equal NaNs and infinities
    counting as equal; exact equality for strings and booleans."""
    want, got = np.asarray(want), np.asarray(got)
    if want.dtype.kind in "OSUb" or got.dtype.kind in "OSU":
        return 0.0 if got.shape == want.shape and np.array_equal(got.astype(object), want.astype(object)) else np.inf
    if got.shape != want.shape:
        return np.inf
    rtol = NARROW.get(want.dtype.name, RTOL)
    g, w = got.astype(np.float64), want.astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where((g == w) | (np.isnan(g) & np.isnan(w)), 0.0, np.abs(g - w) / (ATOL + rtol * np.abs(w)))
    return float(np.nanmax(err, initial=0.0))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_gives_the_reference_outputs(case):
    proto = case.model
    inputs, outputs = ([_array(a) for a in part] for part in case.data_sets[0])
    inits = {t.name for t in proto.graph.initializer}
    feeds = dict(zip([v.name for v in proto.graph.input if v.name not in inits], inputs))
    worst = 0.0
    try:
        model = jaccli.load(proto)
        with np.errstate(all="ignore"):
            for v, want in zip(model.outputs, outputs):
                got = walk.primal(Plan(model, v.name, [], np.float32), dict(feeds))[v.name]
                if not isinstance(got, list) and not isinstance(want, list) and want is not None:
                    worst = max(worst, _worst(got, want))
    except JaccliError as e:  # refused in one line: an operator, attribute or type it does not support
        assert "\n" not in str(e)
        return
    if case.name in DIFFERENT:
        assert worst > 1, f"now equal to the reference: drop it from DIFFERENT ({DIFFERENT[case.name]})"
    else:
        assert worst <= 1, worst
