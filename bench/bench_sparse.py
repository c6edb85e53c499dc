"""Benchmark fine-tuning from a few corrected cells (sparse annotations): the gain against the cells corrected.

A user corrects N cells of one stack (and, around them, the background the
model wrongly called cells), trains a few minutes on the CPU and segments
again. This benchmark does it for N = 5, 10, 20, 50 and for the whole stack:

- **synthetic**: from the bundled membrane model (``tanh``), one stack of
  ``bench_segment.py --finetune``'s new kind (walls thicker, blur wider,
  noise higher than the model was trained on; seed 30,000); scored on its
  held-out test stacks (seeds 31,000..) at their true diameter.
  One more run takes the 20 cells without any background, to show what the
  marked background adds.
- **real** (``../shared/data/real-nuclei/``): from the bundled ``nuclei``
  model, N nuclei of one real crop; scored on the other crop, at its true
  diameter and with ``diameter="auto"``. Real crops are validation data: the
  models trained here are never bundled.

A corrected cell is a true cell, drawn at random (nested: the 10 include the
5); "whole stack" is the dense annotation, every cell and all the background.
The background marked with a corrected cell is the true background within half a
cell diameter of the corrected cells (what a user erases around the cells
they fix); every other voxel is unknown to the corrections' loss
(:func:`cp3d.model.train`, ``sparse=True``) and kept near the starting
model's output (``keep_weight``, default 1). Two ablations on the synthetic
case: 5 cells with ``keep_weight=0`` (unknown voxels left out of the loss)
and 20 cells without any background marked. Training goes through
``cp3d.model.train(data=[AnnotatedStack], sparse=True)``: ``--steps`` steps
of batch 2, patches 48^3, learning rate ``--lr``; seconds are wall time on
this machine with ``--threads`` threads.

Usage::

    python bench/bench_sparse.py              # bench/results/sparse_finetune.{json,md}
    python bench/bench_sparse.py --quick      # a smoke run: tiny steps, one test stack
"""

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_segment import (  # noqa: E402  the new kind and the real crops, as the other benchmarks draw them
    FINETUNE, NEW_KIND, REAL_DATA, _machine_line, _scores, _write_report, machine_info, new_kind_stack,
    true_diameter,
)
from cp3d.model import load_model, train  # noqa: E402
from cp3d.model.annotated import AnnotatedStack, read_annotated  # noqa: E402
from cp3d.segment import segment  # noqa: E402

RESULTS = HERE / "results"
CELL_COUNTS = (5, 10, 20, 50)
REAL_CELL_COUNTS = (10, 20)
SELECTION_SEED = 7
BACKGROUND_MARGIN = 0.5  # the background marked around the corrected cells, in cell diameters


def corrected(labels, n, voxel_size=None, *, margin=BACKGROUND_MARGIN, with_background=True, seed=SELECTION_SEED):
    """Sparse annotation of `n` random cells of `labels` and the background near them.

    With ``n=None`` the whole stack is annotated: every cell, all the background.

    Returns
    -------
    sparse : ndarray, uint32
        The chosen cells, 0 elsewhere.
    background : ndarray of bool or None
        True background within `margin` diameters of the chosen cells.
    """
    ids = np.unique(labels[labels > 0])
    chosen = np.random.default_rng(seed).permutation(ids)[:n] if n is not None else ids
    cells = np.isin(labels, chosen)
    sparse = np.where(cells, labels, 0).astype(np.uint32)
    if not with_background:
        return sparse, None
    if n is None:
        return sparse, labels == 0
    vs = np.ones(3) if voxel_size is None else np.asarray(voxel_size, float)
    reach = margin * true_diameter(labels, voxel_size) * vs[2]  # the diameter is in voxels along x
    near = ndimage.distance_transform_edt(~cells, sampling=vs) <= reach
    return sparse, near & (labels == 0)


def fine_tune(name, stack, init, work, a, keep_weight):
    """Fine-tune `init` on one sparse AnnotatedStack; the model, its training seconds and its card."""
    out = Path(work) / name
    t0 = time.perf_counter()
    train(out, data=[stack], sparse=True, init=init, steps=a.steps, lr=a.lr, keep_weight=keep_weight,
          num_threads=a.threads, progress=False, validate_stacks=0, checkpoint_every=0,
          command=f"bench_sparse.py {name}")
    seconds = time.perf_counter() - t0
    return load_model(out), seconds, json.loads((out / "model_card.json").read_text())


def score(model, image, gt, voxel_size, settings):
    out = {}
    for setting in settings:
        d = true_diameter(gt, voxel_size) if setting == "true_diameter" else "auto"
        t0 = time.perf_counter()
        result = segment(image, model, diameter=d, voxel_size=voxel_size)
        out[setting] = _scores(gt, result.labels) | {"diameter": float(result.diameter),
                                                     "seconds": time.perf_counter() - t0}
    return out


def runs_of(counts, labels, ablations, whole):
    """(run name, cells, with_background, keep_weight or None) for every fine-tuning run."""
    runs = [(f"{n} cells", n, True, None) for n in counts] + list(ablations)
    runs += [("whole stack", None, True, None)] if whole else []
    n_cells = len(np.unique(labels)) - 1
    return [r for r in runs if r[1] is None or r[1] < n_cells]


def case(title, base, train_image, train_labels, voxel_size, tests, counts, settings, a, work, ablations=()):
    """One benchmark case: the base model and every fine-tune, scored on `tests` [(name, image, gt, vs)]."""
    print(f"== {title}", flush=True)
    rows = [{"run": "bundled", "cells": 0, "train_seconds": 0.0,
             "scores": {t[0]: score(load_model(base), t[1], t[2], t[3], settings) for t in tests}}]
    print(json.dumps(rows[0]), flush=True)
    for run, n, with_background, keep_weight in runs_of(counts, train_labels, ablations, not a.no_whole):
        keep_weight = a.keep_weight if keep_weight is None else keep_weight
        sparse, background = corrected(train_labels, n, voxel_size, margin=a.margin, with_background=with_background)
        stack = AnnotatedStack(f"{title}: {run}", train_image, sparse, voxel_size, background)
        model, seconds, card = fine_tune(f"{len(rows)}", stack, base, work, a, keep_weight)
        rows.append({"run": run, "cells": int(len(np.unique(sparse)) - 1), "train_seconds": seconds,
                     "keep_weight": keep_weight, "known_fraction": card["data"]["stacks"][0]["known_fraction"],
                     "scores": {t[0]: score(model, t[1], t[2], t[3], settings) for t in tests}})
        print(json.dumps(rows[-1]), flush=True)
    return {"title": title, "base_model": base, "tests": [t[0] for t in tests], "settings": list(settings),
            "rows": rows}


def synthetic_case(a, work):
    image, labels = new_kind_stack(FINETUNE["train_seeds"][0])
    test_seeds = FINETUNE["test_seeds"][: 1 if a.quick else a.test_stacks]
    tests = [(f"seed {s}", *new_kind_stack(s), None) for s in test_seeds]
    counts = CELL_COUNTS[:1] if a.quick else a.counts or CELL_COUNTS
    ablations = () if a.quick or a.counts else (("5 cells, keep_weight 0", 5, True, 0.0),
                                                 ("20 cells, no background", 20, False, None))
    return case("synthetic new kind", "tanh", image, labels, None, tests, counts, ("true_diameter",), a, work,
                ablations)


def real_cases(a, work):
    crops = {p.stem.split("_")[0]: read_annotated(p) for p in sorted(Path(a.real_data).glob("*.h5"))}
    if len(crops) < 2:
        raise SystemExit(f"the real case needs two annotated crops in {a.real_data}")
    names = sorted(crops)[:2]
    counts = REAL_CELL_COUNTS[:1] if a.quick else a.counts or REAL_CELL_COUNTS
    out = []
    for train_name, test_name in (names, names[::-1]):
        tr, te = crops[train_name], crops[test_name]
        out.append(case(f"real nuclei {train_name} -> {test_name}", "nuclei", tr.image, tr.labels, tr.voxel_size,
                        [(test_name, te.image, te.labels, te.voxel_size)], counts, ("true_diameter", "auto"), a,
                        work))
    return out


def markdown(report):
    lines = [
        "# Fine-tuning from a few corrected cells (sparse annotations)",
        "",
        f"`{report['command']}`",
        "",
        _machine_line(report["machine"]),
        "",
        f"Each run: `cp3d.model.train(data=[one sparse stack], sparse=True, init=BASE, steps={report['config']['steps']}, "
        f"lr={report['config']['lr']:g})` with {report['config']['threads']} threads, batch 2, patches 48^3. Corrected "
        f"cells are true cells drawn at random (nested sets); with them, the true background within "
        f"{report['config']['background_margin_diameters']:g} cell diameter of them; every other voxel is unknown to the corrections' loss and, with "
        "`keep` > 0, pulled towards the starting model's output (`keep_weight`). `known` is the share of the training "
        "stack the corrections' loss sees. Scores: `cp3d.segment` defaults (test-time augmentation).",
        "",
    ]
    for c in report["cases"]:
        lines += [f"## {c['title']} (from the bundled `{c['base_model']}` model)", ""]
        head = "| run | cells | known | keep | train s |"
        for t in c["tests"]:
            for s in c["settings"]:
                head += f" {t} {'true d' if s == 'true_diameter' else 'auto d'}: Dice / AP@0.5 / n |"
        lines += [head, "|" + "---|" * (5 + len(c["tests"]) * len(c["settings"]))]
        for r in c["rows"]:
            cells = " |".join(f" {r['scores'][t][s]['dice']:.3f} / {r['scores'][t][s]['ap50']:.3f} / "
                              f"{r['scores'][t][s]['n_pred']} of {r['scores'][t][s]['n_gt']}"
                              for t in c["tests"] for s in c["settings"])
            known = f"{r['known_fraction']:.1%}" if "known_fraction" in r else "-"
            keep = f"{r['keep_weight']:g}" if "keep_weight" in r else "-"
            lines.append(f"| {r['run']} | {r['cells']} | {known} | {keep} | {r['train_seconds']:.0f} | {cells} |")
        if len(c["tests"]) > 1:
            lines += ["", "Mean over the test stacks (true d): " + "; ".join(
                f"{r['run']} {np.mean([r['scores'][t]['true_diameter']['ap50'] for t in c['tests']]):.3f} AP@0.5"
                for r in c["rows"])]
        lines.append("")
    if report.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--keep-weight", type=float, default=1.0, help="cp3d.model.train's keep_weight (default 1)")
    p.add_argument("--counts", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                   help="corrected cells (default 5,10,20,50 synthetic, 10,20 real)")
    p.add_argument("--no-whole", action="store_true", help="leave out the whole-stack run")
    p.add_argument("--margin", type=float, default=BACKGROUND_MARGIN,
                   help="background marked around the corrected cells, in cell diameters (default 0.5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--test-stacks", type=int, default=2, help="held-out synthetic stacks scored (of 4)")
    p.add_argument("--only", choices=("synthetic", "real"), default=None)
    p.add_argument("--real-data", default=str(REAL_DATA))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--note", action="append", default=[])
    a = p.parse_args(argv)
    if a.quick:
        a.steps = min(a.steps, 4)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    machine = machine_info()
    cases = []
    with tempfile.TemporaryDirectory(prefix="cp3d-sparse-") as work:
        if a.only in (None, "synthetic"):
            cases.append(synthetic_case(a, work))
        if a.only in (None, "real"):
            cases += real_cases(a, work)
    report = {"command": " ".join(["python", "bench/bench_sparse.py"] + [shlex.quote(x) for x in argv]),
              "machine": machine, "wall_seconds": time.perf_counter() - t0,
              "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "config": {"steps": a.steps, "lr": a.lr, "keep_weight": a.keep_weight, "threads": a.threads, "cell_counts": CELL_COUNTS,
                         "real_cell_counts": REAL_CELL_COUNTS, "selection_seed": SELECTION_SEED,
                         "background_margin_diameters": a.margin, "new_kind": NEW_KIND},
              "cases": cases, "notes": list(a.note)}
    name = "sparse_finetune" + ("_quick" if a.quick else "") + (f"_{a.only}" if a.only else "")
    _write_report(report, Path(a.out) if a.out else RESULTS / f"{name}.json", markdown)


if __name__ == "__main__":
    main()
