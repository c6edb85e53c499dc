"""Backend selection and input validation shared by every pipeline stage.

A stage's public function validates its inputs here once, then dispatches to
``_numpy_*`` (the definition), ``_numba_*`` (CPU default) or ``_cuda_*``.
CuPy is imported lazily, only when a CuPy array or ``backend="cuda"`` asks
for it.
"""

import os
import sys

import numba
import numpy as np

BACKENDS = ("auto", "numpy", "numba", "cuda")
_numba_pool_started = False


def is_cupy_array(x):
    """Return True if `x` is a CuPy array, without importing CuPy."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def get_array_module(x):
    """Return ``cupy`` for a CuPy array and ``numpy`` otherwise."""
    if is_cupy_array(x):
        import cupy

        return cupy
    return np


def import_cupy():
    """Import CuPy, or raise an ``ImportError`` that says how to install it."""
    try:
        import cupy
    except ImportError as e:
        raise ImportError(f"backend='cuda' needs CuPy, which is not installed ({e}); pip install 'cp3d[gpu]'") from e
    return cupy


def resolve_backend(backend, *arrays):
    """Pick the backend for `arrays` and check that it can take them.

    Parameters
    ----------
    backend : {"auto", "numpy", "numba", "cuda"}
        The requested backend. ``"auto"`` means CUDA for CuPy arrays and
        Numba for NumPy arrays.
    *arrays : array_like or None
        The stage's array inputs; ``None`` entries are ignored.

    Returns
    -------
    str
        One of ``"numpy"``, ``"numba"``, ``"cuda"``.

    Raises
    ------
    ValueError
        For an unknown backend name.
    TypeError
        When NumPy and CuPy arrays are mixed, or the backend does not live on
        the arrays' device (we never copy between host and device silently).

    Notes
    -----
    Picking ``"numba"`` starts Numba's thread pool (once per process, see
    :func:`start_numba_pool`), so that no kernel starts it behind torch's back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kinds = {is_cupy_array(a) for a in arrays if a is not None}
    if len(kinds) > 1:
        raise TypeError("inputs mix NumPy and CuPy arrays; move them to one device first")
    on_gpu = kinds == {True}
    if backend == "auto":
        backend = "cuda" if on_gpu else "numba"
    if on_gpu and backend != "cuda":
        raise TypeError(
            f"backend={backend!r} runs on the CPU but got CuPy arrays; "
            "use backend='cuda' or pass NumPy arrays (e.g. cupy.asnumpy)"
        )
    if not on_gpu and backend == "cuda" and kinds:
        raise TypeError(
            "backend='cuda' needs CuPy arrays but got NumPy arrays; "
            "pass cupy.asarray(x) to run on the GPU"
        )
    if backend == "numba":
        start_numba_pool()
    return backend


def start_numba_pool():
    """Start Numba's thread pool, leaving torch's thread count as it was.

    Starting Numba's OpenMP pool sets the calling thread's OpenMP thread
    count to all of Numba's threads, and torch reads that count as its own:
    a user's ``torch.set_num_threads(1)`` would silently be undone by the
    first CPU kernel. Later calls do nothing.
    """
    global _numba_pool_started
    if _numba_pool_started:
        return
    torch = sys.modules.get("torch")
    threads = None if torch is None else torch.get_num_threads()
    numba.get_num_threads()  # launches the pool
    if torch is not None:
        torch.set_num_threads(threads)
    _numba_pool_started = True


def check_volume(x, name, ndim=3):
    """Check that `x` is a non-empty array with `ndim` dimensions.

    Returns the array unchanged (NumPy or CuPy); lists become NumPy arrays.
    """
    if not (isinstance(x, np.ndarray) or is_cupy_array(x)):
        x = np.asarray(x)
    if x.ndim != ndim:
        hint = " (a single 2D image? cp3d needs a 3D stack)" if ndim == 3 and x.ndim == 2 else ""
        raise ValueError(f"{name} must be {ndim}D, got shape {tuple(x.shape)}{hint}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def check_labels(labels, name="labels"):
    """Validate a 3D label volume and return it as C-contiguous uint32.

    Raises
    ------
    TypeError
        For a non-integer (float, bool) label dtype.
    ValueError
        For a non-3D or empty array, negative labels or ids above 2**32 - 1.
    """
    labels = check_volume(labels, name)
    xp = get_array_module(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.dtype.kind == "i" and labels.size and int(labels.min()) < 0:
        raise ValueError(f"{name} must be non-negative, found {int(labels.min())}")
    if labels.dtype.itemsize > 4 and int(labels.max()) > np.iinfo(np.uint32).max:
        raise ValueError(f"{name} holds ids above 2**32 - 1")
    return xp.ascontiguousarray(labels, dtype=np.uint32)


def check_flows(flows, name="flows"):
    """Validate a ``(3, Z, Y, X)`` flow field and return it as float32.

    Raises
    ------
    TypeError
        For a non-floating dtype.
    ValueError
        For a wrong shape, or NaN/inf values.
    """
    flows = check_volume(flows, name, ndim=4)
    if flows.shape[0] != 3:
        raise ValueError(f"{name} must have shape (3, Z, Y, X), got {tuple(flows.shape)}")
    if flows.dtype.kind != "f":
        raise TypeError(f"{name} must be floating point, got {flows.dtype}")
    xp = get_array_module(flows)
    flows = xp.ascontiguousarray(flows, dtype=np.float32)
    if not bool(xp.isfinite(flows).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return flows


def check_foreground(foreground, shape, name="foreground"):
    """Validate a foreground mask or probability map and return a bool mask.

    A probability map (floating point) is thresholded at 0.5.
    """
    foreground = check_volume(foreground, name)
    if tuple(foreground.shape) != tuple(shape):
        raise ValueError(
            f"{name} shape {tuple(foreground.shape)} does not match the volume shape {tuple(shape)}"
        )
    xp = get_array_module(foreground)
    if foreground.dtype.kind == "f":
        if not bool(xp.isfinite(foreground).all()):
            raise ValueError(f"{name} contains NaN or inf values")
        return xp.ascontiguousarray(foreground > 0.5)
    if foreground.dtype.kind not in "biu":
        raise TypeError(f"{name} must be bool, integer or a float probability, got {foreground.dtype}")
    return xp.ascontiguousarray(foreground != 0)


def as_triple(value, name, allow_zero=False):
    """Broadcast a scalar or a length-3 sequence to a tuple of three floats.

    Values must be finite and positive (or non-negative with `allow_zero`).
    """
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(3, arr)
    too_small = np.any(arr < 0) if allow_zero else np.any(arr <= 0)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or too_small:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} scalar or a (z, y, x) triple, got {value!r}")
    return tuple(float(v) for v in arr)


def physical_memory():
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(nbytes, what):
    """Raise ``ValueError`` before allocating `nbytes` that this machine's memory cannot hold.

    `what` says which input asks for them, e.g. ``"diameter=0.1"``; the
    message names it and the bytes needed.
    """
    total = physical_memory()
    if total is not None and nbytes > total:
        raise ValueError(
            f"{what} needs {_bytes(nbytes)}, more than this machine's memory ({_bytes(total)})"
        )


def _bytes(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
