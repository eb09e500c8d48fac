import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from simclr_cli.checkpoint import save_exported_model
from simclr_cli.config import AugmentConfig, RunConfig
from simclr_cli.engine.embed import EmbedOptions, embed_folder
from simclr_cli.engine.pretrain import initial_model
from simclr_cli.engine.progress import NullReporter
from simclr_cli.errors import CheckpointError, ConfigError, DataError
from simclr_cli.models.export import export_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 16 px encoder exported like a finished run."""
    config = RunConfig(augment=AugmentConfig(image_size=16))
    model = initial_model(config)
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    assert model.projection_head is not None
    state.update({f"projection_head.{k}": v for k, v in model.projection_head.state_dict().items()})
    folder = tmp_path_factory.mktemp("model")
    save_exported_model(folder, state, export_config(config, {}))
    return folder


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_each_row_is_the_embedding_of_the_file_the_manifest_names(
    few_digits: Path, model_dir: Path, tmp_path: Path
) -> None:
    # Rows follow the manifest: a file embedded alone gives exactly its row in the batch run.
    result = embed_folder(
        few_digits,
        model_dir,
        tmp_path / "vecs.npy",
        options=EmbedOptions(batch_size=7, num_workers=0),
    )
    vectors = np.load(tmp_path / "vecs.npy")
    manifest = read_manifest(result.manifest_path)
    assert vectors.shape == (60, 512) and vectors.dtype == np.float32 and len(manifest) == 60
    assert [int(r["row"]) for r in manifest] == list(range(60))
    for record in (manifest[0], manifest[31], manifest[59]):
        alone = tmp_path / f"alone{record['row']}"
        alone.mkdir()
        shutil.copy(record["path"], alone / Path(record["path"]).name)
        single = embed_folder(
            alone, model_dir, alone / "out" / "v.npy", options=EmbedOptions(num_workers=0)
        )
        assert single.rows == 1
        row = np.load(alone / "out" / "v.npy")[0]
        assert np.allclose(row, vectors[int(record["row"])], atol=1e-4)


def test_broken_files_are_listed_in_the_manifest_not_embedded(
    few_digits: Path, model_dir: Path, tmp_path: Path
) -> None:
    # A truncated image and a fake one are skipped with reasons; rows stay contiguous.
    data = tmp_path / "data"
    shutil.copytree(few_digits / "4", data / "4")
    (data / "4" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (data / "notes.jpg").write_text("hello")
    result = embed_folder(
        data,
        model_dir,
        tmp_path / "out" / "vecs.npy",
        options=EmbedOptions(num_workers=0, batch_size=5),
    )
    manifest = read_manifest(result.manifest_path)
    skipped = {Path(r["path"]).name: r["skipped_reason"] for r in manifest if r["row"] == ""}
    assert set(skipped) == {"bad.png", "notes.jpg"} and all(skipped.values())
    assert result.rows == 6 and np.load(result.array_path).shape == (6, 512)
    meta = json.loads((tmp_path / "out" / "vecs.json").read_text())
    assert meta["rows"] == 6 and meta["skipped"] == 2
    # `auto` embeds in fp32, on every CPU; the record says what it resolved to.
    assert meta["precision"] == "fp32" and meta["device"] == "cpu"


def test_projection_and_normalised_rows(few_digits: Path, model_dir: Path, tmp_path: Path) -> None:
    # --projection gives the head's 128-d output; --normalize gives unit rows; a batch of one works.
    options = EmbedOptions(num_workers=0, projection=True, l2_normalize=True, batch_size=59)
    result = embed_folder(few_digits, model_dir, tmp_path / "p.npy", options=options)
    vectors = np.load(result.array_path)
    assert vectors.shape == (60, 128)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_missing_model_and_empty_folder_are_clear_errors(
    few_digits: Path, model_dir: Path, tmp_path: Path
) -> None:
    # No model, no images: one-line errors before anything is written.
    with pytest.raises(CheckpointError, match="no such model folder"):
        embed_folder(few_digits, tmp_path / "nope", tmp_path / "v.npy")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        embed_folder(empty, model_dir, tmp_path / "v.npy")
    assert not (tmp_path / "v.npy").exists()


def test_output_inside_the_data_folder_leaves_every_image_in(
    few_digits: Path, model_dir: Path, tmp_path: Path
) -> None:
    # Writing vecs.npy into a class folder must not drop that folder's images.
    data = tmp_path / "data"
    shutil.copytree(few_digits, data)
    result = embed_folder(
        data, model_dir, data / "3" / "vecs.npy", options=EmbedOptions(num_workers=0)
    )
    assert result.rows == 60


def test_unwritable_output_is_a_clear_error(
    few_digits: Path, model_dir: Path, tmp_path: Path
) -> None:
    # An output path under a file fails before any image is encoded, with one line.
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write"):
        embed_folder(few_digits, model_dir, blocker / "v.npy")


class StopAfter(NullReporter):
    """Raises KeyboardInterrupt (as Ctrl-C would) once `files` files are done."""

    def __init__(self, files: int) -> None:
        self.files = files

    def advance(self, *, completed: int, metrics: dict[str, float]) -> None:
        if completed >= self.files:
            raise KeyboardInterrupt


def test_interrupted_embed_continues_where_it_stopped(
    few_digits: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C after two batches keeps their rows; the same call again embeds only the rest and
    # ends with exactly the file a straight run writes. Rows past the record (a kill between
    # two progress saves) are overwritten, never trusted.
    monkeypatch.setattr("simclr_cli.engine.embed._PROGRESS_SECONDS", 0.0)
    folder = tmp_path / "digits"
    shutil.copytree(few_digits, folder)
    (folder / "3" / "zz-broken.png").write_bytes(b"\x89PNG broken")
    options = EmbedOptions(batch_size=16, num_workers=0, device="cpu")
    straight = embed_folder(folder, model_dir, tmp_path / "straight.npy", options=options)
    out = tmp_path / "resumed.npy"
    with pytest.raises(KeyboardInterrupt):
        embed_folder(folder, model_dir, out, options=options, reporter=StopAfter(32))
    partial = np.load(tmp_path / ".resumed.npy.partial.npy", mmap_mode="r+")
    progress = json.loads((tmp_path / ".resumed.npy.progress.json").read_text())
    assert progress["files_done"] == 32 and not out.exists()
    partial[progress["rows"] :] = np.nan  # what a kill mid-batch could leave behind
    partial.flush()
    del partial

    class Count(NullReporter):
        first = None

        def start(self, **kwargs: object) -> None:
            Count.first = kwargs.get("completed")

    resumed = embed_folder(folder, model_dir, out, options=options, reporter=Count())
    assert Count.first == 32
    assert np.array_equal(np.load(out), np.load(straight.array_path))
    assert read_manifest(out.with_suffix(".manifest.csv")) == read_manifest(straight.manifest_path)
    assert resumed.skipped == straight.skipped and len(resumed.skipped) == 1
    assert not (tmp_path / ".resumed.npy.progress.json").exists()


def test_progress_of_another_model_is_not_reused(
    few_digits: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("simclr_cli.engine.embed._PROGRESS_SECONDS", 0.0)
    options = EmbedOptions(batch_size=16, num_workers=0, device="cpu")
    out = tmp_path / "v.npy"
    with pytest.raises(KeyboardInterrupt):
        embed_folder(few_digits, model_dir, out, options=options, reporter=StopAfter(16))
    # Same output path, now with L2-normalised rows: the old rows must not be mixed in.
    normalised = EmbedOptions(batch_size=16, num_workers=0, device="cpu", l2_normalize=True)
    embed_folder(few_digits, model_dir, out, options=normalised)
    assert np.allclose(np.linalg.norm(np.load(out), axis=1), 1.0, atol=1e-5)


def test_a_disk_too_full_for_the_rows_is_an_error_before_any_work(
    few_digits: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sparse memory-mapped file on a full disk would end the process with SIGBUS mid-run;
    # the blocks are reserved first, so a full disk is a message. posix_fallocate is the
    # call a full disk fails; ENOSPC is what it then returns.
    import errno
    import os

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    reserved: list[int] = []

    def full_disk(fd: int, offset: int, length: int) -> None:
        reserved.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    out = tmp_path / "v.npy"
    with pytest.raises(ConfigError, match=r"No space left on device \(the rows need 120 KiB\)"):
        embed_folder(few_digits, model_dir, out, options=EmbedOptions(num_workers=0))
    assert reserved and reserved[0] >= 60 * 512 * 4  # the whole array, asked for up front
    assert not any(tmp_path.glob(".v.npy*")) and not out.exists()
