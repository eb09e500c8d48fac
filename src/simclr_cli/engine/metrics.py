"""The run's `metrics.jsonl` (one JSON record per line) and the loss-curve picture."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from simclr_cli.errors import CheckpointError, os_error_reason

__all__ = ["MetricsLog", "plot_loss_curve"]

logger = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSON lines: `{"kind": "step", ...}` and `{"kind": "epoch", ...}` records."""

    def __init__(self, path: Path) -> None:
        """Open (lazily) the log at `path`."""
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and flush it, so a killed run keeps everything logged so far.

        Raises:
            CheckpointError: The log cannot be written (a full disk, a folder made read-only);
                the run stops there, its last checkpoint untouched.
        """
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise CheckpointError(
                f"could not write {self.path} ({os_error_reason(error)}); the last checkpoint "
                "is intact: free some space, then continue with --resume"
            ) from None

    def read(self) -> list[dict[str, Any]]:
        """Every complete record; a torn last line (killed mid-write) is ignored."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records newer than a checkpoint, so a resumed run does not log steps twice."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        self.path.write_text(text, encoding="utf-8")


def plot_loss_curve(
    records: list[dict[str, Any]],
    path: Path,
    *,
    title: str = "SimCLR pretraining",
    loss_name: str = "NT-Xent loss",
) -> None:
    """Draw loss (raw and smoothed) and learning rate against the step into a PNG."""
    steps = [r for r in records if r.get("kind") == "step"]
    if not steps:
        return
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    x = [r["step"] for r in steps]
    loss = [r["loss"] for r in steps]
    smoothed, running = [], loss[0]
    for value in loss:
        running = 0.9 * running + 0.1 * value
        smoothed.append(running)
    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    loss_axis.plot(x, loss, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    loss_axis.plot(x, smoothed, color="tab:blue", linewidth=2, label="loss (smoothed)")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel(loss_name)
    loss_axis.grid(alpha=0.3)
    lr_axis = loss_axis.twinx()
    lr_axis.plot(
        x, [r["lr"] for r in steps], color="tab:orange", linewidth=1, label="learning rate"
    )
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    lines = loss_axis.get_lines() + lr_axis.get_lines()
    loss_axis.legend(lines, [str(line.get_label()) for line in lines], loc="upper right")
    loss_axis.set_title(title)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        figure.savefig(tmp)
        tmp.replace(path)
    except OSError as error:
        # The picture only repeats metrics.jsonl; a full disk must not stop the run for it.
        logger.warning("could not draw %s (%s)", path, os_error_reason(error))
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    finally:
        plt.close(figure)
