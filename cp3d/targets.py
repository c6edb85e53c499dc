"""Training targets: flow fields computed from instance labels.

Both targets are float32 ``(3, Z, Y, X)`` fields (components in axis order
z, y, x) that point *away* from each cell's centre and are 0 on background;
reconstruction later moves voxels against them. The same functions recompute
flows from predicted instances in ``cp3d.filters``.

``tanh_flows``
    ``tanh((coord - centroid) / scale)`` per axis: cheap, smooth, bounded.
``heat_flows``
    Cellpose's flows: the normalised gradient of a heat diffusion from a
    source voxel inside each instance, so they follow non-convex shapes.
"""

import logging

import numba
import numpy as np
from numba import njit, prange

from ._backend import (MAX_ITER, as_triple, check_int, check_labels, get_array_module, resolve_backend,
                       start_numba_pool)

__all__ = ["tanh_flows", "heat_flows"]

logger = logging.getLogger(__name__)

# The 27 offsets of the 3x3x3 neighbourhood in C order: k = 9*(dz+1) + 3*(dy+1) + (dx+1).
_OFFSETS = tuple((dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
# Neighbour slots of the central differences: (+1, -1) along z, y and x.
_GRAD_SLOTS = ((22, 4), (16, 10), (14, 12))


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


# The one id-order renumbering of cp3d (the first-voxel one is
# group.relabel_by_first_voxel). Kept over skimage.segmentation.relabel_sequential,
# which numbers the same way: bench/bench_relabel.py measures it 2-3x faster,
# and it runs on CuPy arrays and on any shape.
def compact_ids(values):
    """Renumber integer ids to ``1..K`` in increasing id order, keeping 0 as 0.

    Parameters
    ----------
    values : ndarray of uint32
        Any shape, NumPy or CuPy.

    Returns
    -------
    compact : ndarray of uint32
        Same shape as `values`.
    n_labels : int
        K, the number of distinct non-zero ids.
    """
    xp = get_array_module(values)
    if values.size == 0:
        return values.astype(np.uint32), 0
    max_id = int(values.max())
    if max_id <= 2 * values.size + 1024:
        # Small ids: a lookup table indexed by the id (cuCIM style), no sort.
        present = xp.bincount(values.ravel(), minlength=max_id + 1) > 0
        present[0] = False
        lut = xp.cumsum(present, dtype=np.uint32)
        return lut[values], int(lut[-1])
    ids, inverse = xp.unique(values.ravel(), return_inverse=True)
    has_background = int(ids[0]) == 0
    compact = inverse.reshape(values.shape).astype(np.uint32)
    if not has_background:
        compact += 1
    return compact, int(ids.size) - int(has_background)


# ---------------------------------------------------------------------------
# tanh flows
# ---------------------------------------------------------------------------


def tanh_flows(labels, scale=5.0, *, backend="auto"):
    """Flows ``tanh((coord - centroid) / scale)`` pointing away from each centre.

    Parameters
    ----------
    labels : (Z, Y, X) ndarray of int
        Instance labels, 0 for background. Ids need not be consecutive.
        A NumPy or CuPy array.
    scale : float or sequence of 3 floats, optional
        Length, in voxels, over which the flow saturates; one value or a
        ``(z, y, x)`` triple for anisotropic voxels. Must be positive.
    backend : {"auto", "numpy", "numba", "cuda"}, optional
        ``"auto"`` picks CUDA for CuPy arrays and Numba for NumPy arrays.

    Returns
    -------
    flows : (3, Z, Y, X) ndarray of float32
        Components along z, y and x, in ``(-1, 1)``; 0 on background. The
        same array kind (NumPy or CuPy) as `labels`.

    Raises
    ------
    TypeError
        For non-integer labels, or a backend that does not run where the
        array lives (e.g. ``backend="cuda"`` with a NumPy array).
    ValueError
        For labels that are not 3D, an unknown backend or a bad `scale`.

    Notes
    -----
    For an instance with centroid ``c`` (mean voxel coordinate), each of its
    voxels gets ``flow[a] = tanh((coord[a] - c[a]) / scale[a])`` for the axes
    ``a = z, y, x``. Centroids are exact: the coordinate sums are integers
    held in float64, so every backend sums them to the same value. The NumPy
    and Numba backends agree to 1e-5; the CUDA backend synchronises the
    device when it reads back the number of labels.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.targets import tanh_flows
    >>> labels = np.zeros((1, 1, 5), dtype=np.uint16)
    >>> labels[0, 0, 1:4] = 7
    >>> flows = tanh_flows(labels, scale=1.0, backend="numpy")
    >>> flows.shape, flows.dtype
    ((3, 1, 1, 5), dtype('float32'))
    >>> np.round(flows[2, 0, 0], 3)
    array([ 0.   , -0.762,  0.   ,  0.762,  0.   ], dtype=float32)
    """
    labels = check_labels(labels)
    scale = as_triple(scale, "scale")
    backend = resolve_backend(backend, labels)
    compact, n_labels = compact_ids(labels)
    if backend == "numpy":
        return _numpy_tanh_flows(compact, n_labels, scale)
    if backend == "numba":
        return _numba_tanh_flows(compact, n_labels, scale)
    return _cuda_tanh_flows(compact, n_labels, scale)


def _numpy_tanh_flows(compact, n_labels, scale):
    """Reference: centroids by one weighted bincount per axis, then tanh."""
    shape = compact.shape
    flat = compact.ravel()
    fg = np.flatnonzero(flat)
    ids = flat[fg]
    counts = np.bincount(ids, minlength=n_labels + 1)
    flows = np.zeros((3,) + shape, dtype=np.float32)
    out = flows.reshape(3, -1)
    for axis, coord in enumerate(np.unravel_index(fg, shape)):
        sums = np.bincount(ids, weights=coord, minlength=n_labels + 1)
        centroid = sums / np.maximum(counts, 1)
        out[axis, fg] = np.tanh((coord - centroid[ids]) / scale[axis])
    return flows


def _numba_tanh_flows(compact, n_labels, scale):
    flows = np.empty((3,) + compact.shape, dtype=np.float32)
    centroid = numba_centroids(compact, n_labels)
    _numba_tanh_kernel(compact, centroid, np.asarray(scale, dtype=np.float64), flows)
    return flows


def numba_centroids(compact, n_labels):
    """Centroids ``(n_labels + 1, 3)`` (z, y, x) of compact labels; row 0 unused."""
    start_numba_pool()  # before numba.get_num_threads(), which would start it
    # Race-free sums: one partial table per z-slab (one slab per thread), then a reduction.
    n_slabs = max(1, min(compact.shape[0], numba.get_num_threads()))
    # The reduction stays in NumPy: array code inside a parallel kernel would
    # become one parallel region per label.
    sums = _numba_centroid_kernel(compact, n_labels, n_slabs).sum(axis=0)
    return sums[:, 1:] / np.maximum(sums[:, :1], 1.0)


@njit(parallel=True, cache=True)
def _numba_centroid_kernel(compact, n_labels, n_slabs):
    nz, ny, nx = compact.shape
    partial = np.zeros((n_slabs, n_labels + 1, 4))
    for s in prange(n_slabs):
        for z in range(s * nz // n_slabs, (s + 1) * nz // n_slabs):
            for y in range(ny):
                for x in range(nx):
                    lab = compact[z, y, x]
                    if lab != 0:
                        partial[s, lab, 0] += 1.0
                        partial[s, lab, 1] += z
                        partial[s, lab, 2] += y
                        partial[s, lab, 3] += x
    return partial


@njit(cache=True, inline="always")
def tanh_component(coord, centre, scale):
    """One component of the tanh target, as float32 (the Numba kernels' definition)."""
    return np.float32(np.tanh((coord - centre) / scale))


@njit(parallel=True, cache=True)
def _numba_tanh_kernel(compact, centroid, scale, flows):
    nz, ny, nx = compact.shape
    for z in prange(nz):
        for y in range(ny):
            for x in range(nx):
                lab = compact[z, y, x]
                if lab == 0:
                    flows[0, z, y, x] = 0.0
                    flows[1, z, y, x] = 0.0
                    flows[2, z, y, x] = 0.0
                else:
                    flows[0, z, y, x] = tanh_component(z, centroid[lab, 0], scale[0])
                    flows[1, z, y, x] = tanh_component(y, centroid[lab, 1], scale[1])
                    flows[2, z, y, x] = tanh_component(x, centroid[lab, 2], scale[2])


def _cuda_tanh_flows(compact, n_labels, scale):
    """Two kernels from kernels/targets.cu: atomic per-label sums, then flows."""
    import cupy

    from ._cuda import get_kernel, launch_shape

    nz, ny, nx = compact.shape
    n_vox = compact.size
    sums = cupy.zeros(4 * (n_labels + 1), dtype=cupy.float64)
    flows = cupy.empty((3, nz, ny, nx), dtype=cupy.float32)
    blocks, threads = launch_shape(n_vox)
    ny_, nx_, n_vox_ = np.int64(ny), np.int64(nx), np.int64(n_vox)
    get_kernel("targets.cu", "cp3d_tanh_accumulate")(blocks, threads, (compact, ny_, nx_, n_vox_, sums))
    inv = [np.float32(1.0 / s) for s in scale]
    get_kernel("targets.cu", "cp3d_tanh_write")(
        blocks, threads, (compact, sums, ny_, nx_, n_vox_, inv[0], inv[1], inv[2], flows)
    )
    return flows


# ---------------------------------------------------------------------------
# heat-diffusion flows
# ---------------------------------------------------------------------------


def heat_flows(labels, *, n_iter=None, backend="auto"):
    """Cellpose's heat-diffusion flows in 3D, pointing away from each centre.

    Parameters
    ----------
    labels : (Z, Y, X) ndarray of int
        Instance labels, 0 for background. Ids need not be consecutive.
        A NumPy or CuPy array.
    n_iter : int, optional
        Diffusion steps. Default: twice the largest extent (in voxels, along
        any axis) of any instance, as Cellpose does.
    backend : {"auto", "numpy", "numba", "cuda"}, optional
        ``"auto"`` picks CUDA for CuPy arrays and Numba for NumPy arrays.

    Returns
    -------
    flows : (3, Z, Y, X) ndarray of float32
        Unit vectors (components z, y, x) on the foreground, 0 where the
        gradient vanishes and on background. The same array kind (NumPy or
        CuPy) as `labels`.

    Raises
    ------
    TypeError
        For non-integer labels or `n_iter`, or a backend that does not run
        where the array lives.
    ValueError
        For labels that are not 3D, an unknown backend or ``n_iter < 1``.

    Notes
    -----
    Every instance gets a source: the voxel of the instance closest to its
    per-axis median coordinate (ties go to the first voxel in C order), so
    it lies inside non-convex cells. All instances then diffuse at once,
    each confined to itself: `n_iter` times, ``T[source] += 1`` and then
    every voxel takes the mean of ``T`` over its 3x3x3 neighbourhood, with
    neighbours outside the instance counting as 0. The flow is the central
    difference gradient of ``T`` (``T[z+1] - T[z-1]`` etc., again 0 outside
    the instance), normalised to unit length and negated so that it points
    away from the source (Cellpose's flows point inward). Unlike some
    Cellpose versions no ``log(1 + T)`` is taken; it would not change the
    normalised direction much and the gradient of ``T`` is simpler.

    The NumPy and Numba backends give the same sums in the same order and
    agree to 1e-4. The CUDA backend builds the sources and neighbour table
    with the NumPy code on CuPy arrays (which synchronises the device), then
    diffuses with two kernel launches per step (``kernels/heat.cu``), summing
    in the same order as NumPy.
    Memory: a table of 27 neighbour indices per foreground voxel (int32).

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.targets import heat_flows
    >>> labels = np.zeros((5, 5, 5), dtype=np.uint8)
    >>> labels[1:4, 1:4, 1:4] = 1
    >>> flows = heat_flows(labels, backend="numpy")
    >>> np.round(flows[:, 1, 2, 2], 3)   # bottom face centre: points to -z
    array([-1.,  0.,  0.], dtype=float32)
    >>> float(np.abs(flows[:, 0]).max())  # background
    0.0
    """
    labels = check_labels(labels)
    n_iter = None if n_iter is None else check_int(n_iter, "n_iter", 1, MAX_ITER)
    backend = resolve_backend(backend, labels)
    xp = get_array_module(labels)
    flows = xp.zeros((3,) + labels.shape, dtype=np.float32)
    setup = _heat_sources(labels)
    if setup is None:  # no instances
        return flows
    fg, sources, default_n_iter = setup
    n_iter = default_n_iter if n_iter is None else n_iter
    logger.debug("heat_flows: %d voxels, %d instances, %d steps", fg.size, sources.size, n_iter)
    if backend == "numba":
        fg_flows = _numba_heat_flows(_numba_neighbour_table(labels, fg), sources, n_iter)
    elif backend == "cuda":
        fg_flows = _cuda_heat_flows(_neighbour_table(labels, fg), sources, n_iter)
    else:
        fg_flows = _numpy_heat_flows(_neighbour_table(labels, fg), sources, n_iter)
    flows.reshape(3, -1)[:, fg] = fg_flows
    return flows


def _heat_sources(labels):
    """Foreground voxels, each instance's heat source and the default step count.

    Array-module generic (NumPy or CuPy), shared by every backend.

    Returns
    -------
    fg : (N,) int64
        Flat C-order indices of the foreground voxels, increasing.
    sources : (K,) int64
        Position in `fg` of each instance's source, instances in id order.
    n_iter : int
        Twice the largest extent (voxels along any axis) of any instance.

    ``None`` when there is no foreground.
    """
    xp = get_array_module(labels)
    shape = labels.shape
    fg = xp.flatnonzero(labels.ravel())
    if fg.size == 0:
        return None
    compact, n_labels = compact_ids(labels.ravel()[fg])
    inst = compact.astype(np.int64) - 1  # 0..K-1 per foreground voxel
    counts = xp.bincount(inst, minlength=n_labels)
    starts = xp.cumsum(counts) - counts
    coords = xp.unravel_index(fg, shape)

    def sorted_within_instances(values, span):
        # values (0 <= v < span) sorted inside each instance's group, groups in id order
        return xp.sort(inst * span + values) % span

    medians, extent = [], 0
    for coord, size in zip(coords, shape):
        s = sorted_within_instances(coord, size)
        medians.append(s[starts + (counts - 1) // 2])
        extent = max(extent, int((s[starts + counts - 1] - s[starts]).max()) + 1)
    # The source: the voxel closest to the per-axis median, first in C order on ties.
    d2 = sum((coord - med[inst]) ** 2 for coord, med in zip(coords, medians))
    min_d2 = sorted_within_instances(d2, int(d2.max()) + 1)[starts]
    candidates = xp.flatnonzero(d2 == min_d2[inst])
    _, first = xp.unique(inst[candidates], return_index=True)
    return fg, candidates[first], 2 * extent


def _index_dtype(n):
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def _neighbour_table(labels, fg):
    """The ``(27, N)`` neighbour table; array-module generic.

    ``nbr[k, i]`` is the position in `fg` of the k-th neighbour (order of
    ``_OFFSETS``) of foreground voxel i, or N when that neighbour lies
    outside i's instance (or outside the volume).
    """
    xp = get_array_module(labels)
    shape, flat, n = labels.shape, labels.ravel(), int(fg.size)
    dtype = _index_dtype(n)
    position = xp.full(flat.size, n, dtype=dtype)
    position[fg] = xp.arange(n, dtype=dtype)
    coords = xp.unravel_index(fg, shape)
    ids = flat[fg]
    strides = (shape[1] * shape[2], shape[2], 1)
    nbr = xp.empty((27, n), dtype=dtype)
    for k, offset in enumerate(_OFFSETS):
        inside = xp.ones(n, dtype=bool)
        for coord, size, d in zip(coords, shape, offset):
            if d:
                inside &= (coord + d >= 0) & (coord + d < size)
        j = xp.where(inside, fg + sum(d * st for d, st in zip(offset, strides)), 0)
        same = inside & (flat[j] == ids)
        nbr[k] = xp.where(same, position[j], n)
    return nbr


def _numba_neighbour_table(labels, fg):
    start_numba_pool()
    n = fg.size
    dtype = _index_dtype(n)
    position = np.full(labels.size, n, dtype=dtype)
    position[fg] = np.arange(n, dtype=dtype)
    nbr = np.empty((27, n), dtype=dtype)
    _numba_neighbour_kernel(labels, fg, position, nbr)
    return nbr


@njit(parallel=True, cache=True)
def _numba_neighbour_kernel(labels, fg, position, nbr):
    nz, ny, nx = labels.shape
    n = fg.size
    for i in prange(n):
        f = fg[i]
        x = f % nx
        y = (f // nx) % ny
        z = f // (nx * ny)
        lab = labels[z, y, x]
        k = 0
        for dz in range(-1, 2):
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    zz, yy, xx = z + dz, y + dy, x + dx
                    if 0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx and labels[zz, yy, xx] == lab:
                        nbr[k, i] = position[(zz * ny + yy) * nx + xx]
                    else:
                        nbr[k, i] = n
                    k += 1


def _numpy_heat_flows(nbr, sources, n_iter):
    """Reference diffusion and gradient; array-module generic (runs on CuPy too).

    ``T`` has one slot per foreground voxel plus a last slot that stays 0 and
    stands for every neighbour outside the instance. Each step is a gather
    of the 27 neighbours, summed in the fixed order of ``_OFFSETS``.
    Returns the ``(3, N)`` float32 flows of the foreground voxels.
    """
    xp = get_array_module(nbr)
    n = nbr.shape[1]
    temp = xp.zeros(n + 1, dtype=np.float64)
    for _ in range(n_iter):
        temp[sources] += 1.0
        acc = temp[nbr[0]]
        for k in range(1, 27):
            acc += temp[nbr[k]]
        temp[:n] = acc / 27.0
    # Minus the gradient (T[z-1] - T[z+1], ...): the gradient climbs to the
    # source, the flows point away from it.
    down = xp.stack([temp[nbr[lo]] - temp[nbr[hi]] for hi, lo in _GRAD_SLOTS])
    norm = xp.sqrt(down[0] * down[0] + down[1] * down[1] + down[2] * down[2])
    return xp.where(norm > 0, down / xp.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)


def _cuda_heat_flows(nbr, sources, n_iter):
    import cupy

    from ._cuda import get_kernel, launch_shape

    n = nbr.shape[1]
    defines = () if nbr.dtype == np.int32 else ("CP3D_NBR_T=long long",)
    add, step, flows = (get_kernel("heat.cu", name, defines)
                        for name in ("cp3d_heat_add_sources", "cp3d_heat_step", "cp3d_heat_flows"))
    sources = sources.astype(cupy.int64)
    temp, new = cupy.zeros(n + 1, cupy.float64), cupy.zeros(n + 1, cupy.float64)
    grid, source_grid = launch_shape(n), launch_shape(sources.size)
    n_ = np.int64(n)
    for _ in range(n_iter):
        add(*source_grid, (sources, np.int64(sources.size), temp))
        step(*grid, (nbr, n_, temp, new))
        temp, new = new, temp
    out = cupy.empty((3, n), cupy.float32)
    flows(*grid, (nbr, n_, temp, out))
    return out


# Python handles Ctrl-C only between kernel calls, so the diffusion runs in
# slices of iterations of about this many neighbour reads (a fraction of a
# second). The temperatures stay float64 in memory between slices: same result.
_HEAT_SLICE_READS = 1 << 27


def _numba_heat_flows(nbr, sources, n_iter):
    n = nbr.shape[1]
    temp, new = np.zeros(n + 1), np.zeros(n + 1)
    per_slice = max(1, _HEAT_SLICE_READS // (27 * max(n, 1)))
    for done in range(0, n_iter, per_slice):
        temp, new = _numba_heat_steps(nbr, sources, min(per_slice, n_iter - done), temp, new)
    out = np.empty((3, n), dtype=np.float32)
    _numba_heat_gradient(nbr, temp, np.asarray(_GRAD_SLOTS, dtype=np.int64), out)
    return out


@njit(parallel=True, cache=True, nogil=True)
def _numba_heat_steps(nbr, sources, n_iter, temp, new):
    """`n_iter` diffusion steps from `temp`; returns (temperatures, spare buffer)."""
    n = nbr.shape[1]
    for _ in range(n_iter):
        for s in sources:
            temp[s] += 1.0
        for i in prange(n):
            acc = temp[nbr[0, i]]
            for k in range(1, 27):
                acc += temp[nbr[k, i]]
            new[i] = acc / 27.0
        temp, new = new, temp
    return temp, new


@njit(parallel=True, cache=True, nogil=True)
def _numba_heat_gradient(nbr, temp, grad_slots, out):
    n = nbr.shape[1]
    for i in prange(n):
        dz = temp[nbr[grad_slots[0, 1], i]] - temp[nbr[grad_slots[0, 0], i]]
        dy = temp[nbr[grad_slots[1, 1], i]] - temp[nbr[grad_slots[1, 0], i]]
        dx = temp[nbr[grad_slots[2, 1], i]] - temp[nbr[grad_slots[2, 0], i]]
        norm = np.sqrt(dz * dz + dy * dy + dx * dx)
        if norm > 0:
            out[0, i] = dz / norm
            out[1, i] = dy / norm
            out[2, i] = dx / norm
        else:
            out[0, i] = 0.0
            out[1, i] = 0.0
            out[2, i] = 0.0
