"""cp3d.dask: chunked reconstruction and segmentation equal the whole-volume results."""

import json
import os

import numpy as np
import pytest

import cp3d
from cp3d import io
from cp3d.segment import cell_extent, model_border_volume, model_tanh_scale

da = pytest.importorskip("dask.array")
pytest.importorskip("zarr")
cp3d_dask = pytest.importorskip("cp3d.dask")


def _maps(targets, shape=(16, 32, 32), diameter=8, seed=3):
    """Noisy flows of a synthetic stack: realistic, imperfect trajectories."""
    _, truth = cp3d.data.synthetic_stack(shape, diameter, seed=seed)
    clean = cp3d.tanh_flows(truth, diameter / 2) if targets == "tanh" else cp3d.heat_flows(truth)
    noise = np.random.default_rng(seed).normal(0, 0.2, clean.shape)
    return np.clip(clean + noise, -1, 1).astype(np.float32), truth > 0


def _chunked(flows, foreground, chunks, **kwargs):
    return cp3d_dask.reconstruct(da.from_array(flows, chunks=(3,) + chunks), da.from_array(foreground, chunks=chunks),
                                 **kwargs)


def _straddles(labels, chunks):
    """Whether some instance spans a chunk corner in y and x (lies in four chunks)."""
    for lab in np.unique(labels)[1:]:
        _, y, x = np.nonzero(labels == lab)
        if len(np.unique(y // chunks[1])) > 1 and len(np.unique(x // chunks[2])) > 1:
            return True
    return False


@pytest.mark.parametrize("targets", ["tanh", "heat"])
@pytest.mark.parametrize("shape, chunks", [((16, 32, 32), (8, 16, 16)), ((12, 24, 24), (5, 6, 7)),
                                           ((40, 72, 72), (32, 36, 64))],
                         ids=["four-chunk-cells", "chunks-smaller-than-cells", "stored-in-parts-of-chunks"])
def test_chunked_equals_whole(targets, shape, chunks):
    flows, foreground = _maps(targets, shape)
    whole = cp3d.reconstruct(flows, foreground, diameter=8, targets=targets)
    labels = _chunked(flows, foreground, chunks, diameter=8, targets=targets)
    assert isinstance(labels, da.Array) and labels.dtype == np.uint32
    out = labels.compute()
    assert whole.max() > 5
    assert _straddles(whole, chunks)
    # Equal up to renumbering is the promise; the numbering (first voxel in C order) is the same too.
    np.testing.assert_array_equal(out, whole)


def test_chunked_min_border_volume_equals_whole():
    # the border rule needs the whole instance's volume: a cell cut by the stack's face and by chunk borders
    flows, foreground = _maps("tanh", (16, 32, 32))
    options = dict(diameter=8, min_border_volume=60.0)
    whole = cp3d.reconstruct(flows, foreground, **options)
    assert whole.max() < cp3d.reconstruct(flows, foreground, diameter=8).max()  # some border instance dropped
    np.testing.assert_array_equal(_chunked(flows, foreground, (8, 16, 16), **options).compute(), whole)


@pytest.mark.parametrize("channels", [None, 3])
def test_chunk_files_read_any_box_as_the_whole_volume(tmp_path, channels):
    from cp3d.dask import _ChunkFiles, _Grid

    rng = np.random.default_rng(0)
    grid = _Grid((10, 13, 17), (4, 5, 6))
    lead = () if channels is None else (channels,)
    volume = rng.integers(1, 100, lead + grid.shape).astype(np.int32)
    files = _ChunkFiles(tmp_path, "v", grid, np.int32, -7, (2, 1, 3), channels=channels)
    skipped = 5  # a chunk never written reads as the fill value
    for b in range(len(grid)):
        if b != skipped:
            files[grid.block(b)] = volume[(slice(None),) * len(lead) + grid.block(b)]
    volume[(slice(None),) * len(lead) + grid.block(skipped)] = -7
    whole = (slice(None),) * len(lead)
    boxes = [grid.block(b) for b in range(len(grid))]  # whole chunks
    boxes += [grid.grow(grid.block(b), (2, 1, 3)) for b in range(len(grid))]  # with halos as thick as the slabs
    boxes += [grid.grow(grid.block(b), 4) for b in range(len(grid))]  # thicker: whole neighbouring files
    for _ in range(20):  # anywhere
        starts = [int(rng.integers(0, n)) for n in grid.shape]
        boxes.append(tuple(slice(a, min(n, a + int(rng.integers(1, 9)))) for a, n in zip(starts, grid.shape)))
    for box in boxes:
        np.testing.assert_array_equal(files[whole + box], volume[whole + box], err_msg=str(box))


def test_escaped_trajectories_are_recomputed():
    # A halo of one voxel and a step of a cell diameter: most trajectories leave their window.
    flows, foreground = _maps("tanh", shape=(12, 24, 24))
    kwargs = dict(diameter=8, step=8.0, n_iter=12)
    whole = cp3d.reconstruct(flows, foreground, **kwargs)
    np.testing.assert_array_equal(_chunked(flows, foreground, (4, 8, 8), halo=1, **kwargs).compute(), whole)


@pytest.mark.parametrize("kwargs", [dict(sigma=1.0), dict(inward=True), dict(max_flow_error=None, min_overlap=0.5),
                                    dict(closing_radius=(1, 2, 2), diameter_range=(4, 20))])
def test_keywords_match_whole(kwargs):
    flows, foreground = _maps("tanh", shape=(12, 24, 24))
    if kwargs.get("inward"):
        flows = -flows
    whole = cp3d.reconstruct(flows, foreground, diameter=8, **kwargs)
    np.testing.assert_array_equal(_chunked(flows, foreground, (6, 10, 10), diameter=8, **kwargs).compute(), whole)


def test_probability_foreground_and_empty_volume():
    flows, foreground = _maps("tanh", shape=(12, 24, 24))
    probability = np.where(foreground, 0.9, 0.1).astype(np.float32)
    whole = cp3d.reconstruct(flows, probability, diameter=8)
    np.testing.assert_array_equal(_chunked(flows, probability, (6, 12, 12), diameter=8).compute(), whole)
    empty = _chunked(flows, np.zeros_like(foreground), (6, 12, 12)).compute()
    assert empty.shape == foreground.shape and not empty.any()


def test_bad_inputs():
    flows, foreground = _maps("tanh", shape=(12, 24, 24))
    with pytest.raises(ValueError, match="foreground shape"):
        cp3d_dask.reconstruct(da.from_array(flows), da.from_array(foreground[1:]))
    with pytest.raises(ValueError, match="backend"):
        cp3d_dask.reconstruct(da.from_array(flows), da.from_array(foreground), backend="cuda")
    with pytest.raises(ValueError, match="chunks"):
        cp3d_dask.reconstruct(da.from_array(flows), da.from_array(foreground), chunks=(0, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        cp3d_dask.reconstruct(da.from_array(flows.astype(int)), da.from_array(foreground))


def test_local_cluster_two_workers():
    distributed = pytest.importorskip("distributed")
    flows, foreground = _maps("tanh")
    whole = cp3d.reconstruct(flows, foreground, diameter=8)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, distributed.Client(cluster):
        out = _chunked(flows, foreground, (8, 16, 16), diameter=8).compute()
    np.testing.assert_array_equal(out, whole)


def test_chunked_prediction_equals_whole(monkeypatch):
    torch = pytest.importorskip("torch")
    from cp3d.model import UNet3D, predict
    from cp3d.model.predict import TILE_ELEMENTS

    torch.manual_seed(0)
    net = UNet3D(base_features=4, depth=2).eval()
    image, _ = cp3d.data.synthetic_stack((16, 96, 96), 8, seed=1)
    m = net.config.multiple
    context = -(-net.config.receptive_radius // m) * m
    # A tile budget of half the stack: several prediction chunks, each predicted with its context.
    budget = image.size // 2 * 2 * net.config.base_features
    for voxel_size in (None, (1.0, 1.3, 1.3)):
        # cp3d.dask.segment predicts at the voxel size that brings cells to the training size.
        model_voxel = None if voxel_size is None else (voxel_size[0] / voxel_size[2], 1.0, 1.0)
        whole = predict(image, net, augment=False, voxel_size=model_voxel)
        with monkeypatch.context() as patch:
            patch.setitem(TILE_ELEMENTS, "cpu", budget)
            chunks = cp3d_dask._prediction_chunks(net, image.shape, context, "cpu")
            assert np.prod([-(-n // c) for n, c in zip(image.shape, chunks)]) >= 4
            result = cp3d_dask.segment(da.from_array(image, chunks=(8, 32, 32)), net, voxel_size=voxel_size,
                                       device="cpu")
        np.testing.assert_allclose(result.flows.compute(), whole.flows, atol=1e-5)
        np.testing.assert_allclose(result.foreground.compute(), whole.foreground, atol=1e-5)
    extent = cell_extent(None, voxel_size, net.config.train_diameter)
    # what cp3d.segment reconstructs with: the model's tanh scale and its border rule
    labels = cp3d.reconstruct(result.flows.compute(), result.foreground.compute(), diameter=extent,
                              tanh_scale=model_tanh_scale(net.config, extent),
                              min_border_volume=model_border_volume(net.config, extent))
    np.testing.assert_array_equal(result.labels.compute(), labels)


@pytest.mark.parametrize("kind, chosen", [("membrane", "tanh"), ("nuclei", "nuclei")])
def test_segment_chooses_the_model_on_the_central_crop(tmp_path, monkeypatch, kind, chosen):
    pytest.importorskip("torch")
    monkeypatch.setattr(cp3d_dask, "CENTRAL_CROP", (24, 48, 48))
    image, _ = cp3d.data.synthetic_stack((24, 64, 64), 10, kind=kind, seed=4, noise=0.08)
    sample = cp3d_dask.segment_central_crop(image, diameter=10)
    assert sample.labels.shape == (24, 48, 48) and sample.model == chosen
    result = cp3d_dask.segment(da.from_array(image, chunks=(24, 32, 32)), diameter=10,
                               temporary_directory=tmp_path)
    assert result.model == chosen
    np.testing.assert_array_equal(result.labels.compute(),
                                  cp3d.segment(image, chosen, diameter=10, augment=False).labels)


def test_ome_zarr_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 1000, (6, 20, 24)).astype(np.uint16)
    labels = np.zeros(image.shape, np.uint32)
    labels[1:4, 2:9, 3:7] = 7
    path = tmp_path / "stack.ome.zarr"
    io.write_ome_zarr(path, image, voxel_size=(2.0, 0.25, 0.25), chunks=(3, 10, 12))
    read = io.open_image(path)
    assert isinstance(read.data, da.Array) and read.data.chunksize == (3, 10, 12)
    np.testing.assert_array_equal(read.data.compute(), image)
    assert read.voxel_size == (2.0, 0.25, 0.25)
    io.write_ome_zarr_labels(path, labels)
    cells = io.read_ome_zarr(path / "labels" / "cells")
    np.testing.assert_array_equal(cells.data.compute(), labels)
    assert cells.voxel_size == (2.0, 0.25, 0.25) and cells.data.dtype == np.uint32
    assert json.loads((path / "labels" / "zarr.json").read_text())["attributes"]["ome"]["labels"] == ["cells"]
    with pytest.raises(FileExistsError):
        io.write_ome_zarr_labels(path, labels)
    with pytest.raises(FileExistsError):
        io.write_ome_zarr(path, image)


def test_interrupted_writes_leave_nothing(tmp_path, monkeypatch):
    from ome_zarr import writer

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    image = np.zeros((4, 8, 8), np.uint16)
    io.write_ome_zarr(tmp_path / "image.zarr", image)
    monkeypatch.setattr(writer, "write_multiscale", fail)
    with pytest.raises(KeyboardInterrupt):
        io.write_ome_zarr(tmp_path / "other.zarr", image)
    with pytest.raises(KeyboardInterrupt):
        io.write_ome_zarr_labels(tmp_path / "image.zarr", image.astype(np.uint32))
    assert sorted(os.listdir(tmp_path)) == ["image.zarr"]
    assert os.listdir(tmp_path / "image.zarr" / "labels") == ["zarr.json"]


def test_lazy_tiff_matches_read_image(tmp_path):
    image = np.random.default_rng(1).random((5, 12, 16)).astype(np.float32)
    io.write_image(tmp_path / "stack.tif", image, voxel_size=(3.0, 0.5, 0.5))
    lazy = io.open_image(tmp_path / "stack.tif", chunks=(2, 12, 16))
    assert isinstance(lazy.data, da.Array) and lazy.data.chunksize == (2, 12, 16)
    np.testing.assert_array_equal(lazy.data.compute(), io.read_image(tmp_path / "stack.tif").data)
    assert lazy.voxel_size == (3.0, 0.5, 0.5)


def test_cli_reconstruct_from_saved_maps(tmp_path, capsys):
    from cp3d.cli import main

    flows, foreground = _maps("tanh", shape=(12, 24, 24))
    maps = np.concatenate([flows, foreground[None].astype(np.float32)])
    io.write_image(tmp_path / "maps.tif", maps.reshape(-1, *maps.shape[2:]))  # no stored settings
    out = tmp_path / "labels.tif"
    assert main(["reconstruct", str(tmp_path / "maps.tif"), "-o", str(out), "--diameter", "8", "--chunks", "6", "12",
                 "12", "--quiet"]) == 0
    np.testing.assert_array_equal(io.read_image(out).data, cp3d.reconstruct(flows, foreground, diameter=8))
    assert "holds no reconstruction settings" in capsys.readouterr().err  # the defaults are said, not silent
    assert main(["reconstruct", str(tmp_path / "maps.tif"), "-o", str(tmp_path / "again.tif"), "--diameter", "8",
                 "--tanh-scale", "4", "--quiet"]) == 0
    assert "reconstruction settings" not in capsys.readouterr().err


def test_outputs_are_lazy_and_computed_once(tmp_path):
    flows, foreground = _maps("tanh", shape=(12, 24, 24))
    labels = _chunked(flows, foreground, (6, 12, 12), diameter=8, temporary_directory=tmp_path)
    (scratch,) = os.listdir(tmp_path)
    assert os.listdir(tmp_path / scratch) == []  # nothing computed by the call
    whole = cp3d.reconstruct(flows, foreground, diameter=8)
    np.testing.assert_array_equal(labels.compute(), whole)
    # The table and the instances stay; the other intermediate volumes are gone once read.
    assert sorted(os.listdir(tmp_path / scratch)) == ["centroids.npy", "instances", "labels.npy"]

    def written():
        return {str(p): p.stat().st_mtime_ns for p in (tmp_path / scratch).rglob("*")}

    # A second computation reads the stored instances through the saved table instead of reconstructing again.
    before = written()
    np.testing.assert_array_equal(labels[:, 3:20].compute(), whole[:, 3:20])
    assert written() == before
    del labels
    assert os.listdir(tmp_path) == []  # the store goes with the array


def test_segment_is_lazy(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from cp3d.model import UNet3D

    torch.manual_seed(0)
    net = UNet3D(base_features=4, depth=2).eval()
    calls = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x: calls.append(x.shape) or forward(x))
    image, _ = cp3d.data.synthetic_stack((16, 32, 32), 8, seed=1)
    result = cp3d_dask.segment(da.from_array(image, chunks=(8, 16, 16)), net, temporary_directory=tmp_path)
    assert calls == [] and isinstance(result.labels, da.Array)
    labels, flows = da.compute(result.labels, result.flows)
    n = len(calls)
    assert n > 0
    np.testing.assert_array_equal(result.labels.compute(), labels)
    np.testing.assert_array_equal(result.flows.compute(), flows)
    assert len(calls) == n  # the network ran once: later computations read the stored maps


def test_killed_worker_is_retried(tmp_path):
    distributed = pytest.importorskip("distributed")
    flows, foreground = _maps("tanh")
    whole = cp3d.reconstruct(flows, foreground, diameter=8)
    marker = str(tmp_path / "killed")

    def die_once(block):
        # The first worker to read a foreground chunk dies at once, as under kill -9.
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return block

    chunks = (8, 16, 16)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster):
        fg = da.from_array(foreground, chunks=chunks).map_blocks(die_once, dtype=bool, meta=np.empty((0, 0, 0), bool))
        labels = cp3d_dask.reconstruct(da.from_array(flows, chunks=(3,) + chunks), fg, diameter=8,
                                       temporary_directory=tmp_path)
        out = labels.compute()
    assert os.path.exists(marker)
    np.testing.assert_array_equal(out, whole)


def test_flow_convention_warnings_at_the_call():
    flows, foreground = _maps("tanh", shape=(12, 24, 24))
    with pytest.warns(UserWarning, match="Cellpose's dP is 5 times"):
        _chunked(5 * flows, foreground, (6, 12, 12), diameter=8)
    with pytest.warns(UserWarning, match="pass inward=True"):
        _chunked(-flows, foreground, (6, 12, 12), diameter=8)


def _worker_thread_counts():
    import numba
    import torch

    return torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, os.environ.get("MALLOC_TRIM_THRESHOLD_")


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_local_workers_share_the_cores(workers):
    # dask starts workers with OMP_NUM_THREADS=1; the CLI's one-task workers must parallelise inside the task.
    import argparse

    from distributed import get_client

    from cp3d.cli import _dask_client

    share = max(1, len(os.sched_getaffinity(0)) // workers)
    args = argparse.Namespace(workers=workers, scheduler=None, memory_limit=None)
    names = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    before = [os.environ.get(name) for name in names]
    with _dask_client(args):
        counts = get_client().run(_worker_thread_counts)
    assert [os.environ.get(name) for name in names] == before  # this process's environment restored
    assert len(counts) == workers
    # Threads shared out, and glibc's allocator defaults kept (dask's trim setting unset).
    assert all(c == (share, share, None) for c in counts.values()), counts


def test_chunks_thinner_than_the_halo_warn_and_stay_exact():
    import warnings

    flows, foreground = _maps("tanh", shape=(12, 24, 24))
    whole = cp3d.reconstruct(flows, foreground, diameter=8)
    with pytest.warns(UserWarning, match=r"thinner than the follow halo \(8, 8, 8\).*at least \(8, 8, 8\)"):
        labels = _chunked(flows, foreground, (4, 8, 8), diameter=8)
    np.testing.assert_array_equal(labels.compute(), whole)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _chunked(flows, foreground, (8, 12, 12), diameter=8)  # as thick as the halo: no warning


def test_cli_chunked_segment_estimates_the_cell_size_and_model_on_a_crop(tmp_path, capsys, monkeypatch):
    from cp3d import cli

    monkeypatch.setattr(cp3d.dask, "CENTRAL_CROP", (40, 64, 64))  # a crop smaller than the stack
    image, _ = cp3d.data.synthetic_stack((40, 96, 96), 14, seed=3)
    io.write_image(tmp_path / "stack.tif", image)
    assert cli.main(["segment", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "labels.tif"), "--chunks", "40",
                     "48", "48", "--quiet", "--no-augment"]) == 0
    out, err = capsys.readouterr()
    assert "central 40x64x64 crop: model 'tanh'" in err
    report = json.loads(out.strip().splitlines()[-1])
    assert 11.5 < report["diameter"] < 17.5 and report["model"] == "tanh"


@pytest.mark.parametrize("maps, chunked", [("maps.tif", False), ("maps.tif", True), ("maps.zarr", True)])
def test_cli_reconstruct_on_saved_maps_reproduces_segment(tmp_path, capsys, maps, chunked):
    # The post-processing alone, from --save-flows maps: the settings segment used are stored with the maps and
    # are reconstruct's defaults, so the labels are the same; the printed ones as options give them too (an
    # anisotropic voxel size makes the diameter and the tanh scale triples).
    from cp3d.cli import main

    image, _ = cp3d.data.synthetic_stack((24, 48, 48), 10, seed=2)
    io.write_image(tmp_path / "stack.tif", image)
    assert main(["segment", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "labels.tif"), "--diameter", "10",
                 "--voxel-size", "1.5", "1", "1", "--no-augment", "--save-flows", str(tmp_path / maps), "--quiet"]
                + (["--chunks", "24", "48", "48"] if chunked else [])) == 0
    settings = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reconstruction"]
    assert settings["targets"] == "tanh" and settings["diameter"][0] < settings["diameter"][2]
    assert io.read_properties(tmp_path / maps) == {"reconstruction": settings} | (
        {"voxel_size": [1.5, 1.0, 1.0]} if maps.endswith(".zarr") else {})
    labels = io.read_image(tmp_path / "labels.tif").data
    assert labels.max() > 5
    assert settings["min_border_volume"] > 0
    printed = ["--diameter", *map(str, settings["diameter"]), "--tanh-scale", *map(str, settings["tanh_scale"]),
               "--min-border-volume", str(settings["min_border_volume"])]
    for name, options in (("stored.tif", []), ("printed.tif", printed)):
        assert main(["reconstruct", str(tmp_path / maps), "-o", str(tmp_path / name), "--chunks", "12", "24", "24",
                     "--quiet"] + options) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reconstruction"] == settings
        again = io.read_image(tmp_path / name)
        np.testing.assert_array_equal(again.data, labels)
        assert again.voxel_size == (1.5, 1.0, 1.0)
    # another diameter keeps the maps' own tanh scale
    assert main(["reconstruct", str(tmp_path / maps), "-o", str(tmp_path / "d.tif"), "--quiet", "--diameter",
                 "12"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reconstruction"] == {
        "diameter": [12.0], "tanh_scale": settings["tanh_scale"], "targets": "tanh",
        "min_border_volume": settings["min_border_volume"]}


def test_cli_reconstruct_reads_the_tanh_scale_from_maps_without_settings(tmp_path, capsys):
    from cp3d.cli import main

    # oracle maps of scale 3 written without cp3d segment's settings: the default (diameter / 2 = 9) is not theirs
    _, truth = cp3d.data.synthetic_stack((32, 64, 64), 18, kind="nuclei", seed=4, noise=0)
    maps = np.concatenate([cp3d.tanh_flows(truth, scale=3.0), (truth > 0)[None].astype(np.float32)])
    io.write_image(tmp_path / "maps.tif", maps.reshape(-1, *maps.shape[2:]))
    assert main(["reconstruct", str(tmp_path / "maps.tif"), "-o", str(tmp_path / "l.tif"), "--diameter", "18",
                 "--tanh-scale", "auto", "--quiet"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    np.testing.assert_allclose(report["reconstruction"]["tanh_scale"], [3.0, 3.0, 3.0], rtol=1e-3)
    assert "tanh scale 'auto' from the central" in captured.err
    assert cp3d.metrics.evaluate(truth, io.read_image(tmp_path / "l.tif").data)["ap50"] >= 0.95
    assert main(["reconstruct", str(tmp_path / "maps.tif"), "-o", str(tmp_path / "x.tif"), "--tanh-scale", "auto",
                 "3"]) == 2
    assert "'auto' alone" in capsys.readouterr().err
