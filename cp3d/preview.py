"""A picture of a segmentation: label outlines over the image, XY and XZ mid-sections.

`preview` returns the picture as an RGB array; `save_preview` writes it as
a PNG (with Pillow), atomically.
"""

import math

import numpy as np

from ._backend import as_triple, check_labels, check_volume, is_cupy_array

__all__ = ["preview", "save_preview"]

# Sections are enlarged by a whole factor (nearest neighbour, so outlines stay
# one pixel wide and sharp) until the taller one is about this many pixels.
_TARGET_HEIGHT = 512
_MAX_ZOOM = 8
_GAP = 8  # black pixels between the two sections
_GOLDEN = 0.618033988749895


def preview(image, labels, voxel_size=None):
    """Draw the label outlines over the image in the XY and XZ mid-sections.

    Parameters
    ----------
    image : numpy.ndarray, shape (Z, Y, X)
        The stack, any numeric dtype; shown in grey between its 1st and
        99.8th percentiles (over both sections).
    labels : numpy.ndarray, shape (Z, Y, X)
        Instance labels, 0 for background.
    voxel_size : float or (float, float, float), optional
        Voxel size (z, y, x); the XZ section is stretched along z by
        ``z / x`` so that cells keep their shape. Isotropic by default.

    Returns
    -------
    numpy.ndarray, shape (H, W, 3), uint8
        The XY section (at ``z = Z // 2``) on the left and the XZ section (at
        ``y = Y // 2``, z downwards) on the right, both enlarged by the same
        whole factor; each cell's outline in its own colour.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.preview import preview
    >>> labels = np.zeros((8, 16, 16), np.uint32)
    >>> labels[2:6, 4:12, 4:12] = 1
    >>> rgb = preview(labels.astype(np.float32), labels)
    >>> rgb.dtype, rgb.shape[2]
    (dtype('uint8'), 3)
    """
    for name, x in (("image", image), ("labels", labels)):
        if is_cupy_array(x):
            raise TypeError(f"{name} is a CuPy array; pass cupy.asnumpy({name})")
    image = check_volume(image, "image")
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image must be numeric, got dtype {image.dtype}")
    labels = check_labels(labels)
    if image.shape != labels.shape:
        raise ValueError(f"image shape {image.shape} does not match labels shape {labels.shape}")
    vz, _, vx = as_triple(1.0 if voxel_size is None else voxel_size, "voxel_size")
    nz, ny, _ = labels.shape

    # z rows of the XZ section after stretching by the voxel aspect ratio
    rows = np.minimum((np.arange(max(1, round(nz * vz / vx))) * vx / vz).astype(int), nz - 1)
    sections = [(image[nz // 2], labels[nz // 2]), (image[rows, ny // 2], labels[rows, ny // 2])]
    grey = _to_grey([s[0] for s in sections])
    height = max(s[1].shape[0] for s in sections)
    zoom = int(min(_MAX_ZOOM, max(1, math.ceil(_TARGET_HEIGHT / height))))
    panels = [_overlay(g, lab, zoom) for g, (_, lab) in zip(grey, sections)]
    out = np.zeros((height * zoom, sum(p.shape[1] for p in panels) + _GAP, 3), np.uint8)
    out[:panels[0].shape[0], :panels[0].shape[1]] = panels[0]
    out[:panels[1].shape[0], panels[0].shape[1] + _GAP:] = panels[1]
    return out


def save_preview(path, image, labels, voxel_size=None):
    """Write :func:`preview` as a PNG file, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file; its folder must exist. An existing file is replaced
        once the new one is complete.
    image, labels, voxel_size
        As for :func:`preview`.
    """
    from PIL import Image

    from .io import atomic_write, check_output_folder

    check_output_folder(path)
    rgb = preview(image, labels, voxel_size)
    atomic_write(path, lambda fh: Image.fromarray(rgb).save(fh, format="PNG"))


def _to_grey(sections):
    """Sections scaled to uint8 between the 1st and 99.8th percentile of all their pixels."""
    values = np.concatenate([s.ravel() for s in sections]).astype(np.float64)
    lo, hi = np.percentile(values, (1, 99.8))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return [np.clip((s.astype(np.float64) - lo) * scale, 0, 255).astype(np.uint8) for s in sections]


def _overlay(grey, labels, zoom):
    """Enlarge a section by `zoom` and paint the one-pixel outlines of its labels in colour."""
    grey = np.kron(grey, np.ones((zoom, zoom), np.uint8))
    labels = np.kron(labels, np.ones((zoom, zoom), np.uint32))
    # a labelled pixel is on an outline when a 4-neighbour (or the section border) differs
    padded = np.pad(labels, 1, mode="constant")
    centre = padded[1:-1, 1:-1]
    edge = (centre != 0) & ((centre != padded[:-2, 1:-1]) | (centre != padded[2:, 1:-1])
                            | (centre != padded[1:-1, :-2]) | (centre != padded[1:-1, 2:]))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[edge] = _colours(labels[edge])
    return rgb


def _colours(ids):
    """A bright colour per id: hues spread by the golden ratio, so neighbours differ."""
    hue = (ids.astype(np.float64) * _GOLDEN) % 1.0
    # HSV to RGB at full saturation and value
    k = (np.array([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1)
    return (rgb * 255).astype(np.uint8)
