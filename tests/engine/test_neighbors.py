import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TEST_PHOTOS, family, photo, write_copy
from simclr_cli.engine.embeddings import embed_images, load_embeddings
from simclr_cli.engine.neighbors import expand_queries, find_neighbors, write_neighbor_sheets
from simclr_cli.errors import ConfigError, DataError


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
    files, any_folder = expand_queries([queries])
    assert any_folder and len(files) == 3
    results = find_neighbors(embeddings, files, k=2, device="cpu")
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
