"""`convert` (any supported checkpoint into our model folder) and `push` (a run to the Hub)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simclr_cli.checkpoint import MODEL_CONFIG_NAME, save_exported_model
from simclr_cli.engine.model_card import model_card
from simclr_cli.errors import ConfigError, os_error_reason
from simclr_cli.models.export import RUN_CONFIG_NAME, LoadedModel, load_model

__all__ = ["PushResult", "convert_model", "prepare_upload", "push_run"]

logger = logging.getLogger(__name__)

LOSS_PLOT_NAME = "loss.png"
EVAL_NAME = "eval.json"
CARD_NAME = "README.md"
_CONFIG_OWN_KEYS = ("format", "format_version", "simclr_version")


def convert_model(
    source: str,
    out_dir: Path,
    *,
    normalization: str | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """Write any model `--model` accepts into `out_dir` as model.safetensors + config.json.

    Args:
        source: A run folder, model folder, weights file or Hub repository.
        out_dir: Folder to write; created if needed.
        normalization: "imagenet" or "none" to override what the source implies.
        image_size: Input side to record instead of the source's.
    """
    model = load_model(source)
    config = _overridden(model.config, normalization=normalization, image_size=image_size)
    _write_model(out_dir, model, config, include_head=True)
    return LoadedModel(model.backbone, model.projection_head, config)


def _overridden(
    config: dict[str, Any], *, normalization: str | None, image_size: int | None
) -> dict[str, Any]:
    config = json.loads(json.dumps(config))  # a deep copy of plain JSON data
    pre = config["preprocessing"]
    if normalization == "none":
        pre["mean"], pre["std"] = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    elif normalization == "imagenet":
        from simclr_cli.config import IMAGENET_MEAN, IMAGENET_STD

        pre["mean"], pre["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    elif normalization is not None:
        raise ConfigError("--normalization must be imagenet or none")
    if image_size is not None:
        if not 8 <= image_size <= 1024:
            raise ConfigError("image size must be between 8 and 1024 pixels")
        config["image_size"] = image_size
        pre.update(
            resize_shorter_side=image_size, center_crop=image_size, decode_size=2 * image_size
        )
    return config


def _write_model(
    out_dir: Path, model: LoadedModel, config: dict[str, Any], *, include_head: bool
) -> None:
    state: dict[str, torch.Tensor] = {
        f"backbone.{k}": v for k, v in model.backbone.state_dict().items()
    }
    config = {k: v for k, v in config.items() if k not in _CONFIG_OWN_KEYS}
    if include_head and model.projection_head is not None:
        state.update(
            {f"projection_head.{k}": v for k, v in model.projection_head.state_dict().items()}
        )
    else:
        config["projection"] = None
    try:
        save_exported_model(out_dir, state, config)
    except OSError as error:
        raise ConfigError(f"cannot write {out_dir}: {os_error_reason(error)}") from None


@dataclass(frozen=True)
class PushResult:
    """Where the model went and which files were uploaded."""

    url: str
    files: list[str]


def prepare_upload(
    run: Path,
    folder: Path,
    repo_id: str,
    *,
    include_head: bool = False,
    dataset: str | None = None,
) -> list[str]:
    """Fill `folder` with what `push` uploads; returns the file names.

    The folder gets model.safetensors (encoder, plus the head if asked), config.json, the
    run's loss.png and eval.json when present, and a generated README.md model card.
    Local paths in the configs are cut to their last component before they leave the machine.
    """
    if not run.is_dir():
        raise ConfigError(f"{run}: push takes a run folder or a model folder")
    model = load_model(run)
    config = _public(model.config)
    _write_model(folder, model, config, include_head=include_head)
    config = json.loads((folder / MODEL_CONFIG_NAME).read_text(encoding="utf-8"))
    if (run / LOSS_PLOT_NAME).is_file():
        shutil.copyfile(run / LOSS_PLOT_NAME, folder / LOSS_PLOT_NAME)
    # `simclr eval` writes into RUN/eval/ by default; an eval.json beside the model also counts.
    for candidate in (run / "eval" / EVAL_NAME, run / EVAL_NAME):
        if candidate.is_file():
            shutil.copyfile(candidate, folder / EVAL_NAME)
            break
    run_config = _read_json(run / RUN_CONFIG_NAME)
    evaluation = _read_json(folder / EVAL_NAME)
    training_folder = (run_config or {}).get("train", {}).get("data_dir") or ""
    card = model_card(
        repo_id,
        config,
        run_config=_public(run_config) if run_config else None,
        evaluation=evaluation,
        dataset=dataset or (Path(training_folder).name or None),
        has_loss_plot=(folder / LOSS_PLOT_NAME).is_file(),
    )
    (folder / CARD_NAME).write_text(card, encoding="utf-8")
    return sorted(p.name for p in folder.iterdir())


def push_run(
    run: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    include_head: bool = False,
    dataset: str | None = None,
) -> PushResult:
    """Upload a run's model, config, plot, evaluation and model card to a Hub repository."""
    from simclr_cli.hub import push_folder

    with tempfile.TemporaryDirectory(prefix="simclr-push-") as tmp:
        folder = Path(tmp)
        files = prepare_upload(run, folder, repo_id, include_head=include_head, dataset=dataset)
        url = push_folder(
            folder,
            repo_id,
            private=private,
            revision=revision,
            message=f"Upload {run.name} with simclr-cli",
        )
    return PushResult(url, files)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not readable JSON ({error})") from None
    return data if isinstance(data, dict) else None


def _public(data: dict[str, Any]) -> dict[str, Any]:
    """A copy with local paths (data_dir, out_dir, dataset) cut to their last component."""
    copied: dict[str, Any] = json.loads(json.dumps(data))
    for section in (copied, copied.get("train"), copied.get("training")):
        if not isinstance(section, dict):
            continue
        for key in ("data_dir", "out_dir", "dataset", "source"):
            value = section.get(key)
            if isinstance(value, str) and value:
                section[key] = Path(value).name
    return copied
