"""Groups of near-duplicate images: connected components of the "similar enough" graph.

Two images are linked when the cosine similarity of their vectors is at least the threshold
and, unless the caller turns it off, their pixels confirm it (engine/pixel_check.py: one
image is found inside the other); a group is everything linked directly or through other
members, so a chain of near-copies (original -> resized -> resized and cropped) lands in one
group. The default thresholds and what they mean on real photos are in docs/neighbors.md.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simclr_cli.engine.embeddings import Embeddings
from simclr_cli.engine.pixel_check import PixelChecker
from simclr_cli.engine.progress import NullReporter, Reporter
from simclr_cli.engine.search import pairs_above
from simclr_cli.engine.sheets import Tile, draw_grid, load_thumbnails
from simclr_cli.errors import ConfigError, os_error_reason

__all__ = [
    "DEFAULT_THRESHOLD",
    "DuplicateGroup",
    "TooManyRejections",
    "duplicates_sheet",
    "find_duplicates",
    "oversized_group_hint",
    "write_groups_csv",
]

# Measured with benchmarks/duplicates_threshold.py (docs/neighbors.md): it depends on the
# model, so the command prints it and users are told to check the sheet.
DEFAULT_THRESHOLD = 0.97


# A group this large is more often a model that scores unrelated images alike (random and
# barely trained encoders merged all 19 measured photos into one group) than real copies.
SUSPICIOUS_GROUP_FRACTION = 0.2
SUSPICIOUS_GROUP_SIZE = 5


# Each rejected link costs a pixel check (about 15 ms on one CPU core). A model that links
# most pairs of different images would make that hours on a large folder, so the check
# gives up after this many rejections and says why: 1,000 + 1 per image, about 3 minutes
# of checks on a folder of 10,000 images.
REJECTION_BUDGET_BASE = 1000
REJECTION_BUDGET_PER_IMAGE = 1


class TooManyRejections(ConfigError):
    """The pixel check rejected so many links that the model, not the images, is the problem."""


@dataclass(frozen=True)
class DuplicateGroup:
    """Rows of one group, and for each the highest similarity it has to another member."""

    rows: list[int]
    best_similarity: list[float]


class _DisjointSets:
    """Union-find over row numbers, with path halving and union by size."""

    def __init__(self, count: int) -> None:
        self.parent = np.arange(count)
        self.size = np.ones(count, dtype=np.int64)

    def find(self, item: int) -> int:
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = int(parent[item])
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        if self.size[root_a] < self.size[root_b]:
            root_a, root_b = root_b, root_a
        self.parent[root_b] = root_a
        self.size[root_a] += self.size[root_b]


def find_duplicates(
    embeddings: Embeddings,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    method: str = "auto",
    device: torch.device | None = None,
    reporter: Reporter | None = None,
    checker: PixelChecker | None = None,
    present: Callable[[int], bool] | None = None,
) -> list[DuplicateGroup]:
    """Groups of two or more rows, largest first (ties: most similar first, then row order).

    With a `checker`, a pair above the threshold is linked only if its pixels confirm it; a
    pair with a file that can no longer be read is not linked (the checker counts those: a
    deleted copy must not be listed, nor join its neighbours into one group). Pairs already
    in one group are not checked again: a group is confirmed through a chain of checked links.
    Without a checker, `present` (if given) says which rows still have their file; the others
    are left out in the same way.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"the threshold is a cosine similarity in [-1, 1], got {threshold}")
    sets = _DisjointSets(embeddings.rows)
    best = np.full(embeddings.rows, -np.inf)
    reporter = reporter or NullReporter()
    budget = REJECTION_BUDGET_BASE + REJECTION_BUDGET_PER_IMAGE * embeddings.rows
    # Rejected pairs can still end up in one group through other links; they are few (the
    # budget bounds them), so they are kept and looked at again once all links are made.
    rejected: list[tuple[int, int, float]] = []
    rows_done = 0
    last_report = time.monotonic()

    def report(done: int | None = None) -> None:
        nonlocal rows_done, last_report
        rows_done = rows_done if done is None else done
        metrics: dict[str, float] = {}
        if checker is not None:
            metrics = {"checked": checker.checked, "rejected": len(rejected)}
        reporter.advance(completed=rows_done, metrics=metrics)
        last_report = time.monotonic()

    reporter.start(task="duplicates", total=embeddings.rows, unit="row")
    for i, j, similarity in pairs_above(
        embeddings.vectors,
        threshold,
        method=method,
        device=device,
        # Smaller chunks with the pixel check, whose time per chunk can be long, so that the
        # row count moves too; the checked/rejected counts move every second regardless.
        chunk_rows=4096 if checker is None else 256,
        progress=report,
    ):
        order = np.argsort(-similarity.numpy(), kind="stable")  # likeliest copies first
        for a, b, value in zip(
            i.numpy()[order].tolist(),
            j.numpy()[order].tolist(),
            similarity.numpy()[order].tolist(),
            strict=True,
        ):
            if present is not None and not (present(a) and present(b)):
                continue
            if checker is not None and sets.find(a) != sets.find(b):
                verdict = checker.confirms(a, b)
                if time.monotonic() - last_report >= 1.0:
                    report()
                if verdict is None:  # a file gone or broken since embed: never grouped
                    continue
                if not verdict:
                    rejected.append((a, b, value))
                    if len(rejected) > budget:
                        reporter.stop()
                        raise TooManyRejections(
                            f"stopped after checking {checker.checked} pairs above threshold "
                            f"{threshold:.10g}: {len(rejected)} of them were different "
                            "pictures by their pixels, so this model scores unrelated images "
                            "alike. Raise --threshold, embed with a better-trained model, or "
                            "pass --no-pixel-check to group by the model alone"
                        )
                    continue
            sets.union(a, b)
            best[a] = max(best[a], value)
            best[b] = max(best[b], value)
    reporter.stop()
    for a, b, value in rejected:
        if sets.find(a) == sets.find(b):
            best[a] = max(best[a], value)
            best[b] = max(best[b], value)
    members: dict[int, list[int]] = {}
    for row in np.flatnonzero(np.isfinite(best)).tolist():
        members.setdefault(sets.find(row), []).append(row)
    groups = [DuplicateGroup(rows, [float(best[row]) for row in rows]) for rows in members.values()]
    groups.sort(key=lambda group: (-len(group.rows), -max(group.best_similarity), group.rows[0]))
    return groups


def oversized_group_hint(groups: list[DuplicateGroup], total: int, threshold: float) -> str | None:
    """A warning when the largest group holds a fifth of the images (at least 5), else None.

    Burst shots or one scene photographed many times can make such a group honestly, so
    this only asks the user to look before acting on it.
    """
    if not groups:
        return None
    largest = max(len(group.rows) for group in groups)
    if largest < max(SUSPICIOUS_GROUP_SIZE, SUSPICIOUS_GROUP_FRACTION * total):
        return None
    return (
        f"the largest group holds {largest} of {total} images at threshold {threshold:.10g}. "
        "Unless they really are copies of one picture, this model scores different images "
        "alike (random or briefly trained encoders do): check the sheet before deleting, "
        "raise --threshold, or embed with a better-trained model (docs/neighbors.md)"
    )


def write_groups_csv(groups: list[DuplicateGroup], embeddings: Embeddings, path: Path) -> None:
    """One line per image in a group: group (1 = largest), size, row, path, best_similarity."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["group", "size", "row", "path", "best_similarity"])
            for number, group in enumerate(groups, start=1):
                for row, similarity in zip(group.rows, group.best_similarity, strict=True):
                    writer.writerow(
                        [number, len(group.rows), row, embeddings.paths[row], f"{similarity:.4f}"]
                    )
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {os_error_reason(error)}") from None


def duplicates_sheet(
    groups: list[DuplicateGroup],
    embeddings: Embeddings,
    *,
    max_groups: int = 20,
    max_per_group: int = 8,
    tile_size: int = 128,
) -> Image.Image:
    """The largest groups, one row each: members captioned with their best similarity.

    A group larger than `max_per_group` shows members spread evenly over its row order.
    """
    shown = groups[:max_groups]
    rows, titles = [], []
    for number, group in enumerate(shown, start=1):
        members = list(zip(group.rows, group.best_similarity, strict=True))
        if len(members) > max_per_group:
            # Spread over the whole group, not its first files: a group that mixes different
            # pictures must not look clean because its first members are alike.
            picks = np.linspace(0, len(members) - 1, max_per_group).round().astype(int)
            members = [members[pick] for pick in picks.tolist()]
        thumbs = load_thumbnails([embeddings.paths[row] for row, _ in members], tile_size)
        rows.append(
            [
                Tile(
                    thumb,
                    (
                        embeddings.paths[row].name,
                        f"best cos {similarity:.4f}",
                        *((f"({status})",) if (status := embeddings.file_status(row)) else ()),
                    ),
                )
                for thumb, (row, similarity) in zip(thumbs, members, strict=True)
            ]
        )
        more = len(group.rows) - len(members)
        titles.append(
            f"group {number}: {len(group.rows)} images" + (f" ({more} not shown)" if more else "")
        )
    title = f"{len(groups)} group{'s' if len(groups) != 1 else ''} of near-duplicates"
    if len(groups) > len(shown):
        title += f"; the {len(shown)} largest shown"
    if not shown:
        title = "no near-duplicates found"
    return draw_grid(rows, tile_size=tile_size, row_titles=titles, title=title)
