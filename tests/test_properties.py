"""Property-based tests over the public API (hypothesis).

Random shapes (axes of 1 and 2 included), dtypes, memory orders and
parameters; the invariants every call must keep; and every invalid
parameter a ValueError or TypeError that names it. The number of examples
comes from the profile in conftest.py: a fixed, derandomized one in CI,
``HYPOTHESIS_PROFILE=long`` for a longer local run.
"""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cp3d

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 9), st.integers(1, 12), st.integers(1, 12))


@st.composite
def label_volumes(draw, shape=None):
    """A few random boxes as instances, with random ids (not consecutive)."""
    shape = draw(shapes) if shape is None else shape
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = np.zeros(shape, np.uint32)
    for _ in range(draw(st.integers(0, 4))):
        lo = [rng.integers(0, n) for n in shape]
        hi = [rng.integers(a + 1, n + 1) for a, n in zip(lo, shape)]
        labels[tuple(slice(a, b) for a, b in zip(lo, hi))] = rng.integers(1, 1000)
    return labels


def in_memory_order(array, order):
    """The same values as a C array, a Fortran array or a strided view."""
    if order == "F":
        return np.asfortranarray(array)
    if order == "view":
        doubled = np.repeat(array, 2, axis=-1)
        return doubled[..., ::2]
    return np.ascontiguousarray(array)


orders = st.sampled_from(["C", "F", "view"])


@st.composite
def reconstruct_cases(draw):
    labels = draw(label_volumes())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        flows = cp3d.tanh_flows(labels, backend="numpy")
        flows += rng.normal(0, draw(st.sampled_from([0.0, 0.1, 0.5])), flows.shape).astype(np.float32)
    else:
        flows = rng.uniform(-1, 1, (3, *labels.shape)).astype(np.float32)
    flows = flows.astype(draw(st.sampled_from([np.float32, np.float64])))
    kind = draw(st.sampled_from(["bool", "uint8", "probability"]))
    if kind == "probability":
        foreground = np.where(labels > 0, 0.9, 0.1) + rng.uniform(-0.05, 0.05, labels.shape)
    else:
        foreground = (labels > 0).astype(kind)
    params = draw(st.fixed_dictionaries({}, optional={
        "step": st.floats(0.01, 8),
        "n_iter": st.integers(0, 40),
        "closing_radius": st.one_of(st.floats(0, 3), st.tuples(*[st.floats(0, 3)] * 3)),
        "diameter": st.one_of(st.floats(2, 20), st.tuples(*[st.floats(2, 20)] * 3)),
        "diameter_range": st.tuples(st.floats(0, 5), st.floats(5, 50)),
        "min_overlap": st.floats(0, 1),
        "max_flow_error": st.one_of(st.none(), st.floats(0, 2)),
        "targets": st.sampled_from(["tanh", "heat"]),
        "inward": st.booleans(),
        "sigma": st.sampled_from([0.0, 0.7]),
    }))
    order = draw(orders)
    return in_memory_order(flows, order), in_memory_order(foreground, order), params


def check_labels(labels, foreground_mask):
    assert labels.shape == foreground_mask.shape and labels.dtype == np.uint32
    assert not labels[~foreground_mask].any(), "labels outside the foreground"
    ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))
    if ids.size:  # numbered in C order of their first voxel
        flat = labels.ravel()
        firsts = [np.flatnonzero(flat == i)[0] for i in ids]
        assert firsts == sorted(firsts)


# ---------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------


@given(reconstruct_cases())
def test_reconstruct_invariants_and_numba_equals_numpy(case):
    flows, foreground, params = case
    mask = foreground > 0.5 if foreground.dtype.kind == "f" else foreground != 0
    numba_labels = cp3d.reconstruct(flows, foreground, backend="numba", **params)
    check_labels(numba_labels, mask)
    np.testing.assert_array_equal(numba_labels, cp3d.reconstruct(flows, foreground, backend="numpy", **params))
    np.testing.assert_array_equal(numba_labels, cp3d.reconstruct(flows, foreground, backend="numba", **params))
    np.testing.assert_array_equal(
        numba_labels, cp3d.reconstruct(np.ascontiguousarray(flows), np.ascontiguousarray(foreground), **params))


@given(label_volumes(), st.floats(1e-3, 3.4e38), st.integers(0, 30), st.booleans(), orders)
def test_follow_stays_inside_and_numba_equals_numpy(labels, step, n_iter, inward, order):
    flows = in_memory_order(np.random.default_rng(labels.size).uniform(-1, 1, (3, *labels.shape)), order)
    foreground = in_memory_order(labels > 0, order)
    with np.errstate(over="ignore"):  # huge steps overflow to inf, then clip: well defined
        ref = cp3d.follow_flows(flows, foreground, step=step, n_iter=n_iter, inward=inward, backend="numpy")
    end = cp3d.follow_flows(flows, foreground, step=step, n_iter=n_iter, inward=inward, backend="numba")
    assert end.shape == (int(foreground.sum()), 3) and end.dtype == np.float32
    np.testing.assert_array_equal(end, ref)
    assert np.all(end >= 0) and np.all(end <= np.asarray(labels.shape) - 1)


@given(label_volumes(), st.one_of(st.floats(0, 3), st.tuples(*[st.floats(0, 3)] * 3)), orders)
def test_close_and_label_keeps_the_mask_and_numba_equals_numpy(labels, radius, order):
    mask = in_memory_order(labels > 0, order)
    out = cp3d.close_and_label(mask, radius, backend="numba")
    np.testing.assert_array_equal(out, cp3d.close_and_label(mask, radius, backend="numpy"))
    assert out.shape == mask.shape and out.dtype == np.uint32
    assert np.all(out[mask] > 0), "the closing removed a marked voxel"
    ids = np.unique(out[out > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))


@given(label_volumes(), st.one_of(st.floats(0.1, 10), st.tuples(*[st.floats(0.1, 10)] * 3)),
       st.sampled_from([np.uint8, np.uint16, np.int32, np.uint32, np.int64]), orders)
def test_tanh_flows_bounded_zero_on_background_numba_equals_numpy(labels, scale, dtype, order):
    labels = in_memory_order(labels.astype(dtype), order)
    flows = cp3d.tanh_flows(labels, scale, backend="numba")
    assert flows.shape == (3, *labels.shape) and flows.dtype == np.float32
    assert not flows[:, labels == 0].any() and np.all(np.abs(flows) <= 1)
    np.testing.assert_allclose(flows, cp3d.tanh_flows(labels, scale, backend="numpy"), atol=1e-5)


@given(label_volumes(), orders)
def test_heat_flows_unit_or_zero_numba_equals_numpy(labels, order):
    labels = in_memory_order(labels, order)
    flows = cp3d.heat_flows(labels, backend="numba")
    assert flows.shape == (3, *labels.shape) and flows.dtype == np.float32
    assert not flows[:, labels == 0].any()
    norm = np.sqrt((flows.astype(np.float64) ** 2).sum(axis=0))[labels > 0]
    assert np.all((np.abs(norm - 1) < 1e-4) | (norm == 0))
    np.testing.assert_allclose(flows, cp3d.heat_flows(labels, backend="numpy"), atol=1e-5)


@given(label_volumes(), st.tuples(st.floats(0, 20), st.floats(20, 1e4)), st.floats(0, 1),
       st.one_of(st.none(), st.floats(0, 2)), st.booleans())
def test_filter_instances_keeps_a_subset_numba_equals_numpy(labels, volume_range, min_overlap, max_error, inward):
    flows = cp3d.tanh_flows(labels, backend="numpy")
    rng = np.random.default_rng(labels.size)
    flows += rng.normal(0, 0.3, flows.shape).astype(np.float32)
    foreground = rng.random(labels.shape) < 0.8
    kwargs = dict(volume_range=volume_range, min_overlap=min_overlap, max_flow_error=max_error, inward=inward)
    kept = cp3d.filter_instances(labels, flows, foreground, backend="numba", **kwargs)
    np.testing.assert_array_equal(kept, cp3d.filter_instances(labels, flows, foreground, backend="numpy", **kwargs))
    assert not kept[labels == 0].any()
    ids = np.unique(kept[kept > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))
    for i in ids:  # a kept instance is a whole input instance
        np.testing.assert_array_equal(kept == i, labels == labels[kept == i][0])


# ---------------------------------------------------------------------------
# Every invalid parameter: a ValueError or TypeError that names it
# ---------------------------------------------------------------------------

not_numbers = st.one_of(st.text(max_size=3), st.booleans(), st.just([1.0, 2.0]), st.just(object()))
nan_or_inf = st.sampled_from([math.nan, math.inf, -math.inf])
negative = st.floats(max_value=-1e-9, allow_infinity=False)
wrong_length = st.one_of(st.tuples(st.floats(0.5, 5)), st.tuples(st.floats(0.5, 5), st.floats(0.5, 5)),
                         st.tuples(*[st.floats(0.5, 5)] * 4))

BAD = {
    "step": st.one_of(not_numbers, nan_or_inf, negative, st.just(0.0), st.floats(3.5e38, 1e308), wrong_length),
    "n_iter": st.one_of(not_numbers, nan_or_inf, st.floats(0, 100), st.integers(max_value=-1),
                        st.integers(min_value=2**31), st.just(2**63)),
    "closing_radius": st.one_of(not_numbers, nan_or_inf, negative, wrong_length, st.just(1e300)),
    "diameter": st.one_of(not_numbers, nan_or_inf, negative, st.just(0.0), st.just(1e-320), wrong_length,
                          st.just(1e300)),
    "diameter_range": st.one_of(st.just((5,)), st.just((1, 2, 3)), st.just((50, 5)), st.just((-1, 5)),
                                st.just(("a", 5)), st.just(5), st.just((math.nan, 5)), st.just("ab")),
    "min_overlap": st.one_of(not_numbers, st.just(math.nan), negative, st.floats(1.001, 10), st.none()),
    "max_flow_error": st.one_of(not_numbers, st.just(math.nan), negative),
    "tanh_scale": st.one_of(not_numbers, nan_or_inf, negative, st.just(0.0), wrong_length),
    "inward": st.one_of(st.text(max_size=3), st.integers(0, 1), st.none()),
    "sigma": st.one_of(not_numbers, nan_or_inf, negative, st.none(), st.just(1e300)),
    "targets": st.one_of(st.text(max_size=4), st.none()),
    "backend": st.one_of(st.text(max_size=4), st.none()),
}

FLOWS = np.zeros((3, 4, 5, 6), np.float32)
FOREGROUND = np.ones((4, 5, 6), bool)


@pytest.mark.parametrize("name", sorted(BAD))
@given(data=st.data())
def test_reconstruct_names_every_invalid_parameter(name, data):
    value = data.draw(BAD[name], label=name)
    with pytest.raises((ValueError, TypeError), match=name.split("_range")[0] if name == "diameter_range" else name):
        cp3d.reconstruct(FLOWS, FOREGROUND, **{name: value})


FOLLOW_BAD = {key: BAD[key] for key in ("step", "n_iter", "inward", "sigma", "backend")}


@pytest.mark.parametrize("name", sorted(FOLLOW_BAD))
@given(data=st.data())
def test_follow_flows_names_every_invalid_parameter(name, data):
    value = data.draw(FOLLOW_BAD[name], label=name)
    with pytest.raises((ValueError, TypeError), match=name):
        cp3d.follow_flows(FLOWS, FOREGROUND, **{name: value})


@given(st.one_of(not_numbers, nan_or_inf, negative, wrong_length, st.just(1e300)))
def test_close_and_label_names_an_invalid_radius(radius):
    with pytest.raises((ValueError, TypeError), match="radius"):
        cp3d.close_and_label(FOREGROUND, radius)


@given(st.one_of(not_numbers, nan_or_inf, negative, st.just(0.0), wrong_length, st.just(1e-320)))
def test_tanh_flows_names_an_invalid_scale(scale):
    with pytest.raises((ValueError, TypeError), match="scale"):
        cp3d.tanh_flows(FOREGROUND.astype(np.uint8), scale)


@given(st.one_of(not_numbers, nan_or_inf, st.floats(0, 100), st.integers(max_value=0), st.integers(min_value=2**31)))
def test_heat_flows_names_an_invalid_n_iter(n_iter):
    with pytest.raises((ValueError, TypeError), match="n_iter"):
        cp3d.heat_flows(FOREGROUND.astype(np.uint8), n_iter=n_iter)


@given(st.one_of(st.just((5,)), st.just((50, 5)), st.just((-1, 5)), st.just(("a", 5)), st.just(5),
                 st.just((math.nan, 5))))
def test_filter_instances_names_an_invalid_volume_range(volume_range):
    with pytest.raises((ValueError, TypeError), match="volume_range"):
        cp3d.filter_instances(FOREGROUND.astype(np.uint8), FLOWS, FOREGROUND, volume_range=volume_range)


def test_values_beyond_float32_are_not_called_nan():
    flows = FLOWS.astype(np.float64)
    flows[0, 0, 0, 0] = 1e300
    with pytest.raises(ValueError, match="beyond the float32 range"):
        cp3d.reconstruct(flows, FOREGROUND)
    flows[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        cp3d.reconstruct(flows, FOREGROUND)


# ---------------------------------------------------------------------------
# The kernels' limits, in a subprocess: a regression would kill the interpreter, not the test run
# ---------------------------------------------------------------------------

CRASHERS = {
    "step=3.5e38": "cp3d.reconstruct(flows, fg, step=3.5e38, backend='numba')",
    "step=3.5e38 numpy": "cp3d.reconstruct(flows, fg, step=3.5e38, backend='numpy')",
    "closing_radius=1e300": "cp3d.reconstruct(flows, fg, closing_radius=1e300, backend='numba')",
    "diameter=1e300": "cp3d.reconstruct(flows, fg, diameter=1e300, backend='numba')",
    "n_iter=2**63": "cp3d.reconstruct(flows, fg, n_iter=2**63, backend='numba')",
    "close_and_label radius=1e300": "cp3d.close_and_label(fg, 1e300)",
}


@pytest.mark.parametrize("call", CRASHERS.values(), ids=list(CRASHERS))
def test_kernel_limits_are_errors_not_crashes(call):
    code = textwrap.dedent(f"""
        import numpy as np, cp3d
        labels = np.zeros((6, 8, 8), np.uint32)
        labels[1:5, 1:7, 1:7] = 1
        flows, fg = cp3d.tanh_flows(labels), labels > 0
        try:
            {call}
        except ValueError as error:
            print("ValueError:", error)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ValueError:"), run.stdout


SEGMENT_BAD = [
    ({"image": "x.tif"}, TypeError, "image must be an array"),
    ({"model": 123}, TypeError, "model must be"),
    ({"voxel_size": (1e-320, 1, 1)}, ValueError, "voxel_size"),
    ({"voxel_size": "1"}, TypeError, "voxel_size"),
]


@pytest.mark.parametrize("kwargs, error, match", SEGMENT_BAD, ids=[str(k) for k, _, _ in SEGMENT_BAD])
def test_segment_names_invalid_inputs_before_predicting(kwargs, error, match, monkeypatch):
    import cp3d.model

    monkeypatch.setattr(cp3d.model, "predict", lambda *a, **k: pytest.fail("predicted before validating"))
    image = kwargs.pop("image", np.random.default_rng(0).random((8, 16, 16)))
    with pytest.raises(error, match=match):
        cp3d.segment(image, **kwargs)


PREDICT_BAD = [
    ({"tile_size": (8, 8)}, ValueError, "tile_size"),
    ({"tile_size": "64"}, TypeError, "tile_size"),
    ({"context": (1.5, 2, 2)}, TypeError, "context"),
]


@pytest.mark.parametrize("kwargs, error, match", PREDICT_BAD, ids=[str(k) for k, _, _ in PREDICT_BAD])
def test_predict_names_invalid_tiles(kwargs, error, match):
    from cp3d.model.predict import predict

    with pytest.raises(error, match=match):
        predict(np.random.default_rng(0).random((8, 16, 16)), "tanh", **kwargs)
