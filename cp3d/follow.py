"""Flow following: move every foreground voxel against the predicted field."""

import numba
import numpy as np

from ._backend import (check_bool, check_flows, check_foreground, check_scalar, check_step, get_array_module,
                       resolve_backend, start_numba_pool)


def follow_flows(flows, foreground, *, step=4.0, n_iter=100, inward=False, sigma=0.0, backend="auto"):
    """Move every foreground voxel `n_iter` times against the flow field.

    Each foreground voxel starts at its own coordinate ``p`` and, `n_iter`
    times, ``p = clip(p - step * flows[:, floor(p)], 0, shape - 1)`` with the
    three axes updated from the same old position. Voxels of one cell gather
    near the cell's centre.

    Parameters
    ----------
    flows : ndarray, shape (3, Z, Y, X)
        Gradient maps (z, y, x) pointing away from the cell centres, as made
        by :func:`cp3d.tanh_flows` or predicted by the model. Floating point.
    foreground : ndarray, shape (Z, Y, X)
        Voxels to track: bool, or a probability map thresholded at 0.5.
    step : float
        Step size ``s_recon`` in voxels per unit of flow (paper: 4).
    n_iter : int
        Number of steps ``N_recon`` (paper: 100).
    inward : bool
        Set when `flows` point towards the centres (Cellpose's sign).
    sigma : float
        Standard deviation of a Gaussian smoothing of each flow channel
        before following (the released Cellpose3D code used 1); 0 disables.
    backend : {"auto", "numpy", "numba", "cuda"}
        Implementation; ``"auto"`` picks CUDA for CuPy and Numba for NumPy.

    Returns
    -------
    positions : ndarray, shape (N, 3), float32
        End positions (z, y, x) of the foreground voxels, one row per voxel
        in C order of ``numpy.flatnonzero(foreground)``.

    Notes
    -----
    Only foreground voxels are tracked, so memory is ``12 N`` bytes for the
    positions plus ``8 N`` for their indices. The NumPy, Numba and CUDA
    backends round identically (float32, no fused multiply-add), so they
    return the same positions bit for bit. The Numba and CUDA backends run
    a long follow in slices (Numba: of points, each through all its
    iterations; CUDA: of iterations), so Ctrl-C interrupts it. The CUDA
    backend waits for the device between slices; a follow of one slice
    returns once its kernel is queued.

    Examples
    --------
    >>> import numpy as np
    >>> import cp3d
    >>> labels = np.zeros((8, 8, 8), np.uint32)
    >>> labels[1:7, 1:7, 1:7] = 1
    >>> flows = cp3d.tanh_flows(labels, backend="numpy")
    >>> end = cp3d.follow_flows(flows, labels > 0, backend="numpy")
    >>> bool(np.ptp(end, axis=0).max() < 2)
    True
    """
    backend = resolve_backend(backend, flows, foreground)
    flows = check_flows(flows)
    foreground = check_foreground(foreground, flows.shape[1:])
    step, n_iter = check_step(step, n_iter)
    inward = check_bool(inward, "inward")
    sigma = check_sigma(sigma, flows.shape[1:])
    if sigma > 0:
        flows = smooth_flows(flows, sigma)
    signed_step = np.float32(-step if inward else step)
    starts = get_array_module(foreground).flatnonzero(foreground)
    return follow_starts(flows, starts, signed_step, n_iter, backend)


def smooth_flows(flows, sigma):
    """Gaussian-smooth each channel of a ``(3, Z, Y, X)`` flow field."""
    if get_array_module(flows) is np:
        from scipy import ndimage
    else:
        from cupyx.scipy import ndimage
    return ndimage.gaussian_filter(flows, sigma=(0, sigma, sigma, sigma), mode="nearest")


def check_sigma(sigma, shape):
    """Validate a smoothing `sigma`: at least 0, at most the volume's longest axis (wider only averages it flat)."""
    return check_scalar(sigma, "sigma", 0, max(shape))


def follow_starts(flows, starts, signed_step, n_iter, backend):
    """Dispatch to a backend; `starts` are C-order flat indices (int64)."""
    if backend == "numba":
        start_numba_pool()
    impl = {"numpy": _numpy_follow, "numba": _numba_follow, "cuda": _cuda_follow}[backend]
    return impl(flows, starts, np.float32(signed_step), int(n_iter))


def _numpy_follow(flows, starts, step, n_iter):
    shape = flows.shape[1:]
    p = np.stack(np.unravel_index(starts, shape), axis=1).astype(np.float32)
    hi = np.asarray(shape, np.float32) - 1
    for _ in range(n_iter):
        i = p.astype(np.intp)
        f = flows[:, i[:, 0], i[:, 1], i[:, 2]].T
        p = np.clip(p - step * f, 0, hi)
    return p


# Python handles Ctrl-C only between kernel calls, so a long follow runs in
# slices of about this many point-steps (a fraction of a second). Positions are
# float32 in memory between slices as within one: same result.
_SLICE_STEPS = 1 << 26


def _numba_follow(flows, starts, step, n_iter):
    out = np.empty((starts.size, 3), np.float32)
    _start_positions(starts, np.asarray(flows.shape[1:], np.int64), out)
    # Slices of points, each followed through all its iterations (slices of those only for a very long follow):
    # the flows around a point stay in cache while it moves. Slices of iterations over all points read the flows
    # from memory again in every slice: 3x slower on 5.8e7 voxels (2-core x86-64, 100 iterations).
    points = max(_CHUNK, _SLICE_STEPS // max(n_iter, 1))
    iterations = max(1, _SLICE_STEPS // points)
    for first in range(0, starts.size, points):
        part = out[first:first + points]
        for done in range(0, n_iter, iterations):
            _follow_kernel(flows, part, step, min(iterations, n_iter - done))
    return out


@numba.njit(parallel=True, cache=True, nogil=True)
def _start_positions(starts, shape, out):
    ny, nx = shape[1], shape[2]
    for i in numba.prange(starts.size):
        s = starts[i]
        out[i, 0] = np.float32(s // (ny * nx))
        out[i, 1] = np.float32((s // nx) % ny)
        out[i, 2] = np.float32(s % nx)


# Each point's steps form one long dependency chain (load, subtract, clip,
# index, load...), so one point at a time leaves the core waiting on latency.
# Advancing _LANES independent points together lets their chains overlap:
# about 3x faster on x86-64, with the same arithmetic per point.
_LANES = 16
_CHUNK = 1024


@numba.njit(parallel=True, cache=True, nogil=True)
def _follow_kernel(flows, positions, step, n_iter):
    """Advance `positions` (N, 3) in place by `n_iter` steps."""
    nz, ny, nx = flows.shape[1:]
    hz, hy, hx = np.float32(nz - 1), np.float32(ny - 1), np.float32(nx - 1)
    zero = np.float32(0)
    n = positions.shape[0]
    out = positions
    for chunk in numba.prange((n + _CHUNK - 1) // _CHUNK):
        pz = np.empty(_LANES, np.float32)
        py = np.empty(_LANES, np.float32)
        px = np.empty(_LANES, np.float32)
        end = min((chunk + 1) * _CHUNK, n)
        for first in range(chunk * _CHUNK, end, _LANES):
            lanes = min(_LANES, end - first)
            for k in range(lanes):
                pz[k] = positions[first + k, 0]
                py[k] = positions[first + k, 1]
                px[k] = positions[first + k, 2]
            for _ in range(n_iter):
                for k in range(lanes):
                    z, y, x = pz[k], py[k], px[k]
                    iz, iy, ix = int(z), int(y), int(x)
                    pz[k] = min(max(z - step * flows[0, iz, iy, ix], zero), hz)
                    py[k] = min(max(y - step * flows[1, iz, iy, ix], zero), hy)
                    px[k] = min(max(x - step * flows[2, iz, iy, ix], zero), hx)
            for k in range(lanes):
                out[first + k, 0] = pz[k]
                out[first + k, 1] = py[k]
                out[first + k, 2] = px[k]


# The GPU takes this many point-steps per slice (a fraction of a second on
# current cards); the host waits for each slice, so Ctrl-C lands between them.
_CUDA_SLICE_STEPS = 1 << 31


def _cuda_follow(flows, starts, step, n_iter):
    import cupy

    from ._cuda import get_kernel

    nz, ny, nx = (np.int64(n) for n in flows.shape[1:])
    out = cupy.empty((starts.size, 3), cupy.float32)
    if starts.size == 0:
        return out
    n = np.int64(starts.size)
    grid = ((starts.size + 255) // 256,), (256,)
    per_slice = max(1, _CUDA_SLICE_STEPS // starts.size)
    first = min(per_slice, n_iter)
    get_kernel("follow.cu", "follow_flows")(
        *grid, (flows, starts.astype(cupy.int64, copy=False), n, nz, ny, nx, step, np.int32(first), out))
    more = get_kernel("follow.cu", "follow_positions")
    for done in range(first, n_iter, per_slice):
        cupy.cuda.get_current_stream().synchronize()  # Python sees a pending Ctrl-C here
        more(*grid, (flows, n, nz, ny, nx, step, np.int32(min(per_slice, n_iter - done)), out))
    return out


def follow_in_window(flows, origin, shape, box, starts, step, n_iter):
    """Follow points through a window of a larger flow field; return the voxels they end at.

    The chunked reconstruction (:mod:`cp3d.dask`) follows each chunk's voxels
    through the chunk and a halo. Positions stay in the coordinates of the
    whole field and are clipped to its `shape`, so every step rounds exactly
    as :func:`follow_flows` on the whole field does (float32, no fused
    multiply-add), and each end position goes to its nearest voxel as in
    :func:`cp3d.reconstruct`; a point whose voxel leaves the window is
    flagged rather than followed on wrong flows.

    Parameters
    ----------
    flows : ndarray, shape (3, z, y, x), float32
        The window of the flow field (NumPy).
    origin : sequence of 3 ints
        Voxel of the whole field at ``flows[:, 0, 0, 0]``.
    shape : sequence of 3 ints
        Shape (Z, Y, X) of the whole field.
    box : tuple of 3 slices
        The part of the whole field the points start in (a chunk).
    starts : ndarray, shape (N,), int64
        C-order flat indices, within `box`, of the points' first voxels.
    step : float
        Signed step (negative for inward flows).
    n_iter : int
        Number of steps.

    Returns
    -------
    ends : ndarray, shape (N,), int64
        C-order flat index in the whole field of the voxel nearest each end
        position; -1 for a point whose voxel left the window at some step.
    moved : ndarray, shape (3,), int64
        The largest distance (z, y, x), in voxels, from a start voxel to its
        end voxel, over the points that stayed in the window.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.follow import follow_in_window
    >>> flows = np.zeros((3, 4, 4, 4), np.float32)
    >>> flows[2] = -1.0  # every voxel moves +x by one step per iteration
    >>> window = (slice(0, 4), slice(0, 4), slice(10, 14))
    >>> ends, moved = follow_in_window(flows, (0, 0, 10), (4, 4, 100), window, np.array([0, 1]), 1.0, 4)
    >>> ends.tolist(), moved.tolist()  # the second point reads x = 14, beyond the window
    ([14, -1], [0, 0, 4])
    """
    flows = np.ascontiguousarray(flows, np.float32)
    starts = np.asarray(starts, np.int64)
    ends = np.empty(starts.size, np.int64)
    moved = np.zeros(((starts.size + _CHUNK - 1) // _CHUNK, 3), np.int64)
    start_numba_pool()
    _follow_window_kernel(flows, np.asarray(origin, np.int64), np.asarray(shape, np.int64),
                          np.array([s.start for s in box], np.int64), np.array([s.stop - s.start for s in box], np.int64),
                          starts, np.float32(step), int(n_iter), ends, moved)
    return ends, moved.max(axis=0, initial=0)


@numba.njit(parallel=True, cache=True, nogil=True)
def _follow_window_kernel(flows, origin, shape, first, box_shape, starts, step, n_iter, ends, moved):
    # _follow_kernel's lanes and arithmetic, with window-relative flow reads; the end voxels and the distances
    # moved are taken here too (one pass over the points instead of a NumPy expression per axis).
    wz, wy, wx = flows.shape[1:]
    oz, oy, ox = origin[0], origin[1], origin[2]
    hz, hy, hx = np.float32(shape[0] - 1), np.float32(shape[1] - 1), np.float32(shape[2] - 1)
    by, bx = box_shape[1], box_shape[2]
    zero, half = np.float32(0), np.float32(0.5)
    n = starts.size
    for chunk in numba.prange((n + _CHUNK - 1) // _CHUNK):
        pz = np.empty(_LANES, np.float32)
        py = np.empty(_LANES, np.float32)
        px = np.empty(_LANES, np.float32)
        sz = np.empty(_LANES, np.int64)
        sy = np.empty(_LANES, np.int64)
        sx = np.empty(_LANES, np.int64)
        out_of = np.zeros(_LANES, np.int64)
        mz, my, mx = 0, 0, 0
        end = min((chunk + 1) * _CHUNK, n)
        for lead in range(chunk * _CHUNK, end, _LANES):
            lanes = min(_LANES, end - lead)
            for k in range(lanes):
                s = starts[lead + k]
                sz[k] = first[0] + s // (by * bx)
                sy[k] = first[1] + (s // bx) % by
                sx[k] = first[2] + s % bx
                pz[k], py[k], px[k] = np.float32(sz[k]), np.float32(sy[k]), np.float32(sx[k])
                out_of[k] = 0
            for _ in range(n_iter):
                for k in range(lanes):
                    z, y, x = pz[k], py[k], px[k]
                    iz, iy, ix = int(z) - oz, int(y) - oy, int(x) - ox
                    # Reads stay in the window; a point whose voxel left it (an index clamped) is flagged and
                    # recomputed with a wider window. Branch-free: 1.8x faster than testing the bounds.
                    cz, cy, cx = min(max(iz, 0), wz - 1), min(max(iy, 0), wy - 1), min(max(ix, 0), wx - 1)
                    out_of[k] |= (cz ^ iz) | (cy ^ iy) | (cx ^ ix)
                    pz[k] = min(max(z - step * flows[0, cz, cy, cx], zero), hz)
                    py[k] = min(max(y - step * flows[1, cz, cy, cx], zero), hy)
                    px[k] = min(max(x - step * flows[2, cz, cy, cx], zero), hx)
            for k in range(lanes):
                if out_of[k] != 0:
                    ends[lead + k] = -1
                    continue
                z = np.int64(np.floor(pz[k] + half))
                y = np.int64(np.floor(py[k] + half))
                x = np.int64(np.floor(px[k] + half))
                ends[lead + k] = (z * shape[1] + y) * shape[2] + x
                mz, my, mx = max(mz, abs(z - sz[k])), max(my, abs(y - sy[k])), max(mx, abs(x - sx[k]))
        moved[chunk, 0], moved[chunk, 1], moved[chunk, 2] = mz, my, mx
