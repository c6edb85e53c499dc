"""The Cellpose3D network: a small 3D U-Net, its configuration, saving and loading.

The network maps one image channel to four maps: three gradient ("flow")
maps in channel order (z, y, x) and one foreground map. :meth:`UNet3D.forward`
returns the raw, pre-activation 4-channel tensor (the losses want the
foreground *logits*); :meth:`UNet3D.activate` applies ``tanh`` to the flow
channels and a sigmoid to the foreground channel.

Normalisation
-------------
The paper's network uses instance normalisation. Instance norm computes its
statistics over the whole input, so a stack predicted in tiles gives a
different answer from the same stack predicted at once: the seams show.
cp3d defaults to ``norm="batch"`` (BatchNorm3d): batch statistics while
training, frozen running statistics at inference, which makes every output
voxel a fixed function of its receptive field, so tiles that hold a voxel's
whole receptive field (:attr:`UNetConfig.receptive_radius`) reproduce the
whole-stack prediction exactly, up to float rounding.
``norm="instance"`` remains available for comparison with the paper, without
that guarantee; ``norm="none"`` uses no normalisation layer.
"""

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .._backend import as_int_triple, as_triple
from ..io import atomic_write

__all__ = ["UNetConfig", "UNet3D", "save_model", "load_model", "available_models", "WEIGHTS_DIR", "DEFAULT_MODEL",
           "STAIN_MODELS"]

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: What segment, the CLI and the napari widget use when no model is named: the choice, per stack, between the
#: :data:`STAIN_MODELS` (see :func:`cp3d.segment`). It names no one model: :func:`load_model` refuses it.
DEFAULT_MODEL = "auto"
#: The bundled models the default chooses between: one for membrane stains, one for nuclear stains.
STAIN_MODELS = ("tanh", "nuclei")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.pt"

TARGETS = ("tanh", "heat")
NORMS = ("batch", "instance", "none")
UPSAMPLING = ("transpose", "trilinear")


@dataclass
class UNetConfig:
    """Configuration of a :class:`UNet3D`, saved as ``config.json`` beside the weights.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for a single fluorescence channel).
    base_features : int
        Features of the first level; they double at each downsampling.
    depth : int
        Number of 2x max-pool downsamplings. Inputs must be divisible by
        ``2**depth`` along every axis (:func:`cp3d.model.predict` pads).
    targets : {"tanh", "heat"}
        Gradient formulation the network was trained on.
    train_diameter : float
        Typical cell diameter in voxels of the training data; resize images so
        their cells are about this size.
    tanh_scale : float
        ``scale`` passed to :func:`cp3d.tanh_flows` for the training targets.
    voxel_size : tuple of 3 floats
        Voxel size (z, y, x) of the training data, in the units the user
        gives ``voxel_size=`` to :func:`cp3d.model.predict`.
    patch_size : tuple of 3 ints
        Training patch shape (z, y, x).
    tile_size : tuple of 3 ints, optional
        Prediction tile shape (z, y, x); ``None`` (the default) lets
        :func:`cp3d.model.predict` choose the fewest voxels of computation
        within a memory budget. Along a tiled axis a tile needs at least
        ``2 * receptive_radius + 8 + 2**depth`` voxels (context at both ends
        and the blend); a smaller one is replaced by the automatic choice.
    norm : {"batch", "instance", "none"}
        Normalisation layer; see the module notes on tiling.
    upsampling : {"transpose", "trilinear"}
        Transposed 2x2x2 convolution, or trilinear interpolation plus a
        1x1x1 convolution.
    negative_slope : float
        LeakyReLU slope.
    """

    in_channels: int = 1
    base_features: int = 16
    depth: int = 3
    targets: str = "tanh"
    train_diameter: float = 10.0
    tanh_scale: float = 5.0
    voxel_size: tuple = (1.0, 1.0, 1.0)
    patch_size: tuple = (48, 48, 48)
    tile_size: tuple = None
    norm: str = "batch"
    upsampling: str = "transpose"
    negative_slope: float = 0.01
    out_channels: int = field(default=4, init=False)

    def __post_init__(self):
        for name in ("in_channels", "base_features", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "depth" else 1):
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {v!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"UNetConfig.targets must be one of {TARGETS}, got {self.targets!r}")
        if self.norm not in NORMS:
            raise ValueError(f"UNetConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.upsampling not in UPSAMPLING:
            raise ValueError(f"UNetConfig.upsampling must be one of {UPSAMPLING}, got {self.upsampling!r}")
        self.train_diameter = float(self.train_diameter)
        self.tanh_scale = float(self.tanh_scale)
        if not self.train_diameter > 0 or not self.tanh_scale > 0:
            raise ValueError("UNetConfig.train_diameter and tanh_scale must be positive")
        self.voxel_size = as_triple(self.voxel_size, "UNetConfig.voxel_size")
        self.patch_size = as_int_triple(self.patch_size, "UNetConfig.patch_size")
        if self.tile_size is not None:
            self.tile_size = as_int_triple(self.tile_size, "UNetConfig.tile_size")
        m = self.multiple
        for name in ("patch_size", "tile_size"):
            if any(s % m for s in getattr(self, name) or ()):
                raise ValueError(f"UNetConfig.{name} {getattr(self, name)} must be divisible by 2**depth = {m}")

    @property
    def multiple(self):
        """Inputs must be divisible by this along every axis (``2**depth``)."""
        return 2**self.depth

    @property
    def receptive_radius(self):
        """Input voxels on each side that can change one output voxel.

        The worst case over the positions of a voxel within the pooling grid,
        following the deepest path: the encoder blocks and poolings, the
        bottom block, the upsamplings and decoder blocks (two 3x3x3
        convolutions per block). Tiles that give the network this much
        context reproduce a whole-stack prediction exactly.
        """
        m, convs = self.multiple, 2
        halo = 1 if self.upsampling == "trilinear" else 0  # interpolation also reads the next coarse voxel
        worst = 0
        for i in range(m):
            lo, hi = i - convs, i + convs
            for _ in range(self.depth):  # decoder, bottom first: upsampling reads voxel i // 2
                lo, hi = (lo - halo) // 2 - convs, (hi + halo) // 2 + convs
            for _ in range(self.depth):  # encoder: pooling reads voxels 2j and 2j + 1
                lo, hi = 2 * lo - convs, 2 * hi + 1 + convs
            worst = max(worst, i - lo, hi - i)
        return worst

    def to_dict(self):
        d = dataclasses.asdict(self)
        d.pop("out_channels")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ValueError(f"a UNetConfig must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        d.pop("out_channels", None)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}")
        return cls(**d)

    def to_json(self, path):
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(path, lambda fh: fh.write(text.encode()))

    @classmethod
    def from_json(cls, path):
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from e
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid model config {path}: {e}") from e


def _norm(kind, channels):
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


class _Block(nn.Sequential):
    """Two 3x3x3 convolutions, each followed by normalisation and LeakyReLU."""

    def __init__(self, cin, cout, norm, slope):
        bias = norm == "none"
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.LeakyReLU(slope, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.LeakyReLU(slope, inplace=True),
        )


class _Up(nn.Module):
    def __init__(self, cin, cout, mode):
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose3d(cin, cout, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                nn.Conv3d(cin, cout, 1),
            )

    def forward(self, x):
        return self.up(x)


class UNet3D(nn.Module):
    """3D U-Net predicting three gradient maps and a foreground map.

    Parameters
    ----------
    config : UNetConfig, optional
        The architecture; keyword arguments build one when it is omitted,
        e.g. ``UNet3D(base_features=4, depth=2)``.

    Notes
    -----
    ``forward(x)`` takes ``(B, in_channels, Z, Y, X)`` with Z, Y, X divisible
    by ``2**depth`` and returns the raw ``(B, 4, Z, Y, X)`` output: channels
    0-2 are the flow pre-activations (z, y, x), channel 3 the foreground
    logit. ``activate(raw)`` returns ``(flows, foreground)`` with ``tanh``
    flows in (-1, 1) and a foreground probability in (0, 1).

    Examples
    --------
    >>> import torch
    >>> net = UNet3D(base_features=4, depth=2).eval()
    >>> flows, fg = net.activate(net(torch.zeros(1, 1, 8, 8, 8)))
    >>> tuple(flows.shape), tuple(fg.shape)
    ((1, 3, 8, 8, 8), (1, 8, 8, 8))
    """

    def __init__(self, config=None, **kwargs):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        c, n, s = config.base_features, config.norm, config.negative_slope
        feats = [c * 2**i for i in range(config.depth + 1)]
        self.down = nn.ModuleList()
        cin = config.in_channels
        for f in feats[:-1]:
            self.down.append(_Block(cin, f, n, s))
            cin = f
        self.pool = nn.MaxPool3d(2)
        self.bottom = _Block(feats[-2] if config.depth else config.in_channels, feats[-1], n, s)
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for f_hi, f_lo in zip(feats[:0:-1], feats[-2::-1]):
            self.ups.append(_Up(f_hi, f_lo, config.upsampling))
            self.up_blocks.append(_Block(2 * f_lo, f_lo, n, s))
        self.head = nn.Conv3d(feats[0], config.out_channels, 1)

    def forward(self, x):
        m = self.config.multiple
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UNet3D expects (B, {self.config.in_channels}, Z, Y, X), got {tuple(x.shape)}"
            )
        if any(s % m for s in x.shape[2:]):
            raise ValueError(f"UNet3D input spatial shape {tuple(x.shape[2:])} must be divisible by {m}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)

    @staticmethod
    def activate(raw):
        """Split a raw ``(B, 4, Z, Y, X)`` output into ``tanh`` flows and a foreground probability."""
        return torch.tanh(raw[:, :3]), torch.sigmoid(raw[:, 3])

    @property
    def n_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def for_inference(self, device):
        """A copy of this eval-mode network, made faster for prediction on `device`.

        Each frozen batch norm is folded into the convolution before it, and
        on the CPU the copy works channels-last (``torch.channels_last_3d``,
        which oneDNN convolves faster: ``bench/bench_predict.py`` measures
        it, the README gives the figures). The outputs equal this network's up to
        float rounding; the network itself is left unchanged.

        Parameters
        ----------
        device : torch.device
            Where the copy lives; feed it inputs in :meth:`memory_format`.

        Returns
        -------
        UNet3D
        """
        if self.training:
            raise ValueError("model is in training mode; call model.eval() first")
        net = copy.deepcopy(self).to(device)
        if self.config.norm == "batch":
            for block in [*net.down, net.bottom, *net.up_blocks]:
                for conv in (0, 3):  # _Block: conv, norm, activation, conv, norm, activation
                    block[conv] = fuse_conv_bn_eval(block[conv], block[conv + 1])
                    block[conv + 1] = nn.Identity()
        return net.to(memory_format=net.memory_format(device))

    @staticmethod
    def memory_format(device):
        """Tensor layout :meth:`for_inference` networks work in on `device`.

        Channels-last on the CPU only: it was measured there, not yet on a GPU.
        """
        return torch.channels_last_3d if torch.device(device).type == "cpu" else torch.contiguous_format


def save_model(model, path, *, half=True):
    """Write ``config.json`` and ``weights.pt`` (a plain state_dict) into directory `path`.

    Floating tensors are stored as float16 when `half` is True (the ~1.4M
    parameter default network then takes under 3 MB); :func:`load_model`
    restores float32.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to("cpu", torch.float16 if half else torch.float32) if v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
    atomic_write(path / WEIGHTS_NAME, lambda fh: torch.save(state, fh))
    model.config.to_json(path / CONFIG_NAME)
    return path


def available_models():
    """Names of the bundled models in ``cp3d/model/weights/``."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def resolve_model_dir(name_or_path):
    """The folder of a bundled model name or a model folder path; TypeError/ValueError naming what is wrong."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a UNet3D, a bundled model name ({', '.join(available_models()) or 'none'}) "
                        f"or a model folder, got {name_or_path!r}")
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if name_or_path == DEFAULT_MODEL:
        raise ValueError(f"{DEFAULT_MODEL!r} names no one model: cp3d.segment(image, model={DEFAULT_MODEL!r}) chooses "
                         f"one of {STAIN_MODELS} for each stack; load one of those by name")
    if isinstance(name_or_path, str) and os.sep not in name_or_path and "/" not in name_or_path:
        bundled = WEIGHTS_DIR / name_or_path
        if bundled.is_dir():
            return bundled
        raise ValueError(
            f"no bundled model named {name_or_path!r} (looked in {bundled}); "
            f"available: {available_models() or 'none'}; or pass a directory holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if p.is_file():
        raise ValueError(f"{p} is a file: pass the model directory that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    raise ValueError(f"model directory {p} does not exist")


def load_model(name_or_path, device="cpu"):
    """Load a trained :class:`UNet3D` in eval mode.

    Parameters
    ----------
    name_or_path : str or path-like
        A bundled model name (``"tanh"``, ``"heat"``, ``"nuclei"``; see
        :func:`available_models`) or a directory holding ``config.json`` and
        ``weights.pt``. Nothing is downloaded. ``"auto"`` (the
        :data:`DEFAULT_MODEL`) is not one model but :func:`cp3d.segment`'s
        choice per stack, and is refused here.
    device : str or torch.device
        Where to put the model.

    Returns
    -------
    UNet3D
        In eval mode, with its :class:`UNetConfig` as ``.config``.

    Raises
    ------
    ValueError
        When the model is missing or its files are unreadable, not a torch
        file, or do not fit the configuration (missing keys, shape mismatch);
        the message names the path.
    """
    d = resolve_model_dir(name_or_path)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise ValueError(f"model directory {d} has no {CONFIG_NAME}")
    if not w_path.is_file():
        raise ValueError(f"model directory {d} has no {WEIGHTS_NAME}")
    config = UNetConfig.from_json(cfg_path)
    try:
        state = torch.load(w_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a non-torch file
        raise ValueError(f"cannot read model weights {w_path}: not a valid torch file ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model weights {w_path} must hold a state_dict of tensors")
    model = UNet3D(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"model weights {w_path} do not match {cfg_path}: {e}") from e
    return model.to(device).eval()
