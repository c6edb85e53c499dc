"""Cellpose 4.x as the peer of ``cp3d.reconstruct`` in ``bench_reconstruct.py``.

Only used by the benchmark: it imports Cellpose on a CPU-only torch, makes
Cellpose's own oracle flows from instance labels and runs its 3D mask
reconstruction, ``cellpose.dynamics.compute_masks(..., do_3D=True)``.

A CPU-only torch cannot load torchvision's compiled operators, and
torchvision (imported by Cellpose) registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` at import time, which fails
unless their schemas exist. :func:`load` defines the two schemas, with
torchvision's own signatures, before importing Cellpose; nothing in the
mask reconstruction calls them.
"""

import numpy as np

# torchvision's schemas of the two operators it registers fake kernels for.
_TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# Cellpose networks predict 5 times the unit flows; compute_masks divides by 5.
_FLOW_SCALE = 5.0
# Cell-probability logits of the oracle: well above / below the threshold 0.
_CELLPROB_LOGIT = 10.0

_dynamics = None


def load():
    """Import Cellpose's ``dynamics`` module; return the installed Cellpose version.

    Raises
    ------
    ImportError
        When Cellpose (or one of its dependencies) cannot be imported.
    """
    global _dynamics
    if _dynamics is None:
        import torch

        if torch.version.cuda is None and not torch.cuda.is_available():
            for name, schema in _TORCHVISION_SCHEMAS.items():
                try:
                    torch.library.define(f"torchvision::{name}", schema)
                except RuntimeError:  # already defined (by torchvision or an earlier call)
                    pass
        from cellpose import dynamics

        _dynamics = dynamics
    from importlib.metadata import version

    return version("cellpose")


def oracle_outputs(labels):
    """Cellpose's network outputs for perfect predictions of `labels`.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X)
        Instance labels, 0 for background (renumbered 1..N here: Cellpose
        needs consecutive ids).

    Returns
    -------
    dP : ndarray, shape (3, Z, Y, X), float32
        ``5 *`` Cellpose's 3D heat-diffusion flows (z, y, x), pointing
        towards the centres, as the network predicts them.
    cellprob : ndarray, shape (Z, Y, X), float32
        Logits: +10 on the cells, -10 on the background.
    """
    import torch

    ids, consecutive = np.unique(labels, return_inverse=True)
    consecutive = consecutive.reshape(labels.shape) + (1 if ids[0] != 0 else 0)
    mu = _dynamics.masks_to_flows_gpu_3d(consecutive.astype(np.int64), device=torch.device("cpu"))
    dP = (_FLOW_SCALE * mu).astype(np.float32)
    cellprob = np.where(labels > 0, _CELLPROB_LOGIT, -_CELLPROB_LOGIT).astype(np.float32)
    return dP, cellprob


def compute_masks(dP, cellprob, niter=200):
    """Cellpose's 3D reconstruction on the CPU, with its defaults.

    ``cellprob_threshold=0``, ``niter=200`` (the 3D default), no flow-error
    check (Cellpose skips it in 3D), no minimum size.
    """
    import torch

    return _dynamics.compute_masks(dP, cellprob, niter=niter, do_3D=True, device=torch.device("cpu"))
