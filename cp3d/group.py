"""Grouping: close the gathered end positions with a ball, label components."""

import math

import numba
import numpy as np

from ._backend import (as_triple, check_labels, check_memory, check_volume, get_array_module, resolve_backend,
                       start_numba_pool)


def close_and_label(mask, radius=3, *, backend="auto"):
    """Close a binary volume with a ball and label its connected components.

    The closing is taken as if the volume continued with background beyond
    its borders, so it never removes a voxel of `mask` (unlike
    ``scipy.ndimage.binary_closing``, which erodes at the borders).
    Components are 6-connected and numbered 1..N in the C order of their
    first voxel, so every backend returns the same labels.

    Parameters
    ----------
    mask : ndarray, shape (Z, Y, X)
        Marked voxels, e.g. the end positions of :func:`cp3d.follow_flows`.
    radius : float or sequence of 3 floats
        Radius ``r_closing`` of the structuring element in voxels; a triple
        (z, y, x) gives an ellipsoid for anisotropic voxels.
    backend : {"auto", "numpy", "numba", "cuda"}
        Implementation; ``"auto"`` picks CUDA for CuPy and Numba for NumPy.

    Returns
    -------
    labels : ndarray, shape (Z, Y, X), uint32
        Component ids 1..N, 0 outside the closed mask.

    Notes
    -----
    The Numba backend works on the marked voxels only: it paints a ball
    around each, keeps the painted voxels whose ball fits in the painting,
    and labels with a two-pass union-find, so its cost grows with the number
    of marked voxels and not with the number of cells. The CUDA backend
    uses ``cupyx.scipy.ndimage``, whose labelling counts in int32: volumes
    of 2**31 voxels and more are labelled in z-slabs and merged across the
    slab faces (:func:`label_in_slabs`).

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d import close_and_label
    >>> mask = np.zeros((7, 7, 13), bool)
    >>> mask[1:6, 1:6, 1:6] = mask[1:6, 1:6, 7:12] = True  # two cubes, one voxel apart along x
    >>> close_and_label(mask, radius=0)[3, 3]  # no closing: two components
    array([0, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 0], dtype=uint32)
    >>> close_and_label(mask, radius=1)[3, 3]  # the ball closes the gap
    array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=uint32)
    """
    backend = resolve_backend(backend, mask)
    mask = check_volume(mask, "mask")
    xp = get_array_module(mask)
    mask = xp.ascontiguousarray(mask != 0)
    offsets = ball_offsets(radius)
    # the closing works on the volume padded by the ball's extent
    check_memory(math.prod(n + 2 * int(e) for n, e in zip(mask.shape, np.abs(offsets).max(axis=0))),
                 f"radius={radius!r} on a {tuple(mask.shape)} volume")
    impl = {"numpy": _numpy_close_and_label, "numba": _numba_close_and_label,
            "cuda": _cuda_close_and_label}[backend]
    return impl(mask, offsets)


def ball_offsets(radius, name="radius"):
    """Offsets (dz, dy, dx) of the voxels of an (ellipsoidal) ball, int64 (K, 3).

    ``ValueError`` naming `name` when the ball's offsets would not fit in memory.
    """
    r = np.asarray(as_triple(radius, name, allow_zero=True))
    check_memory(ball_bytes(r), f"{name}={radius!r}")
    extent = np.floor(r).astype(int)
    grid = np.mgrid[tuple(slice(-e, e + 1) for e in extent)].reshape(3, -1).T
    scaled = grid / np.where(r > 0, r, 1)
    # 1e-9 keeps voxels exactly on the sphere, as skimage.morphology.ball does.
    return grid[(scaled**2).sum(axis=1) <= 1 + 1e-9].astype(np.int64)


def ball_bytes(radius):
    """Bytes :func:`ball_offsets` allocates for `radius` (a number or a triple): 3 int64 and 3 float64 per
    voxel of the ball's bounding box."""
    return math.prod(2 * math.floor(v) + 1 for v in np.broadcast_to(radius, 3)) * 48


def _ball_footprint(offsets):
    extent = np.abs(offsets).max(axis=0)
    footprint = np.zeros(2 * extent + 1, bool)
    footprint[tuple((offsets + extent).T)] = True
    return footprint, extent


def _numpy_close_and_label(mask, offsets):
    from scipy import ndimage

    footprint, extent = _ball_footprint(offsets)
    pad = [(e, e) for e in extent]
    closed = ndimage.binary_closing(np.pad(mask, pad), structure=footprint)
    closed = closed[tuple(slice(e, e + n) for e, n in zip(extent, mask.shape))]
    labels, _ = ndimage.label(closed)  # numbers components in C order of first voxel
    return labels.astype(np.uint32)


def _numba_close_and_label(mask, offsets):
    start_numba_pool()
    closed = np.zeros(mask.shape, np.bool_)
    extent = np.abs(offsets).max(axis=0)
    padded = np.zeros(tuple(np.asarray(mask.shape) + 2 * extent), np.bool_)
    marked = np.flatnonzero(mask)
    _paint_balls(marked, mask.shape, extent, offsets, padded)
    _erode_painted(padded, extent, offsets, closed)
    del padded
    labels = np.zeros(mask.shape, np.uint32)
    _label_components(closed, labels)
    return labels


@numba.njit(parallel=True, cache=True, nogil=True)
def _paint_balls(marked, shape, extent, offsets, padded):
    ny, nx = shape[1], shape[2]
    for i in numba.prange(marked.size):
        s = marked[i]
        z = s // (ny * nx) + extent[0]
        y = (s // nx) % ny + extent[1]
        x = s % nx + extent[2]
        for k in range(offsets.shape[0]):
            padded[z + offsets[k, 0], y + offsets[k, 1], x + offsets[k, 2]] = True


@numba.njit(parallel=True, cache=True, nogil=True)
def _erode_painted(padded, extent, offsets, closed):
    nz, ny, nx = closed.shape
    for z in numba.prange(nz):
        for y in range(ny):
            for x in range(nx):
                pz, py, px = z + extent[0], y + extent[1], x + extent[2]
                if not padded[pz, py, px]:
                    continue
                inside = True
                for k in range(offsets.shape[0]):
                    if not padded[pz + offsets[k, 0], py + offsets[k, 1], px + offsets[k, 2]]:
                        inside = False
                        break
                closed[z, y, x] = inside


@numba.njit(cache=True, nogil=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


# Kept over scipy.ndimage.label (same numbering): bench/bench_relabel.py
# measures it 2.5-4x faster on reconstruct's closed masks (mostly background,
# small blobs) and 2x faster on a whole foreground, at 1e7-5e7 voxels, and it
# writes uint32 labels in place where SciPy's are int32.
@numba.njit(cache=True, nogil=True)
def _label_components(closed, labels):
    """Two-pass union-find, 6-connectivity; ids by first voxel in C order."""
    nz, ny, nx = closed.shape
    parent = np.empty(0, np.uint32)
    capacity = 0
    n = 0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if not closed[z, y, x]:
                    continue
                # Provisional ids grow in C order and a union keeps the smaller
                # root, so every root is the id of its component's first voxel.
                cur = 0
                for nb in (labels[z - 1, y, x] if z > 0 else 0,
                           labels[z, y - 1, x] if y > 0 else 0,
                           labels[z, y, x - 1] if x > 0 else 0):
                    if nb == 0:
                        continue
                    r = _find(parent, nb)
                    if cur == 0:
                        cur = r
                    elif r != cur:
                        lo, hi = min(r, cur), max(r, cur)
                        parent[hi] = lo
                        cur = lo
                if cur == 0:
                    n += 1
                    if n >= capacity:
                        capacity = max(1024, 2 * capacity)
                        grown = np.empty(capacity, np.uint32)
                        grown[: parent.size] = parent
                        parent = grown
                    parent[n] = n
                    cur = n
                labels[z, y, x] = cur
    final = np.zeros(n + 1, np.uint32)
    count = 0
    for i in range(1, n + 1):
        r = _find(parent, i)
        if r == i:
            count += 1
            final[i] = count
        else:
            final[i] = final[r]
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if labels[z, y, x]:
                    labels[z, y, x] = final[labels[z, y, x]]


def _cuda_close_and_label(mask, offsets):
    import cupy
    from cupyx.scipy import ndimage

    footprint, extent = _ball_footprint(offsets)
    pad = [(int(e), int(e)) for e in extent]
    closed = ndimage.binary_closing(cupy.pad(mask, pad), structure=cupy.asarray(footprint))
    closed = closed[tuple(slice(int(e), int(e) + n) for e, n in zip(extent, mask.shape))]
    labels = label_in_slabs(cupy.ascontiguousarray(closed), ndimage.label, _CUPYX_LABEL_VOXELS)
    return relabel_by_first_voxel(labels, backend="cuda")


# cupyx.scipy.ndimage.label indexes and counts in int32: on a larger volume it
# returns wrong labels without an error, so it is given z-slabs below this size.
_CUPYX_LABEL_VOXELS = 2**31 - 1


def label_in_slabs(mask, label, max_voxels):
    """6-connected components of `mask`, labelled in z-slabs and merged across their faces.

    Parameters
    ----------
    mask : ndarray of bool, shape (Z, Y, X)
        NumPy or CuPy, C-contiguous.
    label : callable
        ``scipy.ndimage.label`` or ``cupyx.scipy.ndimage.label`` (6-connected
        by default), applied to one slab at a time.
    max_voxels : int
        Largest slab the labeller takes; the slabs are whole z-planes.

    Returns
    -------
    labels : ndarray, shape (Z, Y, X), uint32
        The same partition as labelling the whole volume at once, with ids
        not necessarily consecutive nor in C order (see
        :func:`relabel_by_first_voxel`).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage
    >>> from cp3d.group import label_in_slabs, relabel_by_first_voxel
    >>> mask = np.zeros((4, 3, 3), bool)
    >>> mask[:, 1, 1] = True  # one column crossing every slab of one plane
    >>> int(relabel_by_first_voxel(label_in_slabs(mask, ndimage.label, 9)).max())
    1
    """
    xp = get_array_module(mask)
    plane = int(np.prod(mask.shape[1:]))
    if plane > max_voxels:
        raise ValueError(f"one z-plane has {plane} voxels, more than the labeller takes ({max_voxels})")
    depth = max(1, max_voxels // plane)
    if depth >= mask.shape[0]:
        return label(mask)[0].astype(np.uint32)
    labels = xp.empty(mask.shape, np.uint32)
    total = 0
    for start in range(0, mask.shape[0], depth):
        part, count = label(mask[start:start + depth])
        if total + int(count) > np.iinfo(np.uint32).max:
            raise ValueError("more than 2**32 - 1 components")
        labels[start:start + depth] = xp.where(part > 0, part.astype(np.uint32) + np.uint32(total), 0)
        total += int(count)
    # Components that continue across a slab face are one.
    pairs = []
    for start in range(depth, mask.shape[0], depth):
        below, above = labels[start - 1].ravel(), labels[start].ravel()
        both = (below > 0) & (above > 0)
        pairs.append(xp.stack([below[both], above[both]], axis=1))
    pairs = xp.concatenate(pairs)
    if pairs.size == 0:
        return labels
    pairs = np.asarray(pairs.get() if xp is not np else pairs, np.int64)
    return xp.asarray(merge_table([pairs], total))[labels]


def mark_end_voxels(index, shape, box):
    """A mask of `box` with the voxels that flat indices `index` point to.

    The chunked reconstruction (:mod:`cp3d.dask`) marks, around each chunk,
    the end voxels of every voxel that can land there before closing them.

    Parameters
    ----------
    index : ndarray of int
        C-order flat indices into a volume of `shape`; negative entries
        (background) mark nothing.
    shape : sequence of 3 ints
        Shape (Z, Y, X) of the volume.
    box : tuple of 3 slices
        Region of the volume the mask covers.

    Returns
    -------
    ndarray of bool, shape of `box`

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.group import mark_end_voxels
    >>> index = np.array([-1, 0, 5, 63])  # in a 4x4x4 volume
    >>> np.argwhere(mark_end_voxels(index, (4, 4, 4), (slice(0, 1), slice(0, 2), slice(0, 4)))).tolist()
    [[0, 0, 0], [0, 1, 1]]
    """
    mask = np.zeros(tuple(s.stop - s.start for s in box), bool)
    # One pass over the indices: unravelling and filtering them in NumPy took 3x as long (a 23M-voxel region).
    _mark_kernel(np.ascontiguousarray(index).ravel(), np.asarray(shape, np.int64),
                 np.array([s.start for s in box], np.int64), mask)
    return mask


@numba.njit(cache=True, nogil=True)
def _mark_kernel(index, shape, origin, mask):
    ny, nx = shape[1], shape[2]
    bz, by, bx = mask.shape
    for i in index:
        if i < 0:
            continue
        z = i // (ny * nx) - origin[0]
        y = (i // nx) % ny - origin[1]
        x = i % nx - origin[2]
        if 0 <= z < bz and 0 <= y < by and 0 <= x < bx:
            mask[z, y, x] = True


def merge_table(pairs, n):
    """Lookup table joining ids 0..n that are paired, transitively (0 stays 0).

    Labels made piece by piece (chunks, slabs) are glued where pieces touch:
    a graph of the touching pairs, its connected components (SciPy), and one
    table to index the labels with.

    Parameters
    ----------
    pairs : sequence of ndarray, each shape (K, 2), int
        Ids that belong together.
    n : int
        The largest id.

    Returns
    -------
    table : ndarray, shape (n + 1,), uint32
        Merged ids numbered 1.. in the order of their smallest member.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.group import merge_table
    >>> merge_table([np.array([[2, 4], [4, 5]])], 5).tolist()
    [0, 1, 2, 3, 2, 2]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.concatenate([np.zeros((0, 2), np.int64)] + list(pairs))
    graph = coo_matrix((np.ones(len(pairs), bool), (pairs[:, 0], pairs[:, 1])), shape=(n + 1, n + 1))
    _, component = connected_components(graph, directed=False)
    # Components numbered 1.. in order of their smallest id (0 is id 0's own component).
    _, first, inverse = np.unique(component, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].astype(np.uint32)


def relabel_by_first_voxel(labels, backend="auto", keep=None):
    """Renumber the ids of a label volume 1..N in C order of their first voxel.

    Ids need not be consecutive (filtering leaves gaps); 0 stays background.
    The NumPy definition (also run on CuPy arrays) is one scatter-min of flat
    indices and a lookup table, never a loop over labels; the Numba backend
    is one serial scan.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X), unsigned integer
        Label volume.
    backend : {"auto", "numpy", "numba", "cuda"}
        Implementation.
    keep : ndarray of bool, shape (labels.max() + 1,), optional
        Ids to keep; the others become background.

    Returns
    -------
    relabelled : ndarray, shape (Z, Y, X), the dtype of `labels`
        Ids 1..N; the same numbering as ``scipy.ndimage.label`` gives its
        components.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.group import relabel_by_first_voxel
    >>> labels = np.array([[[0, 7, 3, 7, 9]]], np.uint32)
    >>> relabel_by_first_voxel(labels).tolist()
    [[[0, 1, 2, 1, 3]]]
    >>> relabel_by_first_voxel(labels, keep=np.arange(10) != 3).tolist()
    [[[0, 1, 0, 1, 2]]]
    """
    backend = resolve_backend(backend, labels)
    labels = check_labels(labels)
    xp = get_array_module(labels)
    if keep is None:
        keep = xp.ones(int(labels.max()) + 1, bool)
    if backend == "numba":
        start_numba_pool()
        out = np.empty_like(labels)
        lut = np.where(keep, 0, _DROPPED).astype(labels.dtype)
        _relabel_scan(labels, lut, out)
        return out
    labels = xp.where(keep[labels], labels, 0).astype(labels.dtype)
    flat = labels.ravel()
    idx = xp.flatnonzero(flat)
    # uint64: the widest integer type cupyx.scatter_min takes.
    first = xp.full(keep.size, flat.size, dtype=xp.uint64)
    idx = idx.astype(xp.uint64)
    if xp is np:
        np.minimum.at(first, flat[idx], idx)
    else:
        import cupyx

        cupyx.scatter_min(first, flat[idx], idx)
    present = xp.flatnonzero(first < flat.size)
    order = present[xp.argsort(first[present])]
    lut = xp.zeros(first.size, dtype=labels.dtype)
    lut[order] = xp.arange(1, order.size + 1, dtype=labels.dtype)
    return lut[labels]


# Marks a dropped id in the Numba scan's lookup table (0 marks "not seen yet").
_DROPPED = np.iinfo(np.uint32).max


# The one first-voxel renumbering of cp3d. fastremap.renumber numbers the same
# way, but bench/bench_relabel.py measures this serial scan about 1.5x faster
# (1e7-5e7 voxels, 1e3-1e5 ids), it takes `keep` in the same pass, and
# fastremap is not a dependency of the pipeline.

@numba.njit(cache=True, nogil=True)
def _relabel_scan(labels, lut, out):
    flat_in, flat_out = labels.ravel(), out.ravel()
    count = 0
    for i in range(flat_in.size):
        v = flat_in[i]
        if v == 0:
            flat_out[i] = 0
            continue
        if lut[v] == 0:
            count += 1
            lut[v] = count
        new = lut[v]
        flat_out[i] = 0 if new == _DROPPED else new
