"""Make docs/napari.png: the cp3d sample in napari, segmented with the Segment widget.

Run from the repository root under a display, e.g.
``xvfb-run -a -s "-screen 0 1600x1000x24" python docs/napari_screenshot.py``.
"""

import time
from pathlib import Path

import napari
import npe2
from napari._qt import qt_main_window
from qtpy.QtWidgets import QApplication

import cp3d
from cp3d.napari import _widgets

OUT = Path(__file__).resolve().parent / "napari.png"
MANIFEST = Path(cp3d.__file__).parent / "napari" / "napari.yaml"


def main():
    qt_main_window.SHOW_QT_WARNING = False  # keeps napari's PyQt5 deprecation toast off the picture
    manager = npe2.PluginManager.instance()
    if "cp3d" not in manager._manifests:  # not installed from this checkout: register the manifest file
        manager.register(npe2.PluginManifest.from_file(MANIFEST))
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 820)
    viewer.open_sample("cp3d", "membrane")
    _, widget = viewer.window.add_plugin_dock_widget("cp3d", "Segment")
    widget.image.value = viewer.layers["membrane"]
    done = []
    show = _widgets._show_labels
    _widgets._show_labels = lambda *args: (show(*args), done.append(True))
    widget()
    start = time.time()
    while not done and time.time() - start < 600:
        QApplication.processEvents()
        time.sleep(0.05)
    labels = viewer.layers["membrane labels"]
    labels.opacity = 0.45
    viewer.layers.selection.active = labels
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.screenshot(str(OUT), canvas_only=False)
    print(f"{int(labels.data.max())} cells; wrote {OUT}")
    viewer.close()


if __name__ == "__main__":
    main()
