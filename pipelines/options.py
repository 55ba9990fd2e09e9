"""Command-line options generated from the stage config dataclasses (``--STAGE.FIELD``).

A stage's options are its dataclass fields, so the config that is hashed into the cache key is
exactly what the user can set; help texts come from the field metadata ``help`` when present.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from pipelines.stages import STAGES, default_configs


def _add_field(group: argparse._ArgumentGroup, dest: str, f: dataclasses.Field, hint: Any, default: Any) -> None:
    flag = "--" + dest.replace("_", "-")
    help_text = f.metadata.get("help", "")
    if "(default:" not in help_text:
        help_text += f" (default: {default})"
    if hint is bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif typing.get_origin(hint) is typing.Literal:
        group.add_argument(flag, dest=dest, choices=typing.get_args(hint), default=None, help=help_text)
    else:
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if typing.get_args(hint) else hint
        group.add_argument(flag, dest=dest, type=base, default=None, metavar=base.__name__.upper(), help=help_text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ``(default: ...)`` after each option, except where the help already states its default
    (the stage options, whose argparse default is None so that only what the user passed overrides)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def add_stage_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--<stage>.<field>`` for every field of every stage's config."""
    for stage in STAGES:
        cls = stage.config_type()
        group = parser.add_argument_group(f"{stage.name} options", stage.description)
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                _add_field(group, f"{stage.name}.{f.name}", f, hints[f.name], getattr(defaults, f.name))


def configs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Each stage's config: the defaults, overridden by whatever the user passed."""
    configs = default_configs()
    for name, config in configs.items():
        changes = {f.name: getattr(args, f"{name}.{f.name}") for f in dataclasses.fields(config)
                   if getattr(args, f"{name}.{f.name}", None) is not None}
        configs[name] = dataclasses.replace(config, **changes)
    return configs
