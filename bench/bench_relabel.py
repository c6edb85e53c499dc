"""Relabelling and component labelling: cp3d's own kernels against the libraries.

Two questions, each answered side by side in one run:

* **Renumbering** a label volume. Two numberings are needed in cp3d:
  ids 1..N in C order of each instance's first voxel (reconstruct's output
  contract) and 1..N in increasing id order (``targets.compact_ids``, used
  internally where any compact numbering does). Timed on Voronoi label volumes
  (ids spread through the volume as in a tissue) with gaps in the ids:
  ``group.relabel_by_first_voxel`` (NumPy and Numba backends) and
  ``fastremap.renumber`` for the first numbering; ``targets.compact_ids`` and
  ``skimage.segmentation.relabel_sequential`` for the second.
* **Component labelling** of the closed mask of reconstruct (the end positions
  of the followed flows, closed with a ball): ``group._label_components`` (serial
  two-pass union-find) against ``scipy.ndimage.label`` (6-connected), whose ids
  are already in C order of the first voxel. The mask comes from a
  ``cp3d.data.synthetic_stack``'s true labels (tanh flows, followed), tiled
  along z to reach the larger sizes. cc3d is timed too where it is installed.

Best of ``--repeat`` after one warm-up call (Numba compilation). Writes
``bench/results/relabel.json``.

Usage::

    flock /tmp/cp3d-bench.lock python bench/bench_relabel.py
    python bench/bench_relabel.py --sizes 1000000 --ids 1000 --repeat 1   # quick
"""

import argparse
import json
from pathlib import Path

import numpy as np

from _machine import best_seconds, machine_info, package_version

RESULTS = Path(__file__).resolve().parent / "results" / "relabel.json"


def voronoi_like_labels(n_voxels, n_ids, seed=0):
    """uint32 labels of about `n_voxels` with `n_ids` ids scattered in blocks, ids with gaps, 0 background."""
    rng = np.random.default_rng(seed)
    side = round(n_voxels ** (1 / 3))
    shape = (max(1, n_voxels // (side * side)), side, side)
    block = max(1, round((np.prod(shape) / n_ids) ** (1 / 3)))
    coarse = tuple(-(-s // block) for s in shape)
    ids = rng.choice(np.arange(1, 4 * n_ids, dtype=np.uint32), size=np.prod(coarse)).reshape(coarse)
    ids[rng.random(coarse) < 0.2] = 0  # background
    labels = ids.repeat(block, 0).repeat(block, 1).repeat(block, 2)[tuple(slice(s) for s in shape)]
    return np.ascontiguousarray(labels)


def closed_mask(shape, diameter, seed=0):
    """The closed mask reconstruct labels (ends of the followed true-label flows, closed with its ball), and
    the stack's foreground."""
    import cp3d
    from cp3d.data import synthetic_stack
    from cp3d.follow import follow_starts
    from cp3d.group import _erode_painted, _paint_balls, ball_offsets
    from cp3d.reconstruct import reconstruction_parameters

    _, truth = synthetic_stack(shape, diameter, seed=seed)
    params = reconstruction_parameters(diameter)
    flows = cp3d.tanh_flows(truth, params.tanh_scale)
    starts = np.flatnonzero(truth)
    end = follow_starts(flows, starts, np.float32(params.step), params.n_iter, "numba")
    gathered = np.zeros(shape, bool)
    gathered[tuple(np.rint(end).astype(np.int64).T)] = True
    offsets = ball_offsets(params.closing_radius)
    extent = np.abs(offsets).max(axis=0)
    padded = np.zeros(tuple(np.asarray(shape) + 2 * extent), bool)
    _paint_balls(np.flatnonzero(gathered), shape, extent, offsets, padded)
    closed = np.zeros(shape, bool)
    _erode_painted(padded, extent, offsets, closed)
    return closed, truth > 0


def renumbering(sizes, id_counts, repeat):
    import fastremap
    from skimage.segmentation import relabel_sequential

    from cp3d.group import relabel_by_first_voxel
    from cp3d.targets import compact_ids

    rows = []
    for n_voxels in sizes:
        for n_ids in id_counts:
            labels = voronoi_like_labels(n_voxels, n_ids)
            first_voxel = relabel_by_first_voxel(labels, "numpy")
            by_id = compact_ids(labels)[0]
            fr = fastremap.renumber(labels, preserve_zero=True, in_place=False)[0].astype(np.uint32)
            assert np.array_equal(fr, first_voxel), "fastremap.renumber is not first-voxel order"
            assert np.array_equal(relabel_by_first_voxel(labels, "numba"), first_voxel)
            assert np.array_equal(relabel_sequential(labels)[0], by_id)
            timings = {
                "first_voxel/cp3d_numpy": lambda: relabel_by_first_voxel(labels, "numpy"),
                "first_voxel/cp3d_numba": lambda: relabel_by_first_voxel(labels, "numba"),
                "first_voxel/fastremap.renumber": lambda: fastremap.renumber(labels, preserve_zero=True,
                                                                             in_place=False)[0].astype(np.uint32),
                "id_order/cp3d_compact_ids": lambda: compact_ids(labels),
                "id_order/skimage.relabel_sequential": lambda: relabel_sequential(labels),
            }
            row = {"voxels": int(labels.size), "ids": int(len(np.unique(labels)) - 1)}
            for name, call in timings.items():
                row[name] = round(best_seconds(call, repeat), 4)
                print(row["voxels"], row["ids"], name, row[name], flush=True)
            rows.append(row)
    return rows


def component_labelling(shape, diameter, tiles, repeat):
    from scipy import ndimage

    from cp3d.group import _label_components

    try:
        import cc3d
    except ImportError:
        cc3d = None
    base, foreground = closed_mask(shape, diameter)
    rows = []
    # "closed": reconstruct's mask (the followed ends gather in small blobs);
    # "foreground": the worst case, flows that gather nothing (every voxel stays).
    for kind, n in [(k, n) for n in tiles for k in ("closed", "foreground")]:
        closed = np.ascontiguousarray(np.tile(base if kind == "closed" else foreground, (n, 1, 1)))

        def ours():
            out = np.zeros(closed.shape, np.uint32)
            _label_components(closed, out)
            return out

        def scipy_label():
            out = np.empty(closed.shape, np.int32)  # labelled in place, viewed as uint32: no copy
            ndimage.label(closed, output=out)
            return out.view(np.uint32)

        assert np.array_equal(ours(), scipy_label())
        row = {"mask": kind, "voxels": int(closed.size), "components": int(ndimage.label(closed)[1]),
               "closed_fraction": round(float(closed.mean()), 3)}
        calls = {"cp3d._label_components": ours, "scipy.ndimage.label": scipy_label}
        if cc3d is not None:
            calls["cc3d.connected_components"] = lambda: cc3d.connected_components(closed, connectivity=6)
        for name, call in calls.items():
            row[name] = round(best_seconds(call, repeat), 4)
            print(kind, row["voxels"], name, row[name], flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=(10_000_000, 50_000_000))
    parser.add_argument("--ids", type=int, nargs="+", default=(1_000, 100_000))
    parser.add_argument("--stack", type=int, nargs=3, default=(64, 128, 128), metavar=("Z", "Y", "X"))
    parser.add_argument("--diameter", type=float, default=10.0)
    parser.add_argument("--tiles", type=int, nargs="+", default=(10, 50), help="z-tilings of the closed mask")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = {
        "machine": machine_info(packages=("numpy", "numba", "scipy", "scikit-image", "fastremap",
                                          "connected-components-3d")),
        "repeat": args.repeat,
        "renumbering_seconds": renumbering(args.sizes, args.ids, args.repeat),
        "component_labelling_seconds": component_labelling(tuple(args.stack), args.diameter, args.tiles,
                                                           args.repeat),
        "cc3d_installed": package_version("connected-components-3d") is not None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
