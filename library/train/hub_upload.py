"""Uploads to and state downloads from the Hugging Face Hub (--huggingface_*, --async_upload,
--save_state_to_huggingface, --resume_from_huggingface), through huggingface_hub.

As in sd-scripts (library/huggingface_util.py): every network file the run saves goes to --huggingface_repo_id,
under --huggingface_path_in_repo (the repository's root when unset) with its local file name; with
--save_state_to_huggingface each state folder goes too, as a folder of that name. The repository is created when
missing, private unless --huggingface_repo_visibility public. --async_upload uploads in a background thread so
training does not wait; the final network is uploaded before the run ends, and the run waits for pending uploads.

The endpoint is huggingface_hub's: HF_ENDPOINT (a mirror) or huggingface.co. An upload that fails never stops the
run: the file stays in --output_dir and one warning gives the reason. The token is never printed: error texts are
scrubbed of it before they are shown.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from library.errors import UserError

if TYPE_CHECKING:
    from library.config.hub_flags import HubConfig


def _endpoint() -> str | None:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import), so a mirror set late still applies."""
    return os.environ.get("HF_ENDPOINT") or None


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(), token=token or None)


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def path_in_repo(folder: str | None, name: str) -> str:
    """Where a saved file or state folder named `name` goes: --huggingface_path_in_repo + "/" + name, as
    sd-scripts joins them; without --huggingface_path_in_repo, `name` at the repository's root."""
    folder = (folder or "").strip("/")
    return f"{folder}/{name}" if folder else name


@dataclass(frozen=True)
class HubTarget:
    """The repository the run uploads to (from the --huggingface_* flags)."""

    repo_id: str
    repo_type: str | None = None
    path_in_repo: str | None = None
    token: str | None = None
    private: bool = True
    async_upload: bool = False
    save_state: bool = False

    @classmethod
    def from_config(cls, hub: HubConfig) -> HubTarget | None:
        """None without --huggingface_repo_id (nothing is uploaded, as in sd-scripts)."""
        if not hub.huggingface_repo_id:
            return None
        return cls(repo_id=hub.huggingface_repo_id, repo_type=hub.huggingface_repo_type or None,
                   path_in_repo=hub.huggingface_path_in_repo, token=hub.huggingface_token,
                   private=hub.huggingface_repo_visibility != "public", async_upload=bool(hub.async_upload),
                   save_state=bool(hub.save_state_to_huggingface))


class HubUploader:
    """Uploads saved files; failures become warnings. `wait()` before the run ends joins background uploads."""

    def __init__(self, target: HubTarget, warn: Callable[[str], None] = _print_warning):
        self.target = target
        self._warn = warn
        self._threads: list[threading.Thread] = []
        self._repo_ready = False
        self._lock = threading.Lock()  # one repository creation, even with uploads in flight

    def _ensure_repo(self, api: Any) -> None:
        with self._lock:
            if self._repo_ready:
                return
            self._repo_ready = True  # tried once: a failure is reported once, the uploads then say their own reason
            t = self.target
            try:
                api.create_repo(repo_id=t.repo_id, repo_type=t.repo_type, private=t.private, exist_ok=True)
            except Exception as e:  # noqa: BLE001 -- any hub or network error: the upload itself may still work
                self._warn(f"--huggingface_repo_id {t.repo_id}: could not create the repository "
                           f"({_scrub(f'{type(e).__name__}: {e}', t.token)}); trying to upload anyway")

    def _upload(self, local: str, dest: str) -> None:
        t = self.target
        try:
            api = _api(t.token)
            self._ensure_repo(api)
            if os.path.isdir(local):
                api.upload_folder(repo_id=t.repo_id, repo_type=t.repo_type, folder_path=local, path_in_repo=dest)
            else:
                api.upload_file(repo_id=t.repo_id, repo_type=t.repo_type, path_or_fileobj=local, path_in_repo=dest)
        except Exception as e:  # noqa: BLE001 -- an upload never stops the run; the local copy stays
            self._warn(f"--huggingface_repo_id {t.repo_id}: uploading {local} to {dest} failed "
                       f"({_scrub(f'{type(e).__name__}: {e}', t.token)}); the file stays in {os.path.dirname(local) or '.'}")

    def upload(self, local: str, force_sync: bool = False) -> None:
        """Upload a saved network file or state folder under its own name; in the background with --async_upload
        unless `force_sync` (the final network, as in sd-scripts)."""
        dest = path_in_repo(self.target.path_in_repo, os.path.basename(os.path.normpath(local)))
        if self.target.async_upload and not force_sync:
            thread = threading.Thread(target=self._upload, args=(local, dest), name=f"hub-upload {dest}")
            thread.start()
            self._threads.append(thread)
        else:
            self._upload(local, dest)

    def wait(self) -> None:
        """Join the background uploads (the run's files are all on the Hub, or warned about, when this returns)."""
        while self._threads:
            self._threads.pop(0).join()


@dataclass(frozen=True)
class HubLocation:
    """sd-scripts' --resume form with --resume_from_huggingface: {repo_id}/{path_in_repo}:{revision}:{repo_type}."""

    repo_id: str
    path_in_repo: str
    revision: str | None = None
    repo_type: str | None = None


def parse_hub_resume(resume: str) -> HubLocation:
    """Split as sd-scripts does: the first two `/` parts are the repository, the rest the folder in it; after it
    `:revision` (repository type model) or `:revision:repo_type`."""
    parts = resume.split("/")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        raise UserError(f"--resume_from_huggingface --resume {resume}: expected "
                        "{repo_id}/{path_in_repo}:{revision}:{repo_type}, e.g. me/lora/last-state:main:model")
    repo_id = f"{parts[0]}/{parts[1]}"
    rest = "/".join(parts[2:])
    revision = repo_type = None
    if ":" in rest:
        divided = rest.split(":")
        if len(divided) == 2:
            rest, revision = divided
            repo_type = "model"
        elif len(divided) == 3:
            rest, revision, repo_type = divided
        else:
            raise UserError(f"--resume_from_huggingface --resume {resume}: too many ':' (expected "
                            "{repo_id}/{path_in_repo}:{revision}:{repo_type})")
    return HubLocation(repo_id, rest.strip("/"), revision or None, repo_type or None)


def download_state(resume: str, token: str | None) -> str:
    """Download the state folder --resume names into huggingface_hub's cache (HF_HOME) and return its local path.
    A folder that is missing or empty there stops the run before training, naming the location."""
    loc = parse_hub_resume(resume)
    from huggingface_hub import hf_hub_download

    try:
        api = _api(token)
        prefix = loc.path_in_repo + "/" if loc.path_in_repo else ""
        files = [f for f in api.list_repo_files(loc.repo_id, revision=loc.revision, repo_type=loc.repo_type)
                 if f.startswith(prefix)]
        if not files:
            raise UserError(f"--resume_from_huggingface --resume {resume}: no files under {loc.path_in_repo!r} in "
                            f"{loc.repo_id} (revision {loc.revision or 'main'}); check the path and revision")
        paths = [hf_hub_download(loc.repo_id, f, revision=loc.revision, repo_type=loc.repo_type, token=token or None,
                                 endpoint=_endpoint()) for f in files]
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- any hub or network error, named once, token scrubbed
        raise UserError(f"--resume_from_huggingface --resume {resume}: downloading the state failed "
                        f"({_scrub(f'{type(e).__name__}: {e}', token)})") from None
    local = paths[0][: len(paths[0]) - len(files[0])] + loc.path_in_repo
    return os.path.normpath(local)


def resolve_hub_resume(args: argparse.Namespace) -> None:
    """--resume_from_huggingface with a --resume that is not a local folder: download the state folder it names and
    point --resume at the downloaded copy (a failed download stops the run before training, naming the location)."""
    resume = getattr(args, "resume", None)
    if getattr(args, "resume_from_huggingface", False) and resume and not os.path.isdir(str(resume)):
        print(f"--resume_from_huggingface: downloading the state {resume}", flush=True)
        args.resume = download_state(str(resume), getattr(args, "huggingface_token", None))


__all__ = ["HubLocation", "HubTarget", "HubUploader", "download_state", "parse_hub_resume", "path_in_repo", "resolve_hub_resume"]
