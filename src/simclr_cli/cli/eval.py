"""`simclr eval`: kNN and linear-probe accuracy of a frozen encoder on labelled folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from simclr_cli.cli._common import (
    DeviceOption,
    ForwardBatchOption,
    MaxPixelsOption,
    ModelOption,
    PrecisionOption,
    QuietOption,
    StrictOption,
    VerboseOption,
    WorkersOption,
    check_output,
    user_errors,
)
from simclr_cli.threads import let_idle_threads_sleep

if TYPE_CHECKING:
    from simclr_cli.engine.evaluate import EvalResult


def eval_command(
    train_dir: Annotated[
        Path,
        typer.Argument(
            help="Labelled folder, one subfolder per class (the kNN bank and probe training set).",
            show_default=False,
        ),
    ],
    model: ModelOption,
    test: Annotated[
        Path | None,
        typer.Option(
            "--test", help="Labelled test folder (default: hold out --val-fraction of TRAIN_DIR)."
        ),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option(help="Share of each class held out for testing when there is no --test."),
    ] = 0.2,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline",
            help="Also evaluate 'random' (same network, random init) and/or 'pixels' (raw "
            "pixels); repeat the option for both.",
        ),
    ] = None,
    k: Annotated[
        list[int] | None,
        typer.Option("-k", help="Neighbours for kNN; repeat for several (default: 20 and 200)."),
    ] = None,
    knn_temperature: Annotated[
        float, typer.Option(help="Temperature of weighted kNN voting.")
    ] = 0.1,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for eval.json and confusion.png (default: MODEL/eval for a local "
            "model folder, else ./eval).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the splits and the random baseline.")] = 0,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Recompute features instead of reusing cached ones."),
    ] = False,
    batch_size: ForwardBatchOption = 256,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    workers: WorkersOption = None,
    strict: StrictOption = False,
    max_pixels: MaxPixelsOption = None,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Measure the frozen encoder's features: kNN and linear-probe accuracy, with baselines."""
    let_idle_threads_sleep()  # before torch loads (simclr_cli/threads.py)
    from simclr_cli.console import make_reporter, setup_logging
    from simclr_cli.engine.evaluate import EvalOptions, evaluate

    setup_logging(verbose=verbose, quiet=quiet)
    options = EvalOptions(
        knn_ks=tuple(k) if k else (20, 200),
        knn_temperature=knn_temperature,
        val_fraction=val_fraction,
        baselines=tuple(dict.fromkeys(baseline or [])),
        seed=seed,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=workers,
        strict=strict,
        max_pixels=max_pixels,
        use_cache=not no_cache,
    )
    out_dir = out or _default_out(model)
    # Re-running eval replaces the previous numbers; say so rather than overwrite silently.
    replaced = (out_dir / "eval.json").is_file()
    with user_errors():
        check_output(out_dir, folder=True)
        result = evaluate(
            model,
            train_dir,
            test_dir=test,
            out_dir=out_dir,
            options=options,
            reporter=make_reporter(quiet=quiet),
        )
    _render(result, temperature=options.knn_temperature, replaced=replaced)


def _default_out(model: str) -> Path:
    local = Path(model)
    return local / "eval" if local.is_dir() else Path("eval")


def _render(result: EvalResult, *, temperature: float, replaced: bool) -> None:
    from rich.table import Table

    from simclr_cli.console import output_console

    first = next(iter(result.results.values()))
    knn_names = list(first["knn"])
    with_top5 = "top5" in first["linear"]
    table = Table(
        title=f"top-1 accuracy (%) on {result.test_images} {result.test_kind} images, "
        f"{len(result.class_names)} classes",
        title_justify="left",
    )
    table.add_column("features", no_wrap=True)
    capped = []
    for name in knn_names:
        k, rule = name.split("_")
        # A k above the number of training images votes over all of them: say which k ran.
        used = int(first["knn"][name].get("k_used", k[1:]))
        if used < int(k[1:]) and rule == "weighted":
            capped.append(f"k = {k[1:]} capped at the {used} training images")
        table.add_column(f"kNN-{used} {'w' if rule == 'weighted' else 'maj'}", justify="right")
    table.add_column("linear", justify="right")
    if with_top5:
        table.add_column("lin top5", justify="right")
    labels = {"model": "pretrained", "random": "random init", "pixels": "raw pixels"}
    for source, scores in result.results.items():
        row = [labels.get(source, source)]
        row += [f"{100 * scores['knn'][name]['top1']:.1f}" for name in knn_names]
        row.append(f"{100 * scores['linear']['top1']:.1f}")
        if with_top5:
            row.append(f"{100 * scores['linear']['top5']:.1f}")
        table.add_row(*row)
    console = output_console()
    console.print(table)
    console.print(
        f"kNN w: cosine-weighted vote, t = {temperature:g}; maj: majority vote; "
        "linear: linear probe on frozen features" + "".join(f"; {note}" for note in capped),
        highlight=False,
        markup=False,
    )
    unconverged = [s for s, r in result.results.items() if not r["linear"]["converged"]]
    if unconverged:
        console.print(
            f"note: the linear probe did not fully converge for {', '.join(unconverged)} "
            "(see eval.json: gradient_max_abs)",
            highlight=False,
            markup=False,
        )
    if result.skipped:
        console.print(
            f"skipped {len(result.skipped)} unreadable file(s), named above and in eval.json",
            highlight=False,
            markup=False,
        )
    console.print(
        f"wrote {result.out_dir / 'eval.json'} and {result.out_dir / 'confusion.png'} "
        f"in {result.seconds:.1f} s" + (" (replacing the previous ones)" if replaced else ""),
        highlight=False,
        markup=False,
    )
