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
