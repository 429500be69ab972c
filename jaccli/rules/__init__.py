"""The rule registry: one entry per (domain, op_type, since), newest rule with since <= opset wins.

A rule is a class whose functions are called on the class itself (no `self`):

    forward(*inputs, **attrs)      -> array, or tuple of arrays for several outputs
    jvp(cx, *Xdots, **attrs)       -> output tangent(s); Xdot is None where inactive
    vjp(cx, *Ybars, **attrs)       -> one cotangent per input, None where not needed

`cx` carries the primal inputs `cx.x`, outputs `cx.y`, which input cotangents are
needed (`cx.need`) and which must keep the sample axis (`cx.keep`, for per-sample
parameter cotangents). `cx.dest(i)` may offer a view into the final result where a rule
can write input i's cotangent directly (returning that view); `cx.mine(i)` says that output
i's cotangent is held by no one else, so the rule may overwrite it; rules are free to ignore
both. Tangents and cotangents carry leading axes before the primal
axes: `(T,)` for values with a sample axis, `(T, N)` for per-sample cotangents of
values without one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import UnsupportedOpError


class RuleKey(NamedTuple):
    domain: str
    op_type: str
    since: int


@dataclass(frozen=True)
class Ctx:
    """What a derivative rule may know of its node: primal inputs and outputs, and the asks."""

    x: tuple
    y: tuple
    need: tuple = ()
    keep: tuple = ()
    rule: type | None = None
    out: tuple = ()  # per input: where to write its cotangent (a view into the result), or None
    owned: tuple = ()  # per output: its cotangent is this rule's to overwrite (no one else holds it)
    rows: int = 1  # rows of each sample in the first input, a matrix whose rows are the samples' merged with
    # another axis, sample by sample ((N*S, D): an exporter's flattening before a Gemm; see drivers._grouped)

    def dest(self, i):
        """The destination for input i's cotangent, if the walker gave one."""
        return self.out[i] if i < len(self.out) else None

    def mine(self, i=0):
        """Whether output i's cotangent may be overwritten in place."""
        return i < len(self.owned) and self.owned[i]

    def lead(self, G, i=0):
        """Number of leading (direction / sample) axes of a tangent or cotangent of output i."""
        return G.ndim - self.y[i].ndim


_REGISTRY: dict[tuple[str, str], list[tuple[int, type]]] = {}
_KEYS: set[RuleKey] = set()


def _attr_names(fn):
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None  # accepts every attribute
    return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def rule(op_type: str, since: int, domain: str = ""):
    """Register a rule class for `op_type` in `domain`, valid from opset `since` on."""

    def register(cls):
        key = RuleKey(domain, op_type, since)
        if key in _KEYS:
            raise RuntimeError(f"rule {key} registered twice")
        _KEYS.add(key)
        _finish(cls, key)
        entries = _REGISTRY.setdefault((domain, op_type), [])
        entries.append((since, cls))
        entries.sort(key=lambda e: e[0])
        return cls

    return register


def _none_opaque(attrs):
    return {}


def _finish(cls, key):
    cls.key = key
    cls.attrs = _attr_names(cls.forward)
    cls.nondiff = frozenset(getattr(cls, "nondiff", ()))
    # differentiable inputs whose initializers are state, not parameters (running statistics)
    cls.buffers = frozenset(getattr(cls, "buffers", ()))
    cls.differentiable = hasattr(cls, "vjp") or hasattr(cls, "jvp")
    cls.n_diff_outputs = getattr(cls, "n_diff_outputs", 1)  # None: every output
    cls.pointwise = getattr(cls, "pointwise", False)  # output element i depends on input elements i only
    # opaque(attrs) -> {input index: why}: inputs read without a derivative that zero would describe,
    # refused where what is differentiated reaches them (Resize's crop box, BitCast's bits)
    cls.opaque = getattr(cls, "opaque", _none_opaque)


_THROUGH: dict = {}  # rule -> its straight-through variant (see straight_through)


def through(base):
    """Register a rule class as `base`'s straight-through variant (not looked up by opset)."""

    def register(cls):
        _finish(cls, base.key)
        _THROUGH[base] = cls
        return cls

    return register


def straight_through(rule_cls):
    """The rule's straight-through variant, if it has one: derivatives pass a quantize-dequantize
    pair as the identity, where the values are inside the integer range (quantization-aware
    training's straight-through estimator), instead of the true derivative, zero."""
    _load_families()
    return _THROUGH.get(rule_cls, rule_cls)


def lookup(op_type: str, opset: int, domain: str = "", node: str = "?"):
    """The newest rule for op_type whose `since` is <= opset; UnsupportedOpError if none."""
    _load_families()
    entries = _REGISTRY.get((domain, op_type))
    if entries:
        for since, cls in reversed(entries):
            if since <= opset:
                return cls
        lo = entries[0][0]
        if not _existed(op_type, opset, domain):  # an exporter wrote it before its opset (torch's ConstantOfShape at 8):
            return entries[0][1]  # its first version is the only thing it can mean
        raise UnsupportedOpError(
            f"node '{node}': {_qual(domain, op_type)} at opset {opset} is older than jaccli supports (from opset {lo})"
        )
    why = _WHY_NOT.get((domain, op_type)) or (_NOT_ONNX if domain in ("", "ai.onnx") and not _known(op_type, "") else None)
    raise UnsupportedOpError(f"node '{node}': operator {_qual(domain, op_type)} (opset {opset}) is not supported"
                             + (f": {why}" if why else ""))


_RANDOM = ("it draws new random numbers at every run (a VAE's sampling, noise, Dropout written out): a Jacobian "
           "would hold for one draw only; export the model with the draw as an input, or replaced by its mean")
_INTEGER = ("an integer operator of a quantized model (onnxruntime.quantization's QOperator format) that jaccli "
            "does not run (it runs QLinearConv, QLinearMatMul, QGemm, QLinearAdd, QLinearMul, QLinearSigmoid, "
            "QLinearLeakyRelu, QLinearSoftmax, QLinearConcat, QLinearWhere and the QLinear pools); differentiate the "
            "float model, or quantize it to the QDQ format (QuantizeLinear and DequantizeLinear around float operators)")
_WHY_NOT = {  # operators people ask about, and what jaccli would have to say of them
    **{("com.microsoft", op): _INTEGER for op in ("QLinearReduceMean", "QOrderedMatMul")},
    **{("", op): _RANDOM for op in ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                                    "Bernoulli", "Multinomial")},
    ("", "Erfc"): "not an ONNX operator (tf2onnx writes it for Keras's exact GELU; onnxruntime rejects it too): "
                  "Keras's approximate GELU (approximate=True) exports with standard operators",
    **{("", op): "not an ONNX operator (tf2onnx writes it for TensorFlow's complex numbers; onnxruntime rejects the "
                 "model too): keep complex values out of the exported graph, or export from PyTorch, whose stft and "
                 "fft become ONNX's STFT and DFT" for op in ("ComplexAbs", "RFFT", "IRFFT", "Real", "Imag")},
}


_NOT_ONNX = ("not an ONNX operator, in ONNX's own domain: an exporter left one of its framework's operators "
             "(tf2onnx keeps a TensorFlow function it could not convert as StatefulPartitionedCall), and onnxruntime "
             "rejects the model too; export it again, or convert that part")


def _known(op_type, domain):
    """Whether onnx knows op_type in domain, at any opset."""
    from onnx import defs

    return defs.has(op_type, domain)


def _existed(op_type, opset, domain):
    """Whether ONNX defines op_type at opset (an earlier version of it), as far as onnx knows."""
    from onnx import defs

    try:
        defs.get_schema(op_type, opset, domain)
        return True
    except Exception:
        return not _known(op_type, domain)  # an operator onnx does not know: no grounds to guess


def _qual(domain, op_type):
    return f"{domain}.{op_type}" if domain else op_type


def all_rules():
    """[(domain, op_type, [since, ...], differentiable)] for `jaccli ops`."""
    _load_families()
    out = []
    for (domain, op_type), entries in sorted(_REGISTRY.items()):
        out.append((domain, op_type, [s for s, _ in entries], all(c.differentiable for _, c in entries)))
    return out


_loaded = False


def _load_families():
    global _loaded
    if not _loaded:
        _loaded = True
        from . import contrib, control, conv, deform, detection, elementwise, linalg, ml, norm, pool, qlinear, quant, recurrent, reduce, resize, sequence, shape, spectral, text  # noqa: F401
