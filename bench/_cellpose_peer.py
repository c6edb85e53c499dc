"""Cellpose 4.x as the peer of ``cp3d.reconstruct`` in ``bench_reconstruct.py``.

Only used by the benchmark: it imports Cellpose on a CPU-only torch, makes
Cellpose's own oracle flows from instance labels and runs its 3D mask
reconstruction, ``cellpose.dynamics.compute_masks(..., do_3D=True)``.

Cellpose is imported through :func:`cp3d.cellpose.import_cellpose`, which
also works beside a CPU-only torch.
"""

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
        from cp3d.cellpose import import_cellpose

        _dynamics = import_cellpose().dynamics
    from importlib.metadata import version

    return version("cellpose")


def oracle_outputs(labels):
    """Cellpose's network outputs for perfect predictions of `labels` (see cp3d.cellpose.outputs_from_masks)."""
    from cp3d.cellpose import outputs_from_masks

    return outputs_from_masks(labels)


def compute_masks(dP, cellprob, niter=200):
    """Cellpose's 3D reconstruction on the CPU, with its defaults.

    ``cellprob_threshold=0``, ``niter=200`` (the 3D default), no flow-error
    check (Cellpose skips it in 3D), no minimum size.
    """
    import torch

    return _dynamics.compute_masks(dP, cellprob, niter=niter, do_3D=True, device=torch.device("cpu"))
