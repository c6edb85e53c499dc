"""The command line as a user meets it: outputs are never destroyed, errors are messages."""

import importlib
import json
import os

import numpy as np
import pytest
import tifffile

import cp3d
from cp3d import cli
from cp3d.segment import Segmentation

SEGMENT_MODULE = importlib.import_module("cp3d.segment")


@pytest.fixture
def fake_segment(monkeypatch):
    """segment() replaced by a spy returning one cell: the CLI's file handling without a network."""
    calls = []

    def spy(image, model=None, **kwargs):
        calls.append(kwargs)
        labels = np.zeros(image.shape, np.uint32)
        labels[..., :2, :2] = 1
        return Segmentation(labels, np.zeros((3, *image.shape), np.float32), np.zeros(image.shape, np.float32),
                            {"predict": 0.0, "reconstruct": 0.0}, 10.0, model or "tanh")

    monkeypatch.setattr(SEGMENT_MODULE, "segment", spy)
    return calls


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.tif"
    cp3d.io.write_image(path, np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8))
    return path


def test_segment_never_writes_onto_its_input(tmp_path, image, fake_segment, capsys):
    before = image.read_bytes()
    (tmp_path / "link.tif").symlink_to(image)
    for output in (image, tmp_path / "link.tif"):
        for extra in ([], ["--overwrite"]):
            assert cli.main(["segment", str(image), "-o", str(output), *extra]) == 2
            assert "is the input" in capsys.readouterr().err
        assert cli.main(["segment", str(image), "-o", str(tmp_path / "l.tif"), "--save-flows", str(output)]) == 2
    assert image.read_bytes() == before and not fake_segment
    assert sorted(os.listdir(tmp_path)) == ["in.tif", "link.tif"]


def test_segment_refuses_an_existing_output_unless_overwrite(tmp_path, image, fake_segment, capsys):
    out = tmp_path / "out.tif"
    out.write_bytes(b"precious")
    assert cli.main(["segment", str(image), "-o", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious" and not fake_segment
    assert cli.main(["segment", str(image), "-o", str(out), "--quiet", "--overwrite"]) == 0
    assert cp3d.io.read_image(out).data.max() == 1


@pytest.mark.parametrize("where", ["labels", "flows"])
def test_segment_checks_every_output_before_any_work(tmp_path, image, fake_segment, capsys, where):
    folder = tmp_path / "a_folder.tif"
    folder.mkdir()
    outputs = {"labels": str(tmp_path / "l.tif"), "flows": str(tmp_path / "f.tif")}
    outputs[where] = str(folder)
    assert cli.main(["segment", str(image), "-o", outputs["labels"], "--save-flows", outputs["flows"]]) == 2
    assert "is a folder" in capsys.readouterr().err and not fake_segment
    assert sorted(os.listdir(tmp_path)) == ["a_folder.tif", "in.tif"]


def test_segment_outputs_land_together_or_not_at_all(tmp_path, image, fake_segment, monkeypatch, capsys):
    real_imwrite = tifffile.imwrite

    def flows_fail(fh, data, **kwargs):
        if data.dtype == np.float32:  # the maps; the labels are uint32 and written first
            raise OSError("No space left on device")
        return real_imwrite(fh, data, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", flows_fail)
    assert cli.main(["segment", str(image), "-o", str(tmp_path / "l.tif"), "--save-flows",
                     str(tmp_path / "f.tif"), "--quiet"]) == 2
    assert "No space left" in capsys.readouterr().err and fake_segment
    assert sorted(os.listdir(tmp_path)) == ["in.tif"]  # no labels alone, no temporary files


def test_evaluate_reads_cp3ds_own_one_slice_output(tmp_path, fake_segment, capsys):
    one = tmp_path / "one.tif"
    cp3d.io.write_image(one, np.ones((1, 8, 8), np.float32))
    assert cli.main(["segment", str(one), "-o", str(tmp_path / "labels.tif"), "--quiet"]) == 0
    assert cli.main(["evaluate", str(tmp_path / "labels.tif"), str(tmp_path / "labels.tif")]) == 0
    assert '"ap50": 1.0' in capsys.readouterr().out


def test_evaluate_reads_labels_from_tiff_and_ome_zarr(tmp_path, capsys):
    truth = cp3d.data.synthetic_stack((8, 16, 16), 6, seed=0).labels
    cp3d.io.write_labels(tmp_path / "truth.tif", truth)
    cp3d.io.write_ome_zarr(tmp_path / "labels.zarr", truth)  # cp3d segment -o NEW.zarr
    cp3d.io.write_ome_zarr(tmp_path / "image.zarr", truth.astype(np.float32))
    cp3d.io.write_ome_zarr_labels(tmp_path / "image.zarr", truth)  # cp3d segment -o IMAGE.zarr
    for pred in ("labels.zarr", "image.zarr/labels/cells"):
        assert cli.main(["evaluate", str(tmp_path / "truth.tif"), str(tmp_path / pred)]) == 0
        assert '"ap50": 1.0' in capsys.readouterr().out, pred
    # the image rather than its labels, and an image that is not labels at all: named, not scored
    assert cli.main(["evaluate", str(tmp_path / "truth.tif"), str(tmp_path / "image.zarr")]) == 2
    assert "label images ['cells']" in capsys.readouterr().err
    cp3d.io.write_image(tmp_path / "float.tif", truth.astype(np.float32) + 0.5)
    assert cli.main(["evaluate", str(tmp_path / "truth.tif"), str(tmp_path / "float.tif")]) == 2
    assert "float.tif" in capsys.readouterr().err


def test_synth_refuses_to_replace_a_dataset_unless_overwrite(tmp_path, capsys):
    args = ["synth", str(tmp_path), "--shape", "8", "16", "16", "--diameter", "6", "--count", "1"]
    assert cli.main(args) == 0
    before = (tmp_path / "labels_000.tif").read_bytes()
    assert cli.main([*args, "--seed", "1"]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "labels_000.tif").read_bytes() == before
    assert cli.main([*args, "--seed", "1", "--overwrite"]) == 0
    assert (tmp_path / "labels_000.tif").read_bytes() != before


def test_ctrl_c_writes_nothing(tmp_path, image, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SEGMENT_MODULE, "segment", interrupted)
    assert cli.main(["segment", str(image), "-o", str(tmp_path / "l.tif"), "--save-flows",
                     str(tmp_path / "f.tif")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.tif"]


@pytest.mark.parametrize("option", [["--diameter", "0.1"], ["--diameter", "1e6"], ["--voxel-size", "1e6", "1", "1"],
                                    ["--diameter", "1e-300"]])
def test_absurd_rescaling_is_refused_before_allocating(tmp_path, image, option, monkeypatch, capsys):
    """A clear error naming the option and the bytes, not a MemoryError traceback (nor, elsewhere, an allocation)."""
    import cp3d.model

    def no_prediction(*args, **kwargs):
        raise AssertionError("predicted before the memory check")

    monkeypatch.setattr(cp3d._backend, "physical_memory", lambda: 2**30)  # the same answer on any machine
    monkeypatch.setattr(cp3d.model, "predict", no_prediction)
    assert cli.main(["segment", str(image), "-o", str(tmp_path / "l.tif"), "--quiet", *option]) == 2
    err = capsys.readouterr().err
    assert option[0][2:].replace("-", "_") in err and "more than this machine's memory" in err, err
    assert sorted(os.listdir(tmp_path)) == ["in.tif"]


@pytest.mark.parametrize("command", ["segment", "reconstruct"])
def test_chunked_path_never_writes_onto_its_input_or_an_existing_output(command, tmp_path):
    """The dask path (--chunks) reads its input lazily while writing: it must refuse before any work."""
    from cp3d.cli import main

    source = tmp_path / "in.tif"
    cp3d.io.write_image(source, np.zeros((8, 4, 16, 16) if command == "reconstruct" else (8, 16, 16),
                                        np.float32).reshape(-1, 16, 16))
    before = source.read_bytes()
    assert main([command, str(source), "-o", str(source), "--chunks", "4", "8", "8", "--quiet"]) == 2
    assert source.read_bytes() == before
    existing = tmp_path / "labels.tif"
    existing.write_bytes(b"keep me")
    assert main([command, str(source), "-o", str(existing), "--chunks", "4", "8", "8", "--quiet"]) == 2
    assert existing.read_bytes() == b"keep me"


def test_segment_estimates_the_cell_size_by_default(tmp_path, capsys):
    # cells 14 voxels across, where the bundled model was trained at 10.25
    image, _ = cp3d.data.synthetic_stack((40, 96, 96), 14, seed=3)
    cp3d.io.write_image(tmp_path / "stack.tif", image)
    assert cli.main(["segment", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "labels.tif"), "--quiet",
                     "--no-augment"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    # the default model too is chosen: each stain model's estimating passes are its trial
    assert 11.5 < report["diameter"] < 17.5 and "choose" in report["seconds"] and report["model"] == "tanh"
    assert f"diameter 'auto': {report['diameter']:.2f} voxels" in captured.err and "model 'auto': tanh" in captured.err
    assert cli.main(["segment", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "labels.tif"), "--quiet",
                     "--no-augment", "--model", "tanh", "--overwrite"]) == 0
    named = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert named["diameter"] == report["diameter"] and "estimate" in named["seconds"] and named["model"] == "tanh"


def test_segment_names_each_progress_bar(tmp_path, capsys):
    image, _ = cp3d.data.synthetic_stack((32, 64, 64), 14, seed=3)
    cp3d.io.write_image(tmp_path / "stack.tif", image)
    assert cli.main(["segment", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "labels.tif"),
                     "--no-augment"]) == 0
    err = capsys.readouterr().err
    # the passes of diameter='auto', numbered, for each model the default chooses between
    assert all(f"{model}: estimate 1: d 10.2" in err and f"{model}: estimate 2: d " in err
               for model in ("tanh", "nuclei"))


@pytest.mark.parametrize("option, name", [("-o", "labels.png"), ("--save-flows", "maps.npy"), ("--table", "cells.tsv"),
                                          ("--preview", "preview.tif")])
def test_segment_refuses_an_output_named_for_another_format(tmp_path, image, fake_segment, capsys, option, name):
    outputs = {"-o": "labels.tif"} | {option: name}
    argv = ["segment", str(image)] + [x for o, n in outputs.items() for x in (o, str(tmp_path / n))]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert name in err and "name it so" in err and not fake_segment
    assert sorted(os.listdir(tmp_path)) == ["in.tif"]


def test_chunked_run_without_the_dask_extra_says_what_to_install(tmp_path, image, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "cp3d.dask", None)  # what an install without the dask extra gives
    monkeypatch.delattr(cp3d, "dask", raising=False)  # left by an earlier import in this process
    assert cli.main(["segment", str(image), "-o", str(tmp_path / "l.zarr")]) == 2
    assert "pip install 'cp3d[dask]'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.tif"]


def test_warnings_reach_the_cli_user_as_one_line_each(tmp_path, image, monkeypatch, capsys):
    import warnings

    def warns_each_pass(image, model=None, **kwargs):
        for _ in range(3):  # as each pass of diameter='auto' would
            warnings.warn("the stack is probably not of the kind the model was trained on")
        labels = np.zeros(image.shape, np.uint32)
        return Segmentation(labels, np.zeros((3, *image.shape), np.float32), np.zeros(image.shape, np.float32),
                            {"predict": 0.0, "reconstruct": 0.0}, 10.0, model or "tanh")

    monkeypatch.setattr(SEGMENT_MODULE, "segment", warns_each_pass)
    assert cli.main(["segment", str(image), "-o", str(tmp_path / "l.tif"), "--diameter", "10", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("cp3d segment: warning: the stack is probably not of the kind") == 1
    assert "UserWarning" not in err and "warns_each_pass" not in err
