"""`--interactive`: prompts typed (or piped) on stdin, one line at a time, generated as they come (sd-scripts' mode).

The model is loaded once; each line is a full prompt line of the prompt language (options such as --n, --d, --w
included) and gives its images before the next line is read. An empty line asks again; the end of input ends the
run. A mistake in a line (syntax, an unknown wildcard) is reported and the line skipped, so one typo does not end a
session that took minutes to load. Image indices continue across lines, so seeds and file names never repeat.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

from library.errors import UserError
from library.prompts.language import PromptSpec, PromptSyntaxError, parse_prompt_line
from library.sample.generation import GenerationConfig, ImageRequest, load_wildcards, plan_requests

# (config holding one prompt line, index of its first image) -> the line's requests; a family's planner
Planner = Callable[[GenerationConfig, int], list[ImageRequest]]

logger = logging.getLogger(__name__)

ASK = "Type prompt:"


def read_prompt_lines(stream: TextIO) -> Iterator[PromptSpec]:
    """Parsed prompt lines from `stream` until its end; empty lines and lines with syntax errors are skipped."""
    number = 0
    while True:
        print(ASK, file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        number += 1
        text = line.rstrip("\r\n")
        if not text.split(" --")[0].strip():  # sd-scripts: a line without prompt text asks again
            continue
        try:
            yield parse_prompt_line(text)
        except PromptSyntaxError as exc:
            logger.error("%s; type the line again", exc.with_location(f"stdin line {number}"))


def sdxl_planner(base_seed: int) -> Planner:
    """The shared planning (library.sample.generation), as SDXL uses it."""
    return lambda config, start: plan_requests(config, load_wildcards(config), base_seed, start)


def run_interactive(config: GenerationConfig, plan: Planner, generate: Callable[[Sequence[ImageRequest]], list[Path]],
                    stream: TextIO | None = None) -> list[Path]:
    """Plan and generate each line read from `stream` (stdin by default); returns every PNG written."""
    paths: list[Path] = []
    start = 0
    for spec in read_prompt_lines(stream or sys.stdin):
        line_config = replace(config, prompts=[spec], n_iter=1)  # sd-scripts: one pass per typed line
        try:
            requests = plan(line_config, start)
        except UserError as exc:
            logger.error("%s; type the line again", exc)
            continue
        start += len(requests)
        written = generate(requests)
        logger.info("%d image(s) written: %s", len(written), ", ".join(p.name for p in written))
        paths += written
    return paths


__all__ = ["ASK", "Planner", "read_prompt_lines", "run_interactive", "sdxl_planner"]
