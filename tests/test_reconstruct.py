import subprocess
import sys
import warnings

import numpy as np
import pytest

import cp3d
from cp3d.data import synthetic_stack
from cp3d.metrics import evaluate
from cp3d.filters import border_ids
from cp3d.reconstruct import reconstruction_parameters

CASES = {
    "membrane d7": dict(cell_diameter=7),
    "membrane d10": dict(cell_diameter=10),
    "membrane d14": dict(cell_diameter=14),
    "elongated": dict(cell_diameter=10, anisotropy=(2, 1, 1)),
    "nuclei": dict(cell_diameter=10, kind="nuclei"),
}


def oracle_flows(labels, targets, diameter):
    if targets == "tanh":
        return cp3d.tanh_flows(labels, scale=reconstruction_parameters(diameter).tanh_scale)
    return cp3d.heat_flows(labels)


@pytest.mark.parametrize("targets", ["tanh", "heat"])
@pytest.mark.parametrize("case", CASES)
def test_oracle_accuracy_with_diameter(case, targets):
    kwargs = CASES[case]
    _, truth = synthetic_stack((40, 80, 80), seed=5, **kwargs)
    d = kwargs["cell_diameter"]
    labels = cp3d.reconstruct(oracle_flows(truth, targets, d), truth > 0, diameter=d, targets=targets)
    scores = evaluate(truth, labels)
    assert scores["ap50"] >= 0.97 and scores["dice"] >= 0.98, scores


@pytest.mark.parametrize("targets", ["tanh", "heat"])
def test_oracle_accuracy_with_paper_defaults(targets):
    _, truth = synthetic_stack((40, 80, 80), 10, seed=6)
    flows = cp3d.tanh_flows(truth) if targets == "tanh" else cp3d.heat_flows(truth)
    assert evaluate(truth, cp3d.reconstruct(flows, truth > 0, targets=targets))["ap50"] >= 0.97


@pytest.mark.parametrize("kind, diameter, shape", [
    ("nuclei", 30, (64, 128, 128)),
    ("nuclei", 45, (90, 144, 144)),
    ("membrane", 60, (96, 192, 192)),
])
def test_fixed_scale_flows_of_large_cells(kind, diameter, shape):
    """The released Cellpose3D code trains tanh flows of scale 5 whatever the cell size."""
    _, truth = synthetic_stack(shape, diameter, kind=kind, seed=2)
    labels = cp3d.reconstruct(cp3d.tanh_flows(truth, 5.0), truth > 0, diameter=diameter, tanh_scale=5)
    scores = evaluate(truth, labels)
    assert scores["ap50"] >= 0.97 and scores["dice"] >= 0.98, scores


def test_step_follows_the_tanh_scale():
    assert reconstruction_parameters(41, tanh_scale=5).step == 4.0
    assert reconstruction_parameters(41).step == pytest.approx(0.8 * 20.5)
    assert reconstruction_parameters(None, tanh_scale=10).step == 8.0
    # a smaller step needs more iterations to cover the same distance
    assert reconstruction_parameters(41, tanh_scale=5).n_iter > reconstruction_parameters(41).n_iter


@pytest.mark.parametrize("diameter", [12, 16])
def test_cells_cut_by_the_stack_border_are_kept(diameter):
    """A crop of a tissue: most cells touch the border, many are cut to slivers."""
    _, tissue = synthetic_stack((64, 128, 128), diameter, seed=4)
    crop = tissue[20:50, 30:90, 30:90]
    truth = np.unique(crop, return_inverse=True)[1].reshape(crop.shape).astype(np.uint32)
    assert len(border_ids(truth)) > 0.8 * truth.max()
    flows = cp3d.tanh_flows(truth, diameter / 2)
    labels = cp3d.reconstruct(flows, truth > 0, diameter=diameter)
    assert evaluate(truth, labels)["ap50"] >= 0.85


def test_convention_slips_are_warned_not_silent(membrane_cells):
    """Cellpose's dP (inward, 5 times the unit flows) given as cp3d flows."""
    truth = membrane_cells[1]
    dP = -5 * cp3d.heat_flows(truth)
    with pytest.warns(UserWarning) as record:
        labels = cp3d.reconstruct(dP, truth > 0)
    messages = " ".join(str(w.message) for w in record)
    assert "5 times" in messages and "inward=True" in messages
    if labels.max() == 0:
        assert "dropped them all" in messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cp3d.reconstruct(dP / 5, truth > 0, inward=True, targets="heat", diameter=8)
        cp3d.reconstruct(cp3d.tanh_flows(truth, 4.0), truth > 0, diameter=8)


def test_paper_defaults_merge_small_cells_that_the_diameter_knob_keeps():
    _, truth = synthetic_stack((40, 80, 80), 7, seed=7)
    paper = evaluate(truth, cp3d.reconstruct(cp3d.tanh_flows(truth), truth > 0))["ap50"]
    tuned = evaluate(truth, cp3d.reconstruct(oracle_flows(truth, "tanh", 7), truth > 0, diameter=7))["ap50"]
    assert paper < 0.95 < tuned


def test_parameters_scale_with_diameter():
    assert reconstruction_parameters(None) == reconstruction_parameters(None, "tanh")
    p10, p20 = reconstruction_parameters(10), reconstruction_parameters(20)
    assert (p10.step, p10.closing_radius, p10.tanh_scale) == (4.0, 3.0, 5.0)
    assert p10.volume_range == pytest.approx(reconstruction_parameters(None).volume_range)
    assert p20.step == 2 * p10.step and p20.closing_radius == 6 and p20.n_iter == p10.n_iter
    assert reconstruction_parameters(10, "heat").step == 1.0
    with pytest.raises(ValueError, match="diameter"):
        reconstruction_parameters(-3)


def test_backends_identical(membrane_cells):
    truth = membrane_cells[1]
    rng = np.random.default_rng(0)
    flows = cp3d.tanh_flows(truth, scale=4.0) + rng.normal(0, 0.1, (3, *truth.shape)).astype(np.float32)
    ref = cp3d.reconstruct(flows, truth > 0, diameter=8, backend="numpy")
    assert ref.max() > 0.8 * truth.max()
    np.testing.assert_array_equal(cp3d.reconstruct(flows, truth > 0, diameter=8, backend="numba"), ref)


def test_inward_flows_and_probability_foreground(membrane_cells):
    truth = membrane_cells[1]
    flows = cp3d.tanh_flows(truth, scale=4.0)
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    outward = cp3d.reconstruct(flows, truth > 0, diameter=8)
    np.testing.assert_array_equal(cp3d.reconstruct(-flows, prob, diameter=8, inward=True), outward)


def test_empty_foreground_gives_empty_labels():
    labels = cp3d.reconstruct(np.zeros((3, 5, 6, 7), np.float32), np.zeros((5, 6, 7), bool))
    assert labels.shape == (5, 6, 7) and labels.dtype == np.uint32 and not labels.any()


@pytest.mark.parametrize(
    "flows, fg, kwargs, error, match",
    [
        (np.full((3, 4, 4, 4), np.inf, np.float32), np.ones((4, 4, 4), bool), {}, ValueError, "NaN or inf"),
        (np.zeros((4, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {}, ValueError, "shape"),
        (np.zeros((3, 4, 4), np.float32), np.ones((4, 4), bool), {}, ValueError, "4D"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4), bool), {}, ValueError, "3D"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 5, 4), bool), {}, ValueError, "does not match"),
        (np.zeros((3, 4, 4, 4), np.int32), np.ones((4, 4, 4), bool), {}, TypeError, "floating"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"backend": "gpu"}, ValueError, "backend"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"targets": "x"}, ValueError, "targets"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"diameter_range": (100, 5)}, ValueError,
         "diameter_range"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"sigma": -1}, ValueError, "sigma"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"min_overlap": np.nan}, ValueError,
         "min_overlap"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"tanh_scale": 0}, ValueError, "tanh_scale"),
        (np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {"closing_radius": -2}, ValueError, "radius"),
    ],
)
def test_bad_input(flows, fg, kwargs, error, match):
    with pytest.raises(error, match=match):
        cp3d.reconstruct(flows, fg, **kwargs)


def test_cupy_array_with_numba_backend_is_refused():
    cupy = pytest.importorskip("cupy")
    flows = cupy.zeros((3, 4, 4, 4), cupy.float32)
    with pytest.raises(TypeError, match="CuPy"):
        cp3d.reconstruct(flows, cupy.ones((4, 4, 4), bool), backend="numba")


@pytest.mark.gpu
def test_cuda_identical_to_numpy(membrane_cells):
    import cupy

    truth = membrane_cells[1]
    flows = cp3d.tanh_flows(truth, scale=4.0)
    ref = cp3d.reconstruct(flows, truth > 0, diameter=8, backend="numpy")
    out = cp3d.reconstruct(cupy.asarray(flows), cupy.asarray(truth > 0), diameter=8)
    assert isinstance(out, cupy.ndarray)
    np.testing.assert_array_equal(out.get(), ref)


@pytest.mark.parametrize("call", [
    "cp3d.reconstruct(cp3d.tanh_flows(truth, scale=4.0), truth > 0)",
    "cp3d.segment(image, UNet3D(base_features=4, depth=2).eval(), augment=False)",
], ids=["reconstruct", "segment"])
def test_first_cpu_kernel_keeps_the_torch_thread_count(call):
    """A user's torch.set_num_threads must survive the start of Numba's thread pool."""
    # a fresh interpreter: Numba's pool starts, and sets OpenMP's thread count, once per process
    code = (
        "import numba, torch, cp3d\n"
        "from cp3d.model import UNet3D\n"
        "wanted = 1 if numba.config.NUMBA_NUM_THREADS > 1 else 2\n"
        "torch.set_num_threads(wanted)\n"
        "assert torch.get_num_threads() == wanted\n"
        "torch.manual_seed(0)\n"
        "image, truth = cp3d.data.synthetic_stack((16, 32, 32), 8, seed=1)\n"
        f"{call}\n"
        "assert torch.get_num_threads() == wanted, (torch.get_num_threads(), wanted)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("scale", [2.0, 5.0, 10.0, 20.0, (3.0, 6.0, 6.0)])
def test_estimate_tanh_scale_reads_the_scale_of_tanh_flows(scale):
    _, labels = cp3d.data.synthetic_stack((48, 96, 96), 24, kind="nuclei", seed=1, noise=0)
    flows = cp3d.tanh_flows(labels, scale=scale)
    expected = np.broadcast_to(scale, 3)
    np.testing.assert_allclose(cp3d.estimate_tanh_scale(flows, labels > 0), expected, rtol=1e-3)
    np.testing.assert_allclose(cp3d.estimate_tanh_scale(-flows, labels > 0, inward=True), expected, rtol=1e-3)


def test_estimate_tanh_scale_of_cells_three_voxels_thick():
    # voxels 3x longer in z: the cells are 3 planes thick, and triples across two cells outnumber their own
    _, truth = cp3d.data.synthetic_stack((96, 64, 64), 9, seed=1)
    labels = np.ascontiguousarray(truth[::3])
    flows = cp3d.tanh_flows(labels, (1.5, 4.5, 4.5))
    np.testing.assert_allclose(cp3d.estimate_tanh_scale(flows, labels > 0), (1.5, 4.5, 4.5), rtol=1e-3)


def test_estimate_tanh_scale_without_foreground_is_none():
    flows = np.zeros((3, 8, 16, 16), np.float32)
    assert cp3d.estimate_tanh_scale(flows, np.zeros((8, 16, 16), bool)) is None


def test_reconstruct_with_the_scale_read_from_the_flows():
    # scale-5 flows (tanh_flows' default, the released Cellpose3D code's) of cells 40 voxels across: the scale
    # the diameter implies (20) steps far past the centres; the scale read from the flows does not
    _, labels = cp3d.data.synthetic_stack((80, 128, 128), 40, kind="nuclei", seed=2, noise=0)
    flows = cp3d.tanh_flows(labels)
    assert evaluate(labels, cp3d.reconstruct(flows, labels > 0, diameter=40))["ap50"] < 0.5
    assert evaluate(labels, cp3d.reconstruct(flows, labels > 0, diameter=40, tanh_scale="auto"))["ap50"] >= 0.98
    with pytest.raises(ValueError, match="tanh_scale"):
        cp3d.reconstruct(flows, labels > 0, tanh_scale="scale")
    with pytest.raises(ValueError, match="heat"):
        cp3d.reconstruct(flows, labels > 0, targets="heat", tanh_scale="auto")
