"""sd-scripts' Hugging Face Hub upload / download flags (uploads and the --resume download: library/train/hub_upload.py).

With --huggingface_repo_id every saved network file is uploaded (and each state folder with
--save_state_to_huggingface); --resume_from_huggingface reads --resume as a Hub location and downloads that state
folder first. The endpoint is HF_ENDPOINT's (a mirror) or huggingface.co. The token is never printed: warnings name
flags, not values, and it is left out of logs, metadata and saved configs (library/train/trackers.py SECRET_FLAGS).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from library.config.flags import flag


@dataclass
class HubConfig:
    """Hugging Face Hub upload and resume (through huggingface_hub; HF_ENDPOINT picks a mirror)"""

    huggingface_repo_id: str | None = flag(None, "the Hub repository to upload each saved network file to "
                                                 "(created when missing); files also stay in --output_dir")
    huggingface_repo_type: str | None = flag(None, "the Hub repository type (model, dataset, space; default model)")
    huggingface_path_in_repo: str | None = flag(None, "the folder in the Hub repository to upload into (default: "
                                                      "its root)")
    huggingface_token: str | None = flag(None, "the Hub token (else huggingface_hub's login / HF_TOKEN); never "
                                               "printed nor saved in logs, metadata or configs")
    huggingface_repo_visibility: str | None = flag(None, "'public' or 'private' (default) for a repository the run "
                                                         "creates")
    save_state_to_huggingface: bool = flag(False, "upload each --save_state folder to --huggingface_repo_id too")
    resume_from_huggingface: bool = flag(False, "--resume names a Hub location "
                                                "({repo_id}/{path_in_repo}:{revision}:{repo_type}): the state folder "
                                                "is downloaded (into HF_HOME's cache) and resumed from")
    async_upload: bool = flag(False, "upload in a background thread so training does not wait; the run waits "
                                     "for pending uploads at its end")


def hub_warnings(values: Mapping[str, object]) -> list[str]:
    """Flags that do nothing in the combination given (by name only: the token's value never appears)."""
    out = []
    if not values.get("huggingface_repo_id"):
        given = [f"--{n}" for n in ("save_state_to_huggingface", "async_upload", "huggingface_path_in_repo",
                                    "huggingface_repo_visibility", "huggingface_repo_type") if values.get(n)]
        if given:
            out.append(f"{', '.join(given)} without --huggingface_repo_id: nothing is uploaded (as in sd-scripts); "
                       "the files are saved under --output_dir only")
    if values.get("resume_from_huggingface"):
        if values.get("resume") and os.path.isdir(str(values["resume"])):
            out.append(f"--resume_from_huggingface: {values['resume']} is a local folder; the state is read from it "
                       "(nothing is downloaded)")
        elif not values.get("resume"):
            out.append("--resume_from_huggingface without --resume: nothing to resume (as in sd-scripts); "
                       "training starts from the beginning")
    return out

