# Every target makes its own virtual environment; nothing relies on what was installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench coverage models clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/jaccli inspect sample_models/mlp_classifier.onnx
	$(BIN)/jaccli input sample_models/mlp_classifier.onnx sample_models/mlp_classifier.npy -o out/J.npy
	$(BIN)/jaccli params sample_models/regression_mlp.onnx sample_models/regression_mlp.npy -o out/G.npy
	$(BIN)/jaccli check sample_models/cnn.onnx sample_models/cnn.npy

test: $(STAMP)
	$(BIN)/python -m pytest

# jaccli against torch.func (PyTorch only here: the `bench` extra); results in bench/results.md.
# Some machines set OPENBLAS_CORETYPE (and OPENBLAS_L2_SIZE) for old OpenBLAS builds; the
# benchmark runs numpy's OpenBLAS as it ships, with the kernels it picks for this CPU (the
# table names them). Tests keep the machine's setting.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python bench/bench.py

# jaccli on every test model the onnx package ships; a table on the terminal and in out/coverage.md
coverage: $(STAMP)
	$(BIN)/python scripts/coverage.py --report out/coverage.md

# Rebuild the committed sample models and data (deterministic; no PyTorch needed).
models: $(STAMP)
	$(BIN)/python sample_models/make_models.py

clean:
	rm -rf $(VENV) out
