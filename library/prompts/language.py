"""The prompt language of the generation scripts, in sd-scripts' (`gen_img.py` / `sdxl_gen_img.py`) conventions.

A prompt-file line is a *template* followed by per-prompt options::

    a {red|green|blue} {2$$cat|dog|bird} on __places__ --n {blurry|lowres} --w 1024 --h 768 --s 30 --d 1,2 --l 7

Templates are parsed once into a small AST (`Template`) and rendered again for every image, so that each image
draws its own variants. The grammar:

* ``{a|b|c}`` picks one option; ``{2$$a|b|c}`` picks two *distinct* options; ``{0-2$$a|b|c}`` picks zero to two;
  ``{-2$$...}`` means one to two and ``{1-$$...}`` one to all (open ends default to 1 and to the number of options,
  as in the Dynamic Prompts extension whose syntax sd-scripts adopted); ``{1-3$$ and $$a|b|c}`` joins the picks with
  " and " instead of the default ", "; ``{ and $$a|b}`` gives a separator only. Counts above the number of options
  are clamped, as sd-scripts does.
* Options nest: ``{a|{b|c}}``; ``\\{``, ``\\}`` and ``\\|`` are literal braces / bar (sd-scripts' escapes).
  Other backslashes (A1111's ``\\(``) are kept as they are, for the prompt-weighting parser downstream.
* ``__name__`` draws one line of ``name.txt`` (``__dir/name__`` for ``dir/name.txt``) from the wildcard
  directories; the line is itself a template, so wildcards may use variants and other wildcards.

Errors in the user's text raise `PromptSyntaxError` with the 0-based position and a caret line, never a traceback
from deep inside a regex.
"""
from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Union

from library.errors import UserError

DEFAULT_SEPARATOR = ", "
MAX_WILDCARD_DEPTH = 32  # a wildcard chain deeper than this is almost surely a cycle (a -> b -> a)

_WILDCARD_RE = re.compile(r"__([A-Za-z0-9][\w\-./]*?)__")
_COUNT_RE = re.compile(r"(\d*)(?:(-)(\d*))?")
_ESCAPABLE = "{}|"


# ----------------------------------------------------------------------------------------------------- errors


class PromptSyntaxError(UserError):
    """A template or prompt line that cannot be parsed. Keeps the position so that the message can point at it."""

    def __init__(self, message: str, text: str, position: int, location: str | None = None):
        self.reason = message
        self.text = text
        self.position = position
        self.location = location
        super().__init__(self._format())

    def _format(self) -> str:
        # Show only the physical line that holds the position, so the caret lines up in multi-line text.
        line_start = self.text.rfind("\n", 0, self.position) + 1
        line_end = self.text.find("\n", self.position)
        line = self.text[line_start : line_end if line_end >= 0 else len(self.text)]
        column = self.position - line_start
        prefix = f"{self.location}: " if self.location else ""
        return f"{prefix}{self.reason} (at position {self.position})\n  {line}\n  {' ' * column}^"

    def with_location(self, location: str) -> "PromptSyntaxError":
        """The same error, prefixed with where the text came from (file and line), for prompt files."""
        return PromptSyntaxError(self.reason, self.text, self.position, location)


class WildcardError(UserError):
    """A wildcard that is missing, empty, or recursive, or a wildcard directory that does not exist."""


# ----------------------------------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class Variant:
    """``{lo-hi$$sep$$opt|opt|...}``. ``hi`` None means "all options"; both are clamped to the option count."""

    options: tuple["Template", ...]
    lo: int = 1
    hi: int | None = 1
    separator: str = DEFAULT_SEPARATOR
    position: int = 0
    enumerate: bool = False  # ``{e$$...}``: every combination becomes its own prompt (see Template.expand)

    def combinations(self) -> list["Template"]:
        """Every pick this variant allows, in sd-scripts' order: by count ascending, then option order."""
        n = len(self.options)
        hi = n if self.hi is None else min(self.hi, n)
        picks: list[Template] = []
        for count in range(min(self.lo, hi), hi + 1):
            for combo in itertools.combinations(self.options, count):
                nodes: list[Node] = []
                for i, option in enumerate(combo):
                    if i:
                        nodes.append(Literal(self.separator))
                    nodes.extend(option.nodes)
                picks.append(Template(tuple(nodes), self.separator.join(o.source for o in combo)))
        return picks


@dataclass(frozen=True)
class Wildcard:
    name: str
    position: int = 0


Node = Union[Literal, Variant, Wildcard]


@dataclass(frozen=True)
class Template:
    """A parsed template. Immutable and cheap to render many times; `source` is the text it was parsed from."""

    nodes: tuple[Node, ...]
    source: str = ""

    @property
    def is_static(self) -> bool:
        """True when rendering always gives the same text (no variants, no wildcards)."""
        return all(isinstance(n, Literal) for n in self.nodes)

    def wildcard_names(self) -> set[str]:
        """Wildcards named directly in this template (not those inside wildcard files), to check them early."""
        names: set[str] = set()
        for node in self.nodes:
            if isinstance(node, Wildcard):
                names.add(node.name)
            elif isinstance(node, Variant):
                for option in node.options:
                    names |= option.wildcard_names()
        return names

    @property
    def enumerates(self) -> bool:
        return any(isinstance(n, Variant) and (n.enumerate or any(o.enumerates for o in n.options))
                   for n in self.nodes)

    def expand(self) -> list["Template"]:
        """sd-scripts' enumeration: one template per combination of the ``{e$$...}`` variants (the first variant
        varies slowest); the other variants stay, to be drawn per image. A template without any gives [self]."""
        for index, node in enumerate(self.nodes):
            if isinstance(node, Variant) and node.enumerate:
                head, tail = self.nodes[:index], self.nodes[index + 1:]
                return [expanded for pick in node.combinations()
                        for expanded in Template(head + pick.nodes + tail, self.source).expand()]
        return [self]

    def render(self, rng: random.Random, wildcards: "WildcardSet | None" = None) -> str:
        """Draw one prompt. All randomness comes from `rng`, so a seeded rng gives a reproducible prompt."""
        return self._render(rng, wildcards, ())

    def _render(self, rng: random.Random, wildcards: "WildcardSet | None", chain: tuple[str, ...]) -> str:
        parts: list[str] = []
        for node in self.nodes:
            if isinstance(node, Literal):
                parts.append(node.text)
            elif isinstance(node, Variant):
                parts.append(_render_variant(node, rng, wildcards, chain))
            else:
                parts.append(_render_wildcard(node, rng, wildcards, chain))
        return "".join(parts)

    def __str__(self) -> str:
        return self.source


def _render_variant(node: Variant, rng: random.Random, wildcards: "WildcardSet | None", chain: tuple[str, ...]) -> str:
    n = len(node.options)
    hi = n if node.hi is None else min(node.hi, n)
    lo = min(node.lo, hi)
    count = rng.randint(lo, hi)
    picked = rng.sample(node.options, count)
    return node.separator.join(option._render(rng, wildcards, chain) for option in picked)


def _render_wildcard(node: Wildcard, rng: random.Random, wildcards: "WildcardSet | None", chain: tuple[str, ...]) -> str:
    if wildcards is None:
        raise WildcardError(f"prompt uses wildcard '__{node.name}__' but no wildcard directory was given")
    if len(chain) >= MAX_WILDCARD_DEPTH or node.name in chain:
        path = " -> ".join((*chain, node.name))
        raise WildcardError(f"wildcards expand recursively without end: {path}")
    return wildcards.draw(node.name, rng)._render(rng, wildcards, (*chain, node.name))


# ----------------------------------------------------------------------------------------------------- parser


class _Parser:
    """Recursive descent over one text; positions in errors are indices into that text."""

    def __init__(self, text: str):
        self.text = text

    def error(self, message: str, position: int) -> PromptSyntaxError:
        return PromptSyntaxError(message, self.text, position)

    def parse(self, start: int, end: int) -> Template:
        self.end = end
        template, pos = self._sequence(start, depth=0)
        if pos < end:  # only a stray '}' stops the top level early
            raise self.error("unbalanced brace: '}' has no matching '{'", pos)
        return template

    def _sequence(self, pos: int, depth: int) -> tuple[Template, int]:
        """Parse until the end, or (inside braces) until a '|' or '}' at this depth; return the stop position."""
        text, start = self.text, pos
        nodes: list[Node] = []
        buf: list[str] = []

        def flush() -> None:
            if buf:
                nodes.append(Literal("".join(buf)))
                buf.clear()

        while pos < self.end:
            ch = text[pos]
            if ch == "\\" and pos + 1 < self.end and text[pos + 1] in _ESCAPABLE:
                buf.append(text[pos + 1])
                pos += 2
            elif ch == "{":
                flush()
                variant, pos = self._variant(pos, depth)
                nodes.append(variant)
            elif ch == "}":
                break  # closes this variant, or (at depth 0) a stray brace that parse() reports
            elif ch == "|" and depth > 0:
                break
            elif ch == "_" and (m := _WILDCARD_RE.match(text, pos, self.end)):
                flush()
                nodes.append(Wildcard(m.group(1), pos))
                pos = m.end()
            else:
                buf.append(ch)
                pos += 1
        flush()
        return Template(tuple(nodes), text[start:pos]), pos

    def _variant(self, open_pos: int, depth: int) -> tuple[Variant, int]:
        pos, segments = self._header(open_pos + 1)
        enumerate_ = bool(segments) and segments[0][1] in ("e", "E")
        lo, hi, separator = self._interpret_header(segments[1:] if enumerate_ else segments)
        options: list[Template] = []
        while True:
            option, pos = self._sequence(pos, depth + 1)
            options.append(option)
            if pos >= self.end:
                raise self.error("unbalanced brace: '{' is never closed", open_pos)
            if self.text[pos] == "}":
                return Variant(tuple(options), lo, hi, separator, open_pos, enumerate_), pos + 1
            pos += 1  # past '|'

    def _header(self, pos: int) -> tuple[int, list[tuple[int, str]]]:
        """Collect up to three ``xxx$$`` prefixes (e, count, separator) that hold no brace or bar."""
        segments: list[tuple[int, str]] = []
        while len(segments) < 4:  # one more than allowed, to report it
            scan = pos
            while scan < self.end and self.text[scan] not in "{}|" and not self.text.startswith("$$", scan):
                scan += 1
            if scan < self.end and self.text.startswith("$$", scan):
                segments.append((pos, self.text[pos:scan]))
                pos = scan + 2
            else:
                break
        return pos, segments

    def _interpret_header(self, segments: list[tuple[int, str]]) -> tuple[int, int | None, str]:
        if not segments:
            return 1, 1, DEFAULT_SEPARATOR
        first_pos, first = segments[0]
        if len(segments) > 2:
            raise self.error("too many '$$' parts (expected [e$$][count$$][separator$$])", segments[2][0])
        if len(segments) == 1 and first and not re.fullmatch(r"[\d-]+", first):
            return 1, 1, first  # a separator only, e.g. "{ and $$a|b}"
        lo, hi = self._count(first_pos, first)
        separator = segments[1][1] if len(segments) == 2 else DEFAULT_SEPARATOR
        return lo, hi, separator

    def _count(self, pos: int, spec: str) -> tuple[int, int | None]:
        if spec == "":
            raise self.error("empty count before '$$' (expected N, N-M, -M or N-)", pos)
        m = _COUNT_RE.fullmatch(spec)
        if not m:
            raise self.error(f"bad range '{spec}' (expected N, N-M, -M or N-)", pos)
        lo_text, dash, hi_text = m.groups()
        if not dash:
            return int(lo_text), int(lo_text)
        lo = int(lo_text) if lo_text else 1
        hi = int(hi_text) if hi_text else None
        if hi is not None and lo > hi:
            raise self.error(f"bad range '{spec}': the lower bound {lo} is above the upper bound {hi}", pos)
        return lo, hi


def parse_template(text: str) -> Template:
    """Parse a template; raise `PromptSyntaxError` (with the 0-based position) on bad syntax."""
    return _Parser(text).parse(0, len(text))


def _parse_span(text: str, start: int, end: int) -> Template:
    """Parse part of a longer text so that error positions refer to the whole text (a prompt-file line)."""
    return _Parser(text).parse(start, end)


# ----------------------------------------------------------------------------------------------------- wildcards


@dataclass
class WildcardSet:
    """Wildcard files by name. Files are read and parsed on first use and cached in this object (no globals).

    Names are paths relative to a wildcard directory without ``.txt`` and with ``/`` separators; when two
    directories hold the same name the earlier directory wins. Lines that are empty or start with ``#`` are skipped.
    """

    dirs: tuple[Path, ...] = ()
    files: dict[str, Path] = field(default_factory=dict)
    _lines: dict[str, tuple[Template, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dirs(cls, dirs: Iterable[str | Path]) -> "WildcardSet":
        roots = tuple(Path(d) for d in dirs)
        files: dict[str, Path] = {}
        for root in roots:
            if not root.is_dir():
                raise WildcardError(f"wildcard directory '{root}' does not exist or is not a directory")
            for path in sorted(root.rglob("*.txt")):
                name = path.relative_to(root).with_suffix("").as_posix()
                files.setdefault(name, path)
        return cls(dirs=roots, files=files)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Iterable[str]]) -> "WildcardSet":
        """In-memory wildcards (name -> lines), for callers that keep them in a config rather than in files."""
        wildcards = cls()
        for name, lines in mapping.items():
            wildcards._lines[name] = _parse_lines(list(lines), f"wildcard '{name}'")
        return wildcards

    def names(self) -> list[str]:
        return sorted(set(self.files) | set(self._lines))

    def _resolve(self, name: str) -> str | None:
        key = name.strip("/")
        if key in self._lines or key in self.files:
            return key
        folded = {n.casefold(): n for n in self.names()}
        return folded.get(key.casefold())

    def lines(self, name: str) -> tuple[Template, ...]:
        key = self._resolve(name)
        if key is None:
            searched = ", ".join(f"'{d}'" for d in self.dirs) if self.dirs else "none given"
            raise WildcardError(
                f"wildcard '__{name}__' not found: no file '{name}.txt' in the wildcard directories ({searched})"
            )
        if key not in self._lines:
            path = self.files[key]
            try:
                raw = path.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise WildcardError(f"cannot read wildcard file '{path}': {exc}") from None
            self._lines[key] = _parse_lines(raw, str(path))
        return self._lines[key]

    def check(self, template: Template) -> None:
        """Fail early (before any model loads) when a template names a wildcard that does not exist."""
        for name in sorted(template.wildcard_names()):
            self.lines(name)

    def draw(self, name: str, rng: random.Random) -> Template:
        return rng.choice(self.lines(name))


def _parse_lines(raw_lines: list[str], source: str) -> tuple[Template, ...]:
    templates: list[Template] = []
    for line_no, raw in enumerate(raw_lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            templates.append(parse_template(line))
        except PromptSyntaxError as exc:
            raise exc.with_location(f"{source} line {line_no}") from None
    if not templates:
        raise WildcardError(f"{source} has no lines to draw from")
    return tuple(templates)


# ----------------------------------------------------------------------------------------------------- prompt lines


@dataclass(frozen=True)
class RenderedPrompt:
    prompt: str
    negative_prompt: str | None


@dataclass(frozen=True)
class PromptSpec:
    """One prompt-file line: the templates plus the options that override the command line for its images.

    None means "not given on this line": the script's command-line value applies.
    """

    template: Template
    negative_template: Template | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seeds: tuple[int, ...] | None = None
    scale: float | None = None
    negative_scale: float | str | None = None  # NO_NEGATIVE_SCALE ("none"): off for this line
    strength: float | None = None
    network_muls: tuple[float, ...] | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    filename: str | None = None
    clip_prompt: str | None = None
    control_image: str | None = None
    # Deep Shrink (library.sample.deep_shrink) and gradual latent (library.sample.gradual_latent) overrides
    ds_depth_1: int | None = None
    ds_timesteps_1: int | None = None
    ds_depth_2: int | None = None
    ds_timesteps_2: int | None = None
    ds_ratio: float | None = None
    gl_timesteps: int | None = None
    gl_ratio: float | None = None
    gl_every_n_steps: int | None = None
    gl_ratio_step: float | None = None
    gl_s_noise: float | None = None
    gl_unsharp_params: str | None = None
    raw: str = ""
    line_no: int | None = None

    @property
    def seed(self) -> int | None:
        return self.seeds[0] if self.seeds else None

    def seed_for(self, image_index: int) -> int | None:
        """The seed given for the image_index-th image of this line (``--d 1,2,3``), or None: the caller draws one."""
        if self.seeds and image_index < len(self.seeds):
            return self.seeds[image_index]
        return None

    def expand(self) -> list["PromptSpec"]:
        """One spec per combination of the line's ``{e$$...}`` variants (prompt first, then negative prompt), as
        sd-scripts enumerates them over the whole line; [self] when the line enumerates nothing."""
        prompts = self.template.expand()
        negatives = self.negative_template.expand() if self.negative_template is not None else [None]
        if len(prompts) == 1 and len(negatives) == 1:
            return [self]
        return [replace(self, template=p, negative_template=n) for p in prompts for n in negatives]

    def render(self, rng: random.Random, wildcards: WildcardSet | None = None) -> RenderedPrompt:
        """Draw the prompt and the negative prompt for one image (the negative prompt is a template too)."""
        prompt = self.template.render(rng, wildcards)
        negative = self.negative_template.render(rng, wildcards) if self.negative_template is not None else None
        return RenderedPrompt(prompt, negative)


def _int_value(minimum: int):
    def convert(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise ValueError(f"must be at least {minimum}")
        return number

    return convert


def _float_value(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _strength_value(value: str) -> float:
    number = _float_value(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError("must be between 0 and 1")
    return number


def _seeds_value(value: str) -> tuple[int, ...]:
    seeds = tuple(int(part) for part in value.split(","))
    for seed in seeds:
        if not 0 <= seed < 2**32:
            raise ValueError("seeds must be between 0 and 2**32-1")
    return seeds


def _floats_value(value: str) -> tuple[float, ...]:
    return tuple(_float_value(part) for part in value.split(","))


NO_NEGATIVE_SCALE = "none"  # `--nl none`: no negative scale for this line, whatever --negative_scale says


def _negative_scale_value(value: str) -> float | str:
    return NO_NEGATIVE_SCALE if value.lower() == "none" else _float_value(value)


def _positive_float(value: str) -> float:
    number = _float_value(value)
    if number <= 0:
        raise ValueError("must be above 0")
    return number


def _unsharp_value(value: str) -> str:
    parts = value.split(",")
    if not 3 <= len(parts) <= 4:
        raise ValueError("must be ksize,sigma,strength[,target_x], e.g. 3,0.5,0.5,1")
    for part in parts:
        _float_value(part)
    return value


# option name (as written after "--", case-insensitive) -> (PromptSpec field, converter, what to write)
PROMPT_OPTIONS: dict[str, tuple[str, Callable[[str], Any] | None, str]] = {
    "n": ("negative_template", None, "a negative prompt"),
    "w": ("width", _int_value(1), "a width in pixels"),
    "h": ("height", _int_value(1), "a height in pixels"),
    "s": ("steps", _int_value(1), "a number of steps (at least 1)"),
    "d": ("seeds", _seeds_value, "a seed or comma-separated seeds, e.g. 1,2,3"),
    "l": ("scale", _float_value, "a guidance scale, e.g. 7.5"),
    "nl": ("negative_scale", _negative_scale_value, "a negative guidance scale or 'none'"),
    "t": ("strength", _strength_value, "an img2img strength between 0 and 1"),
    "am": ("network_muls", _floats_value, "comma-separated network multipliers, e.g. 0.5,1.0"),
    "ow": ("original_width", _int_value(1), "an original width (SDXL size conditioning)"),
    "oh": ("original_height", _int_value(1), "an original height (SDXL size conditioning)"),
    "nw": ("original_width_negative", _int_value(1), "an original width for the negative prompt"),
    "nh": ("original_height_negative", _int_value(1), "an original height for the negative prompt"),
    "ct": ("crop_top", _int_value(0), "a crop top (SDXL crop conditioning)"),
    "cl": ("crop_left", _int_value(0), "a crop left (SDXL crop conditioning)"),
    "f": ("filename", str, "an output file name"),
    "c": ("clip_prompt", str, "a CLIP prompt (recorded in the PNG; SDXL has no separate CLIP prompt)"),
    "cn": ("control_image", str, "a control (guide) image path for ControlNet-LLLite"),
    "dsd1": ("ds_depth_1", _int_value(0), "a Deep Shrink depth 1 (0 to 8)"),
    "dst1": ("ds_timesteps_1", _int_value(0), "a Deep Shrink timestep 1, e.g. 650"),
    "dsd2": ("ds_depth_2", _int_value(0), "a Deep Shrink depth 2 (0 to 8)"),
    "dst2": ("ds_timesteps_2", _int_value(0), "a Deep Shrink timestep 2, e.g. 650"),
    "dsr": ("ds_ratio", _positive_float, "a Deep Shrink ratio, e.g. 0.5"),
    "glt": ("gl_timesteps", _int_value(0), "a gradual latent start timestep, e.g. 650"),
    "glr": ("gl_ratio", _positive_float, "a gradual latent start ratio, e.g. 0.5"),
    "gle": ("gl_every_n_steps", _int_value(1), "a gradual latent step count, e.g. 3"),
    "gls": ("gl_ratio_step", _positive_float, "a gradual latent ratio step, e.g. 0.125"),
    "glsn": ("gl_s_noise", _float_value, "a gradual latent s_noise, e.g. 1.0"),
    "glus": ("gl_unsharp_params", _unsharp_value, "gradual latent unsharp parameters, e.g. 3,0.5,0.5,1"),
}

_OPTION_START_RE = re.compile(r"--([A-Za-z][A-Za-z0-9]*)")  # letters, then digits too (--dsd1)


def _option_starts(line: str) -> list[int]:
    """Positions of '--x' option markers: at the start or after whitespace, and outside any braces."""
    starts: list[int] = []
    depth = 0
    pos = 0
    while pos < len(line):
        ch = line[pos]
        if ch == "\\" and pos + 1 < len(line) and line[pos + 1] in _ESCAPABLE:
            pos += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif (
            depth == 0
            and line.startswith("--", pos)
            and (pos == 0 or line[pos - 1].isspace())
            and _OPTION_START_RE.match(line, pos)
        ):
            starts.append(pos)
        pos += 1
    return starts


def parse_prompt_line(line: str) -> PromptSpec:
    """Parse ``<prompt template> [--opt value]...``; raise `PromptSyntaxError` with the position of the fault."""
    text = line.rstrip("\r\n")
    starts = _option_starts(text)
    prompt_end = starts[0] if starts else len(text)
    # trim the whitespace around the prompt without moving positions: parse a span of the original text
    p_start, p_end = _strip_span(text, 0, prompt_end)
    if p_start == p_end and not starts:
        raise PromptSyntaxError("empty prompt", text, 0)
    values: dict[str, object] = {"template": _parse_span(text, p_start, p_end), "raw": text}
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(text)
        m = _OPTION_START_RE.match(text, start)
        name = m.group(1).lower()
        if name not in PROMPT_OPTIONS:
            known = ", ".join(f"--{k}" for k in PROMPT_OPTIONS)
            raise PromptSyntaxError(f"unknown prompt option '--{m.group(1)}' (known: {known})", text, start)
        field_name, convert, expected = PROMPT_OPTIONS[name]
        v_start, v_end = _strip_span(text, m.end(), end)
        if v_start == m.end() and v_start < v_end:  # "--w512": the value must be separated by a space
            raise PromptSyntaxError(f"unknown prompt option '{text[start:v_end].split()[0]}'", text, start)
        if field_name == "negative_template":
            values[field_name] = _parse_span(text, v_start, v_end)
            continue
        value = text[v_start:v_end]
        if not value:
            raise PromptSyntaxError(f"option '--{name}' needs {expected}", text, start)
        try:
            values[field_name] = convert(value)  # type: ignore[misc]
        except ValueError as exc:
            detail = str(exc) if "must" in str(exc) else f"expected {expected}"
            raise PromptSyntaxError(f"bad value '{value}' for '--{name}': {detail}", text, v_start) from None
    return PromptSpec(**values)  # type: ignore[arg-type]


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """Read a prompt file: one prompt per line; empty lines and lines starting with '#' are skipped.

    Syntax errors name the file and the 1-based line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise UserError(f"prompt file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompt file '{path}': {exc}") from None
    specs: list[PromptSpec] = []
    for line_no, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            specs.append(replace(parse_prompt_line(line), line_no=line_no))
        except PromptSyntaxError as exc:
            raise exc.with_location(f"{path} line {line_no}") from None
    return specs


__all__ = [
    "DEFAULT_SEPARATOR",
    "NO_NEGATIVE_SCALE",
    "PROMPT_OPTIONS",
    "Literal",
    "PromptSpec",
    "PromptSyntaxError",
    "RenderedPrompt",
    "Template",
    "Variant",
    "Wildcard",
    "WildcardError",
    "WildcardSet",
    "parse_prompt_line",
    "parse_template",
    "read_prompt_file",
]
