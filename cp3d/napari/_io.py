"""napari reader and writers: 3D stacks whose voxel size becomes the layer's scale, and back."""

from pathlib import Path

import numpy as np

from .. import io

# File suffix -> function returning (data, voxel_size). Another format is one
# more entry here (and its pattern in napari.yaml). OME-Zarr opens lazily.
_READERS = {".tif": io.read_image, ".tiff": io.read_image, ".zarr": io.read_ome_zarr}


def get_reader(path):
    """Return the reader for `path` if cp3d reads its format, else None (napari asks another plugin)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if _READERS.get(Path(path).suffix.lower()) is None:
        return None
    return read_layers


def read_layers(path):
    """Read one 3D stack as a layer: labels for 32- and 64-bit integers (cp3d writes labels as uint32), else an
    image; its voxel size as the scale."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    stack = _READERS[Path(path).suffix.lower()](path)
    meta = {"name": Path(path).stem}
    if stack.voxel_size is not None:
        meta["scale"] = stack.voxel_size
    is_labels = stack.data.dtype.kind in "iu" and stack.data.dtype.itemsize >= 4
    return [(stack.data, meta, "labels" if is_labels else "image")]


def write_image(path, data, meta):
    """Write a 3D image layer as a TIFF or OME-Zarr (``.zarr``) carrying the layer's scale as voxel size."""
    if Path(path).suffix.lower() == ".zarr":
        io.write_ome_zarr(path, _as_volume(data), voxel_size=_voxel_size(meta))
    else:
        io.write_image(path, _as_volume(data), voxel_size=_voxel_size(meta))
    return [str(path)]


def write_labels(path, data, meta):
    """Write a 3D labels layer as uint32, TIFF or OME-Zarr (``.zarr``), carrying the layer's scale as voxel size."""
    labels = _as_volume(data)
    if Path(path).suffix.lower() == ".zarr":
        io.write_ome_zarr(path, labels.astype(np.uint32, copy=False), voxel_size=_voxel_size(meta))
    else:
        io.write_labels(path, labels, voxel_size=_voxel_size(meta))
    return [str(path)]


def _as_volume(data):
    # a multiscale layer holds a list of levels: the first is full resolution
    return np.asarray(data[0] if isinstance(data, (list, tuple)) else data)


def _voxel_size(meta):
    """The layer's scale as voxel size; napari's default unit scale means "not calibrated"."""
    scale = meta.get("scale")
    if scale is None or len(scale) < 3 or all(s == 1 for s in scale[-3:]):
        return None
    return tuple(float(s) for s in scale[-3:])
