"""Benchmark ``cp3d.reconstruct``: cost against cell count, backends, Cellpose, memory.

Four measurements on synthetic membrane stacks (``cp3d.data.synthetic_stack``)
with oracle flows, so that every reconstruction has a known right answer:

1. ``scaling``: runtime at a fixed volume for cell diameters giving about
   100 to 10,000 cells, with the paper's fixed parameters (``diameter=None``)
   and with parameters derived from the cells' diameter; total and per stage
   (follow / group / filter / glue). Repeats are interleaved across configurations
   (round-robin) so that background load hits them alike.
2. ``backends``: the Numba backend against the NumPy reference.
3. ``cellpose``: Cellpose 4.x's ``dynamics.compute_masks(do_3D=True)`` on its
   own oracle flows of the same labels, side by side with ``cp3d.reconstruct``
   on cp3d's flows and with ``cp3d.cellpose.compute_masks`` on the very same
   Cellpose flows (the drop-in).
4. ``memory``: peak extra resident memory of ``reconstruct`` in a fresh
   process, over the size of the flows.

``--oracle`` measures instead how much the engine loses from exact flows
(``cp3d.tanh_flows`` of the true labels) on label shapes it was not written
around: power-diagram phantoms of ``bench_segment.py``'s second renderer,
d 6 to 60, anisotropic voxels 2x and 3x, a crop where most cells touch the
border, synthetic nuclei with background between them, and the real nuclei
shapes of ``../shared/data/real-nuclei/`` with their voxel size. Each case
states the flows' scale, and ``tanh_scale="auto"``'s estimate stands beside
it; results in ``bench/results/oracle.{json,md}``.

Usage::

    python bench/bench_reconstruct.py            # full benchmark (25-35 min on 2 busy cores)
    python bench/bench_reconstruct.py --quick    # smoke test, under a minute
    python bench/bench_reconstruct.py --oracle   # the engine on oracle flows (a few minutes)

Results go to ``bench/results/reconstruct.json`` and ``reconstruct.png``
(``reconstruct_quick.*`` with ``--quick``).
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

import _machine
import cp3d
from cp3d.cellpose import compute_masks
from cp3d.data import synthetic_stack
from cp3d.metrics import evaluate

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

FULL = {
    "shape": (128, 256, 256),
    # synthetic_stack diameters giving about 100 ... 10,000 cells in the dome.
    "diameters": (43.0, 29.0, 20.0, 14.0, 10.0, 9.2),
    "main_diameter": 10.0,
    # Cellpose's CPU flows and masks take minutes on the full volume.
    "peer_shape": (64, 128, 128),
    "peer_repeat": 3,
    "repeat": 3,
}
QUICK = {
    "shape": (32, 64, 64),
    "diameters": (12.0, 6.0),
    "main_diameter": 6.0,
    "peer_shape": (16, 32, 32),
    "peer_repeat": 1,
    "repeat": 2,
}
SEED = 0
PAPER_TANH_SCALE = 5.0

# Goals the figures are compared with.
GOAL_SCALING_RATIO = 1.25
GOAL_NUMBA_SPEEDUP = 10.0
GOAL_CELLPOSE_SPEEDUP = 20.0
GOAL_MEMORY_RATIO = 2.0

STAGES = ("follow", "group", "filter", "glue")


# ---------------------------------------------------------------------------
# Machine and helpers
# ---------------------------------------------------------------------------


def machine_info():
    return _machine.machine_info(("numpy", "numba", "scipy", "torch", "cellpose"))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def log(message):
    print(message, file=sys.stderr, flush=True)


def median_diameter(labels):
    """Median equivalent-sphere diameter ``(6 V / pi) ** (1/3)`` of the instances."""
    volumes = np.bincount(labels.ravel())[1:]
    volumes = volumes[volumes > 0]
    return float(np.median((6 * volumes / math.pi) ** (1 / 3)))


def scores(truth, labels):
    s = evaluate(truth, labels.astype(np.uint32, copy=False), thresholds=(0.5,))
    return {"ap50": round(s["ap50"], 4), "dice": round(s["dice"], 4), "n_pred": s["n_pred"]}


def warm_up():
    """Compile (or load from cache) every Numba kernel of the reconstruction."""
    labels = synthetic_stack((16, 32, 32), 6, seed=1).labels
    flows = cp3d.tanh_flows(labels)
    for diameter in (None, 6.0):
        cp3d.reconstruct(flows, labels > 0, diameter=diameter, backend="numba")
        staged_reconstruct(flows, labels > 0, cp3d.reconstruction_parameters(diameter))


def staged_reconstruct(flows, foreground, params):
    """``reconstruct`` (Numba) spelled out with the public stage functions, timed per stage.

    Returns ``(labels, seconds)``, the labels being those of
    ``cp3d.reconstruct`` with the same parameters and `seconds` a dict:
    ``follow`` (:func:`cp3d.follow_flows`), ``group``
    (:func:`cp3d.close_and_label` of the gathered end voxels), ``filter``
    (:func:`cp3d.filter_instances`) and ``glue``: rounding the end positions,
    marking them and reading each voxel's group back, done here with NumPy
    (``reconstruct`` does them in Numba kernels, so this overstates them).
    """
    shape = foreground.shape
    t_follow, end = timed(lambda: cp3d.follow_flows(flows, foreground, step=params.step, n_iter=params.n_iter,
                                                    backend="numba"))

    def mark():
        voxel = np.floor(end + np.float32(0.5)).astype(np.int64)
        index = (voxel[:, 0] * shape[1] + voxel[:, 1]) * shape[2] + voxel[:, 2]
        gathered = np.zeros(shape, bool)
        gathered.ravel()[index] = True
        return index, gathered

    def read_back():
        labels = np.zeros(shape, np.uint32)
        labels.ravel()[np.flatnonzero(foreground)] = groups.ravel()[index]
        return labels

    t_mark, (index, gathered) = timed(mark)
    del end
    t_group, groups = timed(lambda: cp3d.close_and_label(gathered, params.closing_radius, backend="numba"))
    del gathered
    t_read, labels = timed(read_back)
    del groups, index
    t_filter, labels = timed(lambda: cp3d.filter_instances(
        labels, flows, foreground, volume_range=params.volume_range, tanh_scale=params.tanh_scale,
        backend="numba"))
    return labels, {"follow": t_follow, "group": t_group, "filter": t_filter, "glue": t_mark + t_read}


# ---------------------------------------------------------------------------
# 1. Runtime against cell count
# ---------------------------------------------------------------------------


def bench_scaling(config, stacks):
    """Both series over every stack; repeats interleaved round-robin, best kept."""
    cases = []
    for nominal, truth in stacks.items():
        foreground = truth > 0
        measured = median_diameter(truth)
        for series in ("paper_defaults", "diameter_given"):
            diameter = None if series == "paper_defaults" else round(measured, 2)
            # Derived parameters expect tanh flows of scale d / 2 (what the model
            # sees after rescaling): with scale-5 flows a step of 0.4 d overshoots.
            scale = PAPER_TANH_SCALE if diameter is None else diameter / 2
            cases.append({
                "series": series, "nominal_diameter": nominal, "median_diameter": round(measured, 2),
                "diameter_arg": diameter, "tanh_scale_of_flows": scale,
                "cells": int(truth.max()), "foreground_voxels": int(foreground.sum()),
                "_truth": truth, "_foreground": foreground, "_flows": cp3d.tanh_flows(truth, scale),
                "_total": [], "_stages": [],
            })
    for r in range(config["repeat"]):
        for case in cases:
            flows, foreground, diameter = case["_flows"], case["_foreground"], case["diameter_arg"]
            seconds, labels = timed(lambda: cp3d.reconstruct(flows, foreground, diameter=diameter,
                                                             backend="numba"))
            case["_total"].append(seconds)
            staged, stages = staged_reconstruct(flows, foreground, cp3d.reconstruction_parameters(diameter))
            case["_stages"].append(stages)
            if r == 0:
                case.update(scores(case["_truth"], labels))
                case["stages_match_reconstruct"] = bool(np.array_equal(staged, labels))
            log(f"  scaling round {r + 1}: {case['series']:>14} d={case['nominal_diameter']:>5} "
                f"{case['cells']:>6} cells  {seconds:.2f} s  stages "
                + " ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    rows = []
    for case in cases:
        total = min(case["_total"])
        stages = {k: round(min(s[k] for s in case["_stages"]), 4) for k in STAGES}
        row = {k: v for k, v in case.items() if not k.startswith("_")}
        row.update(seconds=round(total, 4), seconds_all=[round(s, 4) for s in case["_total"]],
                   seconds_per_million_foreground_voxels=round(total / case["foreground_voxels"] * 1e6, 4),
                   stage_seconds=stages)
        rows.append(row)
    summary = {}
    for series in ("paper_defaults", "diameter_given"):
        part = sorted((r for r in rows if r["series"] == series), key=lambda r: r["cells"])
        few, many = part[0], part[-1]
        ratio = many["seconds"] / few["seconds"]
        ratio_per_voxel = (many["seconds_per_million_foreground_voxels"]
                           / few["seconds_per_million_foreground_voxels"])
        summary[series] = {
            "fewest_cells": few["cells"], "most_cells": many["cells"],
            "runtime_ratio_most_over_fewest": round(ratio, 3),
            "per_voxel_ratio_most_over_fewest": round(ratio_per_voxel, 3),
            "max_over_min_runtime": round(max(r["seconds"] for r in part) / min(r["seconds"] for r in part), 3),
            "goal": f"<= {GOAL_SCALING_RATIO}",
            "meets_goal": bool(ratio <= GOAL_SCALING_RATIO),
        }
    return {
        "shape": list(config["shape"]),
        "flows": "cp3d.tanh_flows(labels, scale) with scale 5 (paper_defaults) or median diameter / 2 "
                 "(diameter_given); foreground = labels > 0",
        "backend": "numba",
        "timing": f"best of {config['repeat']}, rounds interleaved over all configurations, after warm-up",
        "rows": rows,
        "summary": summary,
    }


# ---------------------------------------------------------------------------
# 2. Numba against NumPy
# ---------------------------------------------------------------------------


def bench_backends(config, truth):
    flows = cp3d.tanh_flows(truth)
    foreground = truth > 0
    numba_times = []
    seconds, numba_labels = timed(lambda: cp3d.reconstruct(flows, foreground, backend="numba"))
    numba_times.append(seconds)
    log(f"  numba {seconds:.2f} s; numpy (once) ...")
    numpy_seconds, numpy_labels = timed(lambda: cp3d.reconstruct(flows, foreground, backend="numpy"))
    log(f"  numpy {numpy_seconds:.2f} s")
    for _ in range(config["repeat"] - 1):
        numba_times.append(timed(lambda: cp3d.reconstruct(flows, foreground, backend="numba"))[0])
    numba_seconds = min(numba_times)
    speedup = numpy_seconds / numba_seconds
    return {
        "shape": list(config["shape"]),
        "nominal_diameter": config["main_diameter"],
        "cells": int(truth.max()),
        "foreground_voxels": int(foreground.sum()),
        "parameters": "paper defaults (diameter=None)",
        "numba_threads": numba.get_num_threads(),
        "numba_seconds": round(numba_seconds, 4),
        "numba_seconds_all": [round(s, 4) for s in numba_times],
        "numpy_seconds": round(numpy_seconds, 4),
        "timing": "NumPy once; Numba best of its runs, before and after the NumPy run",
        "speedup": round(speedup, 2),
        "labels_identical": bool(np.array_equal(numba_labels, numpy_labels)),
        "goal": f">= {GOAL_NUMBA_SPEEDUP}x",
        "meets_goal": bool(speedup >= GOAL_NUMBA_SPEEDUP),
    }


# ---------------------------------------------------------------------------
# 3. Cellpose
# ---------------------------------------------------------------------------


def bench_cellpose(config, truth, shape):
    result = {"shape": list(shape), "nominal_diameter": config["main_diameter"], "cells": int(truth.max()),
              "foreground_voxels": int((truth > 0).sum())}
    sys.path.insert(0, str(HERE))
    try:
        import _cellpose_peer as peer

        result["cellpose_version"] = peer.load()
    except Exception as error:  # any import failure: record it and skip the section
        result["skipped"] = f"cellpose could not be imported: {type(error).__name__}: {error}"
        log(f"  SKIPPED: {result['skipped']}")
        return result
    import torch

    result["torch_threads"] = torch.get_num_threads()
    foreground = truth > 0
    flows = cp3d.tanh_flows(truth)
    try:
        flow_seconds, (dP, cellprob) = timed(lambda: peer.oracle_outputs(truth))
        log(f"  cellpose oracle flows made in {flow_seconds:.1f} s (not timed in the comparison)")
        cp3d_times, cellpose_times, dropin_times = [], [], []
        for r in range(config["peer_repeat"]):
            # cp3d is cheap: once before and once after each Cellpose run.
            seconds, labels = timed(lambda: cp3d.reconstruct(flows, foreground, backend="numba"))
            cp3d_times.append(seconds)
            seconds, dropin = timed(lambda: compute_masks(dP, cellprob, do_3D=True))
            dropin_times.append(seconds)
            seconds, masks = timed(lambda: peer.compute_masks(dP, cellprob))
            cellpose_times.append(seconds)
            cp3d_times.append(timed(lambda: cp3d.reconstruct(flows, foreground, backend="numba"))[0])
            dropin_times.append(timed(lambda: compute_masks(dP, cellprob, do_3D=True))[0])
            log(f"  round {r + 1}: cp3d {cp3d_times[-2]:.2f} / {cp3d_times[-1]:.2f} s, drop-in "
                f"{dropin_times[-2]:.2f} / {dropin_times[-1]:.2f} s, cellpose {seconds:.2f} s")
    except Exception as error:
        result["skipped"] = f"cellpose failed: {type(error).__name__}: {error}"
        log(f"  SKIPPED: {result['skipped']}")
        return result
    cp3d_seconds, cellpose_seconds, dropin_seconds = min(cp3d_times), min(cellpose_times), min(dropin_times)
    cp3d_scores, cellpose_scores, dropin_scores = scores(truth, labels), scores(truth, masks), scores(truth, dropin)
    speedup = cellpose_seconds / cp3d_seconds
    dropin_speedup = cellpose_seconds / dropin_seconds
    result.update({
        "cp3d": {"call": "cp3d.reconstruct(tanh_flows(labels), labels > 0, diameter=None, backend='numba')",
                 "parameters": "paper defaults (step 4, 100 iterations, closing radius 3)",
                 "seconds": round(cp3d_seconds, 4), "seconds_all": [round(s, 4) for s in cp3d_times],
                 **cp3d_scores},
        "cellpose": {"call": "cellpose.dynamics.compute_masks(5 * masks_to_flows_gpu_3d(labels), "
                             "cellprob=+-10, niter=200, do_3D=True, device=cpu)",
                     "cellprob_flows_seconds": round(flow_seconds, 2),
                     "seconds": round(cellpose_seconds, 4), "seconds_all": [round(s, 4) for s in cellpose_times],
                     **cellpose_scores},
        "dropin": {"call": "cp3d.cellpose.compute_masks(dP, cellprob, do_3D=True) on Cellpose's own dP and cellprob",
                   "seconds": round(dropin_seconds, 4), "seconds_all": [round(s, 4) for s in dropin_times],
                   "dtype": str(dropin.dtype), **dropin_scores},
        "speedup_dropin_over_cellpose": round(dropin_speedup, 2),
        "dropin_meets_goal": bool(dropin_speedup >= GOAL_CELLPOSE_SPEEDUP
                                  and dropin_scores["ap50"] >= cellpose_scores["ap50"]),
        "timing": "best of each; every round runs cp3d, the drop-in, Cellpose, cp3d, the drop-in",
        "speedup_cp3d_over_cellpose": round(speedup, 2),
        "goal": f"cp3d >= {GOAL_CELLPOSE_SPEEDUP}x faster at equal or better AP@0.5",
        "meets_goal": bool(speedup >= GOAL_CELLPOSE_SPEEDUP and cp3d_scores["ap50"] >= cellpose_scores["ap50"]),
    })
    return result


# ---------------------------------------------------------------------------
# 4. Peak memory, in a fresh process
# ---------------------------------------------------------------------------


def _vm_status(field):
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_child(backend, folder):
    """Run in a fresh process: print the peak extra memory of one reconstruction as JSON."""
    labels = synthetic_stack((16, 32, 32), 6, seed=1).labels
    cp3d.reconstruct(cp3d.tanh_flows(labels), labels > 0, backend=backend)  # JIT compile / cache load
    flows = np.load(Path(folder) / "flows.npy")
    foreground = np.load(Path(folder) / "foreground.npy")
    rss_before = _vm_status("VmRSS")
    before = _machine.max_rss_bytes()
    seconds, _ = timed(lambda: cp3d.reconstruct(flows, foreground, backend=backend))
    after = _machine.max_rss_bytes()
    print(json.dumps({"backend": backend, "rss_before_bytes": rss_before, "maxrss_before_bytes": before,
                      "maxrss_after_bytes": after, "extra_bytes": after - before,
                      "flows_nbytes": int(flows.nbytes), "seconds": round(seconds, 3)}))


def bench_memory(config, truth, backends):
    flows = cp3d.tanh_flows(truth)
    result = {"shape": list(config["shape"]), "cells": int(truth.max()),
              "foreground_voxels": int((truth > 0).sum()), "flows_nbytes": int(flows.nbytes),
              "method": "fresh subprocess (through a small launcher, so ru_maxrss starts from its own size): "
                        "warm-up on a tiny volume, load flows + foreground from .npy, ru_maxrss before and "
                        "after one reconstruct (paper defaults)",
              "goal": f"numba extra / flows.nbytes <= {GOAL_MEMORY_RATIO}", "backends": {}}
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "flows.npy", flows)
        np.save(Path(folder) / "foreground.npy", truth > 0)
        del flows
        for backend in backends:
            proc = _machine.run_fresh_python([__file__, "--memory-child", backend, folder])
            if proc.returncode != 0:
                result["backends"][backend] = {"error": proc.stderr.strip()[-2000:]}
                continue
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            child["extra_over_flows"] = round(child["extra_bytes"] / child["flows_nbytes"], 3)
            # The baseline must be this process's own resident size, not an inherited peak.
            rss = child["rss_before_bytes"]
            child["baseline_is_own"] = rss is None or child["maxrss_before_bytes"] <= rss + 64 * 2**20
            result["backends"][backend] = child
            log(f"  {backend}: extra {child['extra_bytes'] / 2**20:.0f} MiB = "
                f"{child['extra_over_flows']:.2f} x flows ({child['flows_nbytes'] / 2**20:.0f} MiB)")
    numba_row = result["backends"].get("numba", {})
    result["meets_goal"] = bool(numba_row.get("extra_over_flows", math.inf) <= GOAL_MEMORY_RATIO)
    return result


# ---------------------------------------------------------------------------
# Plot and main
# ---------------------------------------------------------------------------


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["scaling"]["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"paper_defaults": ("C0", "o", "paper defaults (diameter=None)"),
              "diameter_given": ("C1", "s", "diameter given (derived parameters)")}
    for series, (color, marker, label) in styles.items():
        part = sorted((r for r in rows if r["series"] == series), key=lambda r: r["cells"])
        cells = [r["cells"] for r in part]
        ax1.plot(cells, [r["seconds"] for r in part], marker=marker, color=color, label=label)
        linestyle = "-" if series == "paper_defaults" else "--"
        for stage, stage_color in zip(STAGES, ("C2", "C3", "C4", "C7")):
            ax2.plot(cells, [r["stage_seconds"][stage] for r in part], marker=marker, color=stage_color,
                     linestyle=linestyle, label=f"{stage} ({'paper' if linestyle == '-' else 'diameter'})")
    shape = "x".join(map(str, record["scaling"]["shape"]))
    ax1.set(xscale="log", xlabel="cells in the volume", ylabel="seconds (best of runs)",
            title=f"cp3d.reconstruct, Numba, {shape} voxels")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    ax2.set(xscale="log", xlabel="cells in the volume", ylabel="seconds (best of runs)", title="per stage")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7, ncol=2)
    machine = record["machine"]
    fig.suptitle(f"{machine['cpu_count']} CPUs, {machine['numba_threads']} Numba threads"
                 + (f", GPU {machine['gpu']}" if machine["gpu"] else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- --oracle

ORACLE_PHANTOM = {"min_spacing": 0.6, "weight_spread": 0.35, "stretch_y": 1.25}
ORACLE_SEED = 40_000


def oracle_cases(quick):
    """(name, labels, voxel size, diameter along x, flows' scale (z, y, x), reconstruct's options) of every case."""
    sys.path.insert(0, str(HERE))
    from bench_segment import REAL_DATA, phantom_labels

    def phantom(d, shape, z_step=1, seed=0):
        labels = phantom_labels(np.random.default_rng([ORACLE_SEED, seed]),
                                ORACLE_PHANTOM | {"shape": shape, "diameter": d})[::z_step]
        return labels.astype(np.uint32)

    def extent(d, vs):
        return tuple(d * vs[2] / v for v in vs)

    cases = []
    sizes = ((6, 48), (10, 64), (14, 80)) if quick else ((6, 64), (7, 64), (10, 96), (14, 112), (24, 128), (40, 144),
                                                         (60, 180))
    for d, side in sizes:
        labels = phantom(d, (side,) * 3, seed=d)
        cases.append((f"phantom d {d}", labels, (1.0, 1.0, 1.0), d, (d / 2,) * 3, {}))
        if d == 10:
            cases.append(("phantom d 10, the paper's fixed defaults", labels, (1.0, 1.0, 1.0), None, (5.0,) * 3, {}))
        if d == 14:
            cases.append(("phantom d 14, scale-5 flows, tanh_scale=5", labels, (1.0, 1.0, 1.0), d, (5.0,) * 3,
                          {"tanh_scale": 5.0}))
            cases.append(("phantom d 14, scale-5 flows, tanh_scale='auto'", labels, (1.0, 1.0, 1.0), d, (5.0,) * 3,
                          {"tanh_scale": "auto"}))
    for step in ((2,) if quick else (2, 3)):
        labels = phantom(9, (36 * step, 64, 64) if quick else (48 * step, 96, 96), z_step=step, seed=100 + step)
        vs = (float(step), 1.0, 1.0)
        cases.append((f"phantom d 9, voxels {step}x longer in z", labels, vs, 9, tuple(9 / 2 / v for v in vs), {}))
    border = phantom(24, (48, 64, 64), seed=200)
    cases.append(("crop of d 24 cells, most touching the border", border, (1.0, 1.0, 1.0), 24, (12.0,) * 3, {}))
    nuclei = synthetic_stack((48, 96, 96) if quick else (64, 160, 160), 14, kind="nuclei", seed=ORACLE_SEED).labels
    cases.append(("synthetic nuclei d 14 (background between them)", nuclei.astype(np.uint32), (1.0, 1.0, 1.0), 14,
                  (7.0,) * 3, {}))
    for path in sorted(Path(REAL_DATA).glob("*.h5"))[: 1 if quick else None]:
        from cp3d.model.annotated import read_annotated

        crop = read_annotated(path)
        vs = crop.voxel_size
        d = cp3d.metrics.median_diameter(crop.labels, vs)
        name = f"real nuclei {path.stem.split('_')[0]} (d {d:.0f}, voxels {vs[0] / vs[2]:.1f}x longer in z)"
        scale = tuple(d / 2 * vs[2] / v for v in vs)
        cases.append((name, crop.labels, vs, d, scale, {}))
        cases.append((name + ", cp3d.tanh_flows default scale 5, tanh_scale='auto'", crop.labels, vs, d,
                      (5.0,) * 3, {"tanh_scale": "auto"}))
        cases.append((name + ", default scale 5, scale not given", crop.labels, vs, d, (5.0,) * 3, {}))
    return [(name, labels, vs, None if d is None else extent(d, vs), scale, options)
            for name, labels, vs, d, scale, options in cases]


# The sampling ablation runs on cases up to this many voxels: its NumPy following is slow.
TRILINEAR_MAX_VOXELS = 2_000_000


def trilinear_reconstruct(flows, foreground, diameter, tanh_scale=None):
    """The engine's public stages with the flows sampled trilinearly while following, as Cellpose 4's
    ``steps_interp`` does, instead of at ``floor(p)`` (the paper's and cp3d's way): the sampling ablation of
    ``--oracle``. A NumPy stand-in for ``cp3d.reconstruct`` with the same parameters."""
    from scipy import ndimage

    params = cp3d.reconstruction_parameters(diameter, tanh_scale=tanh_scale)
    points = np.argwhere(foreground).astype(np.float32)
    top = np.asarray(foreground.shape, np.float32) - 1
    for _ in range(params.n_iter):
        flow = np.stack([ndimage.map_coordinates(f, points.T, order=1, mode="nearest") for f in flows], axis=1)
        points = np.clip(points - np.float32(params.step) * flow, 0, top)
    voxel = tuple(np.floor(points + 0.5).astype(np.intp).T)
    gathered = np.zeros(foreground.shape, bool)
    gathered[voxel] = True
    groups = cp3d.close_and_label(gathered, radius=params.closing_radius)
    labels = np.zeros(foreground.shape, np.uint32)
    labels[foreground] = groups[voxel]
    return cp3d.filter_instances(labels, flows, foreground, volume_range=params.volume_range,
                                 tanh_scale=params.tanh_scale)


def bench_oracle(quick):
    rows = []
    for name, labels, vs, diameter, scale, options in oracle_cases(quick):
        flows = cp3d.tanh_flows(labels, scale)
        fg = labels > 0
        estimate = cp3d.estimate_tanh_scale(flows, fg)
        seconds, result = timed(lambda: cp3d.reconstruct(flows, fg, diameter=diameter, **options))
        s = evaluate(labels, np.asarray(result).astype(np.uint32), thresholds=(0.5,))
        trilinear = None
        if labels.size <= TRILINEAR_MAX_VOXELS:
            given = options.get("tanh_scale")
            t = evaluate(labels, trilinear_reconstruct(flows, fg, diameter, estimate if given == "auto" else given),
                         thresholds=(0.5,))
            trilinear = {"ap50": round(t["ap50"], 4), "dice": round(t["dice"], 4)}
        n_border = len(np.unique(np.concatenate([np.unique(labels[i]) for i in
                                                 (np.s_[0], np.s_[-1], np.s_[:, 0], np.s_[:, -1], np.s_[:, :, 0],
                                                  np.s_[:, :, -1])])))
        row = {"case": name, "shape": list(labels.shape), "voxel_size": list(vs), "cells": int(s["n_gt"]),
               "border_cells": n_border, "diameter": None if diameter is None else [round(x, 2) for x in diameter],
               "true_scale": [round(x, 3) for x in scale],
               "estimated_scale": None if estimate is None else [round(x, 3) for x in estimate],
               "options": {k: v for k, v in options.items()}, "ap50": round(s["ap50"], 4),
               "dice": round(s["dice"], 4), "n_pred": int(s["n_pred"]), "seconds": round(seconds, 2),
               "trilinear": trilinear}
        rows.append(row)
        log(f"  {name}: AP@0.5 {row['ap50']:.3f} Dice {row['dice']:.3f} {row['n_pred']}/{row['cells']} cells, "
            f"scale {row['true_scale']} est. {row['estimated_scale']}, {seconds:.1f} s")
    return rows


def oracle_markdown(record):
    m = record["machine"]
    lines = [
        "# The engine on oracle flows",
        "",
        f"`{record['command']}`",
        "",
        f"{m['date_utc']}, {m['platform']}, {m['cpu_count']} CPUs, cp3d commit {m['git_commit']}. Flows: "
        "`cp3d.tanh_flows(labels, scale)` of the true labels; foreground: `labels > 0`; "
        "`cp3d.reconstruct(flows, fg, diameter=extent)` (the cells' extent in voxels along z, y, x; none for the "
        "paper's fixed defaults) with the options shown. Goal (issue 24): AP@0.5 and Dice >= 0.98 everywhere. "
        "*Trilinear*: the same parameters and stages with the flows sampled trilinearly while following (Cellpose "
        "4's way; `trilinear_reconstruct`, NumPy, cases up to 2e6 voxels) instead of at `floor(p)`: the sampling "
        "ablation.",
        "",
        "| case | shape | cells (at border) | flows' scale (z, y, x) | `estimate_tanh_scale` | options | AP@0.5 | Dice | "
        "cells found | s | trilinear: AP@0.5 / Dice |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["oracle"]:
        fmt = lambda v: "-" if v is None else "(" + ", ".join(f"{x:.2f}" for x in v) + ")"  # noqa: E731
        opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items()) or "-"
        ok = "" if r["ap50"] >= 0.98 and r["dice"] >= 0.98 else " **below**"
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['cells']} ({r['border_cells']}) | "
                     f"{fmt(r['true_scale'])} | {fmt(r['estimated_scale'])} | {opts} | {r['ap50']:.3f}{ok} | "
                     f"{r['dice']:.3f} | {r['n_pred']} | {r['seconds']:.1f} | "
                     + ("-" if r.get("trilinear") is None else f"{r['trilinear']['ap50']:.3f} / {r['trilinear']['dice']:.3f}")
                     + " |")
    below = [r for r in record["oracle"] if r["ap50"] < 0.98 or r["dice"] < 0.98]
    lines += ["", f"{len(below)} of {len(record['oracle'])} cases below the goal.", ""]
    peer = record.get("cellpose", {})
    if "skipped" in peer:
        lines += [f"Cellpose's flows: skipped ({peer['skipped']}).", ""]
    elif peer:
        lines += [f"**Cellpose's flows** ({'x'.join(map(str, peer['shape']))}, {peer['cells']} synthetic cells d "
                  f"{peer['nominal_diameter']:g}; Cellpose {peer.get('cellpose_version', '?')}, CPU, best of "
                  "each; goal: cp3d's AP@0.5 at least Cellpose's):", "",
                  "| call | AP@0.5 | Dice | cells found | s |", "|---|---|---|---|---|"]
        for key in ("cp3d", "cellpose", "dropin"):
            r = peer[key]
            lines.append(f"| `{r['call']}` | {r['ap50']:.3f} | {r['dice']:.3f} | {r['n_pred']} | {r['seconds']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def run_oracle(args, argv):
    start = time.perf_counter()
    warm_up()
    record = {"benchmark": "cp3d.reconstruct on oracle flows", "machine": machine_info(),
              "command": " ".join(["python", "bench/bench_reconstruct.py"] + list(argv)),
              "oracle": bench_oracle(args.quick)}
    # the size: Cellpose's compute_masks on its own oracle flows beside cp3d on its own, and the drop-in
    config = QUICK if args.quick else FULL
    shape = (16, 32, 32) if args.quick else (96, 160, 160)
    log(f"Cellpose compute_masks on {shape}")
    record["cellpose"] = bench_cellpose(config, synthetic_stack(shape, config["main_diameter"], seed=SEED).labels,
                                        shape)
    record["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    record["total_seconds"] = round(time.perf_counter() - start, 1)
    out = args.out or RESULTS / ("oracle_quick.json" if args.quick else "oracle.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(oracle_markdown(record))
    print(out.with_suffix(".md").read_text())
    log(f"wrote {out} and {out.with_suffix('.md')}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (under a minute)")
    parser.add_argument("--repeat", type=int, help="runs per configuration (best is kept)")
    parser.add_argument("--peer-shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="volume of the Cellpose comparison (default 64 128 128; 32 64 64 with --quick)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("scaling", "backends", "cellpose", "memory"),
                        help="sections to leave out")
    parser.add_argument("--out", type=Path, help="JSON path (PNG beside it); default bench/results/reconstruct*.json")
    parser.add_argument("--memory-child", nargs=2, metavar=("BACKEND", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--oracle", action="store_true", help="the engine on oracle flows: bench/results/oracle.md")
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.oracle:
        run_oracle(args, argv)
        return

    config = dict(QUICK if args.quick else FULL)
    if args.repeat:
        config["repeat"] = args.repeat
    out = args.out or RESULTS / ("reconstruct_quick.json" if args.quick else "reconstruct.json")
    shape = config["shape"]
    start = time.perf_counter()
    log(f"cp3d reconstruct benchmark, {'quick' if args.quick else 'full'}: {shape}")

    record = {"benchmark": "cp3d.reconstruct", "configuration": "quick" if args.quick else "full",
              "seed": SEED}
    log("warm-up (JIT compile / cache load)")
    warm_up()
    record["machine"] = machine_info()

    log("synthetic stacks")
    stacks = {}
    for d in config["diameters"]:
        seconds, stack = timed(lambda: synthetic_stack(shape, d, seed=SEED))
        stacks[d] = stack.labels
        log(f"  d={d}: {int(stack.labels.max())} cells, {(stack.labels > 0).mean():.1%} foreground, {seconds:.1f} s")
    main_truth = stacks.get(config["main_diameter"])
    if main_truth is None:
        main_truth = synthetic_stack(shape, config["main_diameter"], seed=SEED).labels

    if "scaling" not in args.skip:
        log("1. runtime against cell count")
        record["scaling"] = bench_scaling(config, stacks)
    if "backends" not in args.skip:
        log("2. Numba against NumPy")
        record["backends"] = bench_backends(config, main_truth)
    if "cellpose" not in args.skip:
        peer_shape = tuple(args.peer_shape) if args.peer_shape else config["peer_shape"]
        log(f"3. Cellpose compute_masks on {peer_shape}")
        peer_truth = main_truth if peer_shape == shape else synthetic_stack(peer_shape, config["main_diameter"],
                                                                            seed=SEED).labels
        record["cellpose"] = bench_cellpose(config, peer_truth, peer_shape)
    if "memory" not in args.skip:
        log("4. peak memory")
        record["memory"] = bench_memory(config, main_truth, ("numba", "numpy"))

    record["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    record["total_seconds"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {out}")
    if "scaling" in record:
        png = out.with_suffix(".png")
        plot(record, png)
        log(f"wrote {png}")


if __name__ == "__main__":
    main()
