import os
from pathlib import Path

import pytest
import torch

from simclr_cli.data import loader as loader_module
from simclr_cli.data.images import scan_images
from simclr_cli.data.loader import ImageBatches, SkipLog


def _decoding_pids(log: Path) -> set[int]:
    return {int(line) for line in log.read_text().split()}


def test_the_cache_fills_with_a_worker_per_core_and_the_same_canvases(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = loader_module.load_canvas
    log = tmp_path / "pids.txt"

    def logged(path: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        with open(log, "a", encoding="utf-8") as handle:  # one short append per image
            handle.write(f"{os.getpid()}\n")
        return real_load(path, *args, **kwargs)  # type: ignore[arg-type]

    # Workers are forked on Linux, so they inherit both patches.
    monkeypatch.setattr(loader_module, "load_canvas", logged)
    monkeypatch.setattr(loader_module, "usable_cores", lambda: 2)
    paths = scan_images(few_digits)[:8]

    in_process = ImageBatches(paths, canvas_size=32, num_workers=0, skip_log=SkipLog())
    in_process.cache(batch_size=2)
    assert _decoding_pids(log) == {os.getpid()}  # --workers 0 still decodes here

    log.unlink()
    one_worker = ImageBatches(paths, canvas_size=32, num_workers=1, skip_log=SkipLog())
    one_worker.cache(batch_size=2)
    pids = _decoding_pids(log)
    assert len(pids) == 2 and os.getpid() not in pids  # one worker per core, not one

    first = next(in_process.iterate(range(8), batch_size=8))
    second = next(one_worker.iterate(range(8), batch_size=8))
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.canvases, second.canvases)
    assert torch.equal(first.sizes, second.sizes)
