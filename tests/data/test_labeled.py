import shutil
from pathlib import Path

import pytest

from simclr_cli.data.labeled import align_classes, balanced_subset, scan_labeled, stratified_split
from simclr_cli.errors import DataError


def test_one_class_map_for_both_splits_with_warnings(
    digits_folder: Path, digits_test_folder: Path, tmp_path: Path
) -> None:
    # Test lacks class 5, has an extra class "x" and an empty class folder: the map is the
    # sorted union, every image keeps its own folder's name, and each oddity is named.
    test = tmp_path / "test"
    shutil.copytree(digits_test_folder, test)
    shutil.rmtree(test / "5")
    shutil.copytree(digits_test_folder / "7", test / "x")
    (test / "empty").mkdir()
    train_set, test_set, warnings = align_classes(scan_labeled(digits_folder), scan_labeled(test))
    assert train_set.class_names == test_set.class_names
    assert train_set.class_names == [*map(str, range(10)), "x"]
    for split in (train_set, test_set):
        for path, label in zip(split.paths, split.labels, strict=True):
            assert path.parent.name == split.class_names[label]
    text = " | ".join(warnings)
    assert "empty" in text and "no test images: 5" in text and "not in training: x" in text


def test_flat_folder_is_a_clear_error(tmp_path: Path, few_digits: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(few_digits.rglob("*.png")), flat / "a.png")
    with pytest.raises(DataError, match="one subfolder per class"):
        scan_labeled(flat)


def test_label_subset_is_balanced_and_deterministic(digits_folder: Path) -> None:
    images = scan_labeled(digits_folder)  # 20 per class
    subset = balanced_subset(images, fraction=0.1, seed=3)
    assert sorted(subset.counts().values()) == [2] * 10
    again = balanced_subset(images, fraction=0.1, seed=3)
    assert again.paths == subset.paths
    other = balanced_subset(images, fraction=0.1, seed=4)
    assert other.paths != subset.paths
    per_class = balanced_subset(images, per_class=5, seed=3)
    assert set(per_class.counts().values()) == {5}
    # The subset of a class does not depend on which other classes exist.
    only_two = images.subset([i for i, y in enumerate(images.labels) if y in (0, 1)])
    small = balanced_subset(only_two, fraction=0.1, seed=3)
    assert set(small.paths) <= set(subset.paths)


def test_stratified_split_keeps_every_class_on_both_sides(digits_folder: Path) -> None:
    images = scan_labeled(digits_folder)
    train, val = stratified_split(images, 0.2, seed=0)
    assert set(val.counts().values()) == {4} and set(train.counts().values()) == {16}
    assert not set(train.paths) & set(val.paths)
    assert stratified_split(images, 0.2, seed=0)[1].paths == val.paths
