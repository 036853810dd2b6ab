"""sd-scripts' Hugging Face Hub upload / download flags, accepted so that configs carry over.

This toolkit trains offline: it never uploads nor downloads. A config that names a repository still trains, with one
warning that the files stay in --output_dir; a resume that names a hub location (rather than a local folder) stops
with a message saying how to fetch the folder first. The token is never printed: warnings name flags, not values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from library.config.flags import flag
from library.errors import UserError


@dataclass
class HubConfig:
    """Hugging Face Hub upload (accepted; files are saved locally only, a warning says so)"""

    huggingface_repo_id: str | None = flag(None, "sd-scripts: the Hub repository to upload to. Here nothing is "
                                                 "uploaded; files stay in --output_dir (a warning says so)")
    huggingface_repo_type: str | None = flag(None, "sd-scripts: the Hub repository type (not used here)")
    huggingface_path_in_repo: str | None = flag(None, "sd-scripts: the folder in the Hub repository (not used here)")
    huggingface_token: str | None = flag(None, "sd-scripts: the Hub token (not used here, never printed nor saved "
                                               "in logs)")
    huggingface_repo_visibility: str | None = flag(None, "sd-scripts: 'public' or 'private' for a new Hub "
                                                         "repository (not used here)")
    save_state_to_huggingface: bool = flag(False, "sd-scripts: upload --save_state folders too. Here states are "
                                                  "saved locally only")
    resume_from_huggingface: bool = flag(False, "sd-scripts: --resume names a Hub location "
                                                "({repo_id}/{path_in_repo}:{revision}:{repo_type}). Here --resume "
                                                "must be a local state folder (download it first)")
    async_upload: bool = flag(False, "sd-scripts: upload in the background (nothing is uploaded here)")


UPLOAD_FLAGS = ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                "huggingface_repo_visibility", "save_state_to_huggingface", "async_upload")


def hub_warnings(values: Mapping[str, object]) -> list[str]:
    """One line for the upload flags given (by name only: the token's value never appears), one for a resume from
    a local folder despite --resume_from_huggingface."""
    out = []
    given = [f"--{n}" for n in UPLOAD_FLAGS if values.get(n)]
    if given:
        out.append(f"{', '.join(given)}: this toolkit does not upload to the Hugging Face Hub; the trained files "
                   f"(and states) are saved locally only, under --output_dir "
                   f"({values.get('output_dir') or 'the current folder'}); upload them yourself "
                   "(e.g. `huggingface-cli upload`)")
    if values.get("resume_from_huggingface"):
        if values.get("resume"):
            out.append(f"--resume_from_huggingface: {values['resume']} is a local folder; the state is read from it "
                       "(nothing is downloaded)")
        else:
            out.append("--resume_from_huggingface without --resume: nothing to resume (as in sd-scripts); "
                       "training starts from the beginning")
    return out


def check_hub_resume(values: Mapping[str, object]) -> None:
    """--resume_from_huggingface with a --resume that is not a local folder: a Hub location we cannot fetch."""
    resume = values.get("resume")
    if values.get("resume_from_huggingface") and resume and not os.path.isdir(str(resume)):
        repo_id = "/".join(str(resume).split(":")[0].split("/")[:2])  # {repo_id}/{path_in_repo}:{revision}:...
        raise UserError(f"--resume_from_huggingface --resume {resume}: this toolkit does not download from the "
                        f"Hugging Face Hub; download the state folder first (e.g. `huggingface-cli download {repo_id} "
                        "--local-dir state`) and pass its local path as --resume, without --resume_from_huggingface")
