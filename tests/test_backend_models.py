"""The onnx package's backend test models (onnx/backend/test/data: the pytorch-converted,
pytorch-operator and simple sets; `make coverage` runs the zoo's light models too): each passes
scripts/coverage.py's checks (forward against the stored outputs, input Jacobian against
onnxruntime's differences) or is refused in one line. Never a crash: the probe's changes have
broken one of these before anything else noticed."""

import pytest

from coverage import discover, run_one

MODELS = [m for m in discover() if m[0] != "light"]


@pytest.mark.parametrize("cat, name, path, data", MODELS, ids=[f"{m[0]}/{m[1]}" for m in MODELS])
def test_backend_model(cat, name, path, data):
    row = run_one(cat, name, path, data)
    assert row["status"] in ("pass", "refused", "unsupported"), row
    if row["status"] != "pass":
        assert row["detail"] and "\n" not in row["detail"], row
