"""napari widgets: "Segment" (image -> labels) and "Reconstruct from flows" (maps -> labels).

Each widget reads its layers in the viewer's thread, runs the public cp3d
function in a napari ``thread_worker`` (with an activity-dock progress
indicator, so the viewer stays live) and shows the result as a labels layer
named after its input, replaced on the next run.
"""

from pathlib import Path
from typing import Optional

import napari
import numpy as np
from magicgui import magic_factory
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error

from .._backend import BACKENDS
from ..filters import TARGETS

MODELS = ("tanh", "heat", "nuclei", "folder")


def _init_segment(widget):
    # the folder field matters only for model="folder"
    widget.model_folder.visible = widget.model.value == "folder"
    widget.model.changed.connect(lambda value: setattr(widget.model_folder, "visible", value == "folder"))


@magic_factory(
    call_button="Segment",
    widget_init=_init_segment,
    image={"tooltip": "a one-channel 3D stack; its scale is taken as the voxel size (z, y, x)"},
    model={"choices": MODELS, "tooltip": "bundled model (tanh, heat: membranes; nuclei) or a folder written by cp3d train"},
    model_folder={"mode": "d", "label": "model folder"},
    diameter={"min": 0.0, "max": 1000.0, "step": 0.5,
              "tooltip": "typical cell diameter in voxels along x; 0: the model's training size"},
    augment={"label": "test-time augmentation",
             "tooltip": "average four mirror images: more accurate, four times slower"},
    backend={"choices": BACKENDS, "tooltip": "reconstruction backend"},
)
def segment_widget(viewer: napari.Viewer, image: napari.layers.Image, model: str = "tanh",
                   model_folder: Path = Path(), diameter: float = 0.0, augment: bool = True,
                   backend: str = "auto"):
    """Segment the cells of an image layer with :func:`cp3d.segment`; returns the started worker."""
    from ..segment import segment

    if image is None:
        raise ValueError("choose an image layer to segment")
    data = _volume(image, "image")
    if model == "folder":
        if not Path(model_folder).is_dir() or Path(model_folder) == Path():
            raise ValueError("choose the model folder (written by cp3d train)")
        model = str(model_folder)
    voxel_size = tuple(float(s) for s in image.scale[-3:])

    def run():
        return segment(data, model, diameter=diameter or None, voxel_size=voxel_size, augment=augment,
                       backend=backend).labels

    return _start(viewer, run, f"{image.name} labels", image, "cp3d: segmenting")


@magic_factory(
    call_button="Reconstruct",
    flows={"tooltip": "a (4 Z, Y, X) stack from cp3d segment --save-flows, a (3 or 4, Z, Y, X) layer, "
                      "or the z flow with flow y and flow x below"},
    flow_y={"label": "flow y"},
    flow_x={"label": "flow x"},
    foreground={"tooltip": "foreground mask or probability (> 0.5); default: the 4th map of the flows layer"},
    diameter={"min": 0.0, "max": 1000.0, "step": 0.5,
              "tooltip": "typical cell diameter in voxels; 0: the paper's defaults (cells about 10 across)"},
    targets={"choices": TARGETS},
    inward={"tooltip": "flows point towards the cell centres (Cellpose's sign)"},
    tanh_scale={"min": 0.0, "max": 1000.0, "step": 0.5, "label": "tanh scale", "tooltip": "0: from the diameter"},
    step={"min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "0: from the diameter"},
    n_iter={"min": 0, "max": 100000, "label": "iterations", "tooltip": "0: from the diameter"},
    closing_radius={"min": 0.0, "max": 100.0, "step": 0.5, "label": "closing radius",
                    "tooltip": "0: from the diameter"},
    min_diameter={"min": 0.0, "max": 10000.0, "step": 0.5, "label": "smallest cell",
                  "tooltip": "smallest and largest cell diameter kept; both 0: from the diameter"},
    max_diameter={"min": 0.0, "max": 10000.0, "step": 0.5, "label": "largest cell"},
    min_overlap={"min": 0.0, "max": 1.0, "step": 0.05, "label": "min. foreground overlap"},
    max_flow_error={"min": 0.0, "max": 1000.0, "step": 0.05, "label": "max. flow error"},
    sigma={"min": 0.0, "max": 10.0, "step": 0.5, "tooltip": "Gaussian smoothing of the flows first (0: none)"},
    backend={"choices": BACKENDS},
)
def reconstruct_widget(viewer: napari.Viewer, flows: napari.layers.Image,
                       flow_y: Optional[napari.layers.Image] = None, flow_x: Optional[napari.layers.Image] = None,
                       foreground: Optional[napari.layers.Layer] = None, diameter: float = 0.0,
                       targets: str = "tanh", inward: bool = False, tanh_scale: float = 0.0, step: float = 0.0,
                       n_iter: int = 0, closing_radius: float = 0.0, min_diameter: float = 0.0,
                       max_diameter: float = 0.0, min_overlap: float = 0.2, max_flow_error: float = 0.8,
                       sigma: float = 0.0, backend: str = "auto"):
    """Reconstruct cells from flow and foreground layers with :func:`cp3d.reconstruct`; returns the worker."""
    from ..reconstruct import reconstruct

    maps, fg = split_maps(flows, flow_y, flow_x, foreground)
    diameter_range = None if min_diameter == max_diameter == 0 else (min_diameter, max_diameter)
    options = dict(step=step or None, n_iter=n_iter or None, closing_radius=closing_radius or None,
                   diameter_range=diameter_range, min_overlap=min_overlap, max_flow_error=max_flow_error,
                   diameter=diameter or None, targets=targets, tanh_scale=tanh_scale or None, inward=inward,
                   sigma=sigma, backend=backend)

    def run():
        return reconstruct(maps, fg, **options)

    return _start(viewer, run, f"{flows.name} labels", flows, "cp3d: reconstructing")


def split_maps(flows, flow_y=None, flow_x=None, foreground=None):
    """Flows ``(3, Z, Y, X)`` and foreground ``(Z, Y, X)`` from the reconstruct widget's layers.

    `flows` is a ``(4 Z, Y, X)`` stack as written by ``cp3d segment
    --save-flows`` (Z slices each of flow z, y, x and foreground), a
    ``(3, Z, Y, X)`` or ``(4, Z, Y, X)`` layer, or the z flow when `flow_y`
    and `flow_x` are given. A `foreground` layer replaces a 4th map.
    """
    if flows is None:
        raise ValueError("choose the flows layer")
    if (flow_y is None) != (flow_x is None):
        raise ValueError("give both flow y and flow x, or neither (then the flows layer holds all maps)")
    data = np.asarray(flows.data)
    fg = None
    if flow_y is not None:
        parts = [_volume(layer, name) for layer, name in ((flows, "flow z"), (flow_y, "flow y"), (flow_x, "flow x"))]
        if len({p.shape for p in parts}) != 1:
            raise ValueError(f"the three flow layers differ in shape: {[p.shape for p in parts]}")
        maps = np.stack(parts)
    elif data.ndim == 4 and data.shape[0] in (3, 4):
        maps, fg = data[:3], (data[3] if data.shape[0] == 4 else None)
    elif data.ndim == 3 and data.shape[0] % 4 == 0:
        stacked = data.reshape(4, data.shape[0] // 4, *data.shape[1:])
        maps, fg = stacked[:3], stacked[3]
    else:
        raise ValueError(f"flows layer {flows.name!r} has shape {data.shape}: expected (4 Z, Y, X) from "
                         "--save-flows, (3 or 4, Z, Y, X), or the z flow with flow y and flow x")
    if foreground is not None:
        fg = _volume(foreground, "foreground")
    if fg is None:
        raise ValueError("choose a foreground layer (the flows layer holds no foreground map)")
    return maps, fg


def _volume(layer, name):
    data = np.asarray(layer.data[0] if getattr(layer, "multiscale", False) else layer.data)
    if data.ndim != 3 or getattr(layer, "rgb", False):
        raise ValueError(f"{name} layer {layer.name!r} must be a one-channel 3D stack, got shape {data.shape}")
    return data


def _start(viewer, run, name, source, description):
    """Run `run` in a napari thread worker and show its labels as layer `name`, aligned with `source`."""
    # With an "errored" handler the worker reports errors in the viewer instead of re-raising them in the Qt loop;
    # a worker given connections starts at once.
    return thread_worker(run, progress={"total": 0, "desc": description}, connect={
        "returned": lambda labels: _show_labels(viewer, name, labels, source),
        "errored": lambda error: show_error(f"{description}: {error}")})()


def _show_labels(viewer, name, labels, source):
    scale, translate = tuple(source.scale[-3:]), tuple(source.translate[-3:])
    if name in viewer.layers and isinstance(viewer.layers[name], napari.layers.Labels):
        layer = viewer.layers[name]
        layer.data, layer.scale, layer.translate = labels, scale, translate
    else:
        viewer.add_labels(labels, name=name, scale=scale, translate=translate)
