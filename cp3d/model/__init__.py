"""The model layer: 3D U-Net, training on synthetic stacks, tiled prediction.

This is the only part of cp3d that imports torch.
"""

from .predict import Prediction, normalize_percentile, predict
from .train import train, validate
from .unet import DEFAULT_MODEL, STAIN_MODELS, UNet3D, UNetConfig, available_models, load_model, save_model

__all__ = [
    "DEFAULT_MODEL",
    "STAIN_MODELS",
    "UNet3D",
    "UNetConfig",
    "load_model",
    "save_model",
    "available_models",
    "predict",
    "Prediction",
    "normalize_percentile",
    "train",
    "validate",
]
