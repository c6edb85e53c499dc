import csv
import math

import numpy as np
import pytest
from scipy import ndimage

import cp3d
from cp3d.filters import instance_statistics
from cp3d.measure import CellTable, cell_table


def _two_boxes():
    """Two boxes with known geometry; ids 3 and 7 (not consecutive)."""
    labels = np.zeros((10, 12, 14), np.uint32)
    labels[1:3, 2:6, 3:11] = 3  # 2 x 4 x 8 = 64 voxels, centre (1.5, 3.5, 6.5)
    labels[5:10, 7:8, 0:2] = 7  # 5 x 1 x 2 = 10 voxels, centre (7, 7, 0.5)
    return labels


def test_known_geometry():
    table = cell_table(_two_boxes())
    assert isinstance(table, CellTable) and table.n_cells == 2
    assert table["label"].tolist() == [3, 7]
    assert table["voxels"].tolist() == [64, 10]
    np.testing.assert_allclose(table["centroid_z"], [1.5, 7])
    np.testing.assert_allclose(table["centroid_y"], [3.5, 7])
    np.testing.assert_allclose(table["centroid_x"], [6.5, 0.5])
    assert [table[f"bbox_{a}0"].tolist() for a in "zyx"] == [[1, 5], [2, 7], [3, 0]]
    assert [table[f"bbox_{a}1"].tolist() for a in "zyx"] == [[3, 10], [6, 8], [11, 2]]
    np.testing.assert_allclose(table["equivalent_diameter"], np.cbrt(6 * np.array([64, 10]) / math.pi))
    assert table["touches_border"].tolist() == [False, True]  # the second box reaches z = 9 and x = 0
    assert "physical_volume" not in table and "mean_intensity" not in table and "flow_error" not in table


def test_voxel_size_gives_physical_columns():
    table = cell_table(_two_boxes(), voxel_size=(2.0, 0.5, 0.25))
    np.testing.assert_allclose(table["physical_volume"], [64 * 0.25, 10 * 0.25])
    np.testing.assert_allclose(table["physical_centroid_z"], [3.0, 14.0])
    np.testing.assert_allclose(table["physical_centroid_x"], [6.5 * 0.25, 0.5 * 0.25])
    np.testing.assert_allclose(table["physical_equivalent_diameter"] ** 3 * math.pi / 6, table["physical_volume"])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, bool])
def test_mean_intensity(dtype):
    labels = _two_boxes()
    image = (np.arange(labels.size).reshape(labels.shape) % 2).astype(dtype)
    table = cell_table(labels, image=image)
    expected = ndimage.mean(image.astype(np.float64), labels, index=[3, 7])
    np.testing.assert_allclose(table["mean_intensity"], expected)


def test_bounding_boxes_and_centroids_match_scipy(membrane_cells):
    image, labels = membrane_cells
    table = cell_table(labels, image=image)
    ids = np.arange(1, labels.max() + 1)
    assert table["label"].tolist() == ids.tolist()
    np.testing.assert_allclose(np.stack([table[f"centroid_{a}"] for a in "zyx"], 1),
                               ndimage.center_of_mass(np.ones(labels.shape), labels, ids))
    boxes = ndimage.find_objects(labels)
    for axis, a in enumerate("zyx"):
        assert table[f"bbox_{a}0"].tolist() == [b[axis].start for b in boxes]
        assert table[f"bbox_{a}1"].tolist() == [b[axis].stop for b in boxes]
    np.testing.assert_allclose(table["mean_intensity"], ndimage.mean(image, labels, ids), rtol=1e-6)


def test_flow_columns_are_the_filters_statistics(membrane_cells):
    _, labels = membrane_cells
    rng = np.random.default_rng(0)
    flows = (cp3d.tanh_flows(labels, 4.0) + rng.normal(0, 0.2, (3, *labels.shape))).astype(np.float32)
    foreground = (labels > 0) & (rng.random(labels.shape) > 0.3)
    table = cell_table(labels, flows=flows, foreground=foreground, tanh_scale=4.0)
    _, overlap, error = instance_statistics(labels, flows, foreground, tanh_scale=4.0, backend="numpy")
    np.testing.assert_allclose(table["flow_error"], error[1:], rtol=1e-5)
    np.testing.assert_allclose(table["foreground_overlap"], overlap[1:])
    assert 0.5 < table["foreground_overlap"].mean() < 0.9  # the mask drops about 30 % of each cell
    alone = cell_table(labels, foreground=foreground)  # the overlap needs no flows
    np.testing.assert_array_equal(alone["foreground_overlap"], table["foreground_overlap"])
    assert "flow_error" not in alone


def test_touches_border_matches_the_filters_border_ids(membrane_cells):
    from cp3d.filters import border_ids

    _, labels = membrane_cells
    table = cell_table(labels)
    assert table["label"][table["touches_border"]].tolist() == border_ids(labels).tolist()
    assert 0 < table["touches_border"].sum() < table.n_cells


def test_sparse_and_large_ids_give_the_same_rows():
    labels = _two_boxes()
    big = np.where(labels == 3, 4_000_000_000, labels).astype(np.uint32)
    small, large = cell_table(labels), cell_table(big)
    assert large["label"].tolist() == [7, 4_000_000_000]
    # rows are in increasing id order, so the two cells swap places
    for name in small:
        if name != "label":
            np.testing.assert_array_equal(large[name], small[name][::-1])


def test_empty_labels_give_an_empty_table():
    table = cell_table(np.zeros((3, 4, 5), np.uint16), image=np.ones((3, 4, 5)))
    assert table.n_cells == 0 and all(len(column) == 0 for column in table.values())


def test_to_csv_round_trip(tmp_path):
    labels = _two_boxes()
    table = cell_table(labels, image=labels.astype(np.float32) / 7, voxel_size=1.5)
    path = tmp_path / "cells.csv"
    table.to_csv(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(table)
    assert [r["label"] for r in rows] == ["3", "7"] and rows[0]["bbox_x1"] == "11"
    assert [r["touches_border"] for r in rows] == ["0", "1"]
    np.testing.assert_allclose([float(r["mean_intensity"]) for r in rows], [3 / 7, 1.0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv"]  # no temporary file left


def test_to_csv_needs_an_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder"):
        cell_table(_two_boxes()).to_csv(tmp_path / "missing" / "cells.csv")


def test_pandas_takes_the_table():
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(cell_table(_two_boxes()))
    assert frame.shape[0] == 2 and frame["voxels"].sum() == 74


def test_bad_input():
    labels = _two_boxes()
    with pytest.raises(TypeError, match="integer"):
        cell_table(labels.astype(np.float32))
    with pytest.raises(ValueError, match="image shape"):
        cell_table(labels, image=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="need a foreground"):
        cell_table(labels, flows=np.zeros((3, *labels.shape), np.float32))
    with pytest.raises(ValueError, match="flows shape"):
        cell_table(labels, flows=np.zeros((3, 2, 2, 2), np.float32), foreground=labels > 0)
    with pytest.raises(ValueError, match="voxel_size"):
        cell_table(labels, voxel_size=(1, 0, 1))
    with pytest.raises(ValueError, match="targets"):
        cell_table(labels, flows=np.zeros((3, *labels.shape), np.float32), foreground=labels > 0, targets="x")
