"""`simclr neighbors`: the most similar images to a query, as a list and a contact sheet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simclr_cli.cli._common import DeviceOption, QuietOption, VerboseOption, user_errors
from simclr_cli.threads import let_idle_threads_sleep

IndexOption = Annotated[
    Path,
    typer.Option(
        "--index",
        "-i",
        help="The .npy that simclr embed wrote (its .manifest.csv and .json beside it).",
        show_default=False,
    ),
]
SearchOption = Annotated[
    str,
    typer.Option(
        "--search",
        help="exact, approx (faiss HNSW, needs the \\[ann] extra) or auto (approx only when "
        "installed and the search is large).",
    ),
]


def neighbors_command(
    queries: Annotated[
        list[Path],
        typer.Argument(
            help="Image files or folders of images; a file in the index uses its stored vector, "
            "any other image is embedded with the index's model.",
            show_default=False,
        ),
    ],
    index: IndexOption,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per query.")] = 8,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Contact sheet .png for one query (default neighbors.png); a folder for "
            "several queries or a query folder (default neighbors/), one sheet per query.",
            show_default=False,
        ),
    ] = None,
    search: SearchOption = "auto",
    device: DeviceOption = "auto",
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Print the k nearest images of each query with their cosine similarity; draw a sheet."""
    let_idle_threads_sleep()  # before torch loads (simclr_cli/threads.py)
    from simclr_cli.console import output_console, setup_logging
    from simclr_cli.engine.embeddings import load_embeddings
    from simclr_cli.engine.neighbors import expand_queries, find_neighbors, write_neighbor_sheets

    setup_logging(verbose=verbose, quiet=quiet)
    console = output_console()
    with user_errors():
        embeddings = load_embeddings(index)
        # Where the sheets go (the defaults of write_neighbor_sheets when -o is not given).
        sheets_at = [out] if out is not None else [Path("neighbors"), Path("neighbors.png")]
        found = expand_queries(queries, exclude=sheets_at)
        results = find_neighbors(
            embeddings,
            found.files,
            k=k,
            method=search,
            device=device,
            skippable=found.from_folders,
        )
        sheets = write_neighbor_sheets(
            results, embeddings, out, one_per_file=found.any_folder or len(found.files) > 1
        )
    for result, sheet in zip(results, sheets, strict=True):
        where = "in the index" if result.in_index else "embedded with the index's model"
        console.print(f"{result.query} ({where}); sheet: {sheet}", highlight=False, markup=False)
        for rank, (row, similarity) in enumerate(result.neighbors, start=1):
            status = embeddings.file_status(row)
            note = f"  ({status})" if status else ""
            console.print(
                f"  {rank:>3}  {similarity:.4f}  {embeddings.paths[row]}{note}",
                highlight=False,
                markup=False,
            )
