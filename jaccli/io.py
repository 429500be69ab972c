"""Data in (.npy, .npz, .csv, stdin) and atomic sinks out (.npy memory map, .npz, .csv, stdout)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import zipfile

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
        head, source = raw[:8], io.BytesIO(raw)
    elif os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        with open(path, "rb") as f:  # a pipe or FIFO (<(...) in a shell): read it once, like stdin
            raw = f.read()
        head, source = raw[:8], io.BytesIO(raw)
    else:
        if not os.path.isfile(path):
            raise DataError(f"{name}: no such data file")
        with open(path, "rb") as f:
            head = f.read(8)
        raw, source = None, path  # numpy reads the file itself: no second copy of the bytes
    if not head:
        raise DataError(f"{name}: the file is empty")
    kind = sniff(head)
    try:
        if kind == "npy":
            return np.load(source, allow_pickle=False)
        if kind == "npz":
            with np.load(source, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise DataError(f"{name}: holds Python objects (pickled), which jaccli does not load; save numbers as numeric "
                            f"arrays, and strings (a string input's categories) as text arrays: np.asarray(col, dtype=str)") from None
        raise DataError(f"{name}: not a readable .{kind} file ({_first(e)})") from None
    except MemoryError:
        raise DataError(f"{name}: its header declares an array too large to load") from None
    except Exception as e:  # numpy's header parser raises SyntaxError, zipfile its own, etc.
        raise DataError(f"{name}: truncated or corrupt .{kind} file ({_first(e)})") from None
    if raw is None:
        with open(path, "rb") as f:
            raw = f.read()
    return _read_csv(raw, name)


def _first(e):
    t = str(e).strip().splitlines()
    return t[0][:160] if t else type(e).__name__


def _read_csv(raw, name):
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{name}: neither .npy, .npz nor UTF-8 CSV text") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    delimiter = next((d for d in (",", "\t", ";") if lines and d in lines[0]), None)
    if delimiter is None:  # numbers apart by spaces: np.savetxt's default
        rows = [line.split() for line in lines]
    else:
        reader = csv.reader(io.StringIO("\n".join(lines), newline=""), delimiter=delimiter)
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
            raise DataError(f"{name}: row {i + 1} holds a non-numeric value {bad.strip()[:20]!r} (CSV data is numbers; text for "
                            f"a string input, documents or categories, goes in .npy or .npz: np.asarray(texts, dtype=str))") from None
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


def shape_csv_rows(x, inputs):
    """CSV rows are flattened samples: reshape them to the per-sample shape of the single input
    among `inputs` (those the output reads)."""
    if isinstance(x, dict) or x.ndim != 2 or len(inputs) != 1:
        return x
    v = inputs[0]
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


class BufferedTarget:
    """A target that lends the drivers one reusable buffer of a chunk of samples to fill."""

    buffer = None

    def block(self, result, a, b, rows):
        """Samples a..b, their rows rows[0]..rows[1] (all rows but when one sample's are too many)."""
        if self.buffer is None or self.buffer.shape[0] < b - a:
            n, r, cols = result.flat_shape
            self.buffer = np.empty((max(b - a, result.chunks[0] or 1), result.block_rows or r, cols), result.dtype)
        return self.buffer[: b - a, : rows[1] - rows[0]]


class NullTarget(BufferedTarget):
    """Writes nothing: for runs that only print the summary."""

    def open(self, result):
        pass

    def write(self, result, a, b, block, rows):
        pass


class FileTarget(BufferedTarget):
    """Writes a result as its blocks of samples arrive, in order: .npy (header, then the blocks),
    .csv (a header row, then rows), .npz (a streamed zip member, then the outputs and the column
    map), to a file or to stdout ('-'). Memory stays at one block whatever the number of samples.

    Files are written to a temporary file in the target folder and renamed into place by
    `commit` only when complete, so an error or an interrupt never leaves a half-written output
    and an existing file at the path stays as it was (`abort` removes the temporary file).
    """

    def __init__(self, path, fmt):
        self.path, self.fmt = path, fmt
        self.tmp = None
        self.f = None
        self.zip = None
        self.member = None
        self.text = None

    # -- the driver's side: open, block, write ---------------------------------------------------

    def open(self, result):
        if self.path == "-":
            self.f = sys.stdout.buffer
        else:
            _check_space(self.path, self.fmt, result)
            self.tmp = _tempfile(self.path, "." + self.fmt)
            self.f = open(self.tmp, "wb")
        if self.fmt == "npy":
            _npy_header(self.f, result.shape, result.dtype)
        elif self.fmt == "npz":
            self.zip = zipfile.ZipFile(self.f, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            self.member = self.zip.open("jacobian.npy", "w", force_zip64=True)
            _npy_header(self.member, result.shape, result.dtype)
        else:
            self.text = io.TextIOWrapper(self.f, encoding="utf-8", newline="", write_through=True)
            self.writer = csv.writer(self.text)
            self.writer.writerow(["sample", "output"] + csv_columns(result))
            self.row_names = [csv_row_names(result)[i] for i in range(result.selection.size)]

    def write(self, result, a, b, block, rows):
        """Blocks come in the order of the file's bytes: samples, then rows within a sample."""
        if self.fmt == "npy":
            self.f.write(np.ascontiguousarray(block).data)
        elif self.fmt == "npz":
            self.member.write(np.ascontiguousarray(block).data)
        else:
            fmt = "%.9g" if block.dtype == np.float32 else "%.17g"
            for n in range(block.shape[0]):
                for r, name in enumerate(self.row_names[rows[0]:rows[1]]):
                    self.text.write(f"{a + n},{name}," + ",".join(fmt % v for v in block[n, r].tolist()) + "\n")

    # -- the CLI's side: commit or abort ------------------------------------------------------------

    def commit(self, result):
        if self.fmt == "npz":
            self.member.close()
            with self.zip.open("outputs.npy", "w", force_zip64=True) as m:
                np.lib.format.write_array(m, np.asarray(result.outputs), allow_pickle=False)
            if result.kind == "params":
                with self.zip.open("columns.npy", "w") as m:
                    np.lib.format.write_array(m, np.frombuffer(json.dumps(result.columns).encode(), np.uint8))
            self.zip.close()
        if self.text is not None:
            self.text.flush()
            self.text.detach()
        self.f.flush()
        if self.path != "-":
            self.f.close()
            os.replace(self.tmp, self.path)
            self.tmp = None
            if result.kind == "params" and self.fmt in ("npy", "csv"):
                write_columns(columns_path(self.path), result)

    def abort(self):
        if self.path != "-" and self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)
        self.tmp = None


def _npy_header(f, shape, dtype):
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_2_0(f, header) if len(repr(header)) > 60000 else np.lib.format.write_array_header_1_0(f, header)


def gib(nbytes):
    """A byte count for people: '264.3 GiB', '512.0 MiB', '48.8 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def _check_space(path, fmt, result):
    """Refuse up front a file that the disk cannot hold: a .npy or .npz is its values' bytes, a
    CSV at least two bytes a value."""
    need = int(np.prod(result.flat_shape, dtype=np.int64)) * (2 if fmt == "csv" else result.dtype.itemsize)
    folder = os.path.dirname(os.path.abspath(path))
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise UsageError(
            f"{path}: the Jacobian {tuple(result.shape)} takes {'at least ' if fmt == 'csv' else ''}{gib(need)}, more "
            f"than the {gib(free)} free in {folder}: ask for fewer outputs (--outputs), parameters (--param) or samples"
        )


def _tempfile(path, suffix):
    """A temporary file beside `path`, with the mode a new file would get (mkstemp uses 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part" + suffix, dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
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


def csv_columns(result):
    """Names of the CSV columns: input elements or parameter entries, as x[0][3], fc.weight[2][0]."""
    if result.kind == "input":
        return element_names(result.wrt, result.in_shape)
    return [n for c in result.columns for n in element_names(c["name"], c["shape"])]


def csv_row_names(result):
    return [element_names(result.of, result.out_shape)[i] for i in result.selection]
