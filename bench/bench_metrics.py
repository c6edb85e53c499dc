"""Time ``cp3d.metrics.evaluate`` on a synthetic volume of realistic size.

The ground truth is a grid of boxes whose walls are jittered along each
axis; the prediction moves every wall a little, merges a few cells with
their neighbour, splits a few in two and drops a few. Building it takes a
few separable passes, so the run is dominated by ``evaluate`` itself.

Usage::

    python bench/bench_metrics.py --shape 256 512 512 --cells 10000
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from cp3d.metrics import evaluate

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.json"


def grid_counts(shape, cells):
    """Cells per axis so that their product is close to `cells`, roughly cubic."""
    scale = (cells / np.prod(shape)) ** (1 / 3)
    return [max(1, round(s * scale)) for s in shape]


def jittered_edges(shape, counts, jitter, rng):
    """Interior wall positions per axis, each moved by up to `jitter` cell widths."""
    edges = []
    for size, n in zip(shape, counts):
        step = size / n
        e = np.linspace(0, size, n + 1)[1:-1]
        edges.append(np.sort(e + rng.uniform(-jitter, jitter, e.size) * step))
    return edges


def boxes(shape, counts, edges):
    """Label volume (uint32, ids from 1) of the boxes between `edges`, and the x block index."""
    z, y, x = (np.searchsorted(e, np.arange(s), side="right") for s, e in zip(shape, edges))
    _, ny, nx = counts
    labels = np.empty(shape, dtype=np.uint32)
    np.add(
        (z[:, None] * ny + y[None, :])[:, :, None].astype(np.uint32) * np.uint32(nx),
        x[None, None, :].astype(np.uint32) + np.uint32(1),
        out=labels,
    )
    return labels, x


def make_pair(shape, cells, seed=0):
    """Return (gt, pred) label volumes with about `cells` instances."""
    rng = np.random.default_rng(seed)
    counts = grid_counts(shape, cells)
    n = int(np.prod(counts))
    gt_edges = jittered_edges(shape, counts, 0.25, rng)
    gt, _ = boxes(shape, counts, gt_edges)
    # Every predicted wall sits a little off the true one.
    pred_edges = [np.sort(e + rng.uniform(-0.08, 0.08, e.size) * (s / n_))
                  for e, s, n_ in zip(gt_edges, shape, counts)]
    pred, xblock = boxes(shape, counts, pred_edges)

    lut = np.arange(n + 1, dtype=np.uint32)
    background = rng.choice(np.arange(1, n + 1), n // 20, replace=False)
    gt = np.take(np.where(np.isin(lut, background), 0, lut).astype(np.uint32), gt)

    ids = rng.permutation(np.arange(1, n))  # id + 1 is the neighbour along x
    merge, split, drop = ids[:n // 50], ids[n // 50:n // 25], ids[n // 25:n // 25 + n // 50]
    lut[merge] = merge + 1
    lut[drop] = 0
    pred = np.take(lut, pred)
    is_split = np.zeros(n + 1, dtype=bool)
    is_split[split] = True
    # upper half (in x) of each split cell gets a fresh id
    upper = np.zeros(shape[2], dtype=bool)
    for b in np.unique(xblock):
        pos = np.flatnonzero(xblock == b)
        upper[pos[pos.size // 2:]] = True
    mask = np.take(is_split, pred)
    mask &= upper[None, None, :]
    pred[mask] += np.uint32(n + 1)
    return gt, pred


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--cells", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    shape = tuple(args.shape)
    start = time.perf_counter()
    gt, pred = make_pair(shape, args.cells)
    build_s = time.perf_counter() - start
    seconds, scores = best_of(lambda: evaluate(gt, pred), args.repeat)
    record = {
        "benchmark": "cp3d.metrics.evaluate",
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "shape": list(shape),
        "voxels": int(np.prod(shape)),
        "n_gt": scores["n_gt"],
        "n_pred": scores["n_pred"],
        "seconds_best_of": args.repeat,
        "seconds": round(seconds, 3),
        "build_seconds": round(build_s, 3),
        "scores": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
