"""The shared validators and backend helpers of cp3d._backend."""

import math
import subprocess
import sys

import numpy as np
import pytest

from cp3d import _backend
from cp3d._backend import (MAX_ITER, as_finite_float32, as_int_triple, as_triple, check_bool, check_int, check_memory,
                           check_scalar, check_size_range, check_step)


@pytest.mark.parametrize("value, error", [
    ("4", TypeError), (None, TypeError), (True, TypeError), ((1, 2), TypeError), (math.nan, ValueError),
    (-1.0, ValueError), (11, ValueError), (10**400, ValueError),
])
def test_check_scalar(value, error):
    assert check_scalar(np.float32(2.5), "x", 0, 10) == 2.5 and check_scalar(np.array(3), "x", 0, 10) == 3.0
    with pytest.raises(error, match="^x must be a number"):
        check_scalar(value, "x", 0, 10)


@pytest.mark.parametrize("value, error", [
    (5.0, TypeError), (math.nan, TypeError), (math.inf, TypeError), ("5", TypeError), (False, TypeError),
    (-1, ValueError), (MAX_ITER + 1, ValueError), (2**63, ValueError),
])
def test_check_int(value, error):
    assert check_int(np.int64(7), "n_iter", 0, MAX_ITER) == 7
    with pytest.raises(error, match="^n_iter must be an integer"):
        check_int(value, "n_iter", 0, MAX_ITER)


def test_check_step_holds_the_kernels_float32_range():
    assert check_step(3.4e38, 0) == (3.4e38, 0)
    for step in (3.5e38, 1e-50, 0, -1, math.inf):
        with pytest.raises(ValueError, match="^step"):
            check_step(step, 10)


@pytest.mark.parametrize("value, error, match", [
    ("abc", TypeError, "triple"), ((1, 2), ValueError, "2 values"), ((1, 2, 3, 4), ValueError, "4 values"),
    ((1, "2", 3), TypeError, "triple"), (1e-320, ValueError, "positive"), (0, ValueError, "positive"),
    ((1, math.inf, 1), ValueError, "positive"), (None, TypeError, "triple"), (True, TypeError, "triple"),
])
def test_as_triple(value, error, match):
    assert as_triple(2, "v") == (2.0, 2.0, 2.0) and as_triple(np.array([1, 2, 3]), "v") == (1.0, 2.0, 3.0)
    assert as_triple(0, "r", allow_zero=True) == (0.0, 0.0, 0.0)
    with pytest.raises(error, match=f"^v .*{match}"):
        as_triple(value, "v")


def test_as_int_triple():
    assert as_int_triple(np.int64(3), "t") == (3, 3, 3) and as_int_triple([0, 1, 2], "t", allow_zero=True) == (0, 1, 2)
    for value, error in (((8, 8), ValueError), (2.0, TypeError), ((1, 1, 0), ValueError), ("64", TypeError)):
        with pytest.raises(error, match="^t must be a positive integer"):
            as_int_triple(value, "t")


def test_check_size_range_and_bool():
    assert check_size_range((1, math.inf), "r") == (1.0, math.inf)
    for value, error in (((5,), ValueError), ((1, 2, 3), ValueError), ((5, 1), ValueError), (("a", 2), TypeError),
                         (5, TypeError), ((math.nan, 1), ValueError), ((math.inf, math.inf), ValueError)):
        with pytest.raises(error, match="^r"):
            check_size_range(value, "r")
    assert check_bool(np.bool_(True), "inward") is True
    with pytest.raises(TypeError, match="inward must be True or False"):
        check_bool("no", "inward")


def test_memory_messages_name_what_and_how_much(monkeypatch):
    monkeypatch.setattr(_backend, "physical_memory", lambda: 2**30)
    check_memory(2**29, "fine")
    with pytest.raises(ValueError, match=r"^diameter=0.1 needs 5.6 PiB, more than this machine's memory \(1.0 GiB\)"):
        check_memory(5.6 * 2**50, "diameter=0.1")
    with pytest.raises(ValueError, match="needs inf bytes"):
        check_memory(math.inf, "x")
    with pytest.raises(ValueError, match="needs 1e\\+300 bytes"):
        check_memory(10**300, "x")  # an int beyond float64 is still reported


def test_finite_float32_tells_overflow_from_nan():
    with pytest.raises(ValueError, match="beyond the float32 range"):
        as_finite_float32(np.array([1e300]), "flows")
    with pytest.raises(ValueError, match="NaN or inf"):
        as_finite_float32(np.array([np.nan, 1e300]), "flows")
    out = as_finite_float32(np.asfortranarray(np.ones((2, 3))), "flows")
    assert out.dtype == np.float32 and out.flags.c_contiguous


CALLS = {
    "reconstruct": "cp3d.reconstruct(cp3d.tanh_flows(truth, backend='numpy'), truth > 0)",
    "follow_flows": "cp3d.follow_flows(cp3d.tanh_flows(truth, backend='numpy'), truth > 0)",
    "close_and_label": "cp3d.close_and_label(truth > 0, 2)",
    "filter_instances": "cp3d.filter_instances(truth, cp3d.tanh_flows(truth, backend='numpy'), truth > 0)",
    "tanh_flows": "cp3d.tanh_flows(truth)",
    "heat_flows": "cp3d.heat_flows(truth)",
    "cell_table": "cp3d.cell_table(truth)",
}


@pytest.mark.parametrize("call", CALLS.values(), ids=list(CALLS))
def test_numba_pool_starts_with_the_work_not_with_validation(call):
    """Choosing a backend, or failing validation, starts nothing; the first Numba kernel starts the pool
    without changing torch's thread count."""
    code = (
        "import numba, torch, numpy as np, cp3d\n"
        "from cp3d import _backend\n"
        "wanted = 1 if numba.config.NUMBA_NUM_THREADS > 1 else 2\n"
        "torch.set_num_threads(wanted)\n"
        "_, truth = cp3d.data.synthetic_stack((12, 24, 24), 8, seed=1)\n"
        "assert _backend.resolve_backend('numba') == 'numba' and not _backend._numba_pool_started\n"
        "try:\n"
        "    cp3d.reconstruct(np.zeros((3, 4, 4, 4), np.float32), np.ones((4, 4, 4), bool), step='4')\n"
        "except TypeError:\n"
        "    pass\n"
        "assert not _backend._numba_pool_started\n"
        f"{call}\n"
        "assert _backend._numba_pool_started\n"
        "assert torch.get_num_threads() == wanted, (torch.get_num_threads(), wanted)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
