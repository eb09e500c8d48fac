import pytest

from simclr_cli.config import (
    AugmentConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    blur_probability,
    build_run_config,
    resolved_lr,
    uses_small_stem,
    warmup_steps,
)
from simclr_cli.errors import ConfigError


def test_config_round_trips_through_a_plain_dict() -> None:
    # Saved configs rebuild the same frozen objects (tuples come back as tuples).
    config = RunConfig(augment=AugmentConfig(image_size=48, crop_area=(0.2, 1.0)))
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("part", "values", "message"),
    [
        ("augment", {"image_size": 4}, "--image-size"),
        ("augment", {"flip_prob": 1.5}, "--flip-prob must be a probability"),
        ("augment", {"blur_prob": -0.1}, "--blur-prob must be a probability"),
        ("augment", {"jitter_strength": 3.0}, "--jitter-strength"),
        ("augment", {"crop_area": (0.5, 0.2)}, "crop area"),
        ("augment", {"crop_area": (0.0, 1.0)}, r"--crop-min-area must be in \(0, 1\], got 0"),
        ("model", {"arch": "vgg16"}, "unknown architecture"),
        ("model", {"projection_layers": 4}, "2 or 3"),
        ("optim", {"optimizer": "rmsprop"}, "unknown optimizer"),
        ("train", {"global_batch_size": 1}, "at least 2"),
        ("train", {"temperature": 0}, "--temperature must be positive"),
        ("optim", {"base_lr": 0}, "--lr must be positive"),
        ("optim", {"lr_scaling": "log"}, "use linear, sqrt or none"),
        ("train", {"precision": "fp8"}, "precision"),
    ],
)
def test_bad_values_raise_config_errors_that_say_why(part, values, message) -> None:
    # Each invalid setting is refused when the config is built, with a readable reason.
    with pytest.raises(ConfigError, match=message):
        build_run_config(**{part: values})


def test_unknown_saved_keys_are_refused() -> None:
    # A config from another tool or version is not silently half-read.
    with pytest.raises(ConfigError, match="unknown"):
        RunConfig.from_dict({"train": {"epochz": 3}})


def test_derived_values_follow_the_paper() -> None:
    # LR scales linearly (0.3 x B/256) or by sqrt (0.075 x sqrt(B)); blur and stem follow size.
    assert resolved_lr(OptimConfig(), 512) == pytest.approx(0.6)
    assert resolved_lr(OptimConfig(lr_scaling="sqrt"), 256) == pytest.approx(0.075 * 16)
    assert blurred(64) == 0.0 and blurred(96) == 0.5
    assert uses_small_stem(ModelConfig(), 32) and not uses_small_stem(ModelConfig(), 224)
    assert uses_small_stem(ModelConfig(small_stem=True), 224)
    assert warmup_steps(OptimConfig(warmup_epochs=10), epochs=20, steps_per_epoch=5) == 10


def blurred(size: int) -> float:
    return blur_probability(AugmentConfig(image_size=size))


def test_train_config_defaults_are_the_papers() -> None:
    # Batch 256, temperature 0.5, LARS: the defaults a user gets without options.
    config = RunConfig()
    assert config.train == TrainConfig()
    assert (config.train.global_batch_size, config.train.temperature) == (256, 0.5)
    assert config.optim.optimizer == "lars" and config.augment.crop_area == (0.08, 1.0)
