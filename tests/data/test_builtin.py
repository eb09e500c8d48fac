from pathlib import Path

from simclr_cli.data.builtin import write_mnist_folders
from simclr_cli.data.images import scan_images
from simclr_cli.data.labeled import scan_labeled


def test_mnist_folders_hold_a_fixed_balanced_split(tmp_path: Path) -> None:
    # 4,000 training and 1,000 test digits, 400/100 per class, written once and then reused.
    train, test = write_mnist_folders(tmp_path / "mnist")
    train_set, test_set = scan_labeled(train), scan_labeled(test)
    assert len(train_set.paths) == 4000 and len(test_set.paths) == 1000
    assert train_set.class_names == [str(d) for d in range(10)]
    assert [train_set.labels.count(c) for c in range(10)] == [400] * 10
    assert not {p.name for p in train_set.paths} & {p.name for p in test_set.paths}
    stamp = (train / "0" / "00000.png").stat().st_mtime_ns
    write_mnist_folders(tmp_path / "mnist")
    assert (train / "0" / "00000.png").stat().st_mtime_ns == stamp
    assert len(scan_images(tmp_path / "mnist")) == 5000
