import os

import numpy as np
import pytest
import tifffile

from cp3d.io import TiffImage, read_image, write_image, write_labels


def stack(dtype=np.uint16, shape=(3, 4, 5)):
    return np.arange(np.prod(shape)).reshape(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_image_round_trip_with_voxel_size(tmp_path, dtype):
    path = tmp_path / "image.tif"
    data = stack(dtype)
    write_image(path, data, voxel_size=(2.0, 0.1625, 0.325))
    image = read_image(path)
    assert isinstance(image, TiffImage)
    expected = np.float32 if np.dtype(dtype).kind == "f" else dtype
    assert image.data.dtype == expected
    np.testing.assert_array_equal(image.data, data.astype(expected))
    assert image.voxel_size == pytest.approx((2.0, 0.1625, 0.325), rel=1e-6)


def test_labels_round_trip_as_uint32(tmp_path):
    path = str(tmp_path / "labels.tif")
    labels = stack(np.int64) * 100_000  # beyond uint16
    write_labels(path, labels, voxel_size=0.5)
    image = read_image(path)
    assert image.data.dtype == np.uint32
    np.testing.assert_array_equal(image.data, labels)
    assert image.voxel_size == pytest.approx((0.5, 0.5, 0.5))
    with tifffile.TiffFile(path) as tif:  # ImageJ reads the calibration from here
        assert tif.is_imagej
        assert tif.imagej_metadata["spacing"] == 0.5


def test_without_voxel_size_it_is_unknown(tmp_path):
    path = tmp_path / "plain.tif"
    write_image(path, stack())
    assert read_image(path).voxel_size is None


def test_reads_ome_physical_sizes_with_units(tmp_path):
    path = tmp_path / "ome.tif"
    meta = {"axes": "ZYX", "PhysicalSizeZ": 1500.0, "PhysicalSizeZUnit": "nm",
            "PhysicalSizeY": 0.25, "PhysicalSizeX": 0.2}
    tifffile.imwrite(path, stack(), ome=True, photometric="minisblack", metadata=meta)
    image = read_image(path)
    np.testing.assert_array_equal(image.data, stack())
    assert image.voxel_size == pytest.approx((1.5, 0.25, 0.2))


def test_reads_a_plain_page_per_slice_stack(tmp_path):
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        for plane in stack():
            tif.write(plane, photometric="minisblack", metadata=None)
    image = read_image(path)
    np.testing.assert_array_equal(image.data, stack())
    assert image.voxel_size is None


def test_squeezes_singleton_hyperstack_axes(tmp_path):
    path = tmp_path / "tzcyx.tif"
    data = stack()[None, :, None]  # T=1, C=1
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZCYX"})
    assert read_image(path).data.shape == (3, 4, 5)


def test_refuses_channels(tmp_path):
    path = tmp_path / "zcyx.tif"
    tifffile.imwrite(path, np.zeros((3, 2, 4, 5), np.uint16), imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ValueError, match="2 channels"):
        read_image(path)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((3, 4, 5, 3), np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match="3 channels"):
        read_image(rgb)


def test_refuses_a_single_2d_image(tmp_path):
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, np.zeros((4, 5), np.uint16))
    with pytest.raises(ValueError, match="not a 3D stack"):
        read_image(path)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    missing = tmp_path / "missing.tif"
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        read_image(missing)
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(ValueError, match="corrupt.tif"):
        read_image(corrupt)
    with pytest.raises(ValueError, match="folder"):
        read_image(tmp_path)


def test_missing_output_folder_is_not_created(tmp_path):
    folder = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        write_image(folder / "a.tif", stack())
    assert not folder.exists()


@pytest.mark.parametrize("bad", [np.zeros((4, 5)), np.zeros((1, 2, 4, 5))])
def test_write_refuses_non_3d(tmp_path, bad):
    with pytest.raises(ValueError, match="3D"):
        write_image(tmp_path / "a.tif", bad)
    with pytest.raises(ValueError, match="3D"):
        write_labels(tmp_path / "b.tif", bad.astype(np.uint16))
    assert os.listdir(tmp_path) == []


def test_write_labels_refuses_float_and_negative(tmp_path):
    with pytest.raises(TypeError, match="integer"):
        write_labels(tmp_path / "a.tif", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        write_labels(tmp_path / "a.tif", np.full((2, 2, 2), -1, np.int32))


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_output(tmp_path, monkeypatch):
    path = tmp_path / "out.tif"
    write_labels(path, stack(np.uint8))
    before = path.read_bytes()

    def broken_imwrite(fh, data, **kwargs):
        fh.write(b"II*\x00half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken_imwrite)
    with pytest.raises(OSError, match="disk full"):
        write_labels(path, stack(np.uint8) + 1)
    with pytest.raises(OSError, match="disk full"):
        write_image(tmp_path / "new.tif", stack())
    assert sorted(os.listdir(tmp_path)) == ["out.tif"]
    assert path.read_bytes() == before


def test_successful_write_leaves_only_the_output(tmp_path):
    write_image(tmp_path / "a.tif", stack(), voxel_size=(1, 1, 1))
    write_image(tmp_path / "a.tif", stack(np.float32))  # replaces it
    assert os.listdir(tmp_path) == ["a.tif"]
    assert read_image(tmp_path / "a.tif").data.dtype == np.float32


@pytest.mark.parametrize(
    "unit, scale", [("micron", 1.0), ("um", 1.0), ("\\u00B5m", 1.0), ("nm", 1e-3), ("pixel", None)]
)
def test_reads_imagej_calibration_in_its_unit(tmp_path, unit, scale):
    path = tmp_path / "ij.tif"
    meta = {"spacing": 1.5, "unit": unit, "axes": "ZYX"}
    tifffile.imwrite(path, stack(), imagej=True, resolution=(1 / 0.25, 1 / 0.2), metadata=meta)
    size = read_image(path).voxel_size
    if scale is None:
        assert size is None  # not a length: unknown
    else:
        assert size == pytest.approx((1.5 * scale, 0.2 * scale, 0.25 * scale))


# ---------------------------------------------------------------------------
# Outputs: never destroy data
# ---------------------------------------------------------------------------


def test_check_outputs_refuses_inputs_links_folders_and_existing_files(tmp_path):
    from cp3d.io import check_outputs

    image = tmp_path / "image.tif"
    write_image(image, stack())
    (tmp_path / "link.tif").symlink_to(image)
    os.link(image, tmp_path / "hard.tif")
    for output in (image, tmp_path / "link.tif", tmp_path / "hard.tif"):
        with pytest.raises(ValueError, match="is the input"):
            check_outputs([output], inputs=[image], overwrite=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_outputs([image])
    check_outputs([image], overwrite=True)
    with pytest.raises(IsADirectoryError, match="folder"):
        check_outputs([tmp_path])
    with pytest.raises(FileNotFoundError, match="nope"):
        check_outputs([tmp_path / "nope" / "a.tif"])
    with pytest.raises(ValueError, match="same file"):
        check_outputs([tmp_path / "a.tif", None, tmp_path / "." / "a.tif"])
    check_outputs([tmp_path / "a.tif", None, tmp_path / "b.tif"], inputs=[image])


def test_check_outputs_refuses_a_read_only_folder(tmp_path, monkeypatch):
    from cp3d.io import check_outputs

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.geteuid() != 0:  # root writes anywhere: then the refusal is checked through os.access
            with pytest.raises(PermissionError, match="ro"):
                check_outputs([folder / "a.tif"])
        monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != os.fspath(folder))
        with pytest.raises(PermissionError, match="cannot write into"):
            check_outputs([folder / "a.tif"])
    finally:
        folder.chmod(0o755)


def test_writing_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real.tif"
    write_labels(real, stack(np.uint8))
    link = tmp_path / "link.tif"
    link.symlink_to(real)
    write_labels(link, stack(np.uint8) + 1)
    assert link.is_symlink() and os.readlink(link) == str(real)
    np.testing.assert_array_equal(read_image(real).data, stack(np.uint8) + 1)
    assert sorted(os.listdir(tmp_path)) == ["link.tif", "real.tif"]


def test_an_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "out.tif"
    write_labels(path, stack(np.uint8))
    path.chmod(0o640)
    write_labels(path, stack(np.uint8) + 1)
    assert path.stat().st_mode & 0o777 == 0o640


def test_writing_onto_a_folder_is_refused_before_writing(tmp_path):
    (tmp_path / "out.tif").mkdir()
    with pytest.raises(IsADirectoryError, match="give a file name"):
        write_labels(tmp_path / "out.tif", stack(np.uint8))
    assert os.listdir(tmp_path) == ["out.tif"]


def test_written_together_lands_all_files_or_none(tmp_path, monkeypatch):
    from cp3d.io import written_together

    old = tmp_path / "old.tif"
    write_labels(old, stack(np.uint8))
    before = old.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with written_together():
            write_labels(old, stack(np.uint8) + 1)
            write_image(tmp_path / "new.tif", stack())
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["old.tif"] and old.read_bytes() == before

    # a move that fails half-way puts back what was already moved
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(dst) == "second.tif":
            raise OSError("device went away")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="went away"):
        with written_together():
            write_labels(old, stack(np.uint8) + 1)
            write_image(tmp_path / "first.tif", stack())
            write_image(tmp_path / "second.tif", stack())
    assert sorted(os.listdir(tmp_path)) == ["old.tif"] and old.read_bytes() == before


def test_no_overwrite_never_replaces_a_file_that_appears_while_writing(tmp_path):
    from cp3d.io import atomic_write, written_together

    dest = tmp_path / "out.tif"

    def write_while_someone_creates_dest(fh):
        fh.write(b"ours")
        dest.write_bytes(b"foreign")  # after the existence check, before the final move

    with pytest.raises(FileExistsError, match="appeared while cp3d was writing"):
        atomic_write(dest, write_while_someone_creates_dest, overwrite=False)
    assert dest.read_bytes() == b"foreign" and os.listdir(tmp_path) == ["out.tif"]

    # the same inside a block: the other file of the block does not land either
    dest.unlink()
    with pytest.raises(FileExistsError, match="appeared while cp3d was writing"):
        with written_together(overwrite=False):
            atomic_write(tmp_path / "first.tif", lambda fh: fh.write(b"first"))
            atomic_write(dest, write_while_someone_creates_dest)
    assert dest.read_bytes() == b"foreign" and os.listdir(tmp_path) == ["out.tif"]

    # asked to overwrite, the file is replaced as before
    atomic_write(dest, write_while_someone_creates_dest, overwrite=True)
    assert dest.read_bytes() == b"ours"
    with pytest.raises(FileExistsError, match="exists"):
        atomic_write(dest, lambda fh: fh.write(b"x"), overwrite=False)


def test_no_overwrite_without_hard_links_warns_and_renames(tmp_path, monkeypatch):
    from cp3d.io import atomic_write

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.warns(UserWarning, match="no hard links"):
        atomic_write(tmp_path / "out.bin", lambda fh: fh.write(b"ours"), overwrite=False)
    assert (tmp_path / "out.bin").read_bytes() == b"ours" and os.listdir(tmp_path) == ["out.bin"]


def test_new_folder_never_replaces_a_folder_filled_meanwhile(tmp_path, monkeypatch):
    from cp3d.io import place_new_folder

    tmp = tmp_path / "store.tmp"
    tmp.mkdir()
    (tmp / "data").write_text("ours")
    dest = tmp_path / "store.zarr"
    real_rename = os.rename

    def fill_then_rename(src, dst):
        (dest / "foreign").write_text("theirs")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fill_then_rename)
    with pytest.raises(FileExistsError, match="filled while cp3d was writing"):
        place_new_folder(tmp, dest)
    assert os.listdir(dest) == ["foreign"] and (tmp / "data").exists()
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="exists"):
        place_new_folder(tmp, dest)
    place_new_folder(tmp, tmp_path / "new.zarr")
    assert (tmp_path / "new.zarr" / "data").read_text() == "ours" and not tmp.exists()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """A write killed with SIGKILL leaves its temporary file; the next run's write removes it."""
    import signal
    import subprocess
    import sys
    import textwrap

    killed = textwrap.dedent(f"""
        import os, signal
        from cp3d.io import atomic_write
        def write(fh):
            fh.write(b"half a file")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(tmp_path / "out.tif")!r}, write)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    assert subprocess.run([sys.executable, "-c", killed], env=env).returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.tif.cp3d-") and left[0].endswith(".tmp")
    # a temporary of a process that still runs (ours: the test) is kept
    alive = tmp_path / f".other.tif.cp3d-{os.getpid()}-0123456789ab.tmp"
    alive.write_bytes(b"busy")
    later = f"from cp3d.io import write_labels; import numpy as np; " \
            f"write_labels({str(tmp_path / 'b.tif')!r}, np.ones((1, 2, 2), np.uint8))"
    assert subprocess.run([sys.executable, "-c", later], env=env).returncode == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["b.tif", alive.name])


# ---------------------------------------------------------------------------
# Files: one-slice stacks, damaged and inconsistent files
# ---------------------------------------------------------------------------


def test_one_slice_stacks_round_trip(tmp_path):
    write_labels(tmp_path / "labels.tif", np.ones((1, 4, 5), np.uint32))
    assert read_image(tmp_path / "labels.tif").data.shape == (1, 4, 5)
    write_image(tmp_path / "image.tif", np.ones((1, 4, 5), np.float32), voxel_size=(2, 1, 1))
    image = read_image(tmp_path / "image.tif")
    assert image.data.shape == (1, 4, 5) and image.voxel_size == (2.0, 1.0, 1.0)
    tifffile.imwrite(tmp_path / "shaped.tif", np.ones((1, 4, 5), np.uint8), photometric="minisblack")
    assert read_image(tmp_path / "shaped.tif").data.shape == (1, 4, 5)


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("imagej", [True, False])
def test_truncated_files_say_so_and_name_the_file(tmp_path, compression, imagej):
    data = np.random.default_rng(0).integers(0, 1000, (8, 32, 32)).astype(np.uint16)
    path = tmp_path / "whole.tif"
    if imagej:
        tifffile.imwrite(path, data, imagej=True, compression=compression, metadata={"axes": "ZYX"})
    else:
        tifffile.imwrite(path, data, compression=compression, photometric="minisblack")
    whole = path.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 100):
        broken = tmp_path / "broken.tif"
        broken.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=r"broken\.tif.*(truncated|corrupt|inconsistent)"):
            read_image(broken)


def test_unparsable_imagej_description_drops_the_voxel_size_with_a_warning(tmp_path):
    path = tmp_path / "garbage.tif"
    for description in ("ImageJ=1.11a\nimages=abc\nslices=x\nspacing=zz\nunit=micron\n",
                        "ImageJ=1.11a\nimages=3\nslices=3\nspacing=[1,2]\nunit=micron\n"):
        tifffile.imwrite(path, stack(), description=description, metadata=None, photometric="minisblack",
                         resolution=(2.0, 2.0))
        with pytest.warns(UserWarning, match="garbage.tif"):
            image = read_image(path)
        np.testing.assert_array_equal(image.data, stack())
        assert image.voxel_size is None


def test_inconsistent_imagej_counts_are_an_error(tmp_path):
    path = tmp_path / "inconsistent.tif"
    tifffile.imwrite(path, np.ones((16, 4, 5), np.uint8), description="ImageJ=1.11a\nimages=5\nslices=7\n",
                     metadata=None, photometric="minisblack")
    with pytest.raises(ValueError, match=r"inconsistent\.tif.*images=5.*16 pages"):
        read_image(path)


def test_a_small_file_declaring_a_huge_shape_is_refused_before_allocating(tmp_path, monkeypatch):
    import cp3d.io

    # uncompressed: the declared pixels do not fit in the file
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((16, 64, 64), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    raw = path.read_bytes().replace(b"images=16", b"images=99").replace(b"slices=16", b"slices=99")
    path.write_bytes(raw)
    with pytest.raises(ValueError, match="huge.tif"):
        read_image(path)
    # compressed: pixels that would not fit in memory are refused before decoding
    tifffile.imwrite(path, np.zeros((16, 64, 64), np.uint8), compression="zlib", photometric="minisblack")
    monkeypatch.setattr(cp3d.io.tifffile.TiffPageSeries, "asarray",
                        lambda *a, **k: pytest.fail("decoded before the memory check"))
    monkeypatch.setattr(cp3d._backend, "physical_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"huge\.tif.*needs 64\.0 KiB, more than this machine's memory"):
        read_image(path)


# --------------------------------------------------------------------------- properties stored with a file


def test_properties_round_trip_through_tiff_and_zarr(tmp_path):
    import dask.array as da
    import zarr

    from cp3d.io import read_properties, write_tiff_chunked, write_zarr_properties

    properties = {"reconstruction": {"diameter": [5.0, 10.0, 10.0], "targets": "tanh"}, "note": "a = b\nc = d"}
    volume = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    write_image(tmp_path / "a.tif", volume, voxel_size=(2, 1, 1), properties=properties)
    write_tiff_chunked(tmp_path / "b.tif", da.from_array(volume, chunks=(1, 8, 8)), properties=properties)
    zarr.open_group(tmp_path / "c.zarr", mode="w").create_array("maps", shape=(2,), dtype="f4")
    write_zarr_properties(tmp_path / "c.zarr", properties)
    for name in ("a.tif", "b.tif", "c.zarr"):
        assert read_properties(tmp_path / name) == properties, name
    again = read_image(tmp_path / "a.tif")
    np.testing.assert_array_equal(again.data, volume)
    assert again.voxel_size == (2.0, 1.0, 1.0)
    # files without them: ImageJ TIFFs written without properties, plain TIFFs, Zarr groups
    write_image(tmp_path / "plain.tif", volume)
    tifffile.imwrite(tmp_path / "other.tif", volume)
    zarr.open_group(tmp_path / "d.zarr", mode="w")
    assert read_properties(tmp_path / "plain.tif") == read_properties(tmp_path / "other.tif") == {}
    assert read_properties(tmp_path / "d.zarr") == {}


def test_properties_errors(tmp_path):
    from cp3d.io import read_properties

    volume = np.zeros((2, 4, 4), np.float32)
    for bad in ([1, 2], {"x": object()}, {"x": float("nan")}):
        with pytest.raises(TypeError, match="properties"):
            write_image(tmp_path / "bad.tif", volume, properties=bad)
    assert not os.path.exists(tmp_path / "bad.tif")
    tifffile.imwrite(tmp_path / "damaged.tif", volume, metadata=None, photometric="minisblack",
                     description="ImageJ=1.11a\nimages=2\nslices=2\ncp3d={\"diameter\": [5\nloop=false\n")
    with pytest.raises(ValueError, match="unreadable cp3d properties"):
        read_properties(tmp_path / "damaged.tif")
    tifffile.imwrite(tmp_path / "number.tif", volume, metadata=None, photometric="minisblack",
                     description="ImageJ=1.11a\nimages=2\nslices=2\ncp3d=5\nloop=false\n")
    with pytest.raises(ValueError, match="unreadable cp3d properties"):
        read_properties(tmp_path / "number.tif")
