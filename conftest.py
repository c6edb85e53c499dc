"""Collection settings for the whole repository (the doctests of cp3d/ run with the tests).

Modules of the optional layers import their extra at the top; their
doctests are collected only where that extra is installed, so a plain
``pip install -e ".[test]"`` runs every other docstring example.
"""

import importlib.util

_NEEDS = {
    "cp3d/dask.py": "dask",
    "cp3d/cellpose.py": "cellpose",
    "cp3d/napari": "napari",
}

collect_ignore = [path for path, package in _NEEDS.items() if importlib.util.find_spec(package) is None]
