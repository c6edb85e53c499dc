"""cp3d: fast 3D cell instance segmentation with Cellpose3D gradient maps.

The pipeline stages (targets, flow following, grouping, filtering) take NumPy
or CuPy arrays and return the same kind. The model layer (PyTorch) is loaded
lazily, so ``import cp3d`` stays light.
"""

from . import data, io, metrics
from .targets import heat_flows, tanh_flows

__version__ = "0.1.0"

_LAZY = {
    "follow_flows": ("follow", "follow_flows"),
    "close_and_label": ("group", "close_and_label"),
    "filter_instances": ("filters", "filter_instances"),
    "reconstruct": ("reconstruct", "reconstruct"),
    "reconstruction_parameters": ("reconstruct", "reconstruction_parameters"),
    "UNet3D": ("model", "UNet3D"),
    "load_model": ("model", "load_model"),
    "predict": ("model", "predict"),
    "train": ("model", "train"),
    "segment": ("segment", "segment"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'cp3d' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
