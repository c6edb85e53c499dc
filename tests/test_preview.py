import numpy as np
import pytest

from cp3d.preview import preview, save_preview


def _cube():
    labels = np.zeros((8, 20, 24), np.uint32)
    labels[2:6, 5:15, 6:18] = 3
    image = np.where(labels > 0, 100, 10).astype(np.uint16)
    return image, labels


def test_layout_and_outlines():
    image, labels = _cube()
    rgb = preview(image, labels)
    zoom = rgb.shape[0] // 20  # the XY section (20 rows) is the taller one
    assert zoom > 1 and rgb.shape == (20 * zoom, 2 * 24 * zoom + 8, 3)
    xy = rgb[:, :24 * zoom]
    coloured = xy.max(axis=2) != xy.min(axis=2)  # grey pixels have equal channels
    # the outline: the cube's one-pixel border in the enlarged section, nothing inside or outside
    expected = np.zeros((20 * zoom, 24 * zoom), bool)
    expected[5 * zoom:15 * zoom, 6 * zoom:18 * zoom] = True
    expected[5 * zoom + 1:15 * zoom - 1, 6 * zoom + 1:18 * zoom - 1] = False
    np.testing.assert_array_equal(coloured, expected)
    # the image shows through: the cube is brighter than the background
    assert xy[10 * zoom, 12 * zoom, 0] > xy[1, 1, 0]


def test_xz_section_is_stretched_by_the_voxel_size():
    image, labels = _cube()
    flat = preview(image, labels)
    tall = preview(image, labels, voxel_size=(4.0, 1.0, 1.0))  # 8 z slices become 32 rows
    assert tall.shape[0] > flat.shape[0]
    right = tall[:, tall.shape[1] - 24 * (tall.shape[0] // 32):]
    assert (right.max(axis=2) != right.min(axis=2)).any(axis=1).sum() > 8 * 2  # the cube spans 16 of 32 rows


def test_save_preview(tmp_path):
    from PIL import Image

    image, labels = _cube()
    save_preview(tmp_path / "p.png", image, labels)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "p.png")), preview(image, labels))
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
    with pytest.raises(FileNotFoundError, match="output folder"):
        save_preview(tmp_path / "no" / "p.png", image, labels)


def test_bad_input():
    image, labels = _cube()
    with pytest.raises(ValueError, match="image shape"):
        preview(image[:4], labels)
    with pytest.raises(TypeError, match="integer"):
        preview(image, labels.astype(np.float32))
    with pytest.raises(ValueError, match="2D"):
        preview(image[0], labels[0])
