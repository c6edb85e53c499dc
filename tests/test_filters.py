import numpy as np
import pytest

import cp3d
from cp3d.filters import border_ids, filter_instances, instance_statistics, mean_flow_error


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


def test_mean_flow_error_is_the_volume_weighted_instance_error(membrane_cells):
    labels = membrane_cells[1]
    flows = cp3d.tanh_flows(labels, 3.0) + np.float32(0.3) * np.sin(np.arange(labels.size, dtype=np.float32)).reshape(
        labels.shape)
    volume, _, error = instance_statistics(labels, flows, labels > 0, tanh_scale=3.0, backend="numpy")
    expected = (volume * error)[1:].sum() / volume[1:].sum()
    for backend in ("numpy", "numba"):
        assert mean_flow_error(labels, flows, tanh_scale=3.0, backend=backend) == pytest.approx(expected, rel=1e-5)
    # the flows of many cells read as one instance disagree with it
    assert mean_flow_error((labels > 0).astype(np.uint32), flows, tanh_scale=3.0) > 2 * expected
    assert np.isnan(mean_flow_error(np.zeros_like(labels), flows))
    with pytest.raises(ValueError, match="does not match"):
        mean_flow_error(labels, flows[:, 1:])


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


def test_min_border_volume_drops_specks_at_the_stack_border():
    labels = np.zeros((12, 12, 24), np.uint32)
    labels[0, 4:6, 4:6] = 1       # a 4-voxel speck on the top face
    labels[0:3, 4:7, 14:17] = 2   # 27 voxels: a cut cell on the same face
    labels[3:11, 3:11, 9:20] = 3  # a large cell inside, touching neither
    labels[5, 5, 2] = 4           # 1 voxel inside: the interior's lower bound applies, not this one
    flows = cp3d.tanh_flows(labels)
    for backend in ("numpy", "numba"):
        kept = filter_instances(labels, flows, labels > 0, volume_range=(2, 1000), min_border_volume=10,
                                backend=backend)
        assert set(np.unique(kept[labels == 1])) == {0}
        assert kept[labels == 2].min() > 0 and kept[labels == 3].min() > 0
        assert set(np.unique(kept[labels == 4])) == {0}
        # 0, the default, keeps any border instance
        assert filter_instances(labels, flows, labels > 0, volume_range=(2, 1000), backend=backend)[0, 4, 4] > 0
    with pytest.raises(ValueError, match="min_border_volume"):
        filter_instances(labels, flows, labels > 0, min_border_volume=-1)


def test_border_cap_volume_matches_a_counted_cap():
    from cp3d.filters import border_cap_volume

    # a sphere of diameter 40 voxels cut 4 voxels (a tenth) below its top: count the voxels of the cap
    z, y, x = np.mgrid[:40, :40, :40] + 0.5
    inside = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 20**2
    assert border_cap_volume(40, 0.1) == pytest.approx(inside[:4].sum(), rel=0.05)
    # the same fraction of an anisotropic ellipsoid, cut along z
    assert border_cap_volume((10, 40, 40), 0.1) == pytest.approx(border_cap_volume(40, 0.1) / 4)
    with pytest.raises(ValueError, match="depth"):
        border_cap_volume(10, 1.5)


def test_border_ids():
    labels = np.zeros((4, 5, 6), np.uint32)
    labels[1:3, 1:4, 1:5] = 3
    labels[3, 2, 2] = 8
    labels[1, 1, 5] = 9
    assert border_ids(labels).tolist() == [8, 9]


@pytest.mark.parametrize("scale, inward", [(5.0, False), ((2.0, 3.0, 4.0), True)])
def test_host_statistics_kernel_matches_numpy(scale, inward, membrane_cells, host_library):
    """The per-voxel body of the fused CUDA statistics pass (kernels/filters.cuh), built for the host."""
    import ctypes

    stats_fn = host_library.cp3d_host_tanh_statistics
    i64, f32 = ctypes.c_int64, ctypes.c_float
    stats_fn.argtypes = [ctypes.c_void_p] * 3 + [i64] * 4 + [f32] * 4 + [ctypes.c_void_p]
    stats_fn.restype = None
    labels = membrane_cells[1]
    rng = np.random.default_rng(1)
    flows = (cp3d.tanh_flows(labels, scale) * (-1 if inward else 1)
             + rng.normal(0, 0.2, (3, *labels.shape))).astype(np.float32)
    fg = rng.random(labels.shape) < 0.9
    n = int(labels.max())
    out = np.full(3 * (n + 1), np.nan)
    scales = scale if isinstance(scale, tuple) else (scale,) * 3
    stats_fn(labels.ctypes.data, flows.ctypes.data, fg.astype(np.uint8).ctypes.data, *labels.shape, n, *scales,
             np.float32(-1 if inward else 1), out.ctypes.data)
    volume, inside, error = out.reshape(-1, 3)[1:].T  # entry 0, the background, is not summed
    ref_volume, ref_overlap, ref_error = (a[1:] for a in instance_statistics(
        labels, flows, fg, tanh_scale=scale, inward=inward, backend="numpy"))
    np.testing.assert_array_equal(volume, ref_volume)
    np.testing.assert_allclose(inside / np.maximum(volume, 1), ref_overlap, rtol=1e-12)
    np.testing.assert_allclose(error / (3 * np.maximum(volume, 1)), ref_error, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_statistics_match_numpy(membrane_cells):
    import cupy

    labels = membrane_cells[1]
    flows = cp3d.tanh_flows(labels, 4.0) + np.float32(0.1)
    ref = instance_statistics(labels, flows, labels > 0, tanh_scale=4.0, backend="numpy")
    out = instance_statistics(cupy.asarray(labels), cupy.asarray(flows), cupy.asarray(labels > 0), tanh_scale=4.0,
                              backend="cuda")
    np.testing.assert_array_equal(out[0].get()[1:], ref[0][1:])
    for got, want in zip(out[1:], ref[1:]):
        np.testing.assert_allclose(got.get()[1:], want[1:], rtol=1e-5, atol=1e-6)
