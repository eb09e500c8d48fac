"""Model references: local paths and Hugging Face Hub repositories, resolved to local files.

Every `--model` goes through `resolve_model_ref`. A path that exists is used as it is;
otherwise `owner/name`, `owner/name@revision` or `hf://owner/name[@revision]` names a Hub
repository, fetched into huggingface_hub's standard cache (HF_HOME / HF_HUB_CACHE, token from
HF_TOKEN or `hf auth login`) and read from there offline (HF_HUB_OFFLINE=1, or no network).

Before anything is loaded, each file used is checked: present (not a dangling link or a
half-written `.incomplete` blob), matching the checksum the cache names its blob by (sha256 for
LFS files, the git blob sha1 otherwise), and, for safetensors, with a header that parses and
covers the whole file.

This is the only module that imports huggingface_hub, and only inside functions, so
`simclr --help` stays fast. Tokens are never put into messages or logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from simclr_cli.errors import CheckpointError, ConfigError, SimclrError

__all__ = [
    "HUB_PREFIX",
    "check_safetensors",
    "WEIGHT_SUFFIXES",
    "HubError",
    "HubRef",
    "choose_files",
    "fetch_snapshot",
    "parse_model_ref",
    "push_folder",
    "resolve_model_ref",
]

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf://"
DEFAULT_REVISION = "main"
# Safetensors first; the rest are torch.save files, read only with weights_only=True.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 1 << 22


class HubError(SimclrError):
    """A Hub repository could not be fetched, found in the cache, or published."""


@dataclass(frozen=True)
class HubRef:
    """A Hub model repository and an optional branch, tag or commit."""

    repo_id: str
    revision: str | None = None
    # Given as hf://...: the user meant the Hub, so messages need not mention local paths.
    explicit: bool = field(default=False, compare=False)

    @property
    def not_local(self) -> str:
        """Message prefix for a reference that could also have been a mistyped local path."""
        return "" if self.explicit else "no such local folder or file, and "

    def __str__(self) -> str:
        """`owner/name` or `owner/name@revision`, as the user would type it."""
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_model_ref(text: str) -> Path | HubRef:
    """An existing local path, or the Hub repository the text names.

    Raises:
        CheckpointError: neither an existing path nor something shaped like a repo id.
    """
    if text.startswith(HUB_PREFIX):
        hub = _parse_repo(text[len(HUB_PREFIX) :])
        if hub is None:
            raise ConfigError(f"{text}: expected hf://owner/name or hf://owner/name@revision")
        return HubRef(hub.repo_id, hub.revision, explicit=True)
    path = Path(text).expanduser()
    if path.exists():
        return path
    hub = _parse_repo(text)
    if hub is None:
        raise CheckpointError(
            f"{text}: no such model folder or file "
            "(a Hub model is named owner/name or hf://owner/name)"
        )
    return hub


def _parse_repo(text: str) -> HubRef | None:
    repo_id, at, revision = text.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or (at and not revision):
        return None
    return HubRef(repo_id, revision or None)


def resolve_model_ref(ref: str | Path | HubRef) -> Path:
    """A local file or folder to load the model from; Hub repositories are fetched first.

    For a Hub repository in our format this is its snapshot folder; for another project's
    repository, the one weights file chosen from it.
    """
    parsed = parse_model_ref(ref) if isinstance(ref, str) else ref
    if isinstance(parsed, Path):
        if not parsed.exists():
            raise CheckpointError(f"{parsed}: no such model folder or file")
        return parsed
    return fetch_snapshot(parsed)


def fetch_snapshot(ref: HubRef) -> Path:
    """The cached, checked files of `ref`, downloading what is missing unless offline.

    Returns the snapshot folder for our format, else the weights file chosen in it.
    """
    hf = _huggingface_hub()
    cache = Path(hf.constants.HF_HUB_CACHE)
    reason = "HF_HUB_OFFLINE is set"
    remedy = "unset it and run once with network access to download the model"
    if not hf.constants.HF_HUB_OFFLINE:
        try:
            return _download(hf, ref)
        except _Unreachable as error:
            reason = f"the Hub could not be reached ({error})"
            remedy = "check the network connection (and HF_ENDPOINT, if set) and try again"
            logger.warning("%s; looking for %s in the local cache", reason, ref)
    snapshot = _cached_snapshot(ref, cache)
    if snapshot is None:
        raise HubError(
            f"{ref}: {ref.not_local}not in the Hugging Face cache ({cache}) while {reason}: "
            f"{remedy}, or point HF_HOME/HF_HUB_CACHE at a cache that holds it"
        )
    present = sorted(p.name for p in snapshot.iterdir() if not p.name.startswith("."))
    if "config.json" in present and _names_our_format(snapshot / "config.json"):
        files = ["config.json", "model.safetensors"]  # both must be there
    else:
        files = choose_files(present, source=f"{ref} (cached snapshot {snapshot.name[:12]})")
    _check_cached_files(snapshot, files, ref=ref)
    return _target(snapshot, files)


def _target(snapshot: Path, files: list[str]) -> Path:
    return snapshot if "config.json" in files else snapshot / files[0]


def _names_our_format(config_path: Path) -> bool:
    import json

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # damaged or foreign; the checksum test or the loader reports it
    return isinstance(config, dict) and config.get("format") == "simclr-cli"


class _Unreachable(Exception):
    """The Hub did not answer; the cache may still hold the files."""


def _download(hf: ModuleType, ref: HubRef) -> Path:
    """Fetch the files `load_model` needs into the cache; returns what `fetch_snapshot` does."""
    revision = ref.revision or DEFAULT_REVISION
    if logging.getLogger("simclr_cli").level > logging.INFO:
        hf.utils.disable_progress_bars()  # --quiet: no download bars either
    with _hub_errors(hf, ref, revision):
        info = hf.HfApi().model_info(ref.repo_id, revision=revision)
        names = [sibling.rfilename for sibling in info.siblings or []]
        files = choose_files(names, source=str(ref))
        # The branch name (not the commit) is passed on so the cache records refs/<branch>,
        # which is what a later offline run looks up.
        paths = [Path(hf.hf_hub_download(ref.repo_id, name, revision=revision)) for name in files]
    snapshots = {path.parent for path in paths}
    if len(snapshots) != 1:
        raise HubError(f"{ref} changed on the Hub during the download; run the command again")
    snapshot = snapshots.pop()
    _check_cached_files(snapshot, files, ref=ref)
    return _target(snapshot, files)


@contextlib.contextmanager
def _hub_errors(hf: ModuleType, ref: HubRef, revision: str) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line HubErrors, or _Unreachable for the cache path.

    Only types and status codes go into messages: never a server's text or a request header.
    """
    errors = hf.errors
    try:
        yield
    except errors.GatedRepoError:
        raise HubError(
            f"{ref} is gated: accept its terms on the Hub, then set HF_TOKEN "
            "(or run `hf auth login`)"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{ref}: no revision {revision!r} in {ref.repo_id}") from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"{ref}: {ref.not_local}no such model repository on the Hub (if it is private, "
            "set HF_TOKEN or run `hf auth login`)"
        ) from None
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError) as error:
        raise _Unreachable(type(error).__name__) from None
    except errors.HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status is not None and status < 500:
            raise HubError(f"{ref}: the Hub answered HTTP {status}") from None
        raise _Unreachable(f"HTTP {status}") from None
    except Exception as error:
        if _is_transport_error(error):
            raise _Unreachable(type(error).__name__) from None
        if isinstance(error, OSError):  # writing into the cache: a full disk, permissions
            reason = error.strerror or type(error).__name__
            raise HubError(f"{ref}: could not write to the Hugging Face cache ({reason})") from None
        raise


def _is_transport_error(error: Exception) -> bool:
    """Connection refused, timeouts, DNS: httpx (huggingface_hub 1.x+) or requests (0.x)."""
    root = type(error).__module__.split(".")[0]
    transport = root in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}
    return transport or isinstance(error, ConnectionError | TimeoutError)


def _cached_snapshot(ref: HubRef, cache: Path) -> Path | None:
    """The snapshot folder a revision points to in the cache, or None if not cached."""
    storage = cache / ("models--" + ref.repo_id.replace("/", "--"))
    snapshots = storage / "snapshots"
    if not snapshots.is_dir():
        return None
    revision = ref.revision or DEFAULT_REVISION
    if _COMMIT.fullmatch(revision):
        pinned = snapshots / revision
        return pinned if pinned.is_dir() else None
    ref_file = storage / "refs" / revision
    if ref_file.is_file():
        # Stripped: a ref written by hand or by another tool may end in a newline.
        commit = ref_file.read_text(encoding="utf-8", errors="replace").strip()
        folder = snapshots / commit
        return folder if _COMMIT.fullmatch(commit) and folder.is_dir() else None
    if ref.revision is not None:
        return None
    # No refs/main (a cache copied without it, say): the only snapshot there is unambiguous.
    cached = sorted(p for p in snapshots.iterdir() if p.is_dir() and _COMMIT.fullmatch(p.name))
    if len(cached) == 1:
        logger.warning(
            "%s: the cache records no %r branch; using its only snapshot, commit %s",
            ref,
            DEFAULT_REVISION,
            cached[0].name,
        )
        return cached[0]
    if len(cached) > 1:
        commits = ", ".join(p.name[:12] for p in cached)
        raise HubError(
            f"{ref}: the cache records no {DEFAULT_REVISION!r} branch but holds several "
            f"snapshots ({commits}); pin one as {ref.repo_id}@<full commit hash>"
        )
    return None


def choose_files(names: list[str], *, source: str) -> list[str]:
    """Which files of a repository to fetch: ours (config + weights), else one weights file.

    Raises:
        HubError: no weights file, or several with nothing to tell them apart.
    """
    top = [name for name in names if "/" not in name]
    if "model.safetensors" in top and "config.json" in top:
        return ["config.json", "model.safetensors"]
    weights = [name for name in top if name.endswith(WEIGHT_SUFFIXES)]
    for group in (
        [n for n in weights if n.endswith(".safetensors")],
        [n for n in weights if not n.endswith(".safetensors")],
    ):
        if len(group) == 1:
            return group
        if len(group) > 1:
            raise HubError(
                f"{source}: several weights files ({', '.join(sorted(group))}); download the "
                "one you want and pass its path to --model"
            )
    raise HubError(
        f"{source}: no weights file ({', '.join(WEIGHT_SUFFIXES)}) at the top of the repository"
    )


def _check_cached_files(snapshot: Path, files: list[str], *, ref: HubRef) -> None:
    """Refuse missing, half-written or damaged files before anything reads them."""
    for name in files:
        path = snapshot / name
        if not path.is_file():
            raise HubError(
                f"{ref}: {name} is missing from the cached snapshot {snapshot} (an interrupted "
                "download?); run again with network access to complete it"
            )
        blob = path.resolve()
        if blob.parent.name == "blobs" and not _matches_blob_name(blob):
            raise HubError(
                f"{ref}: the cached {name} is damaged (its content does not match checksum "
                f"{blob.name[:16]}...); delete {blob} and run again with network access"
            )
        if name.endswith(".safetensors"):
            check_safetensors(path, label=f"{ref}: {name}")


def _matches_blob_name(blob: Path) -> bool:
    """Whether the content hashes to the blob's name: sha256 (LFS) or git blob sha1."""
    name = blob.name
    if _SHA256.fullmatch(name):
        digest = hashlib.sha256()
    elif _COMMIT.fullmatch(name):
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(b"blob %d\0" % blob.stat().st_size)
    else:
        return True  # not a name this cache layout derives from content; nothing to compare
    with blob.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == name


def check_safetensors(path: Path, *, label: str) -> None:
    """Raise CheckpointError unless the header parses and covers the whole file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise CheckpointError(
            f"{label}: damaged or incomplete safetensors file ({first})"
        ) from None


def push_folder(
    folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str
) -> str:
    """Create the repository if needed and upload `folder` as one commit; returns its URL."""
    hf = _huggingface_hub()
    if not _REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"{repo_id}: a Hub repository id looks like owner/name")
    if hf.constants.HF_HUB_OFFLINE:
        raise HubError("cannot push while HF_HUB_OFFLINE is set; unset it and try again")
    if hf.get_token() is None:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then retry")
    api = _make_api(hf)
    errors = hf.errors
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message
        )
    except errors.HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " (is the token allowed to write there?)" if status in (401, 403) else ""
        raise HubError(f"pushing to {repo_id} failed: HTTP {status}{hint}") from None
    except Exception as error:
        if _is_transport_error(error):
            reason = f"the Hub could not be reached ({type(error).__name__})"
            raise HubError(f"pushing to {repo_id} failed: {reason}") from None
        if isinstance(error, OSError):
            raise HubError(f"pushing to {repo_id} failed: {type(error).__name__}") from None
        raise
    return str(getattr(commit, "commit_url", None) or f"{api.endpoint}/{repo_id}")


def _make_api(hf: ModuleType) -> Any:
    # One place to build the client, so tests can stand in for the Hub.
    return hf.HfApi()


def _huggingface_hub() -> ModuleType:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
        import huggingface_hub.utils
    except ImportError:
        raise ConfigError("Hub models need huggingface_hub: pip install huggingface-hub") from None
    return huggingface_hub
