"""Every option of every verb says what it does and, when it has a default, what that is."""
from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from slip.main import build_parser

# Which module defines each verb's options: a failure names where to fix it.
DEFINED_IN = {
    "demo": "slip/demo.py",
    "profile": "slip/profile.py",
    "train": "slip/train.py",
    "export": "slip/train.py",
    "convert": "slip/data.py",
    "inspect": "slip/data.py",
    "verify": "slip/data.py",
    "eval": "slip/eval.py",
}


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _options(parser: argparse.ArgumentParser, path: list[str]) -> Iterator[tuple[list[str], argparse.ArgumentParser, argparse.Action]]:
    """Every argument of `parser` and of the parsers below it, with the words that reach it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, [*path, name])
        elif not isinstance(action, argparse._HelpAction):
            yield path, parser, action


def _problems(verb: str) -> list[str]:
    parser = _subparsers(build_parser()).choices[verb]
    found = []
    for path, owner, action in _options(parser, [verb]):
        name = "/".join(action.option_strings) or action.dest
        where = f"slip {' '.join(path)} {name}"
        # What --help prints for it: the parser's own formatter, %(default)s expanded.
        shown = owner._get_formatter()._expand_help(action) if action.help else ""
        if not shown.strip():
            found.append(f"{where}: no help text")
            continue
        has_default = action.default not in (None, False, argparse.SUPPRESS) and not action.required
        if has_default and "default" not in shown.lower():
            found.append(f"{where}: the help does not show the default {action.default!r}")
    return found


def test_every_verb_is_listed_with_help() -> None:
    sub = _subparsers(build_parser())
    assert set(sub.choices) == set(DEFINED_IN), "a verb was added or removed: update DEFINED_IN"
    described = {choice.dest: choice.help for choice in sub._choices_actions}
    assert all(described.get(verb) for verb in DEFINED_IN), f"verbs without a one-line help: {sorted(v for v in DEFINED_IN if not described.get(v))}"


@pytest.mark.parametrize("verb", sorted(DEFINED_IN))
def test_options_have_help_and_show_defaults(verb: str) -> None:
    problems = _problems(verb)
    assert not problems, f"{DEFINED_IN[verb]}: {len(problems)} option(s) to fix:\n  " + "\n  ".join(problems)


def test_defaults_are_expanded_not_printed_raw() -> None:
    """A %(default)s in a help string reaches the user as the value."""
    help_text = _subparsers(_subparsers(build_parser()).choices["profile"]).choices["pipeline"].format_help()
    assert "(default: 64)" in help_text and "(default: 224)" in help_text and "(default: cpu)" in help_text
    assert "%(default)" not in help_text
