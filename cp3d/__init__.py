"""cp3d: fast 3D cell instance segmentation with Cellpose3D gradient maps.

The pipeline stages (targets, flow following, grouping, filtering) take NumPy
or CuPy arrays and return the same kind. Everything is imported on first
use, so ``import cp3d`` stays light and never imports torch or CuPy.
"""

__version__ = "0.1.0"

_LAZY = {
    "tanh_flows": ("targets", "tanh_flows"),
    "heat_flows": ("targets", "heat_flows"),
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

_SUBMODULES = ("data", "io", "metrics")


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cp3d' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
