"""Backend selection and input validation shared by every pipeline stage.

A stage's public function validates its inputs here once, then dispatches to
``_numpy_*`` (the definition), ``_numba_*`` (CPU default) or ``_cuda_*``.
CuPy is imported lazily, only when a CuPy array or ``backend="cuda"`` asks
for it.
"""

import numbers
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
    Only a choice, without side effects: a stage calls
    :func:`start_numba_pool` where its Numba kernels start, so that no kernel
    starts the pool behind torch's back and a call that fails validation
    starts nothing.
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
    return as_finite_float32(flows, name)


def as_finite_float32(x, name):
    """`x` as C-contiguous float32; ``ValueError`` for NaN, inf, or finite values beyond float32's range."""
    xp = get_array_module(x)
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        converted = xp.ascontiguousarray(x, dtype=np.float32)
    if not bool(xp.isfinite(converted).all()):
        if bool(xp.isfinite(x).all()):  # only the cast overflowed
            raise ValueError(f"{name} holds values beyond the float32 range (|x| up to "
                             f"{float(xp.abs(x).max()):.3g}, float32 stops at 3.4e38)")
        raise ValueError(f"{name} contains NaN or inf values")
    return converted


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


#: Largest iteration count: the CUDA kernels count iterations in 32-bit integers.
MAX_ITER = 2**31 - 1


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_float(value):
    try:
        return float(value)
    except OverflowError:  # an int beyond float64
        return float("inf") if value > 0 else float("-inf")


def _interval(low, high, low_open=False):
    if high == np.inf:
        return f"> {low:g}" if low_open else f">= {low:g}"
    return f"{'(' if low_open else '['}{low:g}, {high:g}]"


def check_scalar(value, name, low=-np.inf, high=np.inf, *, low_open=False):
    """Return a real number `value` as a float after checking it lies in ``[low, high]``.

    `low_open` excludes `low` itself. ``TypeError`` for anything but a real
    number (strings, None, bools, sequences), ``ValueError`` for NaN or a value
    out of range; both name the parameter.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = _as_float(value)
    if not ((low < number) if low_open else (low <= number)) or not number <= high:
        raise ValueError(f"{name} must be a number {_interval(low, high, low_open)}, got {value!r}")
    return number


def check_int(value, name, low, high):
    """Return an integer `value` as an int after checking it lies in ``[low, high]``.

    ``TypeError`` for a non-integer (floats, even integral ones, NaN, inf,
    bools, strings), ``ValueError`` out of range.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def check_step(step, n_iter):
    """Validate the flow-following step and iteration count; return them as ``(float, int)``.

    The step must be positive and finite in float32 (the kernels' precision:
    3.5e38 is inf there); `n_iter` an integer in ``[0, MAX_ITER]``.
    """
    step = check_scalar(step, "step", 0, float(np.finfo(np.float32).max), low_open=True)
    if np.float32(step) == 0:
        raise ValueError(f"step must be a number > 0 in float32 precision, got {step!r}")
    return step, check_int(n_iter, "n_iter", 0, MAX_ITER)


def check_bool(value, name):
    """Return `value` if it is a bool (Python or NumPy); ``TypeError`` otherwise (e.g. the string "no")."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _items(value, name, what):
    """A scalar repeated three times, or the three items of a sequence; the checks shared by the triples."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, np.bool_)):
        return (value,) * 3
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be {what} or a (z, y, x) triple of them, got {value!r}")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be {what} or a (z, y, x) triple of them, got {value!r}") from None
    if len(items) != 3:
        raise ValueError(f"{name} must be {what} or a (z, y, x) triple of them, got {len(items)} values: {value!r}")
    return items


def as_triple(value, name, allow_zero=False, high=np.inf):
    """Broadcast a number or a length-3 sequence to a tuple of three floats.

    Values must be positive (non-negative with `allow_zero`), at most `high`
    and finite; subnormal values (below 2.2e-308, whose inverse overflows)
    count as zero.

    Raises
    ------
    TypeError
        For anything but numbers (strings, None, bools).
    ValueError
        For a wrong length, NaN, inf or a value out of range.
    """
    kind = "a non-negative number" if allow_zero else "a positive number"
    items = _items(value, name, kind)
    if not all(_is_real(v) for v in items):
        raise TypeError(f"{name} must be {kind} or a (z, y, x) triple of them, got {value!r}")
    arr = np.array([_as_float(v) for v in items])
    tiny = np.finfo(np.float64).tiny
    too_small = np.any((arr < tiny) & (arr != 0)) or (not allow_zero and np.any(arr == 0))
    if too_small or not np.all(np.isfinite(arr)) or np.any(arr > high):
        limit = "" if high == np.inf else f" at most {high:g}"
        raise ValueError(f"{name} must be {kind}{limit} or a (z, y, x) triple of them, got {value!r}")
    return tuple(float(v) for v in arr)


def as_int_triple(value, name, allow_zero=False):
    """Broadcast an int or a length-3 sequence of ints to a tuple of three positive (or non-negative) ints."""
    kind = "a non-negative integer" if allow_zero else "a positive integer"
    items = _items(value, name, kind)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in items):
        raise TypeError(f"{name} must be {kind} or a (z, y, x) triple of them, got {value!r}")
    if not all(v >= (0 if allow_zero else 1) for v in items):
        raise ValueError(f"{name} must be {kind} or a (z, y, x) triple of them, got {value!r}")
    return tuple(int(v) for v in items)


def check_size_range(value, name):
    """Return ``(min, max)`` floats with ``0 <= min <= max`` (max may be inf), e.g. a diameter or volume range."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a (min, max) pair of numbers, got {value!r}")
    if len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {len(value)} values: {value!r}")
    lo = check_scalar(value[0], f"{name}[0]", 0, np.finfo(np.float64).max)
    hi = check_scalar(value[1], f"{name}[1]", 0)
    if lo > hi:
        raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {value!r}")
    return lo, hi


#: The central crop a whole stack is sampled by when one number is read from it: the cell size and the model a
#: chunked run uses (:func:`cp3d.dask.segment_central_crop`), the flows' tanh scale (``cp3d reconstruct``): a few
#: dozen cells of up to 40 voxels.
CENTRAL_CROP = (64, 256, 256)


def central_box(box, size):
    """Slices of at most `size` voxels per axis, centred in `box` (a tuple of slices with starts and stops).

    Examples
    --------
    >>> central_box((slice(0, 10), slice(4, 8)), (4, 8))
    (slice(3, 7, None), slice(4, 8, None))
    """
    centred = []
    for s, n in zip(box, size):
        first = s.start + max(0, s.stop - s.start - n) // 2
        centred.append(slice(first, min(s.stop, first + n)))
    return tuple(centred)


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
    n = _as_float(n)
    if not n < 1024**6:
        return f"{n:.3g} bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
