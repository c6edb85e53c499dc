"""Synthetic 3D stacks with known instance labels.

`synthetic_stack` draws a phantom with ground-truth labels for tests,
benchmarks and training without downloading data:

* ``kind="membrane"``: a confocal-like shoot-meristem phantom. Cells tile a
  dome-shaped specimen; their walls are bright, interiors faint, the
  background empty; optionally thick, patchy or broken walls, wavy cell
  outlines, cytoplasm texture with bright organelles.
* ``kind="nuclei"``: packed, touching ellipsoidal nuclei with filled, bright
  interiors; optionally elongated, irregular, sparser or denser, with
  chromatin texture and dim nucleoli.

Both share one imaging model: an anisotropic Gaussian PSF (wider in z),
intensity falling with depth, some dim cells, an optional uneven background
haze, an optional intensity non-linearity, Poisson + Gaussian noise.
:func:`random_nuclei_options` and :func:`random_membrane_options` draw the
varied settings the bundled nuclei and membrane models are trained on.
Only NumPy and SciPy are used.
"""

import logging
import math
import numbers
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ._backend import as_triple
from .group import relabel_by_first_voxel

logger = logging.getLogger(__name__)

KINDS = ("membrane", "nuclei")

# Lloyd relaxation of the random seeds: enough sample points per seed and
# iterations to spread the seeds evenly (no slivers) while keeping them random.
_LLOYD_SAMPLES_PER_SEED = 12
_LLOYD_ITERATIONS = 4
# Power-diagram weights, in units of the squared seed spacing: they give the
# membrane cells a realistic spread of sizes around the requested one.
_POWER_WEIGHT_SPREAD = 0.2
# Nuclei: each seed's Voronoi cell is larger than a nucleus so that there is
# room between them, and its ellipsoid slightly overlaps the cell faces so
# that neighbours touch. Calibrated so the median nucleus matches the
# requested diameter.
_NUCLEI_CELL_VOLUME = 1.35
_NUCLEI_RADIUS = 0.56
# Membrane cells: relative brightness of the cytoplasm compared to the wall.
_INTERIOR_LEVEL = 0.08
# 6-connectivity, the one that defines a cell's pieces and its walls.
_FACES = ndimage.generate_binary_structure(3, 1)
# random_nuclei_options(wide=True): the brightest out-of-focus light, against about 1 for the nuclei.
_WIDE_OUT_OF_FOCUS = 0.6
# random_nuclei_options(bright_background=True): the brightest haze against about 1 for the nuclei, the share of
# the stacks that have one, and the sparsest packing drawn (about a fifth of the stack in nuclei).
_BRIGHT_BACKGROUND = 0.6
_BRIGHT_BACKGROUND_SHARE = 0.8
_SPARSE_DENSITY = 0.2
# glowing walls in nuclear stains: the cells around the nuclei are this many nucleus diameters across, their walls
# bent as irregular membrane cells' and up to this many voxels thick
_GLOWING_WALL_CELLS = 2.0
_GLOWING_WALL_BEND = 0.5
_GLOWING_WALL_THICKNESS = 3.0
_GLOWING_WALL_SHARE = 0.5  # of the stacks random_nuclei_options(glowing_walls=True) draws them in
_GLOWING_WALL_LEVEL = (0.3, 1.5)
# and its grain: blotches 0.1 to 0.55 diameters across. A smooth haze of the same brightness taught the nuclei model
# little (on the real crops the background it called foreground fell from 30 % / 54 % to 22 % / 43 %, against
# 7 % / 15 % with the grain).
_BRIGHT_BACKGROUND_GRAIN = (0.5, 1.0)
# Out-of-focus nuclei: their blur in cell diameters, across and along z.
_OUT_OF_FOCUS_BLUR = 0.25
_OUT_OF_FOCUS_BLUR_Z = 0.5
# Gaussian read noise relative to the Poisson noise at peak intensity.
_READ_NOISE_RATIO = 0.5
# Nuclei: spread (standard deviation of the log) of the semi-axes by default.
_NUCLEI_ELONGATION = 0.12
# Smooth random fields, their correlation length in cell diameters: the
# outline of an irregular nucleus, chromatin or cytoplasm grain, background
# haze, the bends of irregular membrane walls, patches of wall brightness.
_OUTLINE_SCALE = 0.2
_CHROMATIN_SCALE = 0.06
_HAZE_SCALE = 1.0
# Background haze: its spread (standard deviation over the mean) when smooth and when grainy
# (background_grain=1), and the share of its correlation length that full grain takes away.
_HAZE_SPREAD = 0.5
_GRAINY_HAZE_SPREAD = 0.9
_GRAIN_SCALE_CUT = 0.9
_WALL_BEND_SCALE = 0.5
_PATCH_SCALE = 0.4
# Irregular membrane cells: typical (one standard deviation) shift of the walls, in seed spacings, at
# irregularity 1.
_WALL_BEND = 0.35
# Patchy walls: spread of the wall brightness at patchiness 1; where it falls
# below zero (about a tenth of the wall) the wall has a gap.
_PATCH_SPREAD = 0.8
# Cytoplasm: spread of the log of the interior brightness at texture 1;
# organelles: radius in cell diameters (at least a voxel), number per cell,
# brightness relative to the wall at texture 1.
_CYTOPLASM_SPREAD = 0.5
_ORGANELLE_RADIUS = 0.07
_ORGANELLES_PER_CELL = 2.0
_ORGANELLE_LEVEL = 0.6
# Nucleoli: radius in cell diameters, number per nucleus, brightness left at
# full texture.
_NUCLEOLUS_RADIUS = 0.13
_NUCLEOLI_PER_NUCLEUS = 1.5
_NUCLEOLUS_LEVEL = 0.35


# The ranges random_membrane_options draws from (recorded in the model card of a model trained on them).
MEMBRANE_OPTION_RANGES = {
    "anisotropy_z": (0.6, 2.0),
    "noise": (0.02, 0.35),
    "psf_sigma_z": (1.0, 3.5),
    "psf_sigma_yx": (0.5, 1.6),
    "depth_attenuation": (0.0, 0.85),
    "dim_fraction": (0.0, 0.45),
    "background": (0.0, 0.3),
    "irregularity": (0.0, 0.6),
    "texture": (0.0, 1.0),
    "wall_thickness": (1.0, 3.5),
    "patchiness": (0.0, 1.0),
    "gamma": (0.5, 1.6),
}


class SyntheticStack(NamedTuple):
    """A synthetic image with its ground-truth labels.

    Attributes
    ----------
    image : numpy.ndarray
        ``(Z, Y, X)`` float32 in [0, 1].
    labels : numpy.ndarray
        ``(Z, Y, X)`` uint32, ids 1..N, 0 for background.
    """

    image: np.ndarray
    labels: np.ndarray


def synthetic_stack(
    shape,
    cell_diameter,
    *,
    anisotropy=(1.0, 1.0, 1.0),
    kind="membrane",
    seed=0,
    noise=0.1,
    psf_sigma=(2.0, 0.8, 0.8),
    depth_attenuation=0.5,
    dim_fraction=0.15,
    background=0.0,
    elongation=None,
    irregularity=0.0,
    density=1.0,
    texture=0.0,
    wall_thickness=1.0,
    patchiness=0.0,
    gamma=1.0,
    out_of_focus=0.0,
    background_grain=0.0,
    glowing_walls=0.0,
):
    """Draw a synthetic 3D stack of cells and its instance labels.

    Parameters
    ----------
    shape : sequence of 3 int
        ``(Z, Y, X)`` size of the stack in voxels.
    cell_diameter : float
        Typical cell diameter in voxels, as the diameter of the sphere of
        equal volume, ``(6 V / pi) ** (1/3)``. The median cell matches it
        to within about 10 %. At least 3 voxels.
    anisotropy : float or sequence of 3 float, optional
        Per-axis stretch of the cells ``(z, y, x)``: ``(2, 1, 1)`` makes the
        cells twice as long along z as along y and x. Only the ratios matter;
        the cell volume follows `cell_diameter`.
    kind : {"membrane", "nuclei"}, optional
        ``"membrane"``: cells tiling a dome-shaped specimen, bright walls,
        dark background outside the dome. ``"nuclei"``: packed, touching,
        filled ellipsoidal nuclei filling the stack.
    seed : int or numpy.random.SeedSequence, optional
        Seed for `numpy.random.default_rng`; the same seed gives identical
        arrays.
    noise : float, optional
        Noise level: the relative Poisson noise at peak intensity (the peak
        collects ``1 / noise**2`` photons), plus Gaussian read noise of
        standard deviation ``noise / 2``. 0 gives a clean image.
    psf_sigma : float or sequence of 3 float, optional
        Standard deviations ``(z, y, x)`` of the Gaussian PSF in voxels;
        0 disables the blur along an axis.
    depth_attenuation : float, optional
        Fraction of the intensity lost at the deepest plane (``z = Z - 1``)
        relative to the top one, in [0, 1).
    dim_fraction : float, optional
        Fraction of cells, in [0, 1], shown at 30 % of the usual brightness.
    background : float, optional
        Brightness, in [0, 1), of an uneven haze outside the cells relative
        to a typical cell (out-of-focus light, autofluorescence). 0 leaves
        the background dark.
    background_grain : float, optional
        How grainy that haze is, in [0, 1]. 0 varies it smoothly, by about
        50 % over a cell diameter; 1 varies it by about 90 % over a tenth of
        a diameter: blotches of the nuclei's size and smaller, as the
        cytoplasm and autofluorescence between real nuclei show.
    glowing_walls : float, optional
        Nuclei only: brightness (relative to the nuclei) of the walls of the
        cells around the nuclei, in [0, 1.5], default 0 (none). Plant cell
        walls are autofluorescent and show in a nuclear stain of tissue as
        bright streaks and sheets between the nuclei: here the walls of
        cells two nuclei across, bent, 1 to 3 voxels thick, glowing in
        patches up to this level, outside the nuclei.
    elongation : float, optional
        Nuclei only: standard deviation of the log of a nucleus' three
        semi-axes (their product stays fixed), default 0.12. 0.3 gives many
        nuclei twice as long as wide. Nuclei are oriented at random.
    irregularity : float, optional
        Roughness of the outlines in [0, 1). Nuclei: a smooth random field
        bends each ellipsoid into a lobed, irregular shape. Membranes: a
        smooth random displacement bends the walls, giving wavy, less
        convex cells. 0 keeps plain ellipsoids and flat walls.
    density : float, optional
        Nuclei only: number of nuclei per volume relative to the default
        packing, in [0.2, 1.5]. Below 1 the nuclei keep their size and
        stand apart more; above 1 they are packed tighter, flattened
        against each other and smaller than `cell_diameter`.
    texture : float, optional
        Strength in [0, 1] of the interior texture. Nuclei: chromatin (a
        grainy, bright-spotted interior) and dim nucleoli. Membranes: a
        grainy cytoplasm and bright organelle spots inside the cells. 0
        gives even interiors.
    wall_thickness : float, optional
        Membranes only: thickness of the walls in voxels, in [1, 8], before
        the PSF blur. 1 is the one-voxel wall on either side of a cell face.
    patchiness : float, optional
        Membranes only: in [0, 1], how unevenly bright the walls are along
        their surface (a smooth random field); from about 0.6 on, the
        faintest patches become gaps in the wall. 0 gives even walls.
    gamma : float, optional
        Intensity non-linearity in [0.2, 5]: the blurred, attenuated signal
        (scaled to a peak of 1) is raised to `gamma` before the noise, as a
        non-linear detector or display curve would. 1 leaves it linear.
    out_of_focus : float, optional
        Nuclei only: peak brightness, in [0, 1), of unlabelled nuclei out of
        the focal plane, relative to a typical nucleus: nucleus-shaped blobs
        in the gaps, blurred over a quarter of a diameter across and half of
        one along z, as real stacks show the light of nuclei above and below
        the section. 0 adds none.

    Returns
    -------
    SyntheticStack
        Named tuple ``(image, labels)``: `image` ``(Z, Y, X)`` float32 in
        [0, 1]; `labels` ``(Z, Y, X)`` uint32 with consecutive ids 1..N,
        numbered by first voxel in C order, 0 for background.

    Raises
    ------
    ValueError
        For a shape that is not 3 positive integers, a diameter below 3 or
        too large for the shape, an unknown kind, an out-of-range option,
        or an option of one kind only given with the other.

    Notes
    -----
    Cells are the regions of a power diagram (a Voronoi diagram with
    weights) of random, Lloyd-relaxed seeds, measured in coordinates divided
    by the normalised `anisotropy`. Membrane cells are restricted to a
    half-ellipsoid dome whose base is the bottom of the stack; the walls are
    the labelled voxels with a differently labelled 6-neighbour, the
    specimen's outer surface included. A nucleus is its seed's Voronoi
    region intersected with a randomly oriented ellipsoid a little larger
    than the region, so that neighbours touch along part of their surface.

    Irregular nuclei compare the ellipsoid's quadratic form with ``1 + g``
    instead of 1, where ``g`` is smooth Gaussian noise of standard deviation
    `irregularity`. Irregular membrane cells assign each voxel to the seed
    nearest to the voxel moved by a smooth random displacement (of standard
    deviation about a third of the seed spacing at ``irregularity=1``),
    which bends the walls.
    Thick walls are the voxels within ``(wall_thickness - 1) / 2`` of a
    one-voxel wall. With the defaults of the newer options
    (``background=0``, ``elongation=None``, ``irregularity=0``,
    ``density=1``, ``texture=0``, ``wall_thickness=1``, ``patchiness=0``,
    ``gamma=1``) no extra random numbers are drawn: a seed gives the same
    stack as before they existed.

    Every cell is one 6-connected component of at least ``1/8`` of the
    typical cell volume: stray fragments and smaller cells are merged into
    their neighbours (membrane) or dropped (nuclei).

    Examples
    --------
    >>> from cp3d.data import synthetic_stack
    >>> image, labels = synthetic_stack((16, 48, 48), 8, seed=1)
    >>> image.dtype, labels.dtype, image.shape
    (dtype('float32'), dtype('uint32'), (16, 48, 48))
    >>> bool(image.min() >= 0 and image.max() <= 1)
    True
    >>> ids = np.unique(labels)
    >>> bool(ids[0] == 0 and (ids[1:] == np.arange(1, ids.size)).all())
    True
    """
    shape, cell_diameter, stretch, psf_sigma = _validate(
        shape, cell_diameter, anisotropy, kind, noise, psf_sigma, depth_attenuation, dim_fraction
    )
    nuclei = _validate_options(kind, background, elongation, irregularity, density, texture, wall_thickness,
                               patchiness, gamma, out_of_focus)
    if not isinstance(background_grain, numbers.Real) or not 0 <= background_grain <= 1:
        raise ValueError(f"background_grain must be in [0, 1], got {background_grain!r}")
    if not isinstance(glowing_walls, numbers.Real) or not 0 <= glowing_walls <= 1.5:
        raise ValueError(f"glowing_walls must be in [0, 1.5], got {glowing_walls!r}")
    if glowing_walls > 0 and kind != "nuclei":
        raise ValueError("glowing_walls: an option of kind='nuclei' only (membrane stacks are all walls)")
    rng = np.random.default_rng(seed)
    if kind == "membrane":
        labels = _membrane_labels(shape, cell_diameter, stretch, rng, irregularity)
    else:
        labels = _nuclei_labels(shape, cell_diameter, stretch, rng, **nuclei)
    labels = _clean_labels(labels, cell_diameter, merge=kind == "membrane")
    brightness = _cell_brightness(int(labels.max()), dim_fraction, rng)
    if kind == "membrane":
        signal = _membrane_signal(labels, brightness, cell_diameter, wall_thickness, patchiness, texture, rng)
    else:
        signal = brightness[labels]
        if texture > 0:
            signal *= _nuclear_texture(labels, cell_diameter, texture, rng)
    if background > 0:
        signal += np.where(labels == 0, _haze(shape, cell_diameter, background, background_grain, rng),
                           np.float32(0))
    if out_of_focus > 0:
        signal += _out_of_focus_light(labels, cell_diameter, stretch, out_of_focus, rng, nuclei)
    if glowing_walls > 0:
        signal += _glowing_walls(labels, cell_diameter, stretch, glowing_walls, rng)
    image = _microscope(signal, psf_sigma, depth_attenuation, noise, rng, gamma)
    return SyntheticStack(image, labels)


def random_nuclei_options(rng, wide=False, bright_background=False, glowing_walls=False):
    """Draw varied nuclei settings for `synthetic_stack`, as the nuclei model is trained on.

    Everything but the shape, diameter and seed is drawn: anisotropy,
    noise, PSF, depth attenuation, dim nuclei, background haze, elongation,
    irregular outlines, packing density and chromatin texture, each from a
    range around what confocal nuclei stacks show.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the random draws.
    wide : bool, optional
        Add the light of unlabelled nuclei out of the focal plane
        (``out_of_focus`` up to 0.6 of the nuclei's brightness) to every
        stack, and no dim nuclei (dim, sharp nuclei and bright, blurred
        ghosts would teach opposite answers): on real confocal crops the
        nuclei model calls the blurred light between the nuclei foreground.
        The other settings are drawn as without it.
    bright_background : bool, optional
        Nuclei standing in a bright, grainy background, as real confocal
        crops of tissue show them (there the background is 0.4 of the
        nuclei's brightness, in blotches of their size): in 4 stacks of 5 a
        haze up to 0.6 of the nuclei's brightness, grainy (`background_grain`
        0.5 to 1), the nuclei from sparse (a fifth of the stack) to packed,
        and no dim nuclei, which such a background would outshine. The other
        settings are drawn as without it.
    glowing_walls : bool, optional
        In half the stacks, the autofluorescent walls of the cells around
        the nuclei (``glowing_walls`` 0.3 to 1.5 of the nuclei's
        brightness), as plant tissue shows them in a nuclear stain: bright
        streaks between the nuclei, which a model not shown them calls
        nuclei. Drawn after the others, which keep their values.

    Returns
    -------
    dict
        Keyword arguments for ``synthetic_stack(..., kind="nuclei")``.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.data import random_nuclei_options, synthetic_stack
    >>> options = random_nuclei_options(np.random.default_rng(0))
    >>> sorted(options)[:4]
    ['anisotropy', 'background', 'density', 'depth_attenuation']
    >>> image, labels = synthetic_stack((24, 48, 48), 9, kind="nuclei", seed=0, **options)
    >>> bool(labels.max() > 10)
    True
    """
    z_psf = rng.uniform(0.8, 3.0)
    xy_psf = rng.uniform(0.5, 1.2)
    options = {
        # nuclei a little flattened or drawn out along z, as in tissue
        "anisotropy": (float(np.exp(rng.uniform(np.log(0.7), np.log(1.5)))), 1.0, 1.0),
        "noise": float(rng.uniform(0.02, 0.25)),
        "psf_sigma": (float(z_psf), float(xy_psf), float(xy_psf)),
        "depth_attenuation": float(rng.uniform(0.0, 0.7)),
        "dim_fraction": float(rng.uniform(0.0, 0.3)),
        "background": float(rng.uniform(0.0, 0.15)) if rng.random() < 0.6 else 0.0,
        "elongation": float(rng.uniform(0.06, 0.3)),
        "irregularity": float(rng.uniform(0.0, 0.35)),
        "density": float(rng.uniform(0.5, 1.25)),
        "texture": float(rng.uniform(0.0, 1.0)),
    }
    if wide:
        # drawn after the others, so that a seed gives the default draws their values
        options["out_of_focus"] = float(rng.uniform(0.0, _WIDE_OUT_OF_FOCUS))
        options["dim_fraction"] = 0.0
    if bright_background:
        level = float(rng.uniform(0.0, _BRIGHT_BACKGROUND))
        options["background"] = level if rng.random() < _BRIGHT_BACKGROUND_SHARE else 0.0
        options["background_grain"] = float(rng.uniform(*_BRIGHT_BACKGROUND_GRAIN))
        options["density"] = float(rng.uniform(_SPARSE_DENSITY, options["density"]))
        options["dim_fraction"] = 0.0
    if glowing_walls and rng.random() < _GLOWING_WALL_SHARE:
        options["glowing_walls"] = float(rng.uniform(*_GLOWING_WALL_LEVEL))
    return options


def random_membrane_options(rng, settings_share=1.0):
    """Draw varied membrane settings for `synthetic_stack`, as the membrane model is fine-tuned on.

    Everything but the shape, diameter and seed is drawn, uniformly from the
    ranges in `MEMBRANE_OPTION_RANGES` (log-uniformly for the z anisotropy
    and `gamma`; the background is 0 in half the draws; the x PSF is within
    15 % of the y one). They are wider than the plain membrane stacks the
    first tanh model was trained on (noise 0.02..0.2, PSF ``(2, 0.8, 0.8)``,
    depth attenuation 0.5, 15 % dim cells, thin even walls, flat
    interiors).

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the random draws.
    settings_share : float, optional
        The chance that each setting is kept; the others are left out, so
        `synthetic_stack`'s defaults apply to them. Below 1, a stack differs
        from the plain ones in some ways at once rather than in all (one
        more draw per setting; at 1 the draws are those of earlier releases).

    Returns
    -------
    dict
        Keyword arguments for ``synthetic_stack(..., kind="membrane")``.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.data import random_membrane_options, synthetic_stack
    >>> options = random_membrane_options(np.random.default_rng(0))
    >>> sorted(options)[:4]
    ['anisotropy', 'background', 'depth_attenuation', 'dim_fraction']
    >>> image, labels = synthetic_stack((32, 64, 64), 9, seed=0, **options)
    >>> bool(labels.max() > 10)
    True
    >>> len(random_membrane_options(np.random.default_rng(0), settings_share=0.5)) < len(options)
    True
    """
    if not 0.0 < settings_share <= 1.0:
        raise ValueError(f"settings_share must be in (0, 1], got {settings_share!r}")
    r = MEMBRANE_OPTION_RANGES

    def uniform(name):
        return float(rng.uniform(*r[name]))

    def log_uniform(name):
        return float(np.exp(rng.uniform(*np.log(r[name]))))

    xy_psf = uniform("psf_sigma_yx")
    options = {
        "anisotropy": (log_uniform("anisotropy_z"), 1.0, 1.0),
        "noise": uniform("noise"),
        "psf_sigma": (uniform("psf_sigma_z"), xy_psf, float(xy_psf * rng.uniform(0.85, 1.15))),
        "depth_attenuation": uniform("depth_attenuation"),
        "dim_fraction": uniform("dim_fraction"),
        "background": uniform("background") if rng.random() < 0.5 else 0.0,
        "irregularity": uniform("irregularity"),
        "texture": uniform("texture"),
        "wall_thickness": uniform("wall_thickness"),
        "patchiness": uniform("patchiness"),
        "gamma": log_uniform("gamma"),
    }
    if settings_share < 1.0:
        kept = rng.random(len(options)) < settings_share
        options = {name: value for keep, (name, value) in zip(kept, options.items()) if keep}
    return options


def write_synthetic_dataset(out_dir, *, shape, diameter, count, seed=0, kind="membrane", varied=False, **options):
    """Write `count` synthetic stacks and their labels as TIFF files.

    Parameters
    ----------
    out_dir : str or path-like
        Output folder, created if missing.
    shape : sequence of 3 int
        ``(Z, Y, X)`` size of every stack.
    diameter : float
        Typical cell diameter in voxels (see `synthetic_stack`).
    count : int
        Number of stacks, at least 1.
    seed : int, optional
        Seed of the whole dataset; stack ``i`` uses an independent stream
        spawned from it, so the dataset is reproducible.
    kind : {"membrane", "nuclei"}, optional
        Kind of phantom (see `synthetic_stack`).
    varied : bool, optional
        Draw each stack's rendering settings at random, as the varied
        training does (:func:`random_membrane_options`,
        :func:`random_nuclei_options`); `options` given here override them.
    **options
        Further keyword arguments of `synthetic_stack` (``noise``,
        ``anisotropy``, ...).

    Returns
    -------
    list of (pathlib.Path, pathlib.Path)
        The ``(image_path, labels_path)`` pairs written, named
        ``image_{i:03d}.tif`` and ``labels_{i:03d}.tif``.

    Raises
    ------
    ValueError
        For a count that is not a positive integer, or invalid stack options.

    Examples
    --------
    >>> import tempfile
    >>> from cp3d.data import write_synthetic_dataset
    >>> with tempfile.TemporaryDirectory() as d:
    ...     pairs = write_synthetic_dataset(d, shape=(16, 32, 32), diameter=8, count=2)
    ...     [(p.name, q.name) for p, q in pairs]
    [('image_000.tif', 'labels_000.tif'), ('image_001.tif', 'labels_001.tif')]
    """
    # io is imported here so that `data` stays a leaf module for everyone
    # who only wants arrays (and needs no TIFF library).
    from .io import write_image, write_labels

    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(seed).spawn(int(count))
    pairs = []
    draw = {"membrane": random_membrane_options, "nuclei": random_nuclei_options}.get(kind) if varied else None
    for i, child in enumerate(seeds):
        settings = {**draw(np.random.default_rng(child.spawn(1)[0])), **options} if draw else options
        image, labels = synthetic_stack(shape, diameter, kind=kind, seed=child, **settings)
        image_path = out_dir / f"image_{i:03d}.tif"
        labels_path = out_dir / f"labels_{i:03d}.tif"
        write_image(image_path, image, voxel_size=None)
        write_labels(labels_path, labels, voxel_size=None)
        logger.info("wrote %s and %s (%d cells)", image_path, labels_path, int(labels.max()))
        pairs.append((image_path, labels_path))
    return pairs


def _validate(shape, cell_diameter, anisotropy, kind, noise, psf_sigma, depth_attenuation, dim_fraction):
    """Check the public arguments and return them in canonical form."""
    if np.ndim(shape) != 1 or len(shape) != 3:
        raise ValueError(f"shape must be 3 positive integers (Z, Y, X), got {shape!r}")
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"shape must be 3 positive integers (Z, Y, X), got {shape!r}")
    shape = tuple(int(n) for n in shape)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(cell_diameter, numbers.Real) or not math.isfinite(cell_diameter):
        raise ValueError(f"cell_diameter must be a finite number, got {cell_diameter!r}")
    if cell_diameter < 3:
        raise ValueError(f"cell_diameter must be at least 3 voxels, got {cell_diameter!r}")
    cell_volume = math.pi / 6 * cell_diameter**3
    # Fewer than a handful of cells per stack is no useful phantom, and the
    # dome of a membrane stack fills only about half of it.
    if math.prod(shape) < 16 * cell_volume:
        raise ValueError(
            f"cell_diameter {cell_diameter!r} is too large for shape {shape}: "
            f"the stack holds fewer than 16 cells of {cell_volume:.0f} voxels"
        )
    stretch = np.asarray(as_triple(anisotropy, "anisotropy"))
    # Only the ratios matter: a unit geometric mean keeps the cell volume.
    stretch = stretch / np.prod(stretch) ** (1 / 3)
    if not isinstance(noise, numbers.Real) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    sigma = np.asarray(psf_sigma, dtype=np.float64)
    if sigma.ndim == 0:
        sigma = np.full(3, sigma)
    if sigma.shape != (3,) or not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError(f"psf_sigma must be a number or 3 numbers (z, y, x), all >= 0, got {psf_sigma!r}")
    if not isinstance(depth_attenuation, numbers.Real) or not 0 <= depth_attenuation < 1:
        raise ValueError(f"depth_attenuation must be in [0, 1), got {depth_attenuation!r}")
    if not isinstance(dim_fraction, numbers.Real) or not 0 <= dim_fraction <= 1:
        raise ValueError(f"dim_fraction must be in [0, 1], got {dim_fraction!r}")
    return shape, float(cell_diameter), stretch, tuple(float(s) for s in sigma)


def _validate_options(kind, background, elongation, irregularity, density, texture, wall_thickness, patchiness,
                      gamma, out_of_focus=0.0):
    """Check the texture, shape and intensity options; return the nuclei-shape ones as keywords."""
    if not isinstance(background, numbers.Real) or not 0 <= background < 1:
        raise ValueError(f"background must be in [0, 1), got {background!r}")
    if not isinstance(out_of_focus, numbers.Real) or not 0 <= out_of_focus < 1:
        raise ValueError(f"out_of_focus must be in [0, 1), got {out_of_focus!r}")
    only = {"membrane": (("elongation", elongation, None), ("density", density, 1.0),
                         ("out_of_focus", out_of_focus, 0.0)),
            "nuclei": (("wall_thickness", wall_thickness, 1.0), ("patchiness", patchiness, 0.0))}
    given = [name for name, value, default in only[kind] if value != default]
    if given:
        other = "nuclei" if kind == "membrane" else "membrane"
        raise ValueError(f"{', '.join(given)}: options of kind={other!r} only, not of kind={kind!r}")
    if not isinstance(wall_thickness, numbers.Real) or not 1 <= wall_thickness <= 8:
        raise ValueError(f"wall_thickness must be in [1, 8] voxels, got {wall_thickness!r}")
    if not isinstance(patchiness, numbers.Real) or not 0 <= patchiness <= 1:
        raise ValueError(f"patchiness must be in [0, 1], got {patchiness!r}")
    if not isinstance(gamma, numbers.Real) or not 0.2 <= gamma <= 5:
        raise ValueError(f"gamma must be in [0.2, 5], got {gamma!r}")
    if elongation is None:
        elongation = _NUCLEI_ELONGATION
    if not isinstance(elongation, numbers.Real) or not 0 <= elongation <= 1:
        raise ValueError(f"elongation must be in [0, 1], got {elongation!r}")
    if not isinstance(irregularity, numbers.Real) or not 0 <= irregularity < 1:
        raise ValueError(f"irregularity must be in [0, 1), got {irregularity!r}")
    if not isinstance(density, numbers.Real) or not 0.2 <= density <= 1.5:
        raise ValueError(f"density must be in [0.2, 1.5], got {density!r}")
    if not isinstance(texture, numbers.Real) or not 0 <= texture <= 1:
        raise ValueError(f"texture must be in [0, 1], got {texture!r}")
    return {"elongation": float(elongation), "irregularity": float(irregularity), "density": float(density)}


def _smooth_noise(shape, correlation, rng):
    """Gaussian random field of unit standard deviation, smooth over `correlation` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(correlation, 0.5) / 2)
    field -= field.mean()
    std = float(field.std())
    return field / np.float32(std) if std > 0 else field


def _dome_mask(shape):
    """Dome-shaped specimen: base on the bottom plane, apex near z = 0.

    A voxel at height ``u`` in [0, 1] above the base (apex at 1) and radial
    position ``r`` (1 on the dome's rim) is inside when ``r**2 + u**3 <= 1``:
    blunter than a half-ellipsoid, so the dome fills most of the stack, like
    a meristem seen from above.
    """
    nz, ny, nx = shape
    height = ((nz - 1 - np.arange(nz, dtype=np.float32)) / (0.94 * nz)) ** 3
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) / (0.47 * ny)) ** 2
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) / (0.47 * nx)) ** 2
    return height[:, None, None] + y[None, :, None] + x[None, None, :] <= 1


def _scaled_coords(flat_index, shape, stretch):
    """Voxel centres of `flat_index` in the stretched frame, as (n, 3) float64."""
    coords = np.column_stack(np.unravel_index(flat_index, shape)).astype(np.float64)
    return coords / stretch


def _relaxed_seeds(domain_index, shape, stretch, n_seeds, rng):
    """Random seeds inside the domain, spread evenly by Lloyd relaxation.

    Sample voxels of the domain stand in for the continuous region: each
    iteration moves every seed to the centroid of the samples nearest to it.
    Pure random seeds would make slivers; a grid would look like bricks.
    """
    n_samples = min(domain_index.size, _LLOYD_SAMPLES_PER_SEED * n_seeds)
    samples = _scaled_coords(rng.choice(domain_index, n_samples, replace=False), shape, stretch)
    # Sub-voxel jitter so the samples do not sit on the lattice.
    samples += rng.uniform(-0.5, 0.5, samples.shape) / stretch
    seeds = samples[rng.choice(n_samples, n_seeds, replace=False)]
    for _ in range(_LLOYD_ITERATIONS):
        _, owner = cKDTree(seeds).query(samples)
        counts = np.bincount(owner, minlength=n_seeds)
        moved = counts > 0
        for axis in range(3):
            total = np.bincount(owner, weights=samples[:, axis], minlength=n_seeds)
            seeds[moved, axis] = total[moved] / counts[moved]
    return seeds


def _nearest_seed(points, seeds, weights=None):
    """Index of the seed whose power distance ``|p - s|**2 - w`` is smallest.

    The power diagram is a Voronoi diagram one dimension up: lifting seed i
    to height ``sqrt(max(w) - w_i)`` turns its power distance into a plain
    squared distance, so one k-d tree query gives the exact answer.
    """
    if weights is not None:
        lift = np.sqrt(weights.max() - weights)
        seeds = np.column_stack([seeds, lift])
        points = np.column_stack([points, np.zeros(len(points))])
    _, owner = cKDTree(seeds).query(points, workers=-1)
    return owner


def _membrane_labels(shape, cell_diameter, stretch, rng, irregularity=0.0):
    """Power-diagram cells of the dome, walls bent by `irregularity`; ids are seed index + 1."""
    domain = np.flatnonzero(_dome_mask(shape))
    cell_volume = math.pi / 6 * cell_diameter**3
    n_seeds = max(1, round(domain.size / cell_volume))
    seeds = _relaxed_seeds(domain, shape, stretch, n_seeds, rng)
    spacing = cell_volume ** (1 / 3)
    weights = rng.uniform(-1, 1, n_seeds) * _POWER_WEIGHT_SPREAD * spacing**2
    points = _scaled_coords(domain, shape, stretch)
    if irregularity > 0:
        # A smooth displacement of the voxels before the nearest-seed query
        # bends the (flat) power-diagram faces; the labels stay a partition.
        for axis in range(3):
            bend = _smooth_noise(shape, _WALL_BEND_SCALE * cell_diameter, rng).reshape(-1)[domain]
            points[:, axis] += irregularity * _WALL_BEND * spacing * bend
    owner = _nearest_seed(points, seeds, weights)
    labels = np.zeros(math.prod(shape), dtype=np.uint32)
    labels[domain] = owner + 1
    return labels.reshape(shape)


def _random_rotations(n, rng):
    """`n` uniformly random 3x3 rotation matrices, from unit quaternions."""
    q = rng.normal(size=(n, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    ).transpose(2, 0, 1)


def _nuclei_labels(shape, cell_diameter, stretch, rng, elongation, irregularity, density):
    """Voronoi regions of the seeds clipped to one random ellipsoid each."""
    cell_volume = math.pi / 6 * cell_diameter**3
    n_seeds = max(1, round(density * math.prod(shape) / (_NUCLEI_CELL_VOLUME * cell_volume)))
    seeds = _relaxed_seeds(np.arange(math.prod(shape)), shape, stretch, n_seeds, rng)
    owner = _voronoi_edt(shape, seeds, stretch)
    # Semi-axes vary around the mean radius (unit product keeps the volume),
    # then get a random orientation: the quadratic form A = R D R^T.
    radius = _NUCLEI_RADIUS * cell_diameter * rng.lognormal(0.0, 0.08, n_seeds)
    axes = rng.lognormal(0.0, elongation, (n_seeds, 3))
    axes /= np.prod(axes, axis=1, keepdims=True) ** (1 / 3)
    rot = _random_rotations(n_seeds, rng)
    form = np.einsum("nij,nj,nkj->nik", rot, 1.0 / (axes * radius[:, None]) ** 2, rot)
    # Offsets from the (sub-voxel) seed in the stretched frame, one axis at a
    # time in float32 to keep the memory at a few volumes.
    offset = []
    for axis in range(3):
        position = np.arange(shape[axis], dtype=np.float32) / np.float32(stretch[axis])
        position = position.reshape([-1 if a == axis else 1 for a in range(3)])
        offset.append(position - seeds[:, axis].astype(np.float32)[owner])
    quad = np.zeros(shape, dtype=np.float32)
    for i in range(3):
        for j in range(i, 3):
            coef = ((1.0 if i == j else 2.0) * form[:, i, j]).astype(np.float32)
            quad += coef[owner] * offset[i] * offset[j]
    limit = np.float32(1)
    if irregularity > 0:
        limit = 1 + np.float32(irregularity) * _smooth_noise(shape, _OUTLINE_SCALE * cell_diameter, rng)
    return np.where(quad <= limit, owner + 1, 0).astype(np.uint32)


def _voronoi_edt(shape, seeds, stretch):
    """Nearest seed of every voxel, by a Euclidean distance transform.

    The seeds are rounded to voxels and the transform measures distances with
    ``sampling=stretch``, which is the same metric as the stretched frame.
    Much faster than a k-d tree query per voxel. Returns the ``(Z, Y, X)``
    int32 volume of seed indices.
    """
    voxel = np.clip(np.rint(seeds * stretch).astype(np.intp), 0, np.asarray(shape) - 1)
    seed_id = np.full(shape, -1, dtype=np.int32)
    # Two seeds rounding to one voxel (not seen with relaxed seeds): the last
    # one wins and the other simply gets no voxels.
    seed_id[tuple(voxel.T)] = np.arange(len(seeds), dtype=np.int32)
    index = ndimage.distance_transform_edt(
        seed_id < 0, sampling=tuple(stretch), return_distances=False, return_indices=True
    )
    return seed_id[tuple(index)]


def _clean_labels(labels, cell_diameter, merge):
    """Keep one sizeable connected piece per cell and number them 1..N.

    Stray pieces (all but the largest component of a cell) and cells below
    1/8 of the typical volume become orphans. With `merge`, orphans join the
    neighbouring cells, so the specimen keeps no holes; otherwise they
    become background.
    """
    min_size = math.pi / 6 * cell_diameter**3 / 8
    orphan = np.zeros(labels.shape, dtype=bool)
    for i, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        cell = labels[box] == i + 1
        pieces, n_pieces = ndimage.label(cell, structure=_FACES)
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        if sizes.max() < min_size:
            orphan[box] |= cell
        elif n_pieces > 1:
            orphan[box] |= cell & (pieces != sizes.argmax())
    if orphan.any():
        labels = labels.copy()
        labels[orphan] = 0
        if merge:
            _merge_orphans(labels, orphan)
    return relabel_by_first_voxel(labels, backend="numpy")  # synthesis starts no Numba pool


def _merge_orphans(labels, orphan):
    """Grow the neighbouring cells into the orphan voxels, in place.

    Each round hands every orphan voxel the largest id among its labelled
    6-neighbours, so each absorbed voxel touches its new cell and the cells
    stay connected.
    """
    shape = labels.shape
    flat = labels.reshape(-1)
    todo = np.flatnonzero(orphan)
    coords = np.unravel_index(todo, shape)
    while todo.size:
        best = np.zeros(todo.size, dtype=np.uint32)
        stride = 1
        for axis in range(2, -1, -1):
            for step in (-1, 1):
                inside = (coords[axis] + step >= 0) & (coords[axis] + step < shape[axis])
                neighbour = flat[np.where(inside, todo + step * stride, todo)]
                best = np.maximum(best, np.where(inside, neighbour, 0))
            stride *= shape[axis]
        done = best > 0
        if not done.any():
            break  # orphans with no labelled cell around: leave as background
        flat[todo[done]] = best[done]
        todo = todo[~done]
        coords = tuple(c[~done] for c in coords)


def _cell_brightness(n_cells, dim_fraction, rng):
    """Per-cell brightness, index 0 (background) dark; a fraction is dim.

    Reporter expression varies from cell to cell, and some cells are much
    dimmer: a segmenter must not lose them.
    """
    brightness = np.clip(rng.lognormal(0.0, 0.15, n_cells + 1), 0.6, 1.4)
    dim = rng.random(n_cells + 1) < dim_fraction
    brightness[dim] = 0.3
    brightness[0] = 0.0
    return brightness.astype(np.float32)


def _nuclear_texture(labels, cell_diameter, texture, rng):
    """Brightness factor inside the nuclei: grainy chromatin and dim nucleoli.

    Chromatin is a fine Gaussian random field (bright clumps and darker
    gaps); nucleoli are balls about a quarter of the nucleus across, placed
    at random voxels well inside the nuclei, that keep only part of the
    brightness. Both scale with `texture`; the mean brightness stays near 1.
    """
    chromatin = _smooth_noise(labels.shape, _CHROMATIN_SCALE * cell_diameter + 1, rng)
    factor = np.exp(np.float32(0.35 * texture) * chromatin)
    radius = _NUCLEOLUS_RADIUS * cell_diameter
    nucleoli = _random_balls(labels > 0, radius, _NUCLEOLI_PER_NUCLEUS * int(labels.max()), rng)
    factor[nucleoli] *= np.float32(1 - texture * (1 - _NUCLEOLUS_LEVEL))
    return factor / np.float32(np.mean(factor[labels > 0])) if (labels > 0).any() else factor


def _random_balls(inside, radius, mean_count, rng):
    """Mask of a Poisson(`mean_count`) number of balls of `radius` placed well inside `inside`.

    The centres are random voxels at least ``1.5 * radius`` from the edge of
    `inside`, so each ball lies within it: nucleoli in nuclei, organelles
    in a cell's cytoplasm.
    """
    depth = ndimage.distance_transform_edt(inside)
    inner = np.flatnonzero(depth.reshape(-1) > 1.5 * radius)
    n = min(inner.size, rng.poisson(mean_count))
    if not n:
        return np.zeros(inside.shape, dtype=bool)
    centres = np.zeros(inside.shape, dtype=bool)
    centres.reshape(-1)[rng.choice(inner, n, replace=False)] = True
    return ndimage.distance_transform_edt(~centres) <= radius


def _haze(shape, cell_diameter, level, grain, rng):
    """Uneven background haze of mean `level`: smooth over a cell diameter (`grain` 0) to blotchy (`grain` 1)."""
    field = _smooth_noise(shape, _HAZE_SCALE * (1 - _GRAIN_SCALE_CUT * grain) * cell_diameter, rng)
    spread = _HAZE_SPREAD + (_GRAINY_HAZE_SPREAD - _HAZE_SPREAD) * grain
    return np.clip(np.float32(level) * (1 + np.float32(spread) * field), 0, None)


def _out_of_focus_light(labels, cell_diameter, stretch, level, rng, shape_options):
    """Light of unlabelled nuclei out of the focal plane, peaking at `level`: blurred nuclei in the gaps."""
    ghosts = _nuclei_labels(labels.shape, cell_diameter, stretch, rng, **shape_options)
    light = ndimage.gaussian_filter(((ghosts > 0) & (labels == 0)).astype(np.float32),
                                    (_OUT_OF_FOCUS_BLUR_Z * cell_diameter,) + (_OUT_OF_FOCUS_BLUR * cell_diameter,) * 2)
    peak = float(light.max())
    return light * np.float32(level / peak) if peak > 0 else light


def _walls(labels, thickness=1.0):
    """The voxels with a differently labelled 6-neighbour, thickened to every voxel within
    ``(thickness - 1) / 2`` of them."""
    wall = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        differs = labels[tuple(lo)] != labels[tuple(hi)]
        wall[tuple(lo)] |= differs
        wall[tuple(hi)] |= differs
    if thickness > 1:
        wall = ndimage.distance_transform_edt(~wall) <= (thickness - 1) / 2
    return wall


def _glowing_walls(labels, cell_diameter, stretch, level, rng):
    """Walls of the cells around the nuclei, glowing in patches up to `level` outside the nuclei.

    Plant cell walls are autofluorescent, and in a nuclear stain of tissue
    they show as bright streaks and sheets between the nuclei; the cells are
    a few nuclei across.
    """
    cells = _membrane_labels(labels.shape, _GLOWING_WALL_CELLS * cell_diameter, stretch, rng, _GLOWING_WALL_BEND)
    wall = _walls(cells, rng.uniform(1.0, _GLOWING_WALL_THICKNESS)) & (labels == 0)
    patches = _smooth_noise(labels.shape, _PATCH_SCALE * _GLOWING_WALL_CELLS * cell_diameter, rng)
    return np.where(wall, np.float32(level) * np.clip(0.5 + 0.5 * patches, 0, 1), np.float32(0))


def _membrane_signal(labels, brightness, cell_diameter, thickness, patchiness, texture, rng):
    """Bright walls where a 6-neighbour has another id, faint interiors.

    Optionally thicker walls (every voxel within ``(thickness - 1) / 2`` of
    a one-voxel wall), wall brightness varying in patches (gaps where it
    falls to nothing) and a textured cytoplasm with bright organelles.
    """
    wall = _walls(labels, thickness)
    interior = np.float32(_INTERIOR_LEVEL)
    if texture > 0:
        grain = _smooth_noise(labels.shape, _CHROMATIN_SCALE * cell_diameter + 1, rng)
        # clipped at 3 standard deviations: a rare bright grain would outshine the walls
        interior = interior * np.exp(np.float32(_CYTOPLASM_SPREAD * texture) * np.clip(grain, -3, 3))
        radius = max(_ORGANELLE_RADIUS * cell_diameter, 1.0)
        organelles = _random_balls(~wall & (labels > 0), radius, _ORGANELLES_PER_CELL * int(labels.max()), rng)
        interior = np.where(organelles, np.float32(_ORGANELLE_LEVEL * texture), interior)
    wall_level = np.float32(1.0)
    if patchiness > 0:
        patches = _smooth_noise(labels.shape, _PATCH_SCALE * cell_diameter, rng)
        # capped a standard deviation above the mean: a few bright patches would dim every other wall
        spread = np.float32(_PATCH_SPREAD * patchiness)
        wall_level = np.clip(1 + spread * patches, 0, 1 + spread)
        wall_level = np.maximum(wall_level, interior)  # a gap shows the cytoplasm, not a hole
    level = np.where(wall, wall_level, interior)
    return level * brightness[labels]


def _microscope(signal, psf_sigma, depth_attenuation, noise, rng, gamma=1.0):
    """Blur, attenuate with depth, apply `gamma`, add noise and scale to [0, 1]."""
    image = ndimage.gaussian_filter(signal.astype(np.float32, copy=False), psf_sigma, mode="constant")
    nz = image.shape[0]
    depth = np.arange(nz, dtype=np.float32) / max(nz - 1, 1)
    image *= ((1 - depth_attenuation) ** depth)[:, None, None].astype(np.float32)
    peak = float(image.max())
    if peak > 0:
        image /= peak
    if gamma != 1:
        np.power(image, np.float32(gamma), out=image)
    if noise > 0:
        photons = 1.0 / noise**2
        image = rng.poisson(image * photons).astype(np.float32) / np.float32(photons)
        image += rng.normal(0.0, _READ_NOISE_RATIO * noise, image.shape).astype(np.float32)
        np.clip(image, 0, None, out=image)
        peak = float(image.max())
        if peak > 0:
            image /= peak
    return image.astype(np.float32, copy=False)
