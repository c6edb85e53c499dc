"""The napari plugin in a real viewer (napari's make_napari_viewer, pytest-qt; on Linux under Xvfb).

The manifest is registered from its file through npe2, so these tests do not
depend on the installed entry point.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
npe2 = pytest.importorskip("npe2")

if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    # Qt without a display aborts the whole test process; offscreen Qt crashes vispy.
    message = "no display for Qt: run the tests under Xvfb (xvfb-run -a python -m pytest ...)"
    if os.environ.get("CP3D_REQUIRE_DISPLAY") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

import torch  # noqa: E402

import cp3d  # noqa: E402
from cp3d.model import UNet3D, save_model  # noqa: E402
from cp3d.napari import _widgets  # noqa: E402
from cp3d.napari._widgets import split_maps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MANIFEST = Path(cp3d.__file__).parent / "napari" / "napari.yaml"
WAIT_MS = 180_000


@pytest.fixture
def plugin(npe2pm):
    """cp3d's manifest registered in a plugin manager that discovers nothing else."""
    with npe2pm.tmp_plugin(manifest=str(MANIFEST)):
        yield npe2pm


@pytest.fixture
def shown(monkeypatch):
    """The results the widgets' workers have handed to the viewer, in order."""
    results = []
    show = _widgets._show_labels

    def spy(viewer, name, labels, source):
        show(viewer, name, labels, source)
        results.append(name)

    monkeypatch.setattr(_widgets, "_show_labels", spy)
    return results


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(UNet3D(base_features=4, depth=2).eval(), tmp_path_factory.mktemp("model"))


def test_manifest_validates_and_is_packaged():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()  # every command's python_name imports
    assert manifest.name == "cp3d"
    assert {w.display_name for w in manifest.contributions.widgets} == {"Segment", "Reconstruct from flows",
                                                                         "Train from corrections"}
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["napari.manifest"] == {"cp3d": "cp3d.napari:napari.yaml"}
    assert "cp3d.napari" in project["tool"]["setuptools"]["packages"]
    assert "napari.yaml" in project["tool"]["setuptools"]["package-data"]["cp3d.napari"]


def test_sample_and_tiff_round_trip_keep_the_voxel_size(make_napari_viewer, plugin, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("cp3d", "membrane")
    image, truth = viewer.layers["membrane"], viewer.layers["membrane truth"]
    assert isinstance(truth, napari.layers.Labels) and truth.data.max() > 100
    assert image.data.shape == truth.data.shape and image.data.ndim == 3
    truth.scale = (2.0, 0.5, 0.5)
    napari.save_layers(str(tmp_path / "truth.tif"), [truth], plugin="cp3d")
    napari.save_layers(str(tmp_path / "image.tif"), [image], plugin="cp3d")
    assert cp3d.io.read_image(tmp_path / "truth.tif").voxel_size == pytest.approx((2.0, 0.5, 0.5))
    assert cp3d.io.read_image(tmp_path / "image.tif").voxel_size is None  # unit scale: not calibrated

    [labels] = viewer.open(tmp_path / "truth.tif", plugin="cp3d")
    assert isinstance(labels, napari.layers.Labels)
    np.testing.assert_array_equal(labels.data, truth.data)
    assert tuple(labels.scale) == pytest.approx((2.0, 0.5, 0.5))
    [opened] = viewer.open(tmp_path / "image.tif", plugin="cp3d")
    assert isinstance(opened, napari.layers.Image)

    napari.save_layers(str(tmp_path / "truth.ome.zarr"), [truth], plugin="cp3d")
    assert cp3d.io.read_ome_zarr(tmp_path / "truth.ome.zarr").voxel_size == pytest.approx((2.0, 0.5, 0.5))
    [zarr_labels] = viewer.open(tmp_path / "truth.ome.zarr", plugin="cp3d")
    assert isinstance(zarr_labels, napari.layers.Labels)
    np.testing.assert_array_equal(np.asarray(zarr_labels.data), truth.data)
    assert tuple(zarr_labels.scale) == pytest.approx((2.0, 0.5, 0.5))


def test_segment_widget_gives_the_library_result(make_napari_viewer, plugin, qtbot, tiny_model_dir, shown):
    viewer = make_napari_viewer()
    image, _ = cp3d.data.synthetic_stack((16, 32, 32), 8, seed=3)
    layer = viewer.add_image(image, name="stack", scale=(2.0, 1.0, 1.0))
    _, widget = viewer.window.add_plugin_dock_widget("cp3d", "Segment")
    widget.image.value = layer
    assert widget.model_folder.native.isHidden()  # shown only for model="folder"
    widget.model.value = "folder"
    assert not widget.model_folder.native.isHidden()
    widget.model_folder.value = tiny_model_dir
    widget.diameter.value = 8
    widget.augment.value = False
    widget()
    qtbot.waitUntil(lambda: len(shown) == 1, timeout=WAIT_MS)  # the viewer stays live: the worker has its thread
    result = viewer.layers["stack labels"]
    expected = cp3d.segment(image, str(tiny_model_dir), diameter=8, voxel_size=(2.0, 1.0, 1.0), augment=False)
    np.testing.assert_array_equal(result.data, expected.labels)
    assert tuple(result.scale) == (2.0, 1.0, 1.0)

    # a second run replaces the layer instead of adding one
    widget()
    qtbot.waitUntil(lambda: len(shown) == 2, timeout=WAIT_MS)
    assert [layer.name for layer in viewer.layers] == ["stack", "stack labels"]


def test_segment_widget_offers_every_bundled_model_the_default_first(make_napari_viewer, plugin):
    from cp3d.model import DEFAULT_MODEL, available_models

    assert sorted(_widgets.BUNDLED_MODELS) == available_models() and _widgets.AUTO_MODEL == DEFAULT_MODEL
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("cp3d", "Segment")
    offered = [value for _, value in _widgets.segment_model_choices()]
    assert widget.model.value == DEFAULT_MODEL == offered[0] and set(_widgets.BUNDLED_MODELS) < set(offered)


def test_segment_widget_asks_for_a_model_folder(make_napari_viewer, plugin):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((4, 8, 8), np.float32))
    _, widget = viewer.window.add_plugin_dock_widget("cp3d", "Segment")
    widget.image.value = layer
    widget.model.value = "folder"
    with pytest.raises(ValueError, match="model folder"):
        widget()


def test_reconstruct_widget_reads_save_flows_stacks(make_napari_viewer, plugin, qtbot, shown):
    _, truth = cp3d.data.synthetic_stack((16, 48, 48), 8, seed=5)
    flows = cp3d.tanh_flows(truth, 4.0)
    expected = cp3d.reconstruct(flows, truth > 0, diameter=8)
    viewer = make_napari_viewer()
    maps = np.concatenate([flows, (truth > 0)[None].astype(np.float32)]).reshape(-1, *truth.shape[1:])
    layer = viewer.add_image(maps, name="maps")  # as cp3d segment --save-flows writes them
    _, widget = viewer.window.add_plugin_dock_widget("cp3d", "Reconstruct from flows")
    widget.flows.value = layer
    widget.diameter.value = 8
    widget()
    qtbot.waitUntil(lambda: shown == ["maps labels"], timeout=WAIT_MS)
    np.testing.assert_array_equal(viewer.layers["maps labels"].data, expected)
    assert expected.max() > 20


def test_split_maps_takes_three_layers_or_one_stack(make_napari_viewer):
    viewer = make_napari_viewer()
    flows = np.random.default_rng(0).uniform(-1, 1, (3, 4, 6, 8)).astype(np.float32)
    fg = np.zeros((4, 6, 8), np.float32)
    z, y, x = (viewer.add_image(f) for f in flows)
    mask = viewer.add_labels(fg.astype(np.uint8))
    maps, foreground = split_maps(z, y, x, mask)
    np.testing.assert_array_equal(maps, flows)
    four = viewer.add_image(np.concatenate([flows, fg[None]]))
    maps, foreground = split_maps(four)
    np.testing.assert_array_equal(maps, flows)
    with pytest.raises(ValueError, match="foreground"):
        split_maps(z, y, x)
    with pytest.raises(ValueError, match="both"):
        split_maps(z, y)
    with pytest.raises(ValueError, match="expected"):
        split_maps(viewer.add_image(np.zeros((5, 6, 8))))


def test_a_failing_run_is_reported_in_the_viewer(make_napari_viewer, plugin, qtbot, monkeypatch):
    errors = []
    monkeypatch.setattr(_widgets, "show_error", errors.append)
    viewer = make_napari_viewer()
    maps = np.full((4, 4, 8, 8), np.nan, np.float32)
    _, widget = viewer.window.add_plugin_dock_widget("cp3d", "Reconstruct from flows")
    widget.flows.value = viewer.add_image(maps, name="bad")
    widget()
    qtbot.waitUntil(lambda: len(errors) == 1, timeout=WAIT_MS)
    assert "NaN" in errors[0] and "bad labels" not in viewer.layers


# --------------------------------------------------------------------------- Train from corrections


@pytest.fixture
def no_trained_models(monkeypatch):
    monkeypatch.setattr(_widgets, "TRAINED_MODELS", [])


def _segmented_stack(viewer, qtbot, model_dir, shown):
    """An image segmented by the Segment widget: its layer and the labels layer the widget made."""
    image, truth = cp3d.data.synthetic_stack((16, 48, 48), 8, seed=3, noise=0.05)
    layer = viewer.add_image(image, name="stack", scale=(2.0, 1.0, 1.0))
    _, segment = viewer.window.add_plugin_dock_widget("cp3d", "Segment")
    segment.image.value = layer
    segment.model.value = "folder"
    segment.model_folder.value = model_dir
    segment.diameter.value = 8
    segment.augment.value = False
    segment()
    qtbot.waitUntil(lambda: len(shown) == 1, timeout=WAIT_MS)
    return layer, viewer.layers["stack labels"], truth, segment


def test_train_from_corrections_fine_tunes_saves_and_segments_again(
        make_napari_viewer, plugin, qtbot, tiny_model_dir, shown, tmp_path, no_trained_models):
    viewer = make_napari_viewer()
    image, labels, truth, segment = _segmented_stack(viewer, qtbot, tiny_model_dir, shown)
    # the user's corrections, as napari's paint and erase tools make them: in place in the layer's data
    ids = np.unique(truth[truth > 0])
    labels.data[truth == ids[0]] = 1000  # a cell painted right
    labels.data[truth == ids[1]] = 1001
    erased = (truth == 0) & (labels.data > 0)
    labels.data[erased] = 0  # false cells in the background erased
    corrected = labels.data.copy()
    out = tmp_path / "retrained"
    _, widget = viewer.window.add_plugin_dock_widget("cp3d", "Train from corrections")
    widget.image.value, widget.corrected.value = image, labels
    widget.model.value = "folder"
    widget.model_folder.value = tiny_model_dir
    widget.steps.value = 3
    widget.save_to.value = out
    steps = []
    worker = widget.start()
    worker.yielded.connect(lambda info: steps.append(info["step"]))
    assert not widget.train_button.enabled and widget.stop_button.enabled
    qtbot.waitUntil(lambda: len(shown) == 2, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget.train_button.enabled, timeout=WAIT_MS)

    # the model folder, with its card: learnt from the two corrected cells and the erased background only
    card = json.loads((out / "model_card.json").read_text())
    assert card["steps"] == 3 and card["data"]["sparse"] and card["data"]["folder"] == ["stack labels"]
    (info,) = card["data"]["stacks"]
    assert info["cells"] == 2 and 0 < info["known_fraction"] < 1
    assert steps[-1] == 3
    # the image segmented again with it, into a new layer; the corrected layer is untouched
    new = viewer.layers[f"stack labels ({out.name})"]
    expected = cp3d.segment(image.data, str(out), diameter=cp3d.metrics.median_diameter(
        np.where(np.isin(corrected, [1000, 1001]), corrected, 0), (2.0, 1.0, 1.0)), voxel_size=(2.0, 1.0, 1.0))
    np.testing.assert_array_equal(new.data, expected.labels)
    np.testing.assert_array_equal(labels.data, corrected)
    assert tuple(new.scale) == (2.0, 1.0, 1.0)
    # a model folder as cp3d train writes them: the command line takes it
    from cp3d import cli

    cp3d.io.write_image(tmp_path / "stack.tif", image.data, voxel_size=(2.0, 1.0, 1.0))
    assert cli.main(["segment", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "labels.tif"), "--model", str(out),
                     "--diameter", "8", "--no-augment"]) == 0
    assert (tmp_path / "labels.tif").is_file()
    # offered by both widgets, and chosen to continue from
    assert widget.model.value == str(out) and _widgets.TRAINED_MODELS == [str(out)]
    segment.reset_choices()
    assert str(out) in segment.model.choices
    # a new Segment run does not overwrite the corrected layer
    segment()
    qtbot.waitUntil(lambda: len(shown) == 3, timeout=WAIT_MS)
    np.testing.assert_array_equal(labels.data, corrected)
    assert "stack labels [1]" in viewer.layers
    # the next round goes into a new folder, never into one holding a model
    assert widget.save_to.value is None
    widget.model.value = "tanh"
    widget.save_to.value = out
    with pytest.raises(FileExistsError, match="holds a trained model"):
        widget.start()


def test_train_from_corrections_stops_early_and_refuses_no_corrections(
        make_napari_viewer, plugin, qtbot, tiny_model_dir, shown, tmp_path, no_trained_models):
    viewer = make_napari_viewer()
    image, labels, truth, _ = _segmented_stack(viewer, qtbot, tiny_model_dir, shown)
    _, widget = viewer.window.add_plugin_dock_widget("cp3d", "Train from corrections")
    widget.image.value, widget.corrected.value = image, labels
    widget.model.value = "folder"
    widget.model_folder.value = tiny_model_dir
    widget.save_to.value = tmp_path / "stopped"
    with pytest.raises(ValueError, match="no corrected cell"):
        widget.start()
    widget.learn_from.value = "all cells"  # the whole layer taken as right
    labels.data[:] = truth
    widget.steps.value = 10_000
    worker = widget.start()
    worker.yielded.connect(lambda info: widget.stop() if info["step"] == 2 else None)
    qtbot.waitUntil(lambda: len(shown) == 2, timeout=WAIT_MS)
    card = json.loads((tmp_path / "stopped" / "model_card.json").read_text())
    assert 2 <= card["stopped_at"] < 10_000 and card["data"]["stacks"][0]["known_fraction"] == 1.0
