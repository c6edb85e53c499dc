import numpy as np
import pytest
from scipy import ndimage

from cp3d.group import ball_offsets, close_and_label, label_in_slabs, relabel_by_first_voxel


def test_ball_matches_the_sphere_inequality():
    offsets = ball_offsets(3)
    assert len(offsets) == 123  # skimage.morphology.ball(3).sum()
    assert np.all((offsets**2).sum(axis=1) <= 9)
    ellipsoid = ball_offsets((1, 2, 2))
    assert np.abs(ellipsoid).max(axis=0).tolist() == [1, 2, 2]


def test_gaps_up_to_twice_the_radius_are_bridged():
    mask = np.zeros((5, 5, 16), bool)
    for x0 in (0, 5, 11):  # gaps of 2 then 3 voxels between 3x3x3 blobs
        mask[1:4, 1:4, x0:x0 + 3] = True
    for backend in ("numpy", "numba"):
        labels = close_and_label(mask, radius=1, backend=backend)[2, 2]
        np.testing.assert_array_equal(labels, [1] * 8 + [0] * 3 + [2] * 3 + [0] * 2)


def test_closing_keeps_voxels_at_the_border():
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, 0] = mask[4, 4, 4] = True
    for backend in ("numpy", "numba"):
        labels = close_and_label(mask, radius=3, backend=backend)
        assert labels[0, 0, 0] == 1 and labels[4, 4, 4] == 2


@pytest.mark.parametrize("density", [0.002, 0.02, 0.1])
@pytest.mark.parametrize("radius", [1, 2, 3, (1, 2, 2)])
def test_numba_identical_to_numpy(density, radius):
    mask = np.random.default_rng(7).random((20, 33, 31)) < density
    ref = close_and_label(mask, radius, backend="numpy")
    np.testing.assert_array_equal(close_and_label(mask, radius, backend="numba"), ref)
    assert ref.dtype == np.uint32 and np.all(ref[mask] > 0)


def test_numbering_follows_first_voxel_and_matches_scipy():
    mask = np.random.default_rng(8).random((12, 14, 16)) < 0.3
    labels = close_and_label(mask, radius=0, backend="numba")  # radius 0: no closing
    expected, _ = ndimage.label(mask)
    np.testing.assert_array_equal(labels, expected)


def test_empty_mask():
    for backend in ("numpy", "numba"):
        assert not close_and_label(np.zeros((4, 5, 6), bool), backend=backend).any()


@pytest.mark.parametrize("dtype", [np.uint32, np.int32, np.uint16])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_relabel_by_first_voxel(backend, dtype):
    labels = np.array([[[0, 7, 7, 3], [0, 9, 3, 0]]], dtype)
    np.testing.assert_array_equal(relabel_by_first_voxel(labels, backend), [[[0, 1, 1, 2], [0, 3, 2, 0]]])
    keep = np.ones(10, bool)
    keep[3] = False
    np.testing.assert_array_equal(relabel_by_first_voxel(labels, backend, keep=keep), [[[0, 1, 1, 0], [0, 2, 0, 0]]])


def test_bad_input():
    with pytest.raises(ValueError, match="3D"):
        close_and_label(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="radius"):
        close_and_label(np.ones((4, 4, 4), bool), radius=-1)


@pytest.mark.parametrize("max_voxels", [12 * 14, 3 * 12 * 14, 10**9])
def test_labelling_in_slabs_equals_whole_volume(max_voxels):
    """The path that keeps cupyx's int32 labelling below 2**31 voxels, run with SciPy on small slabs."""
    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(rng.random((17, 12, 14)) < 0.55)
    whole = ndimage.label(mask)[0]
    assert whole.max() > 5
    slabs = relabel_by_first_voxel(label_in_slabs(mask, ndimage.label, max_voxels), backend="numpy")
    np.testing.assert_array_equal(slabs, whole)
    with pytest.raises(ValueError, match="z-plane"):
        label_in_slabs(mask, ndimage.label, 100)


def test_mark_end_voxels_matches_numpy():
    from cp3d.group import mark_end_voxels

    rng = np.random.default_rng(4)
    shape = (9, 13, 17)
    index = rng.integers(-3, np.prod(shape), (5, 6, 7))
    box = (slice(2, 7), slice(0, 13), slice(5, 16))
    valid = index[index >= 0]
    coords = np.unravel_index(valid, shape)
    inside = np.all([(c >= s.start) & (c < s.stop) for c, s in zip(coords, box)], axis=0)
    expected = np.zeros((5, 13, 11), bool)
    expected[tuple(c[inside] - s.start for c, s in zip(coords, box))] = True
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(mark_end_voxels(index, shape, box), expected)
    np.testing.assert_array_equal(mark_end_voxels(index.astype(np.int32), shape, box), expected)
