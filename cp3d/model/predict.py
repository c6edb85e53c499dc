"""Network inference on whole stacks: normalise, rescale, blended tiles."""

import itertools
import logging
import math
import os
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from .._backend import as_finite_float32, as_int_triple, as_triple, check_memory, check_volume, is_cupy_array
from .unet import UNet3D, load_model

__all__ = ["Prediction", "predict", "normalize_percentile", "blend_window", "cheapest_tiles", "TILE_ELEMENTS", "MIRRORS"]

log = logging.getLogger(__name__)

#: Elements of the widest activation (2 * base_features channels at full resolution) of one batch of tiles
#: when the tile shape is chosen automatically: 2**23 voxels per tile for the default network on the CPU
#: (3.0 GB peak in float32, bench/bench_predict.py), 2**25 on a GPU, where it keeps every tensor below 2**31 elements.
TILE_ELEMENTS = {"cpu": 2**28, "cuda": 2**30}

#: Axes mirrored for test-time augmentation: none, y, x, both. Mirroring z too (eight passes) gained
#: little more on the benchmark stacks, and a z-mirror turns the depth attenuation of real stacks upside down.
MIRRORS = ((), (1,), (2,), (1, 2))


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


def check_image(image):
    """Validate a one-channel 3D stack for prediction (shared by segment, train and the dask layer); return it as an array."""
    if isinstance(image, (str, bytes, os.PathLike)):
        raise TypeError(f"image must be an array, got the path {image!r}; read it with cp3d.io.read_image(path).data")
    if is_cupy_array(image):
        raise TypeError("image must be a NumPy array (prediction moves tiles to the device itself); "
                        "pass cupy.asnumpy(image)")
    image = np.asarray(image)
    if image.ndim == 4 and image.shape[-1] in (3, 4):
        raise ValueError(
            f"image has shape {image.shape}: an RGB(A) stack? cp3d needs one channel (Z, Y, X); "
            "pick the membrane channel, e.g. image[..., 0]"
        )
    if image.ndim == 4:
        raise ValueError(
            f"image has shape {image.shape}: a multi-channel or time series? cp3d needs a single "
            "3D stack (Z, Y, X)"
        )
    check_volume(image, "image")
    if image.ndim == 3 and image.shape[-1] in (3, 4) and min(image.shape[:2]) >= 16:
        raise ValueError(
            f"image has shape {image.shape}: a 2D RGB(A) image? cp3d segments 3D stacks (Z, Y, X) of one channel"
        )
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image must be real-valued, got dtype {image.dtype}")
    return as_finite_float32(image, "image")


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


def blend_window(size, context, ramp, first=False, last=False):
    """1D blending weight of a tile of `size` voxels.

    The `context` voxels at each end get weight 0: the network sees them, but
    the values there depend on voxels beyond the tile. A ``sin**2`` ramp of
    `ramp` voxels then rises to 1, so neighbouring tiles fade into each other
    without a seam. The `first` and `last` tile along an axis start or end at
    the stack's border (where a whole-stack prediction also ends), so they
    keep weight 1 there.
    """
    w = np.ones(size, np.float64)
    r = np.sin(0.5 * np.pi * (np.arange(ramp) + 0.5) / ramp) ** 2 if ramp > 0 else np.ones(0)
    if not first:
        w[:context] = 0
        w[context : context + ramp] = np.minimum(w[context : context + ramp], r)
    if not last:
        w[size - context :] = 0
        w[size - context - ramp : size - context] = np.minimum(w[size - context - ramp : size - context], r[::-1])
    return w.astype(np.float32)


def _tile_plan(n, tile, context, ramp, multiple):
    """Tiles along one axis of length `n`: tile size, padded length and ``(start, window)`` pairs.

    The axis is padded at its end to a multiple of `multiple`, exactly as a
    whole-stack prediction pads it, and the first and last tiles sit on the
    ends of that padded axis; starts are multiples of `multiple` so the
    network's pooling grid is the same in every tile. Inner tile ends give up
    `context` voxels each, and neighbouring tiles' weighted parts overlap by
    at least `ramp` voxels.
    """
    length = -(-n // multiple) * multiple
    count = _tile_count(n, tile, context, ramp, multiple)
    if count == 1:  # one tile holds the whole axis: nothing to blend
        return length, length, [(0, np.ones(length, np.float32))]
    if count == 0:
        raise ValueError(
            f"tile size {tile} is too small to tile an axis of {n} voxels with {context} voxels of context "
            f"on each side and a {ramp}-voxel blend: use tiles of at least {2 * context + ramp + multiple} "
            "voxels, or less context"
        )
    # Spread the tiles evenly: every gap a multiple of `multiple`, none wider than the step `_tile_count` allows.
    units, n_gaps = (length - tile) // multiple, count - 1
    gaps = [units // n_gaps + (k < units % n_gaps) for k in range(n_gaps)]
    starts = np.concatenate([[0], np.cumsum(gaps)]) * multiple
    last = len(starts) - 1
    return tile, length, [
        (int(s), blend_window(tile, context, ramp, first=k == 0, last=k == last)) for k, s in enumerate(starts)
    ]


def _tile_count(n, tile, context, ramp, multiple):
    """Number of tiles `_tile_plan` puts along an axis of `n` voxels, or 0 if `tile` is too small."""
    length = -(-n // multiple) * multiple
    if length <= tile:
        return 1
    step = (tile - 2 * context - ramp) // multiple * multiple
    return -(-(length - tile) // step) + 1 if step >= multiple else 0


def cheapest_tiles(shape, budget, context, overlap, multiple):
    """Tile shape that computes the fewest voxels for `shape`, tiles holding at most `budget` voxels.

    Along each axis only the smallest tile giving each tile count is a
    candidate; every combination of candidates is scored by the voxels the
    network computes (tiles times tile volume), fewer tiles breaking ties.
    """
    candidates = []
    for n, c, r in zip(shape, context, overlap):
        length = -(-n // multiple) * multiple
        best = {}
        for t in range(multiple, length + 1, multiple):
            k = _tile_count(n, t, c, r, multiple)
            if k and k not in best:
                best[k] = t
        candidates.append(sorted(best.items()))
    scored = []
    for combo in itertools.product(*candidates):
        tiles = [t for _, t in combo]
        if math.prod(tiles) <= budget:
            count = math.prod(k for k, _ in combo)
            scored.append((count * math.prod(tiles), count, tiles))
    if not scored:
        raise ValueError(
            f"no tiling of a {tuple(shape)} stack fits {budget} voxels per tile with {context} voxels of context; "
            "pass a smaller context"
        )
    return min(scored)[2]


def _blended_tiles(x, model, dev, plans, batch_size, pad_mode, bar):
    """Network maps (4, Z, Y, X) of the normalised stack `x`, tile by tile, blended."""
    tshape = tuple(p[0] for p in plans)
    pads = [(0, p[1] - n) for p, n in zip(plans, x.shape)]
    xp = np.pad(x, pads, mode=pad_mode)  # NumPy repeats a 1-voxel axis when asked to reflect it
    acc = np.zeros((4,) + xp.shape, np.float32)
    wsum = np.zeros(xp.shape, np.float32)
    grid = list(itertools.product(*(p[2] for p in plans)))
    use_amp = dev.type == "cuda"
    with torch.inference_mode():
        for i in range(0, len(grid), batch_size):
            batch = grid[i : i + batch_size]
            sl = [tuple(slice(s, s + t) for (s, _), t in zip(tile, tshape)) for tile in batch]
            inp = torch.from_numpy(np.stack([xp[s] for s in sl])[:, None]).to(dev)
            inp = inp.contiguous(memory_format=model.memory_format(dev))
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                raw = model(inp)
            flows, fg = model.activate(raw.float())
            out = torch.cat([flows, fg[:, None]], dim=1).cpu().numpy()
            for k, (s, tile) in enumerate(zip(sl, batch)):
                (_, wz), (_, wy), (_, wx) = tile
                weight = wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
                acc[(slice(None),) + s] += out[k] * weight
                wsum[s] += weight
            bar.update()
    crop = tuple(slice(0, n) for n in x.shape)
    out = acc[(slice(None),) + crop]
    out /= np.maximum(wsum[crop], 1e-12)
    return out


def resolve_device(device, model=None):
    """The torch device prediction runs on; "auto": a given model's GPU, else CUDA when available, else the CPU."""
    if device == "auto":
        p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        if p is not None and p.device.type != "cpu":
            return p.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch device, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU")
    return dev


# float32 maps held per voxel of the network's grid: the input, the sum of the passes and one pass
_MAPS_PER_VOXEL = 1 + 4 + 4


def rescaled_shape(shape, factors, what):
    """`shape` scaled by `factors`; ``ValueError`` naming `what` when prediction there would not fit in memory."""
    scaled = np.asarray(shape, np.float64) * np.asarray(factors, np.float64)
    needed = math.prod(max(1.0, round(float(v))) if np.isfinite(v) else math.inf for v in scaled) * 4 * _MAPS_PER_VOXEL
    shown = tuple(f"{v:.3g}" if v >= 1e6 else str(max(1, round(v))) for v in scaled)
    check_memory(needed, f"{what} (the {tuple(shape)} stack rescaled to ({', '.join(shown)}) for the network)")
    return tuple(max(1, int(round(v))) for v in scaled)


def zoom_to_shape(arr, shape, order):
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
    context=None,
    overlap=8,
    batch_size=1,
    device="auto",
    pad_mode="reflect",
    augment=True,
    progress=False,
    normalize=True,
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
        Voxel size (z, y, x) of `image` in the units of the model's training
        grid, ``model.config.voxel_size`` (``(1, 1, 1)`` for the bundled
        models, whose cells were ``config.train_diameter`` voxels across):
        the values are absolute, not ratios, so ``(2, 2, 2)`` doubles every
        axis. When it differs from the training voxel size, the image is
        resampled (linear) to it and the maps are resampled back to the
        original shape exactly. Flow values are not rescaled. To start from a
        microscope's voxel size (in µm) and a cell diameter, use
        :func:`cp3d.segment`, which works out this value.
    tile_size : int or tuple of 3 ints, optional
        Tile shape (z, y, x); default ``model.config.tile_size``, and where
        that is ``None`` (or too small for the context) the shape that
        computes the fewest voxels within a memory budget (:data:`TILE_ELEMENTS`:
        for the default network and one tile per batch, ``2**23`` voxels on
        the CPU and ``2**25`` on a GPU; the README's Memory section gives
        the measured peak):
        a stack within the budget is predicted whole. Rounded down to
        multiples of ``2**depth``; an axis that fits in one tile is
        predicted whole.
    context : int or tuple of 3 ints, optional
        Voxels at each inner tile end that the network sees but whose values
        are not used; default the network's receptive radius
        (:attr:`UNetConfig.receptive_radius`, 51 voxels for the bundled
        models), which makes the tiled maps equal to a whole-stack
        prediction up to float rounding. Less context makes tiles cheaper
        and the maps approximate near tile seams.
    overlap : int or tuple of 3 ints, optional
        Minimum width, in voxels, over which the used parts of neighbouring
        tiles overlap and are blended with :func:`blend_window`.
    batch_size : int, optional
        Tiles per network call.
    device : {"auto"} or str or torch.device, optional
        ``"auto"``: the GPU a given model is on, else CUDA when available,
        else the CPU. The network runs as a copy on that device
        (:meth:`UNet3D.for_inference`); a given model is not moved.
    pad_mode : {"reflect", "constant"}, optional
        How each axis is extended at its end to a multiple of ``2**depth``.
    augment : bool, optional
        Test-time augmentation: average the maps predicted for the stack and
        its in-plane mirror images (:data:`MIRRORS`, flows of a mirrored axis
        negated back). Four network passes instead of one, for a slightly
        higher Dice on the held-out benchmark stacks (figures in the
        README's Benchmarks; eight mirrorings, z too, gained nothing more).
    progress : bool or str, optional
        Show a progress bar over the tile batches; a string is its label
        (default ``"predict"``).
    normalize : bool, optional
        Normalise `image` by its own percentiles (:func:`normalize_percentile`);
        ``False`` takes it as already normalised, e.g. one chunk of a larger
        stack normalised by the whole stack's percentiles (:func:`cp3d.dask.segment`).

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
    With ``norm="batch"`` networks (the default) and the default `context`,
    tiling is invisible: every voxel, at the stack border too, gets the value
    a whole-stack prediction gives it, up to float rounding, because each
    value is taken from a tile that holds the voxel's whole receptive field
    or ends where the stack does. The price is computing the context twice:
    a tile of ``T`` voxels advances by about ``T - 2 * context - overlap``
    voxels, so large tiles waste least.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.model import UNet3D, predict
    >>> net = UNet3D(base_features=4, depth=2).eval()
    >>> p = predict(np.random.rand(20, 30, 30), net, tile_size=64)
    >>> p.flows.shape, p.foreground.shape
    ((3, 20, 30, 30), (20, 30, 30))
    """
    image = check_image(image)
    if model is None:
        model = "tanh"
    dev = resolve_device(device, model)
    if not isinstance(model, UNet3D):
        model = load_model(model)
    net = model.for_inference(dev)
    cfg = model.config
    m = cfg.multiple
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(augment, (bool, np.bool_)):
        raise TypeError(f"augment must be a bool, got {augment!r}")
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}")

    tiles = tile_size
    if tiles is not None:
        tiles = as_int_triple(tiles, "tile_size")
        if not all(t >= m for t in tiles):
            raise ValueError(f"tile_size must be ints >= {m}, got {tile_size!r}")
        tiles = [t // m * m for t in tiles]
    context = cfg.receptive_radius if context is None else context
    context = as_int_triple(context, "context", allow_zero=True)
    ramps = as_int_triple(overlap, "overlap", allow_zero=True)

    original_shape = image.shape
    x = normalize_percentile(image) if normalize else image
    if voxel_size is not None:
        factors = np.asarray(as_triple(voxel_size, "voxel_size")) / np.asarray(cfg.voxel_size)
        if not np.allclose(factors, 1.0):
            new_shape = rescaled_shape(x.shape, factors, f"voxel_size={voxel_size!r}")
            x = zoom_to_shape(x, new_shape, order=1)

    if tiles is None and cfg.tile_size is not None:
        if all(map(_tile_count, x.shape, cfg.tile_size, context, ramps, [m] * 3)):
            tiles = cfg.tile_size
        else:
            log.warning("the model's tile_size %s is too small for %s voxels of context; choosing tiles automatically",
                        cfg.tile_size, context)
    if tiles is None:
        budget = TILE_ELEMENTS["cuda" if dev.type == "cuda" else "cpu"] // (2 * cfg.base_features * batch_size)
        tiles = cheapest_tiles(x.shape, budget, context, ramps, m)
    plans = [_tile_plan(n, t, c, o, m) for n, t, c, o in zip(x.shape, tiles, context, ramps)]
    mirrors = MIRRORS if augment else ((),)
    n_batches = len(mirrors) * -(-math.prod(len(p[2]) for p in plans) // batch_size)
    acc = None
    label = progress if isinstance(progress, str) else "predict"
    with tqdm(total=n_batches, desc=label, unit="batch", disable=not progress) as bar:
        for axes in mirrors:
            out = _blended_tiles(np.flip(x, axes), net, dev, plans, batch_size, pad_mode, bar)
            out = np.flip(out, [a + 1 for a in axes])
            out[list(axes)] *= -1  # mirroring axis a reverses the flow along a
            if acc is None:
                acc = out
            else:
                acc += out
    acc /= len(mirrors)
    if acc.shape[1:] != original_shape:
        acc = np.stack([zoom_to_shape(a, original_shape, order=1) for a in acc])
    flows = np.ascontiguousarray(acc[:3], dtype=np.float32)
    foreground = np.clip(np.ascontiguousarray(acc[3], dtype=np.float32), 0.0, 1.0)
    return Prediction(flows, foreground)
