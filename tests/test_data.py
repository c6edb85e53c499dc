"""Tests for cp3d.data: synthetic stacks with known labels."""

import numpy as np
import pytest
from scipy import ndimage

from cp3d.data import random_nuclei_options, synthetic_stack, write_synthetic_dataset

SHAPE = (32, 64, 64)
DIAMETER = 10


@pytest.fixture(scope="module", params=["membrane", "nuclei"])
def stack(request):
    image, labels = synthetic_stack(SHAPE, DIAMETER, kind=request.param, seed=3)
    return request.param, image, labels


@pytest.fixture(scope="module")
def clean_membrane():
    return synthetic_stack(SHAPE, DIAMETER, kind="membrane", seed=5, noise=0)


def _equivalent_diameters(labels):
    volumes = np.bincount(labels.ravel())[1:]
    return (6 * volumes / np.pi) ** (1 / 3)


def test_dtypes_shapes_and_range(stack):
    _, image, labels = stack
    assert image.shape == labels.shape == SHAPE
    assert image.dtype == np.float32 and labels.dtype == np.uint32
    assert image.min() >= 0 and image.max() == pytest.approx(1.0)


def test_ids_are_consecutive_and_numbered_by_first_voxel(stack):
    _, _, labels = stack
    ids, first = np.unique(labels.ravel(), return_index=True)
    assert ids[0] == 0
    np.testing.assert_array_equal(ids[1:], np.arange(1, ids.size))
    assert np.all(np.diff(first[1:]) > 0)
    assert ids.size > 20


def test_cells_are_single_sizeable_components(stack):
    _, _, labels = stack
    min_size = np.pi / 6 * DIAMETER**3 / 8
    assert np.bincount(labels.ravel())[1:].min() >= min_size
    for i, box in enumerate(ndimage.find_objects(labels)):
        _, n = ndimage.label(labels[box] == i + 1)
        assert n == 1, f"cell {i + 1} has {n} pieces"


@pytest.mark.parametrize("kind", ["membrane", "nuclei"])
def test_median_size_matches_diameter(kind):
    _, labels = synthetic_stack(SHAPE, 8, kind=kind, seed=1, noise=0)
    assert np.median(_equivalent_diameters(labels)) == pytest.approx(8, rel=0.15)


@pytest.mark.parametrize("kind", ["membrane", "nuclei"])
def test_same_seed_same_arrays_other_seed_differs(kind):
    a = synthetic_stack((16, 40, 40), 8, kind=kind, seed=7)
    b = synthetic_stack((16, 40, 40), 8, kind=kind, seed=7)
    c = synthetic_stack((16, 40, 40), 8, kind=kind, seed=8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_anisotropy_elongates_cells_along_z():
    def median_extent_ratio(anisotropy):
        _, labels = synthetic_stack((40, 48, 48), 9, anisotropy=anisotropy, seed=2, noise=0)
        boxes = [b for b in ndimage.find_objects(labels) if b is not None]
        z = np.array([b[0].stop - b[0].start for b in boxes])
        x = np.array([b[2].stop - b[2].start for b in boxes])
        return np.median(z / x)

    assert median_extent_ratio((2, 1, 1)) > 1.5 * median_extent_ratio((1, 1, 1))


def test_membrane_background_outside_dome_is_empty_and_dark(clean_membrane):
    image, labels = clean_membrane
    # The dome's apex is near z = 0 and its base the bottom plane: the top
    # corners are outside, the bottom centre inside.
    assert labels[0, 0, 0] == 0 and labels[0, -1, -1] == 0 and labels[0, 0, -1] == 0
    assert labels[-1, SHAPE[1] // 2, SHAPE[2] // 2] > 0
    assert 0.3 < np.mean(labels > 0) < 0.8
    far = ndimage.distance_transform_edt(labels == 0) > 4
    assert far.sum() > 1000
    assert image[far].max() < 0.05

    noisy, noisy_labels = synthetic_stack(SHAPE, DIAMETER, kind="membrane", seed=5, noise=0.1)
    np.testing.assert_array_equal(noisy_labels, labels)
    assert noisy[far].mean() < 0.1 < np.percentile(noisy[labels > 0], 99)


def test_membranes_brighter_than_interiors(clean_membrane):
    image, labels = clean_membrane
    walls = ndimage.morphological_gradient(labels.astype(np.int64), size=3) > 0
    walls &= labels > 0
    interior = (labels > 0) & ~ndimage.binary_dilation(walls, iterations=2)
    assert interior.sum() > 100
    assert image[walls].mean() > 2 * image[interior].mean()


def test_intensity_falls_with_depth(clean_membrane):
    image, labels = clean_membrane
    top = image[4:10][labels[4:10] > 0].mean()
    bottom = image[-6:][labels[-6:] > 0].mean()
    assert bottom < top


def test_noise_zero_is_clean_and_noise_adds_variation():
    clean, labels = synthetic_stack((16, 40, 40), 8, seed=4, noise=0)
    noisy, _ = synthetic_stack((16, 40, 40), 8, seed=4, noise=0.2)
    assert clean[labels == 0].min() == 0
    assert np.abs(noisy - clean).mean() > 0.01


def test_nuclei_touch_and_have_bright_interiors():
    image, labels = synthetic_stack(SHAPE, DIAMETER, kind="nuclei", seed=6, noise=0)
    touching = set()
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        pairs = np.stack([a[:-1].ravel(), a[1:].ravel()])
        pairs = pairs[:, (pairs[0] != pairs[1]) & (pairs[0] > 0) & (pairs[1] > 0)]
        touching.update(pairs.min(axis=0)[pairs.min(axis=0) > 0])
        touching.update(pairs.max(axis=0))
    assert len(touching) > 0.5 * labels.max()
    assert 0.05 < np.mean(labels == 0) < 0.6
    inside = ndimage.binary_erosion(labels > 0, iterations=2)
    outside = ndimage.distance_transform_edt(labels == 0) > 2
    assert image[inside].mean() > 2 * image[outside].mean()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shape": (32, 64)}, "shape"),
        ({"shape": (32, 0, 64)}, "shape"),
        ({"shape": (32, 64.5, 64)}, "shape"),
        ({"shape": "abc"}, "shape"),
        ({"cell_diameter": 0}, "cell_diameter"),
        ({"cell_diameter": -3}, "cell_diameter"),
        ({"cell_diameter": float("nan")}, "cell_diameter"),
        ({"cell_diameter": 40}, "too large"),
        ({"kind": "cytoplasm"}, "kind"),
        ({"anisotropy": (1, 2)}, "anisotropy"),
        ({"anisotropy": (0, 1, 1)}, "anisotropy"),
        ({"noise": -0.1}, "noise"),
        ({"psf_sigma": (1, -1, 1)}, "psf_sigma"),
        ({"depth_attenuation": 1.0}, "depth_attenuation"),
        ({"dim_fraction": 1.5}, "dim_fraction"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = {"shape": SHAPE, "cell_diameter": DIAMETER, **kwargs}
    shape, diameter = args.pop("shape"), args.pop("cell_diameter")
    with pytest.raises(ValueError, match=match):
        synthetic_stack(shape, diameter, **args)


def test_write_synthetic_dataset(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    pairs = write_synthetic_dataset(tmp_path / "out", shape=(16, 32, 32), diameter=8, count=2, seed=1)
    assert [(p.name, q.name) for p, q in pairs] == [
        ("image_000.tif", "labels_000.tif"),
        ("image_001.tif", "labels_001.tif"),
    ]
    first = tifffile.imread(pairs[0][1])
    second = tifffile.imread(pairs[1][1])
    assert first.shape == (16, 32, 32) and first.max() > 0
    assert not np.array_equal(first, second)
    again = write_synthetic_dataset(tmp_path / "again", shape=(16, 32, 32), diameter=8, count=2, seed=1)
    np.testing.assert_array_equal(tifffile.imread(again[0][1]), first)


@pytest.mark.parametrize("kind", ["membrane", "nuclei"])
def test_write_synthetic_dataset_varied(tmp_path, kind):
    from cp3d.cli import main
    from cp3d.io import read_image

    def images(folder, *extra):
        assert main(["synth", str(tmp_path / folder), "--shape", "16", "32", "32", "--diameter", "8", "--count", "2",
                     "--kind", kind, *extra]) == 0
        return [read_image(tmp_path / folder / f"image_{i:03d}.tif").data for i in range(2)]

    plain, varied, again = images("plain"), images("varied", "--varied"), images("again", "--varied")
    for a, b in zip(varied, again):
        np.testing.assert_array_equal(a, b)  # reproducible
    assert not any(np.array_equal(a, b) for a, b in zip(plain, varied))
    # options given explicitly override the drawn ones
    clean = write_synthetic_dataset(tmp_path / "clean", shape=(16, 32, 32), diameter=8, count=1, kind=kind,
                                    varied=True, noise=0.0)
    noisy = write_synthetic_dataset(tmp_path / "noisy", shape=(16, 32, 32), diameter=8, count=1, kind=kind,
                                    varied=True, noise=0.3)
    assert not np.array_equal(read_image(clean[0][0]).data, read_image(noisy[0][0]).data)


def test_write_synthetic_dataset_rejects_bad_count(tmp_path):
    with pytest.raises(ValueError, match="count"):
        write_synthetic_dataset(tmp_path, shape=(16, 32, 32), diameter=8, count=0)


# --------------------------------------------------------------------------- varied nuclei

NUCLEI_SHAPE = (32, 64, 64)


def _nuclei(seed=6, **options):
    return synthetic_stack(NUCLEI_SHAPE, DIAMETER, kind="nuclei", seed=seed, noise=0, **options)


def _surface_to_volume(labels):
    inner = ndimage.binary_erosion(labels > 0, structure=ndimage.generate_binary_structure(3, 1))
    return np.sum((labels > 0) & ~inner) / np.sum(labels > 0)


def test_new_options_at_their_defaults_change_nothing():
    plain = _nuclei()
    spelled = _nuclei(background=0.0, elongation=0.12, irregularity=0.0, density=1.0, texture=0.0)
    np.testing.assert_array_equal(plain.image, spelled.image)
    np.testing.assert_array_equal(plain.labels, spelled.labels)


def test_elongation_draws_longer_nuclei():
    def median_aspect(labels):
        ratios = []
        for i, box in enumerate(ndimage.find_objects(labels)):
            coords = np.argwhere(labels[box] == i + 1).astype(float)
            if len(coords) > 20:
                eig = np.linalg.eigvalsh(np.cov(coords.T))
                ratios.append(np.sqrt(eig[-1] / eig[0]))
        return np.median(ratios)

    # sparse nuclei, so that the neighbours clip few of them
    long, round_ = _nuclei(elongation=0.35, density=0.6).labels, _nuclei(elongation=0.05, density=0.6).labels
    assert median_aspect(long) > 1.2 * median_aspect(round_)


def test_irregularity_roughens_the_outlines():
    assert _surface_to_volume(_nuclei(irregularity=0.5).labels) > 1.1 * _surface_to_volume(_nuclei().labels)


def test_density_sets_how_many_nuclei_and_how_packed():
    sparse, dense = _nuclei(density=0.5).labels, _nuclei(density=1.4).labels
    assert sparse.max() < 0.5 * dense.max()
    assert np.mean(sparse == 0) > np.mean(dense == 0) + 0.1
    # sparse nuclei keep the requested size
    assert np.median(_equivalent_diameters(sparse)) == pytest.approx(DIAMETER, rel=0.15)


def test_texture_varies_the_interiors_and_keeps_the_labels():
    # a sharp PSF, so that the blur does not hide the texture it is meant to show
    sharp = {"dim_fraction": 0, "psf_sigma": (1.0, 0.5, 0.5)}
    plain, textured = _nuclei(**sharp), _nuclei(**sharp, texture=1.0)
    np.testing.assert_array_equal(plain.labels, textured.labels)
    inside = ndimage.binary_erosion(plain.labels > 0, iterations=2)

    def spread(image):
        return image[inside].std() / image[inside].mean()

    assert spread(textured.image) > 1.3 * spread(plain.image)
    # still bright nuclei on a dark background
    outside = ndimage.distance_transform_edt(plain.labels == 0) > 2
    assert textured.image[inside].mean() > 2 * textured.image[outside].mean()


@pytest.mark.parametrize("kind", ["membrane", "nuclei"])
def test_background_lights_the_space_outside_the_cells(kind):
    plain = synthetic_stack(NUCLEI_SHAPE, DIAMETER, kind=kind, seed=2, noise=0)
    hazy = synthetic_stack(NUCLEI_SHAPE, DIAMETER, kind=kind, seed=2, noise=0, background=0.3)
    np.testing.assert_array_equal(plain.labels, hazy.labels)
    far = ndimage.distance_transform_edt(plain.labels == 0) > 4
    assert far.sum() > 100
    assert hazy.image[far].mean() > 0.05 > plain.image[far].mean()


def test_random_nuclei_options_render_varied_reproducible_stacks():
    from cp3d.data import random_nuclei_options

    a = random_nuclei_options(np.random.default_rng(1))
    assert a == random_nuclei_options(np.random.default_rng(1))
    assert a != random_nuclei_options(np.random.default_rng(2))
    image, labels = synthetic_stack(NUCLEI_SHAPE, DIAMETER, kind="nuclei", seed=1, **a)
    assert image.shape == labels.shape == NUCLEI_SHAPE and labels.max() > 10


def test_wide_nuclei_options_add_out_of_focus_light_and_keep_the_other_draws():
    from cp3d.data import random_nuclei_options

    for seed in range(20):
        plain = random_nuclei_options(np.random.default_rng(seed))
        wide = random_nuclei_options(np.random.default_rng(seed), wide=True)
        assert wide == dict(plain, dim_fraction=0.0, out_of_focus=wide["out_of_focus"])
        assert 0 <= wide["out_of_focus"] <= 0.6
    levels = [random_nuclei_options(np.random.default_rng(s), wide=True)["out_of_focus"] for s in range(40)]
    assert max(levels) > 0.4


def test_bright_background_options_brighten_the_background_and_keep_the_other_draws():
    from cp3d.data import random_nuclei_options

    draws = []
    for seed in range(40):
        plain = random_nuclei_options(np.random.default_rng(seed))
        bright = random_nuclei_options(np.random.default_rng(seed), bright_background=True)
        changed = {"background", "background_grain", "density", "dim_fraction"}
        assert {k: v for k, v in bright.items() if k not in changed} == {k: v for k, v in plain.items()
                                                                           if k not in changed}
        assert 0.2 <= bright["density"] <= plain["density"] and bright["dim_fraction"] == 0
        draws.append(bright)
    levels = [d["background"] for d in draws]
    assert max(levels) > 0.45 and 0 < sum(level == 0 for level in levels) < 20  # a share stays dark
    image, labels = synthetic_stack(NUCLEI_SHAPE, DIAMETER, kind="nuclei", seed=0, **draws[0])
    assert labels.max() > 0


def test_background_grain_makes_the_haze_blotchy_at_the_nuclei_scale():
    options = dict(kind="nuclei", seed=4, noise=0.0, density=0.3, background=0.4, psf_sigma=0)
    smooth = synthetic_stack((32, 64, 64), DIAMETER, **options)
    grainy = synthetic_stack((32, 64, 64), DIAMETER, background_grain=1.0, **options)
    np.testing.assert_array_equal(smooth.labels, grainy.labels)
    outside = smooth.labels == 0

    def blotchiness(image):  # spread of the haze within a nucleus-sized neighbourhood
        local = ndimage.uniform_filter(image, DIAMETER)
        return float(np.std((image - local)[outside]) / np.mean(image[outside]))

    assert blotchiness(grainy.image) > 2 * blotchiness(smooth.image)
    with pytest.raises(ValueError, match="background_grain"):
        synthetic_stack(NUCLEI_SHAPE, DIAMETER, kind="nuclei", background_grain=1.5)


def test_out_of_focus_light_brightens_the_gaps_and_leaves_the_labels():
    options = dict(kind="nuclei", seed=3, noise=0.0, density=0.6)
    plain = synthetic_stack(NUCLEI_SHAPE, DIAMETER, **options)
    ghosts = synthetic_stack(NUCLEI_SHAPE, DIAMETER, out_of_focus=0.5, **options)
    np.testing.assert_array_equal(plain.labels, ghosts.labels)
    gaps = ndimage.distance_transform_edt(plain.labels == 0) > 3
    assert gaps.sum() > 100
    assert ghosts.image[gaps].mean() > plain.image[gaps].mean() + 0.02


def test_glowing_wall_options_light_walls_in_half_the_stacks_and_keep_the_other_draws():
    draws = [random_nuclei_options(np.random.default_rng(seed), bright_background=True, glowing_walls=True)
             for seed in range(40)]
    plain = [random_nuclei_options(np.random.default_rng(seed), bright_background=True) for seed in range(40)]
    assert all({k: v for k, v in d.items() if k != "glowing_walls"} == p for d, p in zip(draws, plain))
    levels = [d["glowing_walls"] for d in draws if "glowing_walls" in d]
    assert 10 < len(levels) < 30 and all(0.3 <= v <= 1.5 for v in levels)
    synthetic_stack((16, 32, 32), 8, kind="nuclei", seed=0, **next(d for d in draws if "glowing_walls" in d))


def test_glowing_walls_draw_bright_sheets_between_the_nuclei_and_leave_the_labels():
    options = dict(kind="nuclei", seed=3, noise=0.0, density=0.4, psf_sigma=(0.0, 0.0, 0.0), depth_attenuation=0.0)
    plain = synthetic_stack(NUCLEI_SHAPE, DIAMETER, **options)
    walls = synthetic_stack(NUCLEI_SHAPE, DIAMETER, glowing_walls=1.0, **options)
    np.testing.assert_array_equal(plain.labels, walls.labels)
    lit = walls.image > plain.image + 0.05
    assert lit.sum() > 100 and not (lit & (plain.labels > 0)).any()  # outside the nuclei only
    # sheets, not blobs: most lit voxels are within a voxel or two of an unlit one
    assert np.mean(ndimage.distance_transform_edt(lit)[lit] <= 2) > 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"glowing_walls": 2.0}, "glowing_walls must be in"),
        ({"kind": "membrane", "glowing_walls": 0.5}, "glowing_walls: an option of kind='nuclei'"),
        ({"background": 1.0}, "background"),
        ({"background": -0.1}, "background"),
        ({"elongation": -0.1}, "elongation"),
        ({"irregularity": 1.0}, "irregularity"),
        ({"density": 0.1}, "density"),
        ({"density": 2.0}, "density"),
        ({"texture": 1.5}, "texture"),
        ({"out_of_focus": 1.0}, "out_of_focus"),
        ({"kind": "membrane", "out_of_focus": 0.3}, "out_of_focus: options of kind='nuclei'"),
        ({"kind": "membrane", "elongation": 0.2, "density": 0.8}, "elongation, density: options of kind='nuclei'"),
        ({"wall_thickness": 2.0}, "wall_thickness: options of kind='membrane'"),
        ({"patchiness": 0.5}, "patchiness"),
    ],
)
def test_bad_nuclei_options_raise(kwargs, match):
    kwargs = {"kind": "nuclei", **kwargs}
    with pytest.raises(ValueError, match=match):
        synthetic_stack(SHAPE, DIAMETER, **kwargs)


# --------------------------------------------------------------------------- varied membranes

MEMBRANE_SHAPE = (32, 64, 64)


def _membranes(seed=6, **options):
    options = {"noise": 0, **options}
    return synthetic_stack(MEMBRANE_SHAPE, DIAMETER, kind="membrane", seed=seed, **options)


def _walls(labels):
    """The one-voxel walls: labelled voxels with a differently labelled 6-neighbour."""
    grown = ndimage.grey_dilation(labels, footprint=ndimage.generate_binary_structure(3, 1))
    shrunk = ndimage.grey_erosion(labels, footprint=ndimage.generate_binary_structure(3, 1))
    return (labels > 0) & ((grown != labels) | (shrunk != labels))


def test_membrane_options_at_their_defaults_change_nothing():
    plain = _membranes(noise=0.1)
    spelled = _membranes(noise=0.1, background=0.0, irregularity=0.0, texture=0.0, wall_thickness=1.0,
                         patchiness=0.0, gamma=1.0)
    np.testing.assert_array_equal(plain.image, spelled.image)
    np.testing.assert_array_equal(plain.labels, spelled.labels)


def test_wall_thickness_widens_the_bright_walls():
    sharp = {"psf_sigma": 0, "dim_fraction": 0, "depth_attenuation": 0}
    thin, thick = _membranes(**sharp), _membranes(**sharp, wall_thickness=3.0)
    np.testing.assert_array_equal(thin.labels, thick.labels)
    cells = thin.labels > 0
    bright = np.mean(thick.image[cells] > 0.5) / np.mean(thin.image[cells] > 0.5)
    assert 1.5 < bright < 4  # about three voxels of wall where there was one on either side of a face


def test_patchiness_varies_the_walls_and_breaks_some():
    sharp = {"psf_sigma": 0, "dim_fraction": 0, "depth_attenuation": 0}
    even, patchy = _membranes(**sharp), _membranes(**sharp, patchiness=1.0)
    np.testing.assert_array_equal(even.labels, patchy.labels)
    walls = _walls(even.labels)
    interior_level = np.median(even.image[(even.labels > 0) & ~walls])

    def spread(image):
        return image[walls].std() / image[walls].mean()

    assert spread(patchy.image) > 2 * spread(even.image) + 0.1
    gaps = np.mean(patchy.image[walls] <= 1.01 * interior_level)
    assert 0.02 < gaps < 0.3 and np.mean(even.image[walls] <= 1.01 * interior_level) == 0


def test_membrane_texture_adds_grain_and_bright_organelles_inside_the_cells():
    sharp = {"psf_sigma": 0, "dim_fraction": 0, "depth_attenuation": 0}
    plain, textured = _membranes(**sharp), _membranes(**sharp, texture=1.0)
    np.testing.assert_array_equal(plain.labels, textured.labels)
    inside = (plain.labels > 0) & ~ndimage.binary_dilation(_walls(plain.labels))
    # the plain interiors differ only from cell to cell (reporter expression)
    assert textured.image[inside].std() > 3 * plain.image[inside].std()
    # organelles: spots far brighter than the cytoplasm, yet the walls stay the brightest structure
    spots = textured.image[inside] > 4 * np.median(textured.image[inside])
    assert 0.001 < spots.mean() < 0.2
    assert np.median(textured.image[_walls(plain.labels)]) > 1.2 * np.percentile(textured.image[inside], 99)


def test_membrane_irregularity_bends_the_walls_and_keeps_cells_whole():
    from scipy.ndimage import label

    flat, wavy = _membranes().labels, _membranes(irregularity=0.6).labels
    assert (flat > 0).sum() == (wavy > 0).sum()  # the same dome, carved differently
    # bent faces have more area: more of the specimen is wall
    assert np.mean(_walls(wavy)[wavy > 0]) > 1.05 * np.mean(_walls(flat)[flat > 0])
    for i, box in enumerate(ndimage.find_objects(wavy)):
        assert label(wavy[box] == i + 1, structure=ndimage.generate_binary_structure(3, 1))[1] == 1


@pytest.mark.parametrize("kind", ["membrane", "nuclei"])
def test_gamma_bends_the_intensities_before_the_noise(kind):
    linear = synthetic_stack(NUCLEI_SHAPE, DIAMETER, kind=kind, seed=4, noise=0)
    bent = synthetic_stack(NUCLEI_SHAPE, DIAMETER, kind=kind, seed=4, noise=0, gamma=2.0)
    np.testing.assert_array_equal(linear.labels, bent.labels)
    np.testing.assert_allclose(bent.image, linear.image**2, atol=1e-6)


def test_random_membrane_options_draw_within_their_ranges_and_render():
    from cp3d.data import MEMBRANE_OPTION_RANGES as R
    from cp3d.data import random_membrane_options

    a = random_membrane_options(np.random.default_rng(1))
    assert a == random_membrane_options(np.random.default_rng(1))
    assert a != random_membrane_options(np.random.default_rng(2))
    for seed in range(20):
        o = random_membrane_options(np.random.default_rng(seed))
        for name in ("noise", "depth_attenuation", "dim_fraction", "irregularity", "texture", "wall_thickness",
                     "patchiness", "gamma"):
            assert R[name][0] <= o[name] <= R[name][1], name
        assert R["anisotropy_z"][0] <= o["anisotropy"][0] <= R["anisotropy_z"][1]
        assert R["psf_sigma_z"][0] <= o["psf_sigma"][0] <= R["psf_sigma_z"][1]
    image, labels = synthetic_stack(MEMBRANE_SHAPE, DIAMETER, seed=1, **a)
    assert image.shape == labels.shape == MEMBRANE_SHAPE and labels.max() > 10


def test_random_membrane_options_settings_share_keeps_a_subset_of_the_draws():
    from cp3d.data import random_membrane_options

    everything = random_membrane_options(np.random.default_rng(3))
    kept = [random_membrane_options(np.random.default_rng(seed), settings_share=0.5) for seed in range(20)]
    # the kept settings are the full draw's values: the extra draws come after them
    assert all(options.items() <= random_membrane_options(np.random.default_rng(seed)).items()
               for seed, options in enumerate(kept))
    sizes = [len(options) for options in kept]
    assert 0 < np.mean(sizes) < len(everything) and len(set(sizes)) > 1
    image, labels = synthetic_stack(MEMBRANE_SHAPE, DIAMETER, seed=1, **kept[0])
    assert labels.max() > 10
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="settings_share"):
            random_membrane_options(np.random.default_rng(0), settings_share=bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"wall_thickness": 0.5}, "wall_thickness"),
        ({"wall_thickness": 9}, "wall_thickness"),
        ({"patchiness": -0.1}, "patchiness"),
        ({"patchiness": 1.5}, "patchiness"),
        ({"gamma": 0.1}, "gamma"),
        ({"gamma": "2"}, "gamma"),
        ({"irregularity": 1.0}, "irregularity"),
        ({"texture": -1}, "texture"),
    ],
)
def test_bad_membrane_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_stack(SHAPE, DIAMETER, kind="membrane", **kwargs)
