"""Time ``cp3d.cell_table`` on a realistic volume: ~10,000 cells in 8 million voxels.

The cells are a Voronoi tessellation of random seeds (every voxel belongs to
the nearest seed), so the ids are spread through the volume as in a tissue.
Three configurations are timed side by side: labels alone; with an image
(mean intensity) and a voxel size; and with flows and a foreground (the
filters' flow error and overlap, which recompute the tanh flows voxel by
voxel). Best of ``--repeat`` after one warm-up call (Numba compilation).

Usage::

    python bench/bench_measure.py                        # 128x256x256, 10,000 cells
    python bench/bench_measure.py --shape 32 64 64 --cells 200
"""

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

import cp3d
from _machine import best_seconds, machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "measure.json"


def voronoi_labels(shape, cells, seed=0):
    """uint32 labels 1..cells: each voxel takes its nearest random seed."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, 1, (cells, 3)) * np.array(shape)
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 3)
    _, nearest = cKDTree(seeds).query(grid, workers=-1)
    return (nearest + 1).astype(np.uint32).reshape(shape)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    shape = tuple(args.shape)
    labels = voronoi_labels(shape, args.cells)
    rng = np.random.default_rng(1)
    image = rng.random(shape, dtype=np.float32)
    flows = cp3d.tanh_flows(labels, 5.0)
    foreground = labels > 0
    n_cells = int(len(np.unique(labels)))

    configurations = {
        "labels": lambda: cp3d.cell_table(labels),
        "labels+image+voxel_size": lambda: cp3d.cell_table(labels, image=image, voxel_size=(2.0, 0.5, 0.5)),
        "labels+flows+foreground": lambda: cp3d.cell_table(labels, flows=flows, foreground=foreground),
    }
    seconds = {name: round(best_seconds(call, args.repeat), 4) for name, call in configurations.items()}
    table = cp3d.cell_table(labels, image=image, flows=flows, foreground=foreground)
    assert table.n_cells == n_cells
    report = {
        "shape": list(shape), "voxels": int(np.prod(shape)), "cells": n_cells, "repeat": args.repeat,
        "seconds": seconds, "goal_seconds": 1.0,
        "max_flow_error_on_oracle_flows": float(table["flow_error"].max()),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("shape", "cells", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
