"""Every error jaccli raises on purpose: one sentence that names the file, node or value at fault."""


class JaccliError(Exception):
    """Base of jaccli's own errors; the CLI prints `Error: <message>` and exits 1."""


class ModelError(JaccliError):
    """The ONNX file cannot be read, or is malformed or hostile."""


class UnsupportedOpError(JaccliError):
    """An operator (or one of its attributes) that jaccli has no rule for."""


class DataError(JaccliError):
    """Input data that does not fit the model: shape, dtype, format."""


class SampleAxisError(DataError):
    """An output whose first axis is not the samples' (the drivers then look for where they are)."""


class UsageError(JaccliError):
    """A request that makes no sense for this model (unknown input name, bad slice ...); exit 2."""

    exit_code = 2


class MemoryBudgetError(JaccliError):
    """A request that would need more memory than the budget allows."""
