"""How the verbs' --help reads: each option's default after its description."""
from __future__ import annotations

import argparse


class DefaultsShown(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, less its noise: no "(default: None)" after a
    required option, after one whose help already says what leaving it out means ("default"
    in its text), and no "(default: False)" after a flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or no_default or action.required or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"
