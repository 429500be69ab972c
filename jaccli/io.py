"""Data in (.npy, .npz, .csv, stdin) and atomic sinks out (.npy memory map, .npz, .csv, stdout)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile

import numpy as np

from .errors import DataError, UsageError

FORMATS = ("npy", "npz", "csv")


# ---- reading ----------------------------------------------------------------------------------


def sniff(head: bytes):
    """The format of data from its first bytes."""
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "npz"
    return "csv"


def read_data(path, stdin=None):
    """An array or {name: array} from a path or '-' (stdin); the format is told from the bytes."""
    name = "stdin" if path == "-" else str(path)
    if path == "-":
        raw = (stdin or sys.stdin.buffer).read()
    else:
        if not os.path.isfile(path):
            raise DataError(f"{name}: no such data file")
        with open(path, "rb") as f:
            raw = f.read()
    if not raw:
        raise DataError(f"{name}: the file is empty")
    kind = sniff(raw[:8])
    try:
        if kind == "npy":
            return np.load(io.BytesIO(raw), allow_pickle=False)
        if kind == "npz":
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise DataError(f"{name}: holds Python objects (pickled); jaccli reads numeric arrays only") from None
        raise DataError(f"{name}: not a readable .{kind} file ({_first(e)})") from None
    except MemoryError:
        raise DataError(f"{name}: its header declares an array too large to load") from None
    except Exception as e:  # numpy's header parser raises SyntaxError, zipfile its own, etc.
        raise DataError(f"{name}: truncated or corrupt .{kind} file ({_first(e)})") from None
    return _read_csv(raw, name)


def _first(e):
    t = str(e).strip().splitlines()
    return t[0][:160] if t else type(e).__name__


def _read_csv(raw, name):
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{name}: neither .npy, .npz nor UTF-8 CSV text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [r for r in reader if r and any(c.strip() for c in r)]
    except csv.Error as e:
        raise DataError(f"{name}: malformed CSV at line {reader.line_num} ({e})") from None
    if rows and not _numeric(rows[0]):
        rows = rows[1:]  # a header
    if not rows:
        raise DataError(f"{name}: no data rows")
    width = len(rows[0])
    out = np.empty((len(rows), width), dtype=np.float64)
    for i, r in enumerate(rows):
        if len(r) != width:
            raise DataError(f"{name}: row {i + 1} has {len(r)} values, the first row has {width}")
        try:
            out[i] = [float(c) for c in r]
        except ValueError:
            bad = next(c for c in r if not _is_float(c))
            raise DataError(f"{name}: row {i + 1} holds a non-numeric value {bad.strip()[:20]!r}") from None
    return out


def _is_float(c):
    try:
        float(c)
        return True
    except ValueError:
        return False


def _numeric(row):
    return all(_is_float(c) for c in row)


def nonfinite_count(x):
    """How many NaN or Inf values the float arrays of x hold."""
    arrays = x.values() if isinstance(x, dict) else [x]
    return sum(int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in arrays if np.asarray(a).dtype.kind == "f")


def shape_csv_rows(x, model):
    """CSV rows are flattened samples: reshape them to the (single) input's per-sample shape."""
    if isinstance(x, dict) or x.ndim != 2 or len(model.inputs) != 1:
        return x
    v = model.inputs[0]
    if v.shape is None or len(v.shape) == 2:
        return x
    per = v.shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in per):
        raise DataError(f"CSV rows need a fixed per-sample input shape; '{v.name}' is {v.describe()}")
    size = int(np.prod(per))
    if x.shape[1] != size:
        raise DataError(f"CSV rows have {x.shape[1]} values; input '{v.name}' {v.describe()} needs {size} per sample")
    return x.reshape((x.shape[0],) + tuple(per))


# ---- writing ----------------------------------------------------------------------------------


def output_format(path, fmt):
    """The output format, from --format or the extension; the target folder must exist."""
    if path != "-":
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"{path}: the folder {folder} does not exist")
        if os.path.isdir(path):
            raise UsageError(f"{path} is a folder; give a file name")
    if fmt:
        return fmt
    if path == "-":
        return "npy"
    ext = os.path.splitext(str(path))[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise UsageError(f"cannot tell the format of {path!r} from its extension; use --format {'|'.join(FORMATS)}")
    return ext


class Sink:
    """Where a result goes. `allocate` gives the array the drivers fill; `commit` publishes it.

    Files are written to a temporary file in the target folder and renamed into place only
    when complete, so an error or an interrupt never leaves a half-written output and an
    existing file at the path stays as it was.
    """

    def __init__(self, path, fmt):
        self.path, self.fmt = path, fmt
        self.tmp = None
        self.array = None

    def allocate(self, shape, dtype):
        if self.fmt == "npy" and self.path != "-":
            self.tmp = _tempfile(self.path, ".npy")
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)
        else:
            self.array = np.empty(shape, dtype)
        return self.array

    def commit(self, result, extras=None):
        """Publish: result is a drivers.Result; extras are further named arrays for .npz."""
        if self.path == "-":
            self._write(sys.stdout.buffer, result, extras)
            sys.stdout.buffer.flush()
            return
        if self.fmt == "npy":
            self.array.flush()
            del self.array
            self.array = None
            os.replace(self.tmp, self.path)
            self.tmp = None
            if result.kind == "params":
                write_columns(columns_path(self.path), result)
            return
        self.tmp = _tempfile(self.path, "." + self.fmt)
        with open(self.tmp, "wb") as f:
            self._write(f, result, extras)
        os.replace(self.tmp, self.path)
        self.tmp = None
        if result.kind == "params" and self.fmt == "csv":
            write_columns(columns_path(self.path), result)

    def _write(self, f, result, extras):
        if self.fmt == "npy":
            np.save(f, np.asarray(result.value), allow_pickle=False)
        elif self.fmt == "npz":
            arrays = {"jacobian": np.asarray(result.value), "outputs": result.outputs}
            if result.kind == "params":
                arrays["columns"] = np.frombuffer(json.dumps(result.columns).encode(), dtype=np.uint8)
            arrays.update(extras or {})
            np.savez(f, **arrays)
        else:
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            write_csv(text, result)
            text.flush()
            text.detach()

    def abort(self):
        self.array = None
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)
        self.tmp = None


def _tempfile(path, suffix):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part" + suffix, dir=folder)
    os.close(fd)
    return tmp


def columns_path(path):
    root, _ = os.path.splitext(str(path))
    return root + ".columns.json"


def write_columns(path, result):
    tmp = _tempfile(path, ".json")
    with open(tmp, "w") as f:
        json.dump({"output": result.of, "columns": result.columns}, f, indent=1)
    os.replace(tmp, path)


def element_names(name, shape):
    """'x[0][3]' for every element of a tensor in C order (no commas, so CSV needs no quoting)."""
    if not shape:
        return [name]
    return [name + "".join(f"[{i}]" for i in ix) for ix in np.ndindex(*shape)]


def write_csv(f, result):
    """One row per sample and output element; one column per input element or parameter entry."""
    J = result.J  # (N, n_sel, n_cols)
    if result.kind == "input":
        cols = element_names(result.wrt, result.in_shape)
    else:
        cols = [n for c in result.columns for n in element_names(c["name"], c["shape"])]
    out_all = element_names(result.of, result.out_shape)
    out_names = [out_all[i] for i in result.selection]
    w = csv.writer(f)
    w.writerow(["sample", "output"] + cols)
    for n in range(J.shape[0]):
        for r, oname in enumerate(out_names):
            w.writerow([n, oname] + [repr(float(v)) for v in J[n, r]])
