"""The GPU figures of issue 13, in one run on a machine with a CUDA device.

1. ``reconstruct`` of oracle tanh flows of a synthetic membrane stack
   (512^3 by default) on CUDA and on Numba: seconds of each, and whether the
   labels are identical.
2. ``segment`` of a synthetic stack of the same size with one network pass
   (``augment=False``), prediction and reconstruction on the GPU.
3. ``reconstruct`` on CUDA against the cell count (same volume, several cell
   diameters).

Usage::

    python bench/bench_gpu.py               # on the GPU machine (bench/gpu_check.sh runs it)
    python bench/bench_gpu.py --quick       # small sizes; without a GPU, checks the script on the CPU

Writes ``bench/results/gpu.json`` (``gpu_quick.json`` with ``--quick``) and a
PNG of the scaling beside it.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

import _machine
import cp3d
from cp3d.data import synthetic_stack

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FULL = {"size": 512, "scaling_size": 256, "diameters": (40.0, 20.0, 12.0, 8.0)}
QUICK = {"size": 48, "scaling_size": 40, "diameters": (16.0, 8.0)}
DIAMETER = 10.0


def _cupy():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # no CuPy, no driver or no device: a CPU-only run
        return None


def _timed(fn, cupy, repeat=2):
    """Best of `repeat` runs after one warm-up, the device synchronised around each."""
    out = fn()
    best = np.inf
    for _ in range(repeat):
        if cupy is not None:
            cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        out = fn()
        if cupy is not None:
            cupy.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_reconstruct(size, cupy):
    _, truth = synthetic_stack((size,) * 3, DIAMETER, seed=0)
    flows = cp3d.tanh_flows(truth, DIAMETER / 2)
    foreground = truth > 0
    record = {"shape": [size] * 3, "cells": int(truth.max()), "foreground_fraction": float(foreground.mean())}
    numba_s, cpu_labels = _timed(lambda: cp3d.reconstruct(flows, foreground, diameter=DIAMETER), None, repeat=1)
    record["numba_s"] = round(numba_s, 3)
    if cupy is not None:
        gpu_flows, gpu_fg = cupy.asarray(flows), cupy.asarray(foreground)
        cuda_s, gpu_labels = _timed(lambda: cp3d.reconstruct(gpu_flows, gpu_fg, diameter=DIAMETER), cupy)
        record["cuda_s"] = round(cuda_s, 4)
        record["labels_equal_cpu"] = bool(np.array_equal(cupy.asnumpy(gpu_labels), cpu_labels))
        record["speedup_cuda_over_numba"] = round(numba_s / cuda_s, 1)
    return record


def bench_segment(size, cupy):
    image, _ = synthetic_stack((size,) * 3, DIAMETER, seed=1)
    backend = "cuda" if cupy is not None else "numba"
    device = "cuda" if cupy is not None else "cpu"
    seconds, result = _timed(lambda: cp3d.segment(image, augment=False, backend=backend, device=device), cupy,
                             repeat=1)
    return {"shape": [size] * 3, "backend": backend, "device": device, "seconds": round(seconds, 3),
            "stages": {k: round(v, 3) for k, v in result.seconds.items()}, "cells": int(result.labels.max())}


def bench_scaling(size, diameters, cupy):
    rows = []
    for d in diameters:
        _, truth = synthetic_stack((size,) * 3, d, seed=2)
        flows, foreground = cp3d.tanh_flows(truth, d / 2), truth > 0
        if cupy is not None:
            flows, foreground = cupy.asarray(flows), cupy.asarray(foreground)
        seconds, _ = _timed(lambda: cp3d.reconstruct(flows, foreground, diameter=d), cupy)
        rows.append({"diameter": d, "cells": int(truth.max()), "seconds": round(seconds, 4)})
    times = [r["seconds"] for r in rows]
    return {"shape": [size] * 3, "rows": rows, "max_over_min": round(max(times) / min(times), 3)}


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["scaling"]["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["cells"] for r in rows], [r["seconds"] for r in rows], "o-")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("cells")
    ax.set_ylabel("reconstruct seconds")
    ax.set_title(f"{record['device']}, {'x'.join(map(str, record['scaling']['shape']))}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (also runs without a GPU)")
    parser.add_argument("--out", type=Path, help="JSON path; default bench/results/gpu[_quick].json")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    cupy = _cupy()
    if cupy is None and not args.quick:
        parser.error("no CUDA device visible to CuPy; use --quick to check the script on the CPU")
    device = _machine.gpu_name() or ("CuPy device" if cupy is not None else "none (CPU only)")
    record = {"benchmark": "gpu", "device": device, "machine": _machine.machine_info(("numpy", "numba", "torch",
                                                                                       "cupy-cuda13x"))}
    record["reconstruct"] = bench_reconstruct(config["size"], cupy)
    record["reconstruct_512_s"] = record["reconstruct"].get("cuda_s") if config["size"] == 512 else None
    record["labels_equal_cpu"] = record["reconstruct"].get("labels_equal_cpu")
    record["segment"] = bench_segment(config["size"], cupy)
    record["segment_512_s"] = record["segment"]["seconds"] if config["size"] == 512 and cupy is not None else None
    record["scaling"] = bench_scaling(config["scaling_size"], config["diameters"], cupy)
    out = args.out or RESULTS / ("gpu_quick.json" if args.quick else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    plot(record, out.with_suffix(".png"))
    print(json.dumps({k: record[k] for k in ("device", "reconstruct_512_s", "segment_512_s", "labels_equal_cpu")}))


if __name__ == "__main__":
    main()
