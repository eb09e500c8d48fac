import os
from pathlib import Path

import pytest
import torch

from simclr_cli.data import loader as loader_module
from simclr_cli.data.images import scan_images
from simclr_cli.data.loader import ImageBatches, SkipLog, cache_fill_workers


def _decoding_pids(log: Path) -> set[int]:
    pids = {int(line) for line in log.read_text().split()}
    log.unlink()
    return pids


def test_the_cache_fill_decodes_in_as_many_workers_as_asked_and_gives_the_same_canvases(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = loader_module.load_canvas
    log = tmp_path / "pids.txt"

    def logged(path: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        with open(log, "a", encoding="utf-8") as handle:  # one short append per image
            handle.write(f"{os.getpid()}\n")
        return real_load(path, *args, **kwargs)  # type: ignore[arg-type]

    # Workers are forked on Linux, so they inherit the patch.
    monkeypatch.setattr(loader_module, "load_canvas", logged)
    paths = scan_images(few_digits)[:8]
    filled = []
    # The loader's own count is 1 each time; only the fill's count changes.
    for fill_workers, expected in ((0, "here"), (None, 1), (2, 2)):
        data = ImageBatches(paths, canvas_size=32, num_workers=1, skip_log=SkipLog())
        data.cache(batch_size=2, num_workers=fill_workers)
        pids = _decoding_pids(log)
        if expected == "here":
            assert pids == {os.getpid()}
        else:
            assert len(pids) == expected and os.getpid() not in pids
        filled.append(next(data.iterate(range(8), batch_size=8)))

    for other in filled[1:]:
        assert torch.equal(filled[0].indices, other.indices)
        assert torch.equal(filled[0].canvases, other.canvases)
        assert torch.equal(filled[0].sizes, other.sizes)


def test_the_fill_uses_every_core_unless_the_user_chose_a_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loader_module, "usable_cores", lambda: 2)
    assert cache_fill_workers(None) == 2  # the loader's default would be 1 spare core
    assert cache_fill_workers(1) == 1  # e.g. chosen to fit docker's 64 MB /dev/shm
    assert cache_fill_workers(0) == 0
    monkeypatch.setattr(loader_module, "usable_cores", lambda: 64)
    assert cache_fill_workers(None) == 8
    monkeypatch.setattr(loader_module, "usable_cores", lambda: 1)
    assert cache_fill_workers(None) == 0  # one core: decode in the main process
