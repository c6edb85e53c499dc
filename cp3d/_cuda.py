"""Load the CUDA sources in ``kernels/`` as ``cupy.RawModule`` objects.

Sources are read once and specialised with ``-D`` defines, never by string
formatting; each compiled module is cached per device.
"""

import functools
import hashlib
from importlib import resources


@functools.lru_cache(maxsize=None)
def _read_source(filename):
    return resources.files("cp3d.kernels").joinpath(filename).read_text()


def _include_dir():
    return str(resources.files("cp3d.kernels"))


@functools.lru_cache(maxsize=None)
def _sources_hash():
    """Hash of every kernel source and header.

    CuPy's on-disk cache is keyed on the compiled file's text and the options
    only; passing this as a define makes an edited header rebuild the module.
    """
    digest = hashlib.sha1()
    for entry in sorted(resources.files("cp3d.kernels").iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".cu", ".cuh")):
            digest.update(entry.read_bytes())
    return digest.hexdigest()[:16]


# Threads per block of the grid-stride kernels, and the most blocks launched.
THREADS = 256
_MAX_BLOCKS = 1 << 20


def launch_shape(n):
    """(blocks, threads) for a grid-stride kernel over `n` items."""
    return (max(1, min((n + THREADS - 1) // THREADS, _MAX_BLOCKS)),), (THREADS,)


def get_kernel(filename, kernel_name, defines=()):
    """Return the compiled kernel `kernel_name` from ``kernels/<filename>``.

    Parameters
    ----------
    filename : str
        A source file in ``kernels/``, e.g. ``"follow.cu"``.
    kernel_name : str
        The ``extern "C" __global__`` function to fetch.
    defines : tuple of str
        Preprocessor defines such as ``("NDIM=3",)``.
    """
    return _get_module(filename, tuple(defines)).get_function(kernel_name)


def _get_module(filename, defines):
    import cupy

    return _compiled_module(filename, defines, cupy.cuda.Device().id)


@functools.lru_cache(maxsize=None)
def _compiled_module(filename, defines, device_id):
    # device_id is part of the key: a module is bound to the device it was built on.
    import cupy

    # No fused multiply-add: the kernels then round exactly as the NumPy reference.
    options = ("-std=c++17", "--fmad=false", f"-I{_include_dir()}", f"-DCP3D_SOURCES={_sources_hash()}")
    options += tuple(f"-D{d}" for d in defines)
    return cupy.RawModule(code=_read_source(filename), options=options)
