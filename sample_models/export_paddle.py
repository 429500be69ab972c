"""Export small PaddlePaddle models to ONNX with paddle2onnx, with data and Paddle's own
Jacobians as references: another framework's exporter, and another framework's derivatives.

Needs PaddlePaddle and paddle2onnx (not jaccli's dependencies):

    pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 && python sample_models/export_paddle.py

Writes sample_models/paddle2onnx/: NAME.onnx (the float32 model saved by paddle.jit and
converted at opset 13), NAME.npy (4 samples) and NAME_ref.npz with the model's outputs and,
from the same network in float64 (the same weights), Paddle's input Jacobian (N, *out, *in) and
per-sample parameter Jacobian (N, n_out, P) over its trainable parameters in their order, both
by paddle.grad, with the parameters' values and sizes (the test matches them to initializers
by value). The tests check jaccli against these and against onnxruntime without Paddle.
"""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np
import paddle
import paddle.nn.functional as F
import paddle2onnx
from paddle import nn

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paddle2onnx")
N = 4


class Mlp(nn.Layer):
    """hardswish, softmax."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(10, 16), nn.Linear(16, 4)

    def forward(self, x):
        return F.softmax(self.b(F.hardswish(self.a(x))), axis=-1)


class Cnn(nn.Layer):
    """Conv2D, BatchNorm2D, max pooling, a depthwise convolution gating with hardsigmoid, SiLU,
    adaptive average pooling."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2D(2, 6, 3, padding=1), nn.BatchNorm2D(6)
        self.dw, self.pw = nn.Conv2D(6, 6, 3, groups=6, padding=1), nn.Conv2D(6, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.c1(x))), 2)
        h = F.silu(self.pw(F.hardsigmoid(self.dw(h)) * h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Recurrent(nn.Layer):
    """A bidirectional LSTM, then a GRU; the last step."""

    def __init__(self):
        super().__init__()
        self.lstm, self.gru, self.out = nn.LSTM(3, 5, direction="bidirect"), nn.GRU(10, 4), nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.out(h[:, -1])


class Encoder(nn.Layer):
    """A pre-norm transformer encoder layer, mean over the sequence."""

    def __init__(self):
        super().__init__()
        self.enc, self.out = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, normalize_before=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.enc(x).mean(axis=1))


MODELS = {"mlp": (Mlp, [10]), "cnn": (Cnn, [2, 8, 8]), "recurrent": (Recurrent, [5, 3]), "encoder": (Encoder, [4, 8])}


def references(cls, state, x):
    """Outputs, input Jacobian and per-sample parameter Jacobian of the network in float64."""
    paddle.set_default_dtype("float64")
    try:
        net = cls()
    finally:
        paddle.set_default_dtype("float32")
    net.set_state_dict({k: paddle.to_tensor(v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in state.items()})
    # evaluation mode, but for the recurrent layers: Paddle's inference RNN kernel cannot be gone back
    # through ("holds no memory"); with no dropout its training mode computes the same
    net.eval()
    for layer in net.sublayers():
        if isinstance(layer, (nn.LSTM, nn.GRU, nn.SimpleRNN)):
            layer.train()
    params = [p for p in net.parameters() if not p.stop_gradient]
    outputs, J, G = [], [], []
    for xi in x:
        xt = paddle.to_tensor(xi[None].astype(np.float64), stop_gradient=False)
        y = net(xt).flatten()
        rows_x, rows_p = [], []
        for j in range(y.shape[0]):
            grads = paddle.grad(y[j], [xt] + params, retain_graph=True, allow_unused=True)
            rows_x.append(grads[0].numpy()[0])
            rows_p.append(np.concatenate([(g.numpy() if g is not None else np.zeros(p.shape)).ravel() for g, p in zip(grads[1:], params)]))
        outputs.append(y.numpy())
        J.append(np.stack(rows_x))
        G.append(np.stack(rows_p))
    y_shape = net(paddle.to_tensor(x[:1].astype(np.float64))).shape[1:]
    return dict(outputs=np.stack(outputs).reshape((len(x),) + tuple(y_shape)),
                input_jacobian=np.stack(J).reshape((len(x),) + tuple(y_shape) + x.shape[1:]), param_jacobian=np.stack(G),
                param_values=np.concatenate([p.numpy().ravel() for p in params]), param_sizes=np.array([p.size for p in params]))


def main():
    os.makedirs(HERE, exist_ok=True)
    rng = np.random.default_rng(0)
    for seed, (name, (cls, shape)) in enumerate(MODELS.items()):
        paddle.seed(seed)
        net = cls()
        # trained-looking: no two weights alike (fresh biases are zero), batch norms' statistics not 0 and 1
        state = {k: (rng.uniform(0.5, 2.0, v.shape) if k.endswith("_variance") else v.numpy() + rng.normal(0, 0.1, v.shape)).astype(np.float32)
                 if v.dtype == paddle.float32 else v.numpy() for k, v in net.state_dict().items()}
        net.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        net.eval()
        x = rng.standard_normal([N] + shape).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            static = paddle.jit.to_static(net, input_spec=[paddle.static.InputSpec([None] + shape, "float32", "x")], full_graph=True)
            paddle.jit.save(static, os.path.join(tmp, "m"))
            program = next(p for p in glob.glob(os.path.join(tmp, "m.*")) if p.endswith((".json", ".pdmodel")))
            paddle2onnx.export(program, os.path.join(tmp, "m.pdiparams"), os.path.join(HERE, f"{name}.onnx"), opset_version=13)
        np.save(os.path.join(HERE, f"{name}.npy"), x)
        np.savez(os.path.join(HERE, f"{name}_ref.npz"), **references(cls, state, x))
        print(name)


if __name__ == "__main__":
    main()
