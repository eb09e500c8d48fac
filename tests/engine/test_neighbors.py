import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import TEST_PHOTOS, family, photo, write_copy
from simclr_cli.engine.embeddings import embed_images, load_embeddings
from simclr_cli.engine.neighbors import expand_queries, find_neighbors, write_neighbor_sheets
from simclr_cli.errors import CheckpointError, ConfigError, DataError


def test_each_photos_nearest_three_are_its_own_copies(photo_index: Path) -> None:
    # Even a random encoder ranks an image's re-encoded, resized and cropped copies first.
    embeddings = load_embeddings(photo_index)
    originals = [p for p in embeddings.paths if "__" not in p.stem]
    results = find_neighbors(embeddings, originals, k=3, method="exact", device="cpu")
    for result in results:
        assert result.in_index
        names = [embeddings.paths[row] for row, _ in result.neighbors]
        assert {family(p) for p in names} == {family(result.query)}, names
        assert result.query not in names  # the query itself is left out
        similarities = [s for _, s in result.neighbors]
        assert similarities == sorted(similarities, reverse=True)


def test_an_image_outside_the_index_is_embedded_with_the_index_model(
    photo_index: Path, tmp_path: Path
) -> None:
    # A new copy (JPEG q50 of a 5%-cropped cat) finds the cat family; a byte-identical copy of an
    # indexed file, embedded now, reproduces its stored row.
    embeddings = load_embeddings(photo_index)
    cropped = tmp_path / "cropped.png"
    photo("chelsea").crop((30, 20, 421, 280)).save(cropped)
    new_copy = write_copy(Image.open(cropped), "jpeg", tmp_path, "outside")
    result = find_neighbors(embeddings, [new_copy], k=4, device="cpu")[0]
    assert not result.in_index
    assert {family(embeddings.paths[row]) for row, _ in result.neighbors} == {"chelsea"}

    twin = tmp_path / "twin.png"
    shutil.copy(embeddings.paths[0], twin)
    vector = embed_images(embeddings, [twin], device="cpu")[0].numpy()
    assert np.allclose(vector, embeddings.vectors[0], atol=1e-4)


def test_sheets_one_file_for_one_query_and_a_folder_for_several(
    photo_index: Path, photos_with_copies: Path, tmp_path: Path
) -> None:
    # One query -> the named PNG; a query folder -> one PNG per image inside it.
    embeddings = load_embeddings(photo_index)
    one = find_neighbors(embeddings, [embeddings.paths[0]], k=5, device="cpu")
    [sheet] = write_neighbor_sheets(one, embeddings, tmp_path / "one.png", one_per_file=False)
    with Image.open(sheet) as image:
        assert image.width > 6 * 160 and image.height > 160  # query + 5 tiles of 160 px

    queries = tmp_path / "queries"
    queries.mkdir()
    for name in TEST_PHOTOS[:3]:
        shutil.copy(photos_with_copies / f"{name}.png", queries / f"{name}.png")
    found = expand_queries([queries])
    assert found.any_folder and len(found.files) == 3
    results = find_neighbors(embeddings, found.files, k=2, device="cpu")
    written = write_neighbor_sheets(results, embeddings, tmp_path / "sheets", one_per_file=True)
    assert sorted(p.name for p in written) == sorted(f"{n}.png" for n in TEST_PHOTOS[:3])
    with pytest.raises(ConfigError, match="give -o a folder"):
        write_neighbor_sheets(results, embeddings, tmp_path / "x.png", one_per_file=True)


def test_bad_queries_are_clear_errors(photo_index: Path, tmp_path: Path) -> None:
    # A missing query, an empty query folder, and a broken image outside the index.
    embeddings = load_embeddings(photo_index)
    with pytest.raises(DataError, match="no such image"):
        expand_queries([tmp_path / "nope.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        expand_queries([tmp_path / "empty"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        find_neighbors(embeddings, [broken], device="cpu")


def _index_copy(photo_index: Path, folder: Path, model: str) -> Path:
    """The photo index's three files in `folder`, its vecs.json naming `model`."""
    folder.mkdir()
    for suffix in (".npy", ".manifest.csv", ".json"):
        shutil.copy(photo_index.with_suffix(suffix), folder / f"vecs{suffix}")
    meta_path = folder / "vecs.json"
    meta = json.loads(meta_path.read_text())
    meta["model"] = model
    meta_path.write_text(json.dumps(meta))
    return folder / "vecs.npy"


def test_a_model_other_than_the_one_that_made_the_index_is_refused(
    photo_index: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    # vecs.json edited (or the model retrained in place) to name other weights: the queries
    # would land in another vector space, so embedding them is refused.
    other = tmp_path / "other"
    shutil.copytree(encoder_dir, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("conv1.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, other / "model.safetensors")
    index = _index_copy(photo_index, tmp_path / "edited", str(other))
    query = [load_embeddings(photo_index).paths[0]]
    with pytest.raises(CheckpointError, match="does not hold the weights that made this index"):
        embed_images(load_embeddings(index), query, device="cpu")
    same = _index_copy(
        photo_index, tmp_path / "moved", str(shutil.copytree(encoder_dir, tmp_path / "m"))
    )
    assert embed_images(load_embeddings(same), query, device="cpu").shape[0] == 1


def test_an_index_made_with_a_hub_model_embeds_queries_from_the_cache(
    photo_index: Path, encoder_dir: Path, tmp_path: Path, hub_cache: Any
) -> None:
    # embed records a Hub model as the repository id, which is not a local path.
    files = {p.name: p.read_bytes() for p in encoder_dir.iterdir() if p.is_file()}
    hub_cache.add("someone/photo-encoder", files, ref="main")
    index = _index_copy(photo_index, tmp_path / "hub", "someone/photo-encoder")
    embeddings = load_embeddings(index)
    vector = embed_images(embeddings, [embeddings.paths[0]], device="cpu")[0].numpy()
    assert np.allclose(vector, embeddings.vectors[0], atol=1e-4)
