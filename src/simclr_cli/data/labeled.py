"""Labelled image folders: one subfolder per class, as torchvision's ImageFolder expects."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from simclr_cli.data.images import RUN_MARKER, is_litter, scan_images
from simclr_cli.errors import DataError

__all__ = [
    "LabeledImages",
    "align_classes",
    "balanced_subset",
    "scan_labeled",
    "stratified_split",
]


class LabeledImages:
    """Image paths, their class indices, and the class names the indices refer to."""

    def __init__(
        self,
        paths: list[Path],
        labels: list[int],
        class_names: list[str],
        *,
        empty_classes: list[str] | None = None,
    ) -> None:
        """Hold the aligned lists; `empty_classes` names class folders without any image."""
        self.paths = paths
        self.labels = labels
        self.class_names = class_names
        self.empty_classes = empty_classes or []

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        """Images per class name, every class listed (0 for absent ones)."""
        totals = {name: 0 for name in self.class_names}
        for label in self.labels:
            totals[self.class_names[label]] += 1
        return totals

    def subset(self, positions: list[int]) -> LabeledImages:
        """The images at `positions`, same class names."""
        return LabeledImages(
            [self.paths[i] for i in positions],
            [self.labels[i] for i in positions],
            self.class_names,
            empty_classes=self.empty_classes,
        )

    def relabeled(self, class_names: list[str]) -> LabeledImages:
        """The same images with indices into another class list holding all of ours."""
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[self.class_names[label]] for label in self.labels]
        return LabeledImages(self.paths, labels, class_names, empty_classes=self.empty_classes)


def scan_labeled(root: Path, *, exclude: Iterable[str | Path] = ()) -> LabeledImages:
    """Scan root/<class>/**/<image>; classes map to indices in sorted-name order.

    Paths in `exclude` (a command's own output folder) are neither scanned nor classes.

    Raises:
        DataError: If the folder holds no class subfolders with images, or images lie
            directly in it (an unlabelled folder given where labels are needed).
    """
    root = Path(os.path.abspath(root))  # scan_images returns absolute paths
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    excluded = {os.path.realpath(path) for path in exclude}
    found = scan_images(root, exclude=excluded)
    by_class: dict[str, list[Path]] = {}
    for path in found:
        relative = path.relative_to(root)
        if len(relative.parts) < 2:
            raise DataError(
                f"{root}: expected one subfolder per class (root/<class>/<image>), "
                f"but {relative} lies directly in the folder"
            )
        by_class.setdefault(relative.parts[0], []).append(path)
    if not by_class:
        raise DataError(f"{root}: no images found in class subfolders (root/<class>/<image>)")
    names = sorted(by_class)
    # Litter (__MACOSX) and our own run folders are no classes, empty or not.
    empty = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir()
        and not is_litter(entry.name)
        and entry.name not in by_class
        and not os.path.isfile(os.path.join(entry.path, RUN_MARKER))
        and os.path.realpath(entry.path) not in excluded
    )
    paths, labels = [], []
    for index, name in enumerate(names):
        for path in by_class[name]:
            paths.append(path)
            labels.append(index)
    return LabeledImages(paths, labels, names, empty_classes=empty)


def align_classes(
    train: LabeledImages, test: LabeledImages
) -> tuple[LabeledImages, LabeledImages, list[str]]:
    """Give both splits one class map (the sorted union of their classes).

    Returns:
        Both splits relabelled, and warnings naming empty class folders and classes found in
        only one split (test images of a class never trained on can only be misclassified,
        and they are counted as such).
    """
    names = sorted(set(train.class_names) | set(test.class_names))
    warnings = []
    for split, images in (("training", train), ("test", test)):
        if images.empty_classes:
            warnings.append(
                f"empty class folder(s) in the {split} folder: {', '.join(images.empty_classes)}"
            )
    only_train = sorted(set(train.class_names) - set(test.class_names))
    only_test = sorted(set(test.class_names) - set(train.class_names))
    if only_train:
        warnings.append(f"class(es) with no test images: {', '.join(only_train)}")
    if only_test:
        warnings.append(
            f"class(es) in the test folder but not in training: {', '.join(only_test)}; "
            "their images cannot be classified correctly"
        )
    return train.relabeled(names), test.relabeled(names), warnings


def stratified_split(
    images: LabeledImages, fraction: float, *, seed: int
) -> tuple[LabeledImages, LabeledImages]:
    """Hold out `fraction` of each class (seeded) as a validation split: (train, val).

    Every class with at least two images keeps one on each side.
    """
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1, got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    train_positions: list[int] = []
    val_positions: list[int] = []
    for label in range(len(images.class_names)):
        members = [i for i, y in enumerate(images.labels) if y == label]
        if not members:
            continue
        order = torch.randperm(len(members), generator=generator).tolist()
        held = round(fraction * len(members))
        if len(members) >= 2:
            held = min(max(held, 1), len(members) - 1)
        val_positions += [members[i] for i in order[:held]]
        train_positions += [members[i] for i in order[held:]]
    return images.subset(sorted(train_positions)), images.subset(sorted(val_positions))


def balanced_subset(
    images: LabeledImages,
    *,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int,
) -> LabeledImages:
    """A class-balanced, seeded subset: `fraction` of each class, or `per_class` images of each.

    Each class keeps at least one image; a class smaller than `per_class` keeps all it has.
    The same seed always picks the same files, whatever order the classes were scanned in.
    """
    if (fraction is None) == (per_class is None):
        raise DataError("give either a label fraction or a number of labels per class")
    if fraction is not None and not 0 < fraction <= 1:
        raise DataError(f"the label fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise DataError(f"labels per class must be at least 1, got {per_class}")
    chosen: list[int] = []
    for label, name in enumerate(images.class_names):
        members = sorted(
            (i for i, y in enumerate(images.labels) if y == label),
            key=lambda i: str(images.paths[i]),
        )
        if not members:
            continue
        # One stream per class name: adding a class elsewhere does not reshuffle this one.
        name_hash = hashlib.sha256(f"{seed}:{name}".encode("utf-8", "surrogateescape"))
        generator = torch.Generator().manual_seed(int.from_bytes(name_hash.digest()[:7], "big"))
        order = torch.randperm(len(members), generator=generator).tolist()
        if fraction is not None:
            take = max(1, round(fraction * len(members)))
        else:
            take = min(per_class or 1, len(members))
        chosen += [members[i] for i in order[:take]]
    return images.subset(sorted(chosen))
