from dataclasses import replace
from pathlib import Path

import pytest
import torch

from simclr_cli.config import AugmentConfig, ModelConfig, RunConfig, TrainConfig
from simclr_cli.engine.pretrain import initial_model
from simclr_cli.errors import ConfigError
from simclr_cli.models.export import load_model


def config_from(init: Path, **model: object) -> RunConfig:
    return RunConfig(
        augment=AugmentConfig(image_size=16),
        model=ModelConfig(**model),  # type: ignore[arg-type]
        train=TrainConfig(data_dir="x", out_dir="y", seed=7, init=str(init)),
    )


def test_init_starts_from_the_given_weights_head_included(encoder_dir: Path) -> None:
    source = load_model(encoder_dir)
    start = initial_model(config_from(encoder_dir))
    for part in ("backbone", "projection_head"):
        expected = getattr(source, part).state_dict()
        got = getattr(start, part).state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), part
    # Without --init the same seed gives other weights: the copy above is not a coincidence.
    fresh = initial_model(replace(config_from(encoder_dir), train=TrainConfig(seed=7)))
    weight = "resnet.conv1.weight"
    assert not torch.equal(fresh.backbone.state_dict()[weight], start.backbone.state_dict()[weight])


def test_init_with_another_head_shape_keeps_the_encoder_only(encoder_dir: Path) -> None:
    start = initial_model(config_from(encoder_dir, projection_dim=64))
    source = load_model(encoder_dir).backbone.state_dict()
    assert all(torch.equal(source[k], start.backbone.state_dict()[k]) for k in source)
    assert start.projection_head is not None


def test_init_from_another_architecture_is_a_clear_error(encoder_dir: Path) -> None:
    with pytest.raises(ConfigError, match="resnet18.*resnet34"):
        initial_model(config_from(encoder_dir, arch="resnet34"))
