"""Elementwise operators: unary ones need only f'(x); binary ones broadcast and unbroadcast."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from . import rule, through
from ..errors import UnsupportedOpError
from ._util import add, expand, padded, scaled, times, unbroadcast


def elementwise(op_type, since, domain=""):
    """Register a unary rule from `forward(X, **attrs)` and `deriv(X, Y, **attrs)` = dY/dX."""

    def register(cls):
        def jvp(cx, Xdot, **attrs):
            return times(Xdot, cls.deriv(cx.x[0], cx.y[0], **attrs))

        def vjp(cx, Ybar, **attrs):
            return (scaled(cx, Ybar, cls.deriv(cx.x[0], cx.y[0], **attrs)),)

        cls.jvp, cls.vjp = jvp, vjp
        cls.pointwise = True
        return rule(op_type, since, domain)(cls)

    return register


@elementwise("Neg", since=1)
class Neg:
    """Y = -X"""

    def forward(X):
        return -X

    def deriv(X, Y):
        return -1.0


@elementwise("Relu", since=1)
class Relu:
    """Y = max(X, 0)"""

    def forward(X):
        return np.maximum(X, 0)

    def deriv(X, Y):
        return (X > 0).astype(X.dtype)


@elementwise("LeakyRelu", since=1)
class LeakyRelu:
    """Y = X if X > 0 else alpha * X"""

    def forward(X, *, alpha):
        if 0 < alpha <= 1:  # the larger of X and alpha X: no branch per element (see _sigmoid); alpha 0: inf * 0
            return np.maximum(X, X * X.dtype.type(alpha))
        return np.where(X > 0, X, X * X.dtype.type(alpha))

    def deriv(X, Y, *, alpha):
        return _pick(X > 0, alpha, 1, X.dtype)


@elementwise("Sigmoid", since=1)
class Sigmoid:
    """Y = 1 / (1 + exp(-X))"""

    def forward(X):
        return _sigmoid(X)

    def deriv(X, Y):
        return Y * (1 - Y)


@elementwise("Tanh", since=1)
class Tanh:
    """Y = tanh(X)"""

    def forward(X):
        return np.tanh(X)

    def deriv(X, Y):
        return 1 - Y * Y


@elementwise("Exp", since=1)
class Exp:
    """Y = exp(X)"""

    def forward(X):
        return np.exp(X)

    def deriv(X, Y):
        return Y


@elementwise("Log", since=1)
class Log:
    """Y = log(X)"""

    def forward(X):
        return np.log(X)

    def deriv(X, Y):
        return 1 / X


@elementwise("Sqrt", since=1)
class Sqrt:
    """Y = sqrt(X)"""

    def forward(X):
        return np.sqrt(X)

    def deriv(X, Y):
        return 0.5 / Y


def _horner(z, coefs, monic=False):
    """sum(c * z**k), the coefficients from the highest power down; with a leading 1 if monic."""
    r = z + coefs[0] if monic else np.full_like(z, coefs[0])
    for c in coefs[1:]:
        r *= z
        r += c
    return r


# erf in double precision: the rational approximations of Cephes' ndtr.c (S. L. Moshier, public
# domain), erf(x) = x T(x^2) / U(x^2) for |x| <= 1; erfc(x) = exp(-x^2) P(x) / Q(x) for
# 1 < x < 8, and exp(-x^2) R(x) / S(x) beyond; U, Q, S monic.
_ERF_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4)
_ERF_U = (3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4)
_ERFC_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_ERFC_Q = (1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2)
_ERFC_R = (5.64189583547755073984e-1, 1.27536670759978104416e0, 5.01905042251180477414e0,
           6.16021097993053585195e0, 7.40974269950448939160e0, 2.97886665372100240670e0)
_ERFC_S = (2.26052863220117276590e0, 9.39603524938001434673e0, 1.20489539808096656605e1,
           1.70814450747565897222e1, 9.60896809063285878198e0, 3.36907645100081516050e0)

# erf in single precision, as Eigen and XLA compute it: x A(x^2) / B(x^2) on x clipped to
# [-4, 4], beyond which erf is 1 to single precision.
_ERF32_A = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF32_B = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def _erf(X):
    """erf, elementwise, in X's float type (math.erf per element is 20-50x slower); a large X in
    pieces that stay in cache through the twenty-odd passes (see _ERF_PIECE)."""
    X = np.asarray(X)
    if X.dtype.kind != "f":
        X = X.astype(np.float64)
    if X.size > 2 * _ERF_PIECE:
        # C order, so that y is a view of Y: empty_like would keep the layout of a transposed X,
        # and Y.reshape(-1) would be a copy, leaving Y unwritten
        Y = np.empty(X.shape, X.dtype)
        x, y = X.reshape(-1), Y.reshape(-1)
        for a in range(0, x.size, _ERF_PIECE):
            y[a:a + _ERF_PIECE] = _erf(x[a:a + _ERF_PIECE])
        return Y
    if X.dtype.itemsize <= 4:
        x = np.clip(X, -4, 4)
        z = x * x
        return x * _horner(z, _ERF32_A) / _horner(z, _ERF32_B)
    a = np.abs(X)
    Y = np.empty_like(X)
    inner = a <= 1
    if inner.any():
        x = X[inner]
        z = x * x
        Y[inner] = x * _horner(z, _ERF_T) / _horner(z, _ERF_U, monic=True)
    outer = ~inner
    if outer.any():
        x = np.minimum(a[outer], 27.0)  # erfc(27) underflows
        mid = x < 8
        p = np.where(mid, _horner(x, _ERFC_P), _horner(x, _ERFC_R))
        q = np.where(mid, _horner(x, _ERFC_Q, monic=True), _horner(x, _ERFC_S, monic=True))
        Y[outer] = np.copysign(1 - np.exp(-x * x) * p / q, X[outer])
    return Y


_ERF_PIECE = 32768  # elements: a piece's passes stay in L2; smaller pieces pay a call per pass for little arithmetic
# (330K float32 values: 0.6 ms, against 1.0 ms in pieces of 8192; measured)


@elementwise("Erf", since=9)
class Erf:
    """Y = erf(X) = 2/sqrt(pi) * integral_0^X exp(-t^2) dt"""

    def forward(X):
        return _erf(X)

    def deriv(X, Y):
        return X.dtype.type(2 / math.sqrt(math.pi)) * np.exp(-X * X)


@elementwise("Softplus", since=1)
class Softplus:
    """Y = log(1 + exp(X))"""

    def forward(X):
        return np.logaddexp(0, X).astype(X.dtype)

    def deriv(X, Y):
        return _sigmoid(X)


def _elu(X, alpha, scale=1.0):
    """X if X > 0 else alpha * (exp(X / scale) - 1), as max(X, 0) + alpha * expm1(min(X, 0) / scale):
    the part not taken is exactly 0, so the values are where's (up to the sign of a zero) without
    its branch per element, which a random sign mispredicts (see _sigmoid)."""
    a, Z = X.dtype.type(alpha), np.minimum(X, 0)
    if not np.isfinite(a):  # a * expm1(0) would not be 0
        return np.where(X > 0, X, a * np.expm1(Z if scale == 1 else Z / X.dtype.type(scale)))
    return np.maximum(X, 0) + a * np.expm1(Z if scale == 1 else Z / X.dtype.type(scale))


def _elu_deriv(X, alpha, scale=1.0):
    """1 if X > 0 else (alpha / scale) * exp(X / scale): the slope below as alpha * exp(min(X, 0)),
    not Y + alpha, which cancels where Y is near -alpha (float32: 0 for X below -17, not 4e-8),
    picked by products with 0 and 1 (exact: the slope is finite where X > 0)."""
    c = X.dtype.type(alpha / scale)
    below = np.exp(np.minimum(X, 0) if scale == 1 else np.minimum(X, 0) / X.dtype.type(scale))
    if not np.isfinite(c):
        return np.where(X > 0, X.dtype.type(1), c * below)
    if c != 1:
        below *= c
    up = (X > 0).astype(X.dtype)
    return up + (1 - up) * below


@elementwise("Elu", since=1)
class Elu:
    """Y = X if X > 0 else alpha * (exp(X) - 1)"""

    def forward(X, *, alpha):
        return _elu(X, alpha)

    def deriv(X, Y, *, alpha):
        return _elu_deriv(X, alpha)


def _pick(mask, no, yes, dtype):
    """`yes` where mask, else `no` (two numbers), as a lookup in a table of the two: numpy's
    where picks with a branch per element (see _sigmoid)."""
    return np.take(np.array([no, yes], dtype), mask.view(np.uint8))


def _sigmoid(X):
    """1 / (1 + exp(-X)), stable at both ends: 1 / (1 + E) for X >= 0 and E / (1 + E) below, with
    E = exp(-|X|) <= 1; the numerator picked as max(E, X >= 0). numpy's where picks with a
    branch per element, which a random sign mispredicts: 8 ns an element against 0.4."""
    E = np.exp(-np.abs(X))
    return (np.maximum(E, X >= 0) / (1 + E)).astype(X.dtype, copy=False)


class _Clip:
    """Y = min(max(X, min), max); bounds are constants, not differentiated."""

    pointwise = True

    def jvp(cx, Xdot, *_, **attrs):
        return _inside(cx) * Xdot

    def vjp(cx, Ybar, *_, **attrs):
        return (_inside(cx) * Ybar,)


def _inside(cx):
    X, Y = cx.x[0], cx.y[0]
    return (X == Y).astype(X.dtype)


@rule("Clip", since=1)
class Clip6(_Clip):
    """Y = min(max(X, min), max), bounds as attributes."""

    def forward(X, *, min=-3.4028234663852886e38, max=3.4028234663852886e38):
        return np.clip(X, min, max).astype(X.dtype)


@rule("Clip", since=11)
class Clip11(_Clip):
    """Y = min(max(X, min), max), bounds as optional inputs."""

    nondiff = (1, 2)

    def forward(X, min=None, max=None):
        lo = -np.inf if min is None else min
        hi = np.inf if max is None else max
        return np.clip(X, lo, hi).astype(X.dtype)


# ---- binary, with multidirectional broadcasting ---------------------------------------------


class _Binary:
    """Y = f(A, B) with partials dA, dB; subclasses give forward and partials."""

    keeps = True
    pointwise = True  # with broadcasting: the plan's diagonal regions check the shapes at run time

    def jvp(cx, Adot, Bdot, **_attrs):  # attributes (Mod's fmod) are the forward's business
        (A, B), Y = cx.x, cx.y[0]
        dA, dB = cx.rule.partials(A, B, Y, Adot is not None, Bdot is not None)
        lead = (Adot if Adot is not None else Bdot).ndim - (A if Adot is not None else B).ndim
        return add(
            None if Adot is None else expand(_times(dA, Adot), A, Y, lead) if dA is not None else None,
            None if Bdot is None else expand(_times(dB, Bdot), B, Y, lead) if dB is not None else None,
        )

    def vjp(cx, Ybar, **_attrs):
        (A, B), Y = cx.x, cx.y[0]
        lead = cx.lead(Ybar)
        dA, dB = cx.rule.partials(A, B, Y, cx.need[0], cx.need[1])
        return (
            unbroadcast(_times(dA, Ybar), A.shape, lead, cx.keep[0]) if cx.need[0] else None,
            unbroadcast(_times(dB, Ybar), B.shape, lead, cx.keep[1]) if cx.need[1] else None,
        )


def _times(d, G):
    """d * G (see times), where d is a partial (the scalar 1 means identity)."""
    if isinstance(d, (int, float)):
        return G if d == 1 else d * G
    return times(G, d)


@rule("Add", since=7)
class Add(_Binary):
    """C = A + B"""

    def forward(A, B):
        return A + B

    def partials(A, B, Y, na, nb):
        return 1, 1


@rule("Sub", since=7)
class Sub(_Binary):
    """C = A - B"""

    def forward(A, B):
        return A - B

    def partials(A, B, Y, na, nb):
        return 1, -1


@rule("Mul", since=7)
class Mul(_Binary):
    """C = A * B"""

    def forward(A, B):
        return A * B

    def partials(A, B, Y, na, nb):
        return B, A


@rule("Div", since=7)
class Div(_Binary):
    """C = A / B"""

    def forward(A, B):
        if np.issubdtype(A.dtype, np.integer):
            return np.trunc(A / B).astype(A.dtype)
        return A / B

    def partials(A, B, Y, na, nb):
        return (1 / B if na else None), (-Y / B if nb else None)


@rule("Mod", since=10)
class Mod(_Binary):
    """C = A mod B: the sign of B (integer mod, fmod=0) or of A (fmod=1, required for floats)."""

    def forward(A, B, *, fmod=0):
        return (np.fmod(A, B) if fmod else np.mod(A, B)).astype(np.result_type(A, B), copy=False)

    def partials(A, B, Y, na, nb):  # C = A - q B with q constant between the jumps
        return 1, (-(A - Y) / B if nb else None)


@rule("Pow", since=7)
class Pow(_Binary):
    """Z = X ** Y"""

    def forward(X, Y):
        return np.power(X, Y.astype(X.dtype) if np.issubdtype(X.dtype, np.floating) else Y).astype(X.dtype)

    def partials(A, B, Y, na, nb):
        Bf = B.astype(A.dtype) if np.issubdtype(A.dtype, np.floating) else B  # an integer exponent (x ** 3)
        dA = Bf * np.power(A, Bf - 1) if na else None
        dB = Y * np.log(np.where(A > 0, A, 1)) if nb else None
        return dA, dB


@elementwise("Abs", since=1)
class Abs:
    """Y = |X|"""

    def forward(X):
        return np.abs(X)

    def deriv(X, Y):
        return np.sign(X)


@elementwise("Reciprocal", since=1)
class Reciprocal:
    """Y = 1 / X"""

    def forward(X):
        return 1 / X

    def deriv(X, Y):
        return -Y * Y


@elementwise("Sin", since=7)
class Sin:
    """Y = sin(X)"""

    def forward(X):
        return np.sin(X)

    def deriv(X, Y):
        return np.cos(X)


@elementwise("Cos", since=7)
class Cos:
    """Y = cos(X)"""

    def forward(X):
        return np.cos(X)

    def deriv(X, Y):
        return -np.sin(X)


@elementwise("HardSigmoid", since=1)
class HardSigmoid:
    """Y = max(0, min(1, alpha * X + beta))"""

    def forward(X, *, alpha, beta):
        return np.clip(X * X.dtype.type(alpha) + X.dtype.type(beta), 0, 1)

    def deriv(X, Y, *, alpha, beta):
        return _pick((Y > 0) & (Y < 1), 0, alpha, X.dtype)


@elementwise("HardSwish", since=14)
class HardSwish:
    """Y = X * max(0, min(1, X / 6 + 1 / 2))"""

    def forward(X):
        return X * np.clip(X / 6 + 0.5, 0, 1)

    def deriv(X, Y):
        if np.isfinite(X.sum()):  # X / 3 + 1/2 inside (-3, 3), 0 below, 1 above, as products by 0 and 1 (see _sigmoid)
            inside = ((X > -3) & (X < 3)).astype(X.dtype)
            return ((X / 3 + 0.5) * inside + (X >= 3)).astype(X.dtype, copy=False)
        return np.where(X <= -3, 0, np.where(X >= 3, 1, X / 3 + 0.5)).astype(X.dtype)


@elementwise("Selu", since=1)
class Selu:
    """Y = gamma * (X if X > 0 else alpha * (exp(X) - 1))"""

    def forward(X, *, alpha, gamma):
        return X.dtype.type(gamma) * _elu(X, alpha)

    def deriv(X, Y, *, alpha, gamma):
        return X.dtype.type(gamma) * _elu_deriv(X, alpha)


@elementwise("Gelu", since=20)
class Gelu:
    """Y = X * Phi(X) (approximate='none'), or its tanh approximation."""

    def forward(X, *, approximate="none"):
        if approximate == "tanh":
            return 0.5 * X * (1 + np.tanh(_GELU_C * (X + 0.044715 * X**3)))
        return 0.5 * X * (1 + _erf(X / X.dtype.type(math.sqrt(2))))

    def deriv(X, Y, *, approximate="none"):
        if approximate == "tanh":
            t = np.tanh(_GELU_C * (X + 0.044715 * X**3))
            return 0.5 * (1 + t) + 0.5 * X * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * X * X)
        cdf = 0.5 * (1 + _erf(X / math.sqrt(2)).astype(X.dtype))
        return cdf + X * np.exp(-0.5 * X * X) / math.sqrt(2 * math.pi)


_GELU_C = math.sqrt(2 / math.pi)


@elementwise("Shrink", since=9)
class Shrink:
    """Y = X - bias if X > lambd, X + bias if X < -lambd, else 0."""

    def forward(input, *, bias, lambd):
        X = input
        return np.where(X > lambd, X - bias, np.where(X < -lambd, X + bias, 0)).astype(X.dtype)

    def deriv(X, Y, *, bias, lambd):
        return (np.abs(X) > lambd).astype(X.dtype)


@elementwise("ThresholdedRelu", since=10)
class ThresholdedRelu:
    """Y = X if X > alpha else 0"""

    def forward(X, *, alpha):
        return np.where(X > alpha, X, 0).astype(X.dtype)

    def deriv(X, Y, *, alpha):
        return (X > alpha).astype(X.dtype)


@elementwise("Softsign", since=1)
class Softsign:
    """Y = X / (1 + |X|)"""

    def forward(input):
        return input / (1 + np.abs(input))

    def deriv(X, Y):
        return 1 / (1 + np.abs(X)) ** 2


@elementwise("Mish", since=18)
class Mish:
    """Y = X * tanh(softplus(X))"""

    def forward(X):
        return X * np.tanh(np.logaddexp(0, X)).astype(X.dtype)

    def deriv(X, Y):
        t = np.tanh(np.logaddexp(0, X))
        return (t + X * (1 - t * t) * _sigmoid(X)).astype(X.dtype)


@elementwise("Celu", since=12)
class Celu:
    """Y = max(0, X) + min(0, alpha * (exp(X / alpha) - 1))"""

    def forward(X, *, alpha):
        return _elu(X, alpha, scale=alpha)

    def deriv(X, Y, *, alpha):
        return _elu_deriv(X, alpha, scale=alpha)


@elementwise("Swish", since=24)
class Swish:
    """Y = X * sigmoid(alpha * X)"""

    def forward(X, *, alpha):
        return X * _sigmoid(X * X.dtype.type(alpha))

    def deriv(X, Y, *, alpha):
        a = X.dtype.type(alpha)
        s = _sigmoid(a * X)
        return s + a * X * s * (1 - s)


# ---- piecewise constant, comparisons and logic: no derivative flows through them --------------


def _unary(fn):
    def forward(X):
        return fn(X)

    return forward


def _binary(fn):
    def forward(A, B):
        return fn(A, B)

    return forward


def _isinf(X, *, detect_negative=1, detect_positive=1):
    return (np.isposinf(X) & bool(detect_positive)) | (np.isneginf(X) & bool(detect_negative))


# (op, since, forward, doc): piecewise constant or boolean, so no derivative flows through them
_PIECEWISE = {}
for _op, _since, _forward, _doc in (
    ("Floor", 1, _unary(np.floor), "Y = floor(X); derivative zero"),
    ("Ceil", 1, _unary(np.ceil), "Y = ceil(X); derivative zero"),
    ("Round", 11, _unary(np.round), "Y = round(X), half to even; derivative zero"),
    ("Sign", 9, _unary(np.sign), "Y = sign(X); derivative zero"),
    ("Not", 1, _unary(np.logical_not), "Y = not X"),
    ("IsNaN", 9, _unary(np.isnan), "Y = isnan(X)"),
    ("IsInf", 10, _isinf, "Y = isinf(X) for the signs asked"),
    ("Equal", 7, _binary(np.equal), "C = (A == B)"),
    ("Less", 7, _binary(np.less), "C = (A < B)"),
    ("LessOrEqual", 12, _binary(np.less_equal), "C = (A <= B)"),
    ("Greater", 7, _binary(np.greater), "C = (A > B)"),
    ("GreaterOrEqual", 12, _binary(np.greater_equal), "C = (A >= B)"),
    ("And", 7, _binary(np.logical_and), "C = A and B"),
    ("Or", 7, _binary(np.logical_or), "C = A or B"),
    ("Xor", 7, _binary(np.logical_xor), "C = A xor B"),
    ("BitwiseNot", 18, _unary(np.invert), "Y = ~X, bit by bit"),
    ("BitwiseAnd", 18, _binary(np.bitwise_and), "C = A & B, bit by bit"),
    ("BitwiseOr", 18, _binary(np.bitwise_or), "C = A | B, bit by bit"),
    ("BitwiseXor", 18, _binary(np.bitwise_xor), "C = A ^ B, bit by bit"),
):
    _PIECEWISE[_op] = rule(_op, _since)(type(_op, (), {"__doc__": _doc, "nondiff": (0, 1), "forward": _forward}))


@rule("BitShift", since=11)
class BitShift:
    """Z = X << Y or X >> Y (unsigned integers)."""

    nondiff = (0, 1)

    def forward(X, Y, *, direction):
        return (np.left_shift if direction == "LEFT" else np.right_shift)(X, Y.astype(X.dtype))


# (op, since, forward, dY/dX from X and Y, doc): the rest of the trigonometric and hyperbolic family
for _op, _since, _forward, _deriv, _doc in (
    ("Tan", 7, np.tan, lambda X, Y: 1 + Y * Y, "Y = tan(X)"),
    ("Asin", 7, np.arcsin, lambda X, Y: 1 / np.sqrt(1 - X * X), "Y = arcsin(X)"),
    ("Acos", 7, np.arccos, lambda X, Y: -1 / np.sqrt(1 - X * X), "Y = arccos(X)"),
    ("Atan", 7, np.arctan, lambda X, Y: 1 / (1 + X * X), "Y = arctan(X)"),
    ("Sinh", 9, np.sinh, lambda X, Y: np.cosh(X), "Y = sinh(X)"),
    ("Cosh", 9, np.cosh, lambda X, Y: np.sinh(X), "Y = cosh(X)"),
    ("Asinh", 9, np.arcsinh, lambda X, Y: 1 / np.sqrt(X * X + 1), "Y = arcsinh(X)"),
    ("Acosh", 9, np.arccosh, lambda X, Y: 1 / np.sqrt(X * X - 1), "Y = arccosh(X), X >= 1"),
    ("Atanh", 9, np.arctanh, lambda X, Y: 1 / (1 - X * X), "Y = arctanh(X), |X| < 1"),
):
    elementwise(_op, _since)(type(_op, (), {"__doc__": _doc, "forward": _unary(_forward), "deriv": _deriv}))


@rule("Where", since=9)
class Where:
    """output = X where condition else Y (broadcast); condition is not differentiated."""

    nondiff = (0,)
    keeps = True

    def forward(condition, X, Y):
        return np.where(condition, X, Y)

    def jvp(cx, _, Xdot, Ydot):
        C, X, Y = cx.x
        out = cx.y[0]
        lead = (Xdot if Xdot is not None else Ydot).ndim - (X if Xdot is not None else Y).ndim
        parts = []
        for D, v, take in ((Xdot, X, True), (Ydot, Y, False)):
            if D is not None:
                parts.append(np.where(C if take else ~C, expand(D, v, out, lead), 0))
        return add(*parts)

    def vjp(cx, Ybar):
        C, X, Y = cx.x
        lead = cx.lead(Ybar)
        zero = Ybar.dtype.type(0)
        return (
            None,
            unbroadcast(np.where(C, Ybar, zero), X.shape, lead, cx.keep[1]) if cx.need[1] else None,
            unbroadcast(np.where(C, zero, Ybar), Y.shape, lead, cx.keep[2]) if cx.need[2] else None,
        )


@rule("PRelu", since=7)
class PRelu(_Binary):
    """Y = X if X > 0 else slope * X (slope broadcast to X)."""

    def forward(X, slope):
        if np.all((slope > 0) & (slope <= 1)):  # the larger of X and slope X: no branch per element (see _sigmoid)
            return np.maximum(X, X * slope)
        return np.where(X > 0, X, X * slope)

    def partials(A, B, Y, na, nb):
        pos = A > 0
        if np.isfinite(B).all() and np.isfinite(A.sum()):  # selects as products by 0 and 1 (see _sigmoid)
            p = pos.astype(A.dtype)
            q = 1 - p
            return ((p + q * B).astype(A.dtype, copy=False) if na else None), (q * A if nb else None)
        return (np.where(pos, 1, B).astype(A.dtype) if na else None), (np.where(pos, 0, A) if nb else None)


# ---- variadic: Sum, Mean, Max, Min over broadcast inputs -------------------------------------


class _Variadic:
    keeps = True

    def jvp(cx, *Xdots):
        Y = cx.y[0]
        w = cx.rule.weights(cx.x, Y)
        lead = next(D.ndim - x.ndim for D, x in zip(Xdots, cx.x) if D is not None)
        return add(*(expand(_times(wi, D), x, Y, lead) for wi, D, x in zip(w, Xdots, cx.x) if D is not None))

    def vjp(cx, Ybar):
        w = cx.rule.weights(cx.x, cx.y[0])
        lead = cx.lead(Ybar)
        return tuple(
            unbroadcast(_times(wi, Ybar), x.shape, lead, k) if n else None for wi, x, n, k in zip(w, cx.x, cx.need, cx.keep)
        )


@rule("Sum", since=1)
class Sum(_Variadic):
    """sum = data_0 + data_1 + ... (broadcast from opset 8)"""

    def forward(*data_0):
        return _fold(np.add, data_0)

    def weights(xs, Y):
        return [1] * len(xs)


@rule("Mean", since=1)
class Mean(_Variadic):
    """mean = (data_0 + data_1 + ...) / n"""

    def forward(*data_0):
        return _fold(np.add, data_0) / len(data_0)

    def weights(xs, Y):
        return [1 / len(xs)] * len(xs)


def _first_hit(xs, Y):
    """For Max / Min: 1 for the first input equal to the result, so ties share no gradient twice."""
    taken = np.zeros(Y.shape, bool)
    out = []
    for x in xs:
        hit = (np.broadcast_to(x, Y.shape) == Y) & ~taken
        taken |= hit
        out.append(hit.astype(Y.dtype))
    return out


@rule("Max", since=1)
class Max(_Variadic):
    """max = elementwise maximum of the inputs (gradient to the first that attains it)."""

    def forward(*data_0):
        return _fold(np.maximum, data_0)

    weights = _first_hit


@rule("Min", since=1)
class Min(_Variadic):
    """min = elementwise minimum of the inputs (gradient to the first that attains it)."""

    def forward(*data_0):
        return _fold(np.minimum, data_0)

    weights = _first_hit


def _fold(f, xs):
    out = xs[0]
    for x in xs[1:]:
        out = f(out, x)
    return out


# ---- opset 1 to 6 binaries: `broadcast` and `axis` attributes ---------------------------------


def _axis_align(A, B, broadcast=0, axis=None, **_):
    """Opset 1-6 binaries: with `broadcast`, B lines up with A from `axis` (default: the end)."""
    if not broadcast or B.ndim == A.ndim:
        return B
    ax = A.ndim - B.ndim if axis is None else axis % A.ndim
    return B.reshape(B.shape + (1,) * (A.ndim - ax - B.ndim))


def _channel_align(A, B, **_):
    """Opset 1-6 PRelu: a 1-D slope of size C applies along the channel axis 1."""
    if B.ndim == 1 and A.ndim > 2 and B.size == A.shape[1] and B.size > 1:
        return B.reshape((-1,) + (1,) * (A.ndim - 2))
    return B


def _realigned(cx, A, B2):
    """The node's context for the modern rule: B replaced by B aligned to A (no destinations to
    write into, which are B's shape, and nothing to overwrite in place)."""
    return replace(cx, x=(A, B2), out=(), owned=())


def _realigned_binary(modern, op_type, since, align, doc):
    """An older form of a binary op: B realigned to A by `align`, then the modern rule."""

    def forward(A, B, *, broadcast=0, axis=None, consumed_inputs=None):
        return modern.forward(A, align(A, B, broadcast=broadcast, axis=axis))

    def jvp(cx, Adot, Bdot, *, broadcast=0, axis=None, consumed_inputs=None):
        A, B = cx.x
        B2 = align(A, B, broadcast=broadcast, axis=axis)
        if Bdot is not None:
            Bdot = Bdot.reshape(Bdot.shape[: Bdot.ndim - B.ndim] + B2.shape)
        return modern.jvp(_realigned(cx, A, B2), Adot, Bdot)

    def vjp(cx, Ybar, *, broadcast=0, axis=None, consumed_inputs=None):
        A, B = cx.x
        B2 = align(A, B, broadcast=broadcast, axis=axis)
        Abar, Bbar = modern.vjp(_realigned(cx, A, B2), Ybar)
        if Bbar is not None:
            Bbar = Bbar.reshape(Bbar.shape[: Bbar.ndim - B2.ndim] + B.shape)
        return Abar, Bbar

    cls = type(op_type, (), {"__doc__": (modern.__doc__ or "") + doc, "forward": forward, "jvp": jvp, "vjp": vjp,
                             "keeps": True, "partials": modern.partials})
    return rule(op_type, since)(cls)


for _modern in (Add, Sub, Mul, Div, Pow):
    _realigned_binary(_modern, _modern.key.op_type, 1, _axis_align, " (opset 1-6: broadcast from axis)")


def _realigned_predicate(modern):
    """An opset-1 comparison or logical op: B realigned to A (see _axis_align), then the opset-7 op."""

    def forward(A, B, *, broadcast=0, axis=None):
        return modern.forward(A, _axis_align(A, B, broadcast=broadcast, axis=axis))

    op = modern.key.op_type
    rule(op, 1)(type(op, (), {"__doc__": modern.__doc__ + " (opset 1: B broadcast from `axis`)", "nondiff": (0, 1),
                              "forward": forward}))


for _op in ("Equal", "Less", "Greater", "And", "Or", "Xor"):
    _realigned_predicate(_PIECEWISE[_op])
_realigned_binary(PRelu, "PRelu", 1, _channel_align, " (opset 1-6: a 1-D slope runs along channels)")


# ---- quantization: DequantizeLinear is linear in its scale; QuantizeLinear's output is integer ----


def _scale_axis(shape, x_ndim, axis, block_size):
    """How a scale of `shape` lines up with x: None (per tensor), or the axis it runs along."""
    if len(shape) == 0 or (math.prod(shape) == 1 and not block_size):
        return None
    return axis % x_ndim


def _expand_scale(s, lead, x_shape, axis, block_size):
    """Scale (*lead, *scale) shaped to broadcast against x (*lead, *x_shape)."""
    nd = len(x_shape)
    a = _scale_axis(s.shape[lead:], nd, axis, block_size)
    if a is None:
        return s.reshape(s.shape[:lead] + (1,) * nd)
    if block_size:
        return np.repeat(s, block_size, axis=lead + a)[(slice(None),) * (lead + a) + (slice(0, x_shape[a]),)]
    return s.reshape(s.shape[:lead] + tuple(s.shape[-1] if i == a else 1 for i in range(nd)))


def _dequantize_forward(x, x_scale, x_zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    q = x.astype(np.float64) if x_zero_point is None else x.astype(np.float64) - _expand_scale(
        np.asarray(x_zero_point).astype(np.float64), 0, x.shape, axis, block_size)
    return (q * _expand_scale(x_scale, 0, x.shape, axis, block_size)).astype(x_scale.dtype)


class _Dequantize:
    """Y = (x - zero_point) * scale, per tensor, per axis or per block; x and the zero point are
    integers (not differentiated), Y is linear in the scale: its partial is x - zero_point."""

    nondiff = (0, 2)
    keeps = True

    def jvp(cx, _x, Sdot, _zp=None, **attrs):
        X, S = cx.x[0], cx.x[1]
        return _levels(cx, attrs) * _expand_scale(Sdot, Sdot.ndim - S.ndim, X.shape, attrs.get("axis", 1),
                                                  attrs.get("block_size", 0))

    def vjp(cx, Ybar, **attrs):
        X, S = cx.x[0], cx.x[1]
        axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
        lead = cx.lead(Ybar)
        G = _levels(cx, attrs) * Ybar
        keep = cx.keep[1]
        a = _scale_axis(S.shape, X.ndim, axis, block)
        if a is not None and block:
            if keep:
                raise UnsupportedOpError("DequantizeLinear: per-sample cotangents of a blockwise scale are not supported")
            nb = S.shape[a]
            pad = nb * block - X.shape[a]
            if pad:
                G = np.concatenate([G, np.zeros(G.shape[:lead + a] + (pad,) + G.shape[lead + a + 1:], G.dtype)], axis=lead + a)
            Sb = G.reshape(G.shape[:lead + a] + (nb, block) + G.shape[lead + a + 1:]).sum(axis=lead + a + 1)
        else:  # summed over every axis but the scale's own (and the samples', kept)
            axes = tuple(lead + i for i in range(X.ndim) if i != a and not (keep and i == 0))
            Sb = G.sum(axis=axes) if axes else G
        return None, Sb.reshape(Ybar.shape[:lead] + ((X.shape[0],) if keep else ()) + S.shape), None


def _levels(cx, attrs):
    """x - zero_point in the scale's type: the partial of Y in the scale."""
    return _dequantize_forward(cx.x[0], np.ones_like(cx.x[1]), *cx.x[2:], **attrs)


@rule("DequantizeLinear", since=10)
class DequantizeLinear10(_Dequantize):
    def forward(x, x_scale, x_zero_point=None):
        return _dequantize_forward(x, x_scale, x_zero_point, axis=1)


@rule("DequantizeLinear", since=13)
class DequantizeLinear13(_Dequantize):
    def forward(x, x_scale, x_zero_point=None, *, axis=1):
        return _dequantize_forward(x, x_scale, x_zero_point, axis=axis)


@rule("DequantizeLinear", since=21)
class DequantizeLinear21(_Dequantize):
    def forward(x, x_scale, x_zero_point=None, *, axis=1, block_size=0, output_dtype=0):
        if output_dtype:
            from onnx import helper

            return _dequantize_forward(x, x_scale, x_zero_point, axis=axis, block_size=block_size).astype(
                helper.tensor_dtype_to_np_dtype(output_dtype))
        return _dequantize_forward(x, x_scale, x_zero_point, axis=axis, block_size=block_size)


_INT_RANGES = {np.dtype(t): (np.iinfo(t).min, np.iinfo(t).max) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)}


def _quantized_range(dt):
    """The levels' range of a quantized type: an integer's (8 to 32 bits, or ml_dtypes' 4 and 2
    bits), a float8's or float4's largest finite values; None for any other type."""
    if dt in _INT_RANGES:
        return _INT_RANGES[dt]
    if dt.name in ("int4", "uint4", "int2", "uint2") or dt.name.startswith(("float8", "float4")):
        import ml_dtypes

        if dt.name.startswith("float"):
            return -float(ml_dtypes.finfo(dt).max), float(ml_dtypes.finfo(dt).max)
        return int(ml_dtypes.iinfo(dt).min), int(ml_dtypes.iinfo(dt).max)
    return None


def _quantize(x, y_scale, y_zero_point=None, *, axis=1, block_size=0, output_dtype=0, saturate=1, precision=0):
    if y_zero_point is not None:
        dt = np.asarray(y_zero_point).dtype
    elif output_dtype:
        from onnx import helper

        dt = np.dtype(helper.tensor_dtype_to_np_dtype(output_dtype))
    else:
        dt = np.dtype(np.uint8)
    if _quantized_range(dt) is None:
        raise UnsupportedOpError(f"QuantizeLinear to {dt} is not supported (integers of 2 to 32 bits, float8 and float4 are)")
    s = _expand_scale(np.asarray(y_scale, np.float64), 0, x.shape, axis, block_size)
    if dt.name.startswith(("float8", "float4")):  # x / scale + zero point, rounded by the cast (and saturated)
        from .shape import _converted

        v = x.astype(np.float32) / s.astype(np.float32)
        if y_zero_point is not None:
            v = v + _expand_scale(np.asarray(y_zero_point).astype(np.float32), 0, x.shape, axis, block_size)
        return _converted(v.astype(np.float32), dt, saturate)
    v = _rounded_quotient(x, s)
    if y_zero_point is not None:
        v = v + _expand_scale(np.asarray(y_zero_point).astype(np.float64), 0, x.shape, axis, block_size)
    lo, hi = _quantized_range(dt)
    return np.clip(v, lo, hi).astype(dt)


def _rounded_quotient(x, s):
    """round(x / scale), half to even as the spec asks, divided in x's precision (float32 for
    float32 and narrower floats, as onnxruntime and the reference divide): in float64 a level
    that float32 puts exactly half-way (0.5 / (5 / 255) = 25.5) rounds the other way."""
    dt = np.float64 if x.dtype == np.float64 else np.float32
    return np.rint(x.astype(dt) / s.astype(dt)).astype(np.float64)


@rule("QuantizeLinear", since=10)
class QuantizeLinear:
    """Y = saturate(round(x / scale) + zero_point), an integer: piecewise constant, no derivative."""

    nondiff = (0, 1, 2)

    def forward(x, y_scale, y_zero_point=None, **attrs):
        return _quantize(x, y_scale, y_zero_point, **attrs)


# ---- straight-through variants (--straight-through): a quantize-dequantize pair differentiated as
# the identity inside the integer range, zero where it saturates, as quantization-aware training
# (torch's fake_quantize, TensorFlow's fake_quant) takes its derivative ----------------------------


@through(QuantizeLinear)
class QuantizeLinearThrough(QuantizeLinear):
    """QuantizeLinear whose derivative in x is 1 / scale where round(x / scale) + zero_point lies
    inside the integer range, 0 where it saturates."""

    nondiff = (1, 2)

    # zero where it saturates, whatever comes in: a NaN that the quantizer turns into a level
    # (a softmax of a row that a degenerate scale made NaN) passes nothing on
    def jvp(cx, Xdot, *_, **attrs):
        return times(_through_partial(cx, attrs), Xdot)

    def vjp(cx, Ybar, **attrs):
        return (times(_through_partial(cx, attrs), Ybar), None, None)


def _through_partial(cx, attrs):
    """1 / scale where round(x / scale) + zero_point is inside the output's integer range (for a
    float8 or float4 output, x / scale + zero_point inside its finite range), else 0 (for a NaN
    x too)."""
    x, zp = cx.x[0], padded(cx.x, 3)[2]
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    s = _expand_scale(np.asarray(cx.x[1], np.float64), 0, x.shape, axis, block)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = x / s if cx.y[0].dtype.name.startswith(("float8", "float4")) else _rounded_quotient(x, s)
        if zp is not None:
            v = v + _expand_scale(np.asarray(zp).astype(np.float64), 0, x.shape, axis, block)
        lo, hi = _quantized_range(cx.y[0].dtype)
        return np.where((v >= lo) & (v <= hi), 1 / s, 0).astype(x.dtype)


class _DequantizeThrough:
    """DequantizeLinear differentiated in its integer input too: scale times the tangent."""

    nondiff = (2,)

    def jvp(cx, Xdot, Sdot=None, _zp=None, **attrs):  # times: a zero through an infinite scale stays zero
        X, S = cx.x[0], cx.x[1]
        through = None if Xdot is None else times(Xdot, _expand_scale(S, 0, X.shape, attrs.get("axis", 1), attrs.get("block_size", 0)))
        return add(through, None if Sdot is None else _Dequantize.jvp(cx, None, Sdot, **attrs))

    def vjp(cx, Ybar, **attrs):
        X, S = cx.x[0], cx.x[1]
        Sbar = _Dequantize.vjp(cx, Ybar, **attrs)[1] if cx.need[1] else None
        Xbar = times(Ybar, _expand_scale(S, 0, X.shape, attrs.get("axis", 1), attrs.get("block_size", 0))) if cx.need[0] else None
        return Xbar, Sbar, None


for _dq in (DequantizeLinear10, DequantizeLinear13, DequantizeLinear21):
    through(_dq)(type(f"{_dq.__name__}Through", (_DequantizeThrough, _dq), {"__doc__": _DequantizeThrough.__doc__}))


# ---- experimental operators of opsets 1 to 9, dropped at 10, which old models still hold (Caffe2
# and CoreML conversions, the zoo's tiny-YOLOv2); onnxruntime still runs them. ONNX keeps no
# schema for them, so their defaults are written here. ------------------------------------------


@elementwise("ThresholdedRelu", since=1)
class ThresholdedRelu1(ThresholdedRelu):
    """ThresholdedRelu while it was experimental: alpha defaults to 1."""

    def forward(X, *, alpha=1.0):
        return ThresholdedRelu.forward(X, alpha=alpha)

    def deriv(X, Y, *, alpha=1.0):
        return ThresholdedRelu.deriv(X, Y, alpha=alpha)


@elementwise("Affine", since=1)
class Affine:
    """Y = alpha * X + beta"""

    def forward(X, *, alpha=1.0, beta=0.0):
        return (X * X.dtype.type(alpha) + X.dtype.type(beta)).astype(X.dtype)

    def deriv(X, Y, *, alpha=1.0, beta=0.0):
        return alpha


@elementwise("Scale", since=1)
class Scale:
    """Y = scale * X"""

    def forward(X, *, scale=1.0):
        return X * X.dtype.type(scale)

    def deriv(X, Y, *, scale=1.0):
        return scale


@elementwise("ImageScaler", since=1)
class ImageScaler:
    """Y = scale * X + bias[c], X of shape (N, C, H, W): an image's scaling and mean subtraction."""

    def forward(X, *, bias=None, scale=1.0):
        Y = X * X.dtype.type(scale)
        if bias is not None:
            Y += np.asarray(bias, X.dtype).reshape((1, -1) + (1,) * (X.ndim - 2))
        return Y

    def deriv(X, Y, *, bias=None, scale=1.0):
        return scale


@elementwise("ScaledTanh", since=1)
class ScaledTanh:
    """Y = alpha * tanh(beta * X)"""

    def forward(X, *, alpha=1.0, beta=1.0):
        return X.dtype.type(alpha) * np.tanh(X * X.dtype.type(beta))

    def deriv(X, Y, *, alpha=1.0, beta=1.0):
        t = np.tanh(X * X.dtype.type(beta))
        return X.dtype.type(alpha * beta) * (1 - t * t)


@elementwise("ParametricSoftplus", since=1)
class ParametricSoftplus:
    """Y = alpha * log(1 + exp(beta * X))"""

    def forward(X, *, alpha=1.0, beta=1.0):
        return X.dtype.type(alpha) * np.logaddexp(0, X * X.dtype.type(beta)).astype(X.dtype)

    def deriv(X, Y, *, alpha=1.0, beta=1.0):
        return X.dtype.type(alpha * beta) * _sigmoid(X * X.dtype.type(beta))
