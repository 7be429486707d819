"""Command-line flags generated from config dataclasses, so each default lives in exactly one place.

A field's help text is its `metadata["help"]`; its type and default come from the dataclass.
Booleans become `--flag` / `--no-flag`; fields with `metadata["choices"]` get checked choices.
"""

import argparse
import dataclasses


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
            group.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                               help=f"{help_text} (default: {default!r})")
    return group


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = ""):
    names = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    return cls(**{name: getattr(args, f"{prefix}{name}") for name in names})
