"""Read and write 3D TIFF stacks with their voxel size.

Files are written ImageJ-compatible (ImageJ reads the spacing and pixel size
from them) and atomically: the data go to a temporary file in the target
folder, which replaces the target only once it is complete.
"""

import logging
import os
import secrets
import shutil
import xml.etree.ElementTree as ET
from typing import NamedTuple, Optional, Tuple

import numpy as np
import tifffile

from ._backend import as_triple, check_labels, check_volume, is_cupy_array

__all__ = ["TiffImage", "read_image", "write_image", "write_labels", "LazyImage", "open_image", "read_ome_zarr",
           "write_ome_zarr", "write_ome_zarr_labels", "write_tiff_chunked"]

logger = logging.getLogger(__name__)

# Length units met in ImageJ and OME metadata, in micrometres.
_UNITS_UM = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "\\u00b5m": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4, "m": 1e6,
}


class TiffImage(NamedTuple):
    """A 3D stack and its voxel size.

    Attributes
    ----------
    data : numpy.ndarray, shape (Z, Y, X)
        The pixels, in the dtype stored in the file.
    voxel_size : tuple of 3 float or None
        ``(z, y, x)`` size of a voxel in micrometres, or None when the file
        does not record all three in a known length unit.
    """

    data: np.ndarray
    voxel_size: Optional[Tuple[float, float, float]]


def read_image(path):
    """Read a 3D TIFF stack and its voxel size.

    Parameters
    ----------
    path : str or os.PathLike
        A TIFF file: ImageJ hyperstack, OME-TIFF or a plain multi-page stack.

    Returns
    -------
    TiffImage
        ``data`` of shape (Z, Y, X) and ``voxel_size`` in micrometres or None.
        The voxel size comes from OME ``PhysicalSizeZ/Y/X`` or, for ImageJ
        files, from ``spacing`` (z) and the XResolution/YResolution tags.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    ValueError
        If the file cannot be read as a TIFF, has several channels or time
        points, or is not a 3D stack once singleton axes are dropped.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> folder = tempfile.mkdtemp()
    >>> path = os.path.join(folder, "stack.tif")
    >>> write_image(path, np.zeros((2, 3, 4), np.uint16), voxel_size=(2.0, 0.5, 0.5))
    >>> image = read_image(path)
    >>> image.data.shape, image.voxel_size
    ((2, 3, 4), (2.0, 0.5, 0.5))
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder, not a TIFF file")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            axes = series.axes
            voxel_size = _voxel_size(tif)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as err:
        raise ValueError(f"cannot read {path!r} as a TIFF stack: {err}") from err
    return TiffImage(_as_zyx(data, axes, path), voxel_size)


def write_image(path, data, voxel_size=None):
    """Write a 3D image as an ImageJ-compatible TIFF, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file; its folder must exist. An existing file is replaced.
    data : numpy.ndarray, shape (Z, Y, X)
        Floating-point data are written as float32, booleans as uint8 and
        integers in their own dtype (64-bit integers narrowed to 32 bits
        when their values fit).
    voxel_size : float or tuple of 3 float, optional
        ``(z, y, x)`` voxel size in micrometres.

    Raises
    ------
    TypeError
        For a CuPy array (move it to the host first) or an unsupported dtype.
    ValueError
        For data that are not 3D, 64-bit integers out of 32-bit range, or a
        bad voxel size.
    FileNotFoundError
        If the output folder does not exist.
    """
    _check_host(data, "data")
    data = check_volume(data, "data")
    _write(path, np.ascontiguousarray(data, dtype=_image_dtype(data)), voxel_size)


def write_labels(path, labels, voxel_size=None):
    """Write a 3D label volume as an ImageJ-compatible uint32 TIFF, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file; its folder must exist. An existing file is replaced.
    labels : numpy.ndarray, shape (Z, Y, X)
        Non-negative integer labels, 0 for background.
    voxel_size : float or tuple of 3 float, optional
        ``(z, y, x)`` voxel size in micrometres.

    Raises
    ------
    TypeError
        For a CuPy array or a non-integer dtype.
    ValueError
        For labels that are not 3D, negative or above 2**32 - 1.
    FileNotFoundError
        If the output folder does not exist.

    Notes
    -----
    The ImageJ hyperstack writer of tifffile refuses uint32, so the ImageJ
    description (slices, spacing, unit) is written by hand; ImageJ opens
    the file as a 32-bit stack with its calibration.
    """
    _check_host(labels, "labels")
    _write(path, check_labels(labels, "labels"), voxel_size)


def _check_host(x, name):
    if is_cupy_array(x):
        raise TypeError(f"{name} is a CuPy array; pass cupy.asnumpy({name}) to write it")


def _image_dtype(data):
    kind = data.dtype.kind
    if kind == "f":
        return np.float32
    if kind == "b":
        return np.uint8
    if kind not in "iu":
        raise TypeError(f"data must be numeric, got dtype {data.dtype}")
    if data.dtype.itemsize <= 4:
        return data.dtype
    # ImageJ reads no 64-bit integers: narrow when the values allow it
    lo, hi = int(data.min()), int(data.max())
    for candidate in (np.uint32, np.int32):
        info = np.iinfo(candidate)
        if info.min <= lo and hi <= info.max:
            return candidate
    raise ValueError(f"data of dtype {data.dtype} hold values in [{lo}, {hi}], beyond 32-bit integers")


def _write(path, data, voxel_size):
    kwargs = _imagej_kwargs(data.shape, voxel_size)
    atomic_write(path, lambda fh: tifffile.imwrite(fh, data, **kwargs))


def check_output_folder(path):
    """Return the folder `path` will be written into; ``FileNotFoundError`` if it does not exist."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder does not exist: {folder!r}")
    return folder


def atomic_write(path, write):
    """Write a file whole or not at all: ``write(binary_file)`` fills a temporary file beside `path`, which
    then replaces `path`.

    A crash or an error inside `write` leaves `path` as it was and no
    temporary file behind. Raises ``FileNotFoundError`` when the folder of
    `path` does not exist.
    """
    path = os.fspath(path)
    _atomic_write(path, check_output_folder(path), write)


def _imagej_kwargs(shape, voxel_size):
    """tifffile.imwrite arguments for an ImageJ-readable ZYX stack."""
    lines = ["ImageJ=1.11a", f"images={shape[0]}", f"slices={shape[0]}"]
    kwargs = {"photometric": "minisblack", "metadata": None}
    if voxel_size is not None:
        z, y, x = as_triple(voxel_size, "voxel_size")
        lines += ["unit=micron", f"spacing={z!r}"]
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
    lines.append("loop=false")
    # Written by hand: tifffile's imagej=True refuses uint32 labels.
    kwargs["description"] = "\n".join(lines) + "\n"
    return kwargs


def _atomic_write(path, folder, write):
    """Run ``write(file_handle)`` on a temporary file, then move it onto `path`.

    The temporary file is created with ``O_EXCL`` and mode 0o666 so that the
    final file gets the usual umask permissions (mkstemp would give 0o600).
    """
    base = os.path.basename(path)
    for _ in range(16):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary file in {folder!r}")
    try:
        # reopened by name: tifffile wants a handle whose name is a path
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    logger.debug("wrote %s", path)


def _as_zyx(data, axes, path):
    """Drop singleton axes; refuse channels, time series and non-3D data."""
    for letter, what in (("S", "channels"), ("C", "channels"), ("T", "time points")):
        for ax, size in zip(axes, data.shape):
            if ax == letter and size > 1:
                raise ValueError(
                    f"{path!r} has {size} {what} (axes {axes!r}, shape {data.shape}); "
                    "cp3d needs a single-channel 3D stack: extract one first"
                )
    keep = [i for i, (ax, size) in enumerate(zip(axes, data.shape)) if size > 1 or ax in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    if data.ndim != 3:
        hint = " (a single 2D image?)" if data.ndim == 2 else ""
        raise ValueError(f"{path!r} is not a 3D stack: axes {axes!r}, shape {data.shape}{hint}")
    return data


def _voxel_size(tif):
    if tif.is_ome:
        size = _ome_voxel_size(tif.ome_metadata)
        if size is not None:
            return size
    if tif.is_imagej:
        return _imagej_voxel_size(tif.imagej_metadata or {}, tif.pages[0].tags)
    return None


def _ome_voxel_size(xml):
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    size = []
    for ax in "ZYX":
        value = pixels.get(f"PhysicalSize{ax}")
        # OME's default unit is the micrometre
        scale = _UNITS_UM.get(pixels.get(f"PhysicalSize{ax}Unit", "µm").strip().lower())
        if value is None or scale is None:
            return None
        size.append(float(value) * scale)
    return _positive(size)


def _imagej_voxel_size(meta, tags):
    scale = _UNITS_UM.get(str(meta.get("unit", "")).strip().lower())
    spacing = meta.get("spacing")
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if scale is None or spacing is None or xres is None or yres is None:
        return None
    try:
        x = xres.value[1] / xres.value[0]
        y = yres.value[1] / yres.value[0]
    except (TypeError, IndexError, ZeroDivisionError):
        return None
    return _positive([float(spacing) * scale, y * scale, x * scale])


def _positive(size):
    if all(np.isfinite(s) and s > 0 for s in size):
        return tuple(float(s) for s in size)
    return None


# ---------------------------------------------------------------------------
# Larger than memory: lazy TIFF and OME-Zarr (dask, zarr and ome-zarr imported lazily)
# ---------------------------------------------------------------------------


class LazyImage(NamedTuple):
    """A 3D stack read lazily, and its voxel size.

    Attributes
    ----------
    data : dask.array.Array, shape (Z, Y, X)
        The pixels, read chunk by chunk when computed.
    voxel_size : tuple of 3 float or None
        ``(z, y, x)`` voxel size in micrometres, or None when unknown.
    """

    data: object
    voxel_size: Optional[Tuple[float, float, float]]


def is_zarr(path):
    """True when `path` names a Zarr store (a folder holding ``zarr.json`` or ``.zgroup``/``.zarray``)."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in ("zarr.json", ".zgroup", ".zarray"))


def open_image(path, chunks=None):
    """Open a TIFF stack or an OME-Zarr image lazily, as a dask array.

    Parameters
    ----------
    path : str or os.PathLike
        A TIFF file (read through tifffile's Zarr store, so a file larger
        than memory works too) or an OME-Zarr image (its full-resolution
        level).
    chunks : int or tuple of 3 int, optional
        Chunk shape of the dask array; default the file's own chunks (TIFF:
        whole planes or tiles; Zarr: the stored chunks).

    Returns
    -------
    LazyImage

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    ValueError
        If it is neither a 3D TIFF stack nor an OME-Zarr image.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "stack.tif")
    >>> write_image(path, np.ones((4, 8, 8), np.uint16), voxel_size=(2.0, 0.5, 0.5))
    >>> image = open_image(path)
    >>> image.data.shape, int(image.data.sum().compute()), image.voxel_size
    ((4, 8, 8), 256, (2.0, 0.5, 0.5))
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if os.path.isdir(path):
        return read_ome_zarr(path, chunks=chunks)
    import dask.array as da

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, dtype = series.shape, series.axes, series.dtype
            voxel_size = _voxel_size(tif)
            with series.aszarr() as store:
                import zarr

                native = zarr.open_array(store, mode="r").chunks
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as err:
        raise ValueError(f"cannot read {path!r} as a TIFF stack: {err}") from err
    keep = _zyx_axes(axes, shape, path)
    source = _TiffSource(path, shape, dtype, keep)
    default = tuple(max(1, native[i]) for i in keep)
    return LazyImage(da.from_array(source, chunks=default if chunks is None else chunks, asarray=True,
                                   name=f"tiff-{os.path.basename(path)}-{secrets.token_hex(4)}"), voxel_size)


def _zyx_axes(axes, shape, path):
    """Indices of the three axes kept from a TIFF series; refuse channels, time series and non-3D data."""
    for letter, what in (("S", "channels"), ("C", "channels"), ("T", "time points")):
        for ax, size in zip(axes, shape):
            if ax == letter and size > 1:
                raise ValueError(f"{path!r} has {size} {what} (axes {axes!r}, shape {shape}); "
                                 "cp3d needs a single-channel 3D stack: extract one first")
    keep = [i for i, (ax, size) in enumerate(zip(axes, shape)) if size > 1 or ax in "YX"]
    if len(keep) != 3:
        raise ValueError(f"{path!r} is not a 3D stack: axes {axes!r}, shape {shape}")
    return keep


class _TiffSource:
    """Array-like reading regions of a TIFF series through tifffile's Zarr store.

    It holds the path only and opens the file per read, so it pickles to
    dask.distributed workers (an open store does not).
    """

    def __init__(self, path, shape, dtype, keep):
        self.path, self.full_shape, self.keep = path, tuple(shape), list(keep)
        self.shape = tuple(shape[i] for i in keep)
        self.dtype = np.dtype(dtype)
        self.ndim = 3

    def __getitem__(self, key):
        import zarr

        key = iter(key if isinstance(key, tuple) else (key,))
        full = tuple(next(key, slice(None)) if i in self.keep else 0 for i in range(len(self.full_shape)))
        with tifffile.TiffFile(self.path) as tif, tif.series[0].aszarr() as store:
            return zarr.open_array(store, mode="r")[full]


def read_ome_zarr(path, chunks=None):
    """Open the full-resolution level of an OME-Zarr image lazily, with its voxel size.

    Parameters
    ----------
    path : str or os.PathLike
        An OME-Zarr image group (NGFF 0.4 or 0.5), or one of its labels
        (``image.zarr/labels/cells``).
    chunks : int or tuple of 3 int, optional
        Chunk shape of the dask array; default the stored chunks.

    Returns
    -------
    LazyImage
        The voxel size comes from the ``scale`` transformation of the first
        dataset, converted to micrometres from the axes' units (assumed
        micrometres when absent).
    """
    import dask.array as da
    import zarr

    path = os.fspath(path)
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as err:  # zarr raises several kinds for a folder that is not a group
        raise ValueError(f"cannot read {path!r} as an OME-Zarr image: {err}") from err
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", attrs)
    if "multiscales" not in ome:
        raise ValueError(f"{path!r} is a Zarr group without OME-Zarr multiscales metadata")
    multiscale = ome["multiscales"][0]
    axes = [a["name"] if isinstance(a, dict) else a for a in multiscale.get("axes", ["z", "y", "x"])]
    dataset = multiscale["datasets"][0]
    array = da.from_zarr(os.path.join(path, dataset["path"]), chunks=chunks)
    spatial = [axes.index(a) for a in "zyx"] if all(a in axes for a in "zyx") else None
    if spatial is None or array.ndim != len(axes):
        raise ValueError(f"{path!r} has axes {axes}; cp3d needs z, y and x")
    others = [i for i in range(array.ndim) if i not in spatial]
    if any(array.shape[i] > 1 for i in others):
        raise ValueError(f"{path!r} has axes {axes} and shape {array.shape}: cp3d needs one channel and one time point")
    array = array[tuple(0 if i in others else slice(None) for i in range(array.ndim))]
    order = sorted(spatial)
    array = array.transpose([order.index(i) for i in spatial])
    voxel_size = None
    for t in dataset.get("coordinateTransformations", []) + multiscale.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            units = [next((a.get("unit", "micrometer") for a in multiscale["axes"]
                           if isinstance(a, dict) and a["name"] == n), "micrometer") for n in "zyx"]
            voxel_size = _positive([t["scale"][axes.index(n)] * _UNITS_UM.get(u, np.nan)
                                    for n, u in zip("zyx", units)])
            break
    return LazyImage(array, voxel_size)


def write_ome_zarr(path, data, voxel_size=None, chunks=None, labels=None, progress=False):
    """Write a 3D image (and optionally its labels) as an OME-Zarr image, complete or not at all.

    Parameters
    ----------
    path : str or os.PathLike
        The new image group (e.g. ``stack.ome.zarr``); it must not exist.
    data : numpy.ndarray or dask.array.Array, shape (Z, Y, X)
        The image; a dask array is written chunk by chunk.
    voxel_size : float or tuple of 3 float, optional
        ``(z, y, x)`` voxel size in micrometres, stored as the NGFF scale.
    chunks : int or tuple of 3 int, optional
        Stored chunk shape; default the dask chunks, or 64 x 256 x 256.
    labels : numpy.ndarray or dask.array.Array, optional
        A label image stored as ``labels/cells`` of the new image.
    progress : bool
        Show dask's progress bar while writing.

    Notes
    -----
    The store is written under a temporary name beside `path` and renamed
    when complete, so an interrupted run leaves no store at `path`.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "stack.ome.zarr")
    >>> write_ome_zarr(path, np.zeros((4, 8, 8), np.uint16), voxel_size=(2.0, 0.5, 0.5))
    >>> read_ome_zarr(path).voxel_size
    (2.0, 0.5, 0.5)
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path!r} exists; cp3d does not overwrite it")
    folder = check_output_folder(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        import zarr

        root = zarr.open_group(tmp, mode="w")
        _write_ngff(root, data, voxel_size, chunks, "image", progress, label=False)
        if labels is not None:
            group = root.require_group("labels")
            _write_ngff(group.create_group("cells"), labels, voxel_size, chunks, "cells", progress, label=True)
            group.attrs["ome"] = {"version": "0.5", "labels": ["cells"]}
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_ome_zarr_labels(image_path, labels, name="cells", chunks=None, progress=False):
    """Add a label image to an existing OME-Zarr image, under its ``labels/`` group.

    The labels are written under a temporary name in ``labels/`` and listed
    in the group's metadata only once complete, so an interrupted run leaves
    no label image that readers (napari, ome-zarr) would show.

    Parameters
    ----------
    image_path : str or os.PathLike
        The OME-Zarr image the labels belong to; its voxel size is reused.
    labels : numpy.ndarray or dask.array.Array, shape (Z, Y, X)
        Non-negative integer labels (stored as uint32).
    name : str
        Name of the label image; an existing one is not overwritten.
    chunks, progress
        As in :func:`write_ome_zarr`.
    """
    import zarr

    image_path = os.fspath(image_path)
    voxel_size = read_ome_zarr(image_path).voxel_size
    root = zarr.open_group(image_path, mode="r+")
    group = root.require_group("labels")
    listed = group.attrs.asdict().get("ome", {}).get("labels", [])
    if name in listed or name in group:
        raise FileExistsError(f"{image_path!r} already has labels {name!r}; cp3d does not overwrite them")
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    try:
        _write_ngff(group.create_group(tmp), labels, voxel_size, chunks, name, progress, label=True)
        os.replace(os.path.join(image_path, "labels", tmp), os.path.join(image_path, "labels", name))
    except BaseException:
        shutil.rmtree(os.path.join(image_path, "labels", tmp), ignore_errors=True)
        raise
    group.attrs["ome"] = {"version": "0.5", "labels": listed + [name]}


def _write_ngff(group, data, voxel_size, chunks, name, progress, label):
    import dask.array as da
    from ome_zarr import writer

    if not isinstance(data, da.Array):
        if label:
            data = check_labels(data, "labels")
        else:
            data = check_volume(np.asarray(data), "data")
        data = da.from_array(data, chunks=chunks or tuple(min(n, c) for n, c in zip(data.shape, (64, 256, 256))))
    elif label:
        data = data.astype(np.uint32)
    if data.ndim != 3:
        raise ValueError(f"data must be 3D (Z, Y, X), got shape {tuple(data.shape)}")
    if chunks is not None:
        data = data.rechunk(chunks)
    else:  # Zarr needs regular chunks
        data = data.rechunk(data.chunksize)
    kwargs = {"axes": "zyx", "storage_options": {"chunks": data.chunksize}, "compute": False, "name": name}
    if voxel_size is not None:
        kwargs["scale"] = dict(zip("zyx", as_triple(voxel_size, "voxel_size")))
        kwargs["axes_units"] = dict.fromkeys("zyx", "micrometer")
    stores = writer.write_multiscale([data], group, **kwargs)
    if label:
        ome = group.attrs.asdict()["ome"]
        group.attrs["ome"] = {**ome, "image-label": {"version": ome.get("version", "0.5")}}
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            da.compute(*stores)
    else:
        da.compute(*stores)


def write_tiff_chunked(path, data, voxel_size=None, labels=False):
    """Write a dask array as an ImageJ-compatible TIFF, one slab of chunks at a time, atomically.

    Memory holds one z-slab of chunks, not the stack. Labels (`labels` set)
    are written as uint32, images as :func:`write_image` writes them.

    Parameters
    ----------
    path : str or os.PathLike
        Output file; its folder must exist.
    data : dask.array.Array, shape (Z, Y, X)
        The volume.
    voxel_size : float or tuple of 3 float, optional
        ``(z, y, x)`` voxel size in micrometres.
    labels : bool
        Write uint32 labels.
    """
    if data.ndim != 3:
        raise ValueError(f"data must be 3D (Z, Y, X), got shape {tuple(data.shape)}")
    if labels:
        dtype = np.uint32
    elif data.dtype.kind in "fb" or data.dtype.itemsize <= 4:
        dtype = _image_dtype(np.zeros(0, data.dtype))
    else:
        raise TypeError(f"data of dtype {data.dtype}: pass 32-bit data for a chunked TIFF")
    data = data.astype(dtype)

    def pages():
        z = 0
        for depth in data.chunks[0]:
            for plane in np.asarray(data[z:z + depth].compute()):
                yield plane
            z += depth

    kwargs = _imagej_kwargs(data.shape, voxel_size)
    atomic_write(path, lambda fh: tifffile.imwrite(fh, pages(), shape=data.shape, dtype=dtype, **kwargs))
