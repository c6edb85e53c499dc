"""End-to-end segmentation: predict the maps, then reconstruct instances."""

import logging
import numbers
import time
import warnings
from typing import NamedTuple

import numpy as np

from ._backend import as_int_triple, as_triple, import_cupy, resolve_backend
from .filters import border_cap_volume, border_ids, mean_flow_error
from .metrics import median_diameter
from .reconstruct import flow_divergence, reconstruct, reconstruction_parameters

log = logging.getLogger(__name__)


class Segmentation(NamedTuple):
    """Result of :func:`segment`.

    Attributes
    ----------
    labels : ndarray, shape (Z, Y, X), uint32
        Cell instances 1..N, 0 for background.
    flows : ndarray, shape (3, Z, Y, X), float32
        Predicted gradient maps (z, y, x), pointing away from the centres.
    foreground : ndarray, shape (Z, Y, X), float32
        Predicted foreground probability.
    seconds : dict
        Wall-clock seconds of the ``"predict"`` and ``"reconstruct"`` stages,
        and with ``diameter="auto"`` of the ``"estimate"`` passes before them.
    diameter : float
        The typical cell diameter, in voxels along x, the segmentation was
        made for: the one given, the estimate of ``diameter="auto"``, or the
        model's training size.
    model : str or None
        The model that made it: the bundled model ``model="auto"`` chose
        (with ``"choose"`` in `seconds` for the trials), the name or folder
        given, ``None`` for a network passed as an object.
    """

    labels: np.ndarray
    flows: np.ndarray
    foreground: np.ndarray
    seconds: dict
    diameter: float
    model: str = None


def cell_extent(diameter, voxel_size, train_diameter):
    """Typical cell extent in voxels along (z, y, x).

    `diameter` is measured in voxels along x (Cellpose's convention); the other
    axes follow from the voxel size. ``None`` assumes the training size. A
    ``(z, y, x)`` triple is the extent itself, and leaves no room for a voxel size.
    """
    if diameter is not None and np.ndim(diameter) == 1:
        if voxel_size is not None:
            raise ValueError("pass a (z, y, x) diameter or a voxel_size, not both: the triple already gives the "
                             "cell extent along each axis")
        return as_triple(diameter, "diameter")
    d = float(train_diameter if diameter is None else diameter)
    if not np.isfinite(d) or d <= 0:
        raise ValueError(f"diameter must be positive and finite, got {diameter!r}")
    vs = as_triple((1.0, 1.0, 1.0) if voxel_size is None else voxel_size, "voxel_size")
    return tuple(d * vs[2] / v for v in vs)


def model_tanh_scale(config, diameter=None, voxel_size=None):
    """Tanh scale (z, y, x) of a model's flows on the image grid, where its scale grows with the cells.

    `config` is the model's ``UNetConfig``; `diameter` and `voxel_size` as for :func:`segment`.
    """
    extent = cell_extent(diameter, voxel_size, config.train_diameter)
    return tuple(config.tanh_scale * e / config.train_diameter for e in extent)


def model_border_volume(config, extent):
    """The smallest part of a cell cut by the stack's faces that a model resolves: a cap one network voxel deep.

    The network sees cells ``config.train_diameter`` voxels across; a cap
    thinner than one of its voxels is below its resolution, and on real
    crops the background specks at the faces were all below it while no
    cut nucleus was (``bench/bench_segment.py --real``). `extent` is the
    cells' (z, y, x) extent on the image grid.
    """
    return border_cap_volume(extent, 1 / config.train_diameter)


def _check_diameter(diameter):
    """Refuse anything but None, "auto", a positive number or a (z, y, x) triple of them."""
    if diameter is None or (isinstance(diameter, str) and diameter == "auto"):
        return
    if isinstance(diameter, str) or isinstance(diameter, (bool, np.bool_)):
        raise ValueError(f"diameter must be a number, a (z, y, x) triple, 'auto' or None, got {diameter!r}")
    if not isinstance(diameter, numbers.Real):
        as_triple(diameter, "diameter")


def segment(image, model=None, *, diameter=None, voxel_size=None, backend="auto", device="auto",
            augment=True, tile_size=None, context=None, progress=False):
    """Segment the cells of a 3D membrane stack.

    The stack is rescaled, per axis, so that its cells match the size the
    model was trained on (``model.config.train_diameter`` voxels across, the
    paper's way of applying a model to unseen organs), the gradient and
    foreground maps are predicted and brought back to the original grid,
    and :func:`cp3d.reconstruct` turns them into instances with parameters
    derived from the cell size on that grid.

    Parameters
    ----------
    image : ndarray, shape (Z, Y, X)
        One-channel stack.
    model : UNet3D or str or path-like, optional
        A network, a bundled model name (``"tanh"``, ``"heat"`` for membrane
        stains, ``"nuclei"`` for nuclear stains) or a model directory.
        ``None`` or ``"auto"`` (:data:`cp3d.model.DEFAULT_MODEL`) chooses
        between the bundled tanh and nuclei models for this stack: see Notes.
    diameter : float or (float, float, float) or "auto", optional
        Typical cell diameter in voxels along x (Cellpose's convention), the
        other axes following from `voxel_size`. ``None`` assumes the
        model's training size (about 10.25 voxels for the bundled models).
        A ``(z, y, x)`` triple gives the cell extent in voxels along each
        axis, as :func:`cp3d.reconstruct` takes it (then `voxel_size` must
        be ``None``). ``"auto"`` estimates it from the image: see Notes.
    voxel_size : float or (float, float, float), optional
        Voxel size (z, y, x), any unit; only ratios matter. ``None`` means
        isotropic voxels.
    backend : {"auto", "numpy", "numba", "cuda"}
        Reconstruction backend (see :func:`cp3d.reconstruct`); ``"cuda"``
        moves the predicted maps to the GPU for it. Results are NumPy arrays.
    device : str
        Torch device for prediction: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    augment : bool
        Average the predictions of the stack and its in-plane mirror images
        (see :func:`cp3d.predict`): four network passes, a more accurate
        segmentation. ``False`` predicts once, four times faster.
    tile_size : int or tuple of 3 ints, optional
        Tile shape (z, y, x) on the grid the network sees, that is after the
        rescaling to the model's cell size; default chosen within a memory
        budget (see :func:`cp3d.predict`). Smaller tiles bound the memory of
        large stacks at the cost of recomputed context.
    context : int or tuple of 3 ints, optional
        Voxels of context around each tile (see :func:`cp3d.predict`); the
        default, the network's receptive radius, makes tiling invisible.
    progress : bool
        Show a progress bar over the prediction tiles, one per network pass,
        each named: ``diameter="auto"``'s estimating passes by their number
        and the diameter they assume.

    Returns
    -------
    Segmentation
        ``labels``, ``flows``, ``foreground``, per-stage ``seconds`` and the
        ``diameter`` used. A constant (e.g. all-zero) stack gives empty
        labels and zero maps.

    Notes
    -----
    ``model="auto"`` lets each of :data:`cp3d.model.STAIN_MODELS` segment
    the stack without test-time augmentation (at `diameter`, or through
    the estimating passes of ``diameter="auto"`` below, also when no
    diameter is given: the cells are then segmented at the training size,
    but the models are compared at the size each measures) and keeps the one
    whose flows agree best with the instances it made, by the flow error
    the paper's filter uses (:func:`cp3d.filters.mean_flow_error`): a
    model shown a stain it was not trained on still makes instances, but
    its flows do not explain them. A trial at cells too large for the stack
    to hold one whole is no evidence. The chosen model then segments with
    augmentation, or its trial is the result when ``augment=False``. This
    takes about twice the time of the chosen model alone (1.9-2.6x on real
    nuclei crops); it chose right on 53 of the 54 runs of
    ``bench/bench_segment.py --choice`` (18 held-out stacks of both stains,
    real nuclei among them, three diameter settings).

    ``diameter="auto"`` segments the stack once at the model's training size
    and takes the volume-weighted median equivalent-sphere diameter of the
    instances found (:func:`cp3d.metrics.median_diameter` with
    ``weighted=True``, so that fragments of an oversegmented pass barely
    count; instances cut by the stack's faces left out when others remain),
    then segments again at that size and measures once more. Cells far
    above the training size come out of a pass in fragments, so their
    weighted median is low, though above the size the pass assumed: passes
    go on, each at the last weighted median, while it grows by more than
    10 % (eight passes at most; cells 4x the training size need about
    five). The estimate is the plain median diameter of the last pass's
    instances, fragments under half its weighted median left out (the
    weighted median reads high wherever cell sizes vary). A second chain of
    passes starts at 3x the training size, and the chain whose last pass's
    flows agree best with its instances (the lower
    :func:`cp3d.filters.mean_flow_error`) gives the estimate: from the
    training size alone, a model that reads a grainy background as small
    cells finds what it assumed and stops there. The stack is then
    segmented at the estimate (the last pass is reused when it was made at
    that size, within 5 %, and without augmentation). The estimating passes predict
    without test-time augmentation. When the first pass finds no cell, the
    training size is kept (with a warning).

    Examples
    --------
    >>> import cp3d
    >>> image, truth = cp3d.data.synthetic_stack((32, 64, 64), 10, seed=1)
    >>> result = cp3d.segment(image)  # doctest: +SKIP
    >>> result.labels.max() > 0  # doctest: +SKIP
    True
    >>> cp3d.segment(image, diameter="auto").diameter  # doctest: +SKIP
    10.1
    >>> result.model  # doctest: +SKIP
    'tanh'
    """
    from .model import DEFAULT_MODEL, STAIN_MODELS, UNet3D, load_model
    from .model.predict import resolve_device, check_image

    image = check_image(image)
    if resolve_backend(backend) == "cuda":
        import_cupy()
    resolve_device(device)  # a bad device fails here, not after loading the model
    _check_diameter(diameter)
    if tile_size is not None:
        as_int_triple(tile_size, "tile_size")  # checked here too: a constant stack never reaches predict
    if model is None or (isinstance(model, str) and model == DEFAULT_MODEL):
        name, candidates = DEFAULT_MODEL, {m: load_model(m) for m in STAIN_MODELS}
    else:
        name = None if isinstance(model, UNet3D) else str(model)
        candidates = {name: model if isinstance(model, UNet3D) else load_model(model)}
    auto = isinstance(diameter, str)
    extents = {n: cell_extent(None if auto else diameter, voxel_size, m.config.train_diameter)
               for n, m in candidates.items()}
    if float(image.min()) == float(image.max()):
        # A constant stack (e.g. all zero) holds no cells; the network would only see noise-free padding.
        zeros = np.zeros(image.shape, np.float32)
        first = next(iter(candidates))
        return Segmentation(np.zeros(image.shape, np.uint32), np.zeros((3, *image.shape), np.float32), zeros,
                            {"predict": 0.0, "reconstruct": 0.0}, extents[first][2], first)
    for n, m in candidates.items():
        _check_cell_size(image.shape, m.config, extents[n], f"diameter={diameter!r} with voxel_size={voxel_size!r}")
    options = dict(backend=backend, device=device, tile_size=tile_size, context=context, progress=progress)
    if len(candidates) > 1:
        return _segment_choosing(image, candidates, diameter, voxel_size, augment, **options)
    model = candidates[name]
    if not auto:
        return _segment_at(image, model, extents[name], augment, extents[name][2], **options)._replace(model=name)
    return _segment_auto(image, model, voxel_size, augment, **options)._replace(model=name)


_REUSE_TOLERANCE = 0.05  # relative diameter change below which the last estimating pass is the result
_AUTO_GROWTH = 1.1  # after the refinement, passes continue while the weighted median grows by more than this
_AUTO_PASSES = 8  # estimating passes at most
_FRAGMENT = 0.5  # instances under this share of the weighted median diameter are fragments to the estimate
# diameter="auto"'s chains of passes start at these multiples of the training size; the one whose last pass's flows
# agree best with its instances wins. From the training size alone, a model that reads a real crop's grainy
# background as small cells stops there (1136_mini.h5: 9.9 for nuclei 24-39 across); from 3x it climbs to them.
_AUTO_STARTS = (1, 3)


def _climbing_passes(image, model, voxel_size, start, label, **options):
    """Passes from `start` while the weighted median grows (see :func:`segment`'s Notes): the last pass, the
    estimate (``None`` when the first pass found no cell) and the cell extent (z, y, x) the last pass assumed."""

    def measured_at(d, number):
        """Pass `number` at `d`, its volume-weighted median diameter and its plain median without fragments."""
        title = f"{label}estimate {number}: d {d:.1f}"
        result = _segment_at(image, model, cell_extent(d, voxel_size, d), False, d,
                             **dict(options, progress=options["progress"] and title))
        # Cells cut by the stack's faces read small; they are left out unless there is nothing else.
        # Weighted by volume: an oversegmented pass (many small fragments) still measures the cells.
        cut = border_ids(result.labels)
        weighted = median_diameter(result.labels, voxel_size, exclude=cut, weighted=True)
        if weighted is None:
            cut = None
            weighted = median_diameter(result.labels, voxel_size, weighted=True)
        if weighted is None:
            return result, None, None
        # But the weighted median reads 1-9 % high wherever sizes vary, and a model that segments well (e.g.
        # fine-tuned) then loses up to 0.05 Dice against the true size (bench --finetune); the plain median of
        # the instances left once the fragments (under half the weighted size) are out is the cells' median.
        plain = median_diameter(result.labels, voxel_size, exclude=cut, min_diameter=_FRAGMENT * weighted)
        return result, weighted, plain

    assumed = start
    result, climbing, estimate = measured_at(assumed, 1)
    history = [assumed]
    if estimate is not None:
        # Cells far above the size assumed come out in fragments, so each estimate is low but above the size it
        # was made at: the weighted estimates climb towards the true size, and passes go on while they do.
        while len(history) < 2 or (climbing > _AUTO_GROWTH * assumed and len(history) < _AUTO_PASSES):
            assumed = climbing
            history.append(assumed)
            result, climbing, estimate = measured_at(assumed, len(history))
            if estimate is None:
                climbing = estimate = assumed
    log.info("diameter='auto' from %.2f: %s voxels (passes at %s)", start,
             "no cell" if estimate is None else f"{estimate:.2f}", ", ".join(f"{d:.2f}" for d in history))
    return result, estimate, cell_extent(assumed, voxel_size, assumed)


def _flow_error_of(trial, model, trial_extent, backend):
    """The mean flow error of a pass's instances (:func:`cp3d.filters.mean_flow_error`), ``inf`` where it is no
    evidence: no instance, or cells too big for the stack to hold one (a model can read a stack of another
    stain, or shrunk far below its cells, as one smooth blob the size of the stack, whose few flows agree with
    it trivially)."""
    # the pass's maps are NumPy arrays, whatever backend reconstructed them
    error = mean_flow_error(trial.labels, trial.flows, tanh_scale=model_tanh_scale(model.config, trial_extent),
                            backend="auto" if backend == "cuda" else backend)
    if np.isnan(error) or any(e > n for e, n in zip(trial_extent, trial.labels.shape)):
        return np.inf
    return error


def _estimating_passes(image, model, voxel_size, label="", **options):
    """``diameter="auto"``'s passes (see :func:`segment`'s Notes): the last pass of the chain that won, the
    estimate, the cell extent (z, y, x) that pass assumed and its mean flow error."""
    chains, first = [], None
    for factor in _AUTO_STARTS:
        trial, estimate, trial_extent = _climbing_passes(image, model, voxel_size, factor * model.config.train_diameter,
                                                         f"{label}from {factor:g}x: " if factor != 1 else label,
                                                         **options)
        first = first or (trial, trial_extent)
        if estimate is not None:
            chains.append((_flow_error_of(trial, model, trial_extent, options["backend"]), trial, estimate,
                           trial_extent))
    if not chains:
        warnings.warn("diameter='auto' found no cell at the training size; segmenting at the training size",
                      stacklevel=4)
        trial, trial_extent = first
        return trial, float(trial_extent[2]), trial_extent, np.inf
    error, trial, estimate, trial_extent = min(chains, key=lambda chain: chain[0])
    log.info("diameter='auto': %.2f voxels (mean flow error %s)", estimate,
             ", ".join(f"{c[2]:.2f}: {c[0]:.3f}" for c in chains))
    return trial, float(estimate), trial_extent, error


def _final_pass(image, model, augment, trial, extent, trial_extent, label, **options):
    """Segment for cells of `extent`, or keep `trial` (a pass without augmentation for cells of `trial_extent`)
    when it is that."""
    if augment or abs(extent[2] / trial_extent[2] - 1) >= _REUSE_TOLERANCE:
        title = f"{label}predict at d {extent[2]:.1f}"
        return _segment_at(image, model, extent, augment, extent[2],
                           **dict(options, progress=options["progress"] and title))
    return trial._replace(diameter=float(extent[2]))


def _segment_auto(image, model, voxel_size, augment, **options):
    """``diameter="auto"``: measure the cells of a pass at the training size, refine, segment at the estimate."""
    start = time.perf_counter()
    trial, estimate, trial_extent, _ = _estimating_passes(image, model, voxel_size, **options)
    estimated = time.perf_counter() - start
    result = _final_pass(image, model, augment, trial, cell_extent(estimate, voxel_size, estimate), trial_extent, "",
                         **options)
    if result.seconds is trial.seconds:
        estimated -= sum(trial.seconds.values())  # the reused pass's stages are counted as such
    return result._replace(seconds=dict(result.seconds, estimate=estimated))


def _segment_choosing(image, candidates, diameter, voxel_size, augment, **options):
    """``model="auto"``: each candidate's trial without augmentation, the one whose flows agree best with its
    instances segments (see :func:`segment`'s Notes)."""
    start = time.perf_counter()
    trials = {}
    for name, model in candidates.items():
        with warnings.catch_warnings():
            # a model shown the other stain is expected to misfit here: the choice is the answer to that
            warnings.filterwarnings("ignore", message="the model's flows point", category=UserWarning)
            if diameter is None or isinstance(diameter, str):
                # Without a diameter too: at the training size a model shown nuclei several times larger breaks
                # them up, and its flows then agree with its fragments worse than the membrane model's with its
                # specks (both real nuclei crops); each model is compared at the size it measures.
                trial, estimate, trial_extent, error = _estimating_passes(image, model, voxel_size,
                                                                          label=f"{name}: ", **options)
                extent = cell_extent(estimate if diameter else None, voxel_size, model.config.train_diameter)
            else:
                extent = trial_extent = cell_extent(diameter, voxel_size, model.config.train_diameter)
                title = f"{name}: trial at d {extent[2]:.1f}"
                trial = _segment_at(image, model, extent, False, extent[2],
                                    **dict(options, progress=options["progress"] and title))
                error = _flow_error_of(trial, model, trial_extent, options["backend"])
        trials[name] = (trial, extent, trial_extent, error)
    name = min(trials, key=lambda n: trials[n][3])
    log.info("model='auto': %s (mean flow error %s)", name,
             ", ".join(f"{n} {t[3]:.3f}" for n, t in trials.items()))
    trial, extent, trial_extent, _ = trials[name]
    chosen = time.perf_counter() - start
    result = _final_pass(image, candidates[name], augment, trial, extent, trial_extent, f"{name}: ", **options)
    if result.seconds is trial.seconds:
        chosen -= sum(trial.seconds.values())
    return result._replace(seconds=dict(result.seconds, choose=chosen), model=name)


def _check_cell_size(shape, config, extent, what):
    """Fail before the minutes of predicting when cells of `extent` ask for more memory than there is: the
    stack rescaled for the network, or the reconstruction's closing ball (both ``ValueError`` naming `what`)."""
    from .model.predict import rescaled_shape

    rescaled_shape(shape, [config.train_diameter / e for e in extent], what)
    reconstruction_parameters(extent, config.targets, model_tanh_scale(config, extent))


def _warn_if_the_model_does_not_fit(prediction):
    """Warn when the predicted flows point towards the cell centres on average.

    A model's flows point away from the centres of the cells it recognises; on
    average inwards, they follow structures it was not trained on, as the
    membrane model's do on nuclei, and the result is thousands of specks.
    """
    if flow_divergence(prediction.flows, prediction.foreground > 0.5) < 0:
        warnings.warn("the model's flows point towards the cell centres on average, where a model that recognises "
                      "the cells points away from them: the stack is probably not of the kind the model was "
                      "trained on. For nuclear stains use model='nuclei' (cp3d segment --model nuclei); for "
                      "membrane stains model='tanh'; or leave the choice to model='auto', the default",
                      stacklevel=4)


def _segment_at(image, model, extent, augment, diameter, *, backend, device, tile_size, context, progress):
    """Predict and reconstruct `image` for cells of `extent` voxels along (z, y, x)."""
    from .model import predict

    config = model.config
    # Predicting at this voxel size makes each cell train_diameter model voxels across.
    model_voxel = tuple(m * config.train_diameter / e for m, e in zip(config.voxel_size, extent))
    start = time.perf_counter()
    prediction = predict(image, model, voxel_size=model_voxel, tile_size=tile_size, context=context, device=device,
                         augment=augment, progress=progress)
    predicted = time.perf_counter()
    scale = model_tanh_scale(config, extent)  # the extent is a (z, y, x) diameter
    flows, foreground = prediction.flows, prediction.foreground
    if backend == "cuda":
        cupy = import_cupy()
        flows, foreground = cupy.asarray(flows), cupy.asarray(foreground)
    _warn_if_the_model_does_not_fit(prediction)
    with warnings.catch_warnings():
        # the model's flows point outwards by construction: reconstruct's advice to pass inward=True (an option
        # segment and the CLI do not have) would mislead; the check above says what is wrong instead
        warnings.filterwarnings("ignore", message="the flows point", category=UserWarning)
        labels = reconstruct(flows, foreground, diameter=extent, targets=config.targets, tanh_scale=scale,
                             min_border_volume=model_border_volume(config, extent), backend=backend)
    if backend == "cuda":
        labels = cupy.asnumpy(labels)
    seconds = {"predict": predicted - start, "reconstruct": time.perf_counter() - predicted}
    return Segmentation(labels, prediction.flows, prediction.foreground, seconds, float(diameter))
