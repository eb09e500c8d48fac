"""Pulling through a small Hub-compatible server on 127.0.0.1, started and stopped by each test.

The server answers only what huggingface_hub (2.x) asks when `simclr` fetches a model:
`GET /api/models/<repo>/revision/<rev>` (commit and file list), then `HEAD` and `GET` on
`/<repo>/resolve/<rev>/<file>` (commit, etag, size; the bytes). The client runs in a fresh
process with HF_ENDPOINT pointing here, so every endpoint constant derives from it.
"""

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import blob_name
from simclr_cli.checkpoint import save_exported_model
from simclr_cli.config import AugmentConfig, RunConfig
from simclr_cli.engine.pretrain import initial_model
from simclr_cli.models.export import export_config

COMMIT = "c" * 40


class FakeHub(ThreadingHTTPServer):
    """Serves `repos` ({repo_id: {file name: bytes}}), all at commit COMMIT on `main`."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = repos
        self.requests: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        path = self.path.split("?")[0]
        self.server.requests[f"{self.command} {path}"] += 1
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
            self._repo_info("/".join(parts[2:4]), parts[5], with_body=with_body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), with_body=with_body)
        else:
            self._error(404, "EntryNotFound")

    def _repo_info(self, repo_id: str, revision: str, *, with_body: bool) -> None:
        files = self.server.repos.get(repo_id)
        if files is None:
            return self._error(404, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        siblings = [{"rfilename": name} for name in files]
        info = {"id": repo_id, "sha": COMMIT, "private": False, "siblings": siblings}
        body = json.dumps(info).encode()
        self._send(200, body, {"Content-Type": "application/json"}, with_body=with_body)

    def _file(self, repo_id: str, revision: str, name: str, *, with_body: bool) -> None:
        files = self.server.repos.get(repo_id)
        if files is None or revision not in ("main", COMMIT):
            return self._error(404, "RepoNotFound" if files is None else "RevisionNotFound")
        if name not in files:
            return self._error(404, "EntryNotFound")
        content = files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{blob_name(name, content)}"'}
        self._send(200, content, headers, with_body=with_body)

    def _error(self, status: int, code: str) -> None:
        self._send(status, b"{}", {"X-Error-Code": code, "Content-Type": "application/json"},
                   with_body=True)  # fmt: skip

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, with_body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body and self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    config = RunConfig(augment=AugmentConfig(image_size=16))
    model = initial_model(config)
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    folder = tmp_path_factory.mktemp("exported")
    save_exported_model(folder, state, export_config(config, {}))
    files = {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}
    files["README.md"] = b"# a model card the loader does not need\n"
    return files


@pytest.fixture
def hub(model_files: dict[str, bytes]) -> Iterator[FakeHub]:
    server = FakeHub({"someone/enc": model_files})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _run(
    script: str, *, endpoint: str, home: Path, offline: bool
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(home),
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               PYTHONPATH=os.pathsep.join(sys.path))  # fmt: skip
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env.pop(proxy, None)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip


RESOLVE = (
    "import sys\n"
    "from simclr_cli.hub import resolve_model_ref\n"
    "from simclr_cli.errors import SimclrError\n"
    "for ref in sys.argv[1:] or ['someone/enc']:\n"
    "    try:\n        print(resolve_model_ref(ref))\n"
    "    except SimclrError as error:\n        print('error:', error)\n"
)


def test_pull_downloads_once_then_works_offline(hub: FakeHub, tmp_path: Path) -> None:
    # First run downloads config + weights (not the README); later runs reuse the cache.
    script = RESOLVE + (
        "from simclr_cli.models.export import load_model\n"
        "print(resolve_model_ref('someone/enc'))\n"
        "print(load_model('someone/enc').config['arch'])\n"
    )
    online = _run(script, endpoint=hub.url, home=tmp_path, offline=False)
    assert online.returncode == 0, online.stderr
    first, second, arch = online.stdout.split()  # load_model resolved a third time
    snapshot = tmp_path / "hub" / "models--someone--enc" / "snapshots" / COMMIT
    assert Path(first) == Path(second) == snapshot and arch == "resnet18"
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    # Each file's bytes were fetched exactly once across the three resolutions.
    assert hub.requests["GET /someone/enc/resolve/main/model.safetensors"] == 1
    assert hub.requests["GET /someone/enc/resolve/main/config.json"] == 1
    assert not any("README" in key for key in hub.requests)
    # Offline afterwards, by branch and pinned by commit, from the cache alone.
    before = sum(hub.requests.values())
    offline = _run(RESOLVE.replace("['someone/enc']", f"['someone/enc', 'someone/enc@{COMMIT}']"),
                   endpoint=hub.url, home=tmp_path, offline=True)  # fmt: skip
    assert offline.stdout.split() == [str(snapshot), str(snapshot)], offline.stderr
    assert sum(hub.requests.values()) == before


def test_unknown_repo_and_revision_are_one_line_errors(hub: FakeHub, tmp_path: Path) -> None:
    # The server's RepoNotFound / RevisionNotFound become plain messages naming what to check.
    script = RESOLVE.replace(
        "sys.argv[1:] or ['someone/enc']", "['someone/nope', 'someone/enc@v9']"
    )
    done = _run(script, endpoint=hub.url, home=tmp_path, offline=False)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stderr
    assert lines[0].startswith(
        "error: someone/nope: no such local folder or file, and no such model"
    )
    assert lines[1].startswith("error: someone/enc@v9: no revision 'v9'")


def test_unreachable_hub_falls_back_to_the_cache(hub: FakeHub, tmp_path: Path) -> None:
    # Network gone (server stopped) but files cached: a warning, then the cached snapshot.
    first = _run(RESOLVE, endpoint=hub.url, home=tmp_path, offline=False)
    assert first.returncode == 0, first.stderr
    url = hub.url
    hub.shutdown()
    hub.server_close()
    script = RESOLVE.replace("sys.argv[1:] or ['someone/enc']", "['someone/enc', 'someone/other']")
    again = _run(script, endpoint=url, home=tmp_path, offline=False)
    cached, refusal = again.stdout.strip().splitlines()
    assert cached == first.stdout.strip()
    assert "could not be reached" in again.stderr
    assert refusal.startswith("error: someone/other: no such local folder or file, and not in the")
    assert "the Hub could not be reached" in refusal
