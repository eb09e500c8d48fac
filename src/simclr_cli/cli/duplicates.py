"""`simclr duplicates`: groups of near-duplicate images, as a CSV and a contact sheet."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from simclr_cli.cli._common import (
    DeviceOption,
    QuietOption,
    VerboseOption,
    check_output,
    user_errors,
)
from simclr_cli.cli.neighbors import IndexOption, SearchOption
from simclr_cli.threads import let_idle_threads_sleep

if TYPE_CHECKING:
    from simclr_cli.engine.duplicates import DuplicateGroup
    from simclr_cli.engine.pixel_check import PixelChecker


def duplicates_command(
    index: IndexOption,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            "-t",
            min=-1.0,
            max=1.0,
            help="Cosine similarity at or above which two images are candidate copies "
            "(default 0.97); the pixel check then confirms or rejects each. Lower it to catch "
            "more copies (more checks, slower). By the model alone (--no-pixel-check), random "
            "or barely trained encoders put unrelated photos in one group at 0.97 and need "
            "0.99 or more (docs/neighbors.md).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Groups as CSV; the sheet is written beside it as .png."),
    ] = Path("duplicates.csv"),
    pixel_check: Annotated[
        bool,
        typer.Option(
            "--pixel-check/--no-pixel-check",
            help="Confirm each link from the images themselves: one must be found inside the "
            "other, allowing re-encoding, resizing, mirroring, colour changes and crops that "
            "keep about 70% of each side. Removes the false groups a model makes of "
            "different pictures with similar content (two textures, say). Turn it off to "
            "group by the model alone: burst shots, the same scene photographed twice.",
        ),
    ] = True,
    sheet_groups: Annotated[
        int, typer.Option("--sheet-groups", min=1, help="Largest groups drawn on the sheet.")
    ] = 20,
    search: SearchOption = "auto",
    device: DeviceOption = "auto",
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Find groups of near-duplicate images (similar to the model, confirmed by pixels)."""
    let_idle_threads_sleep()  # before torch loads (simclr_cli/threads.py)
    from simclr_cli.console import make_reporter, output_console, setup_logging
    from simclr_cli.device import resolve_device
    from simclr_cli.engine.duplicates import (
        DEFAULT_THRESHOLD,
        duplicates_sheet,
        find_duplicates,
        oversized_group_hint,
        write_groups_csv,
    )
    from simclr_cli.engine.embeddings import load_embeddings
    from simclr_cli.engine.pixel_check import PixelChecker
    from simclr_cli.engine.sheets import save_png
    from simclr_cli.errors import ConfigError

    setup_logging(verbose=verbose, quiet=quiet)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    with user_errors():
        if out.suffix.lower() == ".png":  # the sheet would overwrite the CSV
            raise ConfigError(
                f"-o/--out names the CSV and the sheet goes beside it as .png; {out} would be "
                f"both: give {out.with_suffix('.csv')}"
            )
        check_output(out, folder=False)
        embeddings = load_embeddings(index)
        checker = PixelChecker(embeddings.paths) if pixel_check else None
        # Without the check, files deleted since embed would still be listed as copies (and
        # bridge groups); the check finds those itself.
        gone: set[int] = set()

        def present(row: int) -> bool:
            if row in gone:
                return False
            if embeddings.paths[row].exists():
                return True
            gone.add(row)
            return False

        groups = find_duplicates(
            embeddings,
            threshold=threshold,
            method=search,
            device=resolve_device(device),
            reporter=make_reporter(quiet=quiet),
            checker=checker,
            present=None if pixel_check else present,
        )
        write_groups_csv(groups, embeddings, out)
        sheet = out.with_suffix(".png")
        if groups:  # a sheet of no groups would be an empty picture
            save_png(duplicates_sheet(groups, embeddings, max_groups=sheet_groups), sheet)
    output_console().print(
        _summary(groups, embeddings.rows, threshold, out, sheet, sheet_groups) + _checked(checker),
        highlight=False,
        markup=False,
    )
    if checker is not None and checker.unreadable:
        count = len(checker.unreadable)
        logging.getLogger("simclr_cli").warning(
            "%d file%s could not be read for the pixel check (named above; moved, deleted or "
            "changed since simclr embed) and %s left out of every group",
            count,
            "" if count == 1 else "s",
            "was" if count == 1 else "were",
        )
    if checker is not None and threshold > 0.9 and not quiet:
        # Measured on 19 photos with planted copies (docs/neighbors.md): with the check on,
        # 0.9 kept every group exact for the trained and random encoders measured (though a
        # random one proposes so many pairs there that the rejection budget stops it).
        output_console().print(
            "tip: the pixel check keeps groups exact, so --threshold 0.9 finds copies the "
            "model scores lower, at the cost of more checks (docs/neighbors.md)",
            highlight=False,
            markup=False,
        )
    if gone:
        logging.getLogger("simclr_cli").warning(
            "%d file%s listed in the index no longer exist%s and %s left out of every group: %s",
            len(gone),
            "" if len(gone) == 1 else "s",
            "s" if len(gone) == 1 else "",
            "was" if len(gone) == 1 else "were",
            ", ".join(str(embeddings.paths[row]) for row in sorted(gone)[:5])
            + (f" and {len(gone) - 5} more" if len(gone) > 5 else ""),
        )
    hint = oversized_group_hint(groups, embeddings.rows, threshold)
    if hint:
        logging.getLogger("simclr_cli").warning(hint)


def _checked(checker: PixelChecker | None) -> str:
    """The pixel check's part of the summary line."""
    if checker is None:
        return "; links from the model alone (--no-pixel-check)"
    if not checker.checked:
        return ""
    return (
        f"; {checker.checked} link{'s' if checker.checked != 1 else ''} checked by pixels, "
        f"{checker.rejected} rejected as different pictures"
    )


def _summary(
    groups: list[DuplicateGroup],
    rows: int,
    threshold: float,
    out: Path,
    sheet: Path,
    sheet_groups: int,
) -> str:
    if not groups:
        earlier = f" ({sheet} is from an earlier run)" if sheet.exists() else ""
        return (
            f"no near-duplicates among {rows} images at threshold {threshold:.10g}; {out} holds "
            f"only its header and no sheet was drawn{earlier}"
        )
    images = sum(len(group.rows) for group in groups)
    drawn = min(sheet_groups, len(groups))
    where = f"drawn in {sheet}" if drawn == len(groups) else f"the largest {drawn} drawn in {sheet}"
    return (
        f"{len(groups)} group{'s' if len(groups) != 1 else ''} holding {images} of {rows} "
        f"images at threshold {threshold:.10g}; groups in {out}, {where}"
    )
