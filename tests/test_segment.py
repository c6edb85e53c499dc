import importlib
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import cubes_in_a_row

import cp3d
from cp3d import cli
from cp3d.model import UNet3D, save_model
from cp3d.segment import Segmentation, cell_extent, segment

SEGMENT_MODULE = importlib.import_module("cp3d.segment")  # the package's `cp3d.segment` is the function


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return UNet3D(base_features=4, depth=2).eval()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_model):
    return save_model(tiny_model, tmp_path_factory.mktemp("model"))


@pytest.fixture
def predict_kwargs(monkeypatch):
    """The keywords segment passes to predict, recorded while predict runs as usual."""
    seen = {}
    real_predict = cp3d.model.predict

    def spy(image, model, **kwargs):
        seen.update(kwargs)
        return real_predict(image, model, **kwargs)

    monkeypatch.setattr(cp3d.model, "predict", spy)
    return seen


def test_segment_drops_border_specks_below_a_network_voxel(tiny_model, monkeypatch):
    from cp3d.filters import border_ids
    from cp3d.segment import model_border_volume

    seen = {}
    real_reconstruct = SEGMENT_MODULE.reconstruct

    def spy(flows, foreground, **kwargs):
        seen.update(kwargs)
        return real_reconstruct(flows, foreground, **kwargs)

    monkeypatch.setattr(SEGMENT_MODULE, "reconstruct", spy)
    image, _ = cp3d.data.synthetic_stack((24, 64, 64), 16, seed=1)
    labels = segment(image, tiny_model, diameter=16, voxel_size=(2, 1, 1)).labels
    # the cap one network voxel deep of a cell 8 x 16 x 16 voxels: depth**2 * (3 - 2 * depth) of it
    depth = 1 / tiny_model.config.train_diameter
    cap = model_border_volume(tiny_model.config, (8.0, 16.0, 16.0))
    assert cap == pytest.approx(np.pi / 6 * 8 * 16 * 16 * depth**2 * (3 - 2 * depth))
    assert seen["min_border_volume"] == pytest.approx(cap)
    volumes = np.bincount(labels.ravel())
    assert (volumes[border_ids(labels)] >= cap).all()


def test_cell_extent_follows_voxel_size():
    assert cell_extent(None, None, 10) == (10, 10, 10)
    assert cell_extent(8, (2.0, 0.5, 0.5), 10) == (2.0, 8.0, 8.0)
    with pytest.raises(ValueError, match="diameter"):
        cell_extent(0, None, 10)
    with pytest.raises(ValueError, match="voxel_size"):
        cell_extent(10, (1, 1), 10)


def test_segment_returns_maps_on_the_original_grid(tiny_model):
    image, _ = cp3d.data.synthetic_stack((20, 40, 36), 8, seed=1)
    result = segment(image, tiny_model, diameter=8, voxel_size=(2, 1, 1))
    assert isinstance(result, Segmentation)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint32
    assert result.flows.shape == (3, *image.shape) and result.foreground.shape == image.shape
    assert set(result.seconds) == {"predict", "reconstruct"}


def test_segment_rescales_cells_to_the_training_size(tiny_model, predict_kwargs):
    seen = predict_kwargs
    image = np.random.default_rng(0).random((12, 24, 24)).astype(np.float32)
    segment(image, tiny_model, diameter=20, voxel_size=(2, 1, 1))
    # cells 20 voxels across in x and 10 in z must become 10 model voxels: zoom 0.5 in x, 1 in z
    assert seen["voxel_size"] == pytest.approx((1.0, 0.5, 0.5))


def test_segment_takes_a_diameter_triple(tiny_model, predict_kwargs):
    seen = predict_kwargs
    image = np.random.default_rng(0).random((12, 24, 24)).astype(np.float32)
    result = segment(image, tiny_model, diameter=(10, 20, 20))
    # the same cells as diameter=20 with voxels twice as long in z
    assert seen["voxel_size"] == pytest.approx((1.0, 0.5, 0.5))
    assert result.diameter == 20.0
    assert segment(image, tiny_model, diameter=7).diameter == 7.0
    assert segment(image, tiny_model).diameter == tiny_model.config.train_diameter


def _fake_passes(monkeypatch, true_d, model_d):
    """Make every pass find cells of min(true_d, 1.3 x the size it assumes): fragments of cells too large."""
    assumed = []
    monkeypatch.setattr(SEGMENT_MODULE, "_AUTO_STARTS", (1,))  # one chain, from the training size

    def fake(image, model, extent, augment, diameter, **options):
        assumed.append((diameter, augment))
        found = min(true_d, 1.3 * diameter) if true_d > diameter else true_d
        labels = np.zeros((40, 40, 40), np.uint32)
        side = max(1, round(found * (np.pi / 6) ** (1 / 3)))  # a cube of the same volume as a sphere of d `found`
        labels[:side, :side, :side] = 1
        return Segmentation(labels, np.zeros((3, *labels.shape), np.float32), None,
                            {"predict": 1.0, "reconstruct": 1.0}, diameter)

    monkeypatch.setattr(SEGMENT_MODULE, "_segment_at", fake)
    return assumed


@pytest.mark.parametrize("true_d", [6, 10, 20, 40])
def test_auto_diameter_refines_while_the_estimate_grows(tiny_model, monkeypatch, true_d):
    assumed = _fake_passes(monkeypatch, true_d, tiny_model.config.train_diameter)
    image = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    result = segment(image, tiny_model, diameter="auto")
    estimates = [d for d, _ in assumed]
    assert estimates[0] == tiny_model.config.train_diameter and len(estimates) >= 2  # refined at least once
    assert result.diameter == pytest.approx(true_d, rel=0.15)
    assert assumed[-1] == (result.diameter, True)  # the result itself: at the estimate, with augmentation
    assert all(not augment for _, augment in assumed[:-1]) and "estimate" in result.seconds
    assert len(estimates) <= SEGMENT_MODULE._AUTO_PASSES + 1
    # without augmentation, a last pass made at the estimate is the result: never two passes at one size
    assumed.clear()
    segment(image, tiny_model, diameter="auto", augment=False)
    sizes = [d for d, _ in assumed]
    assert len(set(sizes)) == len(sizes) and len(sizes) in (len(estimates) - 1, len(estimates))


def test_auto_diameter_is_the_plain_median_of_the_last_pass_without_fragments(tiny_model, monkeypatch):
    # cells of three sizes, most of them the smallest, and a crowd of one-voxel fragments: the volume-weighted
    # median reads the largest size, the plain median with the fragments a fragment's
    labels = cubes_in_a_row([6] * 5 + [8] + [10] * 3 + [1] * 12, (24, 40, 130))
    cube_d = (6 * 6**3 / np.pi) ** (1 / 3)  # the diameter of the sphere as large as a 6-cube

    def fake(image, model, extent, augment, diameter, **options):
        return Segmentation(labels, np.zeros((3, *labels.shape), np.float32), None,
                            {"predict": 0.0, "reconstruct": 0.0}, diameter)

    monkeypatch.setattr(SEGMENT_MODULE, "_segment_at", fake)
    result = segment(np.random.default_rng(0).random((8, 16, 16)), tiny_model, diameter="auto")
    assert result.diameter == pytest.approx(cube_d)
    assert cp3d.metrics.median_diameter(labels, weighted=True) > 1.6 * cube_d
    assert cp3d.metrics.median_diameter(labels) < 0.2 * cube_d


def test_auto_diameter_keeps_the_chain_whose_flows_agree_best(tiny_model, monkeypatch):
    # From the training size the passes find small cells whose flows they do not explain (a real crop's grainy
    # background read as cells, 1136_mini.h5) and stop there; from 3x the training size they find the large
    # cells, with flows that agree with them: that chain wins.
    big = np.zeros((40, 40, 40), np.uint32)
    big[2:32, 2:32, 2:32] = 1
    small = np.zeros((40, 40, 40), np.uint32)
    for i, corner in enumerate(np.ndindex(5, 5, 5)):
        small[tuple(slice(8 * c, 8 * c + 4) for c in corner)] = i + 1
    noise = np.random.default_rng(0).uniform(-1, 1, (3, 40, 40, 40)).astype(np.float32)

    def fake(image, model, extent, augment, diameter, **options):
        if diameter < 20:
            return Segmentation(small, noise, None, {"predict": 0.0, "reconstruct": 0.0}, diameter)
        scale = SEGMENT_MODULE.model_tanh_scale(model.config, extent)
        flows = np.stack([cp3d.tanh_flows(big, scale=s)[axis] for axis, s in enumerate(scale)])
        return Segmentation(big, flows, None, {"predict": 0.0, "reconstruct": 0.0}, diameter)

    monkeypatch.setattr(SEGMENT_MODULE, "_segment_at", fake)
    image = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    assert segment(image, tiny_model, diameter="auto").diameter == pytest.approx(
        cp3d.metrics.median_diameter(big), rel=0.01)
    monkeypatch.setattr(SEGMENT_MODULE, "_AUTO_STARTS", (1,))
    assert segment(image, tiny_model, diameter="auto").diameter < 8


def test_auto_diameter_on_the_bundled_model():
    image, truth = cp3d.data.synthetic_stack((32, 72, 72), 16, seed=5, noise=0.1)
    true_d = cp3d.metrics.median_diameter(truth)
    result = segment(image, diameter="auto", augment=False)
    assert result.diameter == pytest.approx(true_d, rel=0.2)
    assert cp3d.metrics.evaluate(truth, result.labels)["dice"] > 0.8


def test_auto_diameter_on_an_empty_pass_keeps_the_training_size(tiny_model, monkeypatch):
    def nothing(image, model, extent, augment, diameter, **options):
        return Segmentation(np.zeros(image.shape, np.uint32), None, None, {"predict": 0.0, "reconstruct": 0.0},
                            diameter)

    monkeypatch.setattr(SEGMENT_MODULE, "_segment_at", nothing)
    with pytest.warns(UserWarning, match="found no cell"):
        result = segment(np.random.default_rng(0).random((8, 16, 16)), tiny_model, diameter="auto")
    assert result.diameter == tiny_model.config.train_diameter


def test_segment_tiles_as_asked(tiny_model):
    image, _ = cp3d.data.synthetic_stack((24, 96, 96), 8, seed=3)
    whole = segment(image, tiny_model, augment=False)
    tiled = segment(image, tiny_model, augment=False, tile_size=(24, 64, 64))
    assert np.abs(tiled.flows - whole.flows).max() < 1e-5
    np.testing.assert_array_equal(tiled.labels, whole.labels)
    # a tile too small for the receptive field only fails if the size reaches predict
    with pytest.raises(ValueError, match="too small"):
        segment(image, tiny_model, augment=False, tile_size=(24, 16, 16))
    segment(image, tiny_model, augment=False, tile_size=(24, 16, 16), context=0)


def test_all_zero_image_gives_empty_labels(tiny_model):
    result = segment(np.zeros((16, 32, 32), np.float32), tiny_model)
    assert result.labels.shape == (16, 32, 32) and result.labels.dtype == np.uint32
    assert not result.labels.any() and not result.foreground.any()


def test_segment_bad_input(tiny_model):
    with pytest.raises(ValueError, match="3D"):
        segment(np.zeros((32, 32), np.float32), tiny_model)
    with pytest.raises(ValueError, match="RGB"):
        segment(np.zeros((8, 32, 32, 3), np.float32), tiny_model)
    with pytest.raises(ValueError, match="2D RGB"):
        segment(np.zeros((64, 64, 3), np.uint8), tiny_model)
    with pytest.raises(TypeError, match="real-valued"):
        segment(np.zeros((8, 16, 16), np.complex64), tiny_model)
    with pytest.raises(ValueError, match="model"):
        segment(np.zeros((8, 16, 16), np.float32), "no-such-model")
    with pytest.raises(ValueError, match="NaN"):
        segment(np.full((8, 16, 16), np.nan, np.float32), tiny_model)


@pytest.mark.parametrize("option, match", [
    ({"backend": "gpu"}, "backend must be one of"),
    ({"diameter": -1}, "diameter"),
    ({"diameter": "big"}, "diameter"),
    ({"diameter": (4, 8)}, "diameter"),
    ({"diameter": (4, 8, 8), "voxel_size": (2, 1, 1)}, "not both"),
    ({"voxel_size": (1, 2)}, "voxel_size"),
    ({"device": "gpu please"}, "device"),
    ({"tile_size": (8, 8)}, "tile_size"),
])
def test_segment_checks_options_before_any_work(tiny_model, option, match, monkeypatch):
    def no_prediction(*args, **kwargs):
        raise AssertionError("predict ran before the options were checked")

    monkeypatch.setattr(cp3d.model, "predict", no_prediction)
    # the all-zero stack returns early, so options must be checked before that too
    for image in (np.zeros((8, 16, 16), np.float32), np.random.default_rng(0).random((8, 16, 16))):
        with pytest.raises(ValueError, match=match):
            segment(image, tiny_model, **option)


def test_cuda_backend_without_cupy_says_how_to_install(tiny_model, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ModuleNotFoundError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(ImportError, match=r"cp3d\[gpu\]"):
        segment(np.random.default_rng(0).random((8, 16, 16)), tiny_model, backend="cuda")


def test_cli_synth_segment_evaluate(tmp_path, tiny_model_dir, capsys):
    assert cli.main(["synth", str(tmp_path / "data"), "--shape", "16", "32", "32", "--diameter", "8",
                     "--count", "1"]) == 0
    capsys.readouterr()
    image, labels = tmp_path / "data" / "image_000.tif", tmp_path / "data" / "labels_000.tif"
    out = tmp_path / "pred.tif"
    assert cli.main(["segment", str(image), "-o", str(out), "--model", str(tiny_model_dir), "--quiet",
                     "--no-augment", "--save-flows", str(tmp_path / "maps.tif")]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(out)
    assert cp3d.io.read_image(out).data.dtype == np.uint32
    assert cp3d.io.read_image(tmp_path / "maps.tif").data.shape == (64, 32, 32)
    assert cli.main(["evaluate", str(labels), str(labels)]) == 0
    assert json.loads(capsys.readouterr().out)["ap50"] == 1.0


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "missing.tif"), str(tmp_path / "missing.tif")]) == 2
    assert "missing.tif" in capsys.readouterr().err
    assert cli.main(["segment", str(tmp_path / "missing.tif"), "-o", str(tmp_path / "x.tif")]) == 2


def test_cli_demo_with_a_model_folder(tmp_path, tiny_model_dir, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--shape", "16", "32", "32", "--diameter", "8",
                     "--model", str(tiny_model_dir)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert {"scores", "seconds", "cells"} <= set(report)
    assert set(report["seconds"]) == {"synthesize", "predict", "reconstruct", "evaluate"}
    assert "cp3d demo: synthesizing a 16x32x32" in captured.err and "cp3d demo: segmenting it" in captured.err
    assert all((tmp_path / name).exists() for name in ("image.tif", "truth.tif", "labels.tif", "flows.tif"))
    # --tile-size reaches predict: a tile narrower than the network's context is refused with a message
    assert cli.main(["demo", "--out", str(tmp_path), "--shape", "16", "64", "64", "--diameter", "8",
                     "--model", str(tiny_model_dir), "--tile-size", "16", "16", "16", "--overwrite"]) == 2
    assert "too small" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path), "--shape", "16", "64", "64", "--diameter", "8",
                     "--model", str(tiny_model_dir), "--tile-size", "16", "16", "16", "--context", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err  # the first run's files are kept unless asked
    assert cli.main(["demo", "--out", str(tmp_path), "--shape", "16", "64", "64", "--diameter", "8",
                     "--model", str(tiny_model_dir), "--tile-size", "16", "16", "16", "--context", "0",
                     "--overwrite"]) == 0


def test_tiling_is_invisible_with_the_bundled_model():
    """Default-context tiles against one whole-stack tile: the same maps to 1e-3, the same instances."""
    model = cp3d.load_model("tanh")
    image, _ = cp3d.data.synthetic_stack((48, 160, 160), 10, seed=777)
    whole = cp3d.model.predict(image, model, tile_size=(48, 160, 160), augment=False)
    tiled = cp3d.model.predict(image, model, tile_size=(48, 128, 128), augment=False)
    assert np.abs(tiled.flows - whole.flows).max() < 1e-3
    assert np.abs(tiled.foreground - whole.foreground).max() < 1e-3
    a = cp3d.reconstruct(whole.flows, whole.foreground)
    b = cp3d.reconstruct(tiled.flows, tiled.foreground)
    scores = cp3d.metrics.evaluate(a, b)
    assert a.max() > 100 and scores["ap50"] == 1.0 and scores["ap90"] >= 0.99, scores


def test_cli_segment_reads_the_voxel_size_from_the_tiff(tmp_path, monkeypatch, capsys):
    seen = {}

    def spy(image, model=None, **kwargs):
        seen.update(kwargs)
        return Segmentation(np.zeros(image.shape, np.uint32), np.zeros((3, *image.shape), np.float32),
                            np.zeros(image.shape, np.float32), {"predict": 0.0, "reconstruct": 0.0}, 10.0,
                            model or "tanh")

    monkeypatch.setattr(SEGMENT_MODULE, "segment", spy)
    cp3d.io.write_image(tmp_path / "in.tif", np.ones((4, 8, 8), np.float32), voxel_size=(2.0, 0.5, 0.5))
    assert cli.main(["segment", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--quiet"]) == 0
    assert seen["voxel_size"] == pytest.approx((2.0, 0.5, 0.5))
    assert cp3d.io.read_image(tmp_path / "out.tif").voxel_size == pytest.approx((2.0, 0.5, 0.5))
    assert cli.main(["segment", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--quiet",
                     "--voxel-size", "1", "1", "1", "--overwrite"]) == 0
    assert seen["voxel_size"] == (1.0, 1.0, 1.0)
    assert cli.main(["segment", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--quiet",
                     "--diameter", "auto", "--overwrite"]) == 0
    assert seen["diameter"] == "auto" and json.loads(capsys.readouterr().out.splitlines()[-1])["diameter"] == 10.0
    with pytest.raises(SystemExit):
        cli.main(["segment", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--diameter", "huge"])
    assert "'auto'" in capsys.readouterr().err


def test_cli_checks_outputs_before_segmenting(tmp_path, monkeypatch, capsys):
    def no_segmentation(*args, **kwargs):
        raise AssertionError("segmented before the outputs were checked")

    monkeypatch.setattr(SEGMENT_MODULE, "segment", no_segmentation)
    image = tmp_path / "in.tif"
    cp3d.io.write_image(image, np.ones((4, 8, 8), np.float32))
    assert cli.main(["segment", str(image), "-o", str(tmp_path / "nodir" / "out.tif")]) == 2
    assert "output folder does not exist" in capsys.readouterr().err
    assert cli.main(["segment", str(image), "-o", str(tmp_path / "out.tif"),
                     "--save-flows", str(tmp_path / "nodir" / "maps.tif")]) == 2
    assert "nodir" in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()  # no half set of outputs


def test_cli_bad_model_rgb_stack_and_training_errors_are_messages(tmp_path, capsys):
    image = tmp_path / "in.tif"
    cp3d.io.write_image(image, np.random.default_rng(0).random((4, 8, 8)).astype(np.float32))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "weights.pt").write_bytes(b"not a torch file")
    assert cli.main(["segment", str(image), "-o", str(tmp_path / "o.tif"), "--model", str(broken)]) == 2
    assert "weights" in capsys.readouterr().err
    assert cli.main(["segment", str(image), "-o", str(tmp_path / "o.tif"), "--model", str(broken / "weights.pt")]) == 2
    assert "is a file" in capsys.readouterr().err
    import tifffile

    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 16, 16, 3), np.uint8), photometric="rgb")
    assert cli.main(["segment", str(tmp_path / "rgb.tif"), "-o", str(tmp_path / "o.tif")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cp3d segment: error:") and "rgb.tif" in err
    assert cli.main(["train", str(tmp_path / "run"), "--resume", str(tmp_path / "nothing")]) == 2
    assert "cp3d train: error: no checkpoint" in capsys.readouterr().err


def test_cli_segment_writes_a_table_and_a_preview(tmp_path, tiny_model_dir, capsys):
    image, _ = cp3d.data.synthetic_stack((16, 32, 32), 8, seed=2)
    cp3d.io.write_image(tmp_path / "in.tif", image, voxel_size=(2.0, 0.5, 0.5))
    assert cli.main(["segment", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--quiet",
                     "--model", str(tiny_model_dir), "--no-augment", "--table", str(tmp_path / "cells.csv"),
                     "--preview", str(tmp_path / "preview.png")]) == 0
    labels = cp3d.io.read_image(tmp_path / "out.tif").data
    lines = (tmp_path / "cells.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 1 + len(np.unique(labels[labels > 0]))
    assert {"label", "physical_volume", "mean_intensity", "flow_error", "foreground_overlap"} <= set(header)
    from PIL import Image

    assert Image.open(tmp_path / "preview.png").format == "PNG"


def test_cli_checks_table_and_preview_folders_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SEGMENT_MODULE, "segment", lambda *a, **k: pytest.fail("segmented before the check"))
    cp3d.io.write_image(tmp_path / "in.tif", np.ones((4, 8, 8), np.float32))
    for option, name in (("--table", "x.csv"), ("--preview", "x.png")):
        assert cli.main(["segment", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"),
                         option, str(tmp_path / "nodir" / name)]) == 2
        assert "output folder does not exist" in capsys.readouterr().err


def test_cli_demo_writes_a_preview(tmp_path, tiny_model_dir, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--shape", "16", "32", "32", "--diameter", "8",
                     "--model", str(tiny_model_dir), "--no-augment"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "preview.png").size[0] > 32


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"cp3d {cp3d.__version__}"


def test_bundled_nuclei_model_finds_most_nuclei():
    # no dim nuclei: at 0.3 of the others' brightness the bundled model takes them for background, as it must a
    # real crop's bright background (README, "On real confocal nuclei")
    image, truth = cp3d.data.synthetic_stack((32, 64, 64), 10, kind="nuclei", seed=21, noise=0.08, dim_fraction=0)
    labels = segment(image, "nuclei", diameter=10, augment=False).labels
    scores = cp3d.metrics.evaluate(truth, labels)
    assert scores["dice"] > 0.7 and scores["ap50"] > 0.6, scores


@pytest.mark.parametrize("kind, chosen", [("membrane", "tanh"), ("nuclei", "nuclei")])
def test_default_model_is_the_one_for_the_stain(kind, chosen):
    image, truth = cp3d.data.synthetic_stack((32, 64, 64), 10, kind=kind, seed=21, noise=0.08)
    result = segment(image, diameter=10, augment=False)
    assert result.model == chosen and "choose" in result.seconds
    # without augmentation the winning trial is the result: the same as naming the model
    np.testing.assert_array_equal(result.labels, segment(image, chosen, diameter=10, augment=False).labels)
    assert segment(image, "auto", diameter="auto", augment=False).model == chosen


@pytest.mark.parametrize("diameter", ["auto", None])  # without a diameter too, the models are compared as measured
def test_model_choice_ignores_a_trial_at_cells_larger_than_the_stack(monkeypatch, diameter):
    # The nuclei model's estimate on a membrane stack can climb to one smooth blob the size of the stack, whose
    # few flows agree with it trivially (bench_segment.py --choice): such a trial is no evidence.
    image = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    blob = np.ones(image.shape, np.uint32)
    flows = cp3d.tanh_flows(blob, scale=40.0)

    def trial(image, model, voxel_size, start, label, **options):
        extent = (50.0, 50.0, 50.0) if label.startswith("nuclei") else (10.0, 10.0, 10.0)
        noisy = flows + np.float32(0.0 if label.startswith("nuclei") else 0.5)
        return Segmentation(blob, noisy, np.ones(image.shape, np.float32), {}, extent[2]), extent[2], extent

    monkeypatch.setattr(SEGMENT_MODULE, "_climbing_passes", trial)
    assert segment(image, diameter=diameter, augment=False).model == "tanh"


def test_load_model_refuses_auto_and_names_segment():
    with pytest.raises(ValueError, match=r"cp3d.segment\(image, model='auto'\) chooses one of \('tanh', 'nuclei'\)"):
        cp3d.load_model("auto")


@pytest.mark.parametrize("sign", [1, -1])
def test_segment_says_when_the_model_does_not_fit_the_stack_not_to_pass_inward(tiny_model, monkeypatch, sign):
    labels = cubes_in_a_row((8, 8, 8, 8), shape=(12, 12, 48))
    flows = sign * cp3d.tanh_flows(labels, scale=4.0)

    def predicted(image, model, **kwargs):
        return cp3d.model.Prediction(flows, (labels > 0).astype(np.float32))

    monkeypatch.setattr(cp3d.model, "predict", predicted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segment(labels.astype(np.float32), tiny_model, diameter=8)
    messages = [str(w.message) for w in caught]
    assert not any("inward=" in m for m in messages)  # an option segment and the CLI do not have
    assert any("model='nuclei'" in m for m in messages) == (sign < 0)
