"""Typed experiment settings: each experiment's settings are a frozen dataclass (its fields and their
defaults visible in the experiment's file), its quick settings ``dataclasses.replace(default, **changes)``,
and ``--set KEY=VALUE`` is parsed by the field's declared type, with a one-line ``RunError`` naming the key
and the allowed values otherwise.

Types a field may declare to be settable from the command line: ``bool`` (true/false/1/0/yes/no/on/off),
``int`` (no fractional part), ``float`` (finite), ``str``, ``Literal[...]`` (one of its values) and
``tuple[T, ...]`` of those ("1,2,4" or "[1, 2, 4]"). Any other field (a dict, a nested object) keeps its
value and is refused on the command line by name.

    @dataclasses.dataclass(frozen=True)
    class Settings:
        dim: int = 5
        ns: tuple[int, ...] = (2, 4, 8)

    SETTINGS = Settings()
    QUICK = dataclasses.replace(SETTINGS, ns=(2, 4))
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

__all__ = ["RunError", "check_settings", "field_types", "as_dict", "parse_setting", "apply_overrides"]


class RunError(Exception):
    """An expected failure of a run (bad setting, unusable output folder, folder in use, results of
    another kind): its message is one line for the user."""


def check_settings(what: str, settings, quick=None) -> None:
    """``settings`` must be an instance of a frozen dataclass, and ``quick`` (when given) an instance of the
    same class: TypeError naming ``what`` otherwise (a dict of settings, say, which ``--set`` cannot type)."""
    if not (dataclasses.is_dataclass(settings) and not isinstance(settings, type)
            and type(settings).__dataclass_params__.frozen):
        raise TypeError(f"{what}: settings must be an instance of a frozen dataclass (@dataclasses.dataclass(frozen=True)), "
                        f"got a {type(settings).__name__}")
    if quick is not None and type(quick) is not type(settings):
        raise TypeError(f"{what}: quick settings must be a {type(settings).__name__} (dataclasses.replace(settings, ...)), "
                        f"got a {type(quick).__name__}")


def field_types(settings) -> dict[str, Any]:
    """Each field's declared type, name -> type (annotations resolved in the class's module)."""
    hints = typing.get_type_hints(type(settings))
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(settings)}


def as_dict(settings) -> dict:
    """The settings as a plain dict (tuples as lists), what a results JSON records."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_setting(key: str, text: str, kind, default=None):
    """``text`` read as a value of type ``kind`` (a field's declared type, see the module docstring);
    ``default`` is only quoted in the message. RunError naming the setting and the accepted form
    otherwise."""
    def fail(form):
        raise RunError(f"--set {key}={text}: {key} must be {form} (its default is {default!r})")

    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        body = text.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        parts = [p.strip() for p in body.split(",") if p.strip()]
        item = args[0]
        form = {int: "a list of integers, e.g. 1,2,4", float: "a list of numbers, e.g. 0.1,0.5",
                str: "a list of words, e.g. a,b"}.get(item)
        if typing.get_origin(item) is typing.Literal:
            form = "a list of values among " + ", ".join(map(repr, typing.get_args(item)))
        if form is None:
            _unsettable(key, text, default)
        if not parts:
            fail("a non-empty " + form[2:])
        return tuple(_scalar(part, item, lambda _: fail(form)) for part in parts)
    if kind in (bool, int, float, str) or origin is typing.Literal:
        return _scalar(text, kind, fail)
    _unsettable(key, text, default)


def _scalar(text: str, kind, fail):
    s = text.strip()
    if kind is bool:
        if s.lower() not in _WORDS:
            fail("true or false")
        return _WORDS[s.lower()]
    if kind is int:
        if not re.fullmatch(r"[+-]?\d+", s):
            fail("an integer")
        return int(s)
    if kind is float:
        try:
            x = float(s)
        except ValueError:
            x = math.nan
        if not math.isfinite(x):
            fail("a finite number")
        return x
    if kind is str:
        return text
    allowed = typing.get_args(kind)  # Literal
    for value in allowed:
        if str(value) == s:
            return value
    fail("one of " + ", ".join(map(repr, allowed)))


def _unsettable(key, text, default):
    raise RunError(f"--set {key}={text}: {key} cannot be set from the command line (its type is not a number, bool, "
                   f"string, choice or tuple of those; its default is {default!r})")


def apply_overrides(settings, overrides: dict) -> tuple[Any, dict]:
    """(settings with the overrides that name one of its fields, those overrides parsed): text values are
    parsed by the field's type (``parse_setting``), other values taken as they are. Keys that name no
    field are left out (``iclsim run all --set`` sets a key only where an experiment has it)."""
    types_, parsed = field_types(settings), {}
    for key, value in overrides.items():
        if key in types_:
            parsed[key] = parse_setting(key, value, types_[key], getattr(settings, key)) if isinstance(value, str) \
                else value
    return dataclasses.replace(settings, **parsed), parsed
