"""The argument parser every mixq command uses: `--help` shows each flag's default, and a
bad flag is one line naming it (no screen of usage)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help, except where there is nothing to show (no
    default, an off switch) or the help already says it."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if any(action.default is x for x in (None, False, argparse.SUPPRESS)) or "default" in help_:
            return help_
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """ArgumentParser with HelpFormatter and one-line errors; subcommands made with
    `add_subparsers()` get the same."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
