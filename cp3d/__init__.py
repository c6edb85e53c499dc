"""cp3d: fast 3D cell instance segmentation with Cellpose3D gradient maps.

The pipeline stages (targets, flow following, grouping, filtering) take NumPy
or CuPy arrays and return the same kind. The model layer is imported on first
use, so ``import cp3d`` never imports torch or CuPy.
"""

from . import data, io, metrics
from .filters import filter_instances
from .follow import follow_flows
from .group import close_and_label
from .measure import CellTable, cell_table
from .reconstruct import estimate_tanh_scale, reconstruct, reconstruction_parameters
from .segment import Segmentation, segment
from .targets import heat_flows, tanh_flows

__version__ = "0.1.0"

_MODEL_API = ("UNet3D", "load_model", "predict", "train")

__all__ = ["data", "io", "metrics", "tanh_flows", "heat_flows", "follow_flows", "close_and_label",
           "filter_instances", "reconstruct", "reconstruction_parameters", "estimate_tanh_scale", "segment",
           "Segmentation", "cell_table",
           "CellTable",
           *_MODEL_API]


def __getattr__(name):
    if name in _MODEL_API:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'cp3d' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_MODEL_API))
