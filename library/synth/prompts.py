"""Prompts from annotations: "a photo with {labels}" -> "a photo with 2 dogs and a cat".

Counts read better than repeated names for the text encoder and keep the prompt short (CLIP sees 77 tokens).
Labels keep the order of their first appearance in the record, so the prompt follows the annotator's order.
"""
from __future__ import annotations

import string
from collections import Counter

from library.errors import UserError

DEFAULT_TEMPLATE = "a photo with {labels}"
PLACEHOLDERS = ("labels", "label", "count")

# Plurals that the suffix rules below get wrong (common detection classes first).
IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice", "foot": "feet",
    "tooth": "teeth", "goose": "geese", "sheep": "sheep", "deer": "deer", "fish": "fish", "knife": "knives",
    "leaf": "leaves", "wolf": "wolves", "shelf": "shelves", "scissors": "scissors", "skis": "skis",
    "glasses": "glasses", "bus": "buses", "cactus": "cacti", "ox": "oxen",
}


def label_text(label: str) -> str:
    """Class names as words: 'traffic_light' -> 'traffic light'."""
    return " ".join(label.replace("_", " ").replace("-", " ").split())


def pluralize(noun: str) -> str:
    words = noun.split(" ")
    last = words[-1]
    lower = last.lower()
    if lower in IRREGULAR_PLURALS:
        plural = IRREGULAR_PLURALS[lower]
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return " ".join(words[:-1] + [plural])


def with_count(noun: str, count: int) -> str:
    if count == 1:
        return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun
    return f"{count} {pluralize(noun)}"


def join_words(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def describe_labels(labels: list[str]) -> str:
    """'2 dogs and a cat' from ['dog', 'cat', 'dog']; '' for no labels."""
    counts = Counter(label_text(l) for l in labels)
    order = list(dict.fromkeys(label_text(l) for l in labels))
    return join_words([with_count(name, counts[name]) for name in order])


def check_template(template: str) -> None:
    """Reject unknown placeholders and bad braces before any work is done."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UserError(f"--prompt_template {template!r}: {exc}; write literal braces as {{{{ and }}}}") from None
    for name in fields:
        if name not in PLACEHOLDERS:
            raise UserError(f"--prompt_template {template!r}: unknown placeholder {{{name}}}; "
                            f"expected {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")


def build_prompt(template: str, labels: list[str]) -> str:
    """{labels}: the counted description; {label}: the first label's name; {count}: how many objects.

    A record with no objects (empty detection list) gets the template with the placeholder left empty; doubled
    spaces and a trailing comma are removed.
    """
    check_template(template)
    text = template.format(labels=describe_labels(labels), label=label_text(labels[0]) if labels else "",
                           count=len(labels))
    return " ".join(text.split()).strip(" ,")
