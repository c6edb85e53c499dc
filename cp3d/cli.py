"""Command line: ``cp3d demo | segment | synth | evaluate | train``, ``cp3d --version``.

A thin layer: it parses arguments, reads and writes files and calls the
public functions.
"""

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def _demo(args):
    from . import data, io, metrics
    from .preview import save_preview
    from .segment import segment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ("image.tif", "truth.tif", "labels.tif", "flows.tif", "preview.png")
    io.check_outputs([out / name for name in names], overwrite=args.overwrite)
    start = time.perf_counter()
    print(f"cp3d demo: synthesizing a {'x'.join(map(str, args.shape))} membrane stack", file=sys.stderr)
    image, truth = data.synthetic_stack(tuple(args.shape), args.diameter, seed=args.seed, noise=args.noise)
    seconds = {"synthesize": time.perf_counter() - start}
    # the first run after installing also compiles the Numba kernels: say so rather than sit silent
    what = f"the {args.model} model" if args.model else "the bundled model that fits it (tanh or nuclei)"
    print(f"cp3d demo: segmenting it with {what} (the first run after installing also compiles the kernels, "
          "10-20 s)", file=sys.stderr)
    result = segment(image, args.model, diameter=args.diameter, backend=args.backend, device=args.device,
                     augment=args.augment, tile_size=args.tile_size, context=args.context)
    seconds.update(result.seconds)
    start = time.perf_counter()
    scores = metrics.evaluate(truth, result.labels)
    seconds["evaluate"] = time.perf_counter() - start
    with io.written_together(overwrite=args.overwrite):
        io.write_image(out / "image.tif", image)
        io.write_labels(out / "truth.tif", truth)
        io.write_labels(out / "labels.tif", result.labels)
        io.write_image(out / "flows.tif", np.concatenate([result.flows, result.foreground[None]]).reshape(
            -1, *image.shape[1:]))
        save_preview(out / "preview.png", image, result.labels)
    report = {"shape": list(image.shape), "cells": int(truth.max()), "found": int(result.labels.max()),
              "model": result.model,
              "scores": {k: round(float(v), 4) for k, v in scores.items()},
              "seconds": {k: round(v, 3) for k, v in seconds.items()}, "written_to": str(out)}
    print(json.dumps(report, indent=2))


def _segment(args):
    from . import io
    from .measure import cell_table
    from .model import load_model
    from .preview import save_preview
    from .segment import segment

    _check_output_suffixes(output=args.output, save_flows=args.save_flows, table=args.table, preview=args.preview)
    if args.chunks or _is_zarr_path(args.input) or _is_zarr_path(args.output):
        return _segment_chunked(args)
    # before the minutes of prediction, not after
    io.check_outputs([args.output, args.save_flows, args.table, args.preview], inputs=[args.input],
                     overwrite=args.overwrite)
    stack = io.read_image(args.input)
    voxel_size = tuple(args.voxel_size) if args.voxel_size else stack.voxel_size
    model = _named_model(args.model)
    result = segment(stack.data, model, diameter=args.diameter, voxel_size=voxel_size, backend=args.backend,
                     device=args.device, augment=args.augment, tile_size=args.tile_size, context=args.context,
                     progress=not args.quiet)
    if model is None:
        print(f"model 'auto': {result.model}", file=sys.stderr)
    if args.diameter == "auto":
        print(f"diameter 'auto': {result.diameter:.2f} voxels along x", file=sys.stderr)
    settings = _reconstruction(load_model(result.model), result, voxel_size)
    with io.written_together(overwrite=args.overwrite):
        io.write_labels(args.output, result.labels, voxel_size=voxel_size)
        if args.save_flows:
            maps = np.concatenate([result.flows, result.foreground[None]])
            io.write_image(args.save_flows, maps.reshape(-1, *maps.shape[2:]), voxel_size=voxel_size,
                           properties={"reconstruction": settings})
        if args.table:
            # the flow statistics with the convention the reconstruction's filter used (at the diameter it used)
            cell_table(result.labels, stack.data, result.flows, result.foreground, voxel_size,
                       targets=settings["targets"], tanh_scale=settings["tanh_scale"]).to_csv(args.table)
        if args.preview:
            save_preview(args.preview, stack.data, result.labels, voxel_size)
    print(json.dumps({"cells": int(result.labels.max()), "model": result.model, "diameter": round(result.diameter, 2),
                      "output": str(args.output), "reconstruction": settings,
                      "seconds": {k: round(v, 3) for k, v in result.seconds.items()}}))


def _named_model(name):
    """The --model value: a model name or folder, ``None`` for the default choice per stack ("auto")."""
    from .model import DEFAULT_MODEL
    from .model.unet import resolve_model_dir

    if name is None or name == DEFAULT_MODEL:
        return None
    resolve_model_dir(name)  # a wrong name fails here, before the stack is read
    return name


def _reconstruction(model, result, voxel_size):
    """The settings segment's reconstruction used, stored with the --save-flows maps: `cp3d reconstruct` on
    the maps takes them as its defaults and gives the same labels."""
    from .segment import cell_extent, model_border_volume, model_tanh_scale

    extent = cell_extent(result.diameter, voxel_size, model.config.train_diameter)
    return {"diameter": list(extent), "tanh_scale": list(model_tanh_scale(model.config, extent)),
            "targets": model.config.targets, "min_border_volume": model_border_volume(model.config, extent)}


def _is_zarr_path(path):
    return str(path).rstrip("/").endswith(".zarr")


def _dask_layer():
    """cp3d.dask, or an ImportError that names the extra to install."""
    try:
        from . import dask as cp3d_dask
    except ImportError as e:
        raise ImportError(f"chunked runs and .zarr files need the dask extra ({e}): pip install 'cp3d[dask]'") from e
    return cp3d_dask


# What each output option writes, by file name ending: a name that says another format would be misleading.
_OUTPUT_SUFFIXES = {"--output": (".tif", ".tiff", ".zarr"), "--save-flows": (".tif", ".tiff", ".zarr"),
                    "--table": (".csv",), "--preview": (".png",)}


def _check_output_suffixes(**paths):
    """Refuse an output whose name ends otherwise than what its option writes (keywords: option names)."""
    for option, path in paths.items():
        option = "--" + option.replace("_", "-")
        allowed = _OUTPUT_SUFFIXES[option]
        if path is not None and not str(path).rstrip("/").lower().endswith(allowed):
            raise ValueError(f"{option} {path!r}: it writes {' or '.join(allowed)} files; name it so")


def _dask_client(args):
    """A context holding a dask.distributed client: the given scheduler, or a LocalCluster on this machine."""
    try:
        from distributed import Client
    except ImportError as e:
        raise ImportError(f"chunked runs need dask.distributed ({e}); pip install 'cp3d[dask]'") from e
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    stack = contextlib.ExitStack()
    if args.scheduler:
        stack.enter_context(Client(args.scheduler))
        return stack
    from .dask import local_cluster

    memory = "auto" if args.memory_limit is None else int(args.memory_limit * 2**30)
    cluster = stack.enter_context(local_cluster(args.workers, memory_limit=memory))
    stack.enter_context(Client(cluster))
    return stack


def _check_chunk_shape(chunks, name="--chunks"):
    if chunks is not None and min(chunks) < 1:
        raise ValueError(f"{name} must be positive, got {tuple(chunks)}")
    return None if chunks is None else tuple(chunks)


def _write_labels_any(path, labels, voxel_size, quiet):
    """Labels to a TIFF, a new OME-Zarr image, or a label image added to an existing OME-Zarr image."""
    from . import io

    if not _is_zarr_path(path):
        io.write_tiff_chunked(path, labels, voxel_size, labels=True)
    elif io.is_zarr(path):
        io.write_ome_zarr_labels(path, labels, progress=not quiet)
    else:
        io.write_ome_zarr(path, labels, voxel_size, progress=not quiet)


def _segment_chunked(args):
    import time

    from . import io
    from .model import load_model

    cp3d_dask = _dask_layer()
    chunks = _check_chunk_shape(args.chunks) or (128, 256, 256)
    if args.table or args.preview:
        raise ValueError("--table and --preview work on a stack in memory; drop --chunks (and .zarr paths) for them")
    _check_chunked_outputs([args.output, args.save_flows], [args.input], args.overwrite)
    stack = io.open_image(args.input)
    voxel_size = tuple(args.voxel_size) if args.voxel_size else stack.voxel_size
    start = time.perf_counter()
    name, diameter = _named_model(args.model), args.diameter
    if name is None or diameter == "auto":
        sample = cp3d_dask.segment_central_crop(stack.data, name, diameter=diameter, voxel_size=voxel_size,
                                                device=args.device)
        name, diameter = sample.model, sample.diameter
        crop = "x".join(str(min(n, c)) for n, c in zip(stack.data.shape, cp3d_dask.CENTRAL_CROP))
        print(f"from the central {crop} crop: model {name!r}, diameter {diameter:.2f} voxels", file=sys.stderr)
    model = load_model(name)
    with _dask_client(args):
        result = cp3d_dask.segment(stack.data, model, diameter=diameter, voxel_size=voxel_size,
                                   chunks=chunks, augment=args.augment, context=args.context,
                                   device=args.device,
                                   temporary_directory=args.temporary_directory, progress=not args.quiet)
        settings = _reconstruction(model, result, voxel_size)
        with io.written_together(overwrite=args.overwrite):
            _write_labels_any(args.output, result.labels, voxel_size, args.quiet)
            if args.save_flows:
                _save_maps(args.save_flows, result.flows, result.foreground, voxel_size, settings)
        cells = int(result.labels.max().compute())
    print(json.dumps({"cells": cells, "model": name, "diameter": round(result.diameter, 2),
                      "output": str(args.output), "reconstruction": settings,
                      "chunks": list(chunks), "seconds": {**{k: round(v, 3) for k, v in result.seconds.items()},
                                  "total": round(time.perf_counter() - start, 3)}}))


def _estimate_tanh_scale(flows, foreground, targets):
    """``--tanh-scale auto``: the scale of (lazy) tanh maps, read from their central crop, as a (z, y, x) list."""
    from ._backend import CENTRAL_CROP, central_box
    from .reconstruct import estimate_tanh_scale

    if targets != "tanh":
        raise ValueError(f"--tanh-scale auto reads the scale of tanh flows; these maps are {targets!r} flows")
    box = central_box(tuple(slice(0, n) for n in foreground.shape), CENTRAL_CROP)
    scale = estimate_tanh_scale(np.asarray(flows[(slice(None), *box)]), np.asarray(foreground[box]))
    if scale is None:
        raise ValueError("--tanh-scale auto found no foreground in the maps' central crop to measure; give the scale")
    print(f"tanh scale 'auto' from the central {'x'.join(str(b.stop - b.start) for b in box)} crop: "
          f"{', '.join(f'{v:.2f}' for v in scale)} voxels (z, y, x)", file=sys.stderr)
    return [round(v, 4) for v in scale]


def _check_chunked_outputs(outputs, inputs, overwrite):
    """The in-memory path's checks for TIFF outputs (never an input, never an existing file unasked); a .zarr
    output is a new store or an existing OME-Zarr image that gains a labels group, never replaced."""
    from . import io

    io.check_outputs([p for p in outputs if p and not _is_zarr_path(p)], inputs=inputs, overwrite=overwrite)
    for path in outputs:
        if path and _is_zarr_path(path):
            io.check_output_folder(path)


def _save_maps(path, flows, foreground, voxel_size, settings):
    """The predicted maps as `cp3d segment --save-flows` writes them: a (4 Z, Y, X) TIFF or a Zarr group, with
    the reconstruction's settings (and the Zarr group with the voxel size, which a TIFF holds anyway)."""
    import dask.array as da

    from . import io

    maps = da.concatenate([flows, foreground[None].astype(np.float32)])
    if _is_zarr_path(path):
        if os.path.exists(path):
            raise FileExistsError(f"{path!r} exists; cp3d does not overwrite it")
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"  # renamed once complete
        try:
            da.to_zarr(maps.rechunk((4,) + maps.chunksize[1:]), tmp, component="maps")
            voxel = {} if voxel_size is None else {"voxel_size": list(voxel_size)}
            io.write_zarr_properties(tmp, {"reconstruction": settings, **voxel})
            io.place_new_folder(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        io.write_tiff_chunked(path, maps.reshape((-1,) + maps.shape[2:]), voxel_size,
                              properties={"reconstruction": settings})


def _open_maps(path):
    """Flows (3, Z, Y, X), foreground (Z, Y, X), voxel size and stored reconstruction settings (a dict, empty
    for maps written before cp3d stored them) from --save-flows output (TIFF or Zarr), lazily."""
    import dask.array as da

    from . import io

    properties = io.read_properties(path)
    if io.is_zarr(path):
        maps = da.from_zarr(path, component="maps")
        voxel_size = properties.get("voxel_size")
    else:
        stack = io.open_image(path)
        z4, ny, nx = stack.data.shape
        if z4 % 4:
            raise ValueError(f"{path!r} has {z4} slices: --save-flows output has 4 Z (flows z, y, x, foreground)")
        maps, voxel_size = stack.data.reshape((4, z4 // 4, ny, nx)), stack.voxel_size
    if maps.ndim != 4 or maps.shape[0] != 4:
        raise ValueError(f"{path!r} holds maps of shape {maps.shape}, expected (4, Z, Y, X)")
    return maps[:3].astype(np.float32), maps[3], voxel_size, properties.get("reconstruction", {})


def _reconstruct(args):
    import time

    cp3d_dask = _dask_layer()
    _check_output_suffixes(output=args.output)
    chunks = _check_chunk_shape(args.chunks) or (128, 256, 256)
    _check_chunked_outputs([args.output], [args.flows], args.overwrite)
    flows, foreground, voxel_size, saved = _open_maps(args.flows)
    chunks = tuple(min(c, n) for c, n in zip(chunks, foreground.shape))
    flows, foreground = flows.rechunk((3,) + chunks), foreground.rechunk(chunks)
    # the options given, else what cp3d segment stored with the maps: the tanh scale is the maps' own (the
    # model's flows at the size segment rescaled to), so it stays even when another --diameter is given
    targets = args.targets or saved.get("targets", "tanh")
    settings = {"diameter": args.diameter or saved.get("diameter"), "targets": targets,
                "tanh_scale": args.tanh_scale or (saved.get("tanh_scale") if targets == "tanh" else None),
                "min_border_volume": (saved.get("min_border_volume", 0.0) if args.min_border_volume is None
                                      else args.min_border_volume)}
    if args.tanh_scale and "auto" in args.tanh_scale:
        if len(args.tanh_scale) > 1:
            raise ValueError(f"--tanh-scale takes one scale, Z Y X scales or 'auto' alone, got {args.tanh_scale}")
        settings["tanh_scale"] = _estimate_tanh_scale(flows, foreground, targets)
    elif targets == "tanh" and settings["tanh_scale"] is None:
        print(f"{args.flows} holds no reconstruction settings (maps from before cp3d stored them, or not from "
              "cp3d segment): the tanh scale is taken as half the diameter; pass --diameter and --tanh-scale as "
              "cp3d segment printed them to get its labels, or --tanh-scale auto to read it from the maps",
              file=sys.stderr)
    start = time.perf_counter()
    with _dask_client(args):
        diameter, tanh_scale = (None if v is None else v[0] if len(v) == 1 else v
                                for v in (settings["diameter"], settings["tanh_scale"]))
        labels = cp3d_dask.reconstruct(flows, foreground, diameter=diameter, targets=settings["targets"],
                                       tanh_scale=tanh_scale, max_flow_error=args.max_flow_error,
                                       min_border_volume=settings["min_border_volume"],
                                       temporary_directory=args.temporary_directory, progress=not args.quiet)
        _write_labels_any(args.output, labels, voxel_size, args.quiet)
        cells = int(labels.max().compute())
    print(json.dumps({"cells": cells, "output": str(args.output), "chunks": list(chunks), "reconstruction": settings,
                      "seconds": round(time.perf_counter() - start, 3)}))


def _add_dask_options(parser):
    parser.add_argument("--chunks", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="work chunk by chunk with dask (exact, for stacks larger than memory); implied by a "
                             ".zarr input or output (default chunks 128 256 256)")
    parser.add_argument("--workers", type=int, default=1, help="dask workers of the local cluster (default 1)")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                        help="memory limit per local worker in GiB (default: dask's share of the machine)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="address of a running dask scheduler (dask-jobqueue, dask-kubernetes...) instead of "
                             "a local cluster")
    parser.add_argument("--temporary-directory", default=None, metavar="DIR",
                        help="folder for the intermediate volumes, up to ~28 bytes per voxel (shared by all workers on a "
                             "cluster)")


def _synth(args):
    from . import io
    from .data import write_synthetic_dataset

    folder = Path(args.out_dir)
    if folder.is_dir():  # a new folder holds nothing to overwrite
        names = [f"{kind}_{i:03d}.tif" for i in range(max(args.count, 0)) for kind in ("image", "labels")]
        io.check_outputs([folder / name for name in names], overwrite=args.overwrite)
    with io.written_together(overwrite=args.overwrite):
        pairs = write_synthetic_dataset(args.out_dir, shape=tuple(args.shape), diameter=args.diameter,
                                        count=args.count, seed=args.seed, kind=args.kind, varied=args.varied)
    for image_path, labels_path in pairs:
        print(image_path, labels_path)


def _evaluate(args):
    from . import io, metrics

    scores = metrics.evaluate(io.read_labels(args.gt).data, io.read_labels(args.pred).data)
    print(json.dumps({k: float(v) for k, v in scores.items()}, indent=2))


def _diameter(text):
    """--diameter: a number of voxels or 'auto'."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of voxels or 'auto', got {text!r}") from None


def _add_overwrite_option(parser):
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist (never an input)")


def _add_segment_options(parser):
    parser.add_argument("--model", default=None,
                        help="auto (the default: of the bundled tanh and nuclei models, the one whose flows agree "
                             "best with the cells it finds; chunked runs choose on a central crop); a bundled model "
                             "name: tanh or heat for membrane stains, nuclei for nuclear stains; or a model folder "
                             "written by cp3d train")
    parser.add_argument("--backend", default="auto", choices=("auto", "numpy", "numba", "cuda"),
                        help="reconstruction backend (default auto: numba on the CPU; cuda moves the maps to the GPU)")
    parser.add_argument("--device", default="auto", help="torch device for prediction")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="one network pass instead of averaging four mirror images (4x faster, less accurate)")
    parser.add_argument("--tile-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="prediction tile shape on the model's grid (default: the fewest voxels within a memory "
                             "budget); smaller tiles use less memory")
    parser.add_argument("--context", type=int, default=None,
                        help="voxels of context per tile end (default: the receptive radius, exact tiling)")


def build_parser():
    from . import __version__

    parser = argparse.ArgumentParser(prog="cp3d", description="3D cell instance segmentation (Cellpose3D).")
    parser.add_argument("--version", action="version", version=f"cp3d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthesize a stack, segment it with the bundled model, score it")
    p.add_argument("--out", default="cp3d_demo", help="folder for the TIFFs and preview.png (default: ./cp3d_demo)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), metavar=("Z", "Y", "X"),
                   help="size of the synthetic stack (default 64 128 128)")
    p.add_argument("--diameter", type=float, default=10.0, help="cell diameter of the stack in voxels (default 10)")
    p.add_argument("--noise", type=float, default=0.1, help="noise level of the stack (default 0.1)")
    p.add_argument("--seed", type=int, default=2026, help="random seed of the stack (default 2026)")
    _add_overwrite_option(p)
    _add_segment_options(p)
    p.set_defaults(run=_demo)

    p = sub.add_parser("segment", help="segment a TIFF stack")
    p.add_argument("input", help="the stack: a 3D TIFF (Z, Y, X), or an OME-Zarr image (.zarr, worked chunk by chunk)")
    p.add_argument("-o", "--output", required=True,
                   help="labels to write (uint32): a .tif, or a new .zarr (OME-Zarr, chunk by chunk); an existing "
                        "OME-Zarr image gets them in its labels/ group")
    p.add_argument("--diameter", type=_diameter, default="auto",
                   help="typical cell diameter in voxels along x, or 'auto' (default) to estimate it from the image "
                        "(chunked runs: from a central crop); give the model's training size (10.25 for the bundled "
                        "models) for one pass without estimating")
    p.add_argument("--voxel-size", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="default: read from the TIFF, else isotropic")
    p.add_argument("--save-flows", default=None, metavar="TIFF",
                   help="also write the predicted maps, as one (4 Z, Y, X) stack: Z slices each of flow z, "
                        "flow y, flow x and foreground probability (a .zarr path: a Zarr group), with the "
                        "reconstruction's settings, which cp3d reconstruct takes as its defaults")
    p.add_argument("--table", default=None, metavar="CSV",
                   help="also write one row per cell: id, size, centroid, bounding box, mean intensity, flow error "
                        "(see cp3d.cell_table)")
    p.add_argument("--preview", default=None, metavar="PNG",
                   help="also write the label outlines over the image, XY and XZ mid-sections")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_overwrite_option(p)
    _add_segment_options(p)
    _add_dask_options(p)
    p.set_defaults(run=_segment)

    p = sub.add_parser("reconstruct", help="instances from saved maps (--save-flows TIFF or Zarr), chunk by chunk")
    p.add_argument("flows", help="maps written by cp3d segment --save-flows")
    p.add_argument("-o", "--output", required=True, help="labels: a TIFF, a new .zarr, or an existing OME-Zarr image")
    p.add_argument("--diameter", type=float, nargs="+", default=None,
                   help="cell diameter in voxels (or Z Y X); default: the one cp3d segment stored with the maps")
    p.add_argument("--targets", default=None, choices=("tanh", "heat"),
                   help="the maps' flow convention; default: the one stored with the maps, else tanh")
    p.add_argument("--tanh-scale", type=_diameter, nargs="+", default=None,
                   help="scale of the tanh flows, or Z Y X, or 'auto' to read it from the maps' central crop; "
                        "default: the one cp3d segment stored with the maps (its model's flows), else diameter / 2")
    p.add_argument("--max-flow-error", type=float, default=0.8)
    p.add_argument("--min-border-volume", type=float, default=None,
                   help="smallest volume in voxels of an instance touching the stack's faces; default: the one "
                        "cp3d segment stored with the maps (a cap of a cell one network voxel deep), else 0")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_overwrite_option(p)
    _add_dask_options(p)
    p.set_defaults(run=_reconstruct)

    p = sub.add_parser("synth", help="write synthetic image/label TIFF pairs")
    p.add_argument("out_dir")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--diameter", type=float, default=10.0)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", default="membrane", choices=("membrane", "nuclei"))
    p.add_argument("--varied", action="store_true",
                   help="draw each stack's rendering settings at random (walls, texture, PSF, noise...), as "
                        "cp3d train --varied does")
    _add_overwrite_option(p)
    p.set_defaults(run=_synth)

    p = sub.add_parser("evaluate", help="score predicted labels against ground truth (JSON); TIFF or OME-Zarr")
    p.add_argument("gt")
    p.add_argument("pred")
    p.set_defaults(run=_evaluate)

    sub.add_parser("train", help="train a model on synthetic stacks (cp3d train --help)", add_help=False)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .model.train import main as train_main

        command, run = "train", lambda: train_main(argv[1:], prog="cp3d train")
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.run(args)
    try:
        with warnings.catch_warnings():
            # one line a warning, as the errors below, once (not once a pass), without the source line that means
            # nothing to a CLI user
            shown = set()

            def show(message, *_, **__):
                if str(message) not in shown:
                    shown.add(str(message))
                    print(f"cp3d {command}: warning: {message}", file=sys.stderr)

            warnings.showwarning = show
            run()
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"cp3d {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cp3d {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
