"""Tests of cp3d.model: network, configuration, saving/loading, tiled prediction, training."""

import importlib
import json
import logging
import os

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

import cp3d
from cp3d.model import UNet3D, UNetConfig, load_model, normalize_percentile, predict, save_model, train
from cp3d.model.predict import blend_window, cheapest_tiles
from cp3d.model.train import _augment_intensity, _dim_cells, _StackPool, augment_geometry, compute_loss

TINY = dict(base_features=4, depth=2)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_net(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet3D(**{**TINY, **kw}).eval()


def smooth_image(shape, seed=0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32)


# --------------------------------------------------------------------------- network and config


def test_forward_shapes_and_ranges():
    net = tiny_net()
    with torch.no_grad():
        raw = net(torch.rand(2, 1, 8, 16, 12))
    assert raw.shape == (2, 4, 8, 16, 12)
    flows, fg = net.activate(raw)
    assert flows.shape == (2, 3, 8, 16, 12) and fg.shape == (2, 8, 16, 12)
    assert flows.abs().max() < 1 and fg.min() >= 0 and fg.max() <= 1


def test_forward_rejects_bad_shapes():
    net = tiny_net()
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 1, 8, 10, 8))
    with pytest.raises(ValueError, match="expects"):
        net(torch.rand(1, 2, 8, 8, 8))


def test_default_architecture_size():
    net = UNet3D()
    assert 1_000_000 < net.n_parameters < 2_000_000
    assert net.config.out_channels == 4 and net.config.norm == "batch"


def test_config_json_round_trip(tmp_path):
    cfg = UNetConfig(targets="heat", base_features=8, depth=2, tile_size=(32, 48, 48), train_diameter=9)
    cfg.to_json(tmp_path / "config.json")
    back = UNetConfig.from_json(tmp_path / "config.json")
    assert back == cfg
    assert json.loads((tmp_path / "config.json").read_text())["tile_size"] == [32, 48, 48]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"targets": "flows"}, "targets"),
        ({"norm": "group"}, "norm"),
        ({"patch_size": (30, 64, 64)}, "divisible"),
        ({"base_features": 0}, "base_features"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"base_features": 4, "colour": "red"})


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("half, tol", [(False, 0.0), (True, 1e-2)])
def test_save_load_round_trip(tmp_path, half, tol):
    net = tiny_net(seed=3)
    save_model(net, tmp_path / "m", half=half)
    back = load_model(tmp_path / "m")
    assert not back.training and back.config == net.config
    x = torch.from_numpy(smooth_image((8, 8, 8)))[None, None]
    with torch.no_grad():
        np.testing.assert_allclose(back(x).numpy(), net(x).numpy(), atol=tol, rtol=0)


def test_load_model_errors_name_the_path(tmp_path):
    net = tiny_net()
    d = tmp_path / "m"
    save_model(net, d)
    with pytest.raises(ValueError, match="no bundled model"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing")

    (d / "weights.pt").write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="weights.pt.*not a valid torch file"):
        load_model(d)

    state = net.state_dict()
    state.pop("head.weight")
    torch.save(state, d / "weights.pt")
    with pytest.raises(ValueError, match="do not match"):
        load_model(d)

    torch.save(tiny_net(base_features=8).state_dict(), d / "weights.pt")  # shape mismatch
    with pytest.raises(ValueError, match=str(d)):
        load_model(d)

    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(d)
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(d)


# --------------------------------------------------------------------------- prediction


def test_blend_window_fades_inner_ends_only():
    w = blend_window(40, 10, 6)
    assert w[:10].max() == 0 and w[-10:].max() == 0 and (w[16:24] == 1).all()
    assert (np.diff(w[10:16]) > 0).all() and 0 < w[10] < w[15] < 1
    np.testing.assert_array_equal(w, w[::-1])
    first, last = blend_window(40, 10, 6, first=True), blend_window(40, 10, 6, last=True)
    assert (first[:24] == 1).all() and first[-10:].max() == 0
    np.testing.assert_array_equal(last, first[::-1])


@pytest.mark.parametrize("position", [40, 41, 42, 43])  # every phase of the depth-2 pooling grid
def test_receptive_radius_bounds_the_influence_of_a_voxel(position):
    net = tiny_net(seed=3)
    radius = net.config.receptive_radius
    x = torch.zeros(1, 1, 8, 8, 96)
    with torch.inference_mode():
        base = net(x)
        x[..., position] = 1.0  # an impulse plane: outputs within the radius may change, none beyond
        changed = (net(x) - base).abs().amax(dim=(0, 1, 2, 3)) > 0
    reach = np.flatnonzero(changed.numpy())
    assert reach.min() >= position - radius and reach.max() <= position + radius
    assert max(reach.max() - position, position - reach.min()) > radius - 4  # tight within one pooling cell


@pytest.mark.parametrize(
    "depth, tile, overlap, pad_mode",
    [
        (2, (40, 64, 64), 8, "reflect"),
        (2, 64, 0, "reflect"),
        (2, (40, 64, 72), (4, 12, 8), "constant"),
        (1, (32, 48, 48), 4, "reflect"),  # z tiled too
    ],
)
def test_tiling_is_invisible(depth, tile, overlap, pad_mode):
    """Tiles with the default context reproduce a whole-stack prediction everywhere, borders included."""
    net = tiny_net(seed=1, depth=depth)
    shape = (40, 100, 90)
    image = smooth_image(shape, seed=2) + np.random.default_rng(0).random(shape).astype(np.float32) * 0.1
    whole = predict(image, net, tile_size=128, pad_mode=pad_mode)
    tiled = predict(image, net, tile_size=tile, overlap=overlap, batch_size=3, pad_mode=pad_mode)
    np.testing.assert_allclose(tiled.flows, whole.flows, atol=1e-5)
    np.testing.assert_allclose(tiled.foreground, whole.foreground, atol=1e-5)


def test_too_small_model_tile_size_falls_back_to_automatic_tiles():
    net = tiny_net(seed=1, tile_size=(8, 8, 8))
    image = smooth_image((20, 30, 70))
    np.testing.assert_array_equal(predict(image, net).flows, predict(image, net, tile_size=128).flows)


def test_tile_too_small_for_the_context_is_a_clear_error():
    with pytest.raises(ValueError, match="too small to tile"):
        predict(np.zeros((8, 8, 100), np.float32), tiny_net(), tile_size=(8, 8, 48))
    with pytest.raises(ValueError, match="context"):
        predict(np.zeros((8, 8, 8), np.float32), tiny_net(), context=-1)


def test_cheapest_tiles_is_the_cheapest_within_the_budget():
    import itertools

    from cp3d.model.predict import _tile_count

    shape, budget, context, overlap = (70, 150, 200), 150_000, [11, 11, 11], [4, 4, 4]
    tiles = cheapest_tiles(shape, budget, context, overlap, 4)
    brute = min(
        np.prod([_tile_count(n, t, 11, 4, 4) for n, t in zip(shape, combo)]) * np.prod(combo)
        for combo in itertools.product(*(range(4, -(-n // 4) * 4 + 1, 4) for n in shape))
        if np.prod(combo) <= budget and all(_tile_count(n, t, 11, 4, 4) for n, t in zip(shape, combo))
    )
    cost = np.prod([_tile_count(n, t, 11, 4, 4) for n, t in zip(shape, tiles)]) * np.prod(tiles)
    assert np.prod(tiles) <= budget and cost == brute
    assert cheapest_tiles((64, 250, 256), 2**23, [51] * 3, [8] * 3, 8) == [64, 256, 256]  # one tile
    with pytest.raises(ValueError, match="no tiling"):
        cheapest_tiles((512, 512, 512), 100, [51] * 3, [8] * 3, 8)


@pytest.mark.parametrize("shape", [(5, 7, 9), (1, 20, 20), (30, 17, 23)])
def test_predict_any_shape(shape):
    image = np.random.default_rng(0).random(shape)
    p = predict(image, tiny_net())
    tiled = predict(image, tiny_net(), tile_size=12, context=2, overlap=2)
    assert tiled.flows.shape == p.flows.shape and np.isfinite(tiled.flows).all()
    assert p.flows.shape == (3,) + shape and p.foreground.shape == shape
    assert p.flows.dtype == np.float32 and p.foreground.dtype == np.float32
    assert np.abs(p.flows).max() < 1 and 0 <= p.foreground.min() and p.foreground.max() <= 1


def test_predict_voxel_size_returns_original_shape():
    image = smooth_image((11, 30, 29))
    p = predict(image, tiny_net(), voxel_size=(2.5, 1.0, 1.0))
    assert p.flows.shape == (3, 11, 30, 29) and p.foreground.shape == (11, 30, 29)
    tiled = predict(image, tiny_net(), voxel_size=(2.5, 1.0, 1.0), tile_size=12, context=2, overlap=2)
    assert tiled.flows.shape == (3, 11, 30, 29)
    same = predict(image, tiny_net(), voxel_size=1.0)
    ref = predict(image, tiny_net())
    np.testing.assert_array_equal(same.flows, ref.flows)


def test_predict_all_zero_image():
    p = predict(np.zeros((12, 16, 16), np.uint16), tiny_net(), tile_size=16)
    assert np.isfinite(p.flows).all() and np.isfinite(p.foreground).all()
    np.testing.assert_array_equal(normalize_percentile(np.full((4, 4, 4), 7.0)), 0)


@pytest.mark.parametrize("axis", [1, 2])
def test_augmented_prediction_follows_a_mirrored_stack(axis):
    """Averaging over the in-plane mirrors makes any network mirror-equivariant; one pass is not."""
    net, image = tiny_net(seed=3), smooth_image((10, 21, 19), seed=4)
    mirrored = np.flip(image, axis)
    for augment, equal in ((True, True), (False, False)):
        p, m = predict(image, net, augment=augment), predict(mirrored, net, augment=augment)
        flows = np.flip(m.flows, axis + 1).copy()
        flows[axis] *= -1
        assert np.allclose(flows, p.flows, atol=1e-5) == equal
        assert np.allclose(np.flip(m.foreground, axis), p.foreground, atol=1e-5) == equal


def test_augment_must_be_a_bool():
    with pytest.raises(TypeError, match="augment"):
        predict(np.zeros((8, 8, 8), np.float32), tiny_net(), augment="yes")


@pytest.mark.parametrize(
    "shape, match",
    [
        ((32, 32), "2D"),
        ((8, 16, 16, 3), "RGB"),
        ((8, 16, 16, 4), "RGB"),
        ((2, 8, 16, 16), "single 3D stack"),
        ((0, 16, 16), "empty"),
    ],
)
def test_predict_rejects_bad_images(shape, match):
    with pytest.raises(ValueError, match=match):
        predict(np.zeros(shape, np.float32), tiny_net())


def test_predict_rejects_nan_and_training_mode():
    image = np.zeros((8, 8, 8), np.float32)
    image[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predict(image, tiny_net())
    with pytest.raises(ValueError, match="training mode"):
        predict(np.zeros((8, 8, 8)), tiny_net().train())


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_inference_copy_computes_the_same_maps(norm):
    net = tiny_net(norm=norm)
    if norm == "batch":  # non-trivial frozen statistics, so folding them has something to do
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
    fast = net.for_inference(torch.device("cpu"))
    x = torch.rand(1, 1, 16, 24, 20)
    with torch.inference_mode():
        expected = net(x)
        got = fast(x.contiguous(memory_format=net.memory_format("cpu")))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.modules())  # folded away
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) == (norm == "batch")  # net untouched


def test_inference_copy_needs_eval_mode():
    with pytest.raises(ValueError, match="training mode"):
        tiny_net().train().for_inference(torch.device("cpu"))


def test_auto_device_prefers_a_gpu(monkeypatch):
    from cp3d.model.predict import resolve_device

    assert resolve_device("auto", tiny_net()) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # a model loaded on the CPU (as segment and load_model do) still predicts on the GPU when there is one
    assert resolve_device("auto", tiny_net()).type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_or_unknown_device_is_a_clear_error():
    from cp3d.model.predict import resolve_device

    with pytest.raises(ValueError, match="no CUDA GPU"):
        predict(np.zeros((8, 8, 8)), tiny_net(), device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("gpu please")


# --------------------------------------------------------------------------- training pieces


def _labels():
    return cp3d.data.synthetic_stack((16, 24, 20), 7, seed=5, noise=0.0).labels


@pytest.mark.parametrize("flips", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)])
@pytest.mark.parametrize("swap_yx", [False, True])
def test_augmentation_transforms_flow_channels(flips, swap_yx):
    labels = _labels()
    flows = cp3d.tanh_flows(labels, scale=5.0)
    (aug_labels,), aug_flows = augment_geometry([labels], flows, flips=flips, swap_yx=swap_yx)
    expected = cp3d.tanh_flows(aug_labels, scale=5.0)
    np.testing.assert_allclose(aug_flows, expected, atol=1e-5)


def test_dim_cells_scales_membranes_within_the_range():
    labels = _labels()
    image = np.ones(labels.shape, np.float32)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(_dim_cells(image, labels, rng, fraction=0.0), image)
    dimmed = _dim_cells(image, labels, rng, fraction=1.0, low=0.25, high=0.7)
    assert dimmed.min() >= 0.25 and dimmed[labels > 0].max() <= 0.7
    assert np.unique(dimmed[labels > 0]).size > 1  # each cell its own factor


def test_z_stretched_training_stacks_get_targets_of_their_own_shape():
    config = UNetConfig(**TINY, patch_size=(16, 16, 16))
    pool = _StackPool(config, seed=0, diameters=(6, 8), n_stacks=1, stack_shape=(16, 24, 24), noise=(0.05, 0.1),
                      stretch=(0.5, 0.6), refresh_every=0)
    stacks = [pool.make(k) for k in range(6)]
    stretched = [st for st in stacks if st["stretch"] != 1.0]
    assert stretched and len(stretched) < len(stacks)  # about half the stacks
    for st in stacks:
        assert st["flows"].shape == (3, *st["image"].shape) and st["fg"].shape == st["image"].shape
        assert not st["flows"][:, st["fg"] == 0].any()  # targets recomputed on the resampled labels
    for st in stretched:
        # z shrinks by the factor from a length chosen so that the stretched stack still holds a patch
        assert st["image"].shape[0] == pytest.approx(np.ceil(16 / st["stretch"]) * st["stretch"], abs=1)
    image = _augment_intensity(np.full((8, 8, 8), 0.5, np.float32), np.random.default_rng(1))
    assert image.dtype == np.float32 and image.flags.c_contiguous and np.isfinite(image).all()


def test_loss_is_small_for_perfect_prediction():
    labels = _labels()
    fg = torch.from_numpy((labels > 0).astype(np.float32))[None]
    flows = torch.from_numpy(cp3d.tanh_flows(labels))[None].clamp(-0.999, 0.999)
    raw = torch.cat([torch.atanh(flows), (fg[:, None] * 2 - 1) * 20], dim=1)
    total, bce, mse = compute_loss(raw, fg, flows)
    assert mse < 1e-8 and bce < 1e-6
    bad_total, _, _ = compute_loss(torch.zeros_like(raw), fg, flows)
    assert bad_total > 100 * total


def test_training_smoke_and_resume(tmp_path):
    kw = dict(
        steps=2, batch_size=1, patch_size=(16, 16, 16), lr=1e-3, seed=0, device="cpu", checkpoint_every=1,
        progress=False, diameters=(6, 8), n_stacks=1, refresh_every=2, validate_stacks=0, log_every=1, **TINY,
    )
    out = tmp_path / "run"
    train(out, **kw)
    first = torch.load(out / "checkpoint.pt", weights_only=False)
    assert first["step"] == 2
    kw["steps"] = 3
    model = train(out, resume=out, **kw)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3 and len(ck["history"]) == 3
    assert ck["pool"]["next_id"] == 2  # the pool was rebuilt and refreshed once at step 2
    card = json.loads((out / "model_card.json").read_text())
    assert card["steps"] == 3 and card["arguments"]["resume"] == str(out)
    assert np.isfinite(card["final_losses"]["loss"])
    loaded = load_model(out)
    assert loaded.config == model.config
    p = predict(np.random.default_rng(0).random((16, 16, 16)), loaded)
    assert p.flows.shape == (3, 16, 16, 16)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(tmp_path / "other", resume=tmp_path / "nothing", **kw)
    # A checkpoint that recorded a tile size still resumes (an inference setting); an architecture change does not.
    ck["config"]["tile_size"] = [64, 96, 96]
    torch.save(ck, out / "checkpoint.pt")
    kw["steps"] = 4
    assert train(out, resume=out, **kw).config.tile_size is None
    with pytest.raises(ValueError, match="different configuration"):
        train(out, resume=out, **{**kw, "base_features": 8})


def _tiny_training(**changes):
    return dict(
        steps=3, batch_size=1, patch_size=(16, 16, 16), lr=1e-3, seed=0, device="cpu", checkpoint_every=1,
        progress=False, diameters=(6, 8), n_stacks=1, refresh_every=2, validate_stacks=0, log_every=1, **TINY,
    ) | changes


def test_training_is_reproducible_and_resumes_exactly(tmp_path, monkeypatch):
    a = train(tmp_path / "a", **_tiny_training()).state_dict()
    b = train(tmp_path / "b", **_tiny_training()).state_dict()
    training = importlib.import_module("cp3d.model.train")  # the package's `train` is the function
    calls, real_loss = [], training.compute_loss

    def interrupted_after_two_steps(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "compute_loss", interrupted_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "c", **_tiny_training())
    monkeypatch.setattr(training, "compute_loss", real_loss)
    c = train(tmp_path / "c", resume=tmp_path / "c", **_tiny_training()).state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
        torch.testing.assert_close(c[key], a[key], rtol=0, atol=0)


def test_fine_tuning_starts_from_the_given_model(tmp_path):
    start = train(tmp_path / "start", **_tiny_training(steps=2))
    tuned = train(tmp_path / "tuned", init=tmp_path / "start", **_tiny_training(steps=1, lr=0.0, seed=1))
    # with lr 0 the convolutions keep the starting weights (saved as float16)
    torch.testing.assert_close(tuned.head.weight, start.head.weight.half().float())
    card = json.loads((tmp_path / "tuned" / "model_card.json").read_text())
    assert card["steps"] == 3 and [run["steps"] for run in card["lineage"]] == ["0-2", "2-3"]
    assert card["arguments"]["init"] == str(tmp_path / "start")
    with pytest.raises(ValueError, match="different configuration"):
        train(tmp_path / "x", init=tmp_path / "start", **_tiny_training(base_features=8))
    with pytest.raises(ValueError, match="not both"):
        train(tmp_path / "x", init=tmp_path / "start", resume=tmp_path / "start", **_tiny_training())


def test_a_resumed_fine_tuning_run_keeps_its_lineage(tmp_path):
    train(tmp_path / "start", **_tiny_training(steps=2))
    train(tmp_path / "tuned", init=tmp_path / "start", **_tiny_training(steps=1))
    train(tmp_path / "tuned", resume=tmp_path / "tuned", **_tiny_training(steps=2))
    card = json.loads((tmp_path / "tuned" / "model_card.json").read_text())
    assert card["steps"] == 4 and [run["steps"] for run in card["lineage"]] == ["0-2", "2-4"]


def test_nuclei_pool_draws_varied_nuclei_stacks():
    config = UNetConfig(**TINY, patch_size=(16, 16, 16))
    pool = _StackPool(config, seed=0, diameters=(6, 8), n_stacks=1, stack_shape=(16, 32, 32), noise=(0.05, 0.1),
                      stretch=(0.75, 1.33), refresh_every=0, kind="nuclei")
    stacks = [pool.make(k) for k in range(3)]
    for st in stacks:
        assert 0.05 < st["fg"].mean() < 0.95  # nuclei with background between them, not a tissue
        assert not st["flows"][:, st["fg"] == 0].any()
    assert len({round(float(st["fg"].mean()), 3) for st in stacks}) == 3


def test_training_on_nuclei_validates_on_nuclei(tmp_path):
    train(tmp_path / "n", kind="nuclei", **_tiny_training(steps=1, validate_stacks=1))
    card = json.loads((tmp_path / "n" / "model_card.json").read_text())
    assert card["data"]["generator"] == "cp3d.data.synthetic_stack(kind='nuclei')"
    assert card["arguments"]["kind"] == "nuclei" and card["validation"]["kind"] == "nuclei"
    with pytest.raises(ValueError, match="kind"):
        train(tmp_path / "x", kind="cytoplasm", **_tiny_training())
    with pytest.raises(ValueError, match="annotated"):
        train(tmp_path / "x", kind="nuclei", data=tmp_path, **_tiny_training())


@pytest.fixture
def rendered(monkeypatch):
    """The keywords of every cp3d.data.synthetic_stack call, recorded while it runs as usual."""
    calls, real = [], cp3d.data.synthetic_stack

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cp3d.data, "synthetic_stack", spy)
    return calls


@pytest.mark.parametrize("varied", [False, True])
def test_varied_membrane_pool_draws_varied_settings_only_when_asked(rendered, varied):
    calls = rendered
    config = UNetConfig(**TINY, patch_size=(16, 16, 16))
    pool = _StackPool(config, seed=0, diameters=(6, 8), n_stacks=1, stack_shape=(16, 32, 32), noise=(0.05, 0.1),
                      stretch=(0.75, 1.33), refresh_every=0, varied=varied)
    for k in range(8):
        pool.make(k)
    rendered = [sorted(set(c) - {"kind", "seed"}) for c in calls]
    plain = rendered.count(["noise"])
    assert plain == 8 if not varied else 0 < plain < 8  # varied: three in four stacks on average
    if varied:
        # each varied stack draws about half of its settings, the others stay plain
        n_settings = len(cp3d.data.random_membrane_options(np.random.default_rng(0)))
        assert all(len(r) < n_settings for r in rendered)
        assert len({tuple(r) for r in rendered if r != ["noise"]}) > 1


def test_training_on_varied_membranes_validates_on_plain_and_varied(tmp_path):
    train(tmp_path / "v", varied=True, **_tiny_training(steps=1, validate_stacks=1))
    card = json.loads((tmp_path / "v" / "model_card.json").read_text())
    assert card["arguments"]["varied"] and card["data"]["varied"]
    assert card["data"]["varied_option_ranges"]["noise"] == list(cp3d.data.MEMBRANE_OPTION_RANGES["noise"])
    assert not card["validation"]["varied"] and card["validation_varied"]["varied"]
    with pytest.raises(ValueError, match="varied"):
        train(tmp_path / "x", varied=True, data=tmp_path, **_tiny_training())


# --------------------------------------------------------------------------- training on annotated folders


def _write_pairs(folder, count, shape=(16, 32, 32), diameter=8, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, labels = cp3d.data.synthetic_stack(shape, diameter, seed=seed + i, noise=0.1)
        cp3d.io.write_image(folder / f"stack{i}.tif", image)
        cp3d.io.write_labels(folder / f"stack{i}_masks.tif", labels)
    return folder


def test_training_on_a_folder_end_to_end_and_resumes(tmp_path):
    h5py = pytest.importorskip("h5py")
    data = _write_pairs(tmp_path / "data", 2)
    image, labels = cp3d.data.synthetic_stack((16, 32, 32), 8, seed=7, noise=0.1)
    with h5py.File(data / "plantseg.h5", "w") as f:  # the released Cellpose3D / PlantSeg layout
        f["raw"], f["label"] = image, labels
        f["raw"].attrs["element_size_um"] = (1.0, 0.5, 0.5)
    kw = _tiny_training(steps=2, validate_stacks=1) | {"data": data}
    out = tmp_path / "run"
    model = train(out, **kw)
    card = json.loads((out / "model_card.json").read_text())
    stacks = card["data"]["stacks"]
    # one stack in five (at least one) is held out: the last by name
    assert [s["name"] for s in stacks] == ["plantseg.h5", "stack0.tif"]
    assert card["data"]["validation_stacks"] == ["stack1.tif"]
    # cells measured from the masks are resampled to the training size; the HDF5 file's voxel size is used
    assert stacks[1]["diameter"] == pytest.approx(8, rel=0.2)
    assert stacks[1]["zoom"][2] == pytest.approx(model.config.train_diameter / stacks[1]["diameter"])
    assert stacks[0]["voxel_size"] == [1.0, 0.5, 0.5]
    assert stacks[0]["zoom"][0] == pytest.approx(2 * stacks[0]["zoom"][2])
    assert 0 <= card["validation"]["mean_dice"] <= 1 and card["validation"]["stacks"][0]["name"] == "stack1.tif"
    resumed = train(out, resume=out, **kw | {"steps": 3})
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3 and resumed.config == model.config
    (data / "stack0.tif").rename(data / "other.tif")
    (data / "stack0_masks.tif").rename(data / "other_masks.tif")
    with pytest.raises(ValueError, match="same training stacks"):
        train(out, resume=out, **kw | {"steps": 4})


def test_training_on_a_folder_with_a_validation_folder_and_given_size(tmp_path):
    data = _write_pairs(tmp_path / "data", 1)
    valid = _write_pairs(tmp_path / "valid", 1, seed=5)
    kw = _tiny_training(steps=1, validate_stacks=1) | {"data": data, "validate_data": valid, "diameter": 5.0,
                                                      "voxel_size": (2, 1, 1)}
    model = train(tmp_path / "run", **kw)
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    (info,) = card["data"]["stacks"]
    zoom = model.config.train_diameter / 5.0
    assert info["zoom"] == pytest.approx([2 * zoom, zoom, zoom])
    assert info["model_grid_shape"] == [round(16 * 2 * zoom), round(32 * zoom), round(32 * zoom)]
    assert card["validation"]["stacks"][0]["diameter"] == 5.0


@pytest.mark.parametrize("make, match", [
    (lambda d: None, "no annotated stacks"),
    (lambda d: cp3d.io.write_labels(d / "lonely_masks.tif", np.ones((4, 8, 8), np.uint32)), "has no image"),
    (lambda d: (cp3d.io.write_image(d / "a.tif", np.zeros((4, 8, 8), np.float32)),
                cp3d.io.write_labels(d / "a_masks.tif", np.ones((4, 8, 9), np.uint32))), "shape"),
    (lambda d: (tifffile.imwrite(d / "a.tif", np.zeros((8, 8), np.float32)),
                tifffile.imwrite(d / "a_masks.tif", np.ones((8, 8), np.uint32))), "not a 3D stack"),
    (lambda d: (cp3d.io.write_image(d / "a.tif", np.zeros((4, 8, 8), np.float32)),
                cp3d.io.write_image(d / "a_masks.tif", np.full((4, 8, 8), 1.5, np.float32))), "integer"),
    (lambda d: (cp3d.io.write_image(d / "a.tif", np.zeros((4, 8, 8), np.float32)),
                cp3d.io.write_labels(d / "a_masks.tif", np.zeros((4, 8, 8), np.uint32))), "no instance"),
])
def test_training_data_errors_name_the_problem(tmp_path, make, match):
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    with pytest.raises((ValueError, TypeError), match=match):
        train(tmp_path / "run", **_tiny_training(steps=1) | {"data": data})
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_training_data_hdf5_without_the_datasets(tmp_path):
    h5py = pytest.importorskip("h5py")
    data = tmp_path / "data"
    data.mkdir()
    with h5py.File(data / "x.h5", "w") as f:
        f["image"] = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="'raw'"):
        train(tmp_path / "run", **_tiny_training(steps=1) | {"data": data})


def test_cli_train_on_a_folder(tmp_path, capsys):
    from cp3d import cli

    data = _write_pairs(tmp_path / "data", 1)
    out = tmp_path / "run"
    assert cli.main(["train", str(out), "--data", str(data), "--steps", "1", "--patch-size", "16,16,16",
                     "--validate-stacks", "0", "--no-progress", "--voxel-size", "2", "1", "1", "--diameter", "6"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["data"]["stacks"][0]["diameter"] == 6.0 and card["data"]["stacks"][0]["voxel_size"] == [2.0, 1.0, 1.0]
    assert card["command"].startswith("cp3d train") and "--data" in card["command"]
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", str(tmp_path / "x"), "--data", str(tmp_path / "empty")]) == 2
    assert "no annotated stacks" in capsys.readouterr().err


def test_cli_train_checks_out_dir_before_any_work(tmp_path, monkeypatch, capsys):
    from cp3d import cli
    from cp3d.model.unet import WEIGHTS_DIR

    train_module = importlib.import_module("cp3d.model.train")  # the module, not cp3d.model's train function

    started = []
    monkeypatch.setattr(train_module, "train", lambda out_dir, **kwargs: started.append(out_dir))

    def run(*args):
        return cli.main(["train", *map(str, args)]), capsys.readouterr().err

    (tmp_path / "file").write_text("")
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.pt").write_bytes(b"trained")
    bundled = WEIGHTS_DIR / "tanh"
    for args, match in [((tmp_path / "file",), "is a file"),
                        ((bundled,), "bundled models' folder"),
                        ((WEIGHTS_DIR / "new",), "bundled models' folder"),
                        ((model, "--init", model, "--overwrite"), "folder of --init"),
                        ((model,), "holds a trained model")]:
        rc, err = run(*args)
        assert rc == 2 and match in err, (args, err)
    assert started == [] and (model / "weights.pt").read_bytes() == b"trained"
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        rc, err = run(locked / "run")
        assert rc == 2 and "not writable" in err
    for args in [(model, "--overwrite"), (model, "--resume", model), (tmp_path / "new" / "run",)]:
        assert run(*args)[0] == 0
    assert started == [str(model), str(model), str(tmp_path / "new" / "run")]


def test_varied_nuclei_training_draws_bright_grainy_backgrounds_and_glowing_walls_and_validates_on_them(tmp_path,
                                                                                                      rendered):
    calls = rendered
    train(tmp_path / "w", kind="nuclei", varied=True, **_tiny_training(steps=1, validate_stacks=1))
    card = json.loads((tmp_path / "w" / "model_card.json").read_text())
    assert "random_nuclei_options(rng, bright_background=True, glowing_walls=True)" in card["data"]["options"]
    assert card["validation_varied"]["varied"] and card["validation_varied"]["kind"] == "nuclei"
    assert not card["validation"]["varied"]
    calls.clear()
    config = UNetConfig(**TINY, patch_size=(16, 16, 16))
    pool = _StackPool(config, seed=0, diameters=(6, 8), n_stacks=1, stack_shape=(16, 32, 32), noise=(0.05, 0.1),
                      stretch=(0.75, 1.33), refresh_every=0, kind="nuclei", varied=True)
    for k in range(12):
        pool.make(k)
    assert len(calls) == 12 and all("background_grain" in c for c in calls)
    assert all(c["dim_fraction"] == 0 and 0 <= c["background"] <= 0.6 and c["density"] >= 0.2 for c in calls)
    assert sum(c["background"] > 0.2 for c in calls) >= 2 and any(c["background"] == 0 for c in calls)
    assert 2 <= sum("glowing_walls" in c for c in calls) <= 10  # in about half the stacks


def test_mixed_training_draws_nuclei_and_membranes_and_validates_on_both(tmp_path, rendered):
    calls = rendered
    config = UNetConfig(**TINY, patch_size=(16, 16, 16))
    pool = _StackPool(config, seed=0, diameters=(6, 8), n_stacks=1, stack_shape=(16, 32, 32), noise=(0.05, 0.1),
                      stretch=(0.75, 1.33), refresh_every=0, kind="mixed", varied=True)
    for k in range(16):
        pool.make(k)
    kinds = [c["kind"] for c in calls]
    assert 4 <= kinds.count("nuclei") <= 12 and kinds.count("membrane") == 16 - kinds.count("nuclei")
    # each kind with its own varied settings: nuclei on bright grainy backgrounds, membranes of varied walls
    assert all("background_grain" in c for c in calls if c["kind"] == "nuclei")
    assert any("wall_thickness" in c for c in calls if c["kind"] == "membrane")
    train(tmp_path / "m", kind="mixed", varied=True, **_tiny_training(steps=1, validate_stacks=1))
    card = json.loads((tmp_path / "m" / "model_card.json").read_text())
    assert "kind='nuclei') for 50% of the stacks" in card["data"]["generator"]
    assert "bright_background=True" in card["data"]["options_nuclei"]
    assert "random_membrane_options" in card["data"]["options_membrane"]
    assert [(card[k]["kind"], card[k]["varied"]) for k in ("validation", "validation_varied", "validation_nuclei")] \
        == [("membrane", False), ("membrane", True), ("nuclei", True)]
    # re-scoring from the command line fills the same sets
    from cp3d.model.train import main

    main([str(tmp_path / "m"), "--validate-only", "--kind", "mixed", "--varied", "--validate-stacks", "1",
          "--no-progress"])
    again = json.loads((tmp_path / "m" / "model_card.json").read_text())
    assert again["validation_nuclei"]["stacks"] == card["validation_nuclei"]["stacks"]


def test_dimmed_cells_stay_brighter_than_the_background_haze(monkeypatch, rendered):
    lows = []
    monkeypatch.setattr(importlib.import_module("cp3d.model.train"), "_dim_cells",
                        lambda image, labels, rng, **kw: lows.append(kw["low"]) or image)
    config = UNetConfig(**TINY, patch_size=(16, 16, 16))
    pool = _StackPool(config, seed=0, diameters=(6, 8), n_stacks=1, stack_shape=(16, 32, 32), noise=(0.05, 0.1),
                      stretch=(0.75, 1.33), refresh_every=0, kind="nuclei", varied=True)
    for k in range(16):
        n = len(lows)
        pool.make(k)
        if len(lows) > n:  # dimmed: never below the haze plus the margin
            assert lows[-1] == pytest.approx(max(0.25, rendered[-1]["background"] + 0.3))
            assert lows[-1] < 0.7
    assert lows and any(c["background"] >= 0.4 for c in rendered)  # stacks too bright to dim a cell visibly were drawn


# --------------------------------------------------------------------------- sparse annotations


def test_loss_ignores_the_voxels_a_sparse_annotation_leaves_unknown():
    labels = _labels()
    fg = torch.from_numpy((labels > 0).astype(np.float32))[None]
    flows = torch.from_numpy(cp3d.tanh_flows(labels))[None]
    known = torch.zeros_like(fg)
    known[..., : labels.shape[-1] // 2] = 1
    raw = torch.randn(1, 4, *labels.shape, requires_grad=True)
    total, _, _ = compute_loss(raw, fg, flows, known)
    total.backward()
    unknown = (known == 0)[:, None].expand_as(raw)
    assert raw.grad[unknown].abs().max() == 0 and raw.grad[~unknown].abs().max() > 0
    # all known is the dense loss
    dense = compute_loss(raw.detach(), fg, flows)
    torch.testing.assert_close(compute_loss(raw.detach(), fg, flows, torch.ones_like(fg)), dense)


def test_sparse_patches_hold_a_labelled_voxel_and_pad_as_unknown():
    from cp3d.model.train import _sample_patches, sparse_entry

    labels = np.zeros((20, 40, 40), np.uint32)
    labels[2:6, 30:36, 3:9] = 7  # one small annotated cell in a corner
    background = np.zeros(labels.shape, bool)
    background[:, 20:, :20] = labels[:, 20:, :20] == 0
    background[:, :, 20:] = True
    entry = {"image": np.random.default_rng(0).random(labels.shape, dtype=np.float32),
             "fg": (labels > 0).astype(np.float32), "flows": cp3d.tanh_flows(labels)} | sparse_entry(labels, background)
    assert entry["known"].sum() == background.sum() + (labels > 0).sum()
    rng = np.random.default_rng(1)
    for _ in range(20):
        image, fg, flows, known = _sample_patches([entry], rng, 2, (24, 16, 16))
        assert known.shape == fg.shape == (2, 24, 16, 16)
        assert (fg.flatten(1).sum(1) > 0).all()  # every patch holds part of the annotated cell
        # each stack slice holds known voxels; the 4 slices of z padding are unknown, not background
        assert ((known.flatten(2).sum(2) == 0).sum(1) == 4).all()
        assert ((fg > 0) <= (known > 0)).all()


def _write_sparse(folder, shape=(16, 32, 32), diameter=8, seed=0, keep=3, h5=False):
    """A stack with only `keep` cells labelled and the background around them marked."""
    folder.mkdir(parents=True, exist_ok=True)
    image, labels = cp3d.data.synthetic_stack(shape, diameter, seed=seed, noise=0.1)
    kept = np.isin(labels, np.unique(labels[labels > 0])[:keep])
    sparse = np.where(kept, labels, 0).astype(np.uint32)
    background = (labels == 0) & ndimage.binary_dilation(kept, iterations=3)
    if h5:
        import h5py

        with h5py.File(folder / f"sparse{seed}.h5", "w") as f:
            f["raw"], f["label"], f["background"] = image, sparse, background.astype(np.uint8)
    else:
        cp3d.io.write_image(folder / f"sparse{seed}.tif", image)
        cp3d.io.write_labels(folder / f"sparse{seed}_masks.tif", sparse)
        cp3d.io.write_labels(folder / f"sparse{seed}_background.tif", background.astype(np.uint8))
    return folder, labels, sparse, background


def test_sparse_annotations_are_read_from_tiff_and_hdf5(tmp_path, caplog):
    pytest.importorskip("h5py")
    from cp3d.model.annotated import find_pairs, read_annotated

    folder, _, sparse, background = _write_sparse(tmp_path / "data")
    _write_sparse(folder, seed=1, h5=True)
    with caplog.at_level(logging.WARNING):
        pairs = find_pairs(folder)
    assert [p[0].name for p in pairs] == ["sparse0.tif", "sparse1.h5"] and "skipping" not in caplog.text
    tiff, h5 = (read_annotated(*pair) for pair in pairs)
    assert tiff.background.dtype == bool and np.array_equal(tiff.background, background)
    np.testing.assert_array_equal(tiff.labels, sparse)
    assert h5.background is not None and h5.background.any()
    dense = read_annotated(*find_pairs(_write_pairs(tmp_path / "dense", 1))[0])
    assert dense.background is None


@pytest.mark.parametrize("background, match", [
    (np.ones((16, 32, 33), np.uint8), "shape"),
    (np.ones((16, 32, 32), np.uint8), "cells as background"),
])
def test_bad_background_masks_are_refused(tmp_path, background, match):
    from cp3d.model.annotated import find_pairs, read_annotated

    folder, *_ = _write_sparse(tmp_path / "data")
    cp3d.io.write_labels(folder / "sparse0_background.tif", background)
    with pytest.raises(ValueError, match=match):
        read_annotated(*find_pairs(folder)[0])


def test_sparse_training_end_to_end(tmp_path):
    folder, *_ = _write_sparse(tmp_path / "data")
    _write_pairs(folder, 1)  # a wholly annotated stack beside it, made sparse by sparse=True
    out = tmp_path / "run"
    train(out, **_tiny_training(steps=2, validate_stacks=1) | {"data": folder, "sparse": True})
    card = json.loads((out / "model_card.json").read_text())
    assert card["data"]["sparse"] is True and card["data"]["validation_stacks"] == []  # none held out
    fractions = {s["name"]: s["known_fraction"] for s in card["data"]["stacks"]}
    assert 0 < fractions["sparse0.tif"] < 0.5 and 0 < fractions["stack0.tif"] < 1
    # sparse validation masks would score every unlabelled cell as a false positive
    with pytest.raises(ValueError, match="whole annotations"):
        train(tmp_path / "x", **_tiny_training(steps=1) | {"data": folder, "validate_data": folder})
    with pytest.raises(ValueError, match="pass data"):
        train(tmp_path / "x", **_tiny_training(steps=1, sparse=True))


def test_training_from_annotated_stacks_in_memory_and_stopped_by_the_callback(tmp_path):
    from cp3d.model.annotated import AnnotatedStack

    image, labels = cp3d.data.synthetic_stack((16, 32, 32), 8, seed=3, noise=0.1)
    stack = AnnotatedStack("corrected", image, labels.astype(np.uint32), (1.0, 1.0, 1.0), labels == 0)
    seen = []
    out = tmp_path / "run"
    train(out, **_tiny_training(steps=5, checkpoint_every=100) | {
        "data": [stack], "callback": lambda info: seen.append(info["step"]) or info["step"] == 2})
    assert seen == [1, 2]
    card = json.loads((out / "model_card.json").read_text())
    assert card["stopped_at"] == 2 and card["steps"] == 2 and card["data"]["folder"] == ["corrected"]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    assert load_model(out).config.base_features == TINY["base_features"]
    with pytest.raises(TypeError, match="AnnotatedStack"):
        train(tmp_path / "x", **_tiny_training(steps=1) | {"data": [image]})


def test_cli_train_sparse(tmp_path):
    from cp3d import cli

    folder = _write_pairs(tmp_path / "data", 1)
    out = tmp_path / "run"
    assert cli.main(["train", str(out), "--data", str(folder), "--sparse", "--steps", "1", "--patch-size",
                     "16,16,16", "--no-progress"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["arguments"]["sparse"] is True and card["data"]["stacks"][0]["sparse"] is True


def test_fine_tuning_takes_the_network_of_the_model_it_starts_from(tmp_path):
    start = save_model(UNet3D(base_features=4, depth=2, train_diameter=12.0, tanh_scale=4.0).eval(), tmp_path / "m")
    folder = _write_pairs(tmp_path / "data", 1)
    tuned = train(tmp_path / "run", data=folder, init=start, steps=1, batch_size=1, patch_size=(16, 16, 16),
                  device="cpu", progress=False, validate_stacks=0)
    assert tuned.config.to_dict() | {"patch_size": None} == load_model(start).config.to_dict() | {"patch_size": None}
    with pytest.raises(ValueError, match="different configuration"):
        train(tmp_path / "x", data=folder, init=start, steps=1, patch_size=(16, 16, 16), depth=3, progress=False)
    # resumed without restating the network: the checkpoint's
    resumed = train(tmp_path / "run", data=folder, resume=tmp_path / "run", steps=2, batch_size=1,
                    patch_size=(16, 16, 16), device="cpu", progress=False, validate_stacks=0)
    assert resumed.config == tuned.config


def test_from_corrections_learns_the_cells_touched_and_the_background_erased():
    from cp3d.model.annotated import from_corrections

    segmented = np.zeros((4, 12, 12), np.uint32)
    segmented[:, :4, :4], segmented[:, :4, 6:10], segmented[:, 8:, :4], segmented[:, 8:, 8:] = 1, 2, 3, 4
    image = np.ones(segmented.shape, np.float32)
    corrected = segmented.copy()
    corrected[:, :4, 4:6] = 1  # cell 1 grown into the gap: merged with cell 2
    corrected[corrected == 2] = 1
    corrected[:, 8:, 2:4] = 5  # cell 3 split in two
    corrected[:, 8:, 8:] = 0  # cell 4 erased: not a cell
    stack = from_corrections(image, corrected, segmented, voxel_size=(2, 1, 1))
    assert sorted(np.unique(stack.labels)) == [0, 1, 3, 5] and stack.voxel_size == (2.0, 1.0, 1.0)
    assert np.array_equal(stack.background, segmented == 4)
    # unchanged labels: nothing to learn from; without the segmentation every cell is learnt and 0 is unknown
    with pytest.raises(ValueError, match="no corrected cell"):
        from_corrections(image, segmented, segmented)
    painted = from_corrections(image, segmented)
    assert np.array_equal(painted.labels, segmented) and painted.background is None
    whole = from_corrections(image, corrected, segmented, whole=True)
    assert np.array_equal(whole.labels, corrected) and np.array_equal(whole.background, corrected == 0)
    with pytest.raises(ValueError, match="same 3D stack"):
        from_corrections(image, segmented[:2])
    with pytest.raises(ValueError, match="integers"):
        from_corrections(image, segmented.astype(float))


def test_keep_loss_pulls_only_the_unknown_voxels_towards_the_starting_model():
    from cp3d.model.train import keep_loss

    teacher = torch.randn(1, 4, 6, 8, 8)
    unknown = torch.zeros(1, 6, 8, 8)
    unknown[..., :4] = 1
    raw = teacher.clone().requires_grad_(True)
    at_teacher = keep_loss(raw, teacher, unknown)
    at_teacher.backward()
    assert raw.grad.abs().max() < 1e-6  # the teacher's own output is the minimum
    other = (teacher + torch.randn_like(teacher)).requires_grad_(True)
    keep_loss(other, teacher, unknown).backward()
    known = (unknown == 0)[:, None].expand_as(other)
    assert other.grad[known].abs().max() == 0 and other.grad[~known].abs().max() > 0


def test_sparse_fine_tuning_keeps_the_starting_model_where_the_annotation_is_silent(tmp_path):
    start = save_model(UNet3D(**TINY).eval(), tmp_path / "start")
    folder, *_ = _write_sparse(tmp_path / "data")
    kw = dict(data=folder, init=start, steps=2, batch_size=1, patch_size=(16, 16, 16), device="cpu",
              progress=False, validate_stacks=0)
    train(tmp_path / "kept", **kw)
    card = json.loads((tmp_path / "kept" / "model_card.json").read_text())
    assert card["data"]["keep"] == {"weight": 1.0, "starting_model": str(start)}
    train(tmp_path / "left_out", keep_weight=0.0, **kw)
    assert json.loads((tmp_path / "left_out" / "model_card.json").read_text())["data"]["keep"] is None
    with pytest.raises(ValueError, match="keep_weight"):
        train(tmp_path / "x", keep_weight=-1.0, **kw)
