"""Read and write 3D TIFF stacks with their voxel size.

Files are written ImageJ-compatible (ImageJ reads the spacing and pixel size
from them) and atomically: the data go to a temporary file in the target
folder, which replaces the target only once it is complete.
"""

import contextlib
import contextvars
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
import warnings
import xml.etree.ElementTree as ET
from typing import NamedTuple, Optional, Tuple

import numpy as np
import tifffile

from ._backend import as_triple, check_labels, check_memory, check_volume, is_cupy_array

__all__ = ["TiffImage", "read_image", "write_image", "write_labels", "LazyImage", "open_image", "read_ome_zarr",
           "write_ome_zarr", "write_ome_zarr_labels", "write_tiff_chunked", "read_properties", "write_zarr_properties",
           "read_labels"]

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
        If the file cannot be read as a TIFF, is truncated or corrupt, holds
        fewer or other planes than its ImageJ or tifffile metadata declare,
        has several channels or time points, is not a 3D stack once singleton
        axes are dropped (a file that declares a z axis of length 1 is a
        one-slice stack), or its pixels would not fit in memory; checked
        before the pixels are decoded, and the message names the file.

    Warns
    -----
    UserWarning
        When the ImageJ description cannot be parsed: the pages are read as
        a plain stack and the voxel size is None.

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
        try:
            data, axes, voxel_size, has_z = _read_tiff(path)
        except _UnparsableImageJ as err:
            warnings.warn(f"{path!r}: the ImageJ description cannot be parsed ({err}); read as a plain stack of "
                          "pages, without a voxel size", stacklevel=2)
            data, axes, _, has_z = _read_tiff(path, is_imagej=False)
            voxel_size = None
    except (_FileProblem, MemoryError):
        raise
    except Exception as err:  # tifffile and the codecs raise many types for a damaged file
        raise ValueError(f"cannot read {path!r} as a TIFF stack (corrupt or truncated?): "
                         f"{type(err).__name__}: {err}") from err
    return TiffImage(_as_zyx(data, axes, path, has_z), voxel_size)


class _FileProblem(ValueError):
    """A file we can describe ourselves: re-raised as it is."""


class _UnparsableImageJ(Exception):
    """ImageJ metadata whose counts are not positive integers."""


class _TiffComplaints(logging.Handler):
    """Collects what tifffile logs while it reads: a broken page chain is only logged there."""

    SIGNS = ("invalid page offset", "corrupt", "failed to reshape", "truncated")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.found = []

    def emit(self, record):
        message = record.getMessage()
        if any(sign in message for sign in self.SIGNS):
            self.found.append(message)


def _read_tiff(path, **flags):
    """Decode the first series of `path`: (data, axes, voxel size, whether a z axis is declared).

    Everything the file declares is checked against what it holds before the
    pixels are decoded, so a damaged or inconsistent file is named as such
    instead of returning part of its data.
    """
    complaints = _TiffComplaints()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(complaints)
    try:
        with tifffile.TiffFile(path, **flags) as tif:
            meta = tif.imagej_metadata if tif.is_imagej else None
            if meta is not None:
                _check_imagej_counts(meta)
            series = tif.series[0]
            _check_complete(tif, series, meta, path, complaints)
            check_memory(series.nbytes, f"reading {path!r} (shape {tuple(series.shape)}, {series.dtype})")
            data = series.asarray()
            voxel_size = _voxel_size(tif, path)
            # tifffile drops an ImageJ z axis of length 1; our own files say slices=1
            has_z = any(ax in "ZQI" for ax in series.axes) or (meta is not None and "slices" in meta)
            return data, series.axes, voxel_size, has_z
    finally:
        tiff_logger.removeHandler(complaints)


def _check_imagej_counts(meta):
    for key in ("images", "slices", "frames", "channels"):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _UnparsableImageJ(f"{key}={value!r}")


def _check_complete(tif, series, meta, path, complaints):
    """Refuse a file that holds less than it declares, or whose declarations disagree."""
    size = tif.filehandle.size
    planes = int(np.prod(series.shape[: -2 if series.axes[-1:] != "S" else -3], dtype=np.int64))
    if complaints.found:
        raise _FileProblem(f"{path!r} is truncated or corrupt: {complaints.found[0]}")
    if meta is not None:
        images, pages = meta.get("images", 1), len(tif.pages)
        if images != planes or pages not in (1, images):
            raise _FileProblem(
                f"{path!r} has inconsistent ImageJ metadata ({_imagej_counts(meta)}): {planes} planes would be "
                f"read from its {pages} pages; truncated, or the description was edited? Nothing was read "
                "rather than part of the stack"
            )
    elif tif.is_shaped and tif.shaped_metadata:
        declared = tif.shaped_metadata[0].get("shape")
        if declared is not None and int(np.prod(declared, dtype=np.int64)) != int(np.prod(series.shape)):
            raise _FileProblem(f"{path!r} declares shape {tuple(declared)} but holds {tuple(series.shape)}: "
                               "truncated or corrupt")
    if series.dataoffset is not None and series.dataoffset + series.nbytes > size:
        raise _FileProblem(f"{path!r} is truncated: its pixels need {series.dataoffset + series.nbytes} bytes, "
                           f"the file has {size}")
    for page in tif.pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            raise _FileProblem(f"{path!r} is truncated: a page's data end at byte {max(ends)}, the file has {size}")


def _imagej_counts(meta):
    return ", ".join(f"{k}={meta[k]}" for k in ("images", "channels", "slices", "frames") if k in meta)


def write_image(path, data, voxel_size=None, *, properties=None):
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
    properties : dict, optional
        JSON-serialisable values stored with the image (one ``cp3d=`` line
        of the ImageJ description); :func:`read_properties` reads them back.

    Raises
    ------
    TypeError
        For a CuPy array (move it to the host first), an unsupported dtype or
        properties JSON cannot hold.
    ValueError
        For data that are not 3D, 64-bit integers out of 32-bit range, or a
        bad voxel size.
    FileNotFoundError
        If the output folder does not exist.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from cp3d.io import read_properties, write_image
    >>> path = tempfile.mkdtemp() + "/maps.tif"
    >>> write_image(path, np.zeros((2, 8, 8), np.float32), properties={"diameter": [5.0, 10.0, 10.0]})
    >>> read_properties(path)
    {'diameter': [5.0, 10.0, 10.0]}
    """
    _check_host(data, "data")
    data = check_volume(data, "data")
    _write(path, np.ascontiguousarray(data, dtype=_image_dtype(data)), voxel_size, properties)


# The ImageJ description key (TIFF) and attribute (Zarr) that hold cp3d's properties of a file.
PROPERTIES_KEY = "cp3d"


def _properties_json(properties):
    if not isinstance(properties, dict):
        raise TypeError(f"properties must be a dict, got {type(properties).__name__}")
    try:
        return json.dumps(properties, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"properties must be JSON-serialisable: {e}") from e


def read_properties(path):
    """The properties cp3d stored with a TIFF or Zarr file, or an empty dict.

    Parameters
    ----------
    path : str or os.PathLike
        A TIFF written by :func:`write_image` or :func:`write_tiff_chunked`
        with `properties`, or a Zarr store given them by
        :func:`write_zarr_properties`.

    Returns
    -------
    dict
        The stored properties; ``{}`` for a file without them.

    Raises
    ------
    ValueError
        If the stored properties are not valid JSON (a damaged description).
    """
    if is_zarr(path):
        import zarr

        return dict(zarr.open_group(os.fspath(path), mode="r").attrs.get(PROPERTIES_KEY, {}))
    with tifffile.TiffFile(path) as tif:
        text = (tif.imagej_metadata or {}).get(PROPERTIES_KEY) if tif.is_imagej else None
    if text is None:
        return {}
    try:
        if not isinstance(text, str):  # tifffile turns a bare number into one
            raise ValueError("not a JSON object")
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path!r} holds unreadable cp3d properties ({e}): {str(text)[:80]!r}") from e


def write_zarr_properties(path, properties):
    """Store `properties` (JSON-serialisable) in the attributes of the Zarr group at `path`.

    :func:`read_properties` reads them back.
    """
    import zarr

    _properties_json(properties)
    zarr.open_group(os.fspath(path), mode="r+").attrs[PROPERTIES_KEY] = properties


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


def _write(path, data, voxel_size, properties=None):
    kwargs = _imagej_kwargs(data.shape, voxel_size, properties)
    atomic_write(path, lambda fh: tifffile.imwrite(fh, data, **kwargs))


def check_output_folder(path):
    """Return the folder `path` will be written into; ``FileNotFoundError`` if it does not exist.

    A symlink at `path` is followed: the folder is its target's.
    """
    folder = os.path.dirname(os.path.realpath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder does not exist: {folder!r}")
    return folder


def check_outputs(outputs, *, inputs=(), overwrite=False):
    """Check, before any work starts, that every output of a run can be written.

    Parameters
    ----------
    outputs : sequence of str or os.PathLike or None
        The files the run will write; ``None`` entries are skipped.
    inputs : sequence of str or os.PathLike
        The files the run reads. No output may be one of them (symlinks and
        hard links included), whatever `overwrite` says.
    overwrite : bool
        Allow replacing outputs that exist already.

    Raises
    ------
    FileNotFoundError
        If an output's folder does not exist.
    PermissionError
        If an output's folder cannot be written into.
    IsADirectoryError
        If an output is a folder.
    FileExistsError
        If an output exists and `overwrite` is False.
    ValueError
        If an output is an input, or two outputs are the same file.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> folder = tempfile.mkdtemp()
    >>> image = os.path.join(folder, "image.tif")
    >>> write_image(image, np.zeros((2, 3, 4), np.uint16))
    >>> check_outputs([os.path.join(folder, "labels.tif")], inputs=[image])
    >>> check_outputs([image], inputs=[image], overwrite=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: output '...image.tif' is the input '...image.tif'; choose another output file
    """
    chosen = {}
    for path in outputs:
        if path is None:
            continue
        path = os.fspath(path)
        target = os.path.realpath(path)
        if os.path.isdir(target):
            raise IsADirectoryError(f"output {path!r} is a folder; give a file name")
        folder = check_output_folder(path)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write into {folder!r} (output {path!r})")
        for source in inputs:
            if _same_file(target, os.fspath(source)):
                raise ValueError(f"output {path!r} is the input {os.fspath(source)!r}; choose another output file")
        if target in chosen:
            raise ValueError(f"outputs {chosen[target]!r} and {path!r} are the same file")
        chosen[target] = path
        if os.path.exists(target) and not overwrite:
            raise FileExistsError(f"output {path!r} exists; pass --overwrite (overwrite=True) to replace it")


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


_STAGED = contextvars.ContextVar("cp3d_io_staged", default=None)


@contextlib.contextmanager
def written_together(*, overwrite=True):
    """Make the files written inside the block land together, or not at all.

    Each :func:`atomic_write` in the block (so each :func:`write_image` and
    :func:`write_labels`) fills its temporary file as usual, but the
    temporary files replace their destinations only when the block ends
    without an error. An error removes them all and leaves every destination
    as it was. Nested blocks join the outermost one. With `overwrite` False,
    none of them replaces a file (see :func:`atomic_write`).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> folder = tempfile.mkdtemp()
    >>> with written_together():
    ...     write_labels(os.path.join(folder, "labels.tif"), np.ones((2, 3, 4), np.uint8))
    ...     write_image(os.path.join(folder, "image.tif"), np.zeros((2, 3, 4), np.float32))
    >>> sorted(os.listdir(folder))
    ['image.tif', 'labels.tif']
    """
    if _STAGED.get() is not None:
        yield
        return
    staged = []
    token = _STAGED.set((staged, bool(overwrite)))
    try:
        yield
    except BaseException:
        _remove_all(tmp for tmp, _, _ in staged)
        raise
    finally:
        _STAGED.reset(token)
    _commit(staged)


def atomic_write(path, write, *, overwrite=True):
    """Write a file whole or not at all: ``write(binary_file)`` fills a temporary file beside `path`, which
    then replaces `path`.

    An error inside `write` leaves `path` as it was and no temporary file
    behind. A symlink at `path` stays a symlink: its target is written. An
    existing file keeps its permission bits. Temporary files are named
    ``.NAME.cp3d-PID-HEX.tmp``; one left by a killed process is removed by
    the next write into the same folder. Inside :func:`written_together`,
    the replacement waits for the end of the block.

    With `overwrite` False an existing `path` is an error, and so is a file
    that appears at `path` while `write` runs: the temporary file is then
    hard-linked to `path`, which fails rather than replace anything (on a
    file system without hard links, a warning says that the final rename
    is not protected).

    Raises
    ------
    FileNotFoundError
        If the folder of `path` does not exist.
    IsADirectoryError
        If `path` is a folder.
    FileExistsError
        If `overwrite` is False and `path` exists, or appears before the end.
    """
    path = os.fspath(path)
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"output {path!r} is a folder; give a file name")
    folder = check_output_folder(target)
    block = _STAGED.get()
    overwrite = bool(overwrite) and (block is None or block[1])
    if not overwrite and os.path.lexists(target):
        raise FileExistsError(f"output {path!r} exists; pass overwrite=True to replace it")
    _remove_stale_temporaries(folder)
    tmp = _new_temporary(folder, os.path.basename(target), "tmp")
    try:
        # reopened by name: tifffile wants a handle whose name is a path
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(target):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
    except BaseException:
        _remove_all([tmp])
        raise
    if block is None:
        _commit([(tmp, target, overwrite)])
    else:
        block[0].append((tmp, target, overwrite))


def _imagej_kwargs(shape, voxel_size, properties=None):
    """tifffile.imwrite arguments for an ImageJ-readable ZYX stack."""
    lines = ["ImageJ=1.11a", f"images={shape[0]}", f"slices={shape[0]}"]
    kwargs = {"photometric": "minisblack", "metadata": None}
    if voxel_size is not None:
        z, y, x = as_triple(voxel_size, "voxel_size")
        lines += ["unit=micron", f"spacing={z!r}"]
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
    if properties is not None:
        # one line of compact JSON: ImageJ skips keys it does not know, tifffile returns the text
        lines.append(f"{PROPERTIES_KEY}={_properties_json(properties)}")
    lines.append("loop=false")
    # Written by hand: tifffile's imagej=True refuses uint32 labels.
    kwargs["description"] = "\n".join(lines) + "\n"
    return kwargs


# .NAME.cp3d-PID-HEX.tmp (being written) or .old (a destination's old version, while several land together)
_TEMPORARY = re.compile(r"^\..+\.cp3d-(\d+)-[0-9a-f]{12}\.(tmp|old)$")
_STARTED = time.time()


def _new_temporary(folder, base, suffix):
    """Create an empty file of our temporary naming in `folder` and return its path.

    Created with ``O_EXCL`` and mode 0o666 so that a new destination gets
    the usual umask permissions (mkstemp would give 0o600).
    """
    for _ in range(16):
        tmp = os.path.join(folder, f".{base}.cp3d-{os.getpid()}-{secrets.token_hex(6)}.{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder!r}")


def _commit(staged):
    """Move each (temporary, destination, overwrite) into place; on a failure, undo the moves already made.

    With several files, each existing destination is first hard-linked to a
    ``.old`` name so that it can be put back.
    """
    done = []
    try:
        for tmp, target, overwrite in staged:
            existed = os.path.exists(target)
            # only a replaced file needs putting back; no-overwrite replaces nothing
            backup = _link_aside(target) if overwrite and existed and len(staged) > 1 else None
            try:
                if overwrite:
                    os.replace(tmp, target)
                else:
                    _place_new(tmp, target)
            except BaseException:
                _remove_all([backup] if backup else [])
                raise
            done.append((target, existed, backup))
            logger.debug("wrote %s", target)
    except BaseException:
        for target, existed, backup in reversed(done):
            if backup is not None:
                os.replace(backup, target)
            elif not existed:
                _remove_all([target])
        _remove_all(tmp for tmp, _, _ in staged)
        raise
    finally:
        _remove_all(backup for _, _, backup in done if backup is not None)


def _place_new(tmp, target):
    """Move the file `tmp` to `target`, which must not exist: never replaces a file that appeared meanwhile.

    A hard link is created with ``O_EXCL`` semantics (it fails if `target`
    exists), unlike a rename, which would silently replace it.
    """
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(f"{target!r} appeared while cp3d was writing it; it was left as it is "
                              "and cp3d's output was not written") from None
    except OSError as err:  # no hard links on this file system (FAT, some network shares)
        if os.path.lexists(target):
            raise FileExistsError(f"{target!r} appeared while cp3d was writing it; it was left as it is") from None
        warnings.warn(f"{os.path.dirname(target)!r} has no hard links ({err.strerror}): {target!r} is placed by a "
                      "rename, which would replace a file created there at the same moment", stacklevel=4)
        os.replace(tmp, target)
        return
    os.remove(tmp)


def place_new_folder(tmp, target):
    """Rename the folder `tmp` (a finished Zarr store) to `target`, which must not exist.

    `target` is first created empty with ``mkdir`` (which fails if it
    exists); the rename then replaces only that empty folder, and fails if
    anything was put into it meanwhile. ``FileExistsError`` either way, with
    `tmp` left for the caller to remove.
    """
    try:
        os.mkdir(target)
    except FileExistsError:
        raise FileExistsError(f"{target!r} exists; cp3d does not overwrite it") from None
    try:
        os.rename(tmp, target)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            os.rmdir(target)
            raise
        raise FileExistsError(f"{target!r} was filled while cp3d was writing it; it was left as it is") from None


def _link_aside(path):
    """Hard-link `path` to a ``.old`` name beside it; None where the file system has no hard links."""
    folder, base = os.path.split(path)
    backup = _new_temporary(folder, base, "old")
    try:
        os.remove(backup)
        os.link(path, backup)
        return backup
    except OSError:
        _remove_all([backup])
        return None


def _remove_all(paths):
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _remove_stale_temporaries(folder):
    """Remove our temporary files that a killed process left in `folder`.

    Stale means: of our naming, older than this process, and written by a
    process that no longer runs. A concurrent writer's files are kept.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _process_runs(int(match.group(1))):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < _STARTED:
                os.remove(entry.path)
                logger.info("removed %s, left by an interrupted write", entry.path)
        except OSError:
            pass


def _process_runs(pid):
    if os.name == "nt":  # os.kill would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # someone else's process, or no way to tell: keep its files
    return True


def _as_zyx(data, axes, path, has_z):
    """Drop singleton axes; refuse channels, time series and non-3D data.

    A file that declares a z axis of length 1 is a one-slice stack (1, Y, X),
    as cp3d writes one; a 2D image without one is refused.
    """
    for letter, what in (("S", "channels"), ("C", "channels"), ("T", "time points")):
        for ax, size in zip(axes, data.shape):
            if ax == letter and size > 1:
                raise ValueError(
                    f"{path!r} has {size} {what} (axes {axes!r}, shape {data.shape}); "
                    "cp3d needs a single-channel 3D stack: extract one first"
                )
    keep = [i for i, (ax, size) in enumerate(zip(axes, data.shape)) if size > 1 or ax in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    if data.ndim == 2 and has_z:
        data = data[None]
    if data.ndim != 3:
        hint = " (a single 2D image?)" if data.ndim == 2 else ""
        raise ValueError(f"{path!r} is not a 3D stack: axes {axes!r}, shape {data.shape}{hint}")
    return data


def _voxel_size(tif, path=None):
    """Voxel size from OME or ImageJ metadata, or None; `path` names the file in warnings."""
    path = tif.filehandle.path if path is None else path
    if tif.is_ome:
        size = _ome_voxel_size(tif.ome_metadata)
        if size is not None:
            return size
    if tif.is_imagej:
        return _imagej_voxel_size(tif.imagej_metadata or {}, tif.pages[0].tags, path)
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


def _imagej_voxel_size(meta, tags, path):
    scale = _UNITS_UM.get(str(meta.get("unit", "")).strip().lower())
    spacing = meta.get("spacing")
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if scale is None or spacing is None or xres is None or yres is None:
        return None
    try:
        x = xres.value[1] / xres.value[0]
        y = yres.value[1] / yres.value[0]
        z = float(spacing)
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        warnings.warn(f"{path!r}: the ImageJ calibration cannot be parsed (spacing={spacing!r}); "
                      "voxel size unknown", stacklevel=4)
        return None
    return _positive([z * scale, y * scale, x * scale])


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


def read_labels(path):
    """Read a 3D label volume into memory from a TIFF or an OME-Zarr store.

    Parameters
    ----------
    path : str or os.PathLike
        A label TIFF, an OME-Zarr image of labels (``cp3d segment -o
        NEW.zarr``) or an OME-Zarr label image (``image.zarr/labels/cells``).

    Returns
    -------
    TiffImage
        The labels (integers) and the voxel size.

    Raises
    ------
    ValueError
        For an OME-Zarr image that holds label images (the path names the
        image, not its labels: the message lists them) or data that are not
        labels.
    """
    if not is_zarr(path):
        stack = read_image(path)
        return TiffImage(check_labels(stack.data, f"{os.fspath(path)!r}"), stack.voxel_size)
    import zarr

    group = zarr.open_group(os.fspath(path), mode="r")
    attrs = group.attrs.asdict()
    if "image-label" not in attrs.get("ome", attrs) and "labels" in group:
        labels_attrs = group["labels"].attrs.asdict()
        names = labels_attrs.get("ome", labels_attrs).get("labels", [])
        if names:
            raise ValueError(f"{os.fspath(path)!r} is an OME-Zarr image with label images {names}; pass one of "
                             f"them: {os.path.join(os.fspath(path), 'labels', names[0])!r}")
    stack = read_ome_zarr(path)
    check_memory(stack.data.nbytes, f"reading the labels of {os.fspath(path)!r}")
    return TiffImage(check_labels(stack.data.compute(), f"{os.fspath(path)!r}"), stack.voxel_size)


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
        place_new_folder(tmp, path)
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
        place_new_folder(os.path.join(image_path, "labels", tmp), os.path.join(image_path, "labels", name))
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


def write_tiff_chunked(path, data, voxel_size=None, labels=False, properties=None):
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
    properties : dict, optional
        JSON-serialisable values stored with the image, as :func:`write_image`
        stores them.
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

    kwargs = _imagej_kwargs(data.shape, voxel_size, properties)
    atomic_write(path, lambda fh: tifffile.imwrite(fh, pages(), shape=data.shape, dtype=dtype, **kwargs))
