"""Command-line flags from a registry's settings dataclasses (mask sources, corrections), and back.

A settings field is a flag when its metadata names one::

    iterations: int = field(default=20, metadata={"flag": "--admm-iterations", "min": 1, "help": "admm: ADMM steps"})

Keys: ``flag``; ``help`` (plain text; ``{defaults}`` marks where each method's default goes, else they
are appended as ``(default: ...)``); ``choices``; ``min`` (the least value of an integer flag). The
flag's type is its default's (int, float or str). Fields of several methods that name one flag are one
option, whose help lists each method's default; they must carry the same metadata (one constant, e.g.
:data:`prac.methods.masks.SCOPE`). Every flag parses to None when not given: the chosen method's own
default.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prac.cli.common import int_at_least, positive_int
from prac.core.errors import PracError

KEYS = frozenset({"flag", "help", "choices", "min"})


@dataclass
class Flag:
    """One option: its metadata, its type, and per method of the registry the field it sets and its default."""

    option: str
    meta: dict[str, Any]
    type: type
    fields: dict[str, tuple[str, Any]] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")

    def defaults(self) -> str:
        """``full 0.2, diagonal 0.05``: each method's own default."""
        return ", ".join(f"{name} {default:g}" if isinstance(default, float) else f"{name} {default}"
                         for name, (_, default) in self.fields.items())

    def help(self) -> str:
        text = self.meta.get("help", "")
        if "{defaults}" not in text:
            text += " (default: {defaults})"
        return text.replace("%", "%%").replace("{defaults}", self.defaults())

    def parse_type(self):
        least = self.meta.get("min")
        if self.type is int and least is not None:
            return positive_int if least == 1 else int_at_least(least, f"an integer >= {least}")
        return self.type


def flags(registry: Mapping[str, Any]) -> dict[str, Flag]:
    """Every flag of the registry's settings (``entry.settings``), by option, in order of first appearance."""
    out: dict[str, Flag] = {}
    for name, entry in registry.items():
        for f in dataclasses.fields(entry.settings):
            if "flag" not in f.metadata:
                continue
            meta = dict(f.metadata)
            if set(meta) - KEYS:
                raise TypeError(f"{entry.settings.__name__}.{f.name}: unknown flag metadata {sorted(set(meta) - KEYS)}")
            kind = type(f.default)
            if kind not in (int, float, str):
                raise TypeError(f"{entry.settings.__name__}.{f.name}: a flag needs an int, float or str default")
            flag = out.setdefault(meta["flag"], Flag(meta["flag"], meta, kind))
            if flag.meta != meta or flag.type is not kind:
                raise TypeError(f"{entry.settings.__name__}.{f.name}: {meta['flag']} is declared differently elsewhere")
            flag.fields[name] = (f.name, f.default)
    return out


def add_flags(group: Any, registry: Mapping[str, Any]) -> None:
    """One argument per flag of the registry, default None."""
    for flag in flags(registry).values():
        group.add_argument(flag.option, type=flag.parse_type(), choices=flag.meta.get("choices"), default=None,
                           help=flag.help())


def given(args: argparse.Namespace, registry: Mapping[str, Any]) -> dict[str, Any]:
    """The registry's flags the user gave, by ``dest``."""
    return {flag.dest: getattr(args, flag.dest) for flag in flags(registry).values()
            if getattr(args, flag.dest) is not None}


def settings_for(name: str, registry: Mapping[str, Any], values: dict[str, Any]):
    """Method ``name``'s settings from ``values`` (by ``dest``, see :func:`given`); a flag it lacks is an error."""
    by_dest = {flag.dest: flag for flag in flags(registry).values()}
    extra = [d for d in values if name not in by_dest[d].fields]
    if extra:
        first_field = lambda d: next(iter(by_dest[d].fields.values()))[0]  # noqa: E731
        raise PracError(f"{name!r} has no such setting: "
                        f"{', '.join(by_dest[d].option for d in sorted(extra, key=first_field))}")
    return registry[name].settings(**{by_dest[d].fields[name][0]: v for d, v in values.items()})
