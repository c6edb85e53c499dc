"""Per-cell measurements: one row per instance, computed in one pass.

`cell_table` sums, per instance, the voxel count, the coordinates, the
bounding box and the image intensity in a single parallel pass over the
label volume (one partial table per thread, then a reduction), never a loop
over instances. The flow error and foreground overlap are the filters' own
statistics (:func:`cp3d.filters.instance_statistics`), so the table shows
exactly what :func:`cp3d.filter_instances` judged.
"""

import math

import numba
import numpy as np

from ._backend import (as_triple, check_flows, check_foreground, check_labels, check_volume, is_cupy_array,
                       start_numba_pool)
from .filters import check_targets, instance_statistics, volume_and_overlap

__all__ = ["CellTable", "cell_table"]

# Ids up to this bound index the per-thread tables directly; sparser ids are
# compacted first so the tables stay a few MB per thread.
_MAX_DIRECT_ID = 1 << 20


class CellTable(dict):
    """Columns of a per-cell table: a dict of equal-length 1D NumPy arrays.

    A plain ``dict`` (column name to array, one entry per cell, ordered by
    label id), so ``table["volume"]`` is a column and
    ``pandas.DataFrame(table)`` makes a data frame where pandas is installed.

    Attributes
    ----------
    n_cells : int
        Number of rows.
    """

    @property
    def n_cells(self):
        return len(self["label"])

    def to_csv(self, path):
        """Write the table as comma-separated text with a header line, atomically.

        Integer columns are written as integers, the others with 9
        significant digits. An existing file is replaced only once the new
        one is complete; the folder must exist.

        Parameters
        ----------
        path : str or os.PathLike
            Output file.
        """
        from .io import atomic_write

        names = list(self)
        fmt = ["%d" if self[name].dtype.kind in "iub" else "%.9g" for name in names]
        # An object array keeps each column's own type, so integers print as integers.
        rows = np.empty((self.n_cells, len(names)), dtype=object)
        for j, name in enumerate(names):
            rows[:, j] = self[name]
        atomic_write(path, lambda fh: np.savetxt(fh, rows, fmt=fmt, delimiter=",", header=",".join(names),
                                                 comments=""))

    def __repr__(self):
        return f"CellTable({self.n_cells} cells; columns: {', '.join(self)})"


def cell_table(labels, image=None, flows=None, foreground=None, voxel_size=None, *, targets="tanh",
               tanh_scale=5.0, inward=False):
    """Measure every instance of a label volume: one row per cell.

    Parameters
    ----------
    labels : numpy.ndarray, shape (Z, Y, X)
        Instance labels, 0 for background. Ids need not be consecutive.
    image : numpy.ndarray, shape (Z, Y, X), optional
        Intensities for the ``mean_intensity`` column.
    flows : numpy.ndarray, shape (3, Z, Y, X), optional
        The flows the labels were reconstructed from, for the ``flow_error``
        column; needs `foreground`.
    foreground : numpy.ndarray, shape (Z, Y, X), optional
        Bool mask or probability map (thresholded at 0.5), for the
        ``foreground_overlap`` column.
    voxel_size : float or (float, float, float), optional
        Voxel size (z, y, x) in any length unit; adds the ``physical_*``
        columns in that unit.
    targets : {"tanh", "heat"}
        Formulation of `flows` (as for :func:`cp3d.filter_instances`).
    tanh_scale : float or (float, float, float)
        Scale of tanh `flows`.
    inward : bool
        Set for flows pointing towards the centres (Cellpose's sign).

    Returns
    -------
    CellTable
        A dict of 1D arrays, one entry per instance present, in increasing
        id order:

        ``label``
            The instance id (uint32).
        ``voxels``
            Voxel count.
        ``centroid_z``, ``centroid_y``, ``centroid_x``
            Mean voxel coordinate.
        ``bbox_z0``, ``bbox_y0``, ``bbox_x0``, ``bbox_z1``, ``bbox_y1``, ``bbox_x1``
            Bounding box, end exclusive: ``labels[z0:z1, y0:y1, x0:x1]``
            holds the whole cell.
        ``touches_border``
            Whether the cell reaches an outer face of the volume (such cells
            are exempt from the filters' lower size bound).
        ``equivalent_diameter``
            Diameter of the sphere of equal volume, ``(6 V / pi) ** (1/3)``,
            in voxels (Cellpose's ``diameter``).
        ``physical_volume``, ``physical_centroid_z/y/x``, ``physical_equivalent_diameter``
            With `voxel_size`: the same in its unit (volume: voxel count
            times the product of the voxel size).
        ``mean_intensity``
            With `image`: mean of the image over the cell's voxels.
        ``foreground_overlap``
            With `foreground`: the fraction of the cell's voxels in it.
        ``flow_error``
            With `flows` (and `foreground`): mean absolute difference between
            the flows and those recomputed from the cell. These two are the
            statistics :func:`cp3d.filter_instances` thresholds, computed by
            the same functions.

    Raises
    ------
    TypeError
        For CuPy arrays (pass ``cupy.asnumpy(...)``) or non-integer labels.
    ValueError
        For shapes that do not match, `flows` without `foreground`, or a bad
        voxel size.

    Notes
    -----
    Counts, coordinate sums, bounding boxes and intensity sums come from one
    parallel pass (Numba, one partial table per thread): the cost is one
    read of the volume whatever the number of cells (10,000 cells in
    8 million voxels: about 0.1 s on 2 cores, ``bench/bench_measure.py``).

    Examples
    --------
    >>> import numpy as np
    >>> import cp3d
    >>> labels = np.zeros((8, 8, 8), np.uint32)
    >>> labels[1:3, 1:3, 1:3] = 5
    >>> table = cp3d.cell_table(labels, voxel_size=(2.0, 0.5, 0.5))
    >>> table["label"].tolist(), table["voxels"].tolist(), table["physical_volume"].tolist()
    ([5], [8], [4.0])
    >>> table["centroid_z"].tolist(), table["bbox_z1"].tolist()
    ([1.5], [3])
    """
    arrays = (labels, image, flows, foreground)
    if any(is_cupy_array(a) for a in arrays):
        raise TypeError("cell_table takes NumPy arrays; pass cupy.asnumpy(...) for CuPy arrays")
    labels = check_labels(labels)
    if image is not None:
        image = check_volume(image, "image")
        if image.shape != labels.shape:
            raise ValueError(f"image shape {image.shape} does not match labels shape {labels.shape}")
        if image.dtype.kind not in "biuf":
            raise TypeError(f"image must be numeric, got dtype {image.dtype}")
        if image.dtype.kind == "b" or image.dtype == np.float16:
            image = image.astype(np.float32)  # bool and float16 have no Numba arithmetic
        image = np.ascontiguousarray(image)
    if flows is not None and foreground is None:
        raise ValueError("flows need a foreground: the flow error is computed with it, as in filter_instances")
    if foreground is not None:
        foreground = check_foreground(foreground, labels.shape)
    if flows is not None:
        flows = check_flows(flows)
        if flows.shape[1:] != labels.shape:
            raise ValueError(f"flows shape {flows.shape} does not match labels shape {labels.shape}")
        check_targets(targets)
    if voxel_size is not None:
        voxel_size = as_triple(voxel_size, "voxel_size")

    index, ids = _index_labels(labels)
    start_numba_pool()  # without touching torch's thread count, before numba.get_num_threads() would
    n_slabs = max(1, min(labels.shape[0], numba.get_num_threads()))
    sums, lo, hi = _sums_kernel(index, image if image is not None else np.zeros((1, 1, 1), np.float32),
                                image is not None, len(ids), n_slabs)
    sums, lo, hi = sums.sum(axis=0)[1:], lo.min(axis=0)[1:], hi.max(axis=0)[1:]
    count = sums[:, 0].astype(np.int64)

    table = CellTable(label=ids.astype(np.uint32), voxels=count)
    centroid = sums[:, 1:4] / count[:, None]
    for axis, name in enumerate("zyx"):
        table[f"centroid_{name}"] = centroid[:, axis]
    for end, bound in (("0", lo), ("1", hi + 1)):
        for axis, name in enumerate("zyx"):
            table[f"bbox_{name}{end}"] = bound[:, axis].astype(np.int64)
    table["touches_border"] = (lo == 0).any(axis=1) | (hi + 1 == np.array(labels.shape)).any(axis=1)
    table["equivalent_diameter"] = np.cbrt(6 * count / math.pi)
    if voxel_size is not None:
        volume = count * math.prod(voxel_size)
        table["physical_volume"] = volume
        for axis, name in enumerate("zyx"):
            table[f"physical_centroid_{name}"] = centroid[:, axis] * voxel_size[axis]
        table["physical_equivalent_diameter"] = np.cbrt(6 * volume / math.pi)
    if image is not None:
        table["mean_intensity"] = sums[:, 4] / count
    if flows is not None:
        _, overlap, flow_error = instance_statistics(index, flows, foreground, targets=targets,
                                                     tanh_scale=tanh_scale, inward=inward, backend="numba")
        table["foreground_overlap"] = np.asarray(overlap[1:], np.float64)
        table["flow_error"] = np.asarray(flow_error[1:], np.float64)
    elif foreground is not None:
        table["foreground_overlap"] = np.asarray(volume_and_overlap(index, foreground)[1][1:], np.float64)
    return table


def _index_labels(labels):
    """Labels as row indices 1..K (0 background) and the id of each row.

    Ids that are small enough index the tables directly (rows of absent ids
    are dropped afterwards); sparse large ids are compacted.
    """
    max_id = int(labels.max())
    if max_id <= _MAX_DIRECT_ID:
        present = np.bincount(labels.ravel(), minlength=max_id + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        if ids.size == max_id:
            return labels, ids
        lut = np.cumsum(present, dtype=np.uint32)
        return lut[labels], ids
    ids, inverse = np.unique(labels.ravel(), return_inverse=True)
    if ids[0] != 0:
        inverse += 1
        ids = np.concatenate([[0], ids])
    return inverse.reshape(labels.shape).astype(np.uint32), ids[1:]


@numba.njit(parallel=True, cache=True)
def _sums_kernel(index, image, with_image, n_rows, n_slabs):
    """Per slab (one per thread): count, coordinate sums and intensity sum; bounding boxes."""
    nz, ny, nx = index.shape
    sums = np.zeros((n_slabs, n_rows + 1, 5))
    lo = np.full((n_slabs, n_rows + 1, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.full((n_slabs, n_rows + 1, 3), -1, np.int64)
    for s in numba.prange(n_slabs):
        for z in range(s * nz // n_slabs, (s + 1) * nz // n_slabs):
            for y in range(ny):
                for x in range(nx):
                    row = index[z, y, x]
                    if row == 0:
                        continue
                    sums[s, row, 0] += 1.0
                    sums[s, row, 1] += z
                    sums[s, row, 2] += y
                    sums[s, row, 3] += x
                    if with_image:
                        sums[s, row, 4] += image[z, y, x]
                    lo[s, row, 0] = min(lo[s, row, 0], z)
                    lo[s, row, 1] = min(lo[s, row, 1], y)
                    lo[s, row, 2] = min(lo[s, row, 2], x)
                    hi[s, row, 0] = max(hi[s, row, 0], z)
                    hi[s, row, 1] = max(hi[s, row, 1], y)
                    hi[s, row, 2] = max(hi[s, row, 2], x)
    return sums, lo, hi
