"""Say once, not ten times, that transformers runs without torchvision.

transformers 5 names its image processors after the torchvision backend; without torchvision (the normal case for
this toolkit, which never needs it) it substitutes the PIL processor and logs one notice per substituted class.
diffusers imports two such classes (CLIP and SigLIP) in every process that loads a pipeline, so the demo's five
scripts printed the same advice ten times. This filter lets the first notice of a process through and drops its
repeats; a parent that has already told the user (the demo) sets `SHOWN_ENV` so that its children stay quiet.
Every other transformers message passes untouched.
"""
from __future__ import annotations

import logging
import os

# Matched against the unformatted message of transformers.utils.import_utils' fallback notice.
NOTICE_FRAGMENT = "requires torchvision (not installed); falling back to"
SHOWN_ENV = "DIFFTUNE_TORCHVISION_NOTICE_SHOWN"
SOURCE_LOGGER = "transformers.utils.import_utils"


class _FirstFallbackNoticeOnly(logging.Filter):
    """Pass the torchvision fallback notice once per process (never if a parent showed it); pass all else."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if NOTICE_FRAGMENT not in str(record.msg):
            return True
        if self.shown or os.environ.get(SHOWN_ENV):
            return False
        self.shown = True
        return True


def install() -> None:
    """Attach the filter to the logger that emits the notice (idempotent; does not import transformers)."""
    logger = logging.getLogger(SOURCE_LOGGER)
    if not any(isinstance(f, _FirstFallbackNoticeOnly) for f in logger.filters):
        logger.addFilter(_FirstFallbackNoticeOnly())
