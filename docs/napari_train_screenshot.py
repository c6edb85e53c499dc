"""Make docs/napari_train.png: one round of "Train from corrections" in napari, on a real nuclei crop.

The crop (``../shared/data/real-nuclei/1135_mini.h5`` beside the repository,
validation data: the model trained here is not bundled) is segmented with the
bundled nuclei model by the Segment widget. Ten nuclei are then corrected as a
user would with napari's tools, here from the crop's annotation: each painted
with its true shape, the false cells around it erased. The Train widget
fine-tunes the nuclei model on them and segments the crop again.

Run from the repository root under a display, e.g.
``xvfb-run -a -s "-screen 0 1600x1000x24" python docs/napari_train_screenshot.py [STEPS]``.
"""

import sys
import tempfile
import time
from pathlib import Path

import napari
import npe2
import numpy as np
from napari._qt import qt_main_window
from qtpy.QtWidgets import QApplication
from scipy import ndimage

import cp3d
from cp3d.model.annotated import read_annotated
from cp3d.napari import _widgets

OUT = Path(__file__).resolve().parent / "napari_train.png"
MANIFEST = Path(cp3d.__file__).parent / "napari" / "napari.yaml"
CROP = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-nuclei" / "1135_mini.h5"
CORRECTED, SEED = 10, 7


def wait_for(done, timeout=1800):
    start = time.time()
    while not done() and time.time() - start < timeout:
        QApplication.processEvents()
        time.sleep(0.05)


def main(steps=300):
    qt_main_window.SHOW_QT_WARNING = False  # keeps napari's PyQt5 deprecation toast off the picture
    manager = npe2.PluginManager.instance()
    if "cp3d" not in manager._manifests:  # not installed from this checkout: register the manifest file
        manager.register(npe2.PluginManifest.from_file(MANIFEST))
    crop = read_annotated(CROP)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    image = viewer.add_image(crop.image, name="1135", scale=crop.voxel_size)
    shown = []
    show = _widgets._show_labels
    _widgets._show_labels = lambda *args: (show(*args), shown.append(args[1]))
    _, segment = viewer.window.add_plugin_dock_widget("cp3d", "Segment")
    segment.image.value, segment.model.value = image, "nuclei"
    segment.diameter.value = round(cp3d.metrics.median_diameter(crop.labels, crop.voxel_size), 1)
    segment()
    wait_for(lambda: shown)
    labels = viewer.layers["1135 labels"]
    # the user's corrections, in place in the layer as napari's tools make them
    truth = crop.labels
    chosen = np.random.default_rng(SEED).permutation(np.unique(truth[truth > 0]))[:CORRECTED]
    cells = np.isin(truth, chosen)
    near = ndimage.binary_dilation(cells, iterations=4)
    edited = labels.data.copy()
    edited[near & (truth == 0)] = 0
    edited[cells] = truth[cells] + edited.max()
    labels.data = edited
    _, train = viewer.window.add_plugin_dock_widget("cp3d", "Train from corrections")
    train.image.value, train.corrected.value, train.model.value = image, labels, "nuclei"
    train.steps.value = steps
    train.save_to.value = Path(tempfile.mkdtemp(prefix="cp3d-napari-train-")) / "nuclei_1135"
    train.start()
    wait_for(lambda: len(shown) == 2)
    result = viewer.layers[shown[-1]]
    labels.visible = False
    result.opacity = 0.5
    viewer.layers.selection.active = result
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, crop.image.shape[0] // 2 * crop.voxel_size[0])
    viewer.reset_view()
    wait_for(lambda: False, timeout=6)  # the notification fades
    viewer.screenshot(str(OUT), canvas_only=False)
    print(f"{int(result.data.max())} cells after training on {CORRECTED} corrected ones; wrote {OUT}")
    viewer.close()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
