"""Measure what `simclr duplicates` finds on real photos with planted near-copies.

Writes 19 public-domain/CC photos (scikit-image, scikit-learn; docs/datasets.md) and three
near-copies of each (JPEG quality 50, half size, 5% cut from every side) into PHOTOS, embeds
them with each MODEL, and prints per model: the lowest similarity of a copy to its original,
the highest similarity between different photos, and what each threshold finds by the
model alone and with the pixel check that `simclr duplicates` runs by default.
`--pixel-scores` also prints the pixel check's lowest copy score and highest score between
different photos over every pair of files (no model involved).
`--centred T` (repeatable) also measures the cosine after subtracting the collection's mean
unit vector (not what `simclr duplicates` uses; docs/neighbors.md says why).

    python benchmarks/duplicates_threshold.py --photos /tmp/photos --model RUN [--model RUN2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import family, write_photos_with_copies  # noqa: E402
from simclr_cli.engine import duplicates as duplicates_module  # noqa: E402
from simclr_cli.engine.duplicates import DEFAULT_THRESHOLD, find_duplicates  # noqa: E402
from simclr_cli.engine.embed import EmbedOptions, embed_folder  # noqa: E402
from simclr_cli.engine.embeddings import load_embeddings  # noqa: E402
from simclr_cli.engine.pixel_check import PixelChecker, match_score  # noqa: E402

PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
    "horse", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "retina", "rocket",
    "text", "clock", "china", "flower",
)  # fmt: skip


def _components(similarity: np.ndarray, threshold: float) -> list[int]:
    """Connected component of each row when pairs at or above the threshold are linked."""
    parent = list(range(len(similarity)))

    def find(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for a, b in zip(*np.nonzero(np.triu(similarity >= threshold, 1)), strict=True):
        parent[find(int(a))] = find(int(b))
    return [find(row) for row in range(len(similarity))]


def centred_rows(
    name: str, similarity: np.ndarray, families: list[str], copies: list[tuple[int, int]],
    thresholds: list[float],
) -> list[str]:  # fmt: skip
    """Table rows for a similarity matrix grouped here (not by find_duplicates)."""
    same = np.array([[a == b for b in families] for a in families])
    different = np.where(same, -np.inf, similarity)
    a, b = np.unravel_index(np.argmax(different), different.shape)
    copy_low = min(similarity[i, j] for i, j in copies)
    rows = []
    for threshold in thresholds:
        component = _components(similarity, threshold)
        found = sum(1 for i, j in copies if component[i] == component[j])
        members: dict[int, set[str]] = {}
        for row, root in enumerate(component):
            members.setdefault(root, set()).add(families[row])
        mixed = [names for names in members.values() if len(names) > 1]
        rows.append(
            f"| {name} | {copy_low:.4f} | {different[a, b]:.4f} ({families[a]} / "
            f"{families[b]}) | {threshold} | {found}/{len(copies)} | - "
            f"| {len(mixed)} ({sum(len(names) for names in mixed)} photos) | - | - | - |"
        )
    return rows


def measure(
    photos: Path,
    model: Path,
    work: Path,
    thresholds: list[float],
    centred: list[float],
    *,
    projection: bool = False,
) -> list[str]:
    """Markdown table rows for this model, one per threshold."""
    name = f"{model.name}, projection" if projection else model.name
    out = work / f"{model.name}{'-z' if projection else ''}.npy"
    options = EmbedOptions(num_workers=0, device="cpu", projection=projection)
    embed_folder(photos, model, out, options=options)
    embeddings = load_embeddings(out)
    unit = np.asarray(embeddings.vectors, dtype=np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    similarity = unit @ unit.T  # (N, N)
    families = [family(p) for p in embeddings.paths]
    original = {
        f: i
        for i, (f, p) in enumerate(zip(families, embeddings.paths, strict=True))
        if "__" not in p.stem
    }
    copies = [
        (i, original[f])
        for i, (f, p) in enumerate(zip(families, embeddings.paths, strict=True))
        if "__" in p.stem
    ]
    copy_low = min(similarity[i, j] for i, j in copies)
    same = np.array([[a == b for b in families] for a in families])
    different = np.where(same, -np.inf, similarity)
    a, b = np.unravel_index(np.argmax(different), different.shape)
    rows = []
    checker = PixelChecker(embeddings.paths)  # one per model: thumbnails decoded once

    def outcome(groups: list) -> str:
        group_of = {row: n for n, g in enumerate(groups) for row in g.rows}
        found = sum(1 for i, j in copies if i in group_of and group_of.get(j) == group_of[i])
        mixed = [g for g in groups if len({families[r] for r in g.rows}) > 1]
        photos_in_mixed = sum(len({families[r] for r in g.rows}) for g in mixed)
        return f"{found}/{len(copies)} | {len(groups)} | {len(mixed)} ({photos_in_mixed} photos)"

    for threshold in thresholds:
        alone = find_duplicates(embeddings, threshold=threshold, method="exact")
        checked = find_duplicates(embeddings, threshold=threshold, method="exact", checker=checker)
        rows.append(
            f"| {name} | {copy_low:.4f} | {different[a, b]:.4f} ({families[a]} / "
            f"{families[b]}) | {threshold} | {outcome(alone)} | {outcome(checked)} |"
        )
    if centred:
        shifted = unit - unit.mean(axis=0)
        shifted /= np.linalg.norm(shifted, axis=1, keepdims=True)
        rows += centred_rows(f"{name}, centred", shifted @ shifted.T, families, copies, centred)
    return rows


def pixel_scores(photos: Path) -> str:
    """The pixel check's score over every pair of files: copies' lowest, strangers' highest."""
    paths = sorted(p for p in photos.iterdir() if p.is_file())
    checker = PixelChecker(paths)
    thumbnails = [checker._thumbnail(row) for row in range(len(paths))]
    same: list[tuple[float, str, str]] = []
    different: list[tuple[float, str, str]] = []
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            first, second = thumbnails[i], thumbnails[j]
            assert first is not None and second is not None
            entry = (match_score(first, second), paths[i].name, paths[j].name)
            (same if family(paths[i]) == family(paths[j]) else different).append(entry)
    low, high = min(same), max(different)
    return (
        f"pixel check over {len(same) + len(different)} pairs: lowest between copies of one "
        f"photo {low[0]:.3f} ({low[1]} / {low[2]}), highest between different photos "
        f"{high[0]:.3f} ({high[1]} / {high[2]})"
    )


def main() -> None:
    """Write the photos if needed, then print one table row per model."""
    # A measurement, not a user's run: random encoders at low thresholds propose more false
    # links than `simclr duplicates` would check before giving up, and we want to see them all.
    duplicates_module.REJECTION_BUDGET_BASE = 10**9
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder to write photos into")
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--threshold", type=float, action="append", help="repeatable")
    parser.add_argument(
        "--centred", type=float, action="append", default=[], help="threshold on centred cosine"
    )
    parser.add_argument(
        "--projection",
        action="store_true",
        help="embed with the projection head (embed --projection) instead of encoder features",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/duplicates-benchmark"))
    parser.add_argument(
        "--pixel-scores", action="store_true", help="score every pair by pixels alone first"
    )
    args = parser.parse_args()
    if not any(args.photos.glob("*.png")):
        write_photos_with_copies(args.photos, PHOTOS)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.pixel_scores:
        print(pixel_scores(args.photos), flush=True)
    print(
        "| model | lowest copy-original cos | highest different-photo cos | threshold "
        "| model alone: copies grouped with original | groups | groups mixing photos "
        "| with pixel check: copies grouped | groups | groups mixing photos |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.model:
        thresholds = args.threshold or [DEFAULT_THRESHOLD]
        for row in measure(
            args.photos, model, args.work, thresholds, args.centred, projection=args.projection
        ):
            print(row, flush=True)


if __name__ == "__main__":
    main()
