import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from simclr_cli.engine.embeddings import load_embeddings
from simclr_cli.errors import ConfigError, DataError


def copy_index(index: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".npy", ".manifest.csv", ".json"):
        shutil.copy(index.with_suffix(suffix), folder / f"vecs{suffix}")
    return folder / "vecs.npy"


def test_rows_map_to_the_files_the_manifest_names(photo_index: Path) -> None:
    # 32 rows, each tied to its file; row_of finds a file by absolute, relative or linked path.
    embeddings = load_embeddings(photo_index)
    assert (embeddings.rows, embeddings.dim) == (32, 512)
    assert embeddings.meta["model"] and len(set(embeddings.paths)) == 32
    target = embeddings.paths[5]
    assert embeddings.row_of(target) == 5
    link = photo_index.parent / "link.png"
    link.symlink_to(target)
    assert embeddings.row_of(link) == 5
    assert embeddings.row_of(photo_index) is None


def test_a_manifest_from_another_run_is_a_clear_error(photo_index: Path, tmp_path: Path) -> None:
    # One row too many in the array, or a row missing from the manifest: refuse, name the fix.
    longer = copy_index(photo_index, tmp_path / "a")
    vectors = np.load(longer)
    np.save(longer, np.concatenate([vectors, vectors[:1]]))
    (longer.with_suffix(".json")).unlink()
    with pytest.raises(DataError, match="does not match its array of 33 rows.*simclr embed again"):
        load_embeddings(longer)

    short = copy_index(photo_index, tmp_path / "b")
    manifest = short.with_suffix(".manifest.csv")
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="31 rows listed"):
        load_embeddings(short)


def test_meta_describing_other_vectors_is_an_error(photo_index: Path, tmp_path: Path) -> None:
    # vecs.json says 32 x 512; an array of another width does not pass as the same run.
    index = copy_index(photo_index, tmp_path / "c")
    meta = json.loads(index.with_suffix(".json").read_text())
    meta["dim"] = 128
    index.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="describes 32 x 128"):
        load_embeddings(index)


def test_missing_files_are_clear_errors(photo_index: Path, tmp_path: Path) -> None:
    # No array, no manifest, a non-.npy path: each says what to do.
    with pytest.raises(DataError, match="no such file"):
        load_embeddings(tmp_path / "none.npy")
    with pytest.raises(ConfigError, match=".npy"):
        load_embeddings(photo_index.with_suffix(".json"))
    index = copy_index(photo_index, tmp_path / "d")
    index.with_suffix(".manifest.csv").unlink()
    with pytest.raises(DataError, match="manifest not found"):
        load_embeddings(index)
