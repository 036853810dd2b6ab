"""The Hugging Face Hub flags (issue #15) against a local stand-in Hub: a threaded http.server implementing the
routes huggingface_hub calls (repo creation, preupload, NDJSON commit with inline base64 files, the file tree and
resolve routes). HF_ENDPOINT points the library at it, as it would at a mirror."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import REPO, build_shapes_dataset
from test_train_sdxl_network import run_toml

pytestmark = pytest.mark.usefixtures("one_thread")

SECRET = "hf_NOT_A_REAL_TOKEN_77aa"
COMMIT = "a" * 40


class StandInHub:
    """What the stand-in received: repos[repo_id] = {"type", "visibility", "files": {path: bytes}}; `fail` makes
    repository creation and commits answer 500; `seen` the request lines (method, path)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.fail = False
        self.seen: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.lock = threading.Lock()

    def files(self, repo_id: str = "me/lora") -> dict[str, bytes]:
        return self.repos.get(repo_id, {}).get("files", {})


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, code: int, value) -> None:
            self._send(code, json.dumps(value).encode(), {"Content-Type": "application/json"})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _note(self) -> list[str]:
            with hub.lock:
                hub.seen.append((self.command, self.path))
                hub.authorizations.add(self.headers.get("Authorization", ""))
            return [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]

        def do_POST(self) -> None:  # noqa: N802
            parts = self._note()
            body = self._body()
            if parts[:3] == ["api", "repos", "create"]:
                if hub.fail:
                    return self._json(500, {"error": "stand-in failure"})
                d = json.loads(body)
                repo_id = f"{d['organization']}/{d['name']}"
                with hub.lock:
                    hub.repos.setdefault(repo_id, {"type": d.get("type"), "visibility": d.get("visibility"),
                                                   "files": {}})
                return self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}"})
            if parts[0] == "api" and len(parts) >= 6 and parts[4] == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if parts[0] == "api" and len(parts) >= 6 and parts[4] == "commit":
                if hub.fail:
                    return self._json(500, {"error": "stand-in failure"})
                repo_id = f"{parts[2]}/{parts[3]}"
                with hub.lock:
                    repo = hub.repos.setdefault(repo_id, {"type": None, "visibility": None, "files": {}})
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            assert v["encoding"] == "base64"
                            repo["files"][v["path"]] = base64.b64decode(v["content"])
                return self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{COMMIT}",
                                        "commitOid": COMMIT, "pullRequestUrl": None})
            self._json(404, {"error": f"stand-in: no route POST {self.path}"})

        def _tree(self, parts: list[str]) -> None:
            repo_id = f"{parts[2]}/{parts[3]}"
            prefix = "/".join(parts[6:])
            files = hub.files(repo_id)
            self._json(200, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                             for p, b in sorted(files.items()) if p.startswith(prefix)])

        def _resolve(self, parts: list[str], head: bool) -> None:
            repo_id = f"{parts[0]}/{parts[1]}"
            data = hub.files(repo_id).get("/".join(parts[4:]))
            if data is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, head)

        def _get(self, head: bool) -> None:
            parts = self._note()
            if parts[0] == "api" and len(parts) >= 6 and parts[4] == "tree":
                return self._tree(parts)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(parts, head)
            self._send(404, b"{}", {"Content-Type": "application/json"}, head)

        def do_GET(self) -> None:  # noqa: N802
            self._get(False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._get(True)

    return Handler


@pytest.fixture
def stand_in(monkeypatch):
    hub = StandInHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # conftest sets HF_HUB_OFFLINE=1 for the suite, and huggingface_hub reads it once, when first imported (an earlier
    # test importing transformers or diffusers): switch the read value off too, for this test only
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield hub
    server.shutdown()
    server.server_close()


def _run(tmp_path: Path, hub: StandInHub, *args: str) -> subprocess.CompletedProcess:
    """The trainer as a user runs it, talking to the stand-in (conftest's run_script forces offline mode)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_ENDPOINT=hub.endpoint,
               HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, str(REPO / "sdxl_train_network.py"), *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


# ---- units -----------------------------------------------------------------------------------------------------

def test_parse_hub_resume_follows_sd_scripts_format():
    from library.errors import UserError
    from library.train.hub_upload import HubLocation, parse_hub_resume

    assert parse_hub_resume("me/lora/last-state") == HubLocation("me/lora", "last-state", None, None)
    assert parse_hub_resume("me/lora/a/b-state:dev") == HubLocation("me/lora", "a/b-state", "dev", "model")
    assert parse_hub_resume("me/lora/s:main:dataset") == HubLocation("me/lora", "s", "main", "dataset")
    for bad in ("me", "me/lora", "me/lora/s:a:b:c"):
        with pytest.raises(UserError, match="--resume_from_huggingface"):
            parse_hub_resume(bad)


def test_target_from_flags_path_and_visibility():
    from library.config.hub_flags import HubConfig
    from library.train.hub_upload import HubTarget, path_in_repo

    assert HubTarget.from_config(HubConfig()) is None  # no repository: nothing is uploaded, as in sd-scripts
    t = HubTarget.from_config(HubConfig(huggingface_repo_id="me/lora", huggingface_repo_visibility="public",
                                        async_upload=True))
    assert t is not None and not t.private and t.async_upload and not t.save_state
    assert HubTarget.from_config(HubConfig(huggingface_repo_id="me/lora")).private  # private unless 'public'
    assert path_in_repo(None, "lora.safetensors") == "lora.safetensors"
    assert path_in_repo("runs/a/", "lora-state") == "runs/a/lora-state"


def test_hub_warnings_name_flags_never_the_token(tmp_path):
    from library.config.hub_flags import hub_warnings

    assert hub_warnings({}) == []
    assert hub_warnings({"huggingface_repo_id": "me/lora", "huggingface_token": SECRET, "async_upload": True}) == []
    (w,) = hub_warnings({"huggingface_token": SECRET, "async_upload": True, "save_state_to_huggingface": True})
    assert w.startswith("--save_state_to_huggingface, --async_upload without --huggingface_repo_id")
    assert SECRET not in w
    (w,) = hub_warnings({"resume_from_huggingface": True, "resume": str(tmp_path)})
    assert "is a local folder" in w
    (w,) = hub_warnings({"resume_from_huggingface": True})
    assert "without --resume" in w


def test_uploader_sends_files_and_folders_async_and_creates_the_repo(stand_in, tmp_path):
    from library.train.hub_upload import HubTarget, HubUploader

    f = tmp_path / "lora.safetensors"
    f.write_bytes(b"weights" * 10)
    state = tmp_path / "lora-state"
    state.mkdir()
    (state / "loop_state.json").write_text('{"global_step": 1}')
    said: list[str] = []
    up = HubUploader(HubTarget("me/lora", "model", "runs", SECRET, private=False, async_upload=True), said.append)
    up.upload(str(f))
    up.upload(str(state))
    up.wait()
    assert said == []
    assert stand_in.files() == {"runs/lora.safetensors": f.read_bytes(),
                                "runs/lora-state/loop_state.json": b'{"global_step": 1}'}
    assert stand_in.repos["me/lora"]["visibility"] == "public" and stand_in.repos["me/lora"]["type"] == "model"
    # the token reaches the Hub's routes (huggingface_hub's own unauthenticated probes aside)
    assert stand_in.authorizations - {""} == {f"Bearer {SECRET}"}
    assert sum(m == "POST" and p == "/api/repos/create" for m, p in stand_in.seen) == 1


def test_upload_failure_warns_without_the_token_and_keeps_the_file(stand_in, tmp_path):
    from library.train.hub_upload import HubTarget, HubUploader

    stand_in.fail = True
    f = tmp_path / "lora.safetensors"
    f.write_bytes(b"w")
    said: list[str] = []
    up = HubUploader(HubTarget("me/lora", token=SECRET), said.append)
    up.upload(str(f))
    up.wait()
    assert len(said) == 2 and "could not create the repository" in said[0] and "500" in said[0]
    assert said[1].startswith(f"--huggingface_repo_id me/lora: uploading {f} to lora.safetensors failed")
    assert "the file stays in" in said[1] and all(SECRET not in s for s in said)
    assert f.read_bytes() == b"w" and stand_in.files() == {}


def test_download_state_of_a_missing_folder_names_it(stand_in, tmp_path, monkeypatch):
    from library.errors import UserError
    from library.train.hub_upload import download_state

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    stand_in.repos["me/lora"] = {"type": "model", "visibility": None, "files": {"other/x.json": b"{}"}}
    with pytest.raises(UserError, match="no files under 'lora-state' in me/lora"):
        download_state("me/lora/lora-state:main", SECRET)


# ---- through the script ------------------------------------------------------------------------------------------

def _states(files: dict[str, bytes], folder: str) -> dict[str, bytes]:
    return {p[len(folder) + 1:]: b for p, b in files.items() if p.startswith(folder + "/")}


def _local_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_script_uploads_then_resumes_from_the_hub_with_async_upload(stand_in, tmp_path, tiny_sdxl_file):
    ds = build_shapes_dataset(tmp_path)
    cfg = run_toml(tmp_path, tiny_sdxl_file, ds["config"], network_train_unet_only=True)
    hub = ["--huggingface_repo_id", "me/lora", "--huggingface_token", SECRET, "--save_state",
           "--save_state_to_huggingface"]
    r = _run(tmp_path, stand_in, "--config_file", cfg, "--save_every_n_steps", "1", *hub)
    assert r.returncode == 0, r.stderr[-3000:]
    assert SECRET not in r.stdout + r.stderr and _warnings(r.stderr) == []
    out = tmp_path / "out"
    files = stand_in.files()
    for name in ("lora-step00000001.safetensors", "lora.safetensors"):
        assert files[name] == (out / name).read_bytes(), name
    for state in ("lora-step00000001-state", "lora-state"):
        assert _states(files, state) == _local_tree(out / state) != {}, state
    assert stand_in.repos["me/lora"]["visibility"] == "private"
    assert not any(SECRET.encode() in b for b in files.values())  # nor in the metadata or states uploaded

    # resume from the step-1 state on the Hub, into a fresh folder, uploading in the background
    cfg2 = run_toml(tmp_path, tiny_sdxl_file, ds["config"], name="resumed", network_train_unet_only=True,
                    output_dir=str(tmp_path / "out2"), output_name="lora2")
    r = _run(tmp_path, stand_in, "--config_file", cfg2, *hub, "--async_upload", "--resume_from_huggingface",
             "--resume", "me/lora/lora-step00000001-state:main:model")
    assert r.returncode == 0, r.stderr[-3000:]
    assert SECRET not in r.stdout + r.stderr and _warnings(r.stderr) == []
    assert "at step 1," in r.stdout
    assert str(tmp_path / "hf_home") in r.stdout  # resumed from the downloaded copy
    files = stand_in.files()
    assert files["lora2.safetensors"] == (tmp_path / "out2" / "lora2.safetensors").read_bytes()
    assert _states(files, "lora2-state") == _local_tree(tmp_path / "out2" / "lora2-state") != {}
    assert json.loads(files["lora2-state/loop_state.json"])["global_step"] == 2


def test_script_with_a_failing_hub_trains_saves_locally_and_warns(stand_in, tmp_path, tiny_sdxl_file):
    stand_in.fail = True
    ds = build_shapes_dataset(tmp_path)
    cfg = run_toml(tmp_path, tiny_sdxl_file, ds["config"], network_train_unet_only=True, max_train_steps=1)
    r = _run(tmp_path, stand_in, "--config_file", cfg, "--huggingface_repo_id", "me/lora", "--huggingface_token",
             SECRET, "--async_upload")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "lora.safetensors").is_file() and stand_in.files() == {}
    warnings = _warnings(r.stderr)
    assert any("could not create the repository" in w for w in warnings), r.stderr[-3000:]
    assert any("uploading" in w and "lora.safetensors failed" in w for w in warnings)
    assert SECRET not in r.stdout + r.stderr
