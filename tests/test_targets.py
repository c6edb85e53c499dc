"""Tests for cp3d.targets: tanh and heat-diffusion flows."""

import ctypes

import numpy as np
import pytest
from scipy import ndimage

from cp3d.targets import heat_flows, tanh_flows

CPU_BACKENDS = ("numpy", "numba")


def voronoi_labels(shape=(16, 20, 24), n_cells=10, seed=0, radius=6.0, id_step=7):
    """A tiny Voronoi labelling: cells grown from random seeds, cut off at `radius`.

    Ids are ``id_step, 2 * id_step, ...`` so they are not consecutive.
    """
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, dtype=np.int32)
    points = rng.integers(0, shape, size=(n_cells, 3))
    seeds[tuple(points.T)] = np.arange(1, n_cells + 1) * id_step
    dist, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(nearest)]
    labels[dist > radius] = 0
    return labels


def box_labels(shape=(7, 9, 11), box=(slice(1, 6), slice(2, 7), slice(3, 10)), value=1, dtype=np.uint16):
    labels = np.zeros(shape, dtype=dtype)
    labels[box] = value
    return labels


def coordinates(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64)


# ---------------------------------------------------------------------------
# tanh flows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tanh_single_box_known_answer(backend):
    labels = box_labels()
    flows = tanh_flows(labels, scale=2.0, backend=backend)
    assert flows.shape == (3,) + labels.shape and flows.dtype == np.float32
    centre = np.array([3.0, 4.0, 6.0])  # odd-sized box: the centroid is a voxel
    expected = np.tanh((coordinates(labels.shape) - centre[:, None, None, None]) / 2.0)
    expected *= labels > 0
    np.testing.assert_allclose(flows, expected, atol=1e-6)
    # antisymmetric about the centre, outward, bounded, zero on background
    inside = flows[:, 1:6, 2:7, 3:10]
    np.testing.assert_allclose(inside, -inside[:, ::-1, ::-1, ::-1], atol=1e-6)
    assert flows[0, 5, 4, 6] > 0 and flows[0, 1, 4, 6] < 0
    assert flows[2, 3, 4, 9] > 0 and flows[2, 3, 4, 3] < 0
    assert np.all(np.abs(flows) < 1)
    assert np.all(flows[:, labels == 0] == 0)
    assert np.all(flows[:, 3, 4, 6] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tanh_even_box_centroid_between_voxels(backend):
    labels = np.zeros((1, 1, 6), dtype=np.int32)
    labels[0, 0, 1:5] = 3  # centroid x = 2.5
    flows = tanh_flows(labels, scale=(1.0, 1.0, 0.5), backend=backend)
    # (x - 2.5) / 0.5 = -3, -1, 1, 3 on the cell
    expected = np.tanh(np.array([0.0, -3.0, -1.0, 1.0, 3.0, 0.0]))
    np.testing.assert_allclose(flows[2, 0, 0], expected, atol=1e-6)
    assert np.all(flows[:2] == 0)  # a single voxel thick along z and y


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tanh_two_cells_and_non_consecutive_ids(backend):
    labels = np.zeros((5, 6, 12), dtype=np.int64)
    labels[1:4, 1:5, 1:4] = 1000  # centroid (2, 2.5, 2)
    labels[1:4, 1:5, 4:11] = 5  # touching neighbour, centroid (2, 2.5, 7)
    flows = tanh_flows(labels, scale=3.0, backend=backend)
    coords = coordinates(labels.shape)
    for value, centre in ((1000, (2.0, 2.5, 2.0)), (5, (2.0, 2.5, 7.0))):
        mask = labels == value
        expected = np.tanh((coords[:, mask] - np.array(centre)[:, None]) / 3.0)
        np.testing.assert_allclose(flows[:, mask], expected, atol=1e-6)
    # across the shared wall the x flows point away from each other
    assert flows[2, 2, 2, 3] > 0 and flows[2, 2, 2, 4] < 0
    # relabelling does not change the flows
    relabelled = np.where(labels == 1000, 1, np.where(labels == 5, 2, 0)).astype(np.uint8)
    np.testing.assert_array_equal(tanh_flows(relabelled, scale=3.0, backend=backend), flows)


def test_tanh_huge_sparse_ids():
    labels = box_labels(value=4_000_000_000, dtype=np.uint32)
    labels[0, 0, 0] = 17
    expected = tanh_flows((labels > 17).astype(np.uint8) * 2 + (labels == 17), backend="numpy")
    for backend in CPU_BACKENDS:
        np.testing.assert_allclose(tanh_flows(labels, backend=backend), expected, atol=1e-6)


@pytest.mark.parametrize("scale", [5.0, (2.0, 4.0, 4.0)])
def test_tanh_numpy_numba_agree(scale):
    labels = voronoi_labels()
    ref = tanh_flows(labels, scale=scale, backend="numpy")
    np.testing.assert_allclose(tanh_flows(labels, scale=scale, backend="numba"), ref, atol=1e-5)
    np.testing.assert_allclose(tanh_flows(labels, scale=scale), ref, atol=1e-5)  # auto = numba


def test_tanh_all_background():
    labels = np.zeros((3, 4, 5), dtype=np.uint8)
    for backend in CPU_BACKENDS:
        assert not tanh_flows(labels, backend=backend).any()


@pytest.mark.parametrize("scale", [0.0, -1.0, (1.0, 2.0), np.nan])
def test_tanh_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        tanh_flows(box_labels(), scale=scale)


# ---------------------------------------------------------------------------
# heat flows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_heat_box_unit_and_outward(backend):
    labels = box_labels(shape=(11, 13, 15), box=(slice(1, 10), slice(2, 11), slice(3, 14)))
    flows = heat_flows(labels, backend=backend)
    assert flows.shape == (3,) + labels.shape and flows.dtype == np.float32
    fg = labels > 0
    norm = np.sqrt((flows**2).sum(axis=0))
    np.testing.assert_allclose(norm[fg & (norm > 0)], 1.0, atol=1e-5)
    assert (norm[fg] == 0).mean() < 0.05
    assert np.all(flows[:, ~fg] == 0)
    outward = coordinates(labels.shape)[:, fg] - np.array([5.0, 6.0, 8.0])[:, None]
    dots = (flows[:, fg] * outward).sum(axis=0)
    assert (dots > 0).mean() > 0.9
    # the faces point straight out
    np.testing.assert_allclose(flows[:, 1, 6, 8], [-1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(flows[:, 5, 6, 13], [0, 0, 1], atol=1e-6)


def test_heat_source_inside_non_convex_cell():
    # A U-shaped cell: its centroid lies in the notch, outside the cell.
    labels = np.zeros((5, 14, 14), dtype=np.uint8)
    labels[1:4, 1:13, 1:4] = 1
    labels[1:4, 1:13, 10:13] = 1
    labels[1:4, 10:13, 1:13] = 1
    flows = heat_flows(labels, backend="numpy")
    fg = labels > 0
    norm = np.sqrt((flows**2).sum(axis=0))
    assert (np.abs(norm[fg] - 1) < 1e-5).mean() > 0.95
    # at both tips of the U the flow points away along y (up the arms, away from the bend)
    assert flows[1, 2, 1, 2] < -0.5 and flows[1, 2, 1, 11] < -0.5


def test_heat_two_cells_independent():
    # Each cell diffuses on its own: a touching neighbour changes nothing.
    one = np.zeros((7, 8, 16), dtype=np.int32)
    one[1:6, 1:7, 1:8] = 3
    two = one.copy()
    two[1:6, 1:7, 8:15] = 9
    alone = heat_flows(one, n_iter=20, backend="numpy")
    both = heat_flows(two, n_iter=20, backend="numpy")
    np.testing.assert_array_equal(both[:, one > 0], alone[:, one > 0])
    assert np.all(both[:, two == 0] == 0)
    assert both[2, 3, 3, 7] > 0 and both[2, 3, 3, 8] < 0  # away from each other across the wall


@pytest.mark.parametrize("n_iter", [None, 7])
def test_heat_numpy_numba_agree(n_iter):
    labels = voronoi_labels(seed=1)
    ref = heat_flows(labels, n_iter=n_iter, backend="numpy")
    np.testing.assert_allclose(heat_flows(labels, n_iter=n_iter, backend="numba"), ref, atol=1e-4)
    fg = labels > 0
    norm = np.sqrt((ref**2).sum(axis=0))
    assert (np.abs(norm[fg] - 1) < 1e-5).mean() > 0.95
    assert np.all(ref[:, ~fg] == 0)


def test_heat_in_slices_of_iterations_is_the_same(monkeypatch):
    import cp3d.targets

    labels = voronoi_labels(seed=1)
    whole = heat_flows(labels, n_iter=23, backend="numba")
    # slices of 4 iterations, the last of 3: an odd count, so the buffers swap across calls
    monkeypatch.setattr(cp3d.targets, "_HEAT_SLICE_READS", 4 * 27 * int((labels > 0).sum()))
    np.testing.assert_array_equal(heat_flows(labels, n_iter=23, backend="numba"), whole)


def test_ctrl_c_interrupts_a_long_numba_heat_diffusion(assert_ctrl_c_interrupts):
    assert_ctrl_c_interrupts(
        "import numpy as np, cp3d\n"
        "labels = np.ones((32, 64, 64), np.uint32)\n"
        "cp3d.heat_flows(labels, n_iter=2)  # compiled (or loaded from the cache) first\n"
        "print('running', flush=True)\n"
        "cp3d.heat_flows(labels, n_iter=10**7)\n"
    )


def test_heat_neighbour_tables_agree():
    from cp3d.targets import _heat_sources, _neighbour_table, _numba_neighbour_table

    labels = np.ascontiguousarray(voronoi_labels(seed=5), dtype=np.uint32)
    fg, sources, n_iter = _heat_sources(labels)
    assert sources.size == 10 and n_iter > 0
    assert np.all(labels.ravel()[fg[sources]] == np.arange(1, 11) * 7)  # sources lie inside
    np.testing.assert_array_equal(_numba_neighbour_table(labels, fg), _neighbour_table(labels, fg))


def test_heat_synthetic_stack_agree():
    data = pytest.importorskip("cp3d.data")
    if not hasattr(data, "synthetic_stack"):
        pytest.skip("cp3d.data.synthetic_stack not available")
    labels = np.asarray(data.synthetic_stack((16, 24, 24), 8.0, kind="nuclei", seed=3).labels)
    np.testing.assert_allclose(
        heat_flows(labels, backend="numba"), heat_flows(labels, backend="numpy"), atol=1e-4
    )
    np.testing.assert_allclose(
        tanh_flows(labels, backend="numba"), tanh_flows(labels, backend="numpy"), atol=1e-5
    )


def test_heat_single_voxel_and_background():
    labels = np.zeros((3, 3, 3), dtype=np.uint8)
    assert not heat_flows(labels).any()
    labels[1, 1, 1] = 2
    for backend in CPU_BACKENDS:
        assert not heat_flows(labels, backend=backend).any()  # no gradient in a single voxel


@pytest.mark.parametrize("n_iter, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
def test_heat_bad_n_iter(n_iter, error):
    with pytest.raises(error, match="n_iter"):
        heat_flows(box_labels(), n_iter=n_iter)


# ---------------------------------------------------------------------------
# validation and backends
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("func", [tanh_flows, heat_flows])
def test_backend_errors(func):
    with pytest.raises(TypeError, match="CuPy"):
        func(box_labels(), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        func(box_labels(), backend="torch")


@pytest.mark.parametrize("func", [tanh_flows, heat_flows])
def test_bad_labels(func):
    with pytest.raises(TypeError, match="integer"):
        func(box_labels().astype(np.float32))
    with pytest.raises(ValueError, match="3D"):
        func(np.ones((4, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="non-negative"):
        func(-box_labels().astype(np.int16))


@pytest.mark.parametrize("func", [tanh_flows, heat_flows])
def test_accepts_non_contiguous_and_lists(func):
    labels = voronoi_labels(shape=(8, 10, 12), n_cells=4)
    ref = func(np.ascontiguousarray(labels.transpose(2, 1, 0)), backend="numpy")
    np.testing.assert_array_equal(func(labels.transpose(2, 1, 0), backend="numpy"), ref)
    np.testing.assert_array_equal(func(labels.tolist(), backend="numpy"), func(labels, backend="numpy"))


# ---------------------------------------------------------------------------
# the CUDA kernels: host build everywhere, device where there is one
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [(5.0, 5.0, 5.0), (1.5, 3.0, 4.0)])
def test_host_kernels_match_numpy(scale, host_library):
    host_tanh_flows = host_library.cp3d_host_tanh_flows
    i64, f32 = ctypes.c_int64, ctypes.c_float
    host_tanh_flows.argtypes = [ctypes.c_void_p, i64, i64, i64, i64, f32, f32, f32, ctypes.c_void_p]
    host_tanh_flows.restype = None
    labels = voronoi_labels(seed=2)
    # the host entry point takes compact ids 0..K
    compact = np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.uint32)
    n_labels = int(compact.max())
    flows = np.full((3,) + labels.shape, np.nan, dtype=np.float32)
    host_tanh_flows(compact.ctypes.data, *labels.shape, n_labels, *scale, flows.ctypes.data)
    np.testing.assert_allclose(flows, tanh_flows(labels, scale=scale, backend="numpy"), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("func, tol", [(tanh_flows, 1e-5), (heat_flows, 1e-4)])
def test_cuda_matches_numpy(func, tol):
    import cupy  # the gpu marker (conftest.py) skips this without CuPy and a device

    labels = voronoi_labels(shape=(20, 24, 28), n_cells=12, seed=4)
    ref = func(labels, backend="numpy")
    out = func(cupy.asarray(labels))  # auto = cuda for CuPy input
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(cupy.asnumpy(out), ref, atol=tol)
    with pytest.raises(TypeError):
        func(cupy.asarray(labels), backend="numba")


@pytest.mark.parametrize("n_iter", [1, 7])
def test_host_heat_kernels_match_numpy(n_iter, host_library):
    """The per-voxel bodies of kernels/heat.cu, built for the host, against the NumPy diffusion."""
    from cp3d.targets import _heat_sources, _neighbour_table, _numpy_heat_flows

    host_heat = host_library.cp3d_host_heat_flows
    host_heat.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                          ctypes.c_void_p]
    host_heat.restype = None
    labels = voronoi_labels(seed=5)
    fg, sources, _ = _heat_sources(labels.astype(np.uint32))
    nbr = np.ascontiguousarray(_neighbour_table(labels.astype(np.uint32), fg), np.int32)
    sources = np.ascontiguousarray(sources, np.int64)
    out = np.full((3, fg.size), np.nan, np.float32)
    host_heat(nbr.ctypes.data, fg.size, sources.ctypes.data, sources.size, n_iter, out.ctypes.data)
    np.testing.assert_array_equal(out, _numpy_heat_flows(nbr, sources, n_iter))
