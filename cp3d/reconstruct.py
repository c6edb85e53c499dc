"""Reconstruction: predicted flows and foreground to cell instances.

follow (every foreground voxel moves against the flows) -> group (closing
of the end positions with a ball, connected components) -> filter (size,
foreground overlap, flow consistency). The parameters either take the
paper's defaults or are derived from one typical cell ``diameter``.
"""

import dataclasses
import logging
import math
import warnings

import numba
import numpy as np

from ._backend import (as_triple, check_bool, check_flows, check_foreground, check_memory, check_size_range,
                       check_scalar, check_step, get_array_module, resolve_backend)
from .filters import PAPER_VOLUME_RANGE, filter_validated, check_targets, check_thresholds, sphere_volume
from .follow import follow_starts, check_sigma, smooth_flows
from .group import ball_bytes, ball_offsets, close_and_label

log = logging.getLogger(__name__)

PAPER_DIAMETER = 10.0


@dataclasses.dataclass(frozen=True)
class ReconstructionParameters:
    """Parameters of :func:`reconstruct`, in voxels.

    Attributes
    ----------
    step : float
        ``s_recon``: distance moved per iteration per unit of flow.
    n_iter : int
        ``N_recon``: number of iterations.
    closing_radius : float
        ``r_closing``: radius of the ball closing the end positions.
    volume_range : (float, float)
        Smallest and largest instance volume kept.
    tanh_scale : float
        ``scale`` of the tanh targets the flows follow (for the flow filter).
    """

    step: float = 4.0
    n_iter: int = 100
    closing_radius: float = 3.0
    volume_range: tuple = PAPER_VOLUME_RANGE
    tanh_scale: float = 5.0


def reconstruction_parameters(diameter=None, targets="tanh", tanh_scale=None):
    """Reconstruction parameters for cells of a typical `diameter` in voxels.

    Parameters
    ----------
    diameter : float or (float, float, float) or None
        Equivalent-sphere diameter of a typical cell, the median of
        ``(6 V / pi) ** (1/3)`` over cells (Cellpose's ``diameter``), or its
        extent in voxels along (z, y, x) for anisotropic voxels. ``None``
        gives the paper's fixed defaults (made for cells about 10 voxels
        across): step 4, 100 iterations, closing radius 3, diameters
        (5, 100) as sphere volumes, tanh scale 5.
    targets : {"tanh", "heat"}
        Formulation of the flows. Unit-length heat flows do not shrink near
        a centre, so a voxel ends oscillating within ``step / 2`` of it: heat
        flows use a step of ``d / 10`` (1 at the paper's size, the released
        Cellpose3D code's value) and correspondingly more iterations.
    tanh_scale : float or (float, float, float), optional
        The ``scale`` the tanh flows were made with, when it is not ``d / 2``
        (the released Cellpose3D code trains with a fixed scale of 5 whatever
        the cell size). The step follows the scale, so flows of any scale
        converge the same way.

    Returns
    -------
    ReconstructionParameters

    Notes
    -----
    Everything scales with the diameter ``d`` so that the paper's values come
    back at ``d = 10`` (all but ``n_iter``, see below): the tanh scale is ``d / 2`` (the targets the model
    sees after rescaling cells to its training size), the step ``0.4 d`` keeps
    the contraction near a centre at ``1 - step / scale = 0.2`` per iteration
    whatever the size, the closing radius ``0.3 d`` (at least 1) stays below
    half the distance between neighbouring centres so small cells are not
    bridged and grows with large cells so their gathered voxels stay one
    group, and the size range is spheres of diameters ``d / 2`` and ``10 d``.
    Because step and scale grow together, a voxel crosses a cell in the same
    number of iterations at every size: ``n_iter`` covers 8 diameters at full
    speed plus 30 iterations of convergence, 50 in all. With a (z, y, x)
    triple the scale and closing radius become per-axis, the step follows
    the shortest axis and the size range the geometric mean diameter.

    The step is tied to the flows' scale, not to the diameter: near a centre
    a tanh flow is about ``distance / scale``, so a step of ``0.8 scale``
    contracts the distance to the centre by the same factor 0.2 per
    iteration for flows of any scale. With an explicit `tanh_scale` smaller
    than ``d / 2`` the step is smaller and `n_iter` grows to cover the same
    8 diameters. A larger step than the scale overshoots: voxels jump across
    the centre and a cell breaks into fragments.

    Examples
    --------
    >>> from cp3d import reconstruction_parameters
    >>> reconstruction_parameters(7).closing_radius
    2.0
    >>> reconstruction_parameters(41, tanh_scale=5).step  # scale-5 flows of large cells
    4.0
    """
    check_targets(targets)
    if diameter is None:
        defaults = ReconstructionParameters()
        if targets == "heat":
            return dataclasses.replace(defaults, step=1.0)
        if tanh_scale is None:
            return defaults
        return dataclasses.replace(defaults, step=_STEP_PER_SCALE * min(as_triple(tanh_scale, "tanh_scale")),
                                   tanh_scale=_scalar_if_isotropic(as_triple(tanh_scale, "tanh_scale")))
    d = np.asarray(as_triple(diameter, "diameter"))
    radius = np.maximum(1, np.round(0.3 * d))
    check_memory(ball_bytes(radius), f"diameter={diameter!r} (a closing radius of {_scalar_if_isotropic(radius)})")
    scale = d / 2 if tanh_scale is None else np.asarray(as_triple(tanh_scale, "tanh_scale"))
    # Along each axis the flows saturate over that axis's scale; the step
    # follows the shortest one so that no axis overshoots.
    step = _STEP_PER_SCALE * scale.min() if targets == "tanh" else 0.1 * d.min()
    mean_d = float(np.prod(d) ** (1 / 3))
    return ReconstructionParameters(
        step=float(step),
        n_iter=int(math.ceil(8 * d.max() / step)) + 30,
        closing_radius=_scalar_if_isotropic(radius),
        volume_range=(sphere_volume(mean_d / 2), sphere_volume(10 * mean_d)),
        tanh_scale=_scalar_if_isotropic(scale),
    )


# The paper's step over its tanh scale (4 / 5): see reconstruction_parameters' Notes.
_STEP_PER_SCALE = 0.8


def _scalar_if_isotropic(triple):
    values = [float(v) for v in np.ravel(triple)]
    return values[0] if max(values) == min(values) else tuple(values)


def reconstruct(flows, foreground, *, step=None, n_iter=None, closing_radius=None, diameter_range=None,
                min_overlap=0.2, max_flow_error=0.8, diameter=None, targets="tanh", tanh_scale=None,
                inward=False, sigma=0.0, min_border_volume=0.0, backend="auto"):
    """Reconstruct cell instances from flows and a foreground map.

    Every foreground voxel moves `n_iter` times against the flows by
    ``flow * step``; the end positions are marked, closed with a ball of
    radius `closing_radius` and labelled as connected components (no
    clustering, so the cost does not grow with the number of cells); each
    voxel takes the label found at its end position; then
    :func:`cp3d.filter_instances` drops implausible instances.

    Parameters
    ----------
    flows : ndarray, shape (3, Z, Y, X)
        Gradient maps (z, y, x), pointing away from the cell centres unless
        `inward` is set. Floating point, finite.
    foreground : ndarray, shape (Z, Y, X)
        Bool mask, or a probability map thresholded at 0.5.
    step, n_iter, closing_radius : optional
        ``s_recon``, ``N_recon`` and ``r_closing``; by default derived from
        `diameter` (see :func:`reconstruction_parameters`).
    diameter_range : (float, float), optional
        Smallest and largest cell diameter kept, turned into sphere volumes;
        by default derived from `diameter`.
    min_overlap : float
        ``p_overlap``: smallest fraction of an instance inside `foreground`.
    max_flow_error : float or None
        ``err_gradient``: largest mean absolute flow error of an instance;
        ``None`` switches this filter off.
    diameter : float or (float, float, float), optional
        Typical cell diameter in voxels, or per axis (z, y, x) for
        anisotropic voxels; the one knob for small or large cells. ``None``
        uses the paper's defaults (cells about 10 across).
    targets : {"tanh", "heat"}
        Formulation of `flows`, used by the flow-error filter.
    tanh_scale : float or (float, float, float) or "auto", optional
        Scale of the tanh flows; by default derived from `diameter`.
        ``"auto"`` estimates it from the flows themselves
        (:func:`estimate_tanh_scale`, logged at INFO level), for flows of
        unknown scale; it falls back to the default, with a warning, when
        no voxel can be measured.
    inward : bool
        Set for flows pointing towards the centres (Cellpose's sign).
    sigma : float
        Gaussian smoothing of the flows before following (0: none).
    min_border_volume : float
        Smallest volume of an instance touching the volume's faces, which
        are exempt from `diameter_range`'s lower bound (0: any; see
        :func:`cp3d.filter_instances`).
    backend : {"auto", "numpy", "numba", "cuda"}
        Implementation; ``"auto"`` picks CUDA for CuPy and Numba for NumPy.

    Returns
    -------
    labels : ndarray, shape (Z, Y, X), uint32
        Instances 1..N in C order of their first voxel; 0 is background.
        An empty foreground gives an all-zero volume.

    Examples
    --------
    >>> import numpy as np
    >>> import cp3d
    >>> truth = np.zeros((16, 16, 32), np.uint32)
    >>> truth[2:14, 2:14, 2:15], truth[2:14, 2:14, 17:30] = 1, 2
    >>> labels = cp3d.reconstruct(cp3d.tanh_flows(truth), truth > 0)
    >>> int(labels.max())
    2
    """
    backend = resolve_backend(backend, flows, foreground)
    flows = check_flows(flows)
    foreground = check_foreground(foreground, flows.shape[1:])
    inward = check_bool(inward, "inward")
    if isinstance(tanh_scale, str):
        if tanh_scale != "auto":
            raise ValueError(f"tanh_scale must be a positive number, a (z, y, x) triple or 'auto', got {tanh_scale!r}")
        check_targets(targets)
        if targets != "tanh":
            raise ValueError(f"tanh_scale='auto' measures tanh flows; targets={targets!r} has no tanh scale")
        tanh_scale = _estimate_tanh_scale(flows, foreground, inward)
        if tanh_scale is None:
            warnings.warn("tanh_scale='auto' found no foreground voxel to measure; using the default scale",
                          stacklevel=2)
        log.info("tanh_scale='auto': %s voxels", tanh_scale)
    params = reconstruction_parameters(diameter, targets, tanh_scale)
    step, n_iter = check_step(params.step if step is None else step, params.n_iter if n_iter is None else n_iter)
    radius = params.closing_radius if closing_radius is None else closing_radius
    ball_offsets(radius, "closing_radius")  # fail here, not after following
    volume_range = params.volume_range if diameter_range is None else tuple(
        map(sphere_volume, check_size_range(diameter_range, "diameter_range")))
    scale = as_triple(params.tanh_scale, "tanh_scale")
    min_overlap, max_flow_error = check_thresholds(min_overlap, max_flow_error)
    min_border_volume = check_scalar(min_border_volume, "min_border_volume", 0)
    sigma = check_sigma(sigma, foreground.shape)
    if sigma > 0:
        flows = smooth_flows(flows, sigma)

    xp = get_array_module(flows)
    starts = xp.flatnonzero(foreground)
    if starts.size == 0:
        return xp.zeros(foreground.shape, np.uint32)
    warn_on_flow_convention(flows, foreground, inward)
    # Only foreground voxels are tracked, and each large buffer is released as
    # soon as the next stage has what it needs (see the README's memory table).
    end = follow_starts(flows, starts, np.float32(-step if inward else step), n_iter, backend)
    end_index = _nearest_voxel_index(end, foreground.shape, backend, out=starts)
    del end, starts
    gathered = xp.zeros(foreground.shape, bool)
    gathered.ravel()[end_index] = True
    groups = close_and_label(gathered, radius, backend=backend)
    del gathered
    labels = _labels_at_end(foreground, groups, end_index, backend)
    del groups, end_index
    found = int(labels.max())
    labels = filter_validated(labels, flows, foreground, volume_range, min_overlap, max_flow_error, targets, scale,
                              inward, min_border_volume, backend)
    if found and not int(labels.max()):
        warn_all_filtered(found, volume_range, max_flow_error, targets, inward)
    return labels


def warn_all_filtered(found, volume_range, max_flow_error, targets, inward):
    """Warn that the filters dropped every one of the `found` groups, naming the thresholds (no silent 0 cells)."""
    warnings.warn(f"reconstruct found {found} groups but the filters dropped them all (volume range "
                  f"{volume_range[0]:.0f}-{volume_range[1]:.0f} voxels, max_flow_error {max_flow_error}, "
                  f"targets={targets!r}, inward={inward}); check that the flows' convention matches these "
                  "settings, or relax the filters (diameter_range, max_flow_error=None)", stacklevel=3)


# Flows of either formulation are at most 1 in magnitude; Cellpose's networks
# predict 5 times the unit flows, so anything well above 1 is a convention slip.
_MAX_FLOW = 1.5
# Voxels sampled for the sign check: enough for a clear mean, cheap on any volume.
_SIGN_SAMPLE_SLICES = 8


# Flows at most this large take part in estimate_tanh_scale: atanh grows steep towards 1, and a saturated flow says
# little about its scale.
_SCALE_FLOW_LIMIT = 0.9
# estimate_tanh_scale reads the flows of at most this many z-slices (and their neighbours): a clear median, cheap on
# any volume.
_SCALE_SAMPLE_SLICES = 16


def estimate_tanh_scale(flows, foreground, inward=False):
    """Estimate the scale ``s`` of tanh flows ``tanh(offset / s)``, per axis, from the flows themselves.

    Two voxels apart along an axis inside one cell, tanh flows differ by
    exactly ``2 / s`` once mapped back by ``atanh``; the estimate is the
    median of ``2 / (atanh(f[+1]) - atanh(f[-1]))`` over foreground voxels
    whose flow and its two neighbours' are below 0.9 in magnitude and grow
    away from the centre, step by step: triples across a boundary between
    two cells, where the flows flip, are left out. Cells two or three voxels
    thick (anisotropic voxels) have more such triples than triples of their
    own; a rise over the two steps alone let them in (scale 5.19 read for
    1.5). A few z-slices are sampled, so it costs little on any volume.

    Parameters
    ----------
    flows : ndarray, shape (3, Z, Y, X)
        Tanh flows (z, y, x), pointing away from the centres unless `inward`.
    foreground : ndarray, shape (Z, Y, X)
        Bool mask, or a probability map thresholded at 0.5.
    inward : bool
        Set for flows pointing towards the centres.

    Returns
    -------
    (float, float, float) or None
        The scale along (z, y, x), in voxels; ``None`` when some axis has no
        voxel to measure (e.g. a stack of one or two z-slices, or no
        foreground).

    Examples
    --------
    >>> import numpy as np
    >>> import cp3d
    >>> truth = np.zeros((24, 24, 48), np.uint32)
    >>> truth[2:22, 2:22, 2:23], truth[2:22, 2:22, 25:46] = 1, 2
    >>> flows = cp3d.tanh_flows(truth, scale=(3.0, 6.0, 6.0))
    >>> [round(s, 2) for s in cp3d.estimate_tanh_scale(flows, truth > 0)]
    [3.0, 6.0, 6.0]
    """
    flows = check_flows(flows)
    return _estimate_tanh_scale(flows, check_foreground(foreground, flows.shape[1:]), check_bool(inward, "inward"))


def _estimate_tanh_scale(flows, foreground, inward):
    """:func:`estimate_tanh_scale` on checked float32 flows and a bool foreground."""
    xp = get_array_module(flows)
    nz = flows.shape[1]
    zs = np.unique(np.linspace(1, nz - 2, min(_SCALE_SAMPLE_SLICES, nz - 2)).astype(int)) if nz >= 3 else []
    sign = -1.0 if inward else 1.0
    scales = []
    for axis in range(3):
        samples = []
        for z in zs:
            # the flow along `axis` at each voxel of slice z and at its two neighbours along that axis
            f = flows[axis, z - 1:z + 2]
            inside = foreground[z - 1:z + 2]
            if axis == 0:
                before, here, after, mask = f[0], f[1], f[2], inside[0] & inside[1] & inside[2]
            else:
                lo, mid, hi = ((slice(None),) * (axis - 1) + (part,) for part in (slice(None, -2), slice(1, -1),
                                                                                  slice(2, None)))
                before, here, after = f[1][lo], f[1][mid], f[1][hi]
                mask = inside[1][lo] & inside[1][mid] & inside[1][hi]
            limit = _SCALE_FLOW_LIMIT
            mask = mask & (xp.abs(before) < limit) & (xp.abs(here) < limit) & (xp.abs(after) < limit)
            mask &= (sign * (here - before) > 0) & (sign * (after - here) > 0)
            samples.append(sign * (xp.arctanh(after[mask]) - xp.arctanh(before[mask])))
        rises = xp.concatenate(samples) if samples else xp.zeros(0, np.float32)
        if rises.size == 0:
            return None
        scales.append(float(2.0 / float(xp.median(rises))))
    return tuple(scales)


def flow_divergence(flows, foreground, largest=None):
    """Summed divergence of `flows` inside `foreground` (bool) over a few z-slices: its sign is the flows'.

    Flows pointing away from the centres grow along their own axis inside a
    cell (a positive divergence); flows pointing towards them shrink. Only a
    few slices are sampled, so it costs little on any volume. `largest` is
    the flows' largest magnitude, when known.
    """
    xp = get_array_module(flows)
    if largest is None:
        largest = max(float(flows.max()), -float(flows.min()))
    nz = flows.shape[1]
    divergence = 0.0
    for z in np.unique(np.linspace(1, nz - 2, min(_SIGN_SAMPLE_SLICES, nz - 2)).astype(int)) if nz >= 3 else ():
        inside = foreground[z]
        change = (flows[0, z + 1] - flows[0, z - 1], flows[1, z, 2:] - flows[1, z, :-2],
                  flows[2, z, :, 2:] - flows[2, z, :, :-2])
        within = (inside, inside[1:-1], inside[:, 1:-1])
        for delta, mask in zip(change, within):
            # A jump of more than the largest flow crosses a boundary between two
            # cells (where the flows flip); inside a cell, flows change smoothly.
            divergence += float(delta[mask & (xp.abs(delta) <= max(largest, 1.0))].sum())
    return divergence


def warn_on_flow_convention(flows, foreground, inward):
    """Warn when the flows look scaled or signed otherwise than the call says.

    The sign check is :func:`flow_divergence`'s.
    """
    largest = max(float(flows.max()), -float(flows.min()))  # abs() would copy the flows: 4x slower
    if largest > _MAX_FLOW:
        warnings.warn(f"flows reach {largest:.3g} in magnitude, where tanh and heat flows are at most 1: "
                      "Cellpose's dP is 5 times the unit flows (divide by 5, or use cp3d.cellpose.compute_masks)",
                      stacklevel=3)
    divergence = flow_divergence(flows, foreground, largest)
    if divergence != 0 and (divergence < 0) != bool(inward):
        direction = "towards" if divergence < 0 else "away from"
        warnings.warn(f"the flows point {direction} the cell centres on average but inward={inward}: "
                      f"pass inward={not inward} (Cellpose's flows point inwards, cp3d's outwards)", stacklevel=3)


def _nearest_voxel_index(positions, shape, backend, out):
    """C-order flat index of the voxel nearest to each (z, y, x) position.

    The Numba backend writes into `out` (the start indices, no longer needed),
    so the foreground's index buffer is reused rather than doubled.
    """
    if backend == "numba":
        _nearest_voxel_kernel(positions, np.asarray(shape, np.int64), out)
        return out
    xp = get_array_module(positions)
    index = xp.zeros(len(positions), xp.int64)
    for axis in range(3):  # one axis at a time keeps the temporaries to one column
        index *= shape[axis]
        index += xp.floor(positions[:, axis] + np.float32(0.5)).astype(xp.int64)
    return index


@numba.njit(parallel=True, cache=True, nogil=True)
def _nearest_voxel_kernel(positions, shape, out):
    half = np.float32(0.5)
    for i in numba.prange(positions.shape[0]):
        z = np.int64(np.floor(positions[i, 0] + half))
        y = np.int64(np.floor(positions[i, 1] + half))
        x = np.int64(np.floor(positions[i, 2] + half))
        out[i] = (z * shape[1] + y) * shape[2] + x


def _labels_at_end(foreground, groups, end_index, backend):
    """Give each foreground voxel (in C order) the group found at its end position."""
    xp = get_array_module(groups)
    labels = xp.zeros(foreground.shape, np.uint32)
    if backend == "numba":
        _labels_at_end_kernel(foreground.ravel(), groups.ravel(), end_index, labels.ravel())
    else:
        labels.ravel()[xp.flatnonzero(foreground)] = groups.ravel()[end_index]
    return labels


@numba.njit(cache=True, nogil=True)
def _labels_at_end_kernel(foreground, groups, end_index, labels):
    k = 0
    for v in range(foreground.size):
        if foreground[v]:
            labels[v] = groups[end_index[k]]
            k += 1
