"""Running parts of a block side by side: one Python thread per core, BLAS single-threaded;
and a memory allocator that reuses the sweeps' arrays.

numpy releases the GIL inside its loops and its BLAS calls, so threads that each take a share
of the samples (or directions) run in parallel. The many small matrix products of a Jacobian
(a convolution's per-offset products, a layer's per-sample outer products) are below the size
at which BLAS splits work over its own threads, so one thread per core doing whole parts beats
BLAS threading; large products lose nothing, since each thread still runs its own at full
speed. BLAS is set to one thread for the duration (OpenBLAS's setting is global to the
process), the GIL switch interval shortened, and both restored after. Where the BLAS cannot be controlled (not OpenBLAS, not Linux),
parts run one after the other, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import sys
import threading

_blas = None  # (get, set) of the loaded OpenBLAS, or () where there is none; found on first use
_lock = threading.Lock()
_depth = 0  # nested sections (runs in several threads of the caller's)
_saved = None


def cores() -> int:
    """The cores this process may run on; JACCLI_THREADS overrides."""
    env = os.environ.get("JACCLI_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _find_openblas():
    """(get_num_threads, set_num_threads) of the OpenBLAS that numpy loaded, or ()."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {c[-1] for c in map(str.split, maps) if len(c) >= 6 and "openblas" in c[-1].lower() and ".so" in c[-1]}
    except OSError:
        return ()
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "_64", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    put.restype, put.argtypes = None, [ctypes.c_int]
                    return get, put
    return ()


def _openblas():
    global _blas
    if _blas is None:
        import numpy  # noqa: F401  (loads the BLAS)

        _blas = _find_openblas()
    return _blas


def workers() -> int:
    """How many parts a block may be split into: the cores, if BLAS threading can be set to one."""
    n = cores()
    return n if n > 1 and _openblas() else 1


@contextlib.contextmanager
def section():
    """The block where parts run side by side: BLAS runs one thread per call, and the
    interpreter hands the GIL over every 0.5 ms instead of 5 ms (a part that returns from
    numpy waits less for the other's Python); both restored when the last such block ends."""
    global _depth, _saved
    blas = _openblas()
    with _lock:
        if _depth == 0:
            _saved = (blas[0]() if blas else None, sys.getswitchinterval())
            if blas:
                blas[1](1)
            sys.setswitchinterval(min(_saved[1], 5e-4))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if blas:
                    blas[1](_saved[0])
                sys.setswitchinterval(_saved[1])


def run(tasks):
    """Run the callables side by side (the first in this thread), return their results in order;
    the first exception raised by any of them is raised here once all have finished."""
    if len(tasks) == 1:
        return [tasks[0]()]
    results = [None] * len(tasks)
    errors = [None] * len(tasks)

    def one(i, ctx):
        try:
            results[i] = ctx.run(tasks[i])
        except BaseException as e:  # re-raised in the caller
            errors[i] = e

    threads = [threading.Thread(target=one, args=(i, contextvars.copy_context()), daemon=True) for i in range(1, len(tasks))]
    for t in threads:
        t.start()
    one(0, contextvars.copy_context())
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results


_malloc_tuned = False


def tune_malloc():
    """Keep freed blocks of up to 32 MiB in the heap for reuse (glibc only, once per process).

    A Jacobian's sweeps allocate arrays of the same few sizes again and again. glibc serves
    those above its mmap threshold with fresh mappings and returns them to the system on free,
    so every reuse faults its pages in again (a third of a convolutional network's time, and
    worse with threads, whose faults contend). With the mmap threshold at its 32 MiB maximum and
    the heap trimmed only above 256 MiB of free space, they are reused. Peak memory is
    unchanged; up to 256 MiB may stay with the process after a run. JACCLI_MALLOC=0 skips it.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if os.environ.get("JACCLI_MALLOC", "1") == "0":
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


def split(a, b, parts):
    """[a, b) in `parts` contiguous ranges of nearly equal size (no empty ones)."""
    parts = max(1, min(parts, b - a))
    edges = [a + (b - a) * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))
