"""napari sample data: a synthetic membrane stack with its ground-truth labels."""

from ..data import synthetic_stack

# Small enough to draw in about a second, large enough to hold several hundred cells.
_SHAPE = (48, 128, 128)
_DIAMETER = 10.0
_SEED = 7


def membrane_sample():
    """A synthetic shoot-meristem-like membrane stack (cells about 10 voxels across) and its labels."""
    image, labels = synthetic_stack(_SHAPE, _DIAMETER, seed=_SEED)
    return [(image, {"name": "membrane"}, "image"),
            (labels, {"name": "membrane truth", "visible": False}, "labels")]
