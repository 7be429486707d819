"""Command-line flags generated from config dataclasses, so each default lives in exactly one place.

A field's help text is its `metadata["help"]`; its type and default come from the dataclass.
Booleans become `--flag` / `--no-flag`; fields with `metadata["choices"]` get checked choices.
Numbers are checked as they are parsed: a float must be finite, and `metadata["min"]` is an inclusive
lower bound, so a bad value ends in argparse's one-line error naming the flag, not in a traceback (or
in a run that trains nothing).
"""

import argparse
import dataclasses
import math


class FlagParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line naming the flag (a usage of many flags would bury it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def checked_number(kind, low=None):
    """An argparse type: parse `kind` (int or float), require a finite value >= low (if given)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", title: str = ""):
    group = parser.add_argument_group(title or cls.__name__)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        flag = f"--{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            if kind in (int, float):
                kind = checked_number(kind, f.metadata.get("min"))
            group.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                               help=f"{help_text} (default: {default!r})")
    return group


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = ""):
    names = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    return cls(**{name: getattr(args, f"{prefix}{name}") for name in names})
