"""Benchmark end-to-end segmentation: trained models against a classical watershed.

On the same held-out synthetic membrane stacks (``cp3d.data.synthetic_stack``,
``kind="membrane"``), side by side in one run:

1. ``tanh``: the tanh-formulation model through :func:`cp3d.segment.segment`;
2. ``watershed``: a seeded watershed of the membrane image with
   scikit-image, the classical pipeline a user would otherwise run;
3. ``heat``: the heat-formulation model, trained the same way.

Each method runs on every stack with its default settings
(``diameter=None``: the models assume their training cell size,
``config.train_diameter``, and average four mirror images, ``augment=True``;
the watershed assumes the same size) and with the stack's true cell diameter
(the median equivalent-sphere diameter of its ground-truth cells). The models
also run once more with default settings but a single network pass
(``augment=False``). Scores come from :func:`cp3d.metrics.evaluate`.

Test stacks are held out: seeds from 10,000 on (training draws stack seeds
``seed * 1_000_003 + k`` for ``k`` below a few hundred), diameters spread
evenly over 8..14 voxels and noise levels cycling through 0.05, 0.12 and
0.22. Training samples its noise level continuously from U(0.02, 0.2), so an
in-range level is only unseen as a stack, never as a level; 0.22 lies outside
the training range. The watershed's parameters are tuned by a grid search on
ONE separate training-like stack (seed 1234, diameter 11, noise 0.1), never on
the test stacks; the grid and its scores are written with the results.

A second held-out set (seeds from 11,000, the same diameters) has every
noise level above the training range (0.25, 0.3): the models and the
watershed with default settings, to show how far the models carry beyond the
noise they were trained on.

``--nuclei`` scores the bundled nuclei model, the membrane (tanh) model and
a seeded watershed of the nuclei (scikit-image, tuned on one training-like
stack) on held-out synthetic nuclei: varied stacks (settings drawn by
``cp3d.data.random_nuclei_options``, seeds from 13,000), plain stacks as
``cp3d synth --kind nuclei`` draws them (the generator's defaults) and large
nuclei (40 voxels across, segmented with ``diameter=40``, as for a real
confocal nuclei stack).

``--generalise`` scores the bundled membrane model (``--base-model``) against
another (``--tanh-model RUN_DIR``) on six sets: the standard and noise-above
held-out sets above (default diameter), ``--finetune``'s new-kind test stacks,
varied membranes drawn by ``cp3d.data.random_membrane_options``, stacks
rendered outside even those ranges and phantoms of a second renderer written
apart from ``cp3d.data`` (``phantom_stack``; true diameter).

A last measurement times the stages (predict, reconstruct) of the tanh model,
with and without test-time augmentation, on one 64 x 256 x 256 stack with ``torch.set_num_threads(2)`` and Numba's
default thread count.

Usage::

    python bench/bench_segment.py            # the bundled tanh and heat models
    python bench/bench_segment.py --tanh-model RUN_DIR --heat-model RUN_DIR2   # models from cp3d train
    python bench/bench_segment.py --quick    # smoke test on small stacks, a few minutes
    python bench/bench_segment.py --nuclei   # the nuclei model (bench/results/segment_nuclei.json)
    python bench/bench_segment.py --generalise --tanh-model RUN_DIR   # bench/results/segment_generalise.json

Results go to ``bench/results/segment.json`` and ``segment.md``
(``segment_quick.*`` with ``--quick``).
"""

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from scipy import ndimage
from skimage import filters, measure, morphology, segmentation
from skimage.feature import peak_local_max

import _machine
from cp3d.data import random_nuclei_options, synthetic_stack
from cp3d.filters import border_ids
from cp3d.metrics import evaluate, median_diameter
from cp3d.model import DEFAULT_MODEL, available_models, load_model
from cp3d.segment import segment

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

TEST_SEED = 10_000  # test stack i has seed TEST_SEED + i; training seeds stay far below
TEST_DIAMETERS = (8.0, 14.0)
TEST_NOISE = (0.05, 0.12, 0.22)
UNSEEN = {"seed": 11_000, "noise": (0.25, 0.3)}  # a second held-out set, all noise above the training range
UNSEEN_SETTINGS = {"tanh": ("default",), "watershed": ("default",), "heat": ("default",)}
TUNE = {"seed": 1234, "diameter": 11.0, "noise": 0.1}  # the one training-like stack the watershed is tuned on
TIMING = {"shape": (64, 256, 256), "diameter": 10.0, "noise": 0.12, "seed": 20_000, "repeat": 2}
TIMING_QUICK = {"shape": (32, 128, 128), "diameter": 10.0, "noise": 0.12, "seed": 20_000, "repeat": 1}

# Watershed grid: smoothing sigma (voxels), specimen threshold (x Otsu), interior threshold
# (x local mean), markers ("peaks": peak_local_max of the interior distance transform with
# min_distance = value x diameter; "hmax": h-maxima of it with h = value x diameter).
# The ranges were set while developing the baseline on training-like stacks only (seeds 1234 and
# 4321..4323); a plain global Otsu threshold for the interiors and 3D-only hole filling did worse there.
WATERSHED_GRID = {
    "sigma": (0.5, 0.75, 1.0),
    "specimen_factor": (0.6, 0.75, 0.9),
    "interior_factor": (0.6, 0.7, 0.8),
    "markers": (("peaks", 0.3), ("peaks", 0.5), ("hmax", 0.02), ("hmax", 0.05)),
}
WATERSHED_GRID_QUICK = {
    "sigma": (1.0,),
    "specimen_factor": (0.75,),
    "interior_factor": (0.6, 0.85),
    "markers": (("peaks", 0.5), ("hmax", 0.05)),
}

GOAL = {"method": "tanh", "setting": "default", "dice": 0.90, "ap50": 0.85}
SETTINGS = {  # method: settings it runs with, in table order
    "tanh": ("default", "true_diameter", "single_pass"),
    "watershed": ("default", "true_diameter"),
    "heat": ("default", "true_diameter", "single_pass"),
}
SCORE_KEYS = ("dice", "ap50", "ap75", "arand", "n_pred", "n_gt")


# ---------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------


def machine_info():
    return _machine.machine_info(("numpy", "numba", "scipy", "torch", "scikit-image"), torch_threads=torch.get_num_threads())


def true_diameter(labels, voxel_size=None):
    """Median equivalent-sphere diameter ``(6 V / pi) ** (1/3)`` of the cells of `labels`, in voxels along x."""
    return median_diameter(labels, voxel_size)


def test_stacks(n, shape, seed=TEST_SEED, noise=TEST_NOISE):
    """Specifications of `n` held-out stacks: diameters evenly over 8..14, noise cycling through `noise`."""
    diameters = np.linspace(*TEST_DIAMETERS, n) if n > 1 else [float(np.mean(TEST_DIAMETERS))]
    return [
        {"seed": seed + i, "diameter": round(float(d), 3), "noise": noise[i % len(noise)], "shape": list(shape)}
        for i, d in enumerate(diameters)
    ]


def make_stack(spec):
    image, labels = synthetic_stack(tuple(spec["shape"]), spec["diameter"], kind="membrane", seed=spec["seed"],
                                    noise=spec["noise"])
    return image, labels


# ---------------------------------------------------------------------------
# Classical baseline: seeded watershed of the membrane image
# ---------------------------------------------------------------------------


def _fill_holes(mask):
    """Fill holes in 3D and in every z-slice: slices fill cells cut open by the stack border."""
    filled = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[0]):
        filled[z] |= ndimage.binary_fill_holes(mask[z])
    return filled


def watershed_baseline(image, diameter, *, sigma, specimen_factor, interior_factor, markers):
    """Seeded watershed of a membrane stack, with scikit-image.

    1. ``smoothed``: the image smoothed with a Gaussian of `sigma` voxels;
    2. specimen (the watershed mask): ``smoothed`` above `specimen_factor` x
       its Otsu threshold (the membranes), dilated by one voxel, holes filled
       (in 3D and per z-slice), eroded by one voxel;
    3. cell interiors: specimen voxels darker than `interior_factor` x the
       local mean (Gaussian of ``diameter / 2``), which follows depth
       attenuation and dim cells better than one global threshold;
    4. markers from the Euclidean distance transform of the interiors:
       ``("peaks", f)``: ``peak_local_max`` with ``min_distance = f x diameter``
       in each connected interior; ``("hmax", f)``: connected h-maxima with
       ``h = f x diameter``;
    5. ``skimage.segmentation.watershed(smoothed, markers, mask=specimen)``.
    """
    smoothed = ndimage.gaussian_filter(np.asarray(image, np.float32), sigma)
    membrane = smoothed > specimen_factor * filters.threshold_otsu(smoothed)
    specimen = ndimage.binary_dilation(membrane, morphology.ball(1))
    specimen = ndimage.binary_erosion(_fill_holes(specimen), morphology.ball(1), border_value=1)
    local_mean = ndimage.gaussian_filter(smoothed, diameter / 2)
    interior = specimen & (smoothed < interior_factor * local_mean)
    distance = ndimage.distance_transform_edt(interior)
    kind, value = markers
    if kind == "peaks":
        regions, _ = ndimage.label(interior)
        peaks = peak_local_max(distance, min_distance=max(1, int(round(value * diameter))), labels=regions,
                               exclude_border=False)
        seeds = np.zeros(image.shape, np.int32)
        seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    elif kind == "hmax":
        seeds = measure.label(morphology.h_maxima(distance, value * diameter))
    else:
        raise ValueError(f"unknown marker kind {kind!r}")
    labels = segmentation.watershed(smoothed, seeds, mask=specimen)
    return labels.astype(np.uint32)


def tune_watershed(shape, grid):
    """Grid search of the watershed's parameters on ONE training-like stack (seed < 10,000).

    The objective is the mean of Dice and AP@0.5, with the stack's true diameter.
    """
    spec = dict(TUNE, shape=list(shape))
    image, labels = make_stack(spec)
    diameter = true_diameter(labels)
    rows = []
    for sigma, spf, inf, mk in itertools.product(grid["sigma"], grid["specimen_factor"], grid["interior_factor"],
                                                 grid["markers"]):
        params = {"sigma": sigma, "specimen_factor": spf, "interior_factor": inf, "markers": list(mk)}
        t0 = time.perf_counter()
        pred = watershed_baseline(image, diameter, **params)
        seconds = time.perf_counter() - t0
        s = evaluate(labels, pred)
        rows.append({"params": params, "dice": s["dice"], "ap50": s["ap50"], "ap75": s["ap75"],
                     "arand": s["arand"], "n_pred": s["n_pred"], "n_gt": s["n_gt"], "seconds": seconds,
                     "objective": 0.5 * (s["dice"] + s["ap50"])})
        print(f"  tune {params}: dice {s['dice']:.3f} ap50 {s['ap50']:.3f} n {s['n_pred']}/{s['n_gt']}", flush=True)
    best = max(rows, key=lambda r: r["objective"])
    return {"stack": spec, "true_diameter": diameter, "objective": "mean of Dice and AP@0.5, true diameter",
            "grid": {k: [list(v) if isinstance(v, tuple) else v for v in vals] for k, vals in grid.items()},
            "best": best, "rows": rows}


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def _scores(gt, pred):
    s = evaluate(gt, pred)
    return {k: (int(s[k]) if k.startswith("n_") else float(s[k])) for k in SCORE_KEYS}


def run_method(method, setting, image, d_true, models, ws_params, assumed_diameter):
    """One segmentation with one of `SETTINGS`; returns labels and per-stage seconds."""
    diameter = d_true if setting == "true_diameter" else None
    t0 = time.perf_counter()
    if method == "watershed":
        d = assumed_diameter if diameter is None else diameter
        labels = watershed_baseline(image, d, **ws_params)
        seconds = {}
    else:
        result = segment(image, models[method], diameter=diameter, augment=setting != "single_pass")
        labels, seconds = result.labels, dict(result.seconds)
    seconds["total"] = time.perf_counter() - t0
    return labels, seconds


def warm_up(models, ws_params):
    """Compile the Numba kernels (both formulations) and touch every code path once."""
    image, _ = synthetic_stack((24, 48, 48), 8.0, kind="membrane", seed=99, noise=0.1)
    for method in models:
        segment(image, models[method])
        segment(image, models[method], diameter=8.0)
    watershed_baseline(image, 8.0, **ws_params)


def time_stages(model, spec, augment):
    """Per-stage seconds of the tanh model on one large stack (default diameter), repeated."""
    image, labels = make_stack(spec)
    runs = []
    for _ in range(spec["repeat"]):
        result = segment(image, model, augment=augment)
        runs.append({k: float(v) for k, v in result.seconds.items()})
    best = min(runs, key=lambda r: r["predict"] + r["reconstruct"])
    return {"stack": spec, "augment": augment, "n_gt": int(labels.max()), "runs": runs,
            "best": dict(best, total=best["predict"] + best["reconstruct"]),
            "scores": _scores(labels, result.labels),
            "torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads()}


def score_stacks(specs, settings, models, ws_params, assumed):
    """Every method in every setting of `settings` on each stack of `specs`, with scores and seconds."""
    per_stack = []
    for spec in specs:
        image, gt = make_stack(spec)
        d_true = true_diameter(gt)
        entry = {"spec": spec, "true_diameter": d_true, "n_gt": int(gt.max()), "results": {}}
        # methods interleaved per stack so that background load hits them alike
        for method, method_settings in settings.items():
            entry["results"][method] = {}
            for setting in method_settings:
                labels, seconds = run_method(method, setting, image, d_true, models, ws_params, assumed)
                sc = _scores(gt, labels)
                entry["results"][method][setting] = {"scores": sc, "seconds": seconds}
                print(f"seed {spec['seed']} d {d_true:.1f} noise {spec['noise']} {method:9s} {setting:13s} "
                      f"dice {sc['dice']:.3f} ap50 {sc['ap50']:.3f} ap75 {sc['ap75']:.3f} "
                      f"n {sc['n_pred']}/{sc['n_gt']} {seconds['total']:.1f}s", flush=True)
        per_stack.append(entry)
    return per_stack


def summarise(per_stack, settings=SETTINGS):
    summary = {}
    for method, method_settings in settings.items():
        for setting in method_settings:
            rows = [s["results"][method][setting] for s in per_stack]
            summary[f"{method}/{setting}"] = {
                "method": method, "setting": setting,
                **{k: float(np.mean([r["scores"][k] for r in rows])) for k in SCORE_KEYS},
                "seconds": float(np.mean([r["seconds"]["total"] for r in rows])),
                **{f"seconds_{k}": float(np.mean([r["seconds"][k] for r in rows]))
                   for k in ("predict", "reconstruct") if k in rows[0]["seconds"]},
            }
    return summary


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

LABELS = {"tanh": "cp3d tanh model", "watershed": "seeded watershed (skimage)", "heat": "cp3d heat model"}
SETTING_LABELS = {"default": "default", "true_diameter": "true d", "single_pass": "default, one pass",
                  "auto": "\"auto\" (estimated)"}


def _machine_line(m):
    return (f"{m['date_utc']}, {m['platform']}, {m['cpu_count']} CPUs, torch {m['versions']['torch']} "
            f"({m['torch_threads']} threads), numba {m['versions']['numba']} ({m['numba_threads']} threads), "
            f"scikit-image {m['versions']['scikit-image']}, cp3d {m['versions']['cp3d']} "
            f"(commit {(m['git_commit'] or '?')[:10]}). Load average at start {m['load_average']}.")


def _markdown_with_notes(lines, report):
    """A report's markdown: `lines`, then the report's notes, if any, as a list."""
    if report.get("notes"):
        lines = lines + ["Notes:", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def markdown(report):
    lines = [
        "# End-to-end segmentation on held-out synthetic membrane stacks",
        "",
        f"`{report['command']}`",
        "",
        _machine_line(report["machine"]),
        "",
        f"{len(report['stacks'])} stacks of {report['config']['shape']} voxels, seeds {TEST_SEED}.., "
        f"diameters {TEST_DIAMETERS[0]:g}..{TEST_DIAMETERS[1]:g}, noise {', '.join(map(str, TEST_NOISE))} "
        "(training: diameters 7..15, noise U(0.02, 0.2)). Means over stacks. *default*: `diameter=None` "
        "(the training cell size, "
        f"{report['models']['tanh']['train_diameter']:.2f} voxels); *true d*: the stack's median "
        "equivalent-sphere cell diameter; *one pass*: default but `augment=False` (no test-time mirroring).",
        "",
        "| method | diameter | Dice | AP@0.5 | AP@0.75 | arand | n_pred / n_gt | s / stack |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"].values():
        lines.append(
            f"| {LABELS[row['method']]} | {SETTING_LABELS[row['setting']]} | "
            f"{row['dice']:.3f} | {row['ap50']:.3f} | {row['ap75']:.3f} | {row['arand']:.3f} | "
            f"{row['n_pred']:.0f} / {row['n_gt']:.0f} | {row['seconds']:.1f} |"
        )
    g = report["goal"]
    lines += [
        "",
        f"Goal (tanh model, default settings: Dice >= {g['dice']:.2f} and AP@0.5 >= {g['ap50']:.2f}): "
        f"Dice {g['measured_dice']:.3f}, AP@0.5 {g['measured_ap50']:.3f}: **{'met' if g['met'] else 'not met'}**.",
        "",
        "Per stack (Dice / AP@0.5):",
        "",
        "| seed | d (true) | noise | n_gt | " + " | ".join(
            f"{meth} {SETTING_LABELS[set_]}" for meth, sets in SETTINGS.items() for set_ in sets) + " |",
        "|---|---|---|---|" + "---|" * sum(map(len, SETTINGS.values())),
    ]
    for s in report["stacks"]:
        cells = []
        for meth, sets in SETTINGS.items():
            for set_ in sets:
                sc = s["results"][meth][set_]["scores"]
                cells.append(f"{sc['dice']:.2f} / {sc['ap50']:.2f}")
        lines.append(f"| {s['spec']['seed']} | {s['true_diameter']:.1f} | {s['spec']['noise']} | {s['n_gt']} | "
                     + " | ".join(cells) + " |")
    unseen = report["unseen_noise"]
    lines += [
        "",
        f"A second held-out set, every noise level above the training range: {len(unseen['stacks'])} stacks, "
        f"seeds {unseen['config']['seed']}.., the same diameters, noise {', '.join(map(str, unseen['config']['noise']))}, "
        "default settings:",
        "",
        "| method | Dice | AP@0.5 | AP@0.75 | arand | n_pred / n_gt |",
        "|---|---|---|---|---|---|",
    ]
    for row in unseen["summary"].values():
        lines.append(f"| {LABELS[row['method']]} | {row['dice']:.3f} | {row['ap50']:.3f} | {row['ap75']:.3f} | "
                     f"{row['arand']:.3f} | {row['n_pred']:.0f} / {row['n_gt']:.0f} |")
    t = report["timing"][0]
    lines += [
        "",
        f"Stage timing, tanh model, default diameter, one {'x'.join(map(str, t['stack']['shape']))} stack "
        f"({t['n_gt']} cells), torch {t['torch_threads']} threads, numba {t['numba_threads']} threads, "
        f"best of {t['stack']['repeat']}:",
        "",
        "| augment | predict (s) | reconstruct (s) | total (s) | Dice | AP@0.5 |",
        "|---|---|---|---|---|---|",
    ]
    for t in report["timing"]:
        lines.append(f"| {t['augment']} | {t['best']['predict']:.1f} | {t['best']['reconstruct']:.1f} | "
                     f"{t['best']['total']:.1f} | {t['scores']['dice']:.3f} | {t['scores']['ap50']:.3f} |")
    lines.append("")
    tw = report["watershed_tuning"]
    b = tw["best"]
    lines += [
        f"Watershed parameters, tuned on one training-like stack (seed {tw['stack']['seed']}, diameter "
        f"{tw['stack']['diameter']:g}, noise {tw['stack']['noise']}; {len(tw['rows'])} grid points, objective "
        f"{tw['objective']}): `{json.dumps(b['params'])}` (tuning stack: Dice {b['dice']:.3f}, AP@0.5 "
        f"{b['ap50']:.3f}). See `watershed_baseline` in `bench/bench_segment.py`.",
        "",
    ]
    return _markdown_with_notes(lines, report)


# ---------------------------------------------------------------------------
# diameter="auto" beside the true diameter (--auto)
# ---------------------------------------------------------------------------

AUTO = {"diameters": (6.0, 10.0, 20.0, 40.0), "stacks": 3, "seed": 12_000, "noise": (0.05, 0.12, 0.2)}
AUTO_SETTINGS = ("true_diameter", "auto", "default")
AUTO_GOAL = 0.03  # largest Dice loss of "auto" against the true diameter, per diameter


def auto_shape(diameter):
    """Stack shape for cells `diameter` voxels across: a few dozen cells at least, small enough to run in seconds."""
    return [max(32, int(2.4 * diameter)), max(64, int(4.8 * diameter)), max(64, int(4.8 * diameter))]


def _auto_stacks(n_stacks, diameters, new_kind_seeds):
    """The --auto test stacks: synthetic membranes per diameter, then the new kind (bench --finetune's test stacks)."""
    for d in diameters:
        for i in range(n_stacks):
            spec = {"set": "synthetic", "seed": AUTO["seed"] + 100 * int(d) + i, "diameter": d,
                    "shape": auto_shape(d), "noise": AUTO["noise"][i % len(AUTO["noise"])]}
            yield (spec, *make_stack(spec))
    for seed in new_kind_seeds:
        yield ({"set": "new_kind", "seed": seed, "diameter": NEW_KIND["diameter"]}, *new_kind_stack(seed))


def auto_diameter_bench(model, n_stacks, diameters, new_kind_seeds=()):
    """``segment(diameter="auto")`` against the true and the training diameter, one network pass each."""
    rows = []
    for spec, image, gt in _auto_stacks(n_stacks, diameters, new_kind_seeds):
        d = spec["diameter"]
        d_true = true_diameter(gt)
        row = {"spec": spec, "true_diameter": d_true, "n_gt": int(gt.max()), "results": {}}
        for setting in AUTO_SETTINGS:
            diameter = {"true_diameter": d_true, "auto": "auto", "default": None}[setting]
            t0 = time.perf_counter()
            result = segment(image, model, diameter=diameter, augment=False)
            seconds = time.perf_counter() - t0
            row["results"][setting] = {"scores": _scores(gt, result.labels), "diameter": result.diameter,
                                       "seconds": seconds, "stages": dict(result.seconds)}
            sc = row["results"][setting]["scores"]
            print(f"d {d:g} seed {spec['seed']} (true {d_true:.1f}) {setting:13s} d used {result.diameter:5.1f} "
                  f"dice {sc['dice']:.3f} ap50 {sc['ap50']:.3f} {seconds:.1f}s", flush=True)
        rows.append(row)
    summary = []
    for key in dict.fromkeys((r["spec"]["set"], r["spec"]["diameter"]) for r in rows):
        group = [r for r in rows if (r["spec"]["set"], r["spec"]["diameter"]) == key]
        entry = {"set": key[0], "diameter": key[1], "stacks": len(group),
                 "true_diameter": float(np.mean([r["true_diameter"] for r in group])), "settings": {}}
        for setting in AUTO_SETTINGS:
            res = [r["results"][setting] for r in group]
            entry["settings"][setting] = {k: float(np.mean([x["scores"][k] for x in res])) for k in ("dice", "ap50")}
            entry["settings"][setting].update(diameter=float(np.mean([x["diameter"] for x in res])),
                                              seconds=float(np.mean([x["seconds"] for x in res])))
        entry["dice_loss_auto"] = entry["settings"]["true_diameter"]["dice"] - entry["settings"]["auto"]["dice"]
        entry["goal_met"] = bool(entry["dice_loss_auto"] <= AUTO_GOAL)
        summary.append(entry)
    return summary, rows


def auto_markdown(report):
    lines = [
        "# `segment(diameter=\"auto\")` beside the true diameter",
        "",
        f"`{report['command']}`",
        "",
        _machine_line(report["machine"]),
        "",
        f"Synthetic membrane stacks (`cp3d.data.synthetic_stack`), {report['config']['stacks']} per diameter, "
        f"noise cycling through {', '.join(map(str, AUTO['noise']))}, shapes from `auto_shape` (2.4 d x 4.8 d x 4.8 d, "
        "at least 32 x 64 x 64); bundled tanh model, one network pass everywhere (`augment=False`). *true d*: the "
        "stack's median equivalent-sphere diameter; *auto*: `diameter=\"auto\"`; *training d*: `diameter=None`. "
        "Means over stacks; seconds per stack, the auto column including its estimating passes. *new kind*: "
        "the held-out stacks of `--finetune` (`new_kind_stack`: thick blurred walls, textured interiors, noise "
        "0.3, cells elongated along z), where the bundled model oversegments at the training size.",
        "",
        "| cells (d) | true d | Dice true d | Dice auto | auto d | Dice training d | AP@0.5 true / auto | "
        "s true / auto | auto within 0.03 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["summary"]:
        t, a, n = (e["settings"][k] for k in AUTO_SETTINGS)
        cells = f"{e['diameter']:g}" if e.get("set", "synthetic") == "synthetic" else f"new kind, {e['diameter']:g}"
        lines.append(f"| {cells} | {e['true_diameter']:.1f} | {t['dice']:.3f} | {a['dice']:.3f} | "
                     f"{a['diameter']:.1f} | {n['dice']:.3f} | {t['ap50']:.3f} / {a['ap50']:.3f} | "
                     f"{t['seconds']:.1f} / {a['seconds']:.1f} | {'yes' if e['goal_met'] else '**no**'} |")
    return "\n".join(lines + [""])


# ---------------------------------------------------------------------------
# Fine-tuning on three annotated stacks of a new kind (--finetune)
# ---------------------------------------------------------------------------

# Stacks the bundled models never saw: every setting outside the training ranges (bundled models: noise
# U(0.02, 0.2), PSF sigma (2, 0.8, 0.8), depth attenuation 0.5, 15 % dim cells, isotropic cells z-stretched
# by 0.75..1.33, 1-voxel walls, flat interiors).
NEW_KIND = {
    "diameter": 12.0, "shape": (48, 112, 112), "noise": 0.3, "psf_sigma": (2.5, 1.2, 1.2),
    "anisotropy": (1.6, 1.0, 1.0), "depth_attenuation": 0.75, "dim_fraction": 0.35,
    "wall_dilation": 2, "texture": 0.3,
}
FINETUNE = {"train_seeds": (30_000, 30_001, 30_002), "validate_seeds": (30_100,),
            "test_seeds": tuple(range(31_000, 31_004)),
            "steps": 300}
# --finetune-kind phantom_hard: the second renderer's small blurred cells (see PHANTOM_HARD), tested on the
# phantom_hard stacks of --generalise; its training and validation seeds are apart from those.
FINETUNE_PHANTOM = FINETUNE | {"train_seeds": (33_000, 33_001, 33_002), "validate_seeds": (33_100,),
                               "test_seeds": tuple(range(32_100, 32_104))}
FINETUNE_KINDS = {"new_kind": FINETUNE, "phantom_hard": FINETUNE_PHANTOM}


def finetune_stack(kind, seed):
    """A stack of a --finetune kind ("new_kind" or "phantom_hard"), and its labels."""
    return new_kind_stack(seed) if kind == "new_kind" else phantom_stack(seed, PHANTOM_HARD)


def new_kind_stack(seed, kind=NEW_KIND):
    """A membrane stack rendered outside the bundled models' training ranges, and its labels.

    `synthetic_stack` draws the cells and the blurred walls without noise; the walls are then thickened by
    a grey dilation of `wall_dilation` voxels in y and x, the interiors get a smooth random texture
    (cytoplasm, `texture` x the wall level at most), and Poisson + Gaussian noise at level `noise` is added
    as `synthetic_stack` adds it.
    """
    image, labels = synthetic_stack(kind["shape"], kind["diameter"], kind="membrane", seed=seed, noise=0.0,
                                    psf_sigma=kind["psf_sigma"], anisotropy=kind["anisotropy"],
                                    depth_attenuation=kind["depth_attenuation"], dim_fraction=kind["dim_fraction"])
    rng = np.random.default_rng([seed, 7])
    w = kind["wall_dilation"]
    image = ndimage.grey_dilation(image, size=(1, w, w))
    texture = ndimage.gaussian_filter(rng.random(image.shape).astype(np.float32), 1.5)
    texture = (texture - texture.min()) / max(float(np.ptp(texture)), 1e-6)
    image = image + kind["texture"] * float(np.percentile(image, 99)) * texture * (labels > 0)
    image = image / image.max()
    photons = 1.0 / kind["noise"] ** 2
    image = rng.poisson(image * photons).astype(np.float32) / np.float32(photons)
    image += rng.normal(0.0, 0.5 * kind["noise"], image.shape).astype(np.float32)
    return np.clip(image, 0, None).astype(np.float32), labels


def write_finetune_stacks(folder, kind, seeds):
    """Write stacks of a --finetune kind as Cellpose-style TIFF pairs, NAME.tif and NAME_masks.tif."""
    from cp3d.io import write_image, write_labels

    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        image, labels = finetune_stack(kind, seed)
        write_image(folder / f"stack_{seed}.tif", image)
        write_labels(folder / f"stack_{seed}_masks.tif", labels)
    return folder


def finetune_bench(work, base, steps, threads, kind, test_seeds):
    """Fine-tune `base` with ``cp3d train --data`` on three stacks of `kind`, score both on held-out ones."""
    seeds = FINETUNE_KINDS[kind]
    train_dir = write_finetune_stacks(work / "train", kind, seeds["train_seeds"])
    valid_dir = write_finetune_stacks(work / "validate", kind, seeds["validate_seeds"])
    out = work / "model"
    command = [sys.executable, "-m", "cp3d.cli", "train", str(out), "--data", str(train_dir), "--validate-data",
               str(valid_dir), "--init", str(base), "--steps", str(steps), "--num-threads", str(threads),
               "--no-progress"]
    print(" ".join(command), flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    train_seconds = time.perf_counter() - t0
    card = json.loads((out / "model_card.json").read_text())
    models = {"bundled": load_model(base), "fine_tuned": load_model(out)}
    rows = []
    for seed in test_seeds:
        image, gt = finetune_stack(kind, seed)
        d_true = true_diameter(gt)
        row = {"seed": seed, "true_diameter": d_true, "n_gt": int(gt.max()), "results": {}}
        for name, model in models.items():
            for setting, diameter in (("true_diameter", d_true), ("auto", "auto")):
                t0 = time.perf_counter()
                result = segment(image, model, diameter=diameter)
                sc = _scores(gt, result.labels)
                row["results"][f"{name}/{setting}"] = {"scores": sc, "diameter": result.diameter,
                                                       "seconds": time.perf_counter() - t0}
                print(f"seed {seed} (d {d_true:.1f}) {name:10s} {setting:13s} dice {sc['dice']:.3f} "
                      f"ap50 {sc['ap50']:.3f} n {sc['n_pred']}/{sc['n_gt']} "
                      f"{row['results'][f'{name}/{setting}']['seconds']:.1f}s", flush=True)
        rows.append(row)
    summary = {key: {k: float(np.mean([r["results"][key]["scores"][k] for r in rows])) for k in SCORE_KEYS}
               | {"seconds": float(np.mean([r["results"][key]["seconds"] for r in rows])),
                  "diameter": float(np.mean([r["results"][key]["diameter"] for r in rows]))}
               for key in rows[0]["results"]}
    return {"train_command": " ".join(["python"] + command[1:]), "train_seconds": train_seconds,
            "model_card": {k: card.get(k) for k in ("steps", "seconds_per_step", "validation", "data", "lineage")},
            "summary": summary, "stacks": rows}


def finetune_markdown(report):
    f = report["finetune"]
    v = f["model_card"]["validation"]
    if report["config"].get("kind", "new_kind") == "new_kind":
        k = report["config"]["new_kind"]
        title = "a new kind"
        kind_line = (
            f"New kind (`new_kind_stack` in `bench/bench_segment.py`, every setting outside the bundled models' "
            f"training ranges): {'x'.join(map(str, k['shape']))} voxels, cells d {k['diameter']:g} elongated "
            f"{k['anisotropy'][0]:g}x along z, walls thickened by a {k['wall_dilation']}-voxel grey dilation, PSF "
            f"sigma {tuple(k['psf_sigma'])}, textured interiors ({k['texture']:g} x the wall level), noise "
            f"{k['noise']}, depth attenuation {k['depth_attenuation']}, {k['dim_fraction']:.0%} dim cells.")
    else:
        k = report["config"]["phantom_hard"]
        title = "the second renderer"
        kind_line = (
            f"The second renderer's small blurred cells (`phantom_stack(seed, PHANTOM_HARD)` in "
            f"`bench/bench_segment.py`, written apart from `cp3d.data`): {'x'.join(map(str, k['shape']))} voxels, "
            f"power-diagram cells d {k['diameter']:g}, z PSF {k['psf_sigma'][0]:g}, {k['photons']:g} photons, "
            f"wall brightness CV {k['wall_cv']:g}; the test stacks are `--generalise`'s phantom_hard set.")
    lines = [
        f"# Fine-tuning on three annotated stacks of {title}",
        "",
        f"`{report['command']}`",
        "",
        _machine_line(report["machine"]),
        "",
        kind_line,
        "",
        f"Fine-tuning: `{f['train_command']}` on {len(report['config']['train_seeds'])} training stacks (TIFF pairs "
        f"in Cellpose's layout), {f['train_seconds']:.0f} s wall ({f['model_card']['seconds_per_step']:.2f} s/step); "
        f"its validation stack: Dice {v['mean_dice']:.3f}, AP@0.5 {v['mean_ap50']:.3f}.",
        "",
        f"Scored on {len(f['stacks'])} held-out stacks of that kind (seeds {f['stacks'][0]['seed']}..), "
        "`cp3d.segment` defaults (test-time augmentation) at the true diameter and with `diameter=\"auto\"`; "
        "means over stacks, seconds per stack:",
        "",
        "| model | diameter | Dice | AP@0.5 | AP@0.75 | arand | n_pred / n_gt | d used | s / stack |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in f["summary"].items():
        model, setting = key.split("/")
        lines.append(f"| {model.replace('_', '-')} | {SETTING_LABELS.get(setting, setting)} | {row['dice']:.3f} | "
                     f"{row['ap50']:.3f} | {row['ap75']:.3f} | {row['arand']:.3f} | {row['n_pred']:.0f} / "
                     f"{row['n_gt']:.0f} | {row['diameter']:.1f} | {row['seconds']:.1f} |")
    lines += ["", "Per stack (Dice / AP@0.5):", "",
              "| seed | d (true) | n_gt | " + " | ".join(f["summary"]) + " |",
              "|---|---|---|" + "---|" * len(f["summary"])]
    for r in f["stacks"]:
        lines.append(f"| {r['seed']} | {r['true_diameter']:.1f} | {r['n_gt']} | {_dice_ap_cells(r)} |")
    return _markdown_with_notes(lines + [""], report)


def _dice_ap_cells(row):
    """The per-stack table cells of one stack: "Dice / AP@0.5" for each of its results."""
    return " | ".join(f"{x['scores']['dice']:.2f} / {x['scores']['ap50']:.2f}" for x in row["results"].values())


def run_finetune(a, argv):
    import tempfile

    torch.set_num_threads(a.threads)
    machine = machine_info()
    t_start = time.perf_counter()
    seeds = FINETUNE_KINDS[a.finetune_kind]
    steps = 4 if a.quick else seeds["steps"]
    test_seeds = seeds["test_seeds"][: (1 if a.quick else None)]
    with tempfile.TemporaryDirectory(prefix="cp3d-finetune-") as work:
        result = finetune_bench(Path(work), a.tanh_model, steps, a.threads, a.finetune_kind, test_seeds)
    report = {
        "command": " ".join(["python", "bench/bench_segment.py"] + [shlex.quote(x) for x in argv]),
        "machine": machine, "wall_seconds": time.perf_counter() - t_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "config": dict(seeds, kind=a.finetune_kind, steps=steps, test_seeds=list(test_seeds), new_kind=NEW_KIND,
                       phantom_hard=PHANTOM_HARD, base_model=a.tanh_model),
        "finetune": result, "notes": list(a.note),
    }
    name = "segment_finetune" + ("" if a.finetune_kind == "new_kind" else f"_{a.finetune_kind}")
    _write_report(report, Path(a.out) if a.out else RESULTS / (name + ("_quick.json" if a.quick else ".json")),
                  finetune_markdown)


# ---------------------------------------------------------------------------
# Generalisation: the bundled membrane model against another one on four differently rendered sets (--generalise)
# ---------------------------------------------------------------------------

# "standard" and "noise_above" are the held-out sets of the main benchmark, "new_kind" the test stacks of
# --finetune; "varied" draws every rendering setting with random_membrane_options (seeds far from training and
# validation); "beyond" renders outside even the widened ranges of random_membrane_options.
# A second renderer, written apart from cp3d.data: cells of a power diagram of seeds thrown as darts (sizes
# vary more, tissue fills the stack, cells drawn out along y), walls the cells' boundaries with a brightness per
# cell, a narrower z PSF, a background offset, a linear fall-off in z, fewer photons. All of it outside the
# code that draws the training stacks.
PHANTOM = {"shape": (48, 112, 112), "diameter": 12.0, "min_spacing": 0.6, "weight_spread": 0.35,
           "stretch_y": 1.25, "psf_sigma": (1.6, 1.0, 1.0), "photons": 25.0, "read_noise": 0.04,
           "background": 0.12, "z_falloff": 0.35, "wall_cv": 0.3}
# The same renderer where the bundled model is weak: small cells, a wide z PSF, few photons, uneven walls.
PHANTOM_HARD = PHANTOM | {"diameter": 9.0, "psf_sigma": (2.4, 1.0, 1.0), "photons": 15.0, "background": 0.15,
                          "wall_cv": 0.4}
# The two phantom kinds of issue 14's table, on this renderer: cells 15 voxels across with 30 % dim cells (walls at
# 0.3 of the brightness); cells 18 voxels across in x imaged with voxels twice as long in z (rendered on a fine
# grid, every second plane kept: 9 planes a cell, the z PSF 1.6 planes), dim cells as well.
PHANTOM_DIM = PHANTOM | {"shape": (64, 128, 128), "diameter": 15.0, "dim_fraction": 0.3, "dim_level": 0.3}
PHANTOM_ANISO = PHANTOM_DIM | {"shape": (96, 128, 128), "diameter": 18.0, "psf_sigma": (3.2, 1.0, 1.0), "z_step": 2}
PHANTOM_KINDS = {"phantom": PHANTOM, "phantom_hard": PHANTOM_HARD, "phantom_dim": PHANTOM_DIM,
                 "phantom_aniso": PHANTOM_ANISO}


def phantom_stack(seed, kind=PHANTOM):
    """A membrane phantom of the second renderer (see `PHANTOM`), and its labels."""
    rng = np.random.default_rng([seed, 11])
    labels = phantom_labels(rng, kind)
    shape = kind["shape"]
    wall = segmentation.find_boundaries(labels, mode="inner").astype(np.float32)
    brightness = np.clip(rng.normal(1.0, kind["wall_cv"], labels.max() + 1), 0.2, None).astype(np.float32)
    if kind.get("dim_fraction"):  # drawn only then: the other kinds keep the stream (and images) of before
        # dim cells: a share of the cells whose walls are much fainter than the rest
        brightness[rng.uniform(size=brightness.size) < kind["dim_fraction"]] *= kind["dim_level"]
    signal = ndimage.gaussian_filter(wall * brightness[labels], kind["psf_sigma"])
    signal /= np.percentile(signal, 99.5)
    z = np.linspace(0, 1, shape[0], dtype=np.float32)[:, None, None]
    signal = (signal * (1 - kind["z_falloff"] * z) + kind["background"]).clip(0, None)
    image = rng.poisson(signal * kind["photons"]).astype(np.float32) / kind["photons"]
    image += rng.normal(0, kind["read_noise"], shape).astype(np.float32)
    step = kind.get("z_step", 1)  # anisotropic voxels: every step-th plane of the fine grid
    return image[::step].copy(), segmentation.relabel_sequential(labels[::step])[0].astype(np.uint32)


def phantom_labels(rng, kind=PHANTOM):
    """The cells of the second renderer on its fine grid: a power diagram of darts filling ``kind["shape"]``."""
    from scipy.spatial import cKDTree

    shape, d = kind["shape"], kind["diameter"]
    stretch = np.array([1.0, kind["stretch_y"], 1.0])
    n_seeds = int(np.prod(shape) / (np.pi / 6 * d**3))
    # darts at least min_spacing * d apart (uniform seeds would put slivers of a few voxels between close pairs)
    seeds = np.empty((0, 3))
    while len(seeds) < n_seeds:
        dart = rng.uniform(0, 1, 3) * np.array(shape) / stretch
        if not len(seeds) or np.min(np.sum((seeds - dart) ** 2, axis=1)) >= (kind["min_spacing"] * d) ** 2:
            seeds = np.vstack([seeds, dart])
    # the power diagram's weights: squared radii spread around the mean cell's
    weights = (d / 2) ** 2 * rng.uniform(1 - kind["weight_spread"], 1 + kind["weight_spread"], n_seeds)
    points = np.indices(shape).reshape(3, -1).T / stretch
    near_distance, near = cKDTree(seeds).query(points, k=8)
    labels = 1 + near[np.arange(len(points)), np.argmin(near_distance**2 - weights[near], axis=1)]
    return measure.label(labels.reshape(shape).astype(np.int32), connectivity=1)  # split cut-off pieces


BEYOND = {"noise": 0.42, "psf_sigma": (4.0, 1.9, 1.9), "anisotropy": (2.4, 1.0, 1.0), "depth_attenuation": 0.9,
          "dim_fraction": 0.5, "wall_thickness": 4.5, "patchiness": 1.0, "texture": 1.0, "gamma": 1.9}
GENERALISE_SETS = {
    "standard": {"stacks": 6, "shape": (64, 128, 128), "diameter": "default"},
    "noise_above": {"stacks": 6, "shape": (64, 128, 128), "diameter": "default"},
    "new_kind": {"stacks": len(FINETUNE["test_seeds"]), "diameter": "true"},
    "varied": {"stacks": 6, "shape": (64, 128, 128), "seed": 14_000, "diameter": "true"},
    "beyond": {"stacks": 3, "shape": (48, 112, 112), "seed": 14_100, "diameter": "true", "cell_diameter": 12.0},
    "phantom": {"stacks": 4, "seed": 32_000, "diameter": "true"},
    "phantom_hard": {"stacks": 4, "seed": 32_100, "diameter": "true"},
    "phantom_dim": {"stacks": 3, "seed": 32_200, "diameter": "true"},
    "phantom_aniso": {"stacks": 3, "seed": 32_300, "diameter": "true", "voxel_size": (2.0, 1.0, 1.0)},
}
GENERALISE_LABELS = {
    "standard": "standard held-out set (plain renderer, noise 0.05/0.12/0.22, d 8..14), default diameter",
    "noise_above": "noise above the first training range (0.25, 0.3), default diameter",
    "new_kind": "`new_kind_stack` (bench --finetune's test stacks), true diameter",
    "varied": "varied membranes (`random_membrane_options`, d 8..14), true diameter",
    "beyond": "outside even the widened ranges (BEYOND), d 12, true diameter",
    "phantom": "a second renderer apart from cp3d.data (`phantom_stack`: power-diagram cells, boundary walls), "
               "d 12, true diameter",
    "phantom_hard": "the second renderer with small cells (d 9), z PSF 2.4, 15 photons, uneven walls (PHANTOM_HARD), "
                    "true diameter",
    "phantom_dim": "the second renderer, d 15, 30 % dim cells (PHANTOM_DIM), true diameter",
    "phantom_aniso": "the second renderer, d 18 in x, voxels 2 x longer in z, 30 % dim cells (PHANTOM_ANISO), "
                     "true diameter and voxel size",
}


def generalise_stacks(name, quick):
    """(seed, image, labels) of the held-out set `name` of GENERALISE_SETS."""
    cfg = GENERALISE_SETS[name]
    n = 1 if quick else cfg["stacks"]
    shape = (32, 64, 64) if quick and name != "new_kind" else cfg.get("shape")
    if name in ("standard", "noise_above"):
        for spec in test_stacks(n, shape, **({} if name == "standard" else UNSEEN)):
            yield (spec["seed"], *make_stack(spec))
    elif name == "new_kind":
        for seed in FINETUNE["test_seeds"][:n]:
            yield (seed, *new_kind_stack(seed))
    elif name in PHANTOM_KINDS:
        for seed in range(cfg["seed"], cfg["seed"] + n):
            kind = PHANTOM_KINDS[name]
            if quick:  # the quick run's small stack, on the fine grid
                kind = kind | {"shape": (32 * kind.get("z_step", 1), 64, 64)}
            yield (seed, *phantom_stack(seed, kind))
    else:
        from cp3d.data import random_membrane_options

        diameters = np.linspace(*TEST_DIAMETERS, n) if n > 1 else [float(np.mean(TEST_DIAMETERS))]
        for i in range(n):
            seed = cfg["seed"] + i
            if name == "varied":
                options, d = random_membrane_options(np.random.default_rng(seed)), float(diameters[i])
            else:
                options, d = dict(BEYOND), cfg["cell_diameter"]
            yield (seed, *synthetic_stack(shape, d, kind="membrane", seed=seed, **options))


def generalise_bench(models, sets, quick):
    """Every model of `models` on every stack of `sets`, with scores and seconds per stack."""
    report = {}
    for name in sets:
        rows = []
        voxel_size = GENERALISE_SETS[name].get("voxel_size")
        for seed, image, gt in generalise_stacks(name, quick):
            d_true = true_diameter(gt, voxel_size)
            row = {"seed": seed, "true_diameter": d_true, "n_gt": int(gt.max()), "results": {}}
            for key, model in models.items():
                t0 = time.perf_counter()
                diameter = d_true if GENERALISE_SETS[name]["diameter"] == "true" else None
                labels = segment(image, model, diameter=diameter, voxel_size=voxel_size).labels
                sc = _scores(gt, labels)
                row["results"][key] = {"scores": sc, "seconds": time.perf_counter() - t0}
                print(f"{name} seed {seed} (d {d_true:.1f}) {key:10s} dice {sc['dice']:.3f} ap50 {sc['ap50']:.3f} "
                      f"n {sc['n_pred']}/{sc['n_gt']} {row['results'][key]['seconds']:.1f}s", flush=True)
            rows.append(row)
        summary = {key: {k: float(np.mean([r["results"][key]["scores"][k] for r in rows])) for k in SCORE_KEYS}
                   | {"seconds": float(np.mean([r["results"][key]["seconds"] for r in rows]))} for key in models}
        report[name] = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in GENERALISE_SETS[name].items()},
                        "summary": summary, "stacks": rows}
    return report


def generalise_markdown(report):
    models = report["models"]
    lines = [
        "# Generalisation of the membrane model: bundled against fine-tuned on varied membranes",
        "",
        f"`{report['command']}`",
        "",
        _machine_line(report["machine"]),
        "",
        "Models: " + "; ".join(f"*{k}*: `{m['source']}` ({m.get('steps')} steps, {m.get('data_options', '?')})"
                               for k, m in models.items()) + ".",
        "",
        "`cp3d.segment` defaults (test-time augmentation); means over stacks, seconds per stack:",
        "",
        "| set | stacks | model | Dice | AP@0.5 | AP@0.75 | arand | n_pred / n_gt | s / stack |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in report["sets"].items():
        for key, row in res["summary"].items():
            lines.append(f"| {GENERALISE_LABELS[name]} | {len(res['stacks'])} | {key} | {row['dice']:.3f} | "
                         f"{row['ap50']:.3f} | {row['ap75']:.3f} | {row['arand']:.3f} | {row['n_pred']:.0f} / "
                         f"{row['n_gt']:.0f} | {row['seconds']:.1f} |")
    lines += ["", f"Goal on the standard set (default settings): Dice >= {GOAL['dice']}, AP@0.5 >= {GOAL['ap50']}.",
              "", "Per stack (Dice / AP@0.5):", "",
              "| set | seed | d (true) | n_gt | " + " | ".join(models) + " |",
              "|---|---|---|---|" + "---|" * len(models)]
    for name, res in report["sets"].items():
        for r in res["stacks"]:
            lines.append(f"| {name} | {r['seed']} | {r['true_diameter']:.1f} | {r['n_gt']} | {_dice_ap_cells(r)} |")
    return _markdown_with_notes(lines + [""], report)


def run_generalise(a, argv):
    torch.set_num_threads(a.threads)
    sources = {"bundled": a.base_model, "candidate": a.tanh_model}
    models = {k: load_model(v) for k, v in sources.items()}
    for model in models.values():  # compile the kernels outside the timings
        segment(synthetic_stack((24, 48, 48), 8.0, seed=99)[0], model, augment=False)
    machine = machine_info()
    t_start = time.perf_counter()
    sets = generalise_bench(models, GENERALISE_SETS, a.quick)
    info = {}
    for k, v in sources.items():
        info[k] = model_info(models[k], _model_dir(v))
        card = Path(_model_dir(v), "model_card.json")
        if card.is_file():
            info[k]["data_options"] = json.loads(card.read_text()).get("data", {}).get(
                "options", "generator defaults, noise varied")  # cards before the option was recorded
    report = {
        "command": " ".join(["python", "bench/bench_segment.py"] + [shlex.quote(x) for x in argv]),
        "machine": machine, "wall_seconds": time.perf_counter() - t_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "config": {"sets": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in v.items()}
                            for k, v in GENERALISE_SETS.items()},
                   "beyond": {k: (list(v) if isinstance(v, tuple) else v) for k, v in BEYOND.items()},
                   "new_kind": NEW_KIND, **PHANTOM_KINDS,
                   "unseen_noise": list(UNSEEN["noise"]), "quick": a.quick},
        "models": info, "sets": sets, "notes": list(a.note),
    }
    _write_report(report, Path(a.out) if a.out else RESULTS / ("segment_generalise_quick.json" if a.quick
                                                               else "segment_generalise.json"), generalise_markdown)


def _model_dir(source):
    from cp3d.model.unet import resolve_model_dir

    return resolve_model_dir(source)


# ---------------------------------------------------------------------------
# The nuclei model on held-out synthetic nuclei (--nuclei)
# ---------------------------------------------------------------------------

# Held-out nuclei stacks: seeds far from training (stack seeds 1_000_003 * seed + k, k < a few hundred) and
# validation (10**9 + i). "varied": every rendering setting drawn by random_nuclei_options from the stack's seed;
# "plain": the generator's defaults (what `cp3d synth --kind nuclei` writes); "large": nuclei 40 voxels across,
# segmented with diameter=40 as a real confocal nuclei stack would be.
NUCLEI_SETS = {
    "varied": {"seed": 13_000, "stacks": 6, "shape": (64, 128, 128), "diameters": (8.0, 14.0), "varied": True},
    "plain": {"seed": 13_100, "stacks": 3, "shape": (64, 128, 128), "diameters": (10.0, 10.0), "varied": False},
    "large": {"seed": 13_200, "stacks": 2, "shape": (112, 224, 224), "diameters": (40.0, 40.0), "varied": True},
}
NUCLEI_QUICK = {"varied": {"stacks": 2, "shape": (32, 64, 64)}, "plain": {"stacks": 1, "shape": (32, 64, 64)},
                "large": {"stacks": 1, "shape": (64, 128, 128), "diameters": (24.0, 24.0)}}
NUCLEI_TUNE = {"seed": 1235, "diameter": 11.0, "shape": (64, 128, 128)}  # one training-like varied stack
NUCLEI_SETTINGS = {"nuclei": ("true_diameter", "default", "auto"), "tanh": ("true_diameter",),
                   "watershed": ("true_diameter",)}
NUCLEI_GOAL = {"method": "nuclei", "setting": "true_diameter", "dice": 0.85, "ap50": 0.85}
NUCLEI_WATERSHED_GRID = {
    "sigma": (0.5, 1.0, 2.0),
    "foreground": (("otsu", 0.6), ("otsu", 0.8), ("local", 0.9), ("local", 1.1)),
    "min_distance": (0.3, 0.45, 0.6),
}
NUCLEI_WATERSHED_GRID_QUICK = {"sigma": (1.0,), "foreground": (("otsu", 0.8), ("local", 1.0)), "min_distance": (0.45,)}


def nuclei_stack(spec):
    """A held-out synthetic nuclei stack from its specification (seed, diameter, shape, noise, options)."""
    return synthetic_stack(tuple(spec["shape"]), spec["diameter"], kind="nuclei", seed=spec["seed"],
                           **spec["options"])


def nuclei_specs(name, config):
    n, (d0, d1) = config["stacks"], config["diameters"]
    specs = []
    for i, d in enumerate(np.linspace(d0, d1, n) if n > 1 else [0.5 * (d0 + d1)]):
        seed = config["seed"] + i
        options = random_nuclei_options(np.random.default_rng(seed)) if config["varied"] else {"noise": 0.1}
        specs.append({"set": name, "seed": seed, "diameter": round(float(d), 3), "shape": list(config["shape"]),
                      "options": options})
    return specs


def nuclei_watershed(image, diameter, *, sigma, foreground, min_distance):
    """Seeded watershed of a nuclei stack, with scikit-image.

    1. ``smoothed``: the image smoothed with a Gaussian of `sigma` voxels;
    2. nuclei mask: ``("otsu", f)``: ``smoothed`` above f x its Otsu threshold;
       ``("local", f)``: above f x its local mean (Gaussian of 2 diameters),
       which follows depth attenuation and background haze; holes filled;
    3. markers: ``peak_local_max`` of the mask's distance transform with
       ``min_distance = min_distance x diameter``, per connected component;
    4. ``skimage.segmentation.watershed(-distance, markers, mask=mask)``.
    """
    smoothed = ndimage.gaussian_filter(np.asarray(image, np.float32), sigma)
    mode, factor = foreground
    if mode == "otsu":
        mask = smoothed > factor * filters.threshold_otsu(smoothed)
    elif mode == "local":
        mask = smoothed > factor * ndimage.gaussian_filter(smoothed, 2 * diameter)
    else:
        raise ValueError(f"unknown foreground mode {mode!r}")
    mask = _fill_holes(mask)
    distance = ndimage.distance_transform_edt(mask)
    regions, _ = ndimage.label(mask)
    peaks = peak_local_max(distance, min_distance=max(1, int(round(min_distance * diameter))), labels=regions,
                           exclude_border=False)
    seeds = np.zeros(image.shape, np.int32)
    seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return segmentation.watershed(-distance, seeds, mask=mask).astype(np.uint32)


def tune_nuclei_watershed(grid, shape):
    """Grid search of `nuclei_watershed` on ONE training-like varied stack; objective mean of Dice and AP@0.5."""
    spec = {"set": "tune", "seed": NUCLEI_TUNE["seed"], "diameter": NUCLEI_TUNE["diameter"], "shape": list(shape),
            "options": random_nuclei_options(np.random.default_rng(NUCLEI_TUNE["seed"]))}
    image, labels = nuclei_stack(spec)
    diameter = true_diameter(labels)
    rows = []
    for sigma, fg, md in itertools.product(grid["sigma"], grid["foreground"], grid["min_distance"]):
        params = {"sigma": sigma, "foreground": list(fg), "min_distance": md}
        s = evaluate(labels, nuclei_watershed(image, diameter, **params))
        rows.append({"params": params, "dice": float(s["dice"]), "ap50": float(s["ap50"]),
                     "objective": 0.5 * float(s["dice"] + s["ap50"])})
        print(f"  tune {params}: dice {s['dice']:.3f} ap50 {s['ap50']:.3f}", flush=True)
    return {"stack": spec, "true_diameter": diameter, "objective": "mean of Dice and AP@0.5, true diameter",
            "grid": {k: [list(v) if isinstance(v, tuple) else v for v in vals] for k, vals in grid.items()},
            "best": max(rows, key=lambda r: r["objective"]), "rows": rows}


def nuclei_bench(models, ws_params, sets):
    """Every method and setting of `NUCLEI_SETTINGS` on the stacks of `sets`; scores and seconds per stack."""
    rows = []
    for name, config in sets.items():
        for spec in nuclei_specs(name, config):
            image, gt = nuclei_stack(spec)
            d_true = true_diameter(gt)
            row = {"spec": spec, "true_diameter": d_true, "n_gt": int(gt.max()), "results": {}}
            for method, settings in NUCLEI_SETTINGS.items():
                for setting in settings:
                    diameter = {"true_diameter": d_true, "default": None, "auto": "auto"}[setting]
                    t0 = time.perf_counter()
                    if method == "watershed":
                        labels = nuclei_watershed(image, d_true, **ws_params)
                    else:
                        labels = segment(image, models[method], diameter=diameter).labels
                    sc = _scores(gt, labels)
                    row["results"][f"{method}/{setting}"] = {"scores": sc, "seconds": time.perf_counter() - t0}
                    print(f"{name} seed {spec['seed']} d {d_true:.1f} {method:9s} {setting:13s} dice {sc['dice']:.3f} "
                          f"ap50 {sc['ap50']:.3f} n {sc['n_pred']}/{sc['n_gt']} "
                          f"{row['results'][f'{method}/{setting}']['seconds']:.1f}s", flush=True)
            rows.append(row)
    summary = {}
    for name in sets:
        group = [r for r in rows if r["spec"]["set"] == name]
        summary[name] = {key: {k: float(np.mean([r["results"][key]["scores"][k] for r in group])) for k in SCORE_KEYS}
                         | {"seconds": float(np.mean([r["results"][key]["seconds"] for r in group]))}
                         for key in group[0]["results"]}
    return summary, rows


NUCLEI_LABELS = {"nuclei": "cp3d nuclei model", "tanh": "cp3d tanh (membrane) model",
                 "watershed": "seeded watershed of the nuclei (skimage)"}
NUCLEI_SET_LABELS = {
    "varied": "varied nuclei (`random_nuclei_options`: shapes, texture, density, PSF, noise, background)",
    "plain": "plain nuclei, as `cp3d synth --kind nuclei` draws them (generator defaults, d 10, noise 0.1)",
    "large": "large varied nuclei, 40 voxels across (segmented with `diameter=` the true size)",
}


def nuclei_markdown(report):
    lines = ["# The nuclei model on held-out synthetic nuclei", "", f"`{report['command']}`", "",
             _machine_line(report["machine"]), ""]
    for name, summary in report["summary"].items():
        specs = [r["spec"] for r in report["stacks"] if r["spec"]["set"] == name]
        lines += [f"**{NUCLEI_SET_LABELS[name]}**: {len(specs)} stacks of {'x'.join(map(str, specs[0]['shape']))} "
                  f"voxels, seeds {specs[0]['seed']}.., diameters "
                  f"{', '.join(format(s['diameter'], 'g') for s in specs)}. Means over stacks; `segment` defaults "
                  "(test-time augmentation); *true d*: the stack's median equivalent-sphere diameter; *default*: "
                  "`diameter=None` (the training size); *auto*: `diameter=\"auto\"` (`cp3d segment`'s default).",
                  "",
                  "| method | diameter | Dice | AP@0.5 | AP@0.75 | arand | n_pred / n_gt | s / stack |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in summary.items():
            method, setting = key.split("/")
            lines.append(f"| {NUCLEI_LABELS[method]} | {SETTING_LABELS[setting]} | {row['dice']:.3f} | "
                         f"{row['ap50']:.3f} | {row['ap75']:.3f} | {row['arand']:.3f} | "
                         f"{row['n_pred']:.0f} / {row['n_gt']:.0f} | {row['seconds']:.1f} |")
        lines.append("")
    g = report["goal"]
    lines += [f"Goal of issue 14 (Dice and AP@0.5 >= {g['dice']:.2f} on real confocal nuclei; measured here on the "
              f"varied synthetic set, nuclei model at the true diameter, since no real annotated nuclei stack is "
              f"available offline): Dice {g['measured_dice']:.3f}, AP@0.5 {g['measured_ap50']:.3f}: "
              f"**{'met on synthetic nuclei' if g['met'] else 'not met'}**.", "",
              "Per stack (Dice / AP@0.5):", "",
              "| set | seed | d (true) | n_gt | " + " | ".join(report["stacks"][0]["results"]) + " |",
              "|---|---|---|---|" + "---|" * len(report["stacks"][0]["results"])]
    for r in report["stacks"]:
        lines.append(f"| {r['spec']['set']} | {r['spec']['seed']} | {r['true_diameter']:.1f} | {r['n_gt']} | "
                     f"{_dice_ap_cells(r)} |")
    tw = report["watershed_tuning"]
    lines += ["", f"Watershed parameters, tuned on one training-like varied stack (seed {tw['stack']['seed']}, "
              f"{len(tw['rows'])} grid points, objective {tw['objective']}): `{json.dumps(tw['best']['params'])}` "
              f"(tuning stack: Dice {tw['best']['dice']:.3f}, AP@0.5 {tw['best']['ap50']:.3f}). See "
              "`nuclei_watershed` in `bench/bench_segment.py`.", ""]
    return _markdown_with_notes(lines, report)


def run_nuclei(a, argv):
    torch.set_num_threads(a.threads)
    machine = machine_info()
    t_start = time.perf_counter()
    sets = {k: dict(v, **(NUCLEI_QUICK[k] if a.quick else {})) for k, v in NUCLEI_SETS.items()}
    models = {"nuclei": load_model(a.nuclei_model), "tanh": load_model(a.tanh_model)}
    print("tuning the nuclei watershed on one training-like stack", flush=True)
    tuning = tune_nuclei_watershed(NUCLEI_WATERSHED_GRID_QUICK if a.quick else NUCLEI_WATERSHED_GRID,
                                   sets["varied"]["shape"])
    ws_params = dict(tuning["best"]["params"], foreground=tuple(tuning["best"]["params"]["foreground"]))
    for model in models.values():  # compile the Numba kernels outside the timings
        segment(synthetic_stack((24, 48, 48), 8.0, kind="nuclei", seed=99)[0], model, augment=False)
    summary, rows = nuclei_bench(models, ws_params, sets)
    main_row = summary["varied"][f"{NUCLEI_GOAL['method']}/{NUCLEI_GOAL['setting']}"]
    goal = dict(NUCLEI_GOAL, measured_dice=main_row["dice"], measured_ap50=main_row["ap50"],
                met=bool(main_row["dice"] >= NUCLEI_GOAL["dice"] and main_row["ap50"] >= NUCLEI_GOAL["ap50"]))
    report = {
        "command": " ".join(["python", "bench/bench_segment.py"] + [shlex.quote(x) for x in argv]),
        "machine": machine, "wall_seconds": time.perf_counter() - t_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "config": {"sets": {k: dict(v, shape=list(v["shape"]), diameters=list(v["diameters"])) for k, v in sets.items()},
                   "settings": {k: list(v) for k, v in NUCLEI_SETTINGS.items()}},
        "models": {"nuclei": model_info(models["nuclei"], a.nuclei_model), "tanh": model_info(models["tanh"], a.tanh_model)},
        "summary": summary, "goal": goal, "watershed_tuning": tuning, "stacks": rows, "notes": list(a.note),
    }
    _write_report(report, Path(a.out) if a.out else RESULTS / ("segment_nuclei_quick.json" if a.quick
                                                               else "segment_nuclei.json"), nuclei_markdown)


# ---------------------------------------------------------------------------
# Real annotated nuclei (--real)
# ---------------------------------------------------------------------------

# Two real confocal crops with expert labels (GoNuclear, MIT; see their README): validation only, never training.
REAL_DATA = HERE.parent.parent / "shared" / "data" / "real-nuclei"
REAL_CROPS = ("1135_mini.h5", "1136_mini.h5")
# every bundled model but the default, which runs as model=None
REAL_MODELS = tuple(available_models())  # beside the default, which chooses between STAIN_MODELS per crop
REAL_SETTINGS = ("auto", "true_diameter")
REAL_GOAL = {"method": "default", "setting": "auto", "dice": 0.75, "ap50": 0.60, "count": 0.25}


def read_real_crop(path):
    """Image, labels and voxel size (z, y, x) of an annotated HDF5 crop (datasets raw and label)."""
    from cp3d.model.annotated import read_annotated

    stack = read_annotated(path)
    return np.asarray(stack.image), np.asarray(stack.labels).astype(np.uint32), tuple(stack.voxel_size)


def isotropic_watershed(image, labels_shape, voxel_size, diameter, params):
    """`nuclei_watershed` on the crop resampled to isotropic voxels (its distances assume them), labels mapped back."""
    from cp3d.model.predict import zoom_to_shape

    factors = [v / voxel_size[2] for v in voxel_size]
    iso = zoom_to_shape(np.asarray(image, np.float32), [int(round(n * f)) for n, f in zip(image.shape, factors)], 1)
    return zoom_to_shape(nuclei_watershed(iso, diameter, **params), labels_shape, 0).astype(np.uint32)


def tune_real_watershed(image, labels, voxel_size, diameter, grid):
    """Grid search of the nuclei watershed on the crop's own truth: a reference tuned on the answer."""
    best = None
    for sigma, fg, md in itertools.product(grid["sigma"], grid["foreground"], grid["min_distance"]):
        params = {"sigma": sigma, "foreground": fg, "min_distance": md}
        s = evaluate(labels, isotropic_watershed(image, labels.shape, voxel_size, diameter, params))
        objective = 0.5 * float(s["dice"] + s["ap50"])
        if best is None or objective > best[0]:
            best = (objective, params)
    return best[1]


def real_bench(crops, models, grid):
    """Every model and setting, and the watershed tuned on each crop's answer; scores, counts, seconds."""
    rows = []
    for path in crops:
        image, gt, voxel_size = read_real_crop(path)
        d_true = true_diameter(gt, voxel_size)
        # most of a small crop's nuclei are cut by its faces: the median of the whole ones is the nuclei's size
        cut = border_ids(gt)
        row = {"crop": path.name, "voxel_size": list(voxel_size), "true_diameter": d_true, "n_gt": int(gt.max()),
               "uncut_diameter": median_diameter(gt, voxel_size, exclude=cut), "n_cut": int(cut.size),
               "results": {}, "labels": {}}
        for method, model in models.items():
            for setting in REAL_SETTINGS:
                start = time.perf_counter()
                result = segment(image, model, diameter="auto" if setting == "auto" else d_true,
                                 voxel_size=voxel_size)
                seconds = time.perf_counter() - start
                scores = _scores(gt, result.labels)
                row["results"][f"{method}/{setting}"] = dict(scores, diameter=result.diameter, seconds=seconds,
                                                             model=result.model)
                row["labels"][f"{method}/{setting}"] = result.labels
                print(f"  {path.name} {method}/{setting}: d {result.diameter:.1f} (true {d_true:.1f}) dice "
                      f"{scores['dice']:.3f} ap50 {scores['ap50']:.3f} n {scores['n_pred']}/{scores['n_gt']}", flush=True)
        params = tune_real_watershed(image, gt, voxel_size, d_true, grid)
        start = time.perf_counter()
        labels = isotropic_watershed(image, gt.shape, voxel_size, d_true, params)
        row["results"]["watershed/tuned"] = dict(_scores(gt, labels), diameter=d_true, params=params,
                                                 seconds=time.perf_counter() - start)
        row["labels"]["watershed/tuned"] = labels
        rows.append((row, image, gt))
    return rows


def _batch_norm_from(model, image, diameter, voxel_size):
    """A copy of `model` whose batch-norm statistics are re-estimated on `image` (AdaBN), for the ablation."""
    import copy

    from cp3d.model.predict import normalize_percentile, rescaled_shape, zoom_to_shape
    from cp3d.segment import cell_extent

    adapted = copy.deepcopy(model)
    extent = cell_extent(diameter, voxel_size, model.config.train_diameter)
    x = normalize_percentile(image)
    x = zoom_to_shape(x, rescaled_shape(x.shape, [model.config.train_diameter / e for e in extent], "crop"), 1)
    for layer in adapted.modules():
        if isinstance(layer, torch.nn.BatchNorm3d):
            layer.reset_running_stats()
            layer.momentum = None  # a plain average over the passes
    adapted.train()
    pad = [(0, (-n) % 8) for n in reversed(x.shape)]
    with torch.no_grad():
        adapted(torch.nn.functional.pad(torch.from_numpy(x)[None, None], [p for pair in pad for p in pair],
                                        mode="reflect"))
    return adapted.eval()


def _clipped_at_background(image, diameter, voxel_size):
    """`image` with everything below its background level set to that level (for the ablation).

    The level is the mode of the histogram of the image smoothed over a tenth of a diameter: the most common
    brightness, which in a sparse nuclei crop is the background's.
    """
    smoothed = ndimage.gaussian_filter(np.asarray(image, np.float32),
                                       [0.1 * diameter * voxel_size[2] / v for v in voxel_size])
    counts, edges = np.histogram(smoothed, 256, range=tuple(np.percentile(smoothed, [0.5, 99.5])))
    level = 0.5 * (edges[np.argmax(counts)] + edges[np.argmax(counts) + 1])
    return np.maximum(np.asarray(image, np.float32), np.float32(level))


def contrast_to_noise(image, labels, diameter, voxel_size, train_diameter):
    """Contrast-to-noise ratio of nuclei on the grid the network sees (normalised, rescaled to `train_diameter`).

    (mean inside the nuclei, two voxels in - mean of the background, two voxels out) / the background's standard
    deviation.
    """
    from cp3d.model.predict import normalize_percentile, rescaled_shape, zoom_to_shape
    from cp3d.segment import cell_extent

    extent = cell_extent(diameter, voxel_size, train_diameter)
    shape = rescaled_shape(image.shape, [train_diameter / e for e in extent], "stack")
    x = zoom_to_shape(normalize_percentile(image), shape, 1)
    nuclei = zoom_to_shape(labels.astype(np.float32), shape, 0) > 0
    inside = ndimage.binary_erosion(nuclei, iterations=2)
    outside = ~ndimage.binary_dilation(nuclei, iterations=2)
    return float((x[inside].mean() - x[outside].mean()) / x[outside].std())


def real_ablation(path, model):
    """Where the model's errors on a real crop come from, at the true diameter.

    Rows: the model as it is; its flows with the truth's foreground; the truth's flows (tanh at the model's scale)
    with its foreground; batch-norm statistics re-estimated on the crop (AdaBN); and the share of the truth's
    background the model calls foreground (probability above 0.5) beside its recall of the truth's foreground.
    """
    import cp3d
    from cp3d.segment import cell_extent, model_tanh_scale

    image, gt, voxel_size = read_real_crop(path)
    d_true = true_diameter(gt, voxel_size)
    extent = cell_extent(d_true, voxel_size, model.config.train_diameter)
    scale = model_tanh_scale(model.config, extent)
    result = segment(image, model, diameter=d_true, voxel_size=voxel_size)
    truth_fg, called = gt > 0, result.foreground > 0.5
    oracle_flows = cp3d.tanh_flows(gt, scale=scale)

    def rebuilt(flows, foreground):
        return cp3d.reconstruct(flows, foreground, diameter=extent, targets=model.config.targets, tanh_scale=scale)

    cases = {
        "as is": result.labels,
        "its flows + true foreground": rebuilt(result.flows, truth_fg.astype(np.float32)),
        "true flows + its foreground": rebuilt(oracle_flows, result.foreground),
        "true flows + true foreground": rebuilt(oracle_flows, truth_fg.astype(np.float32)),
        "batch norm re-estimated on the crop": segment(image, _batch_norm_from(model, image, d_true, voxel_size),
                                                       diameter=d_true, voxel_size=voxel_size).labels,
        "image clipped below its background level": segment(_clipped_at_background(image, d_true, voxel_size), model,
                                                             diameter=d_true, voxel_size=voxel_size).labels,
    }
    return {"crop": path.name, "foreground_recall": float(called[truth_fg].mean()),
            "errors": error_kinds(gt, result.labels),
            "contrast_to_noise": contrast_to_noise(image, gt, d_true, voxel_size, model.config.train_diameter),
            "background_called_foreground": float(called[~truth_fg].mean()),
            "cases": {k: _scores(gt, v) for k, v in cases.items()}}


def error_kinds(gt, labels):
    """What the wrong instances are: ``in_background``, instances mostly (> 50 %) in the truth's background;
    ``split``, true nuclei of which two or more instances each cover over 10 %; ``missed``, true nuclei of which
    no instance covers half."""
    gt_ids, gt_sizes = np.unique(gt[gt > 0], return_counts=True)
    pairs, overlap = np.unique(np.stack([gt[labels > 0], labels[labels > 0]]), axis=1, return_counts=True)
    pred_ids, pred_sizes = np.unique(labels[labels > 0], return_counts=True)
    of_truth = pairs[0] > 0
    in_truth = np.zeros(pred_ids.size)
    np.add.at(in_truth, np.searchsorted(pred_ids, pairs[1][of_truth]), overlap[of_truth])
    share = overlap[of_truth] / gt_sizes[np.searchsorted(gt_ids, pairs[0][of_truth])]
    pieces = np.bincount(np.searchsorted(gt_ids, pairs[0][of_truth][share > 0.1]), minlength=gt_ids.size)
    best = np.zeros(gt_ids.size)
    np.maximum.at(best, np.searchsorted(gt_ids, pairs[0][of_truth]), share)
    return {"instances": int(pred_ids.size), "in_background": int((in_truth < 0.5 * pred_sizes).sum()),
            "nuclei": int(gt_ids.size), "split": int((pieces >= 2).sum()), "missed": int((best < 0.5).sum())}


# Synthetic nuclei on a background of rising brightness (haze relative to the nuclei's ~1), two stacks each: packed
# nuclei in a smooth haze, and sparse nuclei (a fifth of the stack) in a grainy one, as in the real crops.
BACKGROUND_ABLATION = {"levels": (0.0, 0.15, 0.3, 0.5), "seeds": (13_300, 13_301), "shape": (48, 96, 96),
                       "diameter": 12.0, "noise": 0.1, "texture": 0.5,
                       "settings": ({"density": 0.6, "background_grain": 0.0}, {"density": 0.2, "background_grain": 1.0})}


CNR_NOISE = (0.02, 0.1, 0.2, 0.35)  # the training range is 0.02 to 0.2


def synthetic_contrast_to_noise(train_diameter):
    """Contrast-to-noise of synthetic nuclei (as `contrast_to_noise` measures it) at noise levels in and above the
    training range, with plain and with strongly textured nuclei: where the real crops lie among them."""
    c = BACKGROUND_ABLATION
    rows = []
    for noise, texture in itertools.product(CNR_NOISE, (0.0, 1.0)):
        image, gt = synthetic_stack(c["shape"], train_diameter, kind="nuclei", seed=c["seeds"][0], noise=noise,
                                    density=c["settings"][0]["density"], texture=texture, background=0.1)
        rows.append({"noise": noise, "texture": texture,
                     "contrast_to_noise": contrast_to_noise(image, gt, train_diameter, (1, 1, 1), train_diameter)})
    return rows


def background_ablation(models):
    """Dice and AP@0.5 of each model (one pass, true diameter) as the background brightens: is it the cause?"""
    c = BACKGROUND_ABLATION
    rows = []
    for setting, level in itertools.product(c["settings"], c["levels"]):
        stacks = [synthetic_stack(c["shape"], c["diameter"], kind="nuclei", seed=seed, background=level,
                                  noise=c["noise"], texture=c["texture"], **setting) for seed in c["seeds"]]
        for name, model in models.items():
            scores = [_scores(gt, segment(image, model, diameter=true_diameter(gt), augment=False).labels)
                      for image, gt in stacks]
            rows.append({**setting, "background": level, "model": name,
                         "dice": float(np.mean([s["dice"] for s in scores])),
                         "ap50": float(np.mean([s["ap50"] for s in scores])),
                         "n_pred": int(sum(s["n_pred"] for s in scores)), "n_gt": int(sum(s["n_gt"] for s in scores))})
            print(f"  {setting} background {level} {name}: dice {rows[-1]['dice']:.3f} ap50 {rows[-1]['ap50']:.3f}",
                  flush=True)
    return {"config": dict(c, levels=list(c["levels"]), seeds=list(c["seeds"]), shape=list(c["shape"]),
                           settings=list(c["settings"])), "rows": rows}


def clipping_on_synthetic(model, config):
    """The ablation's background clipping on held-out synthetic nuclei (`--nuclei`'s varied set): what it costs."""
    rows = []
    for spec in nuclei_specs("varied", config):
        image, gt = nuclei_stack(spec)
        d = true_diameter(gt)
        plain = _scores(gt, segment(image, model, diameter=d).labels)
        clipped = _scores(gt, segment(_clipped_at_background(image, d, (1, 1, 1)), model, diameter=d).labels)
        rows.append({"seed": spec["seed"], "diameter": d, "plain": plain, "clipped": clipped})
        print(f"  clipping, varied nuclei {spec['seed']}: ap50 {plain['ap50']:.3f} -> {clipped['ap50']:.3f}", flush=True)
    return rows


def real_figure(rows, path, shown=("default/auto", "nuclei/auto", "nuclei/true_diameter", "watershed/tuned")):
    """XY (middle plane) and XZ (middle row) sections of each crop: the truth's outlines, then each of `shown`'s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("truth",) + tuple(shown)
    fig, axes = plt.subplots(2 * len(rows), len(columns), figsize=(4 * len(columns), 8.5 * len(rows)), squeeze=False)
    for r, (row, image, gt) in enumerate(rows):
        vs = row["voxel_size"]
        for k, (section, aspect) in enumerate((((image.shape[0] // 2, slice(None), slice(None)), 1.0),
                                               ((slice(None), image.shape[1] // 2, slice(None)), vs[0] / vs[2]))):
            for c, name in enumerate(columns):
                ax = axes[2 * r + k, c]
                labels = gt if name == "truth" else row["labels"][name]
                ax.imshow(image[section], cmap="gray", aspect=aspect, interpolation="nearest")
                edge = segmentation.find_boundaries(labels[section], mode="inner")
                ax.imshow(np.ma.masked_where(~edge, edge), cmap="autumn", aspect=aspect, interpolation="nearest")
                if name == "truth":
                    title = f"{row['crop']} {'XY' if k == 0 else 'XZ'}: truth ({row['n_gt']})"
                else:
                    res = row["results"][name]
                    title = f"{name}: {res['n_pred']} inst., Dice {res['dice']:.2f}, AP50 {res['ap50']:.2f}"
                ax.set_title(title, fontsize=9)
                ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def real_markdown(report):
    lines = ["# Real annotated nuclei crops", "", f"`{report['command']}`", "", _machine_line(report["machine"]), "",
             "Two real confocal crops of *Arabidopsis* ovule nuclei with expert labels (GoNuclear, "
             "`../shared/data/real-nuclei/`, validation only: never in any bundled model's training data). Each crop "
             "segmented by `cp3d.segment(image, model, diameter=..., voxel_size=...)` with the voxel size of the "
             f"file; *default*: `model=None`, what `cp3d segment` uses without `--model` "
             f"(`{report.get('default_model', 'tanh')}`: the bundled model whose flows agree best with the instances "
             "it makes, chosen per crop between the tanh and nuclei models; the chosen one in brackets); *auto*: "
             "`diameter=\"auto\"`; *true d*: the truth's median equivalent-sphere diameter (voxels along x). "
             "The watershed is `nuclei_watershed` on the crop resampled to isotropic voxels, its parameters tuned "
             "by a grid search on the crop's own truth (a reference that saw the answer).", ""]
    g = report["goal"]
    for row in report["crops"]:
        lines += [f"**{row['crop']}**: {row['n_gt']} nuclei, true diameter {row['true_diameter']:.1f} voxels along x "
                  f"(the median of all; {row['n_cut']} nuclei are cut by the crop's faces, the median of the "
                  f"{row['n_gt'] - row['n_cut']} whole ones is {row['uncut_diameter']:.1f}), voxel size "
                  f"{' x '.join(format(v, '.3f') for v in row['voxel_size'])}", "",
                  "| model | diameter | d used | Dice | AP@0.5 | AP@0.75 | instances / truth | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, res in row["results"].items():
            method, setting = key.split("/")
            if method == "default" and res.get("model"):
                method = f"default ({res['model']})"
            lines.append(f"| {method} | {SETTING_LABELS.get(setting, setting)} | {res['diameter']:.1f} | "
                         f"{res['dice']:.3f} | {res['ap50']:.3f} | {res['ap75']:.3f} | {res['n_pred']} / "
                         f"{res['n_gt']} | {res['seconds']:.1f} |")
        lines.append("")
    lines += [f"Goals (default model, auto diameter, each crop): AP@0.5 >= {g['ap50']}, Dice >= {g['dice']}, "
              f"instances within {g['count']:.0%} of the truth, auto diameter within 15 % of the true one (of all "
              "nuclei, and of the whole ones).", "",
              "| crop | Dice | AP@0.5 | instances | auto d / true d (whole nuclei) | met |", "|---|---|---|---|---|---|"]
    for m in g["crops"]:
        lines.append(f"| {m['crop']} | {m['dice']:.3f} | {m['ap50']:.3f} | {m['n_pred']} / {m['n_gt']} | "
                     f"{m['diameter']:.1f} / {m['true_diameter']:.1f} ({m['uncut_diameter']:.1f}) | "
                     f"{', '.join(k for k, v in m['met'].items() if v) or 'none'} |")
    lines += ["", "![sections](real_sections.png)", "",
              "**Where the errors come from** (true diameter; *its*: the model's prediction, *true*: from the "
              "truth, flows as tanh at the model's scale; *AdaBN*: batch-norm statistics re-estimated on the crop "
              "before predicting). The last columns: the share of the truth's foreground the model calls foreground "
              "(probability > 0.5), and of the truth's background.", "",
              "| model | crop | case | Dice | AP@0.5 | AP@0.75 | instances / truth | fg recall | bg called fg |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, crops in report["ablation"].items():
        for crop in crops:
            for case, sc in crop["cases"].items():
                lines.append(f"| {name} | {crop['crop']} | {case} | {sc['dice']:.3f} | {sc['ap50']:.3f} | "
                             f"{sc['ap75']:.3f} | {sc['n_pred']} / {sc['n_gt']} | {crop['foreground_recall']:.3f} | "
                             f"{crop['background_called_foreground']:.3f} |")
    cnr = ", ".join(f"{c['crop']} {c['contrast_to_noise']:.2f}" for c in report["ablation"]["nuclei"])
    synth = ", ".join(f"noise {r['noise']:g}{' textured' if r['texture'] else ''} {r['contrast_to_noise']:.2f}"
                      for r in report["synthetic_contrast_to_noise"])
    lines += ["", f"**Contrast-to-noise on the network's grid** ((mean inside the nuclei - mean of the background) / "
              f"the background's standard deviation, normalised and rescaled as `predict` does): real crops {cnr}; "
              f"synthetic nuclei (background 0.1, training noise 0.02-0.2) {synth}."]
    lines += ["", "**What the wrong instances are** (the model as it is, true diameter): instances mostly in the truth's "
              "background, true nuclei split (two or more instances over 10 % each), true nuclei missed (no instance "
              "over half).", "", "| model | crop | instances / truth | in the background | nuclei split | nuclei missed |",
              "|---|---|---|---|---|---|"]
    for name, crops in report["ablation"].items():
        for crop in crops:
            e = crop["errors"]
            lines.append(f"| {name} | {crop['crop']} | {e['instances']} / {e['nuclei']} | {e['in_background']} | "
                         f"{e['split']} | {e['missed']} |")
    b = report["background_ablation"]
    models = list(dict.fromkeys(r["model"] for r in b["rows"]))
    lines += ["", f"**The same models on synthetic nuclei as the background brightens** ({len(b['config']['seeds'])} "
              f"stacks of {'x'.join(map(str, b['config']['shape']))} per level, d {b['config']['diameter']:g}, noise "
              f"{b['config']['noise']}, texture {b['config']['texture']}; one pass, true diameter; background: haze "
              "around nuclei of brightness ~1; density 0.6 fills about half the stack with nuclei, 0.2 a fifth, as in "
              "the real crops). Dice / AP@0.5:", "",
              "| density | background grain | background | " + " | ".join(models) + " |",
              "|---|---|---|" + "---|" * len(models)]
    for setting, level in itertools.product(b["config"]["settings"], b["config"]["levels"]):
        cells = [f"{r['dice']:.3f} / {r['ap50']:.3f}" for r in b["rows"] if r["background"] == level
                 and all(r[k] == v for k, v in setting.items())]
        lines.append(f"| {setting['density']:g} | {setting['background_grain']:g} | {level:g} | " + " | ".join(cells)
                     + " |")
    lines += ["", "**The clipping of the ablation on held-out synthetic nuclei** (nuclei model, `--nuclei`'s varied "
              "set, true diameter, test-time augmentation): AP@0.5 / Dice as they are and clipped below the "
              "background level:", "", "| seed | d | as is | clipped |", "|---|---|---|---|"]
    for r in report["clipping_on_synthetic"]:
        lines.append(f"| {r['seed']} | {r['diameter']:.1f} | {r['plain']['ap50']:.3f} / {r['plain']['dice']:.3f} | "
                     f"{r['clipped']['ap50']:.3f} / {r['clipped']['dice']:.3f} |")
    lines.append("")
    return _markdown_with_notes(lines, report)


def run_real(a, argv):
    torch.set_num_threads(a.threads)
    data = Path(a.real_data)
    crops = [data / name for name in REAL_CROPS]
    missing = [str(c) for c in crops if not c.is_file()]
    if missing:
        sys.exit(f"bench_segment.py --real: missing {', '.join(missing)} (give the folder with --real-data)")
    machine = machine_info()
    t_start = time.perf_counter()
    sources = {name: name for name in REAL_MODELS} | {Path(c).name: c for c in a.candidate}
    # the default is what `cp3d segment` does without --model: it chooses between the stain models per crop
    models = {"default": DEFAULT_MODEL} | {k: load_model(v) for k, v in sources.items()}
    segment(synthetic_stack((24, 48, 48), 8.0, kind="nuclei", seed=99)[0], models["nuclei"], augment=False)
    grid = NUCLEI_WATERSHED_GRID_QUICK if a.quick else NUCLEI_WATERSHED_GRID
    rows = real_bench(crops, models, grid)
    goal_rows = []
    for row, _, _ in rows:
        res = row["results"][f"{REAL_GOAL['method']}/{REAL_GOAL['setting']}"]
        met = {"dice": res["dice"] >= REAL_GOAL["dice"], "ap50": res["ap50"] >= REAL_GOAL["ap50"],
               "count": abs(res["n_pred"] / res["n_gt"] - 1) <= REAL_GOAL["count"],
               "diameter": abs(res["diameter"] / row["true_diameter"] - 1) <= 0.15,
               "diameter of the uncut nuclei": abs(res["diameter"] / row["uncut_diameter"] - 1) <= 0.15}
        goal_rows.append({"crop": row["crop"], "dice": res["dice"], "ap50": res["ap50"], "n_pred": res["n_pred"],
                          "n_gt": res["n_gt"], "diameter": res["diameter"], "true_diameter": row["true_diameter"],
                          "uncut_diameter": row["uncut_diameter"],
                          "met": met})
    ablation = {name: [real_ablation(path, models[name]) for path in crops]
                for name in ("tanh", "nuclei", *(Path(c).name for c in a.candidate))}
    background = background_ablation({name: models[name] for name in ablation})
    out = Path(a.out) if a.out else RESULTS / "segment_real.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    real_figure(rows, out.with_name("real_sections.png"))
    report = {
        "command": " ".join(["python", "bench/bench_segment.py"] + [shlex.quote(x) for x in argv]),
        "machine": machine, "wall_seconds": time.perf_counter() - t_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "default_model": DEFAULT_MODEL,
        "models": {k: model_info(models[k], v) for k, v in sources.items()},
        "goal": dict(REAL_GOAL, crops=goal_rows),
        "crops": [{k: v for k, v in row.items() if k != "labels"} for row, _, _ in rows],
        "ablation": ablation,
        "background_ablation": background,
        "synthetic_contrast_to_noise": synthetic_contrast_to_noise(models["nuclei"].config.train_diameter),
        "clipping_on_synthetic": clipping_on_synthetic(models["nuclei"], dict(NUCLEI_SETS["varied"], **(
            NUCLEI_QUICK["varied"] if a.quick else {}))),
        "notes": list(a.note),
    }
    _write_report(report, out, real_markdown)


# --choice: the default model's choice per stack, on held-out stacks of both stains that no bundled model saw
CHOICE_MEMBRANE_SETS = {"standard": 2, "varied": 3, "new_kind": 1, "phantom": 1, "phantom_hard": 1, "phantom_dim": 1,
                        "phantom_aniso": 1}
CHOICE_NUCLEI_SETS = {"varied": 4, "plain": 1, "large": 1}
CHOICE_SETTINGS = ("auto", "true_diameter", "default")


def choice_stacks(quick, real_data):
    """(set, stain, image, labels, voxel_size) of the held-out stacks --choice segments."""
    for name in REAL_CROPS[:1] if quick else REAL_CROPS:
        image, gt, voxel_size = read_real_crop(Path(real_data) / name)
        yield f"real {name}", "nuclei", image, gt, voxel_size
    for name, n in CHOICE_NUCLEI_SETS.items():
        config = dict(NUCLEI_SETS[name], **(NUCLEI_QUICK[name] if quick else {}))
        config["stacks"] = 1 if quick else n
        for spec in nuclei_specs(name, config):
            yield f"nuclei {name} d {spec['diameter']:g}", "nuclei", *nuclei_stack(spec), (1.0, 1.0, 1.0)
    for name, n in CHOICE_MEMBRANE_SETS.items():
        for _, image, gt in itertools.islice(generalise_stacks(name, quick), 1 if quick else n):
            yield f"membrane {name}", "membrane", image, gt, GENERALISE_SETS[name].get("voxel_size", (1.0, 1.0, 1.0))


def choice_bench(quick, real_data):
    """Each stack segmented by the default (model="auto") and by each stain model alone, no augmentation."""
    from cp3d.filters import mean_flow_error
    from cp3d.model import STAIN_MODELS
    from cp3d.segment import cell_extent, model_tanh_scale

    stain_of = {"tanh": "membrane", "nuclei": "nuclei"}
    models = {name: load_model(name) for name in STAIN_MODELS}
    rows = []
    for set_name, stain, image, gt, voxel_size in choice_stacks(quick, real_data):
        d_true = true_diameter(gt, voxel_size)
        row = {"set": set_name, "stain": stain, "shape": list(image.shape), "true_diameter": d_true, "results": {}}
        for setting in CHOICE_SETTINGS:
            diameter = {"auto": "auto", "true_diameter": d_true, "default": None}[setting]
            for method, model in {"default": DEFAULT_MODEL, **{name: name for name in models}}.items():
                start = time.perf_counter()
                result = segment(image, model, diameter=diameter, voxel_size=voxel_size, augment=False)
                seconds = time.perf_counter() - start
                config = models[result.model].config
                scale = model_tanh_scale(config, cell_extent(result.diameter, voxel_size, config.train_diameter))
                error = mean_flow_error(result.labels, result.flows, tanh_scale=scale)
                row["results"][f"{method}/{setting}"] = dict(
                    _scores(gt, result.labels), model=result.model, diameter=result.diameter, seconds=seconds,
                    mean_flow_error=None if np.isnan(error) else error)
            chosen = row["results"][f"default/{setting}"]["model"]
            row[f"right/{setting}"] = stain_of[chosen] == stain
            print(f"  {set_name} ({stain}) {setting}: chose {chosen} "
                  + " ".join(f"{m} ap50 {row['results'][f'{m}/{setting}']['ap50']:.3f}" for m in models), flush=True)
        rows.append(row)
    summary = {setting: {"right": sum(r[f"right/{setting}"] for r in rows), "stacks": len(rows),
                         "seconds_default": sum(r["results"][f"default/{setting}"]["seconds"] for r in rows),
                         "seconds_chosen_alone": sum(r["results"][f"{r['results'][f'default/{setting}']['model']}/"
                                                               f"{setting}"]["seconds"] for r in rows)}
               for setting in CHOICE_SETTINGS}
    return summary, rows


def choice_markdown(report):
    lines = ["# The default model's choice of stain", "", f"`{report['command']}`", "",
             _machine_line(report["machine"]), "", "`cp3d.segment(image)` with no model (`model=\"auto\"`, what `cp3d segment` does without "
             "`--model`) lets the bundled tanh (membrane) and nuclei models each segment the stack without "
             "augmentation and keeps the one whose flows agree best with the instances it made: the lower "
             "`cp3d.filters.mean_flow_error` (the paper's flow-error filter over all instances) of its trial. Here "
             "each held-out stack, of both stains, is segmented by the default and by each model alone (no "
             "augmentation); *auto*: `diameter=\"auto\"` (the trials are each model's estimating passes), *true d*: "
             "the truth's median diameter, *default*: no diameter (the training size; the choice is made from the "
             "estimating passes as with `\"auto\"`). The flow error shown is that of each run's result (the "
             "choice compares the trials, the last estimating passes). No stack here was in any bundled model's training data.", ""]
    for setting, sm in report["summary"].items():
        lines.append(f"- {SETTING_LABELS.get(setting, setting)}: the right model for {sm['right']} of "
                     f"{sm['stacks']} stacks; {sm['seconds_default']:.0f} s for the default against "
                     f"{sm['seconds_chosen_alone']:.0f} s for the chosen model alone "
                     f"({sm['seconds_default'] / max(sm['seconds_chosen_alone'], 1e-9):.1f}x, no augmentation)")
    lines += ["", "| stack | stain | true d | diameter | chosen | default Dice / AP@0.5 | tanh: error, Dice / AP@0.5 | "
              "nuclei: error, Dice / AP@0.5 |", "|---|---|---|---|---|---|---|---|"]

    def cell(res):
        error = "-" if res["mean_flow_error"] is None else f"{res['mean_flow_error']:.3f}"
        return f"{error}, {res['dice']:.3f} / {res['ap50']:.3f} (d {res['diameter']:.1f}, {res['n_pred']} inst.)"

    for row in report["stacks"]:
        for setting in CHOICE_SETTINGS:
            res = row["results"]
            default = res[f"default/{setting}"]
            mark = "" if row[f"right/{setting}"] else " **(wrong)**"
            lines.append(f"| {row['set']} | {row['stain']} | {row['true_diameter']:.1f} | "
                         f"{SETTING_LABELS.get(setting, setting)} | {default['model']}{mark} | {default['dice']:.3f} / "
                         f"{default['ap50']:.3f} | {cell(res[f'tanh/{setting}'])} | {cell(res[f'nuclei/{setting}'])} |")
    lines.append("")
    return _markdown_with_notes(lines, report)


def run_choice(a, argv):
    torch.set_num_threads(a.threads)
    segment(synthetic_stack((24, 48, 48), 8.0, kind="nuclei", seed=99)[0], augment=False)  # compile the kernels
    t_start = time.perf_counter()
    machine = machine_info()
    summary, rows = choice_bench(a.quick, a.real_data)
    report = {
        "command": " ".join(["python", "bench/bench_segment.py"] + [shlex.quote(x) for x in argv]),
        "machine": machine, "wall_seconds": time.perf_counter() - t_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "config": {"membrane_sets": CHOICE_MEMBRANE_SETS, "nuclei_sets": CHOICE_NUCLEI_SETS, "quick": a.quick},
        "summary": summary, "stacks": rows, "notes": list(a.note),
    }
    _write_report(report, Path(a.out) if a.out else RESULTS / ("segment_choice_quick.json" if a.quick
                                                               else "segment_choice.json"), choice_markdown)


def model_info(model, source):
    c = model.config
    card = Path(source, "model_card.json") if Path(source).is_dir() else None
    info = {"source": str(source), "targets": c.targets, "train_diameter": c.train_diameter,
            "tanh_scale": c.tanh_scale}
    if card is not None and card.is_file():
        data = json.loads(card.read_text())
        info.update(steps=data.get("steps"), validation=data.get("validation"), command=data.get("command"))
    return info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tanh-model", default="tanh", help="bundled model name or model directory")
    p.add_argument("--heat-model", default="heat", help="bundled model name or model directory")
    p.add_argument("--nuclei-model", default="nuclei", help="bundled model name or model directory (--nuclei)")
    p.add_argument("--stacks", type=int, default=None, help="number of test stacks (default 6; 2 with --quick)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="test stack shape (default 64 128 128; 32 64 64 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/segment.json, "
                                               "segment_quick.json with --quick); the .md goes beside it")
    p.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    p.add_argument("--auto", action="store_true", help="only diameter='auto' beside the true diameter "
                                                       "(bench/results/segment_auto.json)")
    p.add_argument("--finetune", action="store_true", help="only fine-tuning on three stacks of a new kind against "
                                                           "the bundled model (bench/results/segment_finetune.json)")
    p.add_argument("--finetune-kind", choices=sorted(FINETUNE_KINDS), default="new_kind",
                   help="what --finetune trains and tests on: new_kind (cp3d.data's renderer outside its training "
                        "ranges) or phantom_hard (the second renderer's small blurred cells; "
                        "bench/results/segment_finetune_phantom_hard.json)")
    p.add_argument("--nuclei", action="store_true", help="only the nuclei model, the membrane model and a nuclei "
                                                         "watershed on held-out synthetic nuclei "
                                                         "(bench/results/segment_nuclei.json)")
    p.add_argument("--generalise", action="store_true", help="only the bundled membrane model (--base-model) against "
                                                             "--tanh-model on the standard, noise-above, new-kind, "
                                                             "varied, beyond and phantom sets "
                                                             "(bench/results/segment_generalise.json)")
    p.add_argument("--base-model", default="tanh", help="the model --generalise compares --tanh-model with")
    p.add_argument("--real", action="store_true", help="only the real annotated nuclei crops: the default model and "
                                                       "every bundled model beside a watershed tuned on the answer "
                                                       "(bench/results/segment_real.json, real_sections.png)")
    p.add_argument("--choice", action="store_true", help="only the default model's choice of stain (model='auto') "
                                                         "on real nuclei, nuclei and membrane phantoms "
                                                         "(bench/results/segment_choice.json)")
    p.add_argument("--real-data", default=str(REAL_DATA), help="folder of the real crops (default ../shared/data/"
                                                                "real-nuclei beside the repository)")
    p.add_argument("--candidate", action="append", default=[], help="--real: a trained model folder to score too "
                                                                    "(repeatable)")
    a = p.parse_args(argv)
    if a.choice:
        return run_choice(a, argv)
    if a.real:
        return run_real(a, argv)
    if a.generalise:
        return run_generalise(a, argv)
    if a.nuclei:
        return run_nuclei(a, argv)
    if a.auto:
        return run_auto(a, argv)
    if a.finetune:
        return run_finetune(a, argv)
    n_stacks = a.stacks if a.stacks is not None else (2 if a.quick else 6)
    shape = tuple(a.shape) if a.shape is not None else ((32, 64, 64) if a.quick else (64, 128, 128))
    out = Path(a.out) if a.out else RESULTS / ("segment_quick.json" if a.quick else "segment.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    command = " ".join(["python", "bench/bench_segment.py"] + [shlex.quote(x) for x in argv])
    machine = machine_info()
    t_start = time.perf_counter()

    models = {"tanh": load_model(a.tanh_model), "heat": load_model(a.heat_model)}
    sources = {"tanh": a.tanh_model, "heat": a.heat_model}
    assumed = models["tanh"].config.train_diameter
    if models["heat"].config.train_diameter != assumed:
        print(f"warning: the models assume different cell sizes ({assumed}, "
              f"{models['heat'].config.train_diameter})", flush=True)

    print("tuning the watershed on one training-like stack", flush=True)
    tuning = tune_watershed(shape, WATERSHED_GRID_QUICK if a.quick else WATERSHED_GRID)
    ws_params = tuning["best"]["params"]
    ws_params = dict(ws_params, markers=tuple(ws_params["markers"]))
    print(f"watershed parameters: {ws_params}", flush=True)
    warm_up(models, ws_params)

    per_stack = score_stacks(test_stacks(n_stacks, shape), SETTINGS, models, ws_params, assumed)
    print(f"second held-out set, noise {UNSEEN['noise']} (above the training range)", flush=True)
    unseen_stacks = score_stacks(test_stacks(n_stacks, shape, **UNSEEN), UNSEEN_SETTINGS, models, ws_params, assumed)

    timing_spec = dict(TIMING_QUICK if a.quick else TIMING)
    timing_spec["shape"] = list(timing_spec["shape"])
    print(f"timing the stages on one {timing_spec['shape']} stack", flush=True)
    timing = [time_stages(models["tanh"], timing_spec, augment) for augment in (True, False)]
    print(f"  {[t['best'] for t in timing]}", flush=True)

    summary = summarise(per_stack)
    main_row = summary[f"{GOAL['method']}/{GOAL['setting']}"]
    goal = dict(GOAL, measured_dice=main_row["dice"], measured_ap50=main_row["ap50"],
                met=bool(main_row["dice"] >= GOAL["dice"] and main_row["ap50"] >= GOAL["ap50"]))
    report = {
        "command": command,
        "machine": machine,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": time.perf_counter() - t_start,
        "config": {"quick": a.quick, "stacks": n_stacks, "shape": list(shape), "test_seed": TEST_SEED,
                   "test_diameters": list(TEST_DIAMETERS), "test_noise": list(TEST_NOISE),
                   "training_data": "diameters U(7, 15), noise U(0.02, 0.2), stack seeds < 10,000",
                   "watershed_default_diameter": assumed},
        "models": {k: model_info(models[k], sources[k]) for k in models},
        "settings": {k: list(v) for k, v in SETTINGS.items()},
        "summary": summary,
        "goal": goal,
        "unseen_noise": {"config": dict(UNSEEN, noise=list(UNSEEN["noise"])),
                         "summary": summarise(unseen_stacks, UNSEEN_SETTINGS), "stacks": unseen_stacks},
        "timing": timing,
        "watershed_tuning": tuning,
        "stacks": per_stack,
        "notes": list(a.note),
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown(report))
    print(md.read_text())
    print(f"wrote {out} and {md}")


def _write_report(report, out, markdown_of):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown_of(report))
    print(md.read_text())
    print(f"wrote {out} and {md}")


def run_auto(a, argv):
    torch.set_num_threads(a.threads)
    model = load_model(a.tanh_model)
    segment(synthetic_stack((24, 48, 48), 8.0, seed=99)[0], model, augment=False)  # compile the kernels
    t_start = time.perf_counter()
    n_stacks = a.stacks if a.stacks is not None else (1 if a.quick else AUTO["stacks"])
    diameters = AUTO["diameters"][:2] if a.quick else AUTO["diameters"]
    machine = machine_info()
    new_kind_seeds = FINETUNE["test_seeds"][:1] if a.quick else FINETUNE["test_seeds"]
    summary, rows = auto_diameter_bench(model, n_stacks, diameters, new_kind_seeds)
    report = {
        "command": " ".join(["python", "bench/bench_segment.py"] + [shlex.quote(x) for x in argv]),
        "machine": machine, "wall_seconds": time.perf_counter() - t_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "config": dict(AUTO, stacks=n_stacks, diameters=list(diameters), goal_dice_loss=AUTO_GOAL),
        "model": model_info(model, a.tanh_model), "summary": summary, "stacks": rows, "notes": list(a.note),
    }
    _write_report(report, Path(a.out) if a.out else RESULTS / ("segment_auto_quick.json" if a.quick
                                                               else "segment_auto.json"), auto_markdown)


if __name__ == "__main__":
    main()
