"""napari widgets: "Segment" (image -> labels), "Reconstruct from flows" (maps -> labels) and
"Train from corrections" (corrected labels -> a fine-tuned model and a new segmentation).

Each widget reads its layers in the viewer's thread, runs the public cp3d
functions in a napari ``thread_worker`` (with an activity-dock progress
indicator, so the viewer stays live) and shows the result as a labels layer
named after its input. A later run replaces that layer only while nobody has
edited it: corrected labels are never overwritten.
"""

import queue
import re
import threading
import time
from pathlib import Path
from typing import Optional

import napari
import numpy as np
from magicgui import magic_factory
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, SpinBox, create_widget
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info

from .._backend import BACKENDS
from ..filters import TARGETS

BUNDLED_MODELS = ("tanh", "heat", "nuclei")
# the Segment widget's default: the choice per image (cp3d.model.DEFAULT_MODEL, not imported here: it would load
# torch with the plugin); not a model to fine-tune
AUTO_MODEL = "auto"
FOLDER = "folder"
# the labels as segmented, kept in the layer's metadata: what "Train from corrections" compares the user's
# corrections with, and what tells a later run that the layer has been edited
SEGMENTED_KEY = "cp3d_segmented"
# model folders trained in this session, newest last: offered by the Segment and Train widgets
TRAINED_MODELS = []
TRAIN_STEPS, TRAIN_LR = 300, 1e-3  # about 4 minutes on 2 CPU cores: what bench/bench_sparse.py measures
MODELS_HOME = Path.home() / "cp3d_models"


def model_choices(widget=None):
    """The models the widgets offer: the bundled ones, those trained in this session, a folder of your own."""
    return ([(m, m) for m in BUNDLED_MODELS] + [(f"trained: {Path(f).name}", f) for f in TRAINED_MODELS]
            + [(FOLDER, FOLDER)])


def segment_model_choices(widget=None):
    """The Segment widget's models: first the choice per image between the tanh and nuclei models."""
    return [(f"{AUTO_MODEL} (tanh or nuclei, chosen per image)", AUTO_MODEL)] + model_choices(widget)


def _model_of(model, model_folder):
    """The model argument for cp3d from a model choice and the folder field."""
    if model != FOLDER:
        return model
    if not Path(model_folder).is_dir() or Path(model_folder) == Path():
        raise ValueError("choose the model folder (written by cp3d train)")
    return str(model_folder)


def _init_segment(widget):
    # the folder field matters only for model="folder"
    widget.model_folder.visible = widget.model.value == FOLDER
    widget.model.changed.connect(lambda value: setattr(widget.model_folder, "visible", value == FOLDER))


@magic_factory(
    call_button="Segment",
    widget_init=_init_segment,
    image={"tooltip": "a one-channel 3D stack; its scale is taken as the voxel size (z, y, x)"},
    model={"choices": segment_model_choices,
           "tooltip": "auto: of the tanh (membranes) and nuclei models, the one whose flows agree best with the cells "
                      "it finds; a bundled model (tanh, heat: membranes; nuclei), one trained here, or a folder "
                      "written by cp3d train"},
    model_folder={"mode": "d", "label": "model folder"},
    diameter={"min": 0.0, "max": 1000.0, "step": 0.5,
              "tooltip": "typical cell diameter in voxels along x; 0: the model's training size"},
    augment={"label": "test-time augmentation",
             "tooltip": "average four mirror images: more accurate, four times slower"},
    backend={"choices": BACKENDS, "tooltip": "reconstruction backend"},
)
def segment_widget(viewer: napari.Viewer, image: napari.layers.Image, model: str = AUTO_MODEL,
                   model_folder: Path = Path(), diameter: float = 0.0, augment: bool = True,
                   backend: str = "auto"):
    """Segment the cells of an image layer with :func:`cp3d.segment`; returns the started worker."""
    from ..segment import segment

    if image is None:
        raise ValueError("choose an image layer to segment")
    data = _volume(image, "image")
    model = _model_of(model, model_folder)
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
    """Show `labels` as layer `name`, replacing that layer only while it holds what cp3d put there."""
    scale, translate = tuple(source.scale[-3:]), tuple(source.translate[-3:])
    metadata = {SEGMENTED_KEY: labels.copy()}
    layer = viewer.layers[name] if name in viewer.layers else None
    if isinstance(layer, napari.layers.Labels) and not _edited(layer):
        layer.data, layer.scale, layer.translate, layer.metadata = labels, scale, translate, metadata
    else:  # napari gives the new layer a free name ("NAME [1]")
        viewer.add_labels(labels, name=name, scale=scale, translate=translate, metadata=metadata)


def _edited(layer):
    """Whether the labels of `layer` differ from what cp3d put there (a layer cp3d did not make counts as edited)."""
    segmented = layer.metadata.get(SEGMENTED_KEY)
    data = np.asarray(layer.data)
    return segmented is None or segmented.shape != data.shape or not np.array_equal(segmented, data)


# --------------------------------------------------------------------------- Train from corrections


class TrainWidget(Container):
    """Fine-tune a model on the cells corrected in a labels layer, save it, and segment the image again.

    Correct a segmentation with napari's paint, fill and erase tools, then
    train: with "corrected cells", the cells whose voxels changed are learnt
    and the voxels erased to 0 are background; the rest of the stack is
    unknown and does not count (:func:`cp3d.model.annotated.from_corrections`,
    ``cp3d.model.train(sparse=True)``). On labels that cp3d did not make,
    every labelled cell is learnt. "all cells" takes the whole layer as right.
    Training runs in a thread worker with a progress bar; "Stop" ends it
    early and keeps the model as it is then. The model is saved as a model
    folder with its card (usable by ``cp3d segment --model DIR``), offered by
    the Segment widget, and the image is segmented again with it into a new
    labels layer.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(widgets=[
            create_widget(annotation=napari.layers.Image, name="image"),
            create_widget(annotation=napari.layers.Labels, name="corrected", label="corrected labels"),
            ComboBox(choices=("corrected cells", "all cells"), name="learn_from", label="learn from", tooltip=(
                "corrected cells: those you painted, filled or erased in, and the erased voxels as background; "
                "all cells: the whole layer is right")),
            ComboBox(choices=model_choices, name="model", label="start from", tooltip="the model to fine-tune"),
            FileEdit(mode="d", name="model_folder", label="model folder", visible=False),
            SpinBox(value=TRAIN_STEPS, min=1, max=100_000, name="steps", tooltip=(
                "training steps (batch 2, patches 48^3): about 0.5-1 s each on a laptop CPU")),
            FileEdit(mode="d", name="save_to", label="save model to", nullable=True,
                     tooltip=f"a new folder; empty: {MODELS_HOME}/IMAGE_DATE-TIME"),
            PushButton(text="Train from corrections", name="train_button"),
            PushButton(text="Stop", name="stop_button", enabled=False,
                       tooltip="stop early and keep the model as it is"),
            Label(value="", name="status"),
        ])
        self._viewer = viewer
        self._stop = threading.Event()
        self.worker = None
        self.model.changed.connect(lambda value: setattr(self.model_folder, "visible", value == FOLDER))
        self.train_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)

    def start(self):
        """Read the layers, check the settings and start training in a worker; returns the worker."""
        from ..model.annotated import from_corrections
        from ..model.train import check_out_dir

        image, labels = self.image.value, self.corrected.value
        if image is None or labels is None:
            raise ValueError("choose the image and the labels layer you corrected")
        data, corrected = _volume(image, "image"), _volume(labels, "labels")
        voxel_size = tuple(float(s) for s in image.scale[-3:])
        whole = self.learn_from.value == "all cells"
        stack = from_corrections(data, corrected, labels.metadata.get(SEGMENTED_KEY), voxel_size=voxel_size,
                                 whole=whole, name=labels.name)
        init = _model_of(self.model.value, self.model_folder.value)
        out = self.save_to.value
        if out is None or Path(out) == Path():
            out = MODELS_HOME / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', image.name)}_{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(out)
        check_out_dir(out, init=init)  # a new folder: never a trained model's
        self._stop.clear()
        steps = int(self.steps.value)
        cells = int(len(np.unique(stack.labels)) - 1)
        self.status.value = f"training on {cells} cells"
        self.worker = thread_worker(train_and_segment, progress={"total": steps, "desc": "cp3d: training"}, connect={
            "yielded": self._on_step,
            "returned": lambda result: self._on_done(result, image),
            "errored": self._on_error,
            "finished": self._on_finished,
        })(stack, init, out, steps, self._stop, data)
        self.train_button.enabled, self.stop_button.enabled = False, True
        return self.worker

    def stop(self):
        """End training after the current step; the model is saved as it is and the image segmented with it."""
        self._stop.set()
        self.status.value = "stopping: saving the model, then segmenting"

    def _on_step(self, info):
        if not self._stop.is_set():
            self.status.value = (f"step {info['step']} / {info['steps']}, loss {info['loss']:.3f}"
                                 + (": segmenting with the new model" if info["step"] == info["steps"] else ""))

    def _on_done(self, result, image):
        labels, out = result
        TRAINED_MODELS.append(str(out))
        name = f"{image.name} labels ({Path(out).name})"
        _show_labels(self._viewer, name, labels, image)
        self.reset_choices()
        self.model.value = str(out)  # a next round continues from this model, into a new folder
        self.save_to.value = None
        self.status.value = f"saved {out}; {int(labels.max())} cells"
        show_info(f"cp3d: model saved to {out}; the image segmented again with it")

    def _on_error(self, error):
        self.status.value = f"failed: {error}"
        show_error(f"cp3d: training: {error}")

    def _on_finished(self):
        self.train_button.enabled, self.stop_button.enabled = True, False


def train_and_segment(stack, init, out, steps, stop, image):
    """Fine-tune `init` on `stack` (sparse) into `out`, then segment `image` with the result.

    A generator for a napari worker: yields the training callback's dict after
    every step, and returns ``(labels, out)``. Training runs in a thread of
    its own so that each step can be handed on as it ends; `stop` (a
    :class:`threading.Event`) ends it early, as does closing the generator.
    """
    from ..metrics import median_diameter
    from ..model import load_model
    from ..model.train import train
    from ..segment import segment

    steps_done, failure = queue.Queue(), []

    def run():
        try:
            train(out, data=[stack], sparse=True, init=init, steps=steps, lr=TRAIN_LR, progress=False,
                  validate_stacks=0, checkpoint_every=0, callback=lambda info: steps_done.put(info) or stop.is_set(),
                  command=f"napari: cp3d Train from corrections on {stack.name!r}")
        except BaseException as e:  # noqa: BLE001  re-raised in the worker's thread below
            failure.append(e)
        finally:
            steps_done.put(None)

    trainer = threading.Thread(target=run, name="cp3d-train", daemon=True)
    trainer.start()
    try:
        while (info := steps_done.get()) is not None:
            yield info
    finally:
        stop.set()  # the worker was quit: the trainer stops after its step and saves the model
        trainer.join()
    if failure:
        raise failure[0]
    diameter = median_diameter(stack.labels, stack.voxel_size)
    labels = segment(image, load_model(out), diameter=diameter, voxel_size=stack.voxel_size).labels
    return labels, out
