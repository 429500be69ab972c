"""Fuzzing, bounded in time: random graphs of supported operators against finite differences, and
mutated models and data files that may only ever raise a JaccliError."""

import os

import numpy as np
import pytest
from gradcheck import our_forward
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli import drivers, parallel
from jaccli.errors import JaccliError

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(os.path.dirname(HERE), "sample_models")
FUZZ = settings(max_examples=int(os.environ.get("JACCLI_FUZZ_EXAMPLES", 150)), deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


class GraphBuilder:
    """Grows a random DAG from input x: every step appends nodes that read earlier values."""

    def __init__(self, draw, rank):
        self.draw, self.rng = draw, np.random.default_rng(draw(st.integers(0, 2**31)))
        self.nodes, self.inits, self.k = [], [], 0
        shape = (4,) if rank == 2 else (2, 5, 5)
        self.values = [("x", shape)]  # (name, per-sample shape)

    def fresh(self):
        self.k += 1
        return f"v{self.k}"

    def param(self, shape, scale=0.5):
        name = f"p{len(self.inits)}"
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(self, arr):
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def add(self, op, inputs, shape, **attrs):
        out = self.fresh()
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        self.values.append((out, shape))
        return out

    def step(self):
        name, shape = self.values[-1]
        choices = ["unary", "binary_param", "binary_value", "softmax", "reduce", "matmul"]
        if len(shape) == 3:
            choices += ["conv", "pool", "batchnorm", "flatten", "transpose"]
        else:
            choices += ["gemm", "concat", "unsqueeze_squeeze"]
        kind = self.draw(st.sampled_from(choices))
        if kind == "unary":
            op = self.draw(st.sampled_from(["Tanh", "Sigmoid", "Softplus", "Neg", "Erf", "Elu", "LeakyRelu", "Relu", "Exp"]))
            if op == "Exp":
                name = self.add("Tanh", [name], shape)
            self.add(op, [name], shape)
        elif kind == "binary_param":
            op = self.draw(st.sampled_from(["Add", "Sub", "Mul"]))
            bshape = self.draw(st.sampled_from([shape[-1:], shape, (1,) * (len(shape) - 1) + shape[-1:]]))
            self.add(op, [name, self.param(bshape)], shape)
        elif kind == "binary_value":  # fan-out: combine with an earlier value of the same shape
            same = [n for n, s in self.values if s == shape]
            other = self.draw(st.sampled_from(same))
            self.add(self.draw(st.sampled_from(["Add", "Mul", "Sub"])), [name, other], shape)
        elif kind == "softmax":
            self.add(self.draw(st.sampled_from(["Softmax", "LogSoftmax"])), [name], shape, axis=-1)
        elif kind == "reduce":
            self.add("ReduceMean", [name], shape[:-1] + (1,), axes=[-1])  # axes an attribute before opset 18
        elif kind == "matmul":
            m = self.draw(st.integers(1, 4))
            self.add("MatMul", [name, self.param((shape[-1], m))], shape[:-1] + (m,))
        elif kind == "gemm":
            m = self.draw(st.integers(1, 5))
            self.add("Gemm", [name, self.param((m, shape[0])), self.param((m,))], (m,), transB=1)
        elif kind == "concat":
            same = [n for n, s in self.values if len(s) == 1]
            other = self.draw(st.sampled_from(same))
            oshape = dict(self.values)[other]
            self.add("Concat", [name, other], (shape[0] + oshape[0],), axis=1)
        elif kind == "unsqueeze_squeeze":
            u = self.add("Unsqueeze", [name, self.const(np.array([1], np.int64))], (1,) + shape)
            self.add("Squeeze", [u, self.const(np.array([1], np.int64))], shape)
        elif kind == "conv":
            c = self.draw(st.integers(1, 3))
            self.add("Conv", [name, self.param((c, shape[0], 3, 3)), self.param((c,))], (c,) + shape[1:], pads=[1, 1, 1, 1])
        elif kind == "pool":
            op = self.draw(st.sampled_from(["MaxPool", "AveragePool"]))
            self.add(op, [name], shape, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        elif kind == "batchnorm":
            c = shape[0]
            self.add("BatchNormalization", [name, self.param((c,)), self.param((c,)),
                                            self.const(self.rng.standard_normal(c).astype(np.float32)),
                                            self.const(self.rng.uniform(0.5, 2, c).astype(np.float32))], shape)
        elif kind == "flatten":
            self.add("Flatten", [name], (int(np.prod(shape)),), axis=1)
        elif kind == "transpose":
            self.add("Transpose", [name], (shape[0], shape[2], shape[1]), perm=[0, 1, 3, 2])

    def model(self):
        name, shape = self.values[-1]
        self.nodes.append(helper.make_node("Identity", [name], ["y"]))
        g = helper.make_graph(self.nodes, "fuzz",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *self.values[0][1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape])], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m


@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "split-over-threads"])
@FUZZ
@given(st.data())
def test_random_graphs_forward_reverse_and_differences_agree(monkeypatch, split, data):
    if split:  # every block split over three threads, however small (see test_parallel.py)
        monkeypatch.setattr(drivers, "_STEP_SECONDS", 0)
        monkeypatch.setattr(parallel, "workers", lambda: 3)
    b = GraphBuilder(data.draw, data.draw(st.sampled_from([2, 4])))
    for _ in range(data.draw(st.integers(1, 6))):
        b.step()
    model = b.model()
    x = b.rng.standard_normal((2, *b.values[0][1]))
    Jf = jaccli.input_jacobian(model, x, mode="forward", dtype="float64", flat=True)
    Jr = jaccli.input_jacobian(model, x, mode="reverse", dtype="float64", flat=True)
    scale = max(np.abs(Jf).max(), 1e-3)
    assert np.abs(Jf - Jr).max() / scale < 1e-10  # <u, J v> = <J^T u, v> for every basis pair
    # differences along a random direction: J v
    v = b.rng.standard_normal(x.shape)
    eps = 1e-6
    fd = (our_forward(model, {"x": x + eps * v}) - our_forward(model, {"x": x - eps * v})) / (2 * eps)
    Jv = np.einsum("noi,ni->no", Jf, v.reshape(2, -1))
    assert np.abs(Jv - fd.reshape(2, -1)).max() / max(np.abs(fd).max(), 1e-4) < 1e-5
    # per-sample parameter Jacobian along a random parameter direction
    if b.inits and any(i.name.startswith("p") for i in b.inits):
        G, cols = jaccli.param_jacobian(model, x, dtype="float64")
        inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in b.inits}
        d = {c["name"]: b.rng.standard_normal(c["shape"]) for c in cols}
        plus = {n: inits[n] + eps * d[n] for n in d}
        minus = {n: inits[n] - eps * d[n] for n in d}
        fd = (our_forward(model, {"x": x}, params=plus) - our_forward(model, {"x": x}, params=minus)) / (2 * eps)
        dv = np.concatenate([d[c["name"]].ravel() for c in cols])
        Gd = G.reshape(2, -1, dv.size) @ dv
        assert np.abs(Gd - fd.reshape(2, -1)).max() / max(np.abs(fd).max(), 1e-4) < 1e-5


def _mutate(raw, draw):
    raw = bytearray(raw)
    for _ in range(draw(st.integers(1, 8))):
        how = draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        i = draw(st.integers(0, max(0, len(raw) - 1)))
        if how == "flip" and raw:
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "truncate":
            raw = raw[:i]
        elif how == "insert":
            raw[i:i] = bytes(draw(st.lists(st.integers(0, 255), max_size=8)))
        elif raw:
            raw[i] = 0
    return bytes(raw)


@FUZZ
@given(st.data(), st.sampled_from(["mlp_classifier", "cnn", "regression_mlp"]))
def test_mutated_models_only_raise_jaccli_errors(tmp_path_factory, data, name):
    with open(os.path.join(MODELS, f"{name}.onnx"), "rb") as f:
        raw = f.read()
    path = tmp_path_factory.mktemp("m") / "m.onnx"
    path.write_bytes(_mutate(raw, data.draw))
    x = np.load(os.path.join(MODELS, f"{name}.npy"))[:2]
    for run in (lambda: jaccli.input_jacobian(str(path), x, max_memory=2**28),
                lambda: jaccli.param_jacobian(str(path), x, max_memory=2**28)):
        try:
            run()
        except JaccliError:
            pass


@FUZZ
@given(st.data(), st.sampled_from(["npy", "npz", "csv"]))
def test_mutated_data_files_only_raise_jaccli_errors(tmp_path_factory, data, fmt):
    from jaccli import io as jio

    x = np.load(os.path.join(MODELS, "mlp_classifier.npy"))[:3]
    folder = tmp_path_factory.mktemp("d")
    f = folder / f"x.{fmt}"
    if fmt == "npy":
        np.save(f, x)
    elif fmt == "npz":
        np.savez(f, x=x)
    else:
        np.savetxt(f, x, delimiter=",")
    f.write_bytes(_mutate(f.read_bytes(), data.draw))
    try:
        arr = jio.read_data(str(f))
        jaccli.input_jacobian(os.path.join(MODELS, "mlp_classifier.onnx"), arr)
    except JaccliError:
        pass
