"""Smoke test of benchmarks/augment_speed.py, so CI keeps the script working."""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from simclr_cli.config import AugmentConfig
from simclr_cli.data import augment


def test_it_times_this_code_against_a_revision(
    capsys: pytest.CaptureFixture[str], load_benchmark: Callable[[str], ModuleType]
) -> None:
    # HEAD's pipeline is read with `git show` and timed in turns with the working tree's.
    # glibc's malloc settings are left alone: they would outlive the test in this process.
    module = load_benchmark("augment_speed")
    args = ["--sizes", "16", "--batch-size", "8", "--repeats", "1", "--glibc-default"]
    module.main([*args, "--against", "HEAD", "--step"])
    out = capsys.readouterr().out
    line = re.search(r"16 px: this code ([\d.]+) \(([\d.]+)\) \| HEAD ([\d.]+) \(([\d.]+)\)", out)
    assert line is not None, out
    assert all(float(value) > 0 for value in line.groups())
    assert "freed memory kept: no" in out
    # --step: a real training step on ready input and with each version's views in line.
    steps = dict(re.findall(r"^\s+(ready|views by this code|views by HEAD): ([\d.]+),", out, re.M))
    assert set(steps) == {"ready", "views by this code", "views by HEAD"}, out
    assert all(float(ms) > 0 for ms in steps.values())


def test_older_revisions_are_timed_with_the_copies_their_step_made(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    # A revision without make_view_batch is timed as make_views + concatenation + the
    # channels-last copy; the result must be the same input to the encoder.
    module = load_benchmark("augment_speed")
    canvases = module.photo_canvases(6, 48)
    sizes = torch.full((6, 2), 48)
    config = AugmentConfig(image_size=24)
    old_style = types.SimpleNamespace(make_views=augment.make_views)
    ours = module.encoder_input(augment, canvases, sizes, config, torch.Generator().manual_seed(2))
    old = module.encoder_input(old_style, canvases, sizes, config, torch.Generator().manual_seed(2))
    assert ours.shape == old.shape == (12, 3, 24, 24)
    assert old.is_contiguous(memory_format=torch.channels_last)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours, old)


def test_the_load_line_flags_other_work_but_not_the_scripts_own_threads(
    load_benchmark: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load_benchmark("augment_speed")
    monkeypatch.setattr(module.os, "cpu_count", lambda: 2)
    flag = "other work is running"

    monkeypatch.setattr(module.os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    # At the end of a run the average still holds the run's own two threads.
    assert flag not in module.load_line("end", own_threads=2)
    assert flag not in module.load_line("start")

    monkeypatch.setattr(module.os, "getloadavg", lambda: (2.7, 0.0, 0.0))
    assert flag in module.load_line("end", own_threads=2)
    assert flag in module.load_line("start")
    assert "2.7 on 2 cores" in module.load_line("start")
