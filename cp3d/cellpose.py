"""Cellpose's 3D mask computation, computed by cp3d's engine.

:func:`compute_masks` takes the signature, conventions and return of Cellpose
4.x's ``cellpose.dynamics.compute_masks`` (flows ``dP`` pointing towards the
centres and scaled by 5, ``cellprob`` as logits, labels renumbered 1..N as
uint16) and computes the masks with :func:`cp3d.reconstruct`. :func:`patch`
makes Cellpose's own ``CellposeModel.eval(..., do_3D=True)`` use it.

Cellpose is needed only by :func:`patch` and :func:`import_cellpose`; the
mask computation itself runs without it.
"""

import contextlib
import sys
import warnings

import numpy as np
from scipy import ndimage

from ._backend import check_volume, get_array_module, import_cupy
from .filters import volume_and_overlap
from .group import relabel_by_first_voxel
from .reconstruct import reconstruct

# Cellpose's networks predict 5 times the unit flows.
DP_SCALE = 5.0
# Cellpose seeds a mask only where more than 10 voxels end in one place; a
# smaller group would be left unlabelled there, so it is dropped here too.
_MIN_GROUP = 11
# Cellpose follows the flows one voxel per unit of flow per iteration. Its
# unit-length flows gather each cell's voxels into one compact cluster, so no
# closing is needed: the 6-connected components of the end voxels (radius 0)
# matched Cellpose's masks best, also for cells 6 to 8 voxels across, where
# any closing merged neighbours.
_STEP = 1.0
_CLOSING_RADIUS = 0.0
# Logits of a certain prediction: well above and below the threshold 0.
_CERTAIN_LOGIT = 10.0
# torchvision's schemas of the two operators it registers fake kernels for.
_TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def compute_masks(dP, cellprob, p=None, niter=200, cellprob_threshold=0.0, flow_threshold=0.4, do_3D=False,
                  min_size=-1, max_size_fraction=0.4, device=None):
    """Cellpose's ``dynamics.compute_masks`` for 3D flows, by cp3d's engine.

    Every voxel with ``cellprob > cellprob_threshold`` follows ``dP / 5``
    towards its centre for `niter` steps of one voxel, as in Cellpose; the
    end positions are grouped by a closing and connected components
    (:func:`cp3d.reconstruct`) instead of Cellpose's histogram seeds, so the
    cost does not grow with the number of cells.

    Parameters
    ----------
    dP : ndarray, shape (3, Z, Y, X)
        Cellpose's flows (z, y, x): 5 times unit vectors pointing towards
        the cell centres, as its networks predict them. 2D flows are refused.
    cellprob : ndarray, shape (Z, Y, X)
        Cell probability logits.
    p : None
        Accepted for Cellpose's signature and ignored, as Cellpose 4 does.
    niter : int
        Number of one-voxel steps (Cellpose's default 200).
    cellprob_threshold : float
        Voxels with ``cellprob`` above it are followed.
    flow_threshold : float or None
        Accepted for Cellpose's signature. Cellpose checks flow errors in 2D
        only, so 3D masks are never checked, as in Cellpose.
    do_3D : bool
        Accepted for Cellpose's signature: the flows are 3D, so the masks
        are (Cellpose 4.2 itself fails on 3D flows with ``do_3D=False``).
    min_size : int
        Masks with fewer voxels are removed and holes inside masks are
        filled, as Cellpose's ``fill_holes_and_remove_small_masks``;
        ``-1`` (default) does neither.
    max_size_fraction : float
        Masks larger than this fraction of the volume are removed.
    device : torch.device, str or None
        ``"cuda"`` runs on the GPU through CuPy (the arrays are copied to
        the device and the masks back, as Cellpose does); anything else runs
        on the CPU.

    Returns
    -------
    masks : ndarray, shape (Z, Y, X)
        Labels 1..N numbered in C order of their first voxel (as Cellpose's
        ``fastremap.renumber``), 0 for background; uint16, or uint32 beyond
        65,535 masks.

    Notes
    -----
    Groups of fewer than 11 voxels are dropped: Cellpose seeds a mask only
    where more than 10 voxels end in one place. Where Cellpose's flows are
    clean, the masks match Cellpose's (see ``tests/test_cellpose.py`` and
    ``bench/bench_reconstruct.py``).

    Examples
    --------
    >>> import numpy as np
    >>> import cp3d
    >>> from cp3d.cellpose import compute_masks
    >>> truth = np.zeros((16, 16, 32), np.uint32)
    >>> truth[2:14, 2:14, 2:15], truth[2:14, 2:14, 17:30] = 1, 2
    >>> dP = -5 * cp3d.heat_flows(truth)  # Cellpose's convention: inward, times 5
    >>> cellprob = np.where(truth > 0, 5.0, -5.0)
    >>> masks = compute_masks(dP, cellprob, do_3D=True)
    >>> masks.dtype, int(masks.max())
    (dtype('uint16'), 2)
    """
    backend, xp = _backend_for(device)
    dP = _check_dp(dP, xp)
    cellprob = check_volume(xp.asarray(cellprob), "cellprob")
    if tuple(cellprob.shape) != tuple(dP.shape[1:]):
        raise ValueError(f"cellprob shape {tuple(cellprob.shape)} does not match dP's {tuple(dP.shape[1:])}")
    if isinstance(niter, (bool, np.bool_)) or int(niter) != niter or niter < 0:
        raise ValueError(f"niter must be a non-negative integer, got {niter!r}")
    if not 0 < max_size_fraction:
        raise ValueError(f"max_size_fraction must be positive, got {max_size_fraction!r}")
    foreground = cellprob > cellprob_threshold
    # As Cellpose: flows are zero off the cells, so a voxel stepping off them stops.
    flows = dP * foreground
    flows *= np.float32(1 / DP_SCALE)
    with warnings.catch_warnings():
        # The convention is Cellpose's by definition here; reconstruct's sign
        # guess is meant for callers who may not know it (and misreads cells
        # of 3 voxels or less).
        warnings.filterwarnings("ignore", message="the flows point", category=UserWarning)
        labels = reconstruct(flows, foreground, step=_STEP, n_iter=int(niter), closing_radius=_CLOSING_RADIUS,
                             diameter_range=(0, np.inf), min_overlap=0, max_flow_error=None, targets="heat",
                             inward=True, backend=backend)
    smallest = max(_MIN_GROUP, min_size)
    labels = _keep_sizes(labels, smallest, max_size_fraction * labels.size, backend)
    if min_size > 0:
        labels = _keep_sizes(_fill_holes(labels), min_size, np.inf, backend)
    return labels.astype(np.uint16 if int(labels.max()) < 2**16 else np.uint32)


def _backend_for(device):
    kind = getattr(device, "type", device)
    if kind is not None and str(kind).startswith("cuda"):
        return "cuda", import_cupy()
    return "numba", np


def _check_dp(dP, xp):
    dP = xp.asarray(dP)
    if dP.ndim == 3 and dP.shape[0] == 2:
        raise ValueError("cp3d computes 3D masks: dP must be (3, Z, Y, X), got 2D flows of shape "
                         f"{tuple(dP.shape)}; use cellpose.dynamics.compute_masks for 2D images")
    if dP.ndim != 4 or dP.shape[0] != 3:
        raise ValueError(f"dP must have shape (3, Z, Y, X), got {tuple(dP.shape)}")
    if dP.dtype.kind != "f":
        raise TypeError(f"dP must be floating point, got {dP.dtype}")
    return dP.astype(np.float32, copy=False)


def _keep_sizes(labels, smallest, largest, backend):
    volume = volume_and_overlap(labels, labels > 0)[0]
    keep = (volume >= smallest) & (volume <= largest)
    keep[0] = False
    return relabel_by_first_voxel(labels, backend, keep=keep)


def _fill_holes(labels):
    """Give each background region enclosed by a single mask to that mask.

    One labelling of the background and one pass over the neighbouring
    voxel pairs replace Cellpose's loop over masks (one ``fill_voids`` call
    each), which costs a Python iteration per mask.
    """
    xp = get_array_module(labels)
    if xp is np:
        nd = ndimage
    else:
        from cupyx.scipy import ndimage as nd
    background, n = nd.label(labels == 0)
    if n == 0:
        return labels
    owner = xp.zeros(n + 1, np.int64)  # the single enclosing label, -1 for several or the border
    owner[xp.unique(xp.concatenate([background[i].ravel() for i in (0, -1)]
                                   + [background[:, i].ravel() for i in (0, -1)]
                                   + [background[:, :, i].ravel() for i in (0, -1)]))] = -1
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        for region, neighbour in ((background[tuple(lo)], labels[tuple(hi)]),
                                  (background[tuple(hi)], labels[tuple(lo)])):
            touching = (region > 0) & (neighbour > 0)
            pairs = xp.unique(xp.stack([region[touching], neighbour[touching].astype(np.int64)]), axis=1)
            if pairs.size == 0:
                continue
            current = owner[pairs[0]]
            conflict = (current != 0) & (current != pairs[1])
            owner[pairs[0]] = xp.where(conflict, -1, pairs[1])
            # a region seen with two labels in one pass: np.unique sorted the pairs by region
            repeated = pairs[0][1:] == pairs[0][:-1]
            owner[pairs[0][1:][repeated]] = -1
    owner[0] = 0
    fill = xp.maximum(owner, 0).astype(labels.dtype)[background]
    return xp.where(labels == 0, fill, labels)


def import_cellpose():
    """Import Cellpose (its ``dynamics`` and ``models``), also beside a CPU-only torch.

    A CPU-only torch cannot load torchvision's compiled operators, and
    torchvision (imported by Cellpose) registers fake kernels for
    ``torchvision::nms`` and ``torchvision::qnms`` at import time, which
    fails unless their schemas exist: they are defined here first, with
    torchvision's own signatures. Nothing in Cellpose's 3D path calls them.

    Returns
    -------
    module
        The ``cellpose`` package.

    Raises
    ------
    ImportError
        When Cellpose or one of its dependencies cannot be imported.
    """
    if "cellpose.models" not in sys.modules:
        import torch

        if torch.version.cuda is None and not torch.cuda.is_available():
            for name, schema in _TORCHVISION_SCHEMAS.items():
                try:
                    torch.library.define(f"torchvision::{name}", schema)
                except RuntimeError:  # already defined (by torchvision or an earlier call)
                    pass
    import cellpose.dynamics
    import cellpose.models

    return cellpose


def outputs_from_masks(masks):
    """What a perfect Cellpose network would predict for `masks`, made by Cellpose.

    The ground truth to compare mask computations on: Cellpose's own 3D
    heat-diffusion flows (``dynamics.masks_to_flows_gpu_3d``, on the CPU),
    in its network's convention. Needs Cellpose.

    Parameters
    ----------
    masks : ndarray, shape (Z, Y, X)
        Instance labels, 0 for background (ids need not be consecutive).

    Returns
    -------
    dP : ndarray, shape (3, Z, Y, X), float32
        5 times the unit flows (z, y, x), pointing towards the centres.
    cellprob : ndarray, shape (Z, Y, X), float32
        Logits: +10 on the cells, -10 on the background.
    """
    import torch

    dynamics = import_cellpose().dynamics
    masks = check_volume(np.asarray(masks), "masks")
    ids, consecutive = np.unique(masks, return_inverse=True)
    # Cellpose needs ids 1..N.
    consecutive = consecutive.reshape(masks.shape) + (1 if ids[0] != 0 else 0)
    flows = dynamics.masks_to_flows_gpu_3d(consecutive.astype(np.int64), device=torch.device("cpu"))
    dP = (DP_SCALE * flows).astype(np.float32)
    cellprob = np.where(masks > 0, _CERTAIN_LOGIT, -_CERTAIN_LOGIT).astype(np.float32)
    return dP, cellprob


@contextlib.contextmanager
def patch():
    """Make Cellpose compute its 3D masks with cp3d while the context is open.

    Inside the ``with`` block, ``cellpose.dynamics.compute_masks`` (which
    ``CellposeModel.eval(..., do_3D=True)`` reaches through
    ``resize_and_compute_masks``) runs :func:`compute_masks` for 3D flows;
    2D flows still go to Cellpose's own function. The original is restored
    on exit, also after an error.

    Examples
    --------
    >>> import cp3d.cellpose
    >>> with cp3d.cellpose.patch():  # doctest: +SKIP
    ...     masks, flows, styles = model.eval(stack, do_3D=True, z_axis=0)
    """
    dynamics = import_cellpose().dynamics
    original = dynamics.compute_masks

    def compute_masks_with_cp3d(dP, cellprob, *args, **kwargs):
        if np.ndim(dP) == 4:
            return compute_masks(dP, cellprob, *args, **kwargs)
        return original(dP, cellprob, *args, **kwargs)

    dynamics.compute_masks = compute_masks_with_cp3d
    try:
        yield
    finally:
        dynamics.compute_masks = original
