"""Annotated stacks for training: read from a folder, brought to the model's grid.

Two layouts are read, in one folder, side by side:

- Cellpose's convention: ``NAME.tif`` and its instance masks ``NAME_masks.tif``
  (the suffix is `mask_filter`; ``.tiff`` works too). Images without masks
  are skipped with a warning.
- HDF5 files (``.h5``, ``.hdf5``, ``.hdf``) holding a ``raw`` image and a
  ``label`` instance dataset, the layout of the released Cellpose3D code and
  of PlantSeg. Their voxel size is read from an ``element_size_um``
  attribute (PlantSeg's) when present.

Sparse annotations, where only some cells are drawn, mark what is known to be
background in a mask beside them: ``NAME_background.tif`` (nonzero =
background), or a ``background`` dataset in the HDF5 file. A stack with such
a mask is sparse: its other unlabelled voxels are unknown, and training
ignores them (see :func:`cp3d.model.train`, ``sparse``).
"""

import logging
import os
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import numpy as np

from .._backend import as_triple
from ..io import read_image
from ..metrics import median_diameter
from ..segment import cell_extent
from .predict import zoom_to_shape

__all__ = ["AnnotatedStack", "find_pairs", "from_corrections", "read_annotated", "to_model_grid"]

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
HDF5_IMAGE, HDF5_LABELS, HDF5_BACKGROUND = "raw", "label", "background"
BACKGROUND_SUFFIX = "_background"  # NAME_background.tif beside NAME.tif: the voxels known to be background


class AnnotatedStack(NamedTuple):
    """An image and its instance labels, as read from a folder.

    Attributes
    ----------
    name : str
        The file name the pair is known by (the image's, or the HDF5 file's).
    image : ndarray, shape (Z, Y, X), float32
    labels : ndarray, shape (Z, Y, X), uint32
        Instances 1..N (ids need not be consecutive), 0 for background.
    voxel_size : tuple of 3 float or None
        ``(z, y, x)`` as recorded in the file, or None.
    background : ndarray of bool, shape (Z, Y, X), or None
        For sparse annotations: the unlabelled voxels known to be background
        (the others are unknown). None when the file has no background mask.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    voxel_size: Optional[Tuple[float, float, float]]
    background: Optional[np.ndarray] = None


def find_pairs(folder, mask_filter="_masks"):
    """The annotated stacks of `folder`: ``(image_path, masks_path)`` pairs.

    Parameters
    ----------
    folder : path-like
        Folder holding ``NAME.tif`` + ``NAME{mask_filter}.tif`` pairs and/or
        HDF5 files with ``raw`` and ``label`` datasets. A
        ``NAME_background.tif`` beside a pair is its background mask (read by
        :func:`read_annotated`), not an image.
    mask_filter : str
        Suffix of the mask files' stems (Cellpose's ``--mask_filter``).

    Returns
    -------
    list of (pathlib.Path, pathlib.Path or None)
        Sorted by image name; an HDF5 file pairs with ``None`` (it holds both).

    Raises
    ------
    ValueError
        For a missing folder, a mask file without its image, or a folder
        without any pair.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from cp3d.io import write_image, write_labels
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_image(folder / "a.tif", np.zeros((4, 8, 8), np.float32))
    >>> write_labels(folder / "a_masks.tif", np.ones((4, 8, 8), np.uint32))
    >>> [(i.name, m.name) for i, m in find_pairs(folder)]
    [('a.tif', 'a_masks.tif')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"training data folder {os.fspath(folder)!r} does not exist or is not a folder")
    if not isinstance(mask_filter, str) or not mask_filter:
        raise ValueError(f"mask_filter must be a non-empty string, got {mask_filter!r}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    tiffs = {p.stem: p for p in files if p.suffix.lower() in TIFF_SUFFIXES}
    masks = {stem: p for stem, p in tiffs.items() if stem.endswith(mask_filter)}
    backgrounds = {stem for stem in tiffs if stem.endswith(BACKGROUND_SUFFIX)
                   and stem[: -len(BACKGROUND_SUFFIX)] + mask_filter in masks}
    pairs = []
    for stem, mask in masks.items():
        image = tiffs.get(stem[: -len(mask_filter)])
        if image is None or image.stem in masks:
            raise ValueError(f"mask file {mask.name} in {os.fspath(folder)!r} has no image: expected "
                             f"{stem[: -len(mask_filter)]}.tif beside it")
        pairs.append((image, mask))
    paired = {image.stem for image, _ in pairs}
    unpaired = sorted(p.name for stem, p in tiffs.items()
                      if stem not in masks and stem not in paired and stem not in backgrounds)
    if unpaired:
        log.warning("skipping %d image(s) without a %s file in %s: %s", len(unpaired), mask_filter, folder,
                    ", ".join(unpaired[:5]) + (" ..." if len(unpaired) > 5 else ""))
    pairs += [(p, None) for p in files if p.suffix.lower() in HDF5_SUFFIXES]
    if not pairs:
        raise ValueError(f"no annotated stacks in {os.fspath(folder)!r}: expected NAME.tif with "
                         f"NAME{mask_filter}.tif, or HDF5 files with {HDF5_IMAGE!r} and {HDF5_LABELS!r} datasets")
    return sorted(pairs, key=lambda pair: pair[0].name)


def read_annotated(image_path, masks_path=None):
    """Read one annotated stack and check it can be trained on.

    Parameters
    ----------
    image_path : path-like
        A TIFF image, or an HDF5 file with ``raw`` and ``label`` datasets
        (then `masks_path` is None).
    masks_path : path-like, optional
        The TIFF instance masks of a TIFF image. A ``NAME_background.tif``
        beside the image (or a ``background`` dataset in the HDF5 file) is
        read as the stack's background mask.

    Returns
    -------
    AnnotatedStack

    Raises
    ------
    ValueError
        For a file that is not a 3D stack, image, masks or background mask
        of different shapes, masks that hold no instance, a background mask
        that overlaps the cells, or an HDF5 file without the datasets.
    TypeError
        For masks that are not integer labels (floats, booleans).
    """
    image_path = Path(image_path)
    if masks_path is None:
        image, labels, background, voxel_size = _read_hdf5(image_path)
        masks_name = f"{image_path.name}/{HDF5_LABELS}"
        background_name = f"{image_path.name}/{HDF5_BACKGROUND}"
    else:
        stack = read_image(image_path)
        image, voxel_size = stack.data, stack.voxel_size
        labels = read_image(masks_path).data
        masks_name = Path(masks_path).name
        background_path = image_path.with_name(image_path.stem + BACKGROUND_SUFFIX + image_path.suffix)
        background = read_image(background_path).data if background_path.is_file() else None
        background_name = background_path.name
    if image.ndim != 3 or labels.ndim != 3:
        raise ValueError(f"{image_path.name}: training needs 3D stacks, got image {image.shape} and masks "
                         f"{labels.shape}")
    if image.shape != labels.shape:
        raise ValueError(f"{image_path.name} has shape {image.shape} but its masks {masks_name} have {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{masks_name} must hold integer instance labels (0 background, 1..N cells), got dtype "
                        f"{labels.dtype}" + (": a binary mask?" if labels.dtype.kind == "b" else ""))
    if labels.dtype.kind == "i" and int(labels.min()) < 0:
        raise ValueError(f"{masks_name} holds negative labels")
    if not labels.any():
        raise ValueError(f"{masks_name} holds no instance (all zero)")
    if image.dtype.kind not in "biuf":
        raise TypeError(f"{image_path.name}: the image must be real-valued, got dtype {image.dtype}")
    if background is not None:
        if background.shape != labels.shape:
            raise ValueError(f"{background_name} has shape {background.shape} but the masks {masks_name} have "
                             f"{labels.shape}")
        background = np.asarray(background) != 0
        overlap = int(np.count_nonzero(background & (labels > 0)))
        if overlap:
            raise ValueError(f"{background_name} marks {overlap} voxels of labelled cells as background: a voxel "
                             "is a cell's or background, not both")
    return AnnotatedStack(image_path.name, image.astype(np.float32, copy=False),
                          labels.astype(np.uint32, copy=False), voxel_size, background)


def from_corrections(image, corrected, segmented=None, *, voxel_size=None, whole=False, name="corrections"):
    """The annotation a user made by correcting a segmentation: the cells they fixed, the background they erased.

    Parameters
    ----------
    image : array_like, shape (Z, Y, X)
    corrected : array_like of int, shape (Z, Y, X)
        The labels after correction (painted, filled, erased).
    segmented : array_like of int, shape (Z, Y, X), optional
        The labels before correction. The annotated cells are those whose
        voxels changed (painted, grown, shrunk, split or merged), and the
        voxels erased to 0 are background; the rest is unknown. Without it,
        every labelled cell of `corrected` is annotated and 0 is unknown.
    voxel_size : float or (float, float, float), optional
    whole : bool
        The whole of `corrected` is right: every cell annotated, every 0
        background (a dense annotation).
    name : str
        The name the stack is known by in the model card.

    Returns
    -------
    AnnotatedStack
        Sparse (with a background mask) unless `whole`.

    Raises
    ------
    ValueError
        For shapes that differ, labels that are not integers, or no
        correction at all.

    Examples
    --------
    >>> segmented = np.zeros((4, 8, 8), np.uint32)
    >>> segmented[:, :4], segmented[:, 4:, :2] = 1, 2
    >>> corrected = segmented.copy()
    >>> corrected[:, 4:, :2] = 0        # an object that is not a cell, erased
    >>> corrected[:, 5:, 4:] = 3        # a missed cell, painted
    >>> stack = from_corrections(np.ones((4, 8, 8)), corrected, segmented)
    >>> np.unique(stack.labels).tolist(), int(stack.background.sum())
    ([0, 3], 32)
    """
    image = np.asarray(image)
    corrected = np.asarray(corrected)
    segmented = None if segmented is None else np.asarray(segmented)
    for what, arr in (("corrected", corrected), ("segmented", segmented)):
        if arr is None:
            continue
        if arr.shape != image.shape or arr.ndim != 3:
            raise ValueError(f"the {what} labels have shape {arr.shape}, the image {image.shape}: they must be the "
                             "same 3D stack")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"the {what} labels must be integers, got dtype {arr.dtype}")
    vs = None if voxel_size is None else as_triple(voxel_size, "voxel_size")
    labels = corrected.astype(np.uint32)
    if whole:
        cells, background = labels > 0, labels == 0
    elif segmented is None:
        cells, background = labels > 0, None
    else:
        changed = labels != segmented
        touched = np.union1d(labels[changed], segmented[changed])
        cells = np.isin(labels, touched[touched > 0])
        background = changed & (labels == 0)
    if not cells.any():
        raise ValueError("no corrected cell to learn from: paint, fill or erase some cells first" if segmented is
                         not None and not whole else "the labels hold no cell to learn from")
    return AnnotatedStack(name, image.astype(np.float32, copy=False), np.where(cells, labels, 0).astype(np.uint32),
                          vs, background)


def _read_hdf5(path):
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading HDF5 training data needs h5py: pip install 'cp3d[hdf5]'") from e
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in (HDF5_IMAGE, HDF5_LABELS) if k not in f]
            if missing:
                raise ValueError(f"{path.name} has no {' or '.join(map(repr, missing))} dataset (it holds "
                                 f"{sorted(f.keys())}); training reads {HDF5_IMAGE!r} and {HDF5_LABELS!r}")
            image, labels = f[HDF5_IMAGE][()], f[HDF5_LABELS][()]
            background = f[HDF5_BACKGROUND][()] if HDF5_BACKGROUND in f else None
            size = f[HDF5_IMAGE].attrs.get("element_size_um")
    except OSError as e:
        raise ValueError(f"cannot read {path.name} as HDF5: {e}") from e
    voxel_size = None
    if size is not None and np.size(size) == 3:
        voxel_size = as_triple(np.asarray(size, np.float64), f"{path.name} element_size_um")
    return image, labels, background, voxel_size


def to_model_grid(stack, config, *, diameter=None, voxel_size=None):
    """Resample an annotated stack so its cells are ``config.train_diameter`` model voxels across.

    Parameters
    ----------
    stack : AnnotatedStack
    config : UNetConfig
        The model's configuration (``train_diameter`` and ``voxel_size``).
    diameter : float, optional
        Typical cell diameter in voxels along x; default the median
        equivalent-sphere diameter of the stack's labels.
    voxel_size : float or (float, float, float), optional
        Overrides the stack's recorded voxel size (only ratios matter);
        isotropic when neither is known.

    Returns
    -------
    image : ndarray, float32
        Linearly resampled.
    labels : ndarray, uint32
        Resampled by nearest neighbour.
    background : ndarray of bool or None
        The stack's background mask, resampled by nearest neighbour.
    info : dict
        ``diameter``, ``voxel_size``, ``zoom`` (z, y, x) and the shapes, for the model card.
    """
    vs = voxel_size if voxel_size is not None else stack.voxel_size
    vs = as_triple((1.0, 1.0, 1.0) if vs is None else vs, "voxel_size")
    d = median_diameter(stack.labels, vs) if diameter is None else float(diameter)
    extent = cell_extent(d, vs, config.train_diameter)
    # As in cp3d.segment: cells of `extent` voxels become train_diameter voxels on the model's grid.
    zoom = tuple(config.train_diameter / e for e in extent)
    shape = tuple(max(1, int(round(s * z))) for s, z in zip(stack.image.shape, zoom))
    image, labels, background = stack.image, stack.labels, stack.background
    if shape != image.shape:
        image = zoom_to_shape(image, shape, order=1)
        labels = zoom_to_shape(labels, shape, order=0)
        if background is not None:
            background = zoom_to_shape(background.view(np.uint8), shape, order=0) > 0
    info = {"name": stack.name, "diameter": d, "voxel_size": list(vs), "zoom": list(zoom),
            "shape": list(stack.image.shape), "model_grid_shape": list(shape), "cells": int(len(np.unique(labels)) - 1)}
    return image, labels, background, info
