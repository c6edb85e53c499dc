import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # only tests/test_properties.py needs it, and skips without it
    settings = None
if settings is not None:
    # CI: a fixed number of examples, the same ones every run; HYPOTHESIS_PROFILE=long searches further.
    settings.register_profile("ci", max_examples=20, derandomize=True, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("long", max_examples=500, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _has_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def host_library():
    """The per-voxel kernel bodies compiled as host C++ by CMakeLists.txt.

    Missing library: skipped locally, a failure where CP3D_REQUIRE_HOST_KERNELS=1 (CI).
    """
    path = Path(os.environ.get("CP3D_HOST_LIB", REPO / "build" / "libcp3d_host.so"))
    if not path.exists():
        message = f"host build of the kernels not found at {path} (cmake -S . -B build && cmake --build build)"
        if os.environ.get("CP3D_REQUIRE_HOST_KERNELS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return ctypes.CDLL(str(path))


def ptr(array):
    """ctypes pointer to a C-contiguous NumPy array's data."""
    assert array.flags.c_contiguous
    return array.ctypes.data_as(ctypes.c_void_p)


@pytest.fixture(scope="session")
def membrane_cells():
    """A small synthetic membrane tissue: (image, labels)."""
    from cp3d.data import synthetic_stack

    return synthetic_stack((32, 64, 64), 8, seed=11)


def cubes_in_a_row(sides, shape):
    """Labels holding one cube per side length (ids 1, 2, ... in that order), in a row along x, off the faces."""
    labels = np.zeros(shape, np.uint32)
    x = 1
    for i, side in enumerate(sides, start=1):
        labels[1:1 + side, 1:1 + side, x:x + side] = i
        x += side + 1
    return labels


def random_flows(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (3, *shape)).astype(np.float32)


@pytest.fixture
def assert_ctrl_c_interrupts():
    """Run `code` in a child Python; once it prints 'running', send SIGINT after 1 s: it must end by
    KeyboardInterrupt within `within` seconds (a kernel that ignores Ctrl-C runs on for minutes)."""
    import signal
    import subprocess
    import sys
    import time

    def check(code, within=60):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an ignored
        # SIGINT ignored: the child starts from the default disposition, as a program run from a terminal does.
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            assert child.stdout.readline().strip() == "running", child.communicate(timeout=60)[1][-2000:]
            time.sleep(1.0)
            child.send_signal(signal.SIGINT)
            _, err = child.communicate(timeout=within)
        finally:
            child.kill()
        assert "KeyboardInterrupt" in err, err[-2000:]

    return check
