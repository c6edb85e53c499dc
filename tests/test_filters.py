import numpy as np
import pytest

import cp3d
from cp3d.filters import border_ids, filter_instances, instance_statistics


def two_cells():
    labels = np.zeros((12, 12, 24), np.uint32)
    labels[1:11, 1:11, 1:11] = 5
    labels[1:11, 1:11, 13:23] = 2
    return labels


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_consistent_instances_are_kept_and_renumbered(backend):
    labels = two_cells()
    kept = filter_instances(labels, cp3d.tanh_flows(labels), labels > 0, backend=backend)
    np.testing.assert_array_equal(kept, np.where(labels == 5, 1, np.where(labels == 2, 2, 0)))


def test_each_criterion_drops_its_instance():
    labels = two_cells()
    flows = cp3d.tanh_flows(labels)
    fg = labels > 0
    # size: cell volume is 1000 voxels
    assert filter_instances(labels, flows, fg, volume_range=(1001, 2000)).max() == 0
    # overlap: only 10% of the second cell in the foreground
    partial = fg.copy()
    partial[:, :, 14:23] = False
    assert np.unique(filter_instances(labels, flows, partial)).tolist() == [0, 1]
    # flow error: the second cell's predicted flows are reversed (error ~ 2 |flow|)
    wrong = flows.copy()
    wrong[:, labels == 2] *= -1
    stats = instance_statistics(labels, wrong, fg)
    assert stats[2][5] == 0 and stats[2][2] > 0.8
    assert np.unique(filter_instances(labels, wrong, fg)).tolist() == [0, 1]
    # the inward sign: the same flows negated, flagged as inward, are consistent
    assert filter_instances(labels, -flows, fg, inward=True).max() == 2


def test_heat_targets_recomputed_with_heat():
    labels = two_cells()
    kept = filter_instances(labels, cp3d.heat_flows(labels), labels > 0, targets="heat")
    assert kept.max() == 2


def test_numba_identical_to_numpy(membrane_cells):
    labels = membrane_cells[1]
    flows = cp3d.tanh_flows(labels) + np.float32(0.3) * np.sin(np.arange(labels.size, dtype=np.float32)).reshape(
        labels.shape)
    kw = dict(volume_range=(100, 400), max_flow_error=0.5)
    ref = filter_instances(labels, flows, labels > 0, backend="numpy", **kw)
    assert 0 < ref.max() < labels.max()
    np.testing.assert_array_equal(filter_instances(labels, flows, labels > 0, backend="numba", **kw), ref)


def test_bad_input():
    labels = two_cells()
    flows = cp3d.tanh_flows(labels)
    with pytest.raises(ValueError, match="does not match"):
        filter_instances(labels, flows[:, :-1], labels > 0)
    with pytest.raises(ValueError, match="targets"):
        filter_instances(labels, flows, labels > 0, targets="sdf")
    with pytest.raises(ValueError, match="volume_range"):
        filter_instances(labels, flows, labels > 0, volume_range=(10, 1))
    with pytest.raises(TypeError, match="integer"):
        filter_instances(labels.astype(float), flows, labels > 0)
    with pytest.raises(ValueError, match="min_overlap"):
        filter_instances(labels, flows, labels > 0, min_overlap=1.5)
    with pytest.raises(TypeError, match="max_flow_error"):
        filter_instances(labels, flows, labels > 0, max_flow_error="0.8")


def test_max_flow_error_none_keeps_any_error():
    labels = two_cells()
    wrong = -cp3d.tanh_flows(labels)  # inward flows: a large error for both cells
    assert filter_instances(labels, wrong, labels > 0).max() == 0
    kept = filter_instances(labels, wrong, labels > 0, max_flow_error=None)
    assert kept.max() == 2 and set(np.unique(kept[labels == 5])) == {1} and set(np.unique(kept[labels == 2])) == {2}


def test_lower_size_bound_waived_at_the_stack_border():
    labels = np.zeros((12, 12, 24), np.uint32)
    labels[4:7, 4:7, 4:7] = 1     # 27 voxels inside the volume
    labels[0:3, 4:7, 14:17] = 2   # 27 voxels touching the top face
    labels[3:11, 3:11, 9:20] = 3  # a large cell inside, touching neither
    flows = cp3d.tanh_flows(labels)
    for backend in ("numpy", "numba"):
        kept = filter_instances(labels, flows, labels > 0, volume_range=(50, 1000), backend=backend)
        assert set(np.unique(kept[labels == 1])) == {0}
        assert kept[labels == 2].min() > 0 and kept[labels == 3].min() > 0
        # the upper bound still applies at the border
        assert set(np.unique(filter_instances(labels, flows, labels > 0, volume_range=(0, 20))[labels == 2])) == {0}


def test_border_ids():
    labels = np.zeros((4, 5, 6), np.uint32)
    labels[1:3, 1:4, 1:5] = 3
    labels[3, 2, 2] = 8
    labels[1, 1, 5] = 9
    assert border_ids(labels).tolist() == [8, 9]
