import time
from pathlib import Path

import pytest

from simclr_cli.data import loader as loader_module
from simclr_cli.data.images import scan_images
from simclr_cli.data.loader import ImageBatches, SkipLog
from simclr_cli.errors import DataError


def test_a_stalled_decoding_worker_is_an_error_not_a_hang(
    few_digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = loader_module.load_canvas

    def stalled(path: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        time.sleep(12)  # a file on a network drive that stopped answering
        return real_load(path, *args, **kwargs)  # type: ignore[arg-type]

    # Workers are forked on Linux, so they inherit the patched function.
    monkeypatch.setattr(loader_module, "load_canvas", stalled)
    monkeypatch.setattr(loader_module, "WORKER_TIMEOUT_S", 2)
    data = ImageBatches(
        scan_images(few_digits)[:4], canvas_size=32, num_workers=1, skip_log=SkipLog()
    )
    started = time.monotonic()
    with pytest.raises(DataError, match="--workers 0"):
        list(data.iterate(range(4), batch_size=2))
    assert time.monotonic() - started < 10  # well before the stalled read returns
