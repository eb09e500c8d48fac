"""`convert` into our format, and `push` (the upload folder and card; the Hub client faked)."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from simclr_cli.checkpoint import save_exported_model
from simclr_cli.cli.app import app
from simclr_cli.config import AugmentConfig, RunConfig, TrainConfig
from simclr_cli.engine.pretrain import initial_model
from simclr_cli.engine.publish import convert_model
from simclr_cli.models.export import export_config, load_model

runner = CliRunner()
TOKEN = "hf_TESTtoken0123456789abcdefSECRET"


def test_convert_writes_a_model_folder_that_loads_the_same(tmp_path: Path) -> None:
    # A DDP-prefixed torchvision checkpoint becomes model.safetensors + config.json, same features.
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18().eval()
    torch.save({f"module.{k}": v for k, v in resnet.state_dict().items()}, tmp_path / "ddp.pt")
    converted = convert_model(str(tmp_path / "ddp.pt"), tmp_path / "out", normalization="none")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["format"] == "simclr-cli" and config["arch"] == "resnet18"
    assert config["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    assert all(k.startswith("backbone.") for k in load_file(tmp_path / "out" / "model.safetensors"))
    reloaded = load_model(tmp_path / "out")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded.backbone(images), converted.backbone(images))
    assert reloaded.config["preprocessing"] == config["preprocessing"]


def test_convert_command_reports_what_it_wrote(tmp_path: Path) -> None:
    # `simclr convert SRC -o DIR` prints the architecture, input size and normalisation.
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    result = runner.invoke(
        app, ["convert", str(tmp_path / "r18.pth"), "-o", str(tmp_path / "m"), "--image-size", "96"]
    )
    assert result.exit_code == 0, result.output
    assert "resnet18" in result.output and "96 px" in result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["image_size"] == 96


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A finished 16 px run: exported model, run config, loss plot and an evaluation."""
    run = tmp_path / "runs" / "digits-run"
    data_dir = tmp_path / "private" / "digits"
    config = RunConfig(
        augment=AugmentConfig(image_size=16),
        train=TrainConfig(data_dir=str(data_dir), out_dir=str(run), epochs=3),
    )
    model = initial_model(config)
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    assert model.projection_head is not None
    state.update({f"projection_head.{k}": v for k, v in model.projection_head.state_dict().items()})
    training = {"epochs": 3, "steps": 30, "final_loss": 4.25, "dataset": str(data_dir)}
    save_exported_model(run, state, export_config(config, training))
    (run / "run_config.json").write_text(json.dumps(config.to_dict()))
    Image.new("RGB", (8, 8), "white").save(run / "loss.png")
    # Shaped like `simclr eval` output (default place: RUN/eval/eval.json), with a baseline.
    (run / "eval").mkdir()
    results = {
        "model": {"knn": {"k20_weighted": {"top1": 0.912}}, "linear": {"top1": 0.934}},
        "random": {"knn": {"k20_weighted": {"top1": 0.881}}, "linear": {"top1": 0.85}},
    }
    (run / "eval" / "eval.json").write_text(json.dumps({"results": results}))
    return run


class FakeHub:
    """Stands in for HfApi: records the calls and keeps a copy of what would be uploaded."""

    endpoint = "https://hub.invalid"

    def __init__(self, keep: Path) -> None:
        self.keep = keep
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: Any) -> Any:
        self.calls.append(("upload_folder", kwargs))
        shutil.copytree(kwargs["folder_path"], self.keep)

        class Commit:
            commit_url = f"{self.endpoint}/{kwargs['repo_id']}/commit/abc"

        return Commit()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    from huggingface_hub import constants

    hub = FakeHub(tmp_path / "uploaded")
    monkeypatch.setattr("simclr_cli.hub._make_api", lambda hf: hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # nothing real is contacted
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def test_push_uploads_model_config_plot_eval_and_card(
    run_folder: Path, fake_hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    # The repo is created (private as asked), the branch made, and one folder uploaded.
    result = runner.invoke(
        app, ["push", str(run_folder), "someone/digits-simclr", "--private", "--revision", "dev",
              "-v"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    names = [name for name, _ in fake_hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub.calls[0][1]["private"] is True and fake_hub.calls[1][1]["branch"] == "dev"
    assert fake_hub.calls[2][1]["revision"] == "dev"
    uploaded = fake_hub.keep
    assert sorted(p.name for p in uploaded.iterdir()) == [
        "README.md", "config.json", "eval.json", "loss.png", "model.safetensors"]  # fmt: skip
    weights = load_file(uploaded / "model.safetensors")
    assert weights and all(k.startswith("backbone.") for k in weights)  # head only if asked
    # The token is never printed, logged or written.
    assert TOKEN not in result.output and TOKEN not in caplog.text
    for path in uploaded.iterdir():
        assert TOKEN.encode() not in path.read_bytes()


def test_model_card_header_and_body(run_folder: Path, fake_hub: FakeHub) -> None:
    # Metadata: library, tags, dataset and metrics; the body: results, config and usage.
    result = runner.invoke(app, ["push", str(run_folder), "someone/digits-simclr", "--with-head"])
    assert result.exit_code == 0, result.output
    card = (fake_hub.keep / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["library_name"] == "simclr-cli"
    assert {"simclr", "self-supervised-learning", "resnet18"} <= set(meta["tags"])
    assert meta["datasets"] == ["digits"]
    assert meta["metrics"] == [
        "knn_k20_weighted/top1", "linear/top1", "random/knn_k20_weighted/top1", "random/linear/top1"
    ]  # fmt: skip
    assert "| knn_k20_weighted/top1 | 0.912 |" in body and "| linear/top1 | 0.934 |" in body
    assert "| random/linear/top1 | 0.85 |" in body
    assert "simclr embed photos/ --model someone/digits-simclr" in body
    assert 'load_model("someone/digits-simclr")' in body and "![Training loss" in body
    run_config = json.loads(body.split("```json\n", 1)[1].split("```", 1)[0])
    assert run_config["train"]["epochs"] == 3 and run_config["augment"]["image_size"] == 16
    # Local paths are cut to their last component before they leave the machine.
    assert str(run_folder.parent.parent) not in card
    config = json.loads((fake_hub.keep / "config.json").read_text())
    assert config["training"]["dataset"] == "digits" and config["projection"]["dim"] == 128
    assert any(
        k.startswith("projection_head.") for k in load_file(fake_hub.keep / "model.safetensors")
    )


def test_the_uploaded_folder_loads_as_a_model(run_folder: Path, fake_hub: FakeHub) -> None:
    # What push uploads is exactly what `--model` reads back.
    runner.invoke(app, ["push", str(run_folder), "someone/x"])
    original, uploaded = load_model(run_folder), load_model(fake_hub.keep)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(original.backbone(images), uploaded.backbone(images))


def test_push_without_a_token_says_how_to_get_one(
    run_folder: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No token: one line naming HF_TOKEN and `hf auth login`; nothing is contacted.
    monkeypatch.delenv("HF_TOKEN")
    result = runner.invoke(app, ["push", str(run_folder), "someone/x"])
    assert result.exit_code == 1 and "HF_TOKEN" in result.output and not fake_hub.calls


def test_push_offline_is_refused(
    run_folder: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HF_HUB_OFFLINE means no uploads either.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["push", str(run_folder), "someone/x"])
    assert result.exit_code == 1 and "HF_HUB_OFFLINE" in result.output and not fake_hub.calls
