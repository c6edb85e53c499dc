import math

import numpy as np
import pytest
from conftest import cubes_in_a_row

from cp3d.metrics import evaluate, median_diameter


def line(*runs):
    """A (1, 1, X) uint16 volume made of (label, length) runs along x."""
    return np.concatenate([np.full(n, v, dtype=np.uint16) for v, n in runs])[None, None, :]


def two_cells():
    gt = np.zeros((2, 4, 4), dtype=np.uint16)
    gt[:, :2, :2] = 1
    gt[:, 2:, 2:] = 2
    return gt


def test_perfect_match():
    gt = two_cells()
    r = evaluate(gt, gt.astype(np.int64))
    assert r["dice"] == 1.0
    assert r["ap50"] == r["ap75"] == r["ap90"] == 1.0
    assert r["precision50"] == r["recall50"] == 1.0
    assert r["n_gt"] == r["n_pred"] == 2
    assert r["arand"] == pytest.approx(0.0, abs=1e-12)
    assert r["voi_split"] == pytest.approx(0.0, abs=1e-12)
    assert r["voi_merge"] == pytest.approx(0.0, abs=1e-12)


def test_merge_of_two_equal_cells():
    gt = line((1, 8), (2, 8))
    pred = line((5, 16))
    r = evaluate(gt, pred)
    # each gt cell has IoU 8/16 = 0.5 with the merged cell: not above 0.5
    assert r["ap50"] == 0.0
    assert r["dice"] == pytest.approx(2 * 8 / 24)
    assert r["precision50"] == 0.0 and r["recall50"] == 0.0
    assert r["voi_merge"] == pytest.approx(1.0)
    assert r["voi_split"] == pytest.approx(0.0, abs=1e-12)
    # distinct-voxel pairs: together in both 112, in gt 112, in pred 240
    p, q = 112 / 240, 1.0
    assert r["arand"] == pytest.approx(1 - 2 * p * q / (p + q))


def test_unequal_merge_keeps_the_big_cell():
    gt = line((1, 12), (2, 4))
    pred = line((3, 16))
    r = evaluate(gt, pred)
    # IoU 12/16 = 0.75: a match at 0.5, not at 0.75
    assert r["ap50"] == pytest.approx(1 / 2)
    assert r["ap75"] == 0.0
    assert r["precision50"] == 1.0 and r["recall50"] == 0.5
    assert r["dice"] == pytest.approx((24 / 28 + 8 / 20) / 2)


def test_split_mirrors_merge():
    gt = line((1, 16))
    pred = line((1, 8), (2, 8))
    r = evaluate(gt, pred)
    assert r["ap50"] == 0.0
    assert r["n_gt"] == 1 and r["n_pred"] == 2
    assert r["dice"] == pytest.approx(2 * 8 / 24)
    assert r["voi_split"] == pytest.approx(1.0)
    assert r["voi_merge"] == pytest.approx(0.0, abs=1e-12)
    p, q = 1.0, 112 / 240
    assert r["arand"] == pytest.approx(1 - 2 * p * q / (p + q))


def test_empty_prediction():
    gt = two_cells()
    r = evaluate(gt, np.zeros_like(gt))
    assert r["dice"] == 0.0
    assert r["ap50"] == r["ap75"] == r["ap90"] == 0.0
    assert r["n_pred"] == 0 and r["recall50"] == 0.0
    assert math.isnan(r["precision50"])
    assert r["voi_merge"] == pytest.approx(1.0)  # two equal cells lumped into background
    assert r["voi_split"] == pytest.approx(0.0, abs=1e-12)
    assert r["arand"] == 1.0  # every gt cell is split into background singletons


def test_empty_ground_truth():
    pred = two_cells()
    r = evaluate(np.zeros_like(pred), pred)
    assert r["n_gt"] == 0 and r["n_pred"] == 2
    assert r["ap50"] == 0.0 and r["precision50"] == 0.0
    assert math.isnan(r["dice"]) and math.isnan(r["recall50"])
    assert math.isnan(r["arand"]) and math.isnan(r["voi_split"])


def test_both_empty_is_undefined_not_a_crash():
    empty = np.zeros((2, 3, 4), dtype=np.uint8)
    r = evaluate(empty, empty)
    assert r["n_gt"] == r["n_pred"] == 0
    assert math.isnan(r["ap50"]) and math.isnan(r["dice"])


def test_non_consecutive_and_huge_ids_give_the_same_scores():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, (3, 4, 5)).astype(np.uint32)
    pred = rng.integers(0, 3, (3, 4, 5)).astype(np.uint32)
    gt_lut = np.array([0, 7, 1000, 2**32 - 1], dtype=np.uint32)
    pred_lut = np.array([0, 2**32 - 2, 3], dtype=np.uint32)
    a = evaluate(gt, pred, thresholds=(0.1, 0.5))
    b = evaluate(gt_lut[gt], pred_lut[pred], thresholds=(0.1, 0.5))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], nan_ok=True), k


def test_threshold_keys():
    gt = two_cells()
    r = evaluate(gt, gt, thresholds=(0.3, 0.5, 0.95))
    assert {"ap30", "ap50", "ap95"} <= r.keys()
    assert "ap75" not in r
    assert {"dice", "precision50", "recall50", "n_gt", "n_pred", "arand", "voi_split", "voi_merge"} <= r.keys()


def test_low_threshold_uses_an_optimal_matching():
    # A=[0,10) B=[10,20); P=[4,14) Q=[0,4). IoU: A-P 6/14, A-Q 4/10, B-P 4/16.
    # Greedy on IoU takes A-P and finds 1 match; the optimum A-Q, B-P has 2.
    gt = line((1, 10), (2, 10))
    pred = line((2, 4), (1, 10), (0, 6))
    r = evaluate(gt, pred, thresholds=(0.2, 0.5))
    assert r["ap20"] == 1.0
    assert r["ap50"] == 0.0


def test_arand_matches_scikit_image_with_background_as_singletons():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (4, 5, 6)).astype(np.uint16)
    pred = rng.integers(0, 4, (4, 5, 6)).astype(np.int32)
    singletons = pred.copy()
    bg = singletons == 0
    singletons[bg] = 100 + np.arange(np.count_nonzero(bg))
    expected, _, _ = metrics.adapted_rand_error(gt, singletons, ignore_labels=(0,))
    assert evaluate(gt, pred)["arand"] == pytest.approx(expected)


def test_voi_matches_entropies_on_gt_foreground():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 5, (4, 5, 6)).astype(np.uint16)
    pred = rng.integers(0, 4, (4, 5, 6)).astype(np.uint16)
    keep = gt > 0
    g, p = gt[keep], pred[keep]

    def entropy(*x):
        _, c = np.unique(np.stack(x, axis=1), axis=0, return_counts=True)
        q = c / c.sum()
        return -(q * np.log2(q)).sum()

    r = evaluate(gt, pred)
    assert r["voi_split"] == pytest.approx(entropy(g, p) - entropy(g))
    assert r["voi_merge"] == pytest.approx(entropy(g, p) - entropy(p))


@pytest.mark.parametrize(
    "gt, pred, error, match",
    [
        (np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), ValueError, "3D"),
        (np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), TypeError, "integer"),
        (np.full((2, 2, 2), -1, np.int16), np.zeros((2, 2, 2), np.uint8), ValueError, "non-negative"),
        (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), ValueError, "does not match"),
        ([[[0, 1]]], np.zeros((1, 1, 2), np.uint8), TypeError, "numpy.ndarray"),
    ],
)
def test_bad_input(gt, pred, error, match):
    with pytest.raises(error, match=match):
        evaluate(gt, pred)


@pytest.mark.parametrize("thresholds", [(), (1.0,), (-0.1,), (0.5, 0.501)])
def test_bad_thresholds(thresholds):
    gt = two_cells()
    with pytest.raises(ValueError, match="thresholds"):
        evaluate(gt, gt, thresholds=thresholds)


def test_median_diameter_plain_weighted_excluded_and_anisotropic():
    labels = cubes_in_a_row([1, 1, 4, 5, 8], (12, 12, 30))  # two one-voxel fragments and three cells
    d = (6 * np.array([1, 1, 64, 125, 512]) / np.pi) ** (1 / 3)
    assert median_diameter(labels) == pytest.approx(d[2])
    assert median_diameter(labels, weighted=True) == pytest.approx(d[4])  # the 8-cube holds most voxels
    assert median_diameter(labels, exclude=[1, 2]) == pytest.approx(d[3])
    assert median_diameter(labels, exclude=[1, 2, 3, 4, 5]) is None
    assert median_diameter(labels, min_diameter=2.0) == pytest.approx(d[3])  # the fragments left out
    assert median_diameter(labels, exclude=[5], min_diameter=2.0) == pytest.approx((d[2] + d[3]) / 2)
    assert median_diameter(labels, min_diameter=20.0) is None
    # anisotropic voxels: volumes in x-voxels cubed, the diameter in voxels along x
    assert median_diameter(labels, (2, 1, 1), exclude=[1, 2]) == pytest.approx(d[3] * 2 ** (1 / 3))
    assert median_diameter(labels, (1, 1, 2), exclude=[1, 2]) == pytest.approx(d[3] / 2 ** (2 / 3))
