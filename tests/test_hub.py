"""Model references and the Hugging Face cache, offline (HF_HUB_OFFLINE) throughout."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from simclr_cli.checkpoint import save_exported_model
from simclr_cli.cli.app import app
from simclr_cli.config import AugmentConfig, RunConfig
from simclr_cli.engine.pretrain import initial_model
from simclr_cli.errors import CheckpointError, ConfigError
from simclr_cli.hub import HubError, HubRef, choose_files, parse_model_ref, resolve_model_ref
from simclr_cli.models.export import export_config, load_model

runner = CliRunner()
COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Our exported format (16 px ResNet-18) as the bytes a Hub repository would hold."""
    config = RunConfig(augment=AugmentConfig(image_size=16))
    model = initial_model(config)
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    folder = tmp_path_factory.mktemp("exported")
    save_exported_model(folder, state, export_config(config, {"epochs": 1}))
    return {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("owner/name", HubRef("owner/name")),
        ("owner/name@v1.0", HubRef("owner/name", "v1.0")),
        ("hf://owner/my.model-2@" + COMMIT, HubRef("owner/my.model-2", COMMIT)),
        ("hf://lightly-ai/simclrv1-imagenet1k-resnet50-1x", HubRef(
            "lightly-ai/simclrv1-imagenet1k-resnet50-1x")),
    ],
)  # fmt: skip
def test_repo_ids_parse_with_optional_revision(text: str, expected: HubRef) -> None:
    # owner/name, owner/name@revision and hf://owner/name[@revision] all name a Hub repository.
    assert parse_model_ref(text) == expected


def test_an_existing_path_wins_over_a_repo_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder that exists is local even when its name looks like owner/name.
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_model_ref("runs/demo") == Path("runs/demo")


@pytest.mark.parametrize("text", ["nothing-here", "a/b/c", "owner/name@", "/abs/missing/dir"])
def test_text_that_is_neither_a_path_nor_a_repo_is_refused(text: str) -> None:
    # A clear error, not a Hub lookup, for what cannot be a repository id.
    with pytest.raises(CheckpointError, match="no such model folder or file"):
        parse_model_ref(text)


def test_malformed_hf_url_is_refused() -> None:
    # hf:// promises a repository; anything else after it is a usage error.
    with pytest.raises(ConfigError, match="hf://owner/name"):
        parse_model_ref("hf://just-a-name")


def test_cached_repo_loads_offline(hub_cache: Any, model_files: dict[str, bytes]) -> None:
    # With the files cached, an owner/name reference loads without any network.
    snapshot = hub_cache.add("someone/digits-encoder", model_files, commit=COMMIT)
    assert resolve_model_ref("someone/digits-encoder") == snapshot
    model = load_model("someone/digits-encoder")
    assert model.image_size == 16 and model.config["arch"] == "resnet18"


def test_pinned_commit_and_tags_resolve_offline(
    hub_cache: Any, model_files: dict[str, bytes]
) -> None:
    # @<commit> finds its snapshot directly; @<tag> goes through refs/<tag>.
    first = hub_cache.add("someone/enc", model_files, commit=COMMIT)
    second = hub_cache.add("someone/enc", model_files, commit=OTHER_COMMIT, ref="v2")
    assert resolve_model_ref(f"someone/enc@{COMMIT}") == first
    assert resolve_model_ref("hf://someone/enc@v2") == second
    assert resolve_model_ref("someone/enc") == first  # refs/main still points at the first


def test_trailing_newline_in_a_ref_is_tolerated(
    hub_cache: Any, model_files: dict[str, bytes]
) -> None:
    # A ref file ending in a newline (written by hand or another tool) still resolves.
    snapshot = hub_cache.add("someone/enc", model_files, commit=COMMIT, ref_text_suffix="\n")
    assert resolve_model_ref("someone/enc") == snapshot


def test_missing_refs_uses_the_only_snapshot(
    hub_cache: Any, model_files: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    # Without refs/ (a cache copied without it), the single cached snapshot is used, and said so.
    snapshot = hub_cache.add("someone/enc", model_files, commit=COMMIT, ref=None)
    assert resolve_model_ref("someone/enc") == snapshot
    assert COMMIT in caplog.text


def test_missing_refs_with_several_snapshots_asks_for_a_commit(
    hub_cache: Any, model_files: dict[str, bytes]
) -> None:
    # Two snapshots and no refs: guessing would be wrong half the time, so the user pins one.
    hub_cache.add("someone/enc", model_files, commit=COMMIT, ref=None)
    hub_cache.add("someone/enc", model_files, commit=OTHER_COMMIT, ref=None)
    with pytest.raises(HubError, match=r"pin one as someone/enc@<full commit hash>"):
        resolve_model_ref("someone/enc")


def test_uncached_repo_offline_names_repo_and_remedy(hub_cache: Any) -> None:
    # Offline with nothing cached: one message naming the repository and what to do.
    with pytest.raises(HubError) as caught:
        resolve_model_ref("someone/never-downloaded")
    message = str(caught.value)
    assert "someone/never-downloaded" in message and "HF_HUB_OFFLINE" in message
    assert "no such local folder" in message and "\n" not in message
    # hf:// says the Hub was meant, so the message does not talk about local paths.
    with pytest.raises(HubError) as explicit:
        resolve_model_ref("hf://someone/never-downloaded")
    assert "local" not in str(explicit.value)


def test_truncated_weights_blob_is_refused(hub_cache: Any, model_files: dict[str, bytes]) -> None:
    # A blob cut short after download no longer matches its checksum and is never loaded.
    snapshot = hub_cache.add("someone/enc", model_files, commit=COMMIT)
    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    with pytest.raises(HubError, match="damaged"):
        load_model("someone/enc")


def test_half_written_download_counts_as_missing(
    hub_cache: Any, model_files: dict[str, bytes]
) -> None:
    # An interrupted download leaves blobs/<etag>.incomplete and no snapshot link: refused.
    snapshot = hub_cache.add(
        "someone/enc", {"config.json": model_files["config.json"]}, commit=COMMIT
    )
    blobs = snapshot.parent.parent / "blobs"
    (blobs / ("0" * 64 + ".incomplete")).write_bytes(b"\0" * 100)
    with pytest.raises(HubError, match=r"model.safetensors is missing from the cached snapshot"):
        load_model("someone/enc")


def test_dangling_link_counts_as_missing(hub_cache: Any, model_files: dict[str, bytes]) -> None:
    # A snapshot link whose blob was deleted is a missing file, not a crash.
    snapshot = hub_cache.add("someone/enc", model_files, commit=COMMIT)
    (snapshot / "model.safetensors").resolve().unlink()
    with pytest.raises(HubError, match="missing"):
        load_model("someone/enc")


def test_damaged_safetensors_header_is_refused_even_without_checksum(
    hub_cache: Any, model_files: dict[str, bytes]
) -> None:
    # A copied cache (plain files, no content-named blobs) still gets the header check.
    snapshot = hub_cache.add("someone/enc", model_files, commit=COMMIT)
    weights = snapshot / "model.safetensors"
    content = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(content[:-64])
    with pytest.raises(CheckpointError, match="damaged or incomplete safetensors"):
        load_model("someone/enc")


def test_file_choice_prefers_our_format_then_safetensors() -> None:
    # Ours first; else one safetensors over pickles; several candidates are an error.
    assert choose_files(["config.json", "model.safetensors", "README.md"], source="r") == [
        "config.json",
        "model.safetensors",
    ]
    assert choose_files(["a.safetensors", "b.bin", "README.md"], source="r") == ["a.safetensors"]
    assert choose_files(["resnet50-1x.pth", ".gitattributes"], source="r") == ["resnet50-1x.pth"]
    with pytest.raises(HubError, match="several weights files"):
        choose_files(["a.pth", "b.pth"], source="r")
    with pytest.raises(HubError, match="no weights file"):
        choose_files(["README.md"], source="r")


def test_embed_with_a_cached_repo_id(
    hub_cache: Any, model_files: dict[str, bytes], few_digits: Path, tmp_path: Path
) -> None:
    # `simclr embed --model owner/name` works offline from the cache and records the reference.
    hub_cache.add("someone/digits-encoder", model_files, commit=COMMIT)
    out = tmp_path / "v.npy"
    result = runner.invoke(
        app,
        ["embed", str(few_digits), "--model", "someone/digits-encoder", "-o", str(out),
         "--workers", "0", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (60, 512)
    assert json.loads(out.with_suffix(".json").read_text())["model"] == "someone/digits-encoder"


def test_embed_with_an_uncached_repo_is_one_line_and_exit_1(
    hub_cache: Any, few_digits: Path
) -> None:
    # Offline and not cached: one error line, exit status 1, no traceback.
    result = runner.invoke(app, ["embed", str(few_digits), "--model", "someone/missing"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "someone/missing" in lines[0] and "Traceback" not in result.output


def test_environment_variables_are_honoured_in_a_fresh_process(
    tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    # HF_HUB_CACHE and HF_HUB_OFFLINE set in the environment (not patched) drive a new process.
    from conftest import HubCache

    snapshot = HubCache(tmp_path / "elsewhere").add("someone/enc", model_files, commit=COMMIT)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "elsewhere"), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    script = (
        "from simclr_cli.hub import resolve_model_ref, HubError\n"
        "print(resolve_model_ref('someone/enc'))\n"
        "try:\n    resolve_model_ref('someone/other')\n"
        "except HubError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    found, refusal = done.stdout.strip().splitlines()
    assert Path(found) == snapshot
    assert "someone/other" in refusal and str(tmp_path / "elsewhere") in refusal


def test_a_foreign_repo_resolves_to_its_weights_file(hub_cache: Any, tmp_path: Path) -> None:
    # Another project's repository: its one weights file is checked and loaded, and the config
    # records the repository rather than the cache path.
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    files = {"r18.pth": (tmp_path / "r18.pth").read_bytes(), "README.md": b"# r18\n"}
    snapshot = hub_cache.add("someone/r18", files, commit=COMMIT)
    assert resolve_model_ref("someone/r18") == snapshot / "r18.pth"
    model = load_model("someone/r18")
    assert model.config["training"]["source"] == "hf://someone/r18/r18.pth"
    assert model.config["arch"] == "resnet18"


@pytest.mark.parametrize(
    ("raised", "expected", "match"),
    [
        (ConnectionRefusedError(111, "refused"), "_Unreachable", "ConnectionRefusedError"),
        (TimeoutError(), "_Unreachable", "TimeoutError"),
        (OSError(28, "No space left on device"), "HubError", "could not write to the Hugging"),
        (ValueError("a bug"), "ValueError", "a bug"),
    ],
)
def test_hub_failures_map_to_fallback_or_one_line_errors(
    raised: Exception, expected: str, match: str
) -> None:
    # Network failures fall back to the cache; a cache that cannot be written is a plain error;
    # anything else (a bug) is not disguised.
    from simclr_cli import hub

    kinds = {"_Unreachable": hub._Unreachable, "HubError": HubError, "ValueError": ValueError}
    with (
        pytest.raises(kinds[expected], match=match),
        hub._hub_errors(hub._huggingface_hub(), HubRef("someone/enc"), "main"),
    ):
        raise raised
