"""Declarative checks of settings dataclasses, and the `ConfigError` every configuration check raises.

A settings dataclass declares each field's type by its annotation and its range with `setting`::

    @dataclasses.dataclass(frozen=True)
    class TrainSettings:
        steps: int = setting(1000, ge=1)
        schedule: str = setting("step", choices=("step", "cosine"))

        def __post_init__(self):
            check_settings(self, "train")

and `check_settings` refuses a wrong value naming ``section.key``, the value and what is expected. Used by
`deepseekmoe_jax.config.ModelOptions` and by the training settings; this module imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent. The message names the field."""


INT_MAX = 2**31 - 1  # the upper bound of integer settings without one of their own: device counters are int32


@dataclasses.dataclass(frozen=True)
class Check:
    """The range of one setting, kept in its dataclass field's metadata (see `setting`); the type comes from the
    field's annotation. ``gt``/``ge``/``lt``/``le`` bound numbers (every element of a tuple), ``choices`` lists
    the allowed values, ``also`` values allowed outside the range (``-1`` for "all remaining devices"),
    ``nonempty`` refuses an empty string and ``note`` is said after what is expected."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] | None = None
    also: tuple[Any, ...] = ()
    nonempty: bool = False
    note: str | None = None


def setting(default: Any = dataclasses.MISSING, **check) -> Any:
    """A dataclass field with a default and a `Check` (``setting(1e-3, gt=0)``), read by `check_settings`."""
    return dataclasses.field(default=default, metadata={"check": Check(**check)})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return _is_int(v) or isinstance(v, float)


def _fmt(x) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else repr(x)


def _range_text(c: Check) -> str:
    lo = ("[", c.ge) if c.ge is not None else ("(", c.gt) if c.gt is not None else None
    hi = ("]", c.le) if c.le is not None else (")", c.lt) if c.lt is not None else None
    if lo and hi:
        return f" in {lo[0]}{_fmt(lo[1])}, {_fmt(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_fmt(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_fmt(hi[1])}"
    return ""


def _in_range(v, c: Check) -> bool:
    if isinstance(v, float) and not math.isfinite(v):
        return False
    return (
        (c.gt is None or v > c.gt)
        and (c.ge is None or v >= c.ge)
        and (c.lt is None or v < c.lt)
        and (c.le is None or v <= c.le)
    )


@functools.cache
def _field_rules(cls) -> tuple[tuple[str, Any, bool, Check], ...]:
    """(name, base type, nullable, check) of every annotated field of ``cls``."""
    hints = typing.get_type_hints(cls)
    rules = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        nullable = type(None) in args
        bases = [a for a in args if a is not type(None)]
        base = bases[0] if len(bases) == 1 else Any
        if typing.get_origin(base) is tuple and typing.get_args(base) != (float, Ellipsis):
            base = Any  # structured values (logical_axis_rules) are checked by their owner
        check = f.metadata.get("check", Check())
        rules.append((f.name, base, nullable, check))
    return tuple(rules)


def _expected(base, nullable: bool, c: Check, value: Any = None) -> str:
    if c.choices is not None:
        text = f"one of {list(c.choices)}"
    elif base is bool:
        text = "true or false"
    elif base is int:
        text = "an integer" + _range_text(c)
        if _is_int(value) and value > INT_MAX and c.le is None and c.lt is None:
            text += f" and <= {INT_MAX}"
    elif base is float:
        text = "a number" + _range_text(c)
    elif base is str:
        text = "a non-empty string" if c.nonempty else "a string"
    elif typing.get_origin(base) is tuple:
        text = "a list of numbers" + _range_text(c)
    else:
        text = "a value"
    for extra in c.also:
        text += f" or {extra!r}"
    if nullable:
        text += " or null"
    if c.note:
        text += f" ({c.note})"
    return text


def _checked(v, base, c: Check):
    """``v`` converted to ``base`` (an int becomes a float where a number is expected, a list a tuple), or raise
    ValueError if it is not a valid value."""
    if c.also and any(v == a and type(v) is type(a) for a in c.also):
        return v
    if base is bool:
        ok = isinstance(v, bool)
    elif base is int:
        ok = _is_int(v) and _in_range(v, c) and (c.le is not None or c.lt is not None or v <= INT_MAX)
    elif base is float:
        ok = _is_number(v) and _in_range(float(v), c)
        v = float(v) if ok else v
    elif base is str:
        ok = isinstance(v, str) and not (c.nonempty and not v)
    elif typing.get_origin(base) is tuple:
        ok = isinstance(v, list | tuple) and all(_is_number(x) and _in_range(float(x), c) for x in v)
        v = tuple(float(x) for x in v) if ok else v
    else:
        return v
    if ok and c.choices is not None:
        ok = v in c.choices
    if not ok:
        raise ValueError
    return v


def check_settings(obj, section: str) -> None:
    """Check every field of the (frozen) dataclass ``obj`` against its annotated type and `Check`, normalising
    values in place (ints to floats for numbers, lists to tuples); raise `ConfigError` naming ``section.key``,
    the value and what is expected. Numbers must be finite; booleans are never numbers."""
    for name, base, nullable, c in _field_rules(type(obj)):
        v = getattr(obj, name)
        if v is None and nullable:
            continue
        try:
            new = _checked(v, base, c)
        except ValueError:
            raise ConfigError(f"{section}.{name}={v!r}: expected {_expected(base, nullable, c, v)}") from None
        if new is not v:
            object.__setattr__(obj, name, new)


def check_section_keys(cls, raw: Any, section: str) -> dict[str, Any]:
    """``raw`` (one section of a config file) as a dict, refusing a non-mapping and unknown keys."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{section}': expected a mapping of settings, found {raw!r}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in '{section}'; known keys are {sorted(known)}")
    return dict(raw)
