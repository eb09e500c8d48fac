"""Labelled image folders: one subfolder per class, as torchvision's ImageFolder expects."""

from __future__ import annotations

import os
from pathlib import Path

from simclr_cli.data.images import scan_images
from simclr_cli.errors import DataError

__all__ = ["LabeledImages", "scan_labeled"]


class LabeledImages:
    """Image paths, their class indices, and the sorted class names."""

    def __init__(self, paths: list[Path], labels: list[int], class_names: list[str]) -> None:
        """Hold the three aligned lists."""
        self.paths = paths
        self.labels = labels
        self.class_names = class_names


def scan_labeled(root: Path, *, class_names: list[str] | None = None) -> LabeledImages:
    """Scan root/<class>/**/<image>; classes map to indices in sorted-name order.

    Args:
        root: The labelled folder.
        class_names: A class list to reuse (so train and test share one mapping); images of
            classes outside it are an error.
    """
    root = Path(os.path.abspath(root))  # scan_images returns absolute paths
    found = scan_images(root)
    by_class: dict[str, list[Path]] = {}
    for path in found:
        relative = path.relative_to(root)
        if len(relative.parts) < 2:
            raise DataError(
                f"{root}: images must sit in one subfolder per class (root/<class>/<image>), "
                f"but {relative} is directly in the folder"
            )
        by_class.setdefault(relative.parts[0], []).append(path)
    if not by_class:
        raise DataError(f"{root}: no images found in class subfolders (root/<class>/<image>)")
    names = class_names if class_names is not None else sorted(by_class)
    unknown = sorted(set(by_class) - set(names))
    if unknown:
        raise DataError(f"{root}: classes {unknown} are not among the training classes")
    paths, labels = [], []
    for index, name in enumerate(names):
        for path in by_class.get(name, []):
            paths.append(path)
            labels.append(index)
    return LabeledImages(paths, labels, list(names))
