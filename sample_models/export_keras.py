"""Export small Keras models to ONNX with tf2onnx, with data and TensorFlow's own Jacobians as
references: another framework's exporter, and another framework's derivatives.

Needs TensorFlow and tf2onnx (not jaccli's dependencies):

    pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 && python sample_models/export_keras.py

Writes sample_models/tf2onnx/: NAME.onnx (the float32 model as tf2onnx writes it from a
tf.function, opset 15), NAME.npy (4 samples) and NAME_ref.npz with the model's outputs and,
from the same network in float64 (the same weights), TensorFlow's input Jacobian
(N, *out, *in) by GradientTape.batch_jacobian and its per-sample parameter Jacobian
(N, n_out, P) over the trainable weights in Keras's order, with their values and sizes (the
test matches them to initializers by value). The tests check jaccli against these and against
onnxruntime without TensorFlow installed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from keras import layers as L  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf2onnx")
N = 4


def cnn():
    """NHWC: Conv2D, BatchNormalization, max pooling, depthwise and separable convolutions
    (relu6, swish), average pooling, a global mean, softmax."""
    i = keras.Input((12, 12, 2))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same")(i)))
    h = L.MaxPooling2D(2)(h)
    h = L.DepthwiseConv2D(3, padding="same", activation="relu6")(h)
    h = L.SeparableConv2D(8, 3, activation="swish")(h)
    h = L.GlobalAveragePooling2D()(L.AveragePooling2D(2)(h))
    return keras.Model(i, L.Dense(3, activation="softmax")(h)), (12, 12, 2)


def recurrent():
    """LSTM then GRU (reset_after, Keras's default), tanh head."""
    i = keras.Input((6, 3))
    h = L.GRU(5)(L.LSTM(6, return_sequences=True)(i))
    return keras.Model(i, L.Dense(2, activation="tanh")(h)), (6, 3)


def attention():
    """LayerNormalization, MultiHeadAttention, a feed-forward with approximate GELU (exact GELU
    exports as Erfc, which is no ONNX operator), global mean."""
    i = keras.Input((5, 8))
    a = L.MultiHeadAttention(num_heads=2, key_dim=4)(L.LayerNormalization()(i), L.LayerNormalization()(i))
    h = L.Add()([i, a])
    f = L.Dense(8)(L.Dense(16, activation=lambda t: keras.activations.gelu(t, approximate=True))(h))
    return keras.Model(i, L.Dense(3)(L.GlobalAveragePooling1D()(L.Add()([h, f])))), (5, 8)


def conv1d():
    """Causal dilated Conv1D (selu), strided Conv1D (softplus), flatten, sigmoid."""
    i = keras.Input((16, 2))
    h = L.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="selu")(i)
    h = L.Flatten()(L.Conv1D(4, 3, strides=2, activation="softplus")(h))
    return keras.Model(i, L.Dense(2, activation="sigmoid")(h)), (16, 2)


def upsample():
    """A decoder's layers: GroupNormalization, PReLU, Conv2DTranspose, bilinear and nearest
    UpSampling2D, ZeroPadding2D and Cropping2D, a strided convolution, UnitNormalization."""
    i = keras.Input((6, 6, 3))
    h = L.PReLU()(L.GroupNormalization(3)(L.Conv2D(6, 3, padding="same")(i)))
    h = L.UpSampling2D(2, interpolation="bilinear")(L.Conv2DTranspose(4, 3, strides=2, padding="same")(h))
    h = L.Cropping2D(((2, 0), (1, 1)))(L.ZeroPadding2D(((1, 2), (0, 1)))(h))
    h = L.Conv2D(2, 3, strides=3, activation="elu")(L.UpSampling2D(2)(h))
    return keras.Model(i, L.Dense(3)(L.UnitNormalization()(L.Flatten()(h)))), (6, 6, 3)


def sequence_layers():
    """Permute, RepeatVector, a bidirectional LSTM, SimpleRNN, GRU without reset_after, dot-product
    and additive attention."""
    i = keras.Input((5, 4))
    h = L.Dense(6, activation="softsign")(L.Permute((2, 1))(L.Dense(5)(i)))
    r = L.RepeatVector(3)(L.Flatten()(h))
    r = L.GRU(3, reset_after=False)(L.SimpleRNN(5, return_sequences=True)(L.Bidirectional(L.LSTM(4, return_sequences=True))(r)))
    a = L.Flatten()(L.Concatenate()([L.Attention()([L.Dense(4)(i), L.Dense(4)(i)]), L.AdditiveAttention()([L.Dense(4)(i), L.Dense(4)(i)])]))
    return keras.Model(i, L.Dense(2)(L.Concatenate()([r, a]))), (5, 4)


MODELS = {"cnn": cnn, "recurrent": recurrent, "attention": attention, "conv1d": conv1d, "upsample": upsample,
          "sequence_layers": sequence_layers}


def references(make, weights, x):
    """Outputs, input Jacobian and per-sample parameter Jacobian of the network in float64."""
    policy = keras.config.dtype_policy()  # fixed by the first model built: floatx alone no longer changes it
    keras.config.set_dtype_policy("float64")
    try:
        model, _ = make()
    finally:
        keras.config.set_dtype_policy(policy)
    assert all(w.dtype == "float64" for w in model.weights)
    model.set_weights([w.astype(np.float64) for w in weights])
    x64 = tf.constant(x, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x64)
        y = model(x64, training=False)
    J = tape.batch_jacobian(y, x64).numpy()
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            yi = tf.reshape(model(x64[i:i + 1], training=False), [-1])
        jac = tape.jacobian(yi, model.trainable_weights)
        rows.append(np.concatenate([j.numpy().reshape(yi.shape[0], -1) for j in jac], axis=1))
    values = [w.numpy() for w in model.trainable_weights]
    return dict(outputs=y.numpy(), input_jacobian=J, param_jacobian=np.stack(rows),
                param_values=np.concatenate([v.ravel() for v in values]), param_sizes=np.array([v.size for v in values]))


def main():
    os.makedirs(HERE, exist_ok=True)
    rng = np.random.default_rng(0)
    for seed, (name, make) in enumerate(MODELS.items()):
        keras.utils.set_random_seed(seed)
        model, shape = make()
        # trained-looking: no two weights alike (fresh biases are zero), batch norms' statistics not 0 and 1
        model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) if "variance" not in v.path
                           else rng.uniform(0.5, 2.0, w.shape).astype(w.dtype) for w, v in zip(model.get_weights(), model.weights)])
        x = rng.standard_normal((N,) + shape).astype(np.float32)
        spec = [tf.TensorSpec((None,) + shape, tf.float32, name="x")]
        proto, _ = tf2onnx.convert.from_function(tf.function(lambda a: model(a, training=False)), input_signature=spec, opset=15)
        with open(os.path.join(HERE, f"{name}.onnx"), "wb") as f:
            f.write(proto.SerializeToString())
        np.save(os.path.join(HERE, f"{name}.npy"), x)
        np.savez(os.path.join(HERE, f"{name}_ref.npz"), **references(make, model.get_weights(), x))
        print(name, sorted({n.op_type for n in proto.graph.node}))


if __name__ == "__main__":
    main()
