"""Files and folders the user may not read or write, with real permissions.

`chmod 000` does not stop root, and CI and this project's machines run tests as root, so each
case runs in a forked child that has dropped to the `nobody` user first (as a normal user,
the case runs in-process). The child cannot import anything new from a private interpreter
folder (/root is often 0700), so every case first runs once in the parent to load the modules
it needs, and works in a world-readable folder outside pytest's private temporary tree.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_digits
from simclr_cli.checkpoint import load_checkpoint, save_training_checkpoint
from simclr_cli.cli.app import app
from simclr_cli.engine.embed import EmbedOptions, embed_folder
from simclr_cli.errors import CheckpointError, DataError


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to drop to")
    return entry.pw_uid, entry.pw_gid


def run_unprivileged(case: Callable[[], Any]) -> Any:
    """`case()` as an unprivileged user; its return value (JSON-able) or AssertionError."""
    if os.geteuid() != 0:
        return case()
    uid, gid = _nobody()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, run, report, never return to pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            torch.set_num_threads(1)  # the parent's thread pool did not survive the fork
            try:
                report = {"ok": case()}
            except BaseException as error:  # noqa: BLE001 - everything goes back to the parent
                report = {
                    "error": f"{type(error).__name__}: {error}",
                    "trace": traceback.format_exc(),
                }
            with os.fdopen(write_end, "w") as pipe:
                json.dump(report, pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and text, "the unprivileged child died"
    report = json.loads(text)
    if "error" in report:
        raise AssertionError(f"in the unprivileged child: {report['error']}\n{report['trace']}")
    return report["ok"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder the unprivileged child can traverse (pytest's own tree is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="simclr-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:  # give back what the cases locked
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IRWXU)
        shutil.rmtree(folder)


def _open_to_everyone(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)


def test_unreadable_image_and_folder_are_counted_skips_and_strict_names_the_file(
    shared_dir: Path, encoder_dir: Path
) -> None:
    data = write_digits(shared_dir / "data", per_class=1, labelled=False)  # 10 real digits
    locked_folder = data / "locked"
    write_digits(locked_folder, per_class=1, labelled=False)
    model = shared_dir / "model"
    shutil.copytree(encoder_dir, model)
    out = shared_dir / "out"
    out.mkdir()
    _open_to_everyone(shared_dir)

    def embed(name: str, *, strict: bool = False) -> dict[str, Any]:
        options = EmbedOptions(device="cpu", num_workers=0, strict=strict)
        try:
            result = embed_folder(data, model, out / f"{name}.npy", options=options)
        except DataError as error:
            return {"error": str(error)}
        return {
            "rows": result.rows,
            "skipped": {Path(p).name: r for p, r in result.skipped.items()},
        }

    assert embed("as-root")["rows"] == 20  # loads every module the child will need
    secret = sorted(data.glob("*.png"))[3]
    secret.chmod(0)
    locked_folder.chmod(0)

    relaxed = run_unprivileged(lambda: embed("relaxed"))
    assert relaxed == {"rows": 9, "skipped": {secret.name: "permission denied"}}
    strict = run_unprivileged(lambda: embed("strict", strict=True))
    assert secret.name in strict["error"] and "permission denied" in strict["error"]


def test_an_output_folder_the_user_may_not_write_stops_pretrain_before_training(
    shared_dir: Path,
) -> None:
    data = write_digits(shared_dir / "data", per_class=2, labelled=False)
    _open_to_everyone(shared_dir / "data")
    owned_by_root = shared_dir / "runs"
    owned_by_root.mkdir(mode=0o755)
    runner = CliRunner()
    args = ["pretrain", str(data), "--image-size", "16", "--batch-size", "8", "--epochs", "1"]
    args += ["--workers", "0", "--arch", "resnet18"]

    def pretrain(out: Path) -> dict[str, Any]:
        result = runner.invoke(app, [*args, "-o", str(out)])
        return {"code": result.exit_code, "output": result.output}

    warm = pretrain(shared_dir / "warm-up")  # root may write here; imports every module
    assert warm["code"] == 0, warm["output"]
    if os.geteuid() != 0:
        owned_by_root.chmod(0o555)
    refused = run_unprivileged(lambda: pretrain(owned_by_root / "run"))
    assert refused["code"] != 0
    lines = [line for line in refused["output"].splitlines() if line.strip()]
    assert len(lines) == 1, refused["output"]
    assert "cannot write" in lines[0] and "permission denied" in lines[0].lower()
    assert not (owned_by_root / "run").exists()


def test_a_checkpoint_folder_made_read_only_keeps_the_previous_checkpoint(
    shared_dir: Path,
) -> None:
    folder = shared_dir / "run" / "checkpoints"
    path = folder / "last.pt"
    save_training_checkpoint(path, {"step": 1, "weights": torch.ones(4)})
    save_training_checkpoint(path, {"step": 1, "weights": torch.ones(4)})  # warm-up as root
    _open_to_everyone(shared_dir)
    path.chmod(0o666)

    def save_into_read_only_folder() -> dict[str, Any]:
        folder.chmod(0o555)  # the child owns the folder (chown below), so it may lock it
        try:
            save_training_checkpoint(path, {"step": 2, "weights": torch.ones(4)})
        except CheckpointError as error:
            return {"error": str(error), "step": int(load_checkpoint(path)["step"])}
        return {"error": None}

    os.chown(folder, *_owner_for_child())
    report = run_unprivileged(save_into_read_only_folder)
    assert report["error"] is not None and "ermission denied" in report["error"]
    assert "previous checkpoint is intact" in report["error"]
    assert report["step"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]


def _owner_for_child() -> tuple[int, int]:
    """Who the child runs as, so it may chmod the folder it was handed."""
    return _nobody() if os.geteuid() == 0 else (os.geteuid(), os.getegid())


def test_commands_refuse_an_unwritable_output_before_their_work(
    shared_dir: Path, photo_file: Path
) -> None:
    # eval, predict and augment-preview used to compute everything before failing to write.
    shutil.copy(photo_file, shared_dir / "cat.png")
    _open_to_everyone(shared_dir)
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o755)  # owned by root: the unprivileged child may not write in it
    runner = CliRunner()

    def preview(out: Path) -> dict[str, Any]:
        args = ["augment-preview", str(shared_dir / "cat.png"), "--size", "16", "-n", "1"]
        result = runner.invoke(app, [*args, "-o", str(out)])
        return {"code": result.exit_code, "output": result.output}

    assert preview(shared_dir / "warm.png")["code"] == 0  # as root: loads every module
    if os.geteuid() != 0:
        locked.chmod(0o555)
    refused = run_unprivileged(lambda: preview(locked / "views.png"))
    assert refused["code"] == 1
    assert "permission denied" in refused["output"] and "wrote" not in refused["output"]
