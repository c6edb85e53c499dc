"""What a benchmark JSON records about the machine it ran on."""

import datetime
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numba

HERE = Path(__file__).resolve().parent


def package_version(package):
    """Installed version of `package`, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def gpu_name():
    """Name of the first NVIDIA GPU, or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(packages=("numpy", "numba", "scipy", "torch"), **extra):
    """Platform, CPUs, threads, GPU, load, commit, date and package versions."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        layer = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": layer,
        "gpu": gpu_name(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
        "versions": {"python": platform.python_version(), "cp3d": package_version("cp3d"),
                     **{p: package_version(p) for p in packages}},
    }


# A process started by exec inherits, as its ru_maxrss, the resident size of
# the process it replaced: a child forked from a (large) benchmark would
# start with the benchmark's peak. A small Python launcher in between gives
# the measured process a fresh, small baseline.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def run_fresh_python(args):
    """Run ``python *args`` in a fresh process whose ``ru_maxrss`` starts from its own size."""
    return subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, *args], capture_output=True, text=True)


def max_rss_bytes():
    """This process's peak resident size so far, in bytes."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def best_seconds(call, repeat):
    """The fastest of `repeat` timed calls, after one untimed warm-up (Numba compiles or loads its cache)."""
    call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)
