"""The README.md model card uploaded with a pushed model.

The header is the Hub's YAML metadata block; every value is written as JSON, which YAML reads
as the same scalar or list, so no YAML library is needed and nothing needs escaping rules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["eval_metrics", "model_card"]


def eval_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """Accuracies from a `simclr eval` record, named like `linear/top1` or `knn_k20_weighted/top1`.

    Baselines evaluated in the same run are kept apart with their source as a prefix
    (`random/linear/top1`), so a card never presents a baseline as the model's result.
    """
    found: dict[str, float] = {}
    results = evaluation.get("results")
    if not isinstance(results, Mapping):
        return found
    for source, scores in results.items():
        if not isinstance(scores, Mapping):
            continue
        prefix = "" if source == "model" else f"{source}/"
        entries = {f"knn_{name}": entry for name, entry in (scores.get("knn") or {}).items()}
        entries["linear"] = scores.get("linear") or {}
        for name, entry in entries.items():
            for measure in ("top1", "top5"):
                value = entry.get(measure) if isinstance(entry, Mapping) else None
                if isinstance(value, int | float) and not isinstance(value, bool):
                    found[f"{prefix}{name}/{measure}"] = float(value)
    return found


def model_card(
    repo_id: str,
    config: Mapping[str, Any],
    *,
    run_config: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    dataset: str | None,
    has_loss_plot: bool,
) -> str:
    """Markdown with the metadata header, what the model is, how it was trained and used."""
    arch = str(config["arch"])
    metrics = eval_metrics(evaluation or {})
    header: dict[str, Any] = {
        "library_name": "simclr-cli",
        "pipeline_tag": "image-feature-extraction",
        "tags": ["simclr", "self-supervised-learning", "contrastive-learning", "resnet", arch],
    }
    if dataset:
        header["datasets"] = [dataset]
    if metrics:
        header["metrics"] = sorted(metrics)
    lines = ["---", *(f"{key}: {json.dumps(value)}" for key, value in header.items()), "---", ""]
    lines += _summary(repo_id, config)
    lines += _training(config, run_config, has_loss_plot=has_loss_plot)
    if metrics:
        lines += ["## Evaluation", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in sorted(metrics.items())]
        lines += ["", "Accuracies (0-1) from `simclr eval`, in `eval.json`.", ""]
    lines += _usage(repo_id, config)
    return "\n".join(lines)


def _summary(repo_id: str, config: Mapping[str, Any]) -> list[str]:
    head = config.get("projection")
    pre = config["preprocessing"]
    return [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {config['arch']} encoder pretrained with SimCLR "
        "([Chen et al. 2020](https://arxiv.org/abs/2002.05709)) using "
        "[simclr-cli](https://pypi.org/project/simclr-cli/). It maps an image to a "
        f"{config['feature_dim']}-dimensional feature vector"
        + (f"; the {head['layers']}-layer projection head is included." if head else "."),
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | `{config['arch']}`, {'3x3' if config['small_stem'] else '7x7'} stem |",
        f"| Input | RGB, shorter side resized to {pre['resize_shorter_side']} px, centre "
        f"{pre['center_crop']} px square, values in [0, 1] |",
        f"| Normalisation | mean {_numbers(pre['mean'])}, std {_numbers(pre['std'])} |",
        f"| Features | {config['feature_dim']} floats (global average pool) |",
        "",
    ]


def _training(
    config: Mapping[str, Any], run_config: Mapping[str, Any] | None, *, has_loss_plot: bool
) -> list[str]:
    lines = ["## Training", ""]
    summary = config.get("training") or {}
    if summary:
        lines += ["| Setting | Value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in summary.items()]
        lines.append("")
    if run_config:
        lines += ["Full configuration (`run_config.json`):", "", "```json"]
        lines += [json.dumps(run_config, indent=2), "```", ""]
    if has_loss_plot:
        lines += ["![Training loss and learning rate](loss.png)", ""]
    return lines


def _usage(repo_id: str, config: Mapping[str, Any]) -> list[str]:
    return [
        "## Use it",
        "",
        "With the command line (`pip install simclr-cli`):",
        "",
        "```bash",
        f"simclr embed photos/ --model {repo_id} -o features.npy",
        "```",
        "",
        "From Python:",
        "",
        "```python",
        "import torch",
        "from simclr_cli.models.export import load_model",
        "",
        f'model = load_model("{repo_id}")  # downloads once into the Hugging Face cache',
        f"images = torch.rand(8, 3, {config['image_size']}, {config['image_size']})"
        "  # RGB in [0, 1]",
        "pre = model.config['preprocessing']",
        "mean = torch.tensor(pre['mean'])[None, :, None, None]",
        "std = torch.tensor(pre['std'])[None, :, None, None]",
        "with torch.no_grad():",
        f"    features = model.backbone((images - mean) / std)  # (8, {config['feature_dim']})",
        "```",
        "",
        "The files are `model.safetensors` (encoder as `backbone.*`"
        + (", projection head as `projection_head.*`" if config.get("projection") else "")
        + ") and `config.json`, which says how to rebuild the network and preprocess images.",
        "",
    ]


def _numbers(values: Any) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")
