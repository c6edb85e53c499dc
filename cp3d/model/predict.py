"""Network inference on whole stacks: normalise, rescale, blended tiles."""

import logging
import math
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from .._backend import as_triple, check_volume, is_cupy_array
from .unet import UNet3D, load_model

__all__ = ["Prediction", "predict", "normalize_percentile", "blend_window"]

log = logging.getLogger(__name__)


class Prediction(NamedTuple):
    """Network output on a stack.

    Attributes
    ----------
    flows : ndarray, float32, shape (3, Z, Y, X)
        Gradient maps in channel order (z, y, x), values in (-1, 1).
    foreground : ndarray, float32, shape (Z, Y, X)
        Foreground probability in [0, 1].
    """

    flows: np.ndarray
    foreground: np.ndarray


def _validate_image(image):
    if is_cupy_array(image):
        raise TypeError("predict takes a NumPy array; pass cupy.asnumpy(image)")
    image = np.asarray(image)
    if image.ndim == 4 and image.shape[-1] in (3, 4):
        raise ValueError(
            f"image has shape {image.shape}: an RGB(A) stack? predict needs one channel (Z, Y, X); "
            "pick the membrane channel, e.g. image[..., 0]"
        )
    if image.ndim == 4:
        raise ValueError(
            f"image has shape {image.shape}: a multi-channel or time series? predict needs a single "
            "3D stack (Z, Y, X)"
        )
    check_volume(image, "image")
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image must be real-valued, got dtype {image.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or inf values")
    return image


def normalize_percentile(image, lower=1.0, upper=99.8):
    """Map the `lower` and `upper` percentiles of `image` to 0 and 1 (float32).

    A constant image (e.g. all zeros) maps to zeros rather than dividing by
    zero. Very large stacks estimate the percentiles from a strided sample.
    """
    image = np.asarray(image, dtype=np.float32)
    sample = image.ravel()
    if sample.size > 8_000_000:
        sample = sample[:: sample.size // 4_000_000]
    lo, hi = np.percentile(sample, [lower, upper])
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(image)
    out = image - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def blend_window(size, overlap):
    """1D blending weight for a tile of `size` voxels overlapping its neighbours by `overlap`.

    The outer ``margin = overlap // 4`` voxels at each end get weight 0 (they
    lack context: zero padding inside the network shows there), then a
    ``sin**2`` ramp of length ``overlap - 2 * margin`` rises to 1. Neighbouring
    tiles placed ``size - overlap`` apart have their ramps on the same voxels,
    where ``sin**2 + cos**2 = 1``: the weights form a partition of unity and
    the blend has no seams.
    """
    margin = overlap // 4
    ramp = overlap - 2 * margin
    w = np.ones(size, np.float64)
    w[:margin] = 0
    if margin:
        w[size - margin :] = 0
    if ramp > 0:
        r = np.sin(0.5 * np.pi * (np.arange(ramp) + 0.5) / ramp) ** 2
        w[margin : margin + ramp] = np.minimum(w[margin : margin + ramp], r)
        w[size - margin - ramp : size - margin] = np.minimum(w[size - margin - ramp : size - margin], r[::-1])
    return w.astype(np.float32)


def _tile_plan(n, tile, overlap, multiple):
    """Tile size, overlap, padding before/after and tile starts along one axis of length `n`.

    The padding before the stack is a multiple of `multiple` so the network's
    pooling grid stays aligned with the stack whatever the tiling.
    """
    def plan(tile, overlap):
        step = max(multiple, ((tile - overlap) // multiple) * multiple) if tile > multiple else tile
        overlap = tile - step
        margin = overlap // 4
        before = -(-margin // multiple) * multiple
        n_tiles = max(1, math.ceil((before + n + margin - tile) / step) + 1)
        return tile, overlap, before, (n_tiles - 1) * step + tile - n - before, [i * step for i in range(n_tiles)]

    tile, overlap_, before, after, starts = plan(tile, min(overlap, tile - multiple))
    if len(starts) == 1:  # one tile is enough: shrink it to the stack, no overlap needed
        small = -(-n // multiple) * multiple
        if small < tile:
            return plan(small, 0)
    return tile, overlap_, before, after, starts


def _resolve_device(device, model):
    if isinstance(model, torch.nn.Module) and device == "auto":
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _zoom_to_shape(arr, shape, order):
    """Zoom a 3D array to exactly `shape`."""
    factors = [t / s for t, s in zip(shape, arr.shape)]
    out = ndimage.zoom(arr, factors, order=order, mode="nearest", grid_mode=False)
    if out.shape != tuple(shape):  # rounding in zoom: crop or edge-pad to the exact shape
        out = out[tuple(slice(0, t) for t in shape)]
        out = np.pad(out, [(0, t - s) for t, s in zip(shape, out.shape)], mode="edge")
    return out


def predict(
    image,
    model=None,
    *,
    voxel_size=None,
    tile_size=None,
    overlap=0.33,
    batch_size=2,
    device="auto",
    pad_mode="reflect",
    progress=False,
):
    """Predict gradient maps and foreground probability for a 3D stack.

    Parameters
    ----------
    image : array_like, shape (Z, Y, X)
        One-channel stack, any size and real dtype. It is normalised so its
        1st and 99.8th percentiles map to 0 and 1.
    model : UNet3D or str or path-like, optional
        A network, a bundled model name or a model directory; default the
        bundled ``"tanh"`` model.
    voxel_size : float or tuple of 3 floats, optional
        Voxel size (z, y, x) of `image`. When given and different from the
        model's training voxel size (``model.config.voxel_size``), the image
        is resampled (linear) to the training voxel size and the maps are
        resampled back to the original shape exactly. Flow values are not
        rescaled.
    tile_size : int or tuple of 3 ints, optional
        Tile shape (z, y, x); default ``model.config.tile_size``. Shrunk for
        small stacks; rounded to multiples of ``2**depth``.
    overlap : float or int or tuple, optional
        Overlap of neighbouring tiles, as a fraction of the tile (float < 1)
        or in voxels (int), per axis or for all. The outer quarter of the
        overlap of each tile is ignored and the rest is blended with
        :func:`blend_window`.
    batch_size : int, optional
        Tiles per network call.
    device : {"auto"} or str or torch.device, optional
        ``"auto"``: the device of a given model, else CUDA when available,
        else the CPU. A given model is moved to an explicit `device`.
    pad_mode : {"reflect", "constant"}, optional
        How the stack is extended at its borders so tiles fit.
    progress : bool, optional
        Show a progress bar over the tile batches.

    Returns
    -------
    Prediction
        ``flows`` float32 (3, Z, Y, X) and ``foreground`` float32 (Z, Y, X),
        NumPy arrays on the host, in the shape of `image`.

    Raises
    ------
    ValueError
        For a 2D image, an RGB or multi-channel stack, NaN/inf values, or bad
        tiling parameters.

    Notes
    -----
    Runs under ``torch.inference_mode``; on CUDA under float16 autocast.
    With ``norm="batch"`` networks (the default) tiling is invisible: a voxel
    away from the stack border gets the same value as when the whole stack is
    predicted at once, up to float rounding.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.model import UNet3D, predict
    >>> net = UNet3D(base_features=4, depth=2).eval()
    >>> p = predict(np.random.rand(20, 30, 30), net, tile_size=16)
    >>> p.flows.shape, p.foreground.shape
    ((3, 20, 30, 30), (20, 30, 30))
    """
    image = _validate_image(image)
    if model is None:
        model = "tanh"
    dev = _resolve_device(device, model)
    if not isinstance(model, UNet3D):
        model = load_model(model, device=dev)
    else:
        model = model.to(dev)
    if model.training:
        raise ValueError("model is in training mode; call model.eval() first")
    cfg = model.config
    m = cfg.multiple
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}")

    tiles = cfg.tile_size if tile_size is None else tile_size
    tiles = np.broadcast_to(np.asarray(tiles), (3,))
    if not all(float(t).is_integer() and t >= m for t in tiles):
        raise ValueError(f"tile_size must be ints >= {m}, got {tile_size!r}")
    tiles = [int(t) // m * m for t in tiles]
    ov = np.broadcast_to(np.asarray(overlap, dtype=np.float64), (3,))
    if np.any(ov < 0):
        raise ValueError(f"overlap must be non-negative, got {overlap!r}")
    ov = [int(round(o * t)) if o < 1 else int(o) for o, t in zip(ov, tiles)]

    original_shape = image.shape
    x = normalize_percentile(image)
    if voxel_size is not None:
        factors = np.asarray(as_triple(voxel_size, "voxel_size")) / np.asarray(cfg.voxel_size)
        if not np.allclose(factors, 1.0):
            new_shape = tuple(max(1, int(round(s * f))) for s, f in zip(x.shape, factors))
            x = _zoom_to_shape(x, new_shape, order=1)

    plans = [_tile_plan(n, t, o, m) for n, t, o in zip(x.shape, tiles, ov)]
    pads = [(p[2], p[3]) for p in plans]
    if pad_mode == "reflect" and all(n > 1 for n in x.shape):
        xp = np.pad(x, pads, mode="reflect")
    else:
        xp = np.pad(x, pads, mode="constant" if pad_mode == "constant" else "edge")
    tshape = tuple(p[0] for p in plans)
    wins = [blend_window(p[0], p[1]) for p in plans]
    weight = wins[0][:, None, None] * wins[1][None, :, None] * wins[2][None, None, :]
    acc = np.zeros((4,) + xp.shape, np.float32)
    wsum = np.zeros(xp.shape, np.float32)
    starts = [(a, b, c) for a in plans[0][4] for b in plans[1][4] for c in plans[2][4]]
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    w_t = torch.from_numpy(weight)

    use_amp = dev.type == "cuda"
    with torch.inference_mode():
        for batch in tqdm(batches, desc="predict", unit="batch", disable=not progress):
            sl = [tuple(slice(s, s + t) for s, t in zip(st, tshape)) for st in batch]
            inp = torch.from_numpy(np.stack([xp[s] for s in sl])[:, None]).to(dev)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                raw = model(inp)
            flows, fg = model.activate(raw.float())
            out = torch.cat([flows, fg[:, None]], dim=1).cpu() * w_t
            out = out.numpy()
            for k, s in enumerate(sl):
                acc[(slice(None),) + s] += out[k]
                wsum[s] += weight

    crop = tuple(slice(p[2], p[2] + n) for p, n in zip(plans, x.shape))
    acc = acc[(slice(None),) + crop]
    wsum = wsum[crop]
    acc /= np.maximum(wsum, 1e-12)
    if acc.shape[1:] != original_shape:
        acc = np.stack([_zoom_to_shape(a, original_shape, order=1) for a in acc])
    flows = np.ascontiguousarray(acc[:3], dtype=np.float32)
    foreground = np.clip(np.ascontiguousarray(acc[3], dtype=np.float32), 0.0, 1.0)
    return Prediction(flows, foreground)
