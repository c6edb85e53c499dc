"""Chunked reconstruction and segmentation (cp3d.dask) against the in-memory pipeline.

Flows of a synthetic stack (cells 10 voxels across, the tanh flows plus
noise) are written to a Zarr store at each size; each run then starts in a
fresh Python process that reads them, and the resident memory of that
process and all its children (the dask workers) is sampled every 0.2 s:

- ``memory``: ``cp3d.reconstruct`` on the whole volume loaded from the store
  (its seconds alone, and from store to store: load, reconstruct, write the
  labels to a Zarr store);
- ``dask_Ww``: ``cp3d.dask.reconstruct`` on ``cp3d.dask.local_cluster(W)`` (the
  CLI's cluster: W worker processes, one task at a time each, the cores'
  threads split between them), from the flows store to a labels Zarr store;
- ``segment``: ``cp3d segment IN.ome.zarr -o OUT.zarr --chunks ... --no-augment``
  end to end with the bundled model (``--segment-shape Z Y X`` runs only this,
  on a stack of that shape, e.g. the 392x1500x1800 of the issue).

The chunked labels are checked against the in-memory labels at every size
where both ran. Writes ``results/dask.json`` and ``results/dask.png``.

    python bench/bench_dask.py                       # 1e8 and 3e8 voxels, segment at 3.4e7
    python bench/bench_dask.py --sizes 1e8 --segment 0
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if sys.argv[1:2] == ["_cpu"]:
    os.environ["NUMBA_NUM_THREADS"] = "1"  # before anything imports Numba
from _machine import machine_info  # noqa: E402

CHUNKS = (128, 256, 256)
# (Z, Y, X) per size: 896 x 896 planes, the depth sets the voxel count.
SHAPES = {"6e6": (32, 448, 448), "3e7": (128, 512, 512), "1e8": (128, 896, 896), "3e8": (384, 896, 896), "1e9": (1280, 896, 896)}


def make_maps(folder, shape, seed=0):
    """Flows and foreground of a synthetic stack tiled to `shape`, written slab by slab to a Zarr store."""
    import zarr

    import cp3d

    base_shape = (128, 224, 224)
    image, labels = cp3d.data.synthetic_stack(base_shape, 10, seed=seed)
    noise = np.random.default_rng(seed).normal(0, 0.1, (3,) + base_shape)
    flows = np.clip(cp3d.tanh_flows(labels, 5.0) + noise, -1, 1).astype(np.float32)
    root = zarr.open_group(os.path.join(folder, "maps.zarr"), mode="w")
    zf = root.create_array("flows", shape=(3,) + shape, chunks=(3,) + CHUNKS, dtype=np.float32)
    zg = root.create_array("foreground", shape=shape, chunks=CHUNKS, dtype=bool)
    zi = root.create_array("image", shape=shape, chunks=CHUNKS, dtype=image.dtype)
    reps = [-(-n // b) for n, b in zip(shape, base_shape)]
    for k in range(reps[0]):
        z = slice(k * base_shape[0], min((k + 1) * base_shape[0], shape[0]))
        depth = z.stop - z.start
        tile = lambda a: np.tile(a[..., :depth, :, :], [1] * (a.ndim - 3) + [1] + reps[1:])[..., :shape[1], :shape[2]]
        zf[:, z] = tile(flows)
        zg[z] = tile(labels > 0)
        zi[z] = tile(image)
    return os.path.join(folder, "maps.zarr")


def run_memory(store, out):
    import zarr

    import cp3d

    start = time.perf_counter()
    root = zarr.open_group(store, mode="r")
    flows, foreground = root["flows"][:], root["foreground"][:]
    loaded = time.perf_counter()
    labels = cp3d.reconstruct(flows, foreground)
    seconds = time.perf_counter() - loaded
    # Written as the chunked run writes its labels, so that both runs go from the same store to a store.
    written = time.perf_counter()
    zarr.create_array(out.replace(".npy", ".zarr"), shape=labels.shape, chunks=CHUNKS, dtype=labels.dtype)[:] = labels
    write_seconds = time.perf_counter() - written
    np.save(out, labels)
    return {"seconds": seconds, "load_seconds": loaded - start, "write_seconds": write_seconds,
            "cells": int(labels.max())}


def run_dask(store, out, workers, chunks):
    """The chunked run on the CLI's local cluster: `workers` processes, one task each, cores / workers threads;
    0 workers: dask's default (threaded) scheduler in this process, what a user gets without a cluster."""
    import contextlib

    import dask.array as da
    from distributed import Client

    import cp3d.dask

    with contextlib.ExitStack() as stack:
        if workers:
            stack.enter_context(Client(stack.enter_context(cp3d.dask.local_cluster(workers))))
        flows = da.from_zarr(store, component="flows")
        foreground = da.from_zarr(store, component="foreground")
        start = time.perf_counter()
        labels = cp3d.dask.reconstruct(flows, foreground, chunks=chunks, temporary_directory=os.path.dirname(out))
        da.to_zarr(labels, out)
        seconds = time.perf_counter() - start
        cells = int(da.from_zarr(out).max().compute())
    return {"seconds": seconds, "cells": cells, "workers": workers,
            "numba_threads_per_worker": max(1, (os.cpu_count() or 1) // max(1, workers))}


def measured(args):
    """Run this script's `args` in a fresh process; return its JSON and the peak RSS of it and its children."""
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0

    def sample():
        nonlocal peak
        while proc.poll() is None:
            total = 0
            try:
                for p in [parent] + parent.children(recursive=True):
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak = max(peak, total)
            time.sleep(0.2)

    thread = threading.Thread(target=sample)
    thread.start()
    stdout, _ = proc.communicate()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{args} failed with code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gb"] = round(peak / 2**30, 3)
    return result


def same_labels(npy, zarr_path):
    import zarr

    whole = np.load(npy, mmap_mode="r")
    chunked = zarr.open_array(zarr_path, mode="r")
    return all(np.array_equal(whole[z:z + 64], chunked[z:z + 64]) for z in range(0, whole.shape[0], 64))


def segment_end_to_end(folder, shape, chunks):
    import zarr

    import cp3d

    image = zarr.open_group(os.path.join(folder, "maps.zarr"), mode="r")["image"]
    import dask.array as da

    path = os.path.join(folder, "image.ome.zarr")
    cp3d.io.write_ome_zarr(path, da.from_zarr(image)[: shape[0], : shape[1], : shape[2]], chunks=chunks)
    out = os.path.join(folder, "labels.zarr")
    args = ["-m", "cp3d.cli", "segment", path, "-o", out, "--chunks", *map(str, chunks), "--no-augment",
            "--workers", "1", "--quiet"]
    result = measured(["_cli", *args])
    return {"shape": list(shape), "voxels": int(np.prod(shape)), "chunks": list(chunks), **result}


def cpu_seconds(store, chunks):
    """Process CPU seconds of the in-memory run (load + reconstruct) and the chunked one, both single-threaded.

    The synchronous scheduler and one Numba thread make CPU seconds the work each
    pipeline does, whatever else the machine runs; their ratio is the cost of
    working chunk by chunk (halos, the stores, the per-chunk NumPy steps).
    """
    import dask
    import dask.array as da
    import zarr

    import cp3d
    import cp3d.dask

    cp3d.reconstruct(np.zeros((3, 8, 8, 8), np.float32), np.ones((8, 8, 8), bool))  # compile outside the timing
    start = time.process_time()
    root = zarr.open_group(store, mode="r")
    flows, foreground = root["flows"][:], root["foreground"][:]
    loaded = time.process_time()
    whole = cp3d.reconstruct(flows, foreground)
    memory = {"load": loaded - start, "reconstruct": time.process_time() - loaded}
    del flows, foreground
    start = time.process_time()
    with dask.config.set(scheduler="synchronous"):
        labels = cp3d.dask.reconstruct(da.from_zarr(store, component="flows"),
                                       da.from_zarr(store, component="foreground"), chunks=chunks).compute()
    chunked = time.process_time() - start
    return {"memory_cpu_s": memory, "dask_cpu_s": chunked, "equal": bool((labels == whole).all()),
            "dask_over_memory_with_load": round(chunked / (memory["load"] + memory["reconstruct"]), 3),
            "dask_over_memory_reconstruct_only": round(chunked / memory["reconstruct"], 3)}


def make_image(path, shape, diameter, chunks, seed=0):
    """A synthetic stack with cells `diameter` voxels across, tiled to `shape`, written as an OME-Zarr image."""
    import dask.array as da

    import cp3d

    base_shape = tuple(min(n, int(round(12 * diameter))) for n in shape)
    image, _ = cp3d.data.synthetic_stack(base_shape, diameter, seed=seed)
    reps = [-(-n // b) for n, b in zip(shape, base_shape)]
    tiled = da.tile(da.from_array(image, chunks=image.shape), reps)[: shape[0], : shape[1], : shape[2]]
    cp3d.io.write_ome_zarr(path, tiled.rechunk(chunks), chunks=chunks)


def segment_large(folder, shape, diameter, chunks, workers):
    """`cp3d segment` end to end on an OME-Zarr stack of `shape` (one network pass), in a fresh process."""
    path = os.path.join(folder, "image.ome.zarr")
    start = time.perf_counter()
    make_image(path, shape, diameter, chunks)
    made = time.perf_counter() - start
    print(f"image {shape} written in {made:.0f} s", file=sys.stderr)
    out = os.path.join(folder, "labels.zarr")
    args = ["-m", "cp3d.cli", "segment", path, "-o", out, "--chunks", *map(str, chunks), "--no-augment",
            "--diameter", str(diameter), "--workers", str(workers), "--quiet"]
    result = measured(["_cli", *args])
    return {"shape": list(shape), "voxels": int(np.prod(shape)), "diameter": diameter, "chunks": list(chunks),
            "workers": workers, "make_image_s": round(made, 1), "command": "cp3d " + " ".join(args[2:]), **result}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["reconstruct"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['voxels']:.1e}" for r in rows]
    x = np.arange(len(rows))
    def name(key):
        run = next(r[key] for r in rows if key in r)  # the counts the run recorded
        workers, threads = run["workers"], run["numba_threads_per_worker"]
        if not workers:
            return "dask, threaded scheduler (no cluster)"
        return f"dask, {workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}"

    series = [("memory", "in memory")] + [(key, name(key)) for key in
                                          sorted({k for r in rows for k in r if k.startswith("dask_")})]
    width = 0.8 / len(series)
    shift = (len(series) - 1) / 2
    for k, (key, label) in enumerate(series):
        a.bar(x + (k - shift) * width, [r.get(key, {}).get("s_per_1e6", 0) for r in rows], width, label=label)
        b.bar(x + (k - shift) * width, [r.get(key, {}).get("peak_rss_gb", 0) for r in rows], width, label=label)
    a.scatter(x - shift * width, [r.get("memory", {}).get("store_to_store_s_per_1e6", np.nan) for r in rows],
              marker="_", s=300, color="k", label="in memory, with store read and write")
    for ax, title in ((a, "seconds per 1e6 voxels"), (b, "peak resident memory, GB")):
        ax.set_xticks(x, labels)
        ax.set_xlabel("voxels")
        ax.set_title(title)
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("cp3d.reconstruct vs cp3d.dask.reconstruct (2-core CPU, chunks %s)" % (CHUNKS,))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1e8", "3e8"], choices=sorted(SHAPES))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2],
                        help="local clusters to run (cp3d.dask.local_cluster: W workers of cores / W threads; 0: "
                             "dask's default threaded scheduler, no cluster); the first at every size")
    parser.add_argument("--two-workers", nargs="+", default=["1e8"], help="sizes that run every --workers entry")
    parser.add_argument("--memory-sizes", nargs="+", default=["1e8", "3e8"], help="sizes also run in memory")
    parser.add_argument("--segment", type=float, default=3.4e7, help="voxels of the segment run (0: skip)")
    parser.add_argument("--folder", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=str(HERE / "results" / "dask.json"))
    parser.add_argument("--segment-shape", nargs=3, type=int, metavar=("Z", "Y", "X"),
                        help="only run `cp3d segment` end to end on a stack of this shape (e.g. 392 1500 1800)")
    parser.add_argument("--segment-diameter", type=float, default=20.0,
                        help="cell diameter of that stack, in voxels (default 20)")
    parser.add_argument("--cpu-seconds", choices=sorted(SHAPES),
                        help="only compare CPU seconds, single-threaded, of the in-memory and chunked runs at this size")
    args = parser.parse_args(argv)
    if args.cpu_seconds:
        folder = tempfile.mkdtemp(prefix="cp3d-bench-dask-", dir=args.folder)
        try:
            shape = SHAPES[args.cpu_seconds]
            row = {"shape": list(shape), "voxels": int(np.prod(shape)), "chunks": list(CHUNKS),
                   **measured(["_cpu", make_maps(folder, shape)])}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        results = {"benchmark": "cp3d.dask CPU seconds (synchronous scheduler, one Numba thread)", "cpu": row,
                   "machine": machine_info(packages=("numpy", "numba", "dask", "zarr"))}
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return
    if args.segment_shape:
        folder = tempfile.mkdtemp(prefix="cp3d-bench-dask-", dir=args.folder)
        try:
            row = segment_large(folder, tuple(args.segment_shape), args.segment_diameter, CHUNKS, args.workers[0])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        results = {"benchmark": "cp3d segment (chunked, end to end)", "segment": row,
                   "machine": machine_info(packages=("numpy", "numba", "dask", "distributed", "zarr", "ome-zarr",
                                                     "torch"))}
        results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return
    folder = tempfile.mkdtemp(prefix="cp3d-bench-dask-", dir=args.folder)
    results = {"benchmark": "cp3d.dask", "machine": machine_info(packages=("numpy", "numba", "dask", "distributed",
                                                                             "zarr", "ome-zarr", "torch")),
               "chunks": list(CHUNKS), "reconstruct": [],
               "not_run": [s for s in SHAPES if s not in args.sizes]}
    try:
        for size in args.sizes:
            shape = SHAPES[size]
            size_folder = os.path.join(folder, size)
            os.makedirs(size_folder)
            start = time.perf_counter()
            store = make_maps(size_folder, shape)
            row = {"shape": list(shape), "voxels": int(np.prod(shape)), "make_maps_s": time.perf_counter() - start}
            print(f"{size}: maps written in {row['make_maps_s']:.0f} s", file=sys.stderr)
            npy = os.path.join(size_folder, "memory.npy")
            if size in args.memory_sizes:
                row["memory"] = measured(["_memory", store, npy])
            for workers in args.workers if size in args.two_workers else args.workers[:1]:
                out = os.path.join(size_folder, f"labels_{workers}w.zarr")
                key = f"dask_{workers}w"
                row[key] = measured(["_dask", store, out, str(workers)])
                row[key]["s_per_1e6"] = round(row[key]["seconds"] / row["voxels"] * 1e6, 4)
                if "memory" in row:
                    row[key]["equals_memory"] = same_labels(npy, out)
                shutil.rmtree(out)
            if "memory" in row:
                memory = row["memory"]
                memory["s_per_1e6"] = round(memory["seconds"] / row["voxels"] * 1e6, 4)
                # From the flows store to a labels store, as the chunked runs go.
                memory["store_to_store_seconds"] = memory["load_seconds"] + memory["seconds"] + memory["write_seconds"]
                memory["store_to_store_s_per_1e6"] = round(memory["store_to_store_seconds"] / row["voxels"] * 1e6, 4)
                best = min((k for k in row if k.startswith("dask_")), key=lambda k: row[k]["seconds"], default=None)
                if best:
                    row["best_dask"] = best
                    row["best_over_memory"] = round(row[best]["seconds"] / memory["seconds"], 3)
                    row["best_over_memory_store_to_store"] = round(row[best]["seconds"]
                                                                   / memory["store_to_store_seconds"], 3)
            results["reconstruct"].append(row)
            print(json.dumps(row), file=sys.stderr)
            if args.segment and size == args.sizes[0]:
                side = int(round((args.segment / 128) ** 0.5 / 32)) * 32
                results["segment"] = segment_end_to_end(size_folder, (128, min(side, 896), min(side, 896)), CHUNKS)
                print(json.dumps(results["segment"]), file=sys.stderr)
            shutil.rmtree(size_folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_memory"]:
        print(json.dumps(run_memory(*sys.argv[2:4])))
    elif sys.argv[1:2] == ["_dask"]:
        print(json.dumps(run_dask(sys.argv[2], sys.argv[3], int(sys.argv[4]), CHUNKS)))
    elif sys.argv[1:2] == ["_cpu"]:
        print(json.dumps(cpu_seconds(sys.argv[2], CHUNKS)))
    elif sys.argv[1:2] == ["_cli"]:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *sys.argv[2:]], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-2000:])
        report = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps({"seconds": time.perf_counter() - start, **report}))
    else:
        main()
