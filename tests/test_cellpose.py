"""cp3d.cellpose against the real Cellpose package (installed by the test extra)."""

import numpy as np
import pytest

import cp3d
import cp3d.cellpose
from cp3d.cellpose import compute_masks
from cp3d.data import synthetic_stack
from cp3d.metrics import evaluate


@pytest.fixture(scope="module")
def cellpose():
    try:
        return cp3d.cellpose.import_cellpose()
    except ImportError as error:
        pytest.skip(f"cellpose not importable: {error}")


TISSUES = {
    "membrane d10": dict(cell_diameter=10),
    "nuclei d12": dict(cell_diameter=12, kind="nuclei"),
    "membrane d20": dict(cell_diameter=20),
}


@pytest.mark.parametrize("tissue", TISSUES)
def test_as_accurate_as_cellpose_on_its_own_flows(cellpose, tissue):
    import torch

    _, truth = synthetic_stack((32, 64, 64), seed=3, **TISSUES[tissue])
    dP, cellprob = cp3d.cellpose.outputs_from_masks(truth)
    reference = cellpose.dynamics.compute_masks(dP, cellprob, do_3D=True, device=torch.device("cpu"))
    masks = compute_masks(dP, cellprob, do_3D=True)
    assert masks.dtype == np.uint16 and masks.shape == truth.shape
    ours, theirs = evaluate(truth, masks)["ap50"], evaluate(truth, reference)["ap50"]
    assert ours >= theirs and ours >= 0.95, (ours, theirs)
    # numbered 1..N in C order of the first voxel, as Cellpose's fastremap.renumber
    ids = masks.ravel()[np.sort(np.unique(masks.ravel(), return_index=True)[1])]
    np.testing.assert_array_equal(ids[ids > 0], np.arange(1, masks.max() + 1))


def _analytic_outputs(labels):
    """dP and cellprob of cubes: unit vectors towards each cube's centre voxel, times 5."""
    zyx = np.indices(labels.shape)
    centre = [np.bincount(labels.ravel(), weights=c.ravel())[labels] / np.bincount(labels.ravel())[labels]
              for c in zyx]
    towards = np.stack([np.round(m) - c for m, c in zip(centre, zyx)]).astype(np.float32)
    norm = np.linalg.norm(towards, axis=0)
    dP = 5 * towards / np.where(norm > 0, norm, 1)
    return dP.astype(np.float32), np.where(labels > 0, 5.0, -5.0).astype(np.float32)


def test_more_than_65535_masks_come_back_as_uint32():
    shape = (3 * 16, 3 * 64, 3 * 65)  # 66,560 cubes of 3x3x3
    cube = np.arange(16 * 64 * 65, dtype=np.uint32).reshape(16, 64, 65) + 1
    labels = cube.repeat(3, 0).repeat(3, 1).repeat(3, 2)
    assert labels.shape == shape
    dP, cellprob = _analytic_outputs(labels)
    masks = compute_masks(dP, cellprob, niter=5, do_3D=True)
    assert masks.dtype == np.uint32 and int(masks.max()) == labels.max()
    np.testing.assert_array_equal(masks, labels)  # both numbered in C order of the first voxel


def test_min_size_fills_holes_and_drops_small_masks_and_size_fraction_drops_large():
    labels = np.zeros((20, 20, 40), np.uint32)
    labels[2:11, 2:11, 2:11] = 1   # 729 voxels, with a hole below
    labels[2:5, 2:5, 20:23] = 2    # 27 voxels
    labels[1:19, 1:19, 25:39] = 3  # 4536 voxels
    dP, cellprob = _analytic_outputs(labels)
    cellprob[6, 6, 6] = -5.0       # a hole in the first cell
    masks = compute_masks(dP, cellprob, do_3D=True)
    assert masks[6, 6, 6] == 0 and masks.max() == 3
    filled = compute_masks(dP, cellprob, do_3D=True, min_size=30)
    assert filled[6, 6, 6] == filled[3, 3, 3] > 0
    assert set(np.unique(filled[labels == 2])) == {0} and filled.max() == 2
    assert set(np.unique(compute_masks(dP, cellprob, do_3D=True, max_size_fraction=0.2)[labels == 3])) == {0}


def test_threshold_and_niter():
    labels = np.zeros((12, 12, 24), np.uint32)
    labels[1:11, 1:11, 1:11], labels[1:11, 1:11, 13:23] = 1, 2
    dP, cellprob = _analytic_outputs(labels)
    cellprob[labels == 2] = 1.0
    assert compute_masks(dP, cellprob, do_3D=True).max() == 2
    assert compute_masks(dP, cellprob, cellprob_threshold=2.0, do_3D=True).max() == 1
    # without steps every voxel stays put: the cube is one connected group all the same
    assert compute_masks(dP, cellprob, niter=0, do_3D=True).max() == 2


@pytest.mark.parametrize("args, error, match", [
    ((np.zeros((2, 8, 8), np.float32), np.zeros((8, 8), np.float32)), ValueError, "2D"),
    ((np.zeros((3, 4, 8, 8), np.float32), np.zeros((4, 8, 9), np.float32)), ValueError, "does not match"),
    ((np.zeros((3, 4, 8, 8), np.int32), np.zeros((4, 8, 8), np.float32)), TypeError, "floating"),
    ((np.zeros((4, 4, 8, 8), np.float32), np.zeros((4, 8, 8), np.float32)), ValueError, r"\(3, Z, Y, X\)"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        compute_masks(*args)
    with pytest.raises(ValueError, match="niter"):
        compute_masks(np.zeros((3, 4, 8, 8), np.float32), np.zeros((4, 8, 8), np.float32), niter=-1)


class _TinyNet:
    """A random-weight stand-in for Cellpose's network, built on first use (torch imported lazily)."""

    @staticmethod
    def make():
        import torch

        class TinyNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)

            device = torch.device("cpu")
            dtype = torch.float32

            def forward(self, x):
                return self.conv(x.mean(1, keepdim=True)), torch.zeros(x.shape[0], 256)

        return TinyNet()


def test_patched_cellpose_eval_computes_its_3d_masks_with_cp3d(cellpose, monkeypatch):
    import torch

    from cellpose.models import CellposeModel

    # CellposeModel without its pretrained weights (no download): a tiny random network.
    model = object.__new__(CellposeModel)
    model.device, model.gpu, model.backbone, model.pretrained_model = torch.device("cpu"), False, "dinov2", "none"
    model.net = _TinyNet.make()
    image = synthetic_stack((12, 48, 48), 8, seed=1).image
    calls = []
    original = cellpose.dynamics.compute_masks

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return compute_masks(*args, **kwargs)

    monkeypatch.setattr(cp3d.cellpose, "compute_masks", spy)
    with cp3d.cellpose.patch():
        assert cellpose.dynamics.compute_masks is not original
        masks, flows, _ = model.eval(image, do_3D=True, z_axis=0, bsize=48)
    assert cellpose.dynamics.compute_masks is original
    assert calls == [(3, *image.shape)]
    # eval's own post-processing (fill holes, min_size=15) on cp3d's masks of eval's own flows
    expected = cellpose.utils.fill_holes_and_remove_small_masks(compute_masks(flows[1], flows[2], do_3D=True),
                                                                min_size=15)
    np.testing.assert_array_equal(masks, expected)
    # the patch is undone after an error inside the block too
    with pytest.raises(RuntimeError), cp3d.cellpose.patch():
        raise RuntimeError("inside")
    assert cellpose.dynamics.compute_masks is original
