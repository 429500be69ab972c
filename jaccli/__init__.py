"""jaccli: input and per-sample parameter Jacobians of ONNX models.

    >>> import jaccli
    >>> J = jaccli.input_jacobian("model.onnx", x)            # (N, *out_shape, *in_shape)
    >>> G, columns = jaccli.param_jacobian("model.onnx", x)   # (N, *out_shape, P), column map
"""

__version__ = "0.1.0"

__all__ = ["input_jacobian", "param_jacobian", "check", "load", "__version__"]


def __getattr__(name):  # heavy modules load on first use, so `jaccli --help` starts fast
    if name in ("input_jacobian", "param_jacobian"):
        from . import drivers

        return getattr(drivers, name)
    if name == "check":
        from .oracle import check

        return check
    if name == "load":
        from .model import load

        return load
    raise AttributeError(name)
