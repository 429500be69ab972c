"""Export small Flax (nnx) models to ONNX with jax2onnx, with data and JAX's own Jacobians as
references: another framework's exporter, and another framework's derivatives.

Needs JAX, Flax and jax2onnx (not jaccli's dependencies):

    pip install jax2onnx==0.17.1 flax && python sample_models/export_jax.py

Writes sample_models/jax2onnx/: NAME.onnx, NAME.npy (4 samples) and NAME_ref.npz with the model's
outputs, JAX's input Jacobian (N, *out, *in) from vmap(jacrev), its per-sample parameter
Jacobian (N, n_out, P) over the nnx.Param leaves in tree order, and those leaves' values and
sizes (the test matches them to initializers by value). The tests check jaccli against these
and against onnxruntime without JAX installed.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax2onnx import to_onnx

jax.config.update("jax_enable_x64", True)  # the references in float64; the models stay float32
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jax2onnx")
N = 4


class Mlp(nnx.Module):
    """tanh, exact GELU (Erf), log-softmax."""

    def __init__(self, r):
        self.l1, self.l2, self.l3 = nnx.Linear(12, 16, rngs=r), nnx.Linear(16, 16, rngs=r), nnx.Linear(16, 4, rngs=r)

    def __call__(self, x):
        return nnx.log_softmax(self.l3(nnx.gelu(self.l2(jnp.tanh(self.l1(x))), approximate=False)))


class ForiLoop(nnx.Module):
    """A Linear applied three times by fori_loop: jax2onnx writes a Loop whose body keeps the
    Linear's weights as its own initializers."""

    def __init__(self, r):
        self.l = nnx.Linear(6, 6, rngs=r)

    def __call__(self, x):
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(self.l(h)) + 0.1 * h, x)


class ScanRnn(nnx.Module):
    """An Elman RNN by lax.scan over time (a Loop), then a linear head."""

    def __init__(self, r):
        self.wx, self.wh = nnx.Linear(3, 8, rngs=r), nnx.Linear(8, 8, use_bias=False, rngs=r)
        self.out = nnx.Linear(8, 2, rngs=r)

    def __call__(self, x):  # (N, T, 3)
        def step(h, xt):
            h = jnp.tanh(self.wx(xt) + self.wh(h))
            return h, h

        h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], 8), x.dtype), jnp.swapaxes(x, 0, 1))
        return self.out(h)


class Cnn(nnx.Module):
    """NHWC convolutions, inference BatchNorm, average pooling, SiLU, LayerNorm."""

    def __init__(self, r):
        self.c1 = nnx.Conv(2, 6, (3, 3), rngs=r)
        self.bn = nnx.BatchNorm(6, use_running_average=True, rngs=r)
        self.c2 = nnx.Conv(6, 8, (3, 3), strides=(2, 2), rngs=r)
        self.ln, self.fc = nnx.LayerNorm(8, rngs=r), nnx.Linear(8, 3, rngs=r)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.c1(x)))
        h = nnx.avg_pool(h, window_shape=(2, 2), strides=(2, 2))
        return self.fc(self.ln(nnx.silu(self.c2(h)).mean(axis=(1, 2))))


class Attention(nnx.Module):
    """A pre-norm attention block with RMSNorm and exact GELU, exported at opset 23."""

    def __init__(self, r):
        self.ln = nnx.LayerNorm(8, rngs=r)
        self.mha = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=r)
        self.rms, self.ff, self.out = nnx.RMSNorm(8, rngs=r), nnx.Linear(8, 8, rngs=r), nnx.Linear(8, 3, rngs=r)

    def __call__(self, x):
        h = self.ln(x)
        x = x + self.mha(h, h, h)
        x = x + self.ff(nnx.gelu(self.rms(x), approximate=False))
        return self.out(x.mean(axis=1))


MODELS = {  # name: (module class, per-sample input shape, opset)
    "mlp": (Mlp, (12,), 17),
    "fori_loop": (ForiLoop, (6,), 21),
    "scan_rnn": (ScanRnn, (5, 3), 21),
    "cnn": (Cnn, (10, 10, 2), 17),
    "attention": (Attention, (4, 8), 23),
}


def references(module, x):
    """Outputs, input Jacobian and per-sample parameter Jacobian (N, n_out, P) in float64."""
    graph, params, rest = nnx.split(module, nnx.Param, ...)
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    rest64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, rest)

    def f(p, xi):
        return nnx.merge(graph, p, rest64)(xi[None])[0]

    x64 = jnp.asarray(x, jnp.float64)
    y = jax.vmap(lambda xi: f(params64, xi))(x64)
    J = jax.vmap(jax.jacrev(lambda xi: f(params64, xi)))(x64)
    leaves = jax.tree.leaves(params64)
    G = jax.vmap(jax.jacrev(f), in_axes=(None, 0))(params64, x64)
    n_out = int(np.prod(y.shape[1:]))
    G = np.concatenate([np.asarray(g).reshape(N, n_out, -1) for g in jax.tree.leaves(G)], axis=-1)
    return dict(outputs=np.asarray(y), input_jacobian=np.asarray(J), param_jacobian=G,
                param_values=np.concatenate([np.asarray(a).ravel() for a in leaves]),
                param_sizes=np.array([a.size for a in leaves]))


def main():
    os.makedirs(HERE, exist_ok=True)
    rng = np.random.default_rng(0)
    for seed, (name, (cls, shape, opset)) in enumerate(MODELS.items()):
        module = cls(nnx.Rngs(seed))
        params = nnx.state(module, nnx.Param)  # trained-looking: no two parameters alike (fresh biases are all zero)
        nnx.update(module, jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype), params))
        if name == "cnn":  # running statistics of a trained network, not the fresh 0 and 1
            module.bn.mean.value = jnp.asarray(rng.normal(0, 0.1, 6), jnp.float32)
            module.bn.var.value = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
        x = rng.standard_normal((N,) + shape).astype(np.float32)
        proto = to_onnx(module, [("N",) + shape], opset=opset, input_names=["x"], output_names=["y"])
        with open(os.path.join(HERE, f"{name}.onnx"), "wb") as f:
            f.write(proto.SerializeToString())
        np.save(os.path.join(HERE, f"{name}.npy"), x)
        np.savez(os.path.join(HERE, f"{name}_ref.npz"), **references(module, x))
        print(name, sorted({n.op_type for n in proto.graph.node}))


if __name__ == "__main__":
    main()
