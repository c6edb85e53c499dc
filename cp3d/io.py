"""Read and write 3D TIFF stacks with their voxel size.

Files are written ImageJ-compatible (ImageJ reads the spacing and pixel size
from them) and atomically: the data go to a temporary file in the target
folder, which replaces the target only once it is complete.
"""

import logging
import os
import secrets
import xml.etree.ElementTree as ET
from typing import NamedTuple, Optional, Tuple

import numpy as np
import tifffile

from ._backend import as_triple, check_labels, check_volume, is_cupy_array

__all__ = ["TiffImage", "read_image", "write_image", "write_labels"]

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
