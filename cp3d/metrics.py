"""Instance segmentation scores for 3D label volumes (NumPy only).

Every score comes from one sparse contingency table: the number of voxels
shared by each (ground-truth id, predicted id) pair that actually occurs.
It is counted once, over runs of identical pairs in C order, so the cost is
a few passes over the volume plus a sort of the runs, never a loop over
instances.
"""

from typing import NamedTuple

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from ._backend import as_triple, check_labels, is_cupy_array

__all__ = ["evaluate", "median_diameter"]


class _Contingency(NamedTuple):
    """Sparse voxel counts of every (gt id, pred id) pair present, background included."""

    gt: np.ndarray  # (K,) uint64 ground-truth id of each pair
    pred: np.ndarray  # (K,) uint64 predicted id of each pair
    count: np.ndarray  # (K,) int64 voxels shared by the pair


def evaluate(gt, pred, thresholds=(0.5, 0.75, 0.9)):
    """Score a predicted instance segmentation against the ground truth.

    Parameters
    ----------
    gt, pred : numpy.ndarray, shape (Z, Y, X)
        Label volumes of a non-negative integer dtype; 0 is background.
        Ids need not be consecutive.
    thresholds : sequence of float, optional
        IoU thresholds in [0, 1) for the average-precision keys. A pair
        counts as a true positive when its IoU is strictly above the
        threshold.

    Returns
    -------
    dict
        ``dice``
            Mean over ground-truth instances of the Dice score with the
            predicted instance that overlaps it most (0 where none does).
        ``apNN`` (one per threshold, ``NN = round(100 * t)``)
            ``TP / (TP + FP + FN)`` under an optimal one-to-one matching of
            pairs with IoU above ``t``.
        ``precision50``, ``recall50``
            ``TP / n_pred`` and ``TP / n_gt`` at IoU threshold 0.5.
        ``n_gt``, ``n_pred``
            Number of instances (non-zero ids) in each volume.
        ``arand``
            Adapted Rand error, ``1 - F`` of Rand precision and recall.
        ``voi_split``, ``voi_merge``
            Variation of information in bits: ``H(pred | gt)`` and
            ``H(gt | pred)``.

    Raises
    ------
    TypeError
        For inputs that are not NumPy arrays (CuPy arrays are refused rather
        than copied to the host) or that have a non-integer dtype.
    ValueError
        For non-3D or empty volumes, negative ids, mismatched shapes or bad
        thresholds.

    Notes
    -----
    A score whose denominator is zero is ``nan``: ``dice`` and ``recall50``
    without ground-truth instances, ``precision50`` without predicted ones,
    ``apNN`` when both are empty, ``arand`` and the VOI terms when the
    ground truth has no foreground.

    Matching: for ``t >= 0.5`` a pair with IoU above ``t`` covers more than
    half of both instances, so neither can be in another such pair; the
    candidate pairs already form the unique optimal matching. Below 0.5 the
    true positives are a maximum-cardinality bipartite matching of the
    candidate pairs (Hopcroft-Karp on the sparse graph), which gives the same
    count as ``linear_sum_assignment`` on a dense 0/1 cost matrix without
    building it.

    ``arand``, ``voi_split`` and ``voi_merge`` follow CREMI and PlantSeg in
    ignoring voxels that are background in ``gt``. For ``arand``, as there,
    a voxel that is background in ``pred`` counts as a segment of its own,
    so a missed cell is a full split and an empty prediction scores 1. Rand
    precision and recall count pairs of distinct voxels; the result equals
    ``skimage.metrics.adapted_rand_error(gt, pred2, ignore_labels=(0,))``
    where ``pred2`` gives every background voxel a unique id (skimage itself
    would treat predicted background as one large segment). For the VOI
    terms, predicted background is one ordinary segment, as in CREMI.

    Examples
    --------
    >>> import numpy as np
    >>> gt = np.zeros((1, 4, 4), dtype=np.uint16)
    >>> gt[0, :2, :2] = 1
    >>> gt[0, 2:, 2:] = 2
    >>> scores = evaluate(gt, gt)
    >>> scores["dice"], scores["ap50"], scores["arand"], scores["voi_merge"]
    (1.0, 1.0, 0.0, 0.0)
    """
    gt, pred = _validate_pair(gt, pred)
    thresholds = _validate_thresholds(thresholds)
    table = _contingency(gt, pred)
    return _scores(table, thresholds)


def _validate_pair(gt, pred):
    for name, x in (("gt", gt), ("pred", pred)):
        if is_cupy_array(x):
            raise TypeError(f"{name} is a CuPy array; metrics run on NumPy only, pass cupy.asnumpy({name})")
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    gt = check_labels(gt, "gt")
    pred = check_labels(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} does not match pred shape {pred.shape}")
    return gt, pred


def _validate_thresholds(thresholds):
    values = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"thresholds must be a non-empty sequence of floats, got {thresholds!r}")
    if not np.all((values >= 0) & (values < 1)):
        raise ValueError(f"thresholds must lie in [0, 1), got {thresholds!r}")
    keys = [f"ap{round(100 * t)}" for t in values]
    if len(set(keys)) != len(keys):
        raise ValueError(f"thresholds {thresholds!r} give duplicate keys {keys}")
    return [float(t) for t in values]


def _contingency(gt, pred):
    """Count voxels per (gt, pred) pair from runs of equal pairs in C order.

    Neighbouring voxels mostly share their pair, so sorting one code per run
    instead of per voxel cuts the sort by roughly the mean run length.
    """
    g = gt.ravel()
    p = pred.ravel()
    change = g[1:] != g[:-1]
    change |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    del change
    starts += 1
    starts = np.concatenate(([0], starts))
    lengths = np.diff(starts, append=g.size)
    # uint64 holds (2**32 - 1) * 2**32 + (2**32 - 1) exactly: no overflow for any uint32 ids.
    width = np.uint64(int(p.max()) + 1)
    codes = g[starts].astype(np.uint64) * width + p[starts]
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    lengths = lengths[order]
    first = np.flatnonzero(np.diff(codes)) + 1
    first = np.concatenate(([0], first))
    counts = np.add.reduceat(lengths, first)
    codes = codes[first]
    return _Contingency(gt=codes // width, pred=codes % width, count=counts.astype(np.int64))


def _scores(table, thresholds):
    gt_ids, gt_idx = np.unique(table.gt, return_inverse=True)
    pred_ids, pred_idx = np.unique(table.pred, return_inverse=True)
    gt_size = np.bincount(gt_idx, weights=table.count).astype(np.int64)
    pred_size = np.bincount(pred_idx, weights=table.count).astype(np.int64)
    n_gt = int(np.count_nonzero(gt_ids))
    n_pred = int(np.count_nonzero(pred_ids))

    fg = (table.gt != 0) & (table.pred != 0)
    rows, cols = gt_idx[fg], pred_idx[fg]
    inter = table.count[fg]
    size_g, size_p = gt_size[rows], pred_size[cols]
    iou = inter / (size_g + size_p - inter)
    dice = 2.0 * inter / (size_g + size_p)

    out = {"dice": _mean_best_dice(rows, inter, dice, n_gt)}
    for t in thresholds:
        tp = _true_positives(rows, cols, iou, t)
        out[f"ap{round(100 * t)}"] = _ratio(tp, n_gt + n_pred - tp)
    tp50 = _true_positives(rows, cols, iou, 0.5)
    out["precision50"] = _ratio(tp50, n_pred)
    out["recall50"] = _ratio(tp50, n_gt)
    out["n_gt"] = n_gt
    out["n_pred"] = n_pred

    keep = table.gt != 0  # gt background is ignored by arand and VOI
    out.update(_rand_and_voi(gt_idx[keep], pred_idx[keep], table.count[keep], table.pred[keep] == 0))
    return out


def _ratio(num, den):
    return float(num / den) if den else float("nan")


def _mean_best_dice(rows, inter, dice, n_gt):
    """Mean of each gt instance's Dice with its most overlapping prediction.

    Ties in overlap go to the higher Dice (the smaller prediction).
    """
    if n_gt == 0:
        return float("nan")
    if rows.size == 0:
        return 0.0
    order = np.lexsort((dice, inter, rows))
    rows = rows[order]
    last = np.flatnonzero(np.diff(rows, append=-1))
    # gt instances with no overlapping prediction contribute 0 to the sum
    return float(dice[order][last].sum() / n_gt)


def _true_positives(rows, cols, iou, threshold):
    cand = iou > threshold
    if threshold >= 0.5:
        return int(np.count_nonzero(cand))
    if not np.any(cand):
        return 0
    r, r_idx = np.unique(rows[cand], return_inverse=True)
    c, c_idx = np.unique(cols[cand], return_inverse=True)
    graph = csr_matrix((np.ones(r_idx.size, dtype=np.int8), (r_idx, c_idx)), shape=(r.size, c.size))
    match = maximum_bipartite_matching(graph, perm_type="column")
    return int(np.count_nonzero(match >= 0))


def _rand_and_voi(rows, cols, counts, pred_background):
    """Adapted Rand error and VOI split/merge from gt-foreground pair counts."""
    n = float(counts.sum())
    if n == 0:
        nan = float("nan")
        return {"arand": nan, "voi_split": nan, "voi_merge": nan}
    c = counts.astype(np.float64)
    a = np.bincount(rows, weights=c)  # voxels per gt segment
    b = np.bincount(cols, weights=c)  # voxels per pred segment, background included
    a, b = a[a > 0], b[b > 0]
    fg = ~pred_background
    arand = _adapted_rand(c[fg], a, np.bincount(cols[fg], weights=c[fg]))

    p = c / n
    h_joint = -np.sum(p * np.log2(p))
    h_gt = -np.sum((a / n) * np.log2(a / n))
    h_pred = -np.sum((b / n) * np.log2(b / n))
    return {
        "arand": arand,
        "voi_split": float(max(h_joint - h_gt, 0.0)),  # H(pred | gt)
        "voi_merge": float(max(h_joint - h_pred, 0.0)),  # H(gt | pred)
    }


def _adapted_rand(c_fg, a, b_fg):
    """``1 - F`` of Rand precision and recall over pairs of distinct voxels.

    `c_fg` are the counts of pairs whose pred id is not background, `a` the
    gt segment sizes and `b_fg` the non-background pred segment sizes.
    Predicted background voxels are singletons: they put no two voxels
    together, so they only enter through `a`.
    """
    both = c_fg @ c_fg - c_fg.sum()
    in_gt = a @ a - a.sum()
    in_pred = b_fg @ b_fg - b_fg.sum()
    # a segmentation that puts no two voxels together makes no false merge
    precision = both / in_pred if in_pred else 1.0
    recall = both / in_gt if in_gt else 1.0
    f = 2.0 * precision * recall / (precision + recall) if precision + recall else 0.0
    return float(1.0 - f)


def median_diameter(labels, voxel_size=None, *, exclude=None, weighted=False, min_diameter=None):
    """Median equivalent-sphere diameter of the instances of `labels`, in voxels along x.

    Each instance of ``V`` voxels is measured as the sphere of equal volume,
    ``(6 V / pi) ** (1/3)`` (Cellpose's ``diameter``). With anisotropic
    voxels the volume is taken in physical units and the diameter given in
    voxels along x, the convention of :func:`cp3d.segment`'s ``diameter``.

    Parameters
    ----------
    labels : numpy.ndarray, shape (Z, Y, X)
        Label volume of a non-negative integer dtype; 0 is background.
    voxel_size : float or (float, float, float), optional
        Voxel size (z, y, x), any unit; ``None`` means isotropic voxels.
    exclude : array_like of int, optional
        Ids left out of the median, e.g. the cells cut by the stack's faces
        (:func:`cp3d.filters.border_ids`), which would read small.
    weighted : bool, optional
        Weight each instance by its volume: the diameter of the instance
        holding the median voxel. Many small fragments (an oversegmented
        pass) barely move it, where they pull the plain median down. It reads
        above the plain median wherever sizes vary (large instances hold more
        of the voxels): by 1-9 % on the ground truth of the synthetic stacks.
    min_diameter : float, optional
        Leave out instances whose diameter is below this, e.g. the fragments
        of an oversegmented pass before a plain median.

    Returns
    -------
    float or None
        The median diameter, or ``None`` when no instance is left.

    Examples
    --------
    >>> import numpy as np
    >>> from cp3d.metrics import median_diameter
    >>> labels = np.zeros((10, 10, 10), np.uint8)
    >>> labels[:2, :2, :2] = 1  # 8 voxels: a sphere of diameter 2.48
    >>> round(median_diameter(labels), 2)
    2.48
    >>> round(median_diameter(labels, voxel_size=(2, 1, 1)), 2)  # twice the volume
    3.13
    >>> median_diameter(labels, exclude=[1]) is None
    True
    >>> labels[5:, 5:, 5:] = 2  # 125 voxels
    >>> labels[0, 9, 9], labels[9, 0, 0] = 3, 4  # two 1-voxel fragments
    >>> round(median_diameter(labels), 2), round(median_diameter(labels, weighted=True), 2)
    (1.86, 6.2)
    >>> round(median_diameter(labels, min_diameter=2.0), 2)  # the fragments left out
    4.34
    """
    if is_cupy_array(labels):
        raise TypeError("labels must be a NumPy array; pass cupy.asnumpy(labels)")
    labels = check_labels(labels, "labels")
    vs = as_triple(1.0 if voxel_size is None else voxel_size, "voxel_size")
    volumes = np.bincount(labels.ravel())
    if exclude is not None:
        ids = np.asarray(exclude, dtype=np.int64).ravel()
        volumes[ids[(ids >= 0) & (ids < volumes.size)]] = 0
    volumes = volumes[1:]
    volumes = volumes[volumes > 0]
    if volumes.size == 0:
        return None
    # volume in units of an x-voxel cubed, so the diameter comes out in voxels along x
    volumes = volumes * (vs[0] * vs[1] / vs[2] ** 2)
    diameters = (6.0 * volumes / np.pi) ** (1.0 / 3.0)
    if min_diameter is not None:
        kept = diameters >= float(min_diameter)
        volumes, diameters = volumes[kept], diameters[kept]
        if diameters.size == 0:
            return None
    if not weighted:
        return float(np.median(diameters))
    order = np.argsort(diameters)
    voxels = np.cumsum(volumes[order])
    return float(diameters[order][np.searchsorted(voxels, voxels[-1] / 2)])
