"""ai.onnx.ml operators that scikit-learn exports (skl2onnx) use for regression and class scores."""

from __future__ import annotations

import math

import numpy as np

from . import rule
from .elementwise import _erf, _sigmoid
from ..errors import UnsupportedOpError

ML = "ai.onnx.ml"


@rule("Scaler", since=1, domain=ML)
class Scaler:
    """Y = (X - offset) * scale, per feature (the last axis)."""

    def forward(X, *, offset=None, scale=None):
        off = np.asarray(offset if offset is not None else [0.0], X.dtype if X.dtype.kind == "f" else np.float32)
        sc = np.asarray(scale if scale is not None else [1.0], off.dtype)
        return (X.astype(off.dtype) - off) * sc

    def jvp(cx, Xdot, *, offset=None, scale=None):
        return Xdot * np.asarray(scale if scale is not None else [1.0], Xdot.dtype)

    def vjp(cx, Ybar, *, offset=None, scale=None):
        return (Ybar * np.asarray(scale if scale is not None else [1.0], Ybar.dtype),)


@rule("Normalizer", since=1, domain=ML)
class Normalizer:
    """Y = each row of X divided by its MAX, L1 or L2 norm."""

    def forward(X, *, norm="MAX"):
        return X / _row_norm(X, norm)

    def jvp(cx, Xdot, *, norm="MAX"):
        X, Y = cx.x[0], cx.y[0]
        n = _row_norm(X, norm)
        return Xdot / n - Y * (_norm_partial(X, n, norm) * Xdot).sum(axis=-1, keepdims=True) / n

    def vjp(cx, Ybar, *, norm="MAX"):
        X, Y = cx.x[0], cx.y[0]
        n = _row_norm(X, norm)
        return (Ybar / n - _norm_partial(X, n, norm) * (Ybar * Y).sum(axis=-1, keepdims=True) / n,)


def _row_norm(X, norm):
    if norm == "MAX":
        return X.max(axis=-1, keepdims=True)
    if norm == "L1":
        return np.abs(X).sum(axis=-1, keepdims=True)
    if norm == "L2":
        return np.sqrt((X * X).sum(axis=-1, keepdims=True))
    raise UnsupportedOpError(f"Normalizer norm {norm!r} is not supported")


def _norm_partial(X, n, norm):
    """d norm / dX per element of a row."""
    if norm == "MAX":
        first = np.zeros_like(X)
        np.put_along_axis(first, X.argmax(axis=-1)[..., None], 1, axis=-1)
        return first
    if norm == "L1":
        return np.sign(X)
    return X / n


def _post(Z, post_transform):
    """The score transform of the linear models (NONE, LOGISTIC, SOFTMAX, SOFTMAX_ZERO, PROBIT)."""
    if post_transform == "NONE":
        return Z
    if post_transform == "LOGISTIC":
        return _sigmoid(Z)
    if post_transform in ("SOFTMAX", "SOFTMAX_ZERO"):
        E = np.exp(Z - Z.max(axis=-1, keepdims=True))
        if post_transform == "SOFTMAX_ZERO":
            E = np.where(Z == 0, 0, E)
        return E / E.sum(axis=-1, keepdims=True)
    if post_transform == "PROBIT":
        with np.errstate(invalid="ignore", divide="ignore"):
            P = math.sqrt(2) * _erfinv(2 * Z - 1)
        return np.where(Z <= 0, -np.inf, np.where(Z >= 1, np.inf, P)).astype(Z.dtype)  # the quantiles of 0 and 1
    raise UnsupportedOpError(f"post_transform {post_transform!r} is not supported")


def _post_derivative(S, D, post_transform):
    """The derivative of the score transform applied to D; its Jacobian is symmetric (diagonal,
    or diag(S) - S S^T for softmax), so it serves tangents and cotangents alike."""
    if post_transform == "NONE":
        return D
    if post_transform == "LOGISTIC":
        return S * (1 - S) * D
    if post_transform in ("SOFTMAX", "SOFTMAX_ZERO"):
        return S * (D - (S * D).sum(axis=-1, keepdims=True))
    if post_transform == "PROBIT":  # d/dz sqrt(2) erfinv(2z - 1) = sqrt(2 pi) exp(S^2 / 2)
        return math.sqrt(2 * math.pi) * np.exp(S * S / 2) * D
    raise UnsupportedOpError(f"derivative of post_transform {post_transform!r} is not supported")


def _erfinv(y):
    """Inverse error function by Newton steps from a close start (PROBIT only)."""
    y = np.clip(y, -1 + 1e-12, 1 - 1e-12)
    x = np.sign(y) * np.sqrt(-np.log((1 - y) * (1 + y)))
    for _ in range(30):
        x = x - (_erf(x).astype(np.float64) - y) / (2 / math.sqrt(math.pi) * np.exp(-x * x))
    return x


def _linear(X, coefficients, intercepts, n):
    """Z = X @ W^T + b with W (n, n_features) from the flat coefficients."""
    X2 = X.reshape(X.shape[0], -1) if X.ndim != 2 else X
    W = np.asarray(coefficients, X.dtype).reshape(n, -1)
    b = np.asarray(intercepts if intercepts is not None else np.zeros(n), X.dtype)
    return X2 @ W.T + b, W


@rule("Imputer", since=1, domain=ML)
class Imputer:
    """Y = X, with each element equal to the replaced value (NaN matches NaN, scikit-learn's
    missing value) set to its feature's imputed value (features on the last axis; one value
    for all of them); floats by the float attributes, integers by the int64 ones. The imputed
    elements are constants: their derivative is zero."""

    def forward(X, *, imputed_value_floats=None, imputed_value_int64s=None, replaced_value_float=0.0,
                replaced_value_int64=0):
        values, missing = _imputed(X, imputed_value_floats, imputed_value_int64s, replaced_value_float, replaced_value_int64)
        return np.where(missing, values, X)

    def jvp(cx, Xdot, **attrs):
        return np.where(_imputed(cx.x[0], **attrs)[1], Xdot.dtype.type(0), Xdot)

    def vjp(cx, Ybar, **attrs):
        return (np.where(_imputed(cx.x[0], **attrs)[1], Ybar.dtype.type(0), Ybar),)


def _imputed(X, imputed_value_floats=None, imputed_value_int64s=None, replaced_value_float=0.0, replaced_value_int64=0):
    """The imputed values (per feature, or one) in X's type, and the mask of elements to replace."""
    floats = X.dtype.kind == "f"
    values = imputed_value_floats if floats else imputed_value_int64s
    if not values:
        raise UnsupportedOpError(f"Imputer: no imputed values for {'float' if floats else 'integer'} input")
    values = np.asarray(values, X.dtype)
    if values.size not in (1, X.shape[-1]):
        raise UnsupportedOpError(f"Imputer: {values.size} imputed values for {X.shape[-1]} features")
    replaced = replaced_value_float if floats else replaced_value_int64
    missing = np.isnan(X) if floats and np.isnan(replaced) else X == np.asarray(replaced, X.dtype)
    return values, missing


@rule("Binarizer", since=1, domain=ML)
class Binarizer:
    """Y = 1 where X > threshold, else 0: piecewise constant, its derivative zero."""

    piecewise_constant = True

    def forward(X, *, threshold=0.0):
        return (X > threshold).astype(X.dtype)

    def jvp(cx, Xdot, *, threshold=0.0):
        return np.zeros_like(Xdot)

    def vjp(cx, Ybar, *, threshold=0.0):
        return (np.zeros_like(Ybar),)


@rule("OneHotEncoder", since=1, domain=ML)
class OneHotEncoder:
    """Y (*X.shape, categories) = 1.0 where X is that category (a float X as its integer part), else
    0; a value of no category is all zeros (with `zeros`, else refused). Categorical columns of a
    scikit-learn pipeline: no derivative flows through them."""

    nondiff = (0,)

    def forward(X, *, cats_int64s=None, cats_strings=None, zeros=1):
        if cats_int64s is not None and len(cats_int64s):
            cats, keys = np.asarray(cats_int64s, np.int64), (X.astype(np.int64) if X.dtype.kind == "f" else X)
        else:
            cats, keys = np.asarray([c.decode() if isinstance(c, bytes) else c for c in cats_strings or []], object), X
        Y = (np.asarray(keys)[..., None] == cats).astype(np.float32)
        if not zeros and not Y.any(axis=-1).all():
            raise ValueError("a value is none of the categories (zeros=0)")
        return Y


@rule("LabelEncoder", since=1, domain=ML)
class LabelEncoder:
    """Y = the value paired with X's key, else the default: a lookup of strings, integers or
    floats; a repeated key's first value. Opset 1 maps strings to their index in
    classes_strings and indices to those strings. scikit-learn's IsolationForest maps its
    trees' leaves to path lengths with it. Piecewise constant in a float X: its derivative
    is zero."""

    piecewise_constant = True

    def forward(X, **attrs):
        return _label_encode(X, False, **attrs)

    def jvp(cx, Xdot, **attrs):
        return np.zeros_like(Xdot)

    def vjp(cx, Ybar, **attrs):
        return (np.zeros_like(Ybar),)


@rule("LabelEncoder", since=4, domain=ML)
class LabelEncoder4(LabelEncoder):
    """As opset 2, with keys and values as tensors too; a NaN key matches a NaN input."""

    def forward(X, **attrs):
        return _label_encode(X, True, **attrs)


def _label_encode(X, nan, classes_strings=None, default_int64=-1, default_string="_Unused", default_float=-0.0,
                  keys_floats=None, keys_int64s=None, keys_strings=None, values_floats=None, values_int64s=None,
                  values_strings=None, keys_tensor=None, values_tensor=None, default_tensor=None):
    if classes_strings is not None and len(classes_strings):  # opset 1
        classes = _texts(classes_strings)
        if X.dtype.kind in "OSU":
            return _lookup(X, classes, np.arange(len(classes)), np.int64(default_int64))
        return _lookup(X, np.arange(len(classes)), classes, default_string)
    keys = next((k for k in (keys_tensor, keys_floats, keys_int64s, keys_strings) if k is not None and len(k)), None)
    if values_tensor is not None and len(values_tensor):
        values = np.asarray(values_tensor).ravel()
        values = _texts(values) if values.dtype.kind in "OSU" else values
        default = np.asarray(default_tensor).ravel()[0] if default_tensor is not None else (
            "_Unused" if values.dtype.kind == "O" else -1 if values.dtype.kind in "iu" else -0.0)
    elif values_floats is not None and len(values_floats):
        values, default = np.asarray(values_floats, _out_dtype(X)), default_float
    elif values_int64s is not None and len(values_int64s):
        values, default = np.asarray(values_int64s, np.int64), default_int64
    else:
        values, default = _texts(values_strings or []), default_string
    if keys is None or len(keys) != len(values):
        raise ValueError("LabelEncoder needs keys and values of the same length")
    keys = np.asarray(keys).ravel()
    Y = _lookup(X, _texts(keys) if keys.dtype.kind in "OSU" else keys, values, default, nan)
    return Y.astype(_out_dtype(X)) if Y.dtype.kind == "f" else Y


def _texts(v):
    return np.asarray([x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in np.ravel(v)], object)


def _lookup(X, keys, values, default, nan=False):
    """values[i] where X equals keys[i] (the first such i, as onnxruntime takes a repeated key;
    with nan, a NaN key matches a NaN), else default; of X's shape."""
    X = np.asarray(X)
    if X.dtype.kind in "OSU" or keys.dtype.kind == "O":
        table = dict(zip(keys.tolist()[::-1], values.tolist()[::-1]))
        flat = [table.get(x.decode() if isinstance(x, bytes) else x, default) for x in X.ravel().tolist()]
        return np.asarray(flat, values.dtype).reshape(X.shape)
    order = np.argsort(keys, kind="stable")  # NaN keys last
    sk = keys[order]
    pos = np.minimum(np.searchsorted(sk, X), len(sk) - 1)  # the first of equal keys; a NaN's, the first NaN key
    hit = sk[pos] == X
    if nan and sk.dtype.kind == "f" and X.dtype.kind == "f":
        hit |= np.isnan(sk[pos]) & np.isnan(X)
    return np.where(hit, values[order][pos], np.asarray(default, values.dtype))


@rule("ArrayFeatureExtractor", since=1, domain=ML)
class ArrayFeatureExtractor:
    """Z = X[..., indices], the indices flattened; a 1-D X gives one row (onnxruntime's shape).
    scikit-learn exports PolynomialFeatures' columns and a nearest-neighbours model's targets
    with it."""

    nondiff = (1,)
    keeps = True

    def forward(X, indices):
        Z = np.take(X, np.asarray(indices, np.int64).ravel(), axis=-1)
        return Z.reshape(1, -1) if X.ndim == 1 else Z

    def jvp(cx, Xdot, _=None):
        X, idx = cx.x
        Z = np.take(Xdot, np.asarray(idx, np.int64).ravel(), axis=-1)
        return Z.reshape(Z.shape[: Z.ndim - 1] + (1, -1)) if X.ndim == 1 else Z

    def vjp(cx, Zbar):
        """Each selected column's cotangent added into its column of X: a product with the
        selection's one-hot matrix, repeated indices summed. Per sample (a table X, such as a
        nearest-neighbours model's targets, indexed by per-sample indices (N, ...)): sample n's
        indices are the n-th run of the flattened ones, its cotangent its own product."""
        X, idx = cx.x
        lead = cx.lead(Zbar)
        head, F = Zbar.shape[:lead], X.shape[-1]
        idx = np.asarray(idx, np.int64) % F
        runs = idx.reshape(idx.shape[0], -1) if cx.keep[0] else idx.reshape(1, -1)  # (samples or 1, k)
        R, k = runs.shape
        Zr = np.moveaxis(Zbar.reshape(head + X.shape[:-1] + (R, k)), -2, lead)  # (*head, R, *X.shape[:-1], k)
        Xb = np.empty(Zr.shape[:-1] + (F,), Zbar.dtype)
        for r, ix in enumerate(runs):
            E = np.zeros((k, F), Zbar.dtype)
            np.add.at(E, (np.arange(k), ix), 1)
            Xb[(slice(None),) * lead + (r,)] = Zr[(slice(None),) * lead + (r,)] @ E
        return (Xb if cx.keep[0] else Xb[(slice(None),) * lead + (0,)]), None


def _weights(x, attrs, second="intercepts"):
    """(flat coefficients, intercepts (or rho) or None) from a node's inputs `x`: its inputs 1 and
    2 where load made them parameters (model.ml_coefficients_as_inputs), else its attributes."""
    C = x[1] if len(x) > 1 and x[1] is not None else attrs.get("coefficients")
    b = x[2] if len(x) > 2 and x[2] is not None else attrs.get(second)
    return C, b


def _asks(cx):
    """(need, keep) of a node's three inputs (X, coefficients, intercepts), False where absent."""
    pad = (False,) * (3 - len(cx.need))
    return tuple(cx.need) + pad, tuple(cx.keep) + (False,) * (3 - len(cx.keep))


def _linear_tangent(cx, Xdot, Cdot, bdot, W):
    """Zdot of Z = X W^T + b (W from the flat coefficients) along the tangents given."""
    X = cx.x[0].reshape(len(cx.x[0]), -1)
    Zdot = None if Xdot is None else Xdot.reshape(Xdot.shape[:Xdot.ndim - cx.x[0].ndim] + X.shape) @ W.T.astype(Xdot.dtype)
    if Cdot is not None:
        Wdot = Cdot.reshape(Cdot.shape[:-1] + W.shape)  # (T, rows, F)
        Zdot = _plus(Zdot, np.matmul(X.astype(Wdot.dtype), np.swapaxes(Wdot, -1, -2)))  # (T, N, rows)
    if bdot is not None:
        Zdot = _plus(Zdot, np.broadcast_to(bdot[..., None, :], bdot.shape[:-1] + (len(X), bdot.shape[-1])))
    return Zdot


def _plus(a, b):
    return b if a is None else a + b


def _linear_cotangents(cx, Zbar, W):
    """(Xbar, Cbar, bbar) from Zbar (*lead, N, rows): the flat coefficients' and the intercepts'
    per sample where kept (cx.keep), else summed over the samples; None where not needed."""
    X = cx.x[0].reshape(len(cx.x[0]), -1)
    need, keep = _asks(cx)
    Xbar = Zbar @ W.astype(Zbar.dtype) if need[0] else None
    Cbar = bbar = None
    if need[1]:
        G = (Zbar[..., :, :, None] * X.astype(Zbar.dtype)[:, None, :]).reshape(Zbar.shape[:-1] + (-1,))  # (*lead, N, rows*F)
        Cbar = G if keep[1] else G.sum(axis=-2)
    if need[2]:
        bbar = Zbar if keep[2] else Zbar.sum(axis=-2)
    return Xbar, Cbar, bbar


@rule("LinearRegressor", since=1, domain=ML)
class LinearRegressor:
    """Y = post_transform(X @ coefficients^T + intercepts), `targets` outputs. The coefficients and
    intercepts are inputs 1 and 2 where load made them parameters."""

    keeps = True

    def forward(X, C=None, b=None, *, coefficients=None, intercepts=None, post_transform="NONE", targets=1):
        C, b = _weights((X, C, b), {"coefficients": coefficients, "intercepts": intercepts})
        Z, _ = _linear(X.astype(np.result_type(X.dtype, np.float32)), C, b, targets)
        return _post(Z, post_transform)

    def jvp(cx, Xdot, Cdot=None, bdot=None, *, post_transform="NONE", targets=1, **attrs):
        W = np.asarray(_weights(cx.x, attrs)[0], cx.x[0].dtype).reshape(targets, -1)
        return _post_derivative(cx.y[0], _linear_tangent(cx, Xdot, Cdot, bdot, W), post_transform)

    def vjp(cx, Ybar, *, post_transform="NONE", targets=1, **attrs):
        W = np.asarray(_weights(cx.x, attrs)[0], cx.x[0].dtype).reshape(targets, -1)
        return _linear_cotangents(cx, _post_derivative(cx.y[0], Ybar, post_transform), W)


@rule("LinearClassifier", since=1, domain=ML)
class LinearClassifier:
    """(label, scores): scores = post_transform(X @ coefficients^T + intercepts); label not
    differentiated. The coefficients and intercepts are inputs 1 and 2 where load made them
    parameters."""

    n_diff_outputs = 2
    keeps = True

    def forward(X, C=None, b=None, *, coefficients=None, classlabels_ints=None, classlabels_strings=None,
                intercepts=None, multi_class=0, post_transform="NONE"):
        C, b = _weights((X, C, b), {"coefficients": coefficients, "intercepts": intercepts})
        labels = classlabels_ints if classlabels_ints is not None else classlabels_strings
        n = len(labels)
        Xf = X.astype(np.result_type(X.dtype, np.float32))
        W = np.asarray(C).reshape(-1, Xf.reshape(len(Xf), -1).shape[-1])
        Z, _ = _linear(Xf, C, b, W.shape[0])
        S = _post(Z, post_transform)
        if W.shape[0] == 1 and n == 2:  # binary: one column of scores s, reported as [1 - s, s]
            S2 = np.concatenate([1 - S, S], axis=-1)
            winner = (S2[:, 1] > (0 if post_transform == "NONE" else 0.5)).astype(int)
            S = S2
        else:
            winner = S.argmax(axis=-1)
        label = np.asarray(labels)[winner]
        return label, S

    def jvp(cx, Xdot, Cdot=None, bdot=None, **attrs):
        Z, W = _scores_matrix(cx, attrs)
        post = attrs.get("post_transform", "NONE")
        D = _post_derivative(_post(Z, post), _linear_tangent(cx, Xdot, Cdot, bdot, W), post)
        if W.shape[0] == 1 and cx.y[1].shape[-1] == 2:
            D = np.concatenate([-D, D], axis=-1)
        return None, D

    def vjp(cx, Lbar, Sbar, **attrs):
        if Sbar is None:
            return (None,) * len(cx.x)
        Z, W = _scores_matrix(cx, attrs)
        post = attrs.get("post_transform", "NONE")
        if W.shape[0] == 1 and cx.y[1].shape[-1] == 2:
            Sbar = Sbar[..., 1:] - Sbar[..., :1]
        return _linear_cotangents(cx, _post_derivative(_post(Z, post), Sbar, post), W)


def _scores_matrix(cx, attrs):
    X = cx.x[0]
    C, b = _weights(cx.x, attrs)
    F = X.reshape(len(X), -1).shape[-1]
    W = np.asarray(C, X.dtype).reshape(-1, F)
    Z, _ = _linear(X, C, b, W.shape[0])
    return Z, W


@rule("SVMRegressor", since=1, domain=ML)
class SVMRegressor:
    """Y (N, 1) = sum_j coefficients_j K(X, support_vector_j) + rho (n_supports > 0), or
    X . coefficients + rho (n_supports = 0); kernels LINEAR (x.s), POLY (gamma x.s + coef0)^degree,
    SIGMOID tanh(gamma x.s + coef0), RBF exp(-gamma |x - s|^2), with kernel_params (gamma, coef0,
    degree), as onnxruntime computes them. one_class gives the sign, +-1, whose derivative is zero.
    The coefficients and rho are inputs 1 and 2 where load made them parameters."""

    keeps = True

    def forward(X, C=None, R=None, *, coefficients=None, kernel_params=None, kernel_type="LINEAR", n_supports=0,
                one_class=0, post_transform="NONE", rho=None, support_vectors=None):
        coefficients, rho = _weights((X, C, R), {"coefficients": coefficients, "rho": rho}, "rho")
        Xf = X.astype(np.result_type(X.dtype, np.float32))
        Y = _svm_score(Xf, coefficients, kernel_params, kernel_type, n_supports, rho, support_vectors)
        return np.where(Y > 0, 1, -1).astype(Y.dtype) if one_class else Y

    def jvp(cx, Xdot, Cdot=None, Rdot=None, **attrs):
        attrs = _svm_weights(cx, attrs)
        Ydot = None
        if Xdot is not None:
            Ydot = (Xdot * _svm_gradient(cx.x[0], **attrs).astype(Xdot.dtype)).sum(axis=-1, keepdims=True)
        flat = 0 if attrs.get("one_class") else 1  # the sign's derivative is zero
        if Cdot is not None:  # (T, n): parameters carry no sample axis
            Ydot = _plus(Ydot, flat * np.einsum("nv,tv->tn", _svm_features(cx.x[0], attrs).astype(Cdot.dtype), Cdot)[..., None])
        if Rdot is not None:  # (T, 1)
            Ydot = _plus(Ydot, flat * np.broadcast_to(Rdot[:, None, :], (len(Rdot),) + cx.y[0].shape))
        return Ydot

    def vjp(cx, Ybar, **attrs):
        attrs = _svm_weights(cx, attrs)
        need, keep = _asks(cx)
        Xbar = Ybar * _svm_gradient(cx.x[0], **attrs).astype(Ybar.dtype) if need[0] else None
        flat = 0 if attrs.get("one_class") else 1
        Cbar = Rbar = None
        if need[1]:
            G = flat * Ybar * _svm_features(cx.x[0], attrs).astype(Ybar.dtype)  # (*lead, N, n)
            Cbar = G if keep[1] else G.sum(axis=-2)
        if need[2]:
            Rbar = flat * (Ybar if keep[2] else Ybar.sum(axis=-2))  # (*lead, N, 1) or (*lead, 1)
        return Xbar, Cbar, Rbar


def _svm_weights(cx, attrs):
    """The attributes with the coefficients and rho that the node reads (its inputs where they are parameters)."""
    coefficients, rho = _weights(cx.x, attrs, "rho")
    return {**attrs, "coefficients": coefficients, "rho": rho}


def _svm_features(X, attrs):
    """What the coefficients multiply, per sample: K(X, support vectors) (N, n), or X itself (N, F)
    for the linear (liblinear) form."""
    n_supports = attrs.get("n_supports", 0)
    if not n_supports:
        return X
    kind, gamma, coef0, degree = _svm_kernel_parts(attrs.get("kernel_params"), attrs.get("kernel_type", "LINEAR"), n_supports)
    S = np.asarray(attrs["support_vectors"], X.dtype).reshape(n_supports, -1)
    return _svm_kernel(X, S, kind, gamma, coef0, degree)[0]


def _svm_kernel_parts(kernel_params, kernel_type, n_supports):
    gamma, coef0, degree = (list(kernel_params) + [0.0, 0.0, 0.0])[:3] if kernel_params is not None else (0.0, 0.0, 0.0)
    kind = (kernel_type.decode() if isinstance(kernel_type, bytes) else kernel_type or "LINEAR").upper()
    if kind not in ("LINEAR", "POLY", "RBF", "SIGMOID"):
        raise UnsupportedOpError(f"SVM kernel_type {kind} is not supported")
    return (kind if n_supports else "LINEAR"), gamma, coef0, degree


def _svm_kernel(X, S, kind, gamma, coef0, degree):
    """K(X, support vectors) (N, n) and the kernel's inner value U (the squared distance for RBF,
    the scaled and shifted dot product otherwise), as onnxruntime computes them."""
    if kind == "RBF":
        U = np.maximum((X * X).sum(-1, keepdims=True) - 2 * X @ S.T + (S * S).sum(-1), 0)
        return np.exp(-gamma * U), U
    U = X @ S.T
    if kind == "LINEAR":
        return U, U
    U = gamma * U + coef0
    return (U ** degree if kind == "POLY" else np.tanh(U)), U


def _svm_kernel_gradient(X, C, S, kind, gamma, coef0, degree):
    """d(K(X, S) @ C)/dX per sample, for coefficients C (n, P): (N, P, F)."""
    K, U = _svm_kernel(X, S, kind, gamma, coef0, degree)
    if kind == "RBF":  # d/dx exp(-gamma |x - s|^2) = -2 gamma K (x - s)
        W = K[:, :, None] * C  # (N, n, P)
        return -2 * gamma * (X[:, None, :] * W.sum(1)[:, :, None] - np.einsum("nvp,vf->npf", W, S))
    if kind == "LINEAR":
        return np.broadcast_to((C.T @ S)[None], (X.shape[0], C.shape[1], X.shape[1]))
    dK = degree * U ** (degree - 1) if kind == "POLY" else 1 - np.tanh(U) ** 2
    return gamma * np.einsum("nv,vp,vf->npf", dK, C, S)


def _svm_score(X, coefficients, kernel_params, kernel_type, n_supports, rho, support_vectors):
    """Y (N, 1) of an SVM regressor."""
    kind, gamma, coef0, degree = _svm_kernel_parts(kernel_params, kernel_type, n_supports)
    b = float(rho[0]) if rho is not None and len(rho) else 0.0
    coef = np.asarray(coefficients, X.dtype)
    if not n_supports:  # liblinear: the coefficients are the weights
        return X @ coef[:, None] + b
    S = np.asarray(support_vectors, X.dtype).reshape(n_supports, -1)
    return _svm_kernel(X, S, kind, gamma, coef0, degree)[0] @ coef[:, None] + b


def _svm_gradient(X, *, coefficients, kernel_params=None, kernel_type="LINEAR", n_supports=0, one_class=0,
                  post_transform="NONE", rho=None, support_vectors=None):
    """dY/dX per sample: (N, F)."""
    if one_class:
        return np.zeros_like(X)
    kind, gamma, coef0, degree = _svm_kernel_parts(kernel_params, kernel_type, n_supports)
    coef = np.asarray(coefficients, X.dtype)
    if not n_supports:
        return np.broadcast_to(coef, X.shape)
    S = np.asarray(support_vectors, X.dtype).reshape(n_supports, -1)
    return _svm_kernel_gradient(X, coef[:, None], S, kind, gamma, coef0, degree)[:, 0]


@rule("SVMClassifier", since=1, domain=ML)
class SVMClassifier:
    """(label, scores) of a kernel SVM classifier (scikit-learn's SVC): for each pair of classes
    i < j, score = sum over i's support vectors of coef[j-1] K(x, s) + sum over j's of coef[i]
    K(x, s) + rho, one column per pair; two classes give (-score, score). With probabilities
    (prob_a, prob_b; SVC(probability=True)) each pair's score becomes Platt's pairwise
    probability, and the classes' probabilities couple them (see _coupled). The label (by votes)
    is piecewise constant; the scores are smooth in X. Post transforms and the linear
    (liblinear) form are refused."""

    n_diff_outputs = None

    def forward(X, **attrs):
        Xf = X.astype(np.result_type(X.dtype, np.float32))
        C, rho, S, kernel, labels, k, platt = _svc(Xf.dtype, attrs)
        Z = _svm_kernel(Xf, S, *kernel)[0] @ C + rho  # (N, pairs)
        votes = np.zeros((len(Xf), k), np.int64)
        for p, (i, j) in enumerate(_pairs(k)):
            np.add.at(votes, (np.arange(len(Xf)), np.where(Z[:, p] > 0, i, j)), 1)
        label = labels[np.argmax(votes, axis=1)]  # a positive pair score is a vote for the first class of the pair
        if platt is not None:
            return label, _coupled(Z, *platt, k)[0]
        return label, (np.concatenate([-Z, Z], axis=1) if k == 2 else Z)

    def jvp(cx, Xdot, **attrs):
        G, L = _svc_gradient(cx.x[0], attrs)  # (N, P, F), and the probabilities' (N, k, P) or None
        D = np.einsum("...nf,npf->...np", Xdot, G.astype(Xdot.dtype))
        if L is not None:
            return None, np.einsum("...np,nkp->...nk", D, L.astype(D.dtype))
        return None, (np.concatenate([-D, D], axis=-1) if G.shape[1] == 1 else D)  # two classes: (-s, s)

    def vjp(cx, _labels, Zbar, **attrs):
        G, L = _svc_gradient(cx.x[0], attrs)
        if L is not None:
            Zbar = np.einsum("...nk,nkp->...np", Zbar, L.astype(Zbar.dtype))
        elif G.shape[1] == 1:  # two classes: (-s, s)
            Zbar = Zbar[..., 1:] - Zbar[..., :1]
        return (np.einsum("...np,npf->...nf", Zbar, G.astype(Zbar.dtype)),)


def _pairs(k):
    return [(i, j) for i in range(k - 1) for j in range(i + 1, k)]


def _svc(dtype, attrs):
    """An SVMClassifier's pairwise coefficients (vectors, pairs), rho, support vectors, kernel,
    labels, class count, and Platt's (prob_a, prob_b) per pair or None."""
    if attrs.get("post_transform", "NONE") != "NONE":
        raise UnsupportedOpError(f"SVMClassifier with post_transform {attrs['post_transform']} is not supported")
    per_class = [int(v) for v in attrs.get("vectors_per_class") or []]
    if not per_class:
        raise UnsupportedOpError("SVMClassifier in its linear form (no support vectors) is not supported")
    labels = np.asarray(attrs.get("classlabels_ints") or attrs.get("classlabels_strings") or [])
    k, V = len(per_class), sum(per_class)
    kernel = _svm_kernel_parts(attrs.get("kernel_params"), attrs.get("kernel_type", "LINEAR"), V)
    coef = np.asarray(attrs["coefficients"], np.float64).reshape(k - 1, V)
    start = np.concatenate([[0], np.cumsum(per_class)])
    pairs = _pairs(k)
    C = np.zeros((V, len(pairs)))
    for p, (i, j) in enumerate(pairs):
        C[start[i]:start[i + 1], p] = coef[j - 1, start[i]:start[i + 1]]
        C[start[j]:start[j + 1], p] = coef[i, start[j]:start[j + 1]]
    S = np.asarray(attrs["support_vectors"], dtype).reshape(V, -1)
    platt = None
    if attrs.get("prob_a") is not None and len(attrs["prob_a"]):
        platt = tuple(np.asarray(attrs[a], dtype)[: len(pairs)] for a in ("prob_a", "prob_b"))
    return C.astype(dtype), np.asarray(attrs["rho"], dtype)[: len(pairs)], S, kernel, labels, k, platt


def _coupled(Z, A, B, k, slopes=False):
    """The k classes' probabilities (N, k) from the pair scores Z (N, pairs), as onnxruntime
    computes them (after libsvm): each pair's Platt probability r = 1 - logistic(A z + B),
    clipped to [1e-7, 1 - 1e-7], is class i's over class j (and 1 - r class j's over i); then
    Wu, Lin and Weng's coupling, p minimizing p'Qp over the simplex, by their fixed-point
    sweeps from p = 1/k until the optimality gap is under 0.005/k (at most 100 sweeps, each
    sample stopping on its own). With slopes, also dp/dz (N, k, pairs): the same sweeps
    carried in forward mode, one direction per pair, so the derivative is that of the
    probabilities computed (not of the exact minimum they approach)."""
    N, m = Z.shape
    dt = Z.dtype
    r = 1 - _sigmoid(Z * A + B)
    lo, hi = dt.type(1e-7), 1 - dt.type(1e-7)
    dr = np.where((r > lo) & (r < hi), -r * (1 - r) * A, 0)  # (N, m)
    r = np.clip(r, lo, hi)
    R = np.zeros((N, k, k), dt)  # R[i, j]: class i's probability over class j
    dR = np.zeros((N, m, k, k), dt) if slopes else None  # one direction per pair
    for p, (i, j) in enumerate(_pairs(k)):
        R[:, i, j], R[:, j, i] = r[:, p], 1 - r[:, p]
        if slopes:
            dR[:, p, i, j], dR[:, p, j, i] = dr[:, p], -dr[:, p]
    Rt = np.swapaxes(R, -1, -2)
    eye = np.eye(k, dtype=bool)
    Q = np.where(eye, (Rt * Rt).sum(-1)[..., None], -Rt * R)  # Q[i, i] = sum_j R[j, i]^2, Q[i, j] = -R[j, i] R[i, j]
    P = np.full((N, k), 1 / k, dt)
    if slopes:
        dRt = np.swapaxes(dR, -1, -2)
        dQ = np.where(eye, 2 * (Rt[:, None] * dRt).sum(-1)[..., None], -(dRt * R[:, None] + Rt[:, None] * dR))
        dP = np.zeros((N, m, k), dt)
    done = np.zeros(N, bool)
    eps = dt.type(0.005 / k)
    for _ in range(100):
        Qp = np.einsum("nij,nj->ni", Q, P)
        pQp = (P * Qp).sum(-1)
        done |= np.abs(Qp - pQp[:, None]).max(-1) < eps
        if done.all():
            break
        p0 = P.copy()
        if slopes:
            dp0 = dP.copy()
            dQp = np.einsum("nmij,nj->nmi", dQ, P) + np.einsum("nij,nmj->nmi", Q, dP)
            dpQp = (dP * Qp[:, None]).sum(-1) + (P[:, None] * dQp).sum(-1)
        for i in range(k):
            qii, qpi = Q[:, i, i], Qp[:, i]
            diff = (pQp - qpi) / qii
            P[:, i] += diff
            pQp_new = (pQp + diff * (diff * qii + 2 * qpi)) / (1 + diff) ** 2
            Qp_new = (Qp + diff[:, None] * Q[:, i]) / (1 + diff)[:, None]
            P /= (1 + diff)[:, None]
            if slopes:  # the same steps' derivatives, for every direction
                dd = ((dpQp - dQp[:, :, i]) - diff[:, None] * dQ[:, :, i, i]) / qii[:, None]
                dP[:, :, i] += dd
                dnum = dpQp + dd * (diff * qii + 2 * qpi)[:, None] + diff[:, None] * (dd * qii[:, None] + diff[:, None] * dQ[:, :, i, i] + 2 * dQp[:, :, i])
                dpQp = (dnum - pQp_new[:, None] * 2 * (1 + diff)[:, None] * dd) / ((1 + diff) ** 2)[:, None]
                dQp = (dQp + dd[..., None] * Q[:, None, i] + diff[:, None, None] * dQ[:, :, i] - Qp_new[:, None] * dd[..., None]) / (1 + diff)[:, None, None]
                dP = (dP - P[:, None] * dd[..., None]) / (1 + diff)[:, None, None]
            pQp, Qp = pQp_new, Qp_new
        P = np.where(done[:, None], p0, P)  # a sample that had converged keeps its probabilities
        if slopes:
            dP = np.where(done[:, None, None], dp0, dP)
    if not slopes:
        return P, None
    return P, np.swapaxes(dP, -1, -2)  # (N, k, pairs)


def _svc_gradient(X, attrs):
    """d(pair scores)/dX (N, pairs, F), and with probabilities d(probabilities)/d(pair scores)
    (N, k, pairs), else None."""
    C, rho, S, kernel, _, k, platt = _svc(X.dtype, attrs)
    K = None
    if platt is not None:
        Z = _svm_kernel(X, S, *kernel)[0] @ C + rho
        K = _coupled(Z, *platt, k, slopes=True)[1]
    return _svm_kernel_gradient(X, C, S, *kernel), K


# ---- tree ensembles: piecewise constant, so their derivative is zero wherever it exists ---------

_BRANCH = {
    "BRANCH_LEQ": np.less_equal, "BRANCH_LT": np.less, "BRANCH_GTE": np.greater_equal, "BRANCH_GT": np.greater,
    "BRANCH_EQ": np.equal, "BRANCH_NEQ": np.not_equal,
}


def _floats(attrs, name):
    """A tree ensemble's float attribute, or its *_as_tensor form (ml opset 3); empty if neither."""
    v = attrs.get(name)
    if v is None or (not isinstance(v, np.ndarray) and not len(v)):
        v = attrs.get(name + "_as_tensor")
    return np.asarray(v if v is not None else [], np.float64).ravel()


def _node_index(attrs):
    """{(tree id, node id): the node's position in the attributes}"""
    return {(t, n): i for i, (t, n) in enumerate(zip(attrs["nodes_treeids"], attrs["nodes_nodeids"]))}


def _leaf_weights(attrs, kind, n, n_nodes):
    """Each node's weights (n_nodes, n) for the targets or classes (kind "target" or "class"),
    and whether it has one for each: a leaf's (tree, node, id, weight) entries summed."""
    W, has = np.zeros((n_nodes, n)), np.zeros((n_nodes, n), bool)
    index = _node_index(attrs)
    for t, node, j, w in zip(attrs[f"{kind}_treeids"], attrs[f"{kind}_nodeids"], attrs[f"{kind}_ids"],
                             _floats(attrs, f"{kind}_weights")):
        W[index[(t, node)], j] += w
        has[index[(t, node)], j] = True
    return W, has


def _tree_leaves(X, attrs):
    """The leaf (node index) each sample reaches in each tree, (N, trees), and the node count:
    the nodes of ml opsets 1-3 (leaves among them, children by (tree, node id)) walked as
    TreeEnsemble's, each leaf a node whose branches both lead to itself."""
    tree = list(attrs["nodes_treeids"])
    modes = list(attrs["nodes_modes"])
    bad = sorted(set(modes) - set(_BRANCH) - {"LEAF"})
    if bad:
        raise UnsupportedOpError(f"tree nodes of mode {bad[0]} are not supported")
    index = _node_index(attrs)
    leaf = np.array([m == "LEAF" for m in modes])
    true_i = np.array([i if leaf[i] else index[(t, c)] for i, (t, c) in enumerate(zip(tree, attrs["nodes_truenodeids"]))])
    false_i = np.array([i if leaf[i] else index[(t, c)] for i, (t, c) in enumerate(zip(tree, attrs["nodes_falsenodeids"]))])
    children = set(true_i[~leaf].tolist()) | set(false_i[~leaf].tolist())
    roots = np.array([i for i in range(len(modes)) if i not in children])
    mode = np.array([list(_BRANCH).index(m) if m in _BRANCH else 0 for m in modes])
    leaves = _reached_leaves(X.reshape(X.shape[0], -1), roots, np.asarray(attrs["nodes_featureids"], np.int64), mode,
                             _floats(attrs, "nodes_values"), true_i, leaf[true_i], false_i, leaf[false_i],
                             attrs.get("nodes_missing_value_tracks_true"), None)
    return leaves, len(modes)


@rule("TreeEnsembleRegressor", since=1, domain=ML)
class TreeEnsembleRegressor:
    """Y (N, n_targets) = the trees' leaf weights aggregated (SUM, AVERAGE, MIN, MAX) plus
    base_values (a gradient-boosted or random-forest regressor, as skl2onnx and onnxmltools write
    XGBoost's and LightGBM's). Piecewise constant in X: its derivative is zero wherever it
    exists, and the summary says so; what flows around it (a VotingRegressor's other models) is
    differentiated. Linear in its weights, inputs 1 and 2 where load made them parameters
    (target_weights, base_values): a sample's gradient is 1 at each entry of the leaves it
    reaches (1/trees for AVERAGE; the leaf picked, for MIN and MAX), through the post transform."""

    piecewise_constant = True
    keeps = True

    def forward(X, TW=None, BV=None, **attrs):
        attrs = _tree_weights((X, TW, BV), attrs, "target")
        leaves, n_nodes = _tree_leaves(X, attrs)
        n = int(attrs.get("n_targets", 1))
        W, has = _leaf_weights(attrs, "target", n, n_nodes)
        S, H = W[leaves], has[leaves]  # (N, trees, n)
        how = attrs.get("aggregate_function", "SUM")
        if how == "SUM":
            Z = S.sum(axis=1)
        elif how == "AVERAGE":
            Z = S.sum(axis=1) / leaves.shape[1]
        elif how in ("MIN", "MAX"):
            pick = np.min if how == "MIN" else np.max
            Z = np.where(H.any(axis=1), pick(np.where(H, S, np.inf if how == "MIN" else -np.inf), axis=1), 0.0)
        else:
            raise UnsupportedOpError(f"tree aggregate_function {how!r} is not supported")
        base = _floats(attrs, "base_values")
        if base.size == n:
            Z = Z + base
        return _post(Z.astype(_out_dtype(X)), _tree_post(attrs, n))

    def jvp(cx, Xdot, TWdot=None, BVdot=None, **attrs):
        return _tree_tangent(cx, Xdot, TWdot, BVdot, attrs, "target", 0, _tree_post(attrs, cx.y[0].shape[-1]))

    def vjp(cx, Ybar, **attrs):
        return _tree_cotangents(cx, Ybar, attrs, "target", 0, _tree_post(attrs, cx.y[0].shape[-1]))


def _tree_tangent(cx, Xdot, Wdot, Bdot, attrs, kind, out, post):
    """The tangent of a tree ensemble's output `out` (its scores): its weights' part through
    the post transform; X's part is zero."""
    Zdot = _tree_weights_tangent(cx, Wdot, Bdot, attrs, kind, cx.y[out])
    if Zdot is None:
        return np.zeros(Xdot.shape[: Xdot.ndim - cx.x[0].ndim] + cx.y[out].shape, Xdot.dtype)
    return _post_derivative(cx.y[out], Zdot, post)


def _tree_cotangents(cx, Ybar, attrs, kind, out, post):
    """(X's, the leaf weights', the base values') cotangents of a tree ensemble from its output
    `out`'s, Ybar: X's zero; the weights' through the post transform (_tree_weights_cotangents)."""
    need, _ = _asks(cx)
    Xbar = np.zeros(Ybar.shape[: cx.lead(Ybar, out)] + cx.x[0].shape, Ybar.dtype) if need[0] else None
    if not (need[1] or need[2]):
        return Xbar, None, None
    return (Xbar,) + _tree_weights_cotangents(cx, _post_derivative(cx.y[out], Ybar, post), attrs, kind)


def _tree_weights(x, attrs, kind):
    """A tree ensemble's attributes with the leaf weights (target_ or class_weights, for `kind`)
    and base values it reads: its inputs 1 and 2 where load made them parameters."""
    W, B = _weights(x, {}, "base_values")
    return {**attrs, **({f"{kind}_weights": W} if W is not None else {}), **({"base_values": B} if B is not None else {})}


def _base_columns(attrs, kind, n):
    """How many leading columns of the aggregate the base values are added to: a regressor's all
    n where it has n of them (else none), a classifier's (of more than two classes) as many as
    it has."""
    size = _floats(attrs, "base_values").size
    return size if kind == "class" else (n if size == n else 0)


def _tree_weights_tangent(cx, Wdot, Bdot, attrs, kind, y):
    """The aggregate's tangent (T, N, n) along the leaf weights' and base values' tangents (no
    sample axis: parameters), before the post transform; None where neither is given."""
    attrs = _tree_weights(cx.x, attrs, kind)
    Zdot = None
    if Wdot is not None:
        hit, ids, scale = _tree_slopes(cx.x[0], attrs, kind)
        Zdot = np.zeros((len(Wdot),) + y.shape, Wdot.dtype)
        for j in range(y.shape[-1]):  # each column's entries
            Zdot[..., j] = scale * (hit[:, ids == j].astype(Wdot.dtype) @ Wdot[:, ids == j].T).T
    if Bdot is not None:
        m = _base_columns(attrs, kind, y.shape[-1])
        Bz = np.zeros((len(Bdot),) + y.shape, Bdot.dtype)
        Bz[..., :m] = Bdot[:, None, :m]
        Zdot = _plus(Zdot, Bz)
    return Zdot


def _tree_weights_cotangents(cx, Zbar, attrs, kind):
    """The leaf weights' and base values' cotangents from the aggregate's, Zbar (*lead, N, n):
    per sample where kept (Ctx.keep). Entry e of sample n takes its column's cotangent where
    its leaf is reached."""
    need, keep = _asks(cx)
    attrs = _tree_weights(cx.x, attrs, kind)
    Wbar = Bbar = None
    if need[1]:
        hit, ids, scale = _tree_slopes(cx.x[0], attrs, kind)
        Wbar = Zbar[..., ids] * (hit * Zbar.dtype.type(scale))  # (*lead, N, entries)
        Wbar = Wbar if keep[1] else Wbar.sum(axis=-2)
    if need[2]:
        m = _base_columns(attrs, kind, Zbar.shape[-1])
        Bbar = np.zeros(Zbar.shape[:-1] + (cx.x[2].size,), Zbar.dtype)
        Bbar[..., :m] = Zbar[..., :m]
        Bbar = Bbar if keep[2] else Bbar.sum(axis=-2)
    return Wbar, Bbar


def _tree_post(attrs, n):
    """The post transform onnxruntime applies: of a single target, PROBIT only."""
    post = attrs.get("post_transform", "NONE")
    return post if n != 1 or post == "PROBIT" else "NONE"


def _tree_slopes(X, attrs, kind):
    """d(aggregate)/d(leaf weights) per sample, as (hit, ids, scale): the aggregate's column
    ids[e] has slope `scale` in entry e where hit[n, e], the entry's leaf being one that sample n
    reaches (for MIN and MAX, the one picked for that column), and 0 elsewhere; scale is
    1/trees for AVERAGE, else 1. `kind`: "target" (a regressor's entries) or "class"."""
    leaves, n_nodes = _tree_leaves(X, attrs)
    index = _node_index(attrs)
    node = np.array([index[(t, k)] for t, k in zip(attrs[f"{kind}_treeids"], attrs[f"{kind}_nodeids"])], np.int64)
    ids = np.asarray(attrs[f"{kind}_ids"], np.int64)
    N = len(leaves)
    how = attrs.get("aggregate_function", "SUM") if kind == "target" else "SUM"
    if how in ("MIN", "MAX"):  # the tree each (sample, target) takes its weight from
        W, has = _leaf_weights(attrs, "target", int(attrs.get("n_targets", 1)), n_nodes)
        S, H = W[leaves], has[leaves]  # (N, trees, n)
        fill = np.inf if how == "MIN" else -np.inf
        t = (np.argmin if how == "MIN" else np.argmax)(np.where(H, S, fill), axis=1)  # (N, n)
        picked = np.where(H.any(axis=1), np.take_along_axis(leaves, t, axis=1), -1)  # its leaf, or none
        hit = picked[:, ids] == node  # (N, E)
    else:
        reached = np.zeros((N, n_nodes), bool)
        reached[np.arange(N)[:, None], leaves] = True
        hit = reached[:, node]
    return hit, ids, 1 / leaves.shape[1] if how == "AVERAGE" else 1.0


@rule("TreeEnsembleClassifier", since=1, domain=ML)
class TreeEnsembleClassifier:
    """(label, scores) of a tree ensemble classifier (random forests, gradient boosting): the
    class weights of the leaves summed, base_values, onnxruntime's conventions for two classes
    (one weighted class gives (1 - p, p) or (-s, s)) and its post transforms. Piecewise
    constant: the scores pass zero, and the summary says so."""

    piecewise_constant = True
    n_diff_outputs = None
    keeps = True

    def forward(X, CW=None, BV=None, **attrs):
        attrs = _tree_weights((X, CW, BV), attrs, "class")
        leaves, n_nodes = _tree_leaves(X, attrs)
        labels = attrs.get("classlabels_int64s")
        labels = np.asarray(labels if labels is not None and len(labels) else attrs["classlabels_strings"])
        k = len(labels)
        W, has = _leaf_weights(attrs, "class", k, n_nodes)
        S, H = W[leaves].sum(axis=1), has[leaves].any(axis=1)  # (N, k)
        base = _floats(attrs, "base_values")
        post = attrs.get("post_transform", "NONE")
        if k > 2:
            S[:, :base.size] += base
            H[:, :base.size] = True
            label = labels[np.argmax(np.where(H, S, -np.inf), axis=1)]
            return label, _post(S, post).astype(_out_dtype(X))
        all_positive = bool((_floats(attrs, "class_weights") >= 0).all())
        return _binary_trees(S, H, base, post, labels, len(set(attrs["class_ids"])) == 1, all_positive, _out_dtype(X))

    def jvp(cx, Xdot, CWdot=None, BVdot=None, **attrs):
        _binary_weights_refused(cx, CWdot is not None or BVdot is not None)
        return None, _tree_tangent(cx, Xdot, CWdot, BVdot, attrs, "class", 1, attrs.get("post_transform", "NONE"))

    def vjp(cx, _labels, Zbar, **attrs):
        _binary_weights_refused(cx, any(_asks(cx)[0][1:]))
        return _tree_cotangents(cx, Zbar, attrs, "class", 1, attrs.get("post_transform", "NONE"))


def _binary_weights_refused(cx, asked):
    """The class weights of a two-class tree classifier are not differentiated: onnxruntime's
    conventions for two classes (one weighted class, base values) shape its scores case by case;
    load leaves them attributes (model.ml_coefficients_as_inputs)."""
    if asked and cx.y[1].shape[-1] <= 2:
        raise UnsupportedOpError("TreeEnsembleClassifier: the derivative with respect to the class weights of two classes "
                                 "is not supported")


_AGGREGATES = {0: "AVERAGE", 1: "SUM", 2: "MIN", 3: "MAX"}
# post_transform as onnxruntime reads it: 1 LOGISTIC and 2 SOFTMAX (the spec swaps those two); and, as for
# TreeEnsembleRegressor, of a single target it applies PROBIT only
_POSTS = {0: "NONE", 1: "LOGISTIC", 2: "SOFTMAX", 3: "SOFTMAX_ZERO", 4: "PROBIT"}
_MODES = list(_BRANCH.values())  # TreeEnsemble's nodes_modes 0-5, in _BRANCH's order; 6 is set membership
_MEMBER = 6


@rule("TreeEnsemble", since=5, domain=ML)
class TreeEnsemble:
    """Y (N, n_targets): the leaves the trees reach, each weighting one target, aggregated (SUM,
    AVERAGE, MIN, MAX) and post-transformed: ai.onnx.ml opset 5's tree ensemble, which holds
    its leaves apart from its branch nodes (BRANCH_LEQ ... BRANCH_NEQ, and BRANCH_MEMBER on the
    sets listed in membership_values, apart by NaN: categories, whose members onnxruntime matches
    exactly where they are integers, and inconsistently between them; here exactly, as the spec). Piecewise constant: its derivative is zero,
    and the summary says so, as for TreeEnsembleRegressor."""

    piecewise_constant = True
    jvp, vjp = TreeEnsembleRegressor.jvp, TreeEnsembleRegressor.vjp

    def forward(X, *, aggregate_function=1, leaf_targetids, leaf_weights, membership_values=None, n_targets,
                nodes_falseleafs, nodes_falsenodeids, nodes_featureids, nodes_hitrates=None,
                nodes_missing_value_tracks_true=None, nodes_modes, nodes_splits, nodes_trueleafs, nodes_truenodeids,
                post_transform=0, tree_roots):
        X2 = X.reshape(X.shape[0], -1).astype(np.float64)
        leaves = _reached_leaves(X2, np.asarray(tree_roots, np.int64), np.asarray(nodes_featureids, np.int64),
                                 np.asarray(nodes_modes).astype(np.int64).ravel(), np.asarray(nodes_splits, np.float64).ravel(),
                                 np.asarray(nodes_truenodeids, np.int64), np.asarray(nodes_trueleafs, bool),
                                 np.asarray(nodes_falsenodeids, np.int64), np.asarray(nodes_falseleafs, bool),
                                 nodes_missing_value_tracks_true, membership_values)
        weights = np.asarray(leaf_weights, np.float64).ravel()[leaves]  # (N, trees)
        targets = np.asarray(leaf_targetids, np.int64)[leaves]
        how = _AGGREGATES.get(int(aggregate_function))
        rows = np.broadcast_to(np.arange(len(X2))[:, None], targets.shape)
        if how in ("SUM", "AVERAGE"):
            Z = np.zeros((len(X2), int(n_targets)))
            np.add.at(Z, (rows, targets), weights)
            Z = Z / leaves.shape[1] if how == "AVERAGE" else Z
        elif how in ("MIN", "MAX"):
            Z = np.full((len(X2), int(n_targets)), np.inf if how == "MIN" else -np.inf)
            (np.minimum if how == "MIN" else np.maximum).at(Z, (rows, targets), weights)
            Z[np.isinf(Z)] = 0.0  # a target no leaf weights
        else:
            raise UnsupportedOpError(f"tree aggregate_function {aggregate_function!r} is not supported")
        post = _POSTS.get(int(post_transform))
        if post is None:
            raise UnsupportedOpError(f"post_transform {post_transform!r} is not supported")
        if int(n_targets) == 1 and post != "PROBIT":
            post = "NONE"
        return _post(Z, post).astype(X.dtype if X.dtype.kind == "f" else np.float32)


def _reached_leaves(X, roots, feature, modes, splits, true_id, true_leaf, false_id, false_leaf, missing, members):
    """The leaf index each sample reaches in each tree, (N, trees), following the nodes from the roots."""
    if ((modes < 0) | (modes > _MEMBER)).any():
        raise UnsupportedOpError(f"tree nodes of mode {int(modes[(modes < 0) | (modes > _MEMBER)][0])} are not supported")
    missing = np.zeros(len(modes), bool) if missing is None or not len(missing) else np.asarray(missing, bool)
    sets = {}
    if (modes == _MEMBER).any():  # each member node's set, in node order, the sets apart by NaN
        values = np.asarray(members if members is not None else [], np.float64).ravel()
        ends = np.flatnonzero(np.isnan(values))
        starts = np.concatenate([[0], ends[:-1] + 1])
        nodes = np.flatnonzero(modes == _MEMBER)
        if len(ends) != len(nodes):
            raise UnsupportedOpError("TreeEnsemble: membership_values must hold one NaN-ended set per BRANCH_MEMBER node")
        sets = {int(n): values[a:b] for n, a, b in zip(nodes, starts, ends)}
    rows = np.arange(len(X))[:, None]
    cur = np.broadcast_to(roots, (len(X), len(roots))).copy()
    leaf = np.zeros(cur.shape, np.int64)
    done = np.zeros(cur.shape, bool)
    for _ in range(len(modes) + 1):
        if done.all():
            break
        x, mode = X[rows, feature[cur]], modes[cur]
        go = np.zeros(cur.shape, bool)
        for k, compare in enumerate(_MODES):
            at = mode == k
            if at.any():
                go[at] = compare(x[at], splits[cur[at]])
        for n, values in sets.items():  # categories: exact membership (onnxruntime agrees on integers only)
            at = cur == n
            if at.any():
                go[at] = np.isin(x[at], values)
        go |= np.isnan(x) & missing[cur]
        nxt = np.where(go, true_id[cur], false_id[cur])
        now_leaf = np.where(go, true_leaf[cur], false_leaf[cur]) & ~done
        leaf[now_leaf] = nxt[now_leaf]
        done |= now_leaf
        cur = np.where(done, cur, nxt)
    if not done.all():
        raise UnsupportedOpError("TreeEnsemble: a tree does not reach a leaf (its nodes make a cycle)")
    return leaf


def _out_dtype(X):
    return X.dtype if X.dtype.kind == "f" else np.float32


def _binary_trees(S, H, base, post, labels, binary_case, all_positive, dtype):
    """Two classes as onnxruntime's tree classifier finalizes them: the scores, their second
    column made from the first where only one class is weighted, and the label from the
    positive class's weight."""
    s0, s1, h0, h1 = S[:, 0].copy(), S[:, 1].copy(), H[:, 0], H[:, 1].copy()
    one = ~h1  # rows with a single score (the second class unweighted), unless base values say otherwise
    mode = np.full(len(S), -1)
    if base.size == 2:
        s1 = np.where(h1, base[1] + s0, s1 + base[1])
        s0 = np.where(h1, -s1, s0 + base[0])
        one[:] = False
    elif base.size == 1:
        s0 = s0 + base[0]
    else:
        mode[:] = 3
    pos = np.where(h1 & ~one, s1, np.where(h0, s0, 0.0))
    s0, s1 = np.where(h0, s0, 0.0), np.where(h1, s1, 0.0)  # a class no leaf weighted reads as 0, base or not
    if binary_case:
        mode = np.where(pos > 0.5, 0, 1) if all_positive else np.where(pos > 0, 2, 3)
        label = labels[np.where((pos > 0.5) if all_positive else (pos > 0), 1, 0)]
    else:
        label = np.where(pos > 0, 1, 0).astype(labels.dtype) if labels.dtype.kind in "iu" else labels[np.where(pos > 0, 1, 0)]
    Z = np.zeros((len(S), 2))
    two = ~one
    if two.any():
        Z[two] = _post(np.stack([s0[two], s1[two]], axis=1), post)
    if one.any():
        s = s0[one]
        if post == "PROBIT":
            Z[one, 0] = _post(s, "PROBIT")
        else:
            # modes 0, 1 (weights all positive): (1 - s, s); 2, 3: (-s, s), or with LOGISTIC
            # (sigmoid(-s), sigmoid(s)); no mode (-1): the score alone, in column 0
            m, logistic = mode[one], post == "LOGISTIC"
            negative = np.where(m <= 1, 1 - s, _sigmoid(-s) if logistic else -s)
            positive = np.where((m >= 2) & logistic, _sigmoid(s), s)
            Z[one, 0] = np.where(m < 0, s, negative)
            Z[one, 1] = np.where(m < 0, 0, positive)
    return label, Z.astype(dtype)


@rule("FeatureVectorizer", since=1, domain=ML)
class FeatureVectorizer:
    """Y = the inputs side by side, each flattened to (N, columns) (a 1-D one is one row) and cut
    or zero-padded to its entry of inputdimensions: what Spark ML's VectorAssembler and
    onnxmltools' pipelines write. Linear: each input's tangent goes to its columns."""

    def forward(*X, inputdimensions):
        dtype = np.result_type(np.float32, *[x.dtype for x in X if x.dtype.kind == "f"])
        rows = [x.reshape(_fv_rows(x)) for x in X]
        Y = np.zeros((rows[0].shape[0], int(sum(inputdimensions))), dtype)
        for (a, b), r in zip(_fv_spans(inputdimensions), rows):
            n = min(b - a, r.shape[1])
            Y[:, a:a + n] = r[:, :n]
        return Y

    def jvp(cx, *dots, inputdimensions):
        Y = cx.y[0]
        out = None
        for (a, b), x, d in zip(_fv_spans(inputdimensions), cx.x, dots):
            if d is None:
                continue
            lead = d.shape[: d.ndim - x.ndim]
            r = d.reshape(lead + _fv_rows(x))
            if out is None:
                out = np.zeros(lead + Y.shape, d.dtype)
            n = min(b - a, r.shape[-1])
            out[..., a:a + n] = r[..., :n]
        return out

    def vjp(cx, Ybar, *, inputdimensions):
        lead = Ybar.shape[: cx.lead(Ybar)]
        bars = []
        for (a, b), x, need in zip(_fv_spans(inputdimensions), cx.x, cx.need):
            if not need:
                bars.append(None)
                continue
            cols = x.reshape(_fv_rows(x)).shape[1]
            n = min(b - a, cols)
            bar = np.zeros(lead + Ybar.shape[-2:-1] + (cols,), Ybar.dtype)
            bar[..., :n] = Ybar[..., a:a + n]
            bars.append(bar.reshape(lead + x.shape))
        return tuple(bars)


def _fv_rows(x):
    """An input's shape as FeatureVectorizer reads it: (N, columns), a 1-D input one row."""
    return (1, -1) if x.ndim == 1 else (x.shape[0], -1)


def _fv_spans(dims):
    ends = np.cumsum([int(d) for d in dims])
    return [(int(e - d), int(e)) for e, d in zip(ends, dims)]


@rule("CategoryMapper", since=1, domain=ML)
class CategoryMapper:
    """Strings to integers (with default_int64) or integers to strings (with default_string), by
    the pairs of cats_strings and cats_int64s. Not differentiated."""

    nondiff = (0,)

    def forward(X, *, cats_int64s=None, cats_strings=None, default_int64=-1, default_string="_Unused"):
        ints = np.asarray(cats_int64s if cats_int64s is not None else [], np.int64)
        texts = _texts(cats_strings if cats_strings is not None else [])
        if np.asarray(X).dtype.kind in "OSU":
            return _lookup(X, texts, ints, np.int64(default_int64))
        default = default_string.decode() if isinstance(default_string, bytes) else default_string
        return _lookup(np.asarray(X, np.int64), ints, texts, default)
