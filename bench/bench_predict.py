"""Benchmark network inference: the trained network against its inference copy.

Side by side in one run, on the same random input and the bundled tanh model:

1. ``trained``: the network as loaded (batch norm layers, contiguous NCDHW);
2. ``inference``: :meth:`cp3d.model.UNet3D.for_inference`, batch norm folded into
   the convolutions and, on the CPU, channels-last (NDHWC) tensors.

Each forward pass is repeated, interleaved between the two, and the best time
kept; the largest difference between their raw outputs is recorded. The
peak extra resident memory of one CPU forward pass of each is measured in a
fresh process (``--memory-shape``, default the 2**23-voxel CPU tile). Then
:func:`cp3d.predict` (which uses the inference copy) is timed on a synthetic
membrane stack, with one network pass and with test-time augmentation.

Usage::

    python bench/bench_predict.py                      # 64 x 256 x 256, 2 torch threads
    python bench/bench_predict.py --shape 32 128 128 --repeat 1

Writes ``bench/results/predict.json`` (``predict_<device>.json`` on a GPU).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import _machine
from cp3d.data import synthetic_stack
from cp3d.model import load_model, predict
from cp3d.model.predict import resolve_device

RESULTS = Path(__file__).resolve().parent / "results"


def best_seconds(run, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def compare_forward(model, device, shape, repeat):
    """Best seconds of one forward pass of each network, and their largest output difference."""
    inference = model.for_inference(device)
    trained = model.to(device)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    x_inference = x.contiguous(memory_format=model.memory_format(device))
    seconds = {"trained": float("inf"), "inference": float("inf")}
    with torch.inference_mode():
        difference = float((trained(x) - inference(x_inference)).abs().max())
        for _ in range(repeat):  # interleaved, so a load spike hits both
            seconds["trained"] = min(seconds["trained"], best_seconds(lambda: trained(x), 1))
            seconds["inference"] = min(seconds["inference"], best_seconds(lambda: inference(x_inference), 1))
    return {"seconds": seconds, "speedup": seconds["trained"] / seconds["inference"],
            "max_abs_difference": difference}


def memory_child(kind, shape, threads):
    """Run in a fresh process: print the peak extra memory of one forward pass of `kind` as JSON."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model = load_model("tanh")
    net, layout = (model, torch.contiguous_format) if kind == "trained" else (
        model.for_inference(device), model.memory_format(device))
    x = torch.zeros(1, 1, *shape).contiguous(memory_format=layout)
    with torch.inference_mode():
        net(torch.zeros(1, 1, 8, 8, 8).contiguous(memory_format=layout))  # load the kernels first
        before = _machine.max_rss_bytes()
        net(x)
    print(json.dumps({"kind": kind, "extra_bytes": _machine.max_rss_bytes() - before}))


def compare_memory(shape, threads):
    """Peak extra resident memory of one CPU forward pass of each network, each in a fresh process."""
    result = {"shape": list(shape), "voxels": int(np.prod(shape))}
    for kind in ("trained", "inference"):
        proc = _machine.run_fresh_python([__file__, "--memory-child", kind, "--shape", *map(str, shape),
                                         "--threads", str(threads)])
        if proc.returncode != 0:
            result[kind] = {"error": proc.stderr.strip()[-2000:]}
            continue
        extra = json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]
        result[kind] = {"extra_bytes": extra, "bytes_per_voxel": extra / result["voxels"]}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory-shape", type=int, nargs=3, default=(128, 256, 256),
                        help="stack for the peak-memory comparison on the CPU (default: the 2**23-voxel CPU tile)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child, tuple(args.shape), args.threads)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = load_model("tanh")
    shape = tuple(args.shape)

    forward = compare_forward(model, device, shape, args.repeat)
    print(json.dumps(forward, indent=1), flush=True)
    memory = compare_memory(tuple(args.memory_shape), args.threads)
    print(json.dumps(memory, indent=1), flush=True)
    image, _ = synthetic_stack(shape, 10.0, kind="membrane", seed=20_000, noise=0.12)
    stages = {}
    for augment in (False, True):
        stages["augment" if augment else "one_pass"] = best_seconds(
            lambda: predict(image, model, device=device, augment=augment), max(1, args.repeat - 1))
    print(json.dumps(stages, indent=1), flush=True)

    result = {
        "machine": _machine.machine_info(("numpy", "torch"), torch_threads=torch.get_num_threads(),
                                         torch_device=str(device)),
        "command": " ".join(["python bench/bench_predict.py", *argv]),
        "shape": list(shape),
        "forward": forward,
        "memory": memory,
        "predict_seconds": stages,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "predict.json" if device.type == "cpu" else f"predict_{device.type}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
