"""A value checked against a type by jsonargparse, and where a rejected mapping went wrong: the section, list
element, mapping value or nested key, with what should have been there."""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser


@functools.cache
def _parser(hint: Any) -> ArgumentParser:
    """A parser of one value, ``value``, of type ``hint``."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=hint, required=True)
    return parser


def fits(value: Any, hint: Any) -> bool:
    """Whether jsonargparse accepts ``value`` as a ``hint`` (on a copy: it rewrites what it parses in place)."""
    try:
        _parser(hint).parse_object({"value": copy.deepcopy(value)})
    except ArgumentError:
        return False
    return True


def build(schema: type, raw: dict) -> Any:
    """The ``schema`` dataclass of a checked ``raw`` mapping, holding the file's own values: jsonargparse's parsed
    ones would differ (it reads a string override as the value it spells, and fills in the ``init_args`` of a
    class_path it knows)."""
    hints = typing.get_type_hints(schema)
    nested = {k: build(_without_none(hints[k]), v) for k, v in raw.items()
              if dataclasses.is_dataclass(_without_none(hints[k])) and isinstance(v, dict)}
    return schema(**{**raw, **nested})


def wrong(raw: dict, schema: type, messages: dict[str, str], prefix: str = "") -> tuple[str, str]:
    """(where, what should be there) of the first value in ``raw`` that is not of its ``schema`` field's type:
    within a section (a list element, a mapping's value, a nested section's key) where a message says what it
    should be (``messages``: by where, ``key[]`` an element of a list, ``key:`` a value of a mapping;
    a message may hold ``{value!r}``)."""
    hints = typing.get_type_hints(schema)
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in hints:
            return where, f"unknown key (expected one of {', '.join(hints)})"
        hint = hints[key]
        if fits(value, hint):
            continue
        inner = _without_none(hint)
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            return wrong(value, inner, messages, prefix=f"{where}.")
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        if origin is list and isinstance(value, list) and f"{where}[]" in messages:
            i = next(i for i, v in enumerate(value) if not fits(v, args[0]))
            return f"{where}[{i}]", messages[f"{where}[]"].format(value=value[i])
        if origin is dict and isinstance(value, dict) and f"{where}:" in messages:
            k = next((k for k, v in value.items() if not fits(v, args[1])), None)
            if k is not None:
                return f"{where}: {k}", messages[f"{where}:"].format(value=value[k])
        name = inner.__name__ if isinstance(inner, type) else str(inner).replace("typing.", "")
        return where, messages.get(where, f"expected {name}, got {{value!r}}").format(value=value)
    required = [f.name for f in dataclasses.fields(schema)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = next(key for key in required if key not in raw)  # the one thing left that jsonargparse rejects
    return f"{prefix}{missing}", messages.get(f"{prefix}{missing}", "required")


def _without_none(hint: Any) -> Any:
    """``T`` of ``T | None``; any other hint as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else hint
