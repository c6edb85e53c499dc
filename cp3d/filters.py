"""Instance filtering: size range, foreground overlap and flow consistency."""

import math

import numba
import numpy as np

from ._backend import (as_triple, check_bool, check_flows, check_foreground, check_labels, check_scalar,
                       check_size_range, get_array_module, resolve_backend, start_numba_pool)
from .group import relabel_by_first_voxel
from .targets import compact_ids, heat_flows, numba_centroids, tanh_component, tanh_flows

TARGETS = ("tanh", "heat")


def check_targets(targets):
    """Raise ValueError unless `targets` names a flow formulation."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")


# Larger ids are compacted first, so per-id tables stay a few MB per thread.
_MAX_TABLE_ID = 1 << 20


def sphere_volume(diameter):
    """Volume of a sphere of the given diameter."""
    return math.pi / 6 * diameter**3


#: The paper's size filter: spheres of diameter 5 and 100 voxels.
PAPER_VOLUME_RANGE = (sphere_volume(5), sphere_volume(100))


def border_cap_volume(extent, depth):
    """Volume of the cap `depth` of its extent deep of an ellipsoid `extent` voxels across.

    A cell cut by a face of the stack shows a cap of itself; one shallower
    than the resolution the flows were predicted at (a network voxel:
    ``depth = 1 / train_diameter``) cannot be told from a speck of
    background. For a sphere of diameter ``d`` and a cap ``h = depth * d``
    deep the fraction of the sphere is ``depth**2 * (3 - 2 * depth)``; a cut
    along any axis of an ellipsoid gives the same fraction.

    Parameters
    ----------
    extent : float or (float, float, float)
        The cells' extent in voxels (z, y, x).
    depth : float
        The cap's depth as a fraction of the extent, in [0, 1].

    Returns
    -------
    float
        Voxels.

    Examples
    --------
    >>> from cp3d.filters import border_cap_volume, sphere_volume
    >>> round(border_cap_volume(20, 0.1) / sphere_volume(20), 3)
    0.028
    >>> border_cap_volume((10, 20, 20), 1.0) == sphere_volume(20) / 2
    True
    """
    extent = as_triple(extent, "extent")
    depth = check_scalar(depth, "depth", 0, 1)
    return math.pi / 6 * math.prod(extent) * depth**2 * (3 - 2 * depth)


def check_thresholds(min_overlap, max_flow_error):
    """Validate the overlap and flow-error thresholds; a `max_flow_error` of None means no limit."""
    return (check_scalar(min_overlap, "min_overlap", 0, 1),
            np.inf if max_flow_error is None else check_scalar(max_flow_error, "max_flow_error", 0))


def filter_instances(labels, flows, foreground, *, volume_range=PAPER_VOLUME_RANGE, min_overlap=0.2,
                     max_flow_error=0.8, targets="tanh", tanh_scale=5.0, inward=False, min_border_volume=0.0,
                     backend="auto"):
    """Drop implausible instances and renumber the rest 1..N.

    An instance is kept when its volume lies in `volume_range`, at least a
    fraction `min_overlap` of its voxels lie in `foreground`, and the mean
    absolute difference between `flows` and the flows recomputed from the
    instance itself (with the same target formulation) is at most
    `max_flow_error`. Instances touching the volume's outer faces are exempt
    from the lower size bound, since the border can cut a real cell to any
    size; they need `min_border_volume` voxels instead.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X)
        Instance labels, 0 for background.
    flows : ndarray, shape (3, Z, Y, X)
        The predicted flows the instances were reconstructed from.
    foreground : ndarray, shape (Z, Y, X)
        Predicted foreground: bool, or a probability thresholded at 0.5.
    volume_range : (float, float)
        Smallest and largest volume in voxels (paper: spheres of diameter 5
        and 100, i.e. 65.45 and 523598.8).
    min_overlap : float
        Smallest fraction of an instance's voxels in the foreground (0.2).
    max_flow_error : float or None
        Largest mean absolute flow error, averaged over the instance's voxels
        and the three components (0.8); ``None`` keeps every error.
    targets : {"tanh", "heat"}
        Formulation the flows follow, used to recompute them.
    tanh_scale : float or sequence of 3 floats
        The ``scale`` of :func:`cp3d.tanh_flows` the flows were made with.
    inward : bool
        Set when `flows` point towards the centres (Cellpose's sign).
    min_border_volume : float
        Smallest volume of an instance touching the volume's faces (0: any);
        :func:`cp3d.segment` passes the cap one network voxel deep of a
        typical cell (:func:`border_cap_volume`).
    backend : {"auto", "numpy", "numba", "cuda"}
        Implementation; ``"auto"`` picks CUDA for CuPy and Numba for NumPy.

    Returns
    -------
    labels : ndarray, shape (Z, Y, X), uint32
        Kept instances numbered 1..N in C order of their first voxel.

    Notes
    -----
    All statistics come from one ``bincount`` per quantity and a lookup
    table indexed by the label image, never a loop over instances.

    Examples
    --------
    >>> import numpy as np
    >>> import cp3d
    >>> labels = np.zeros((12, 12, 12), np.uint32)
    >>> labels[1:7, 1:7, 1:7] = 4
    >>> labels[9, 9, 9] = 9  # a single voxel: too small
    >>> flows = cp3d.tanh_flows(labels)
    >>> kept = cp3d.filter_instances(labels, flows, labels > 0, volume_range=(8, 1000))
    >>> np.unique(kept).tolist()
    [0, 1]
    """
    backend = resolve_backend(backend, labels, flows, foreground)
    labels = check_labels(labels)
    flows = check_flows(flows)
    if flows.shape[1:] != labels.shape:
        raise ValueError(f"flows shape {tuple(flows.shape)} does not match labels shape {tuple(labels.shape)}")
    foreground = check_foreground(foreground, labels.shape)
    check_targets(targets)
    min_overlap, max_flow_error = check_thresholds(min_overlap, max_flow_error)
    lo, hi = check_size_range(volume_range, "volume_range")
    min_border_volume = check_scalar(min_border_volume, "min_border_volume", 0)
    inward = check_bool(inward, "inward")
    tanh_scale = as_triple(tanh_scale, "tanh_scale")
    if int(labels.max()) > _MAX_TABLE_ID:
        # Per-thread tables are indexed by id; the output is renumbered anyway.
        labels = compact_ids(labels)[0]
    return filter_validated(labels, flows, foreground, (lo, hi), min_overlap, max_flow_error, targets, tanh_scale,
                            inward, min_border_volume, backend)


def filter_validated(labels, flows, foreground, volume_range, min_overlap, max_flow_error, targets, tanh_scale,
                     inward, min_border_volume, backend):
    """filter_instances on validated inputs (called by reconstruct too)."""
    if np.isinf(max_flow_error):
        # No flow-error limit: skip recomputing the flows (heat flows cost a diffusion).
        volume, overlap = volume_and_overlap(labels, foreground)
        flow_error = None
    else:
        volume, overlap, flow_error = instance_statistics(
            labels, flows, foreground, targets=targets, tanh_scale=tanh_scale, inward=inward, backend=backend)
    keep = keep_instances(volume, overlap, flow_error, border_ids(labels), volume_range, min_overlap,
                          max_flow_error, min_border_volume)
    return relabel_by_first_voxel(labels, backend, keep=keep)


def keep_instances(volume, overlap, flow_error, on_border, volume_range, min_overlap, max_flow_error,
                   min_border_volume=0.0):
    """The filters' verdict from per-instance statistics (entry 0 is background).

    Parameters
    ----------
    volume, overlap, flow_error : ndarray, shape (N + 1,)
        Per-id voxel count, fraction in the foreground and mean absolute flow
        error, as from :func:`instance_statistics` (possibly summed over the
        chunks of a larger volume). `flow_error` may be None when
        `max_flow_error` is infinite.
    on_border : ndarray of int
        Ids of the instances that touch the volume's outer faces
        (:func:`border_ids`).
    volume_range : (float, float)
        Smallest and largest volume kept.
    min_overlap, max_flow_error : float
        Validated thresholds (see :func:`check_thresholds`).
    min_border_volume : float
        Smallest volume of an instance in `on_border`.

    Returns
    -------
    keep : ndarray of bool, shape (N + 1,)
        ``keep[0]`` is False.

    Notes
    -----
    The lower size bound is waived for instances that touch the volume's
    border: the border may cut a cell to any size, and such a cut cell is a
    real instance (a crop of a larger stack, or a cell at the specimen's
    edge of the field of view). They need `min_border_volume` instead: a
    cap too shallow for the flows to resolve is a speck, not a cell. The
    upper bound and the other filters apply to every instance.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.filters import keep_instances
    >>> volume = np.array([50, 3, 3, 500])
    >>> overlap = np.ones(4)
    >>> keep_instances(volume, overlap, None, np.array([2]), (10, 100), 0.2, np.inf).tolist()
    [False, False, True, False]
    >>> keep_instances(volume, overlap, None, np.array([2]), (10, 100), 0.2, np.inf, 5).tolist()
    [False, False, False, False]
    """
    big_enough = volume >= volume_range[0]
    big_enough[on_border] = volume[on_border] >= min_border_volume
    keep = big_enough & (volume <= volume_range[1]) & (overlap >= min_overlap)
    if flow_error is not None:
        keep &= flow_error <= max_flow_error
    keep[0] = False
    return keep


def border_ids(labels):
    """Ids (without 0) found on the six outer faces of a ``(Z, Y, X)`` label volume.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.filters import border_ids
    >>> labels = np.zeros((5, 5, 5), np.uint32)
    >>> labels[0, 2, 2], labels[2, 2, 2] = 7, 9
    >>> border_ids(labels).tolist()
    [7]
    """
    xp = get_array_module(labels)
    faces = [labels[i].ravel() for i in (0, -1)] + [labels[:, i].ravel() for i in (0, -1)] + [
        labels[:, :, i].ravel() for i in (0, -1)]
    ids = xp.unique(xp.concatenate(faces))
    return ids[ids != 0]


def volume_and_overlap(labels, foreground):
    """Per-id voxel count and fraction of voxels in `foreground` (entry 0 is background)."""
    xp = get_array_module(labels)
    flat = labels.ravel()
    n = int(labels.max()) + 1
    volume = xp.bincount(flat, minlength=n)
    inside = xp.bincount(flat[foreground.ravel()], minlength=n)
    return volume, inside / xp.maximum(volume, 1)


def instance_statistics(labels, flows, foreground, *, targets="tanh", tanh_scale=5.0, inward=False,
                        backend="auto"):
    """Per-instance volume, foreground overlap and mean absolute flow error.

    Returns three arrays indexed by label id (entry 0 is background):
    ``volume`` (voxels), ``overlap`` (fraction in `foreground`) and
    ``flow_error`` (mean over voxels and components of
    ``|flows - recomputed|``).

    The Numba and CUDA backends with tanh targets compute the recomputed
    flows voxel by voxel inside one pass instead of materialising them, so
    they need no memory beyond a few numbers per instance.
    """
    if backend == "numba" and targets == "tanh":
        return _numba_tanh_statistics(labels, flows, foreground, tanh_scale, inward)
    if backend == "cuda" and targets == "tanh":
        return _cuda_tanh_statistics(labels, flows, foreground, tanh_scale, inward)
    xp = get_array_module(labels)
    volume, overlap = volume_and_overlap(labels, foreground)
    if targets == "tanh":
        recomputed = tanh_flows(labels, tanh_scale, backend=backend)
    else:
        recomputed = heat_flows(labels, backend=backend)
    sign = -1.0 if inward else 1.0
    abs_error = xp.abs(flows - np.float32(sign) * recomputed).sum(axis=0)
    error = xp.bincount(labels.ravel(), weights=abs_error.ravel(), minlength=volume.size)
    return volume, overlap, error / (3 * xp.maximum(volume, 1))


def mean_flow_error(labels, flows, *, tanh_scale=5.0, backend="auto"):
    """The flow error of a whole segmentation: the volume-weighted mean of its instances' flow errors.

    Each instance's error is the one the flow-error filter bounds
    (:func:`instance_statistics`: the mean absolute difference between
    the tanh flows and those recomputed from the instance), so this is the
    mean over all instance voxels. Any flows are consistent with *some*
    instances; this measures how well, and so compares two models' results
    on one stack (``cp3d.segment(model="auto")``): a model shown a stain it
    was not trained on makes instances its flows do not explain.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X)
        Instances, 0 for background.
    flows : ndarray, shape (3, Z, Y, X)
        Tanh flows pointing away from the centres.
    tanh_scale : float or (float, float, float)
        The flows' tanh scale (z, y, x).
    backend : {"auto", "numpy", "numba", "cuda"}
        As for :func:`filter_instances`.

    Returns
    -------
    float
        In [0, 2]; ``nan`` when there is no instance.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d import tanh_flows
    >>> from cp3d.filters import mean_flow_error
    >>> labels = np.zeros((16, 16, 16), np.uint32)
    >>> labels[2:8, 2:8, 2:8], labels[8:14, 8:14, 8:14] = 1, 2
    >>> flows = tanh_flows(labels, 2.0)
    >>> float(mean_flow_error(labels, flows, tanh_scale=2.0))
    0.0
    >>> merged = (labels > 0).astype(np.uint32)  # flows of two cells read as one
    >>> bool(mean_flow_error(merged, flows, tanh_scale=2.0) > 0.5)
    True
    """
    backend = resolve_backend(backend, labels, flows)
    labels = check_labels(labels)
    flows = check_flows(flows)
    if flows.shape[1:] != labels.shape:
        raise ValueError(f"flows shape {tuple(flows.shape)} does not match labels shape {tuple(labels.shape)}")
    tanh_scale = as_triple(tanh_scale, "tanh_scale")
    if int(labels.max()) > _MAX_TABLE_ID:
        labels = compact_ids(labels)[0]
    if not labels.any():
        return float("nan")
    volume, _, error = instance_statistics(labels, flows, labels > 0, tanh_scale=tanh_scale, backend=backend)
    return float((error * volume)[1:].sum() / volume[1:].sum())


def _numba_tanh_statistics(labels, flows, foreground, tanh_scale, inward):
    start_numba_pool()  # before numba.get_num_threads(), which would start it
    n_labels = int(labels.max())
    centroid = numba_centroids(labels, n_labels)
    volume, inside, error = tanh_statistic_sums(labels, flows, foreground, centroid, tanh_scale, inward)
    denom = np.maximum(volume, 1)
    return volume, inside / denom, error / (3 * denom)


def tanh_statistic_sums(labels, flows, foreground, centroid, tanh_scale, inward, origin=(0, 0, 0)):
    """Per-id voxel count, foreground count and summed absolute tanh flow error.

    The sums behind :func:`instance_statistics` for tanh targets, for labels
    ``1..K`` whose centroids are already known: on a whole volume, or on a
    chunk of a larger one (:mod:`cp3d.dask`) whose first voxel is `origin`,
    with the centroids of the whole instances.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X), uint32
        Ids ``0..K``, 0 for background.
    flows : ndarray, shape (3, Z, Y, X), float32
        Predicted flows at the same voxels.
    foreground : ndarray, shape (Z, Y, X), bool
        Foreground mask at the same voxels.
    centroid : ndarray, shape (K + 1, 3), float64
        Centroid (z, y, x) of each id in the whole volume's coordinates.
    tanh_scale : float or (float, float, float)
        The flows' tanh scale.
    inward : bool
        Flows pointing towards the centres.
    origin : sequence of 3 ints
        Whole-volume coordinates of ``labels[0, 0, 0]``.

    Returns
    -------
    volume, inside, error : ndarray, shape (K + 1,), float64
        Voxels, voxels in `foreground` and the sum over voxels and the
        three components of ``|flows - tanh target|``.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.filters import tanh_statistic_sums
    >>> labels = np.zeros((1, 1, 3), np.uint32)
    >>> labels[0, 0, :2] = 1
    >>> flows = np.zeros((3, 1, 1, 3), np.float32)
    >>> centroid = np.array([[0, 0, 0], [0, 0, 0.5]])
    >>> volume, inside, error = tanh_statistic_sums(labels, flows, labels > 0, centroid, 1.0, False)
    >>> volume.tolist(), inside.tolist(), round(float(error[1]), 3)  # 2 * tanh(0.5)
    ([0.0, 2.0], [0.0, 2.0], 0.924)
    """
    scale = np.asarray(as_triple(tanh_scale, "tanh_scale"))
    start_numba_pool()  # before numba.get_num_threads(), which would start it
    n_slabs = max(1, min(labels.shape[0], numba.get_num_threads()))
    partial = _tanh_statistics_kernel(labels, flows, foreground, centroid, scale, np.float32(-1 if inward else 1),
                                      n_slabs, centroid.shape[0] - 1, np.asarray(origin, np.int64))
    return tuple(partial.sum(axis=0).T)


@numba.njit(parallel=True, cache=True)
def _tanh_statistics_kernel(compact, flows, foreground, centroid, scale, sign, n_slabs, n_labels, origin):
    nz, ny, nx = compact.shape
    oz, oy, ox = origin[0], origin[1], origin[2]
    partial = np.zeros((n_slabs, n_labels + 1, 3))
    for s in numba.prange(n_slabs):
        for z in range(s * nz // n_slabs, (s + 1) * nz // n_slabs):
            for y in range(ny):
                for x in range(nx):
                    lab = compact[z, y, x]
                    if lab == 0:
                        continue
                    e0 = abs(flows[0, z, y, x] - sign * tanh_component(z + oz, centroid[lab, 0], scale[0]))
                    e1 = abs(flows[1, z, y, x] - sign * tanh_component(y + oy, centroid[lab, 1], scale[1]))
                    e2 = abs(flows[2, z, y, x] - sign * tanh_component(x + ox, centroid[lab, 2], scale[2]))
                    partial[s, lab, 0] += 1.0
                    partial[s, lab, 1] += foreground[z, y, x]
                    partial[s, lab, 2] += e0 + e1 + e2
    return partial


def _cuda_tanh_statistics(labels, flows, foreground, tanh_scale, inward):
    """Two kernels, no flow-sized temporary: centroid sums (targets.cu), then one statistics pass (filters.cu)."""
    import cupy

    from ._cuda import get_kernel, launch_shape

    n_labels = int(labels.max())
    ny, nx, n_vox = np.int64(labels.shape[1]), np.int64(labels.shape[2]), np.int64(labels.size)
    sums = cupy.zeros(4 * (n_labels + 1), cupy.float64)
    stats = cupy.zeros(3 * (n_labels + 1), cupy.float64)
    blocks, threads = launch_shape(labels.size)
    get_kernel("targets.cu", "cp3d_tanh_accumulate")(blocks, threads, (labels, ny, nx, n_vox, sums))
    inv = [np.float32(1.0 / s) for s in as_triple(tanh_scale, "tanh_scale")]
    get_kernel("filters.cu", "cp3d_tanh_statistics")(
        blocks, threads, (labels, flows, foreground.view(cupy.uint8), sums, ny, nx, n_vox, *inv,
                          np.float32(-1 if inward else 1), stats))
    volume, inside, error = stats.reshape(-1, 3).T
    denom = cupy.maximum(volume, 1)
    return volume.astype(cupy.int64), inside / denom, error / (3 * denom)
