"""Every flag of sd-scripts' parsers, per script, against ours: same name, action, type, default, nargs and choices.

The lists in tests/data/sd_scripts_flags/<script>.json were read from sd-scripts' own parsers (see the README there).
Flags we do not have yet are listed in tests/data/sd_scripts_flags/not_yet.json, per script: "missing" (not
accepted) and "differs" (accepted, but not as sd-scripts declares it). The lists are a ratchet: a flag that is missing
or differs without being listed fails, and so does a listed flag that now matches (take it off the list), so the
lists only shrink.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import pytest

from conftest import REPO

DATA = REPO / "tests" / "data" / "sd_scripts_flags"
NOT_YET = DATA / "not_yet.json"
COMPARED = ("action", "type", "default", "nargs", "choices")


def _trainer_parser(module_name: str) -> argparse.ArgumentParser:
    import importlib

    from library.train.entry import build_script_parser

    module = importlib.import_module(module_name)
    return build_script_parser(module.__doc__, module.add_args)


def _gen_parser() -> argparse.ArgumentParser:
    from library.sample.gen_args import build_parser

    return build_parser("sdxl_gen_img")


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "sdxl_train_network": lambda: _trainer_parser("sdxl_train_network"),
    "sdxl_train_control_net_lllite": lambda: _trainer_parser("sdxl_train_control_net_lllite"),
    "flux_train_network": lambda: _trainer_parser("flux_train_network"),
    "sdxl_gen_img": _gen_parser,
}


def describe(action: argparse.Action) -> dict[str, Any]:
    """One of our parser's actions in the reference lists' terms."""
    kind = {argparse._StoreTrueAction: "storetrue", argparse._StoreFalseAction: "storefalse",
            argparse._AppendAction: "append", argparse._StoreConstAction: "storeconst",
            argparse._CountAction: "count"}.get(type(action), "store")
    if kind in ("storetrue", "storefalse"):
        type_name, nargs = "bool", 0
    else:
        # argparse hands a store action without a type the text as given: that is sd-scripts' type=str
        type_name = getattr(action.type, "__name__", str(action.type)) if action.type is not None else "str"
        nargs = action.nargs
    return {"action": kind, "type": type_name, "default": action.default, "nargs": nargs,
            "choices": list(action.choices) if action.choices is not None else None}


def compare(script: str) -> tuple[list[dict], list[str], dict[str, dict[str, tuple[Any, Any]]]]:
    """(reference rows, missing flags, differing flags with {field: (ours, sd-scripts')})."""
    reference = json.loads((DATA / f"{script}.json").read_text())
    ours = {option: action for action in PARSERS[script]()._actions for option in action.option_strings}
    missing, differs = [], {}
    for row in reference:
        action = ours.get(row["flag"])
        if action is None:
            missing.append(row["flag"])
            continue
        got = describe(action)
        diff = {k: (got[k], row[k]) for k in COMPARED if got[k] != row[k]}
        if diff:
            differs[row["flag"]] = diff
    return reference, missing, differs


@pytest.mark.parametrize("script", list(PARSERS))
def test_flags_match_sd_scripts_or_are_listed_as_not_yet(script):
    not_yet = json.loads(NOT_YET.read_text())[script]
    reference, missing, differs = compare(script)
    accepted = len(reference) - len(missing) - len(differs)
    print(f"{script}: {accepted}/{len(reference)} sd-scripts flags accepted as declared there "
          f"({len(missing)} missing, {len(differs)} differ)")
    unlisted_missing = sorted(set(missing) - set(not_yet["missing"]))
    unlisted_differs = {f: d for f, d in differs.items() if f not in not_yet["differs"]}
    assert not unlisted_missing, f"{script}: flags missing and not in {NOT_YET.name}: {unlisted_missing}"
    assert not unlisted_differs, f"{script}: flags that differ from sd-scripts (ours, theirs): {unlisted_differs}"
    now_there = sorted(set(not_yet["missing"]) - set(missing))
    now_same = sorted(set(not_yet["differs"]) - set(differs))
    assert not now_there, f"{script}: these flags are accepted now: take them off 'missing' in {NOT_YET.name}: {now_there}"
    assert not now_same, f"{script}: these flags match sd-scripts now: take them off 'differs' in {NOT_YET.name}: {now_same}"


def _sample_value(row: dict[str, Any]) -> list[str]:
    """Command-line text that sd-scripts' parser accepts for this flag."""
    if row["action"] in ("storetrue", "storefalse"):
        return []
    choices = [c for c in (row["choices"] or []) if c is not None]
    if choices:
        value = str(choices[-1])
    else:
        value = {"int": "3", "float": "0.5", "int_or_float": "0.5"}.get(row["type"], "x")
    return [value, value] if row["nargs"] in ("*", "+", 2) else [value]


@pytest.mark.parametrize("script", list(PARSERS))
def test_every_accepted_flag_parses_a_value_as_sd_scripts_would(script):
    """Not only declared alike: each accepted flag takes the value sd-scripts' parser takes, alone on a line."""
    reference, missing, differs = compare(script)
    parser = PARSERS[script]()
    dests = {option: action.dest for action in parser._actions for option in action.option_strings}
    for row in reference:
        if row["flag"] in missing or row["flag"] in differs:  # the ratchet test covers these
            continue
        base = ["--outdir", "out"] if script == "sdxl_gen_img" and row["flag"] != "--outdir" else []  # required there
        ns, rest = parser.parse_known_args([*base, row["flag"], *_sample_value(row)])
        assert not rest, (row["flag"], rest)
        value = getattr(ns, dests[row["flag"]])
        if row["action"] == "storetrue":
            assert value is True, row["flag"]
        else:
            assert value is not None, row["flag"]


def test_not_yet_lists_name_only_real_flags():
    """A typo in the ratchet file would hide nothing but also check nothing: every entry is a flag of its script."""
    not_yet = json.loads(NOT_YET.read_text())
    assert set(not_yet) == set(PARSERS)
    for script, lists in not_yet.items():
        names = {row["flag"] for row in json.loads((DATA / f"{script}.json").read_text())}
        assert set(lists) == {"missing", "differs"}
        for kind in ("missing", "differs"):
            assert lists[kind] == sorted(lists[kind]), f"{script}/{kind}: keep the list sorted"
            assert set(lists[kind]) <= names, sorted(set(lists[kind]) - names)


def test_trainer_parsers_take_no_abbreviations_and_every_flag_has_help():
    for script in ("sdxl_train_network", "sdxl_train_control_net_lllite", "flux_train_network", "sdxl_gen_img"):
        parser = PARSERS[script]()
        assert parser.allow_abbrev is False, script
        if script == "sdxl_gen_img":
            continue  # its flags are another module's (library/sample/gen_args.py)
        no_help = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
        assert not no_help, f"{script}: flags without help text: {no_help}"
    for script in PARSERS:  # a prefix of a flag is no flag (`--vae` never means `--vae_batch_size`)
        with pytest.raises(SystemExit):
            PARSERS[script]().parse_args(["--vae_batch", "2"])


def test_documented_counts_are_current():
    """docs/training.md states how many of sd-scripts' flags each script accepts; keep it true."""
    text = " ".join((REPO / "docs" / "training.md").read_text().split())
    for script in PARSERS:
        reference, missing, differs = compare(script)
        accepted = len(reference) - len(missing) - len(differs)
        assert f"`{script}.py` {accepted} of {len(reference)}" in text, (script, accepted, len(reference))
