"""Training on synthetic membrane or nuclei stacks, or annotated ones: data pools, augmentation, losses, checkpoints.

Run from the command line (the arguments are those of :func:`train`)::

    cp3d train OUT_DIR --targets tanh --steps 1500 --num-threads 1
    cp3d train OUT_DIR --kind nuclei --init tanh --steps 3000   # the nuclei model: varied synthetic nuclei
    cp3d train OUT_DIR --varied --init tanh --steps 3000   # membranes rendered in varied ways
    cp3d train OUT_DIR --kind mixed --varied --init nuclei --steps 2000   # one model of both stains
    cp3d train OUT_DIR --data DIR --init tanh --steps 300   # fine-tune on NAME.tif + NAME_masks.tif pairs
    cp3d train OUT_DIR --validate-only     # re-score a finished run

Targets are computed on whole synthetic stacks, never on patches: a cell cut
by the patch border keeps the flows of the whole cell. Geometric augmentation
is therefore done in a way that keeps the targets exact: flips and y<->x
swaps transform the flow channels with the maps (flip axis a negates flow
channel a; swapping y and x swaps flow channels y and x), and anisotropic
stretching resamples a whole stack along z (labels by nearest neighbour) and
recomputes its targets. Axis permutations involving z are not used: the
axial blur of a microscope makes z a different axis from y and x.
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from .._backend import as_triple, start_numba_pool
from ..data import KINDS
from ..io import atomic_write
from .predict import resolve_device, normalize_percentile, predict
from .unet import CONFIG_NAME, WEIGHTS_DIR, WEIGHTS_NAME, UNet3D, UNetConfig, resolve_model_dir, load_model, save_model

__all__ = ["train", "validate", "validate_annotated", "augment_geometry", "flow_targets"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
VALIDATION_SEED = 10**9  # held-out stacks use seeds VALIDATION_SEED + i; training seeds stay below
VARIED_SHARE = 0.75  # membranes with varied=True: the share of stacks drawn with the varied settings
# and the chance of each of their settings to be drawn rather than left at the plain default: with every
# setting drawn at once (1.0) many stacks were beyond recognition, and two fine-tunes lost 0.03 Dice on plain
# stacks (bench/results/segment_generalise*.md)
VARIED_SETTINGS_SHARE = 0.5
# The dimmest a cell is dimmed to, and the least it stays above a stack's background haze.
DIM_LOW, DIM_HIGH, DIM_ABOVE_BACKGROUND = 0.25, 0.7, 0.3
# kind="mixed": one model for nuclear and membrane stains, each stack drawn as nuclei with this chance, else as
# membranes (two such runs are scored in the README; neither is bundled)
MIXED_NUCLEI_SHARE = 0.5
TRAIN_KINDS = KINDS + ("mixed",)


# --------------------------------------------------------------------------- targets & augmentation


def flow_targets(labels, config):
    """Flow targets ``(3, Z, Y, X)`` for `labels` under the model's formulation."""
    import cp3d

    if config.targets == "tanh":
        return np.asarray(cp3d.tanh_flows(labels, scale=config.tanh_scale), dtype=np.float32)
    return np.asarray(cp3d.heat_flows(labels), dtype=np.float32)


def augment_geometry(maps, flows, flips=(False, False, False), swap_yx=False):
    """Flip and transpose maps and flow fields consistently.

    Parameters
    ----------
    maps : sequence of ndarray, each (Z, Y, X) or (C, Z, Y, X)
        Scalar maps (image, foreground, labels...), transformed spatially.
    flows : ndarray, shape (3, Z, Y, X)
        Flow field in channel order (z, y, x).
    flips : tuple of 3 bool
        Flip along z, y, x. Flipping axis a also negates flow channel a.
    swap_yx : bool
        Transpose y and x (after flipping); flow channels y and x swap too.

    Returns
    -------
    maps : list of ndarray
    flows : ndarray, float32, shape (3, Z', Y', X')
    """
    def geo(a):
        lead = a.ndim - 3
        axes = [lead + i for i in range(3) if flips[i]]
        if axes:
            a = np.flip(a, axis=axes)
        if swap_yx:
            a = np.swapaxes(a, lead + 1, lead + 2)
        return np.ascontiguousarray(a)

    flows = geo(flows)
    sign = np.array([-1.0 if f else 1.0 for f in flips], np.float32)
    flows = flows * sign[:, None, None, None]
    if swap_yx:
        flows = flows[[0, 2, 1]]
    return [geo(m) for m in maps], np.ascontiguousarray(flows, dtype=np.float32)


def _stretch_z(image, labels, factor):
    """Resample a stack along z by `factor`: image linearly, labels by nearest neighbour."""
    image = ndimage.zoom(image, (factor, 1, 1), order=1, mode="nearest", grid_mode=True)
    labels = ndimage.zoom(labels, (factor, 1, 1), order=0, mode="nearest", grid_mode=True)
    return image, labels


def _dim_cells(image, labels, rng, fraction=0.2, low=DIM_LOW, high=DIM_HIGH):
    """Dim the signal of a random `fraction` of the cells by a factor in [low, high]."""
    n = int(labels.max())
    lut = np.ones(n + 1, np.float32)
    pick = rng.random(n) < fraction
    lut[1:][pick] = rng.uniform(low, high, int(pick.sum()))
    factor = ndimage.minimum_filter(lut[labels], size=5)
    return image * factor


# --------------------------------------------------------------------------- data pool


class _StackPool:
    """Synthetic stacks with precomputed targets; one is replaced every `refresh_every` steps.

    Stack ``k`` is a pure function of ``(seed, k)``, so a pool is rebuilt
    exactly from its list of stack ids when training resumes.
    """

    def __init__(self, config, seed, diameters, n_stacks, stack_shape, noise, stretch, refresh_every, kind="membrane",
                 varied=False):
        self.config, self.seed, self.diameters, self.kind, self.varied = config, seed, diameters, kind, varied
        self.stack_shape, self.noise, self.stretch = stack_shape, noise, stretch
        self.n_stacks, self.refresh_every = n_stacks, refresh_every
        self.ids, self.stacks, self.next_id = [], [], 0
        self.gen_seconds = 0.0

    def fill(self, ids=None, next_id=None):
        ids = list(range(self.n_stacks)) if ids is None else list(ids)
        self.ids, self.stacks = ids, [self.make(k) for k in ids]
        self.next_id = max(ids) + 1 if next_id is None else next_id

    def refresh(self, step):
        if self.refresh_every and step > 0 and step % self.refresh_every == 0:
            slot = self.next_id % self.n_stacks
            self.ids[slot], self.stacks[slot] = self.next_id, self.make(self.next_id)
            self.next_id += 1

    def make(self, k):
        import cp3d.data

        t0 = time.perf_counter()
        rng = np.random.default_rng([self.seed, k])
        diameter = float(rng.uniform(*self.diameters))
        factor = float(np.exp(rng.uniform(np.log(self.stretch[0]), np.log(self.stretch[1])))) if rng.random() < 0.5 else 1.0
        shape = (max(8, int(math.ceil(self.stack_shape[0] / factor))),) + tuple(self.stack_shape[1:])
        noise = float(rng.uniform(*self.noise))
        # nuclei vary in every rendering setting; the membrane stacks keep their defaults unless varied,
        # and then a share keeps them still, so the plain stacks are not forgotten
        kind = self.kind
        if kind == "mixed":
            kind = "nuclei" if rng.random() < MIXED_NUCLEI_SHARE else "membrane"
        if kind == "nuclei":
            # every stack: with half of them plain (dark background, dim nuclei) the crops' background went back
            # to foreground (AP@0.5 0.61 -> 0.31 on 1135) while the synthetic validation rose (README, the model)
            options = dict(cp3d.data.random_nuclei_options(rng, bright_background=self.varied,
                                                           glowing_walls=self.varied), noise=noise)
        elif self.varied and rng.random() < VARIED_SHARE:
            # a noise drawn from its own, wider, range replaces the pool's
            options = {"noise": noise} | cp3d.data.random_membrane_options(rng, VARIED_SETTINGS_SHARE)
        else:
            options = {"noise": noise}
        image, labels = cp3d.data.synthetic_stack(
            shape, diameter, kind=kind, seed=int(self.seed * 1_000_003 + k) % VALIDATION_SEED, **options
        )
        image = np.asarray(image, np.float32)
        labels = np.asarray(labels).astype(np.uint32, copy=False)
        if factor != 1.0:
            image, labels = _stretch_z(image, labels, factor)
        # a dimmed cell stays brighter than the haze around it: one darker than its background is no cell to see
        low = max(DIM_LOW, options.get("background", 0.0) + DIM_ABOVE_BACKGROUND)
        if rng.random() < 0.5 and low < DIM_HIGH:
            image = _dim_cells(image, labels, rng, low=low)
        image = np.clip(image, 0, None) ** np.float32(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
        flows = flow_targets(labels, self.config)
        self.gen_seconds += time.perf_counter() - t0
        return {
            "image": normalize_percentile(image),
            "fg": (labels > 0).astype(np.float32),
            "flows": flows,
            "diameter": diameter,
            "stretch": factor,
        }

    def sample(self, rng, batch_size, patch):
        return _sample_patches(self.stacks, rng, batch_size, patch)


class _FolderPool:
    """Annotated stacks read from a folder, on the model's grid, with precomputed targets.

    The pool is fixed: ``ids`` are the stacks' file names, checked against a
    checkpoint's when training resumes.
    """

    def __init__(self, config, annotated, diameter, voxel_size, sparse=False):
        self.config, self.annotated, self.sparse = config, annotated, sparse
        self.diameter, self.voxel_size = diameter, voxel_size
        self.ids = [a.name for a in annotated]
        self.stacks, self.info, self.next_id, self.gen_seconds = [], [], len(annotated), 0.0

    def fill(self, ids=None, next_id=None):
        if ids is not None and list(ids) != self.ids:
            raise ValueError(f"the checkpoint was trained on {list(ids)}, the data now holds {self.ids}: resume "
                             "with the same training stacks")
        from .annotated import to_model_grid

        t0 = time.perf_counter()
        for stack in self.annotated:
            image, labels, background, info = to_model_grid(stack, self.config, diameter=self.diameter,
                                                            voxel_size=self.voxel_size)
            log.info("%s: cells %.1f voxels across, zoom %s to %s", info["name"], info["diameter"],
                     tuple(round(z, 3) for z in info["zoom"]), tuple(info["model_grid_shape"]))
            entry = {"image": normalize_percentile(image), "fg": (labels > 0).astype(np.float32),
                     "flows": flow_targets(labels, self.config)}
            if self.sparse or background is not None:
                entry |= sparse_entry(labels, background)
                info |= {"sparse": True, "known_fraction": float(entry["known"].mean())}
            self.stacks.append(entry)
            self.info.append(info)
        self.gen_seconds += time.perf_counter() - t0

    def refresh(self, step):
        pass  # annotated stacks are all there is; patches and augmentation vary, the stacks do not

    def sample(self, rng, batch_size, patch):
        return _sample_patches(self.stacks, rng, batch_size, patch)


def sparse_entry(labels, background=None):
    """What a sparsely annotated stack adds to its training entry.

    Returns
    -------
    dict
        ``known``: float32 map, 1 on the labelled cells and on `background`,
        0 on the unknown voxels the loss ignores; ``anchors``: flat indices
        of the labelled voxels, around which patches are drawn.
    """
    cells = labels > 0
    known = cells if background is None else cells | background
    return {"known": known.astype(np.float32), "anchors": np.flatnonzero(cells)}


def _sample_patches(stacks, rng, batch_size, patch):
    """A batch of random, augmented patches from `stacks` (dicts of image, fg and flows).

    A sparsely annotated stack (with ``known`` and ``anchors``, see
    :func:`sparse_entry`) gives patches holding a random labelled voxel at a
    random place, so the few cells drawn are seen in every context.

    Returns
    -------
    images, fgs, flows, known : torch.Tensor
        ``known`` weighs each voxel in the loss: 1, or 0 where a sparse
        annotation does not say.
    """
    images, fgs, flows, knowns = [], [], [], []
    for _ in range(batch_size):
        st = stacks[rng.integers(len(stacks))]
        shape = st["image"].shape
        if "anchors" in st:
            anchor = np.unravel_index(st["anchors"][rng.integers(len(st["anchors"]))], shape)
            starts = [int(np.clip(a - rng.integers(0, p), 0, max(0, s - p))) for a, s, p in zip(anchor, shape, patch)]
        else:
            starts = [int(rng.integers(0, max(1, s - p) + 1)) for s, p in zip(shape, patch)]
        sl = tuple(slice(a, a + p) for a, p in zip(starts, patch))
        img, fg, fl = st["image"][sl], st["fg"][sl], st["flows"][(slice(None),) + sl]
        known = st["known"][sl] if "known" in st else np.ones_like(fg)
        if img.shape != tuple(patch):  # stack smaller than the patch: zero-pad (background, unknown when sparse)
            pad = [(0, p - s) for p, s in zip(patch, img.shape)]
            img, fg = np.pad(img, pad), np.pad(fg, pad)
            known = np.pad(known, pad, constant_values=0.0 if "known" in st else 1.0)
            fl = np.pad(fl, [(0, 0)] + pad)
        flips = tuple(bool(b) for b in rng.random(3) < 0.5)
        (img, fg, known), fl = augment_geometry([img, fg, known], fl, flips=flips, swap_yx=bool(rng.random() < 0.5))
        img = _augment_intensity(img, rng)
        images.append(img)
        fgs.append(fg)
        flows.append(fl)
        knowns.append(known)
    return (
        torch.from_numpy(np.stack(images)[:, None]),
        torch.from_numpy(np.stack(fgs)),
        torch.from_numpy(np.stack(flows)),
        torch.from_numpy(np.stack(knowns)),
    )


def _augment_intensity(img, rng):
    """Random gamma, contrast, offset and Gaussian noise on a normalised patch."""
    img = np.clip(img, 0, None) ** np.float32(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
    img = img * np.float32(rng.uniform(0.7, 1.3)) + np.float32(rng.uniform(-0.1, 0.1))
    if rng.random() < 0.5:
        img = img + rng.normal(0, rng.uniform(0.0, 0.15), img.shape).astype(np.float32)
    return np.ascontiguousarray(img, dtype=np.float32)


# --------------------------------------------------------------------------- loss


def compute_loss(raw, fg, flows, known=None, *, flow_weight=5.0, background_weight=0.1):
    """Training loss on a raw network output.

    BCE (with logits) on the foreground channel, plus `flow_weight` times
    an MSE on the ``tanh`` flow channels in which foreground voxels weigh 1
    and background voxels `background_weight` (they should predict ~0).
    Both are means over the `known` voxels: those of a sparse annotation
    that it leaves unlabelled (``known`` 0) do not count.

    Returns
    -------
    total, bce, mse : torch.Tensor
    """
    if known is None:
        known = torch.ones_like(fg)
    bce_map = F.binary_cross_entropy_with_logits(raw[:, 3], fg, reduction="none")
    bce = (known * bce_map).sum() / known.sum().clamp_min(1.0)
    w = known * (fg + background_weight * (1.0 - fg))
    err = (torch.tanh(raw[:, :3]) - flows).pow(2).mean(dim=1)
    mse = (w * err).sum() / w.sum().clamp_min(1e-6)
    return bce + flow_weight * mse, bce, mse


def keep_loss(raw, teacher_raw, unknown, *, flow_weight=5.0, background_weight=0.1):
    """Loss pulling a network's output towards another's (`teacher_raw`) on the `unknown` voxels.

    The same terms as :func:`compute_loss`, with the teacher's foreground
    probability and flows as soft targets, weighted by `unknown` (1 where a
    sparse annotation does not say). Fine-tuning from a few cells with it
    keeps what the starting model did elsewhere, rather than forgetting it
    (learning without forgetting, Li & Hoiem 2017).
    """
    fg = torch.sigmoid(teacher_raw[:, 3])
    bce = (unknown * F.binary_cross_entropy_with_logits(raw[:, 3], fg, reduction="none")).sum()
    w = unknown * (fg + background_weight * (1.0 - fg))
    err = (torch.tanh(raw[:, :3]) - torch.tanh(teacher_raw[:, :3])).pow(2).mean(dim=1)
    n = unknown.sum().clamp_min(1.0)
    return bce / n + flow_weight * (w * err).sum() / w.sum().clamp_min(1e-6)


# --------------------------------------------------------------------------- training


def _lr_lambda(steps, warmup):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _find_checkpoint(resume):
    p = Path(resume)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise ValueError(f"no checkpoint to resume from at {p}")
    return p


def _check_same_network(other, config, source):
    """Refuse weights from `source` whose network or targets differ from `config`'s.

    Tile and patch sizes are run settings, not part of the network: a run may change them.
    """
    def network(c):
        return dataclasses.replace(c, tile_size=None, patch_size=config.patch_size)

    if network(other) != network(config):
        raise ValueError(f"{source} was made with a different configuration: {other.to_dict()} vs {config.to_dict()}")


def _lineage(init_dir):
    """The training runs behind the model in `init_dir`, from its model card (empty without one)."""
    card_path = Path(init_dir, "model_card.json")
    if not card_path.is_file():
        return []
    card = json.loads(card_path.read_text())
    if not isinstance(card.get("steps"), int):
        return []
    return card.get("lineage") or [{"steps": f"0-{card.get('steps')}", "command": card.get("command"),
                                    "validation": card.get("validation")}]


HOLD_OUT = 5  # without validate_data, one annotated stack in HOLD_OUT is kept for validation


def _annotated_sets(data, validate_data, mask_filter, validate_stacks, sparse=False):
    """Training and validation stacks: read from the `data` (and `validate_data`) folders, or given."""
    if data is None:
        return [], []
    from .annotated import AnnotatedStack, find_pairs, read_annotated

    def stacks_of(source):
        if isinstance(source, (str, os.PathLike)):
            return [read_annotated(*pair) for pair in find_pairs(source, mask_filter)]
        stacks = list(source)
        if not stacks or not all(isinstance(s, AnnotatedStack) for s in stacks):
            raise TypeError("data must be a folder or a non-empty sequence of cp3d.model.annotated.AnnotatedStack")
        return stacks

    stacks = stacks_of(data)
    if validate_data is not None:
        validation = stacks_of(validate_data)
        partial = [v.name for v in validation if v.background is not None]
        if partial:
            raise ValueError(f"validation needs whole annotations, but {', '.join(partial)} mark(s) background as "
                             "sparse annotations do")
        return stacks, validation
    if sparse or any(s.background is not None for s in stacks):
        if validate_stacks:
            log.info("sparse annotations: no stack held out for validation (pass validate_data, wholly annotated)")
        return stacks, []
    held = max(1, len(stacks) // HOLD_OUT) if validate_stacks and len(stacks) > 1 else 0
    if validate_stacks and not held:
        log.warning("one annotated stack only: training on it without validation (pass validate_data)")
    return stacks[: len(stacks) - held], stacks[len(stacks) - held :]


NETWORK_DEFAULTS = {"targets": "tanh", "base_features": 16, "depth": 3, "norm": "batch"}
DEFAULT_DIAMETERS = (7, 15)


def train(
    out_dir,
    *,
    targets=None,
    steps=1500,
    batch_size=2,
    patch_size=(48, 48, 48),
    lr=2e-3,
    weight_decay=1e-4,
    seed=0,
    device="auto",
    checkpoint_every=100,
    resume=None,
    init=None,
    data=None,
    mask_filter="_masks",
    voxel_size=None,
    diameter=None,
    validate_data=None,
    progress=True,
    diameters=None,
    n_stacks=8,
    stack_shape=None,
    refresh_every=20,
    noise=(0.02, 0.2),
    stretch=(0.75, 1.33),
    base_features=None,
    depth=None,
    norm=None,
    flow_weight=5.0,
    background_weight=0.1,
    num_threads=None,
    validate_stacks=4,
    log_every=10,
    command=None,
    kind="membrane",
    varied=False,
    sparse=False,
    keep_weight=1.0,
    callback=None,
):
    """Train a :class:`UNet3D` on synthetic membrane or nuclei stacks, or on annotated stacks of your own.

    Parameters
    ----------
    out_dir : path-like
        Receives ``checkpoint.pt`` (every `checkpoint_every` steps),
        ``train_log.jsonl`` and, at the end, ``config.json``, ``weights.pt``
        and ``model_card.json``.
    targets : {"tanh", "heat"}, optional
        Gradient formulation: :func:`cp3d.tanh_flows` or :func:`cp3d.heat_flows`;
        default that of `init`, else ``"tanh"``.
    steps : int
        Total optimiser steps (a resumed run continues up to this number).
    batch_size : int
        Patches per step.
    patch_size : int or tuple of 3 ints
        Patch shape (z, y, x); multiples of ``2**depth``.
    lr, weight_decay : float
        AdamW parameters; the learning rate warms up linearly over the first
        5% of the steps, then follows a cosine down to 5% of `lr`.
    seed : int
        Seeds the data, the augmentation and the network initialisation.
    device : {"auto"} or str
        ``"auto"``: CUDA when available, else the CPU.
    checkpoint_every : int
        Steps between checkpoints (model, optimiser, scheduler, step, RNG and
        data-pool state).
    init : str or path-like, optional
        Fine-tune: start from the weights of a trained model (a bundled
        name or a model directory) of the same network and targets, with a
        fresh optimiser and learning-rate schedule over `steps` new steps.
        The model card then counts the steps since random initialisation
        and carries the runs before it in ``lineage``.
    resume : path-like, optional
        A checkpoint file, or a directory holding ``checkpoint.pt``.
    data : path-like or sequence of AnnotatedStack, optional
        Train on the annotated stacks of this folder instead of synthetic
        ones: ``NAME.tif`` beside ``NAME_masks.tif`` (Cellpose's convention)
        and/or HDF5 files with ``raw`` and ``label`` datasets (see
        :mod:`cp3d.model.annotated`), or on the given
        :class:`~cp3d.model.annotated.AnnotatedStack` s. Each stack is resampled so its cells are
        ``train_diameter`` voxels across on the model's voxel grid, and
        random patches are drawn from them with the same augmentation as
        synthetic stacks. Without `validate_data`, one stack in five (at
        least one, none when there is only one stack or `validate_stacks`
        is 0) is held out for validation: the last ones by name; sparse
        annotations are never held out.
    mask_filter : str
        Suffix of the mask files' stems in `data` and `validate_data`.
    voxel_size : float or (float, float, float), optional
        Voxel size (z, y, x) of the stacks in `data`, overriding what their
        files record (isotropic when neither says); only ratios matter.
    diameter : float, optional
        Typical cell diameter of the stacks in `data`, in voxels along x;
        default: measured per stack, the median equivalent-sphere diameter
        of its masks (:func:`cp3d.metrics.median_diameter`).
    validate_data : path-like, optional
        Folder of annotated stacks to validate on (same layout as `data`);
        they are segmented with :func:`cp3d.segment` at their diameter and
        scored with :func:`cp3d.metrics.evaluate`.
    progress : bool
        Show a tqdm progress bar.
    diameters : (float, float), optional
        Range of cell diameters (voxels) of the synthetic stacks, default
        (7, 15); their geometric mean is the model's ``train_diameter``, the
        size annotated stacks are resampled to. Default with `init`: the
        training size of that model.
    n_stacks : int
        Stacks in the data pool.
    stack_shape : tuple of 3 ints, optional
        Shape of the synthetic stacks; default 1.5 x `patch_size`.
    refresh_every : int
        Steps between replacing one pool stack by a new one.
    noise : (float, float)
        Range of the ``noise`` level passed to :func:`cp3d.data.synthetic_stack`.
    stretch : (float, float)
        Range of the z-stretch factor applied (log-uniformly) to half the stacks.
    base_features, depth, norm : optional
        Architecture, see :class:`UNetConfig`; default that of `init` (or of
        the checkpoint `resume` continues), else 16, 3 and ``"batch"``.
    flow_weight, background_weight : float
        Loss weights, see :func:`compute_loss`.
    num_threads : int, optional
        Threads for torch and for Numba (whose pool is started first, since its start resets torch's count).
    validate_stacks : int
        Held-out synthetic stacks scored by :func:`validate` at the end (0 to
        skip; with `data`, 0 skips validation and trains on every stack).
    log_every : int
        Steps between lines of ``train_log.jsonl``.
    command : str, optional
        The command line that started the run, recorded in the model card.
    kind : {"membrane", "nuclei", "mixed"}
        Kind of synthetic stack trained and validated on (without `data`);
        ``"mixed"`` draws each stack as nuclei or as membranes, half and
        half, for one model of both stains, and validates on both.
        Nuclei stacks draw every rendering setting at random
        (:func:`cp3d.data.random_nuclei_options`, the noise from `noise`);
        membrane stacks use the generator's defaults but for the noise,
        unless `varied`.
    varied : bool
        Membranes: draw three in four synthetic stacks' rendering settings
        with :func:`cp3d.data.random_membrane_options` (wall thickness and
        patchiness, cytoplasm texture, wavy walls, PSF, anisotropy, noise up
        to 0.35, ...; their noise replaces `noise`), the rest with the
        defaults. Nuclei: draw every stack with
        ``random_nuclei_options(bright_background=True, glowing_walls=True)``,
        a bright, grainy background in four stacks of five, sparse to packed
        nuclei, no dim nuclei, and glowing cell walls in half: on real
        confocal crops that background and such walls were the cause of
        most false nuclei. Validate on plain and on varied stacks.
    sparse : bool
        The masks in `data` label only some cells: their unlabelled voxels
        are unknown and the loss ignores them, but for those a background
        mask marks (``NAME_background.tif`` or an HDF5 ``background``
        dataset). A stack with a background mask is read as sparse without
        it. Patches are drawn around the labelled cells, and their flows are
        exact: each cell's targets depend on that cell alone.
    keep_weight : float
        Sparse annotations with `init`: weight of :func:`keep_loss`, which
        pulls the unknown voxels towards the starting model's own output
        rather than leaving them out (0). From 5 corrected cells of a new
        kind, 300 steps gave AP@0.5 0.54 with it and 0.21 without, the
        model they started from 0.38 (``bench/bench_sparse.py``): without
        it the network forgets what the few cells do not show. Unused
        without `init` or sparse stacks.
    callback : callable, optional
        Called after every step with a dict (``step``, ``steps``, ``loss``,
        ``bce``, ``flow_mse``); when it returns True, training stops there
        and the model is saved as it is (its card says so).

    Returns
    -------
    UNet3D
        The trained network, in eval mode.
    """
    arguments = {k: v for k, v in locals().items()}
    arguments["out_dir"] = str(out_dir)
    arguments["resume"] = None if resume is None else str(resume)
    arguments["init"] = None if init is None else str(init)
    arguments["data"] = None if data is None else str(data) if isinstance(data, (str, os.PathLike)) else [
        getattr(s, "name", None) for s in data]
    arguments["validate_data"] = None if validate_data is None else str(validate_data) if isinstance(
        validate_data, (str, os.PathLike)) else [getattr(s, "name", None) for s in validate_data]
    arguments["callback"] = None if callback is None else repr(callback)
    if init is not None and resume is not None:
        raise ValueError("pass init (start a new run from trained weights) or resume (continue a run), not both")
    if validate_data is not None and data is None:
        raise ValueError("validate_data needs data: the synthetic runs validate on synthetic stacks")
    if kind not in TRAIN_KINDS:
        raise ValueError(f"kind must be one of {TRAIN_KINDS}, got {kind!r}")
    if data is not None and kind != "membrane":
        raise ValueError(f"kind={kind!r} chooses synthetic stacks; with data the stacks are the annotated ones")
    if varied and data is not None:
        raise ValueError("varied applies to synthetic stacks (annotated data is what it is)")
    if sparse and data is None:
        raise ValueError("sparse applies to annotated data (pass data)")
    if not (np.isfinite(keep_weight) and keep_weight >= 0):
        raise ValueError(f"keep_weight must be >= 0, got {keep_weight!r}")
    if diameter is not None and not (np.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be positive and finite, got {diameter!r}")
    if voxel_size is not None:
        voxel_size = as_triple(voxel_size, "voxel_size")
    train_set, validation_set = _annotated_sets(data, validate_data, mask_filter, validate_stacks, sparse)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if num_threads is not None:
        start_numba_pool()  # its start would reset the count set for torch below
        numba.set_num_threads(min(int(num_threads), numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(int(num_threads))
    if not (isinstance(steps, int) and steps >= 1 and isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError("steps and batch_size must be positive ints")
    dev = resolve_device(device)
    ck = None
    if resume is not None:
        ck_path = _find_checkpoint(resume)
        try:
            ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"cannot read checkpoint {ck_path}: {e}") from e
    # a run takes the network of the model it starts from or of the checkpoint it resumes, unless told otherwise
    # (and refused below if it differs)
    init_dir = None if init is None else resolve_model_dir(init)
    start = None if init is None else load_model(init_dir)
    start_config = start.config if start is not None else UNetConfig.from_dict(ck["config"]) if ck else None
    network = {key: value if value is not None else getattr(start_config, key) if start_config else
               NETWORK_DEFAULTS[key] for key, value in (("targets", targets), ("base_features", base_features),
                                                        ("depth", depth), ("norm", norm))}
    if diameters is not None:
        train_diameter = float(np.sqrt(diameters[0] * diameters[1]))
    else:
        diameters = DEFAULT_DIAMETERS
        train_diameter = start_config.train_diameter if start_config else float(np.sqrt(diameters[0] * diameters[1]))
    config = UNetConfig(**network, patch_size=patch_size, train_diameter=train_diameter,
                        **({"tanh_scale": start_config.tanh_scale} if start_config else {}))
    targets = config.targets
    patch = config.patch_size
    if stack_shape is None:
        stack_shape = tuple(int(math.ceil(1.5 * p)) for p in patch)
    torch.manual_seed(seed)
    model = UNet3D(config).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, min(100, steps // 20))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    rng = np.random.default_rng([seed, 1])
    if data is None:
        pool = _StackPool(config, seed, diameters, n_stacks, stack_shape, noise, stretch, refresh_every, kind,
                          varied)
    else:
        pool = _FolderPool(config, train_set, diameter, voxel_size, sparse)
    step, history = 0, []
    steps_before, lineage = 0, []  # of the model a fine-tuning run starts from

    if ck is not None:
        _check_same_network(UNetConfig.from_dict(ck["config"]), config, f"checkpoint {ck_path}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, history = ck["step"], ck["history"]
        steps_before, lineage = ck.get("steps_before", 0), ck.get("lineage", [])
        rng.bit_generator.state = ck["rng"]["numpy"]
        torch.set_rng_state(ck["rng"]["torch"])
        pool.fill(ck["pool"]["ids"], ck["pool"]["next_id"])
        log.info("resumed from %s at step %d", ck_path, step)
    else:
        pool.fill()
    if start is not None:
        _check_same_network(start.config, config, f"model {init_dir}")
        model.load_state_dict(start.state_dict())
        lineage = _lineage(init_dir)
        steps_before = int(str(lineage[-1]["steps"]).split("-")[-1]) if lineage else 0
    teacher = None
    # the model a fine-tuning run started from (a resumed run reads it from its checkpoint's arguments)
    source = init if init is not None else ck["arguments"].get("init") if ck is not None else None
    if keep_weight and source is not None and any("known" in stack for stack in pool.stacks):
        teacher = start.to(dev) if start is not None else load_model(resolve_model_dir(source), device=dev)

    def checkpoint():
        ck = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "history": history,
            "config": config.to_dict(),
            "arguments": arguments,
            "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()},
            "pool": {"ids": list(pool.ids), "next_id": pool.next_id},
            "steps_before": steps_before,
            "lineage": lineage,
        }
        atomic_write(out_dir / CHECKPOINT_NAME, lambda fh: torch.save(ck, fh))

    log_path = out_dir / "train_log.jsonl"
    model.train()
    t_start = time.perf_counter()
    start_step = step
    bar = tqdm(total=steps, initial=step, desc=f"train {targets}", unit="step", disable=not progress, mininterval=5)
    with open(log_path, "a") as log_file:
        while step < steps:
            pool.refresh(step)
            x, fg, fl, known = (t.to(dev) for t in pool.sample(rng, batch_size, patch))
            raw = model(x)
            loss, bce, mse = compute_loss(raw, fg, fl, known, flow_weight=flow_weight,
                                          background_weight=background_weight)
            if teacher is not None:
                with torch.no_grad():
                    teacher_raw = teacher(x)
                loss = loss + keep_weight * keep_loss(raw, teacher_raw, 1.0 - known, flow_weight=flow_weight,
                                                      background_weight=background_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            step += 1
            history.append([loss.item(), bce.item(), mse.item()])
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1][0]:.4f}", bce=f"{history[-1][1]:.3f}", mse=f"{history[-1][2]:.4f}", refresh=False)
            if step % log_every == 0 or step == steps:
                recent = np.mean(history[-log_every:], axis=0)
                elapsed = time.perf_counter() - t_start
                log_file.write(json.dumps({
                    "step": step, "loss": recent[0], "bce": recent[1], "flow_mse": recent[2],
                    "lr": sched.get_last_lr()[0], "sec_per_step": elapsed / (step - start_step),
                    "data_gen_seconds": pool.gen_seconds, "elapsed_s": elapsed,
                }) + "\n")
                log_file.flush()
            stop = bool(callback and callback({"step": step, "steps": steps, "loss": history[-1][0],
                                                "bce": history[-1][1], "flow_mse": history[-1][2]}))
            if checkpoint_every and (step % checkpoint_every == 0 or step == steps or stop):
                checkpoint()
            if stop:
                log.info("stopped at step %d of %d", step, steps)
                break
    bar.close()
    elapsed = time.perf_counter() - t_start

    model.eval()
    save_model(model, out_dir)
    tail = np.mean(history[-min(50, len(history)):], axis=0)
    card = {
        "command": command,
        "call": "cp3d.model.train(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")",
        "arguments": arguments,
        "config": config.to_dict(),
        "data": {
            "generator": f"cp3d.data.synthetic_stack(kind={kind!r})" if kind != "mixed" else
            f"cp3d.data.synthetic_stack(kind='nuclei') for {MIXED_NUCLEI_SHARE:.0%} of the stacks, "
            "kind='membrane' for the rest",
            **{f"options_{k}" if kind == "mixed" else "options": _pool_options(k, varied)
               for k in (KINDS if kind == "mixed" else (kind,))},
            **({"varied": True, "varied_option_ranges": _membrane_ranges()} if varied and kind != "nuclei"
               else {"varied": True} if varied else {}),
            "diameters": list(diameters), "n_stacks": n_stacks, "stack_shape": list(stack_shape),
            "refresh_every": refresh_every, "noise": list(noise), "z_stretch": list(stretch),
            "augmentation": "flips (flow channel negated), y<->x swap (flow channels swapped), z-stretch of "
            "half the stacks with targets recomputed, dim cells, gamma, contrast/offset, Gaussian noise",
            "stacks_generated": pool.next_id,
        } if data is None else {
            "folder": arguments["data"], "mask_filter": mask_filter, "stacks": pool.info,
            "sparse": any(info.get("sparse", False) for info in pool.info),
            "keep": None if teacher is None else {"weight": keep_weight, "starting_model": str(source)},
            "validation_folder": arguments["validate_data"],
            "validation_stacks": [v.name for v in validation_set],
            "augmentation": "flips (flow channel negated), y<->x swap (flow channels swapped), gamma, "
            "contrast/offset, Gaussian noise",
        },
        "steps": steps_before + step,
        **({"stopped_at": step} if step < steps else {}),
        "final_losses": {"loss": tail[0], "bce": tail[1], "flow_mse": tail[2], "averaged_over_steps": min(50, len(history))},
        "seconds_per_step": elapsed / max(1, step - start_step),
        "n_parameters": model.n_parameters,
        "device": str(dev),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "validation": None,
    }
    if lineage:
        card["lineage"] = lineage + [{"steps": f"{steps_before}-{steps_before + step}", "command": command}]
    _write_card(out_dir, card)
    if validate_stacks and (data is None or validation_set):
        # score the saved (float16) weights, i.e. what users will load
        saved = load_model(out_dir, device=dev)
        if data is None:
            for key, set_kind, set_varied in validation_sets(kind, varied):
                card[key] = validate(saved, n_stacks=validate_stacks, kind=set_kind, varied=set_varied,
                                     progress=progress)
                if lineage:
                    card["lineage"][-1][key] = {k: card[key][k] for k in ("mean_dice", "mean_ap50")}
        else:
            card["validation"] = validate_annotated(saved, validation_set, diameter=diameter, voxel_size=voxel_size)
            if lineage:
                card["lineage"][-1]["validation"] = {k: card["validation"][k] for k in ("mean_dice", "mean_ap50")}
        _write_card(out_dir, card)
    return model


def _pool_options(kind, varied):
    """How the training pool draws the rendering settings of a stack of `kind`, as the model card records it."""
    if kind == "nuclei":
        return (f"cp3d.data.random_nuclei_options(rng, bright_background={bool(varied)}, "
                f"glowing_walls={bool(varied)}), noise from 'noise'")
    if varied:
        return (f"{VARIED_SHARE:.0%} of the stacks cp3d.data.random_membrane_options(rng, settings_share="
                f"{VARIED_SETTINGS_SHARE}) (noise from its range when drawn), the rest defaults, noise from 'noise'")
    return "defaults, noise from 'noise'"


def validation_sets(kind, varied):
    """The held-out synthetic sets a model trained on `kind` is scored on: ``(card key, kind, varied)``.

    Examples
    --------
    >>> from cp3d.model.train import validation_sets
    >>> validation_sets("mixed", True)
    [('validation', 'membrane', False), ('validation_varied', 'membrane', True), ('validation_nuclei', 'nuclei', True)]
    """
    if kind == "mixed":
        return validation_sets("membrane", varied) + [("validation_nuclei", "nuclei", varied)]
    return [("validation", kind, False)] + ([("validation_varied", kind, True)] if varied else [])


def _membrane_ranges():
    """`cp3d.data.MEMBRANE_OPTION_RANGES` as the model card records them."""
    from ..data import MEMBRANE_OPTION_RANGES

    shares = {"share_of_stacks": VARIED_SHARE, "settings_share": VARIED_SETTINGS_SHARE}
    return {k: list(v) for k, v in MEMBRANE_OPTION_RANGES.items()} | shares


def _write_card(out_dir, card):
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, (tuple, Path)):
            return list(o) if isinstance(o, tuple) else str(o)
        return repr(o)

    text = json.dumps(card, indent=2, default=default) + "\n"
    atomic_write(Path(out_dir, "model_card.json"), lambda fh: fh.write(text.encode()))


# --------------------------------------------------------------------------- validation


def _score(result, *names):
    for n in names:
        if isinstance(result, dict) and n in result:
            return float(result[n])
        if hasattr(result, n):
            return float(getattr(result, n))
    raise KeyError(f"cp3d.metrics.evaluate result has none of {names}: {result!r}")


def validate(model, *, n_stacks=4, diameters=(8, 14), shape=(64, 96, 96), noise=(0.03, 0.17), kind="membrane",
             varied=False, progress=False):
    """Score `model` on held-out synthetic membrane (or nuclei) stacks.

    Stack ``i`` has seed ``10**9 + i`` (never used in training), a diameter
    evenly spaced in `diameters` and a noise level evenly spaced in `noise`.
    Nuclei stacks (``kind="nuclei"``) draw their other rendering settings
    with :func:`cp3d.data.random_nuclei_options` from the same seed (with
    `varied`, its out-of-focus light); so do membrane stacks with `varied`, by
    :func:`cp3d.data.random_membrane_options`, their noise level included.
    The network output (one pass, no test-time augmentation) goes through
    :func:`cp3d.reconstruct` with the true diameter and is scored by :func:`cp3d.metrics.evaluate`.

    Returns
    -------
    dict
        ``mean_dice``, ``mean_ap50`` and a per-stack list.
    """
    import cp3d
    import cp3d.data
    import cp3d.metrics

    per_stack = []
    for i in range(n_stacks):
        t = i / max(1, n_stacks - 1)
        d = float(diameters[0] + t * (diameters[1] - diameters[0]))
        nz = float(noise[0] + t * (noise[1] - noise[0]))
        options = {"noise": nz}
        if kind == "nuclei":
            options = dict(cp3d.data.random_nuclei_options(np.random.default_rng(VALIDATION_SEED + i),
                                                           bright_background=varied), noise=nz)
        elif varied:
            options = cp3d.data.random_membrane_options(np.random.default_rng(VALIDATION_SEED + i))
            nz = options["noise"]
        image, gt = cp3d.data.synthetic_stack(shape, d, kind=kind, seed=VALIDATION_SEED + i, **options)
        # one network pass: the score follows the network itself, comparable across training runs
        pred = predict(image, model, augment=False, progress=progress)
        # the model's own formulation: reconstruct's default tanh scale (d / 2) assumes
        # images rescaled to the training diameter, which these stacks are not
        labels = cp3d.reconstruct(
            pred.flows, pred.foreground, diameter=d, targets=model.config.targets, tanh_scale=model.config.tanh_scale
        )
        labels = getattr(labels, "labels", labels)
        res = cp3d.metrics.evaluate(gt, np.asarray(labels))
        per_stack.append({
            "seed": VALIDATION_SEED + i, "diameter": d, "noise": nz,
            "dice": _score(res, "dice", "mean_dice"),
            "ap50": _score(res, "ap50", "ap_50", "AP50", "ap@0.5", "average_precision_50"),
            "n_true": int(len(np.unique(gt)) - 1), "n_pred": int(len(np.unique(labels)) - 1),
        })
    return {
        "mean_dice": float(np.mean([s["dice"] for s in per_stack])),
        "mean_ap50": float(np.mean([s["ap50"] for s in per_stack])),
        "shape": list(shape), "kind": kind, "varied": bool(varied), "stacks": per_stack,
    }


def validate_annotated(model, stacks, *, diameter=None, voxel_size=None):
    """Score `model` on annotated stacks (:class:`cp3d.model.annotated.AnnotatedStack`).

    Each stack is segmented by :func:`cp3d.segment` (one network pass) at
    `diameter`, default its masks' median equivalent-sphere diameter, and
    `voxel_size`, default the one its file records, then scored by
    :func:`cp3d.metrics.evaluate`.

    Returns
    -------
    dict
        ``mean_dice``, ``mean_ap50`` and a per-stack list.
    """
    import cp3d
    import cp3d.metrics

    per_stack = []
    for stack in stacks:
        vs = voxel_size if voxel_size is not None else stack.voxel_size
        d = cp3d.metrics.median_diameter(stack.labels, vs) if diameter is None else float(diameter)
        labels = cp3d.segment(stack.image, model, diameter=d, voxel_size=vs, augment=False).labels
        res = cp3d.metrics.evaluate(stack.labels, labels)
        per_stack.append({"name": stack.name, "diameter": d, "dice": float(res["dice"]), "ap50": float(res["ap50"]),
                          "n_true": int(res["n_gt"]), "n_pred": int(res["n_pred"])})
    return {
        "mean_dice": float(np.mean([s["dice"] for s in per_stack])),
        "mean_ap50": float(np.mean([s["ap50"] for s in per_stack])),
        "stacks": per_stack,
    }


# --------------------------------------------------------------------------- command line


def check_out_dir(out_dir, *, init=None, resume=None, overwrite=False):
    """Check, before any work, that a training run may write its model into `out_dir`.

    Never a file, never a bundled model's folder nor the folder of `init`,
    always writable; a folder that holds a trained model (or a checkpoint)
    only with `overwrite` or when the run resumes. The files themselves are
    checked as :func:`cp3d.io.check_outputs` checks any output.
    """
    from ..io import check_outputs

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"OUT_DIR {str(out)!r} is a file; give a folder for the trained model")
    real = Path(os.path.realpath(out))
    if real == WEIGHTS_DIR or WEIGHTS_DIR in real.parents:
        raise ValueError(f"OUT_DIR {str(out)!r} is inside the bundled models' folder; train into a folder of your own")
    if init is not None and real == Path(os.path.realpath(resolve_model_dir(init))):
        raise ValueError(f"OUT_DIR {str(out)!r} is the folder of --init {init!r}; train into another folder")
    if not out.exists():
        parent = next(p for p in real.parents if p.exists())
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot create OUT_DIR {str(out)!r}: {str(parent)!r} is not writable")
        return
    trained = [name for name in (WEIGHTS_NAME, CONFIG_NAME, CHECKPOINT_NAME) if (out / name).exists()]
    if trained and not overwrite and resume is None:
        raise FileExistsError(f"OUT_DIR {str(out)!r} holds a trained model ({', '.join(trained)}); pass --overwrite "
                              "to replace it or --resume to continue its training")
    check_outputs([out / name for name in (WEIGHTS_NAME, CONFIG_NAME, CHECKPOINT_NAME, "model_card.json")],
                  overwrite=True)


def _parse_pair(s, typ=float):
    vals = [typ(v) for v in s.split(",")]
    return tuple(vals)


def main(argv=None, prog="cp3d train"):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=prog, description="Train a cp3d UNet3D on synthetic stacks, or on annotated "
                                "stacks of your own (--data).")
    p.add_argument("out_dir")
    p.add_argument("--targets", choices=("tanh", "heat"), default=None,
                   help="gradient formulation (default: that of --init, else tanh)")
    p.add_argument("--kind", choices=TRAIN_KINDS, default="membrane",
                   help="synthetic stacks to train and validate on (default membrane); mixed: half nuclei, half "
                        "membranes, one model for both stains")
    p.add_argument("--varied", action="store_true",
                   help="membranes: draw 3 in 4 stacks' rendering settings with cp3d.data.random_membrane_options "
                        "(thick, patchy walls, textured cells, wider PSF and noise); nuclei: every stack on a "
                        "bright, grainy background (4 in 5), sparse to packed, no dim nuclei, glowing cell walls "
                        "in half (random_nuclei_options(bright_background=True, glowing_walls=True)); validate on "
                        "plain and varied")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch-size", type=lambda s: _parse_pair(s, int), default=(48, 48, 48), help="z,y,x")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", default=None, help="continue the run whose checkpoint is in this folder")
    p.add_argument("--init", default=None, help="fine-tune: start from this trained model (bundled name or folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already trained in OUT_DIR")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="train on the annotated stacks of DIR: NAME.tif beside NAME_masks.tif, and/or HDF5 files "
                        "with 'raw' and 'label' datasets")
    p.add_argument("--mask-filter", default="_masks", help="suffix of the mask files' names (default _masks)")
    p.add_argument("--sparse", action="store_true",
                   help="the --data masks label only some cells: unlabelled voxels are ignored by the loss unless "
                        "NAME_background.tif (or an HDF5 'background' dataset) marks them background; a stack with "
                        "such a mask is sparse without this flag")
    p.add_argument("--voxel-size", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="voxel size of the --data stacks (default: read from the files, else isotropic)")
    p.add_argument("--diameter", type=float, default=None,
                   help="cell diameter of the --data stacks in voxels along x (default: measured from each "
                        "stack's masks)")
    p.add_argument("--keep-weight", type=float, default=1.0,
                   help="with --sparse and --init: weight of the loss that keeps the starting model's output on "
                        "the unknown voxels (default 1; 0 leaves them out)")
    p.add_argument("--validate-data", default=None, metavar="DIR",
                   help="annotated stacks to validate on (default: hold out one --data stack in five)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--diameters", type=_parse_pair, default=None,
                   help="min,max cell diameter of the synthetic stacks (default 7,15; with --init, that model's "
                        "training size)")
    p.add_argument("--noise", type=_parse_pair, default=(0.02, 0.2),
                   help="min,max noise level of the synthetic stacks (Poisson with 1/noise^2 photons at the peak)")
    p.add_argument("--n-stacks", type=int, default=8)
    p.add_argument("--refresh-every", type=int, default=20)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--validate-stacks", type=int, default=4)
    p.add_argument("--validate-only", action="store_true",
                   help="score the model in OUT_DIR (on --validate-data if given) and update its card")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    if a.validate_only:
        model = load_model(a.out_dir)
        if a.validate_data is not None:
            _, stacks = _annotated_sets(a.data or a.validate_data, a.validate_data, a.mask_filter, 1)
            scores = validate_annotated(model, stacks, diameter=a.diameter, voxel_size=a.voxel_size)
        else:
            scores = {key: validate(model, n_stacks=a.validate_stacks or 4, kind=set_kind, varied=set_varied,
                                    progress=not a.no_progress)
                      for key, set_kind, set_varied in validation_sets(a.kind, a.varied)}
        card_path = Path(a.out_dir, "model_card.json")
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        card.update(scores if a.validate_data is None else {"validation": scores})
        _write_card(a.out_dir, card)
        print(json.dumps(scores, indent=2))
        return
    check_out_dir(a.out_dir, init=a.init, resume=a.resume, overwrite=a.overwrite)
    train(
        a.out_dir, targets=a.targets, steps=a.steps, batch_size=a.batch_size, patch_size=a.patch_size,
        lr=a.lr, seed=a.seed, device=a.device, checkpoint_every=a.checkpoint_every, resume=a.resume, init=a.init,
        data=a.data, mask_filter=a.mask_filter, voxel_size=a.voxel_size, diameter=a.diameter,
        validate_data=a.validate_data,
        progress=not a.no_progress, diameters=a.diameters, n_stacks=a.n_stacks, noise=a.noise,
        refresh_every=a.refresh_every, num_threads=a.num_threads, validate_stacks=a.validate_stacks,
        command=" ".join([prog] + argv), kind=a.kind, varied=a.varied, sparse=a.sparse,
        keep_weight=a.keep_weight,
    )


if __name__ == "__main__":
    main()
