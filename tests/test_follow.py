import ctypes

import numpy as np
import pytest
from conftest import ptr, random_flows

import cp3d
from cp3d.follow import follow_flows


def box(shape=(10, 12, 14)):
    labels = np.zeros(shape, np.uint32)
    labels[1:-1, 2:-2, 3:-3] = 1
    return labels


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_voxels_gather_at_the_centre(backend):
    labels = box()
    end = follow_flows(cp3d.tanh_flows(labels), labels > 0, backend=backend)
    centre = np.argwhere(labels).mean(axis=0)
    assert end.shape == (labels.sum(), 3) and end.dtype == np.float32
    assert np.abs(end - centre).max() < 1.0


def test_step_semantics_one_iteration():
    flows = np.zeros((3, 4, 4, 4), np.float32)
    flows[:, 2, 2, 2] = (0.25, -0.5, 1.0)
    fg = np.zeros((4, 4, 4), bool)
    fg[2, 2, 2] = True
    end = follow_flows(flows, fg, step=2.0, n_iter=1, backend="numpy")
    np.testing.assert_array_equal(end, [[1.5, 3.0, 0.0]])  # moved against the flow, x clipped at 0
    inward = follow_flows(-flows, fg, step=2.0, n_iter=1, inward=True, backend="numpy")
    np.testing.assert_array_equal(inward, end)


def test_positions_stay_inside_the_volume():
    flows = random_flows((6, 7, 8), seed=1) * 5
    end = follow_flows(flows, np.ones((6, 7, 8), bool), step=3.0, n_iter=7, backend="numpy")
    assert end.min() >= 0 and np.all(end.max(axis=0) <= np.array([5, 6, 7]))


@pytest.mark.parametrize("n_iter", [0, 1, 13])
def test_numba_identical_to_numpy(n_iter):
    flows = random_flows((9, 17, 23), seed=2)
    fg = np.random.default_rng(3).random((9, 17, 23)) > 0.4
    ref = follow_flows(flows, fg, step=4.0, n_iter=n_iter, backend="numpy")
    np.testing.assert_array_equal(follow_flows(flows, fg, step=4.0, n_iter=n_iter, backend="numba"), ref)


@pytest.mark.parametrize("halo", [2, 30])
def test_follow_in_window_ends_where_the_whole_field_follow_ends(halo):
    # A chunk's voxels followed through the chunk and a halo: the nearest voxel of the whole-field end position,
    # or -1 where a trajectory left the window; moved is the largest distance over the others.
    from cp3d.follow import follow_in_window

    shape = (9, 17, 23)
    flows = random_flows(shape, seed=4)
    fg = np.random.default_rng(5).random(shape) > 0.4
    end = follow_flows(flows, fg, step=3.0, n_iter=7, backend="numpy")
    nearest = np.floor(end + np.float32(0.5)).astype(np.int64)
    ends_whole = np.full(shape, -1, np.int64)
    ends_whole[fg] = np.ravel_multi_index(tuple(nearest.T), shape)
    block = (slice(3, 7), slice(5, 12), slice(8, 15))
    window = tuple(slice(max(0, s.start - halo), min(n, s.stop + halo)) for s, n in zip(block, shape))
    starts = np.flatnonzero(fg[block])
    ends, moved = follow_in_window(flows[(slice(None),) + window], [s.start for s in window], shape, block, starts,
                                   3.0, 7)
    expected = ends_whole[block].reshape(-1)[starts]
    stayed = ends >= 0
    np.testing.assert_array_equal(ends[stayed], expected[stayed])
    if halo > max(shape):
        assert stayed.all()
    else:
        assert not stayed.all()  # random flows over 7 steps of 3 voxels leave a 2-voxel halo
    start_voxels = np.stack(np.unravel_index(starts, fg[block].shape), axis=1) + [s.start for s in block]
    end_voxels = np.stack(np.unravel_index(expected[stayed], shape), axis=1)
    np.testing.assert_array_equal(moved, np.abs(end_voxels - start_voxels[stayed]).max(axis=0))


def test_host_kernel_identical_to_numpy(host_library):
    flows = random_flows((9, 17, 23), seed=4)
    fg = np.random.default_rng(5).random((9, 17, 23)) > 0.5
    starts = np.flatnonzero(fg).astype(np.int64)
    out = np.empty((starts.size, 3), np.float32)
    fn = host_library.cp3d_host_follow_flows
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_longlong] * 4 + [ctypes.c_float, ctypes.c_int,
                                                                              ctypes.c_void_p]
    fn(ptr(flows), ptr(starts), starts.size, 9, 17, 23, 4.0, 11, ptr(out))
    np.testing.assert_array_equal(out, follow_flows(flows, fg, step=4.0, n_iter=11, backend="numpy"))


def test_smoothing_follows_the_gaussian_smoothed_field():
    from scipy import ndimage

    flows = random_flows((9, 10, 11), seed=4)
    fg = np.random.default_rng(5).random((9, 10, 11)) > 0.5
    smoothed = ndimage.gaussian_filter(flows, sigma=(0, 1.5, 1.5, 1.5), mode="nearest")
    for backend in ("numpy", "numba"):
        end = follow_flows(flows, fg, sigma=1.5, n_iter=5, backend=backend)
        np.testing.assert_array_equal(end, follow_flows(smoothed, fg, n_iter=5, backend=backend))
        assert not np.array_equal(end, follow_flows(flows, fg, n_iter=5, backend=backend))
    for sigma in (-1, np.nan, 100):  # beyond the longest axis (11) smoothing only averages the field flat
        with pytest.raises(ValueError, match="sigma"):
            follow_flows(flows, fg, sigma=sigma)


def test_long_runs_in_slices_give_the_same_positions(monkeypatch):
    import cp3d.follow

    flows = random_flows((9, 17, 23), seed=2)
    fg = np.random.default_rng(3).random((9, 17, 23)) > 0.4
    whole = follow_flows(flows, fg, step=4.0, n_iter=37, backend="numba")
    assert fg.sum() > 2 * cp3d.follow._CHUNK
    # slices of 1024 points (the last one shorter), each in slices of 4 iterations (the last of 1)
    monkeypatch.setattr(cp3d.follow, "_SLICE_STEPS", 4 * cp3d.follow._CHUNK)
    np.testing.assert_array_equal(follow_flows(flows, fg, step=4.0, n_iter=37, backend="numba"), whole)
    np.testing.assert_array_equal(follow_flows(flows, fg, step=4.0, n_iter=37, backend="numpy"), whole)


@pytest.mark.gpu
def test_cuda_follow_in_slices_gives_the_same_positions(monkeypatch):
    import cupy

    import cp3d.follow

    flows = random_flows((9, 17, 23), seed=2)
    fg = np.random.default_rng(3).random((9, 17, 23)) > 0.4
    ref = follow_flows(flows, fg, step=4.0, n_iter=37, backend="numpy")
    monkeypatch.setattr(cp3d.follow, "_CUDA_SLICE_STEPS", 5 * int(fg.sum()))  # slices of 5 iterations, the last of 2
    out = follow_flows(cupy.asarray(flows), cupy.asarray(fg), step=4.0, n_iter=37)
    np.testing.assert_array_equal(out.get(), ref)


@pytest.mark.gpu
def test_ctrl_c_interrupts_a_long_cuda_follow(assert_ctrl_c_interrupts):
    assert_ctrl_c_interrupts(
        "import cupy, cp3d\n"
        "flows = cupy.random.default_rng(0).uniform(-1, 1, (3, 64, 256, 256), dtype=cupy.float32)\n"
        "fg = cupy.ones((64, 256, 256), bool)\n"
        "cp3d.follow_flows(flows, fg, n_iter=1)\n"
        "cupy.cuda.Device().synchronize()\n"
        "print('running', flush=True)\n"
        "cp3d.follow_flows(flows, fg, n_iter=2**31 - 1)\n"
        "cupy.cuda.Device().synchronize()\n"
    )


def test_ctrl_c_interrupts_a_long_numba_follow(assert_ctrl_c_interrupts):
    """n_iter=10**7 would run for minutes; SIGINT must end it within seconds, not when the kernel ends."""
    assert_ctrl_c_interrupts(
        "import numpy as np, cp3d\n"
        "flows = np.random.default_rng(0).uniform(-1, 1, (3, 16, 64, 64)).astype(np.float32)\n"
        "fg = np.ones((16, 64, 64), bool)\n"
        "cp3d.follow_flows(flows, fg, n_iter=1)  # compiled (or loaded from the cache) first\n"
        "print('running', flush=True)\n"
        "cp3d.follow_flows(flows, fg, n_iter=10**7)\n"
    )


@pytest.mark.parametrize(
    "flows, fg, kwargs, error, match",
    [
        (np.full((3, 4, 4, 4), np.nan, np.float32), np.ones((4, 4, 4), bool), {}, ValueError, "NaN"),
        (np.zeros((2, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {}, ValueError, r"\(3, Z, Y, X\)"),
        (np.zeros((3, 4, 4, 4), np.int16), np.ones((4, 4, 4), bool), {}, TypeError, "floating"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 5), bool), {}, ValueError, "does not match"),
        (np.zeros((3, 4, 4), np.float32), np.ones((4, 4), bool), {}, ValueError, "4D"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"step": 0}, ValueError, "step"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"n_iter": -1}, ValueError, "n_iter"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"n_iter": 2**63}, ValueError, "n_iter"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"n_iter": np.nan}, TypeError, "n_iter"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"step": 3.5e38}, ValueError, "step"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"step": "4"}, TypeError, "step"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"inward": "no"}, TypeError, "inward"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"backend": "cuda"}, TypeError, "CuPy"),
    ],
)
def test_bad_input(flows, fg, kwargs, error, match):
    with pytest.raises(error, match=match):
        follow_flows(flows, fg, **kwargs)
