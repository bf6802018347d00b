"""Typed, validated config sections: one mechanism for every config of the project (trainer, demo, SFT).

A section is a frozen dataclass that subclasses ``Section``. Each field's type annotation says what it accepts and
``spec(default, ...)`` puts its range in the field's metadata; ``Section.__post_init__`` checks every field, so a
section built from a TOML file, from ``key=value`` overrides or directly in Python is checked the same way:

    @dataclass(frozen=True)
    class OptimConfig(Section, section="optim"):
        lr: float = spec(1e-4, gt=0, le=10)
        betas: tuple[float, float] = spec((0.9, 0.999), ge=0, lt=1)     # bounds apply to each element

Rules by type (``check_value`` owns them):
    bool       a bool (never 0/1)                     int     an int, not a bool, within [ge, le] / (gt, lt)
    float      an int or float, never NaN, finite unless ``allow_inf``, within the bounds
    str        a valid Unicode string; ``path=True`` or ``nonempty=True``: not blank
    Literal    one of the listed values               tuple   a list of the element type (fixed or any length)
    dict       a table with string keys (values checked when typed: ``dict[str, float]``)
Numbers without an explicit bound are still bounded (``DEFAULT_INT_RANGE``, finite floats), so a 400-digit
integer is a clear error, not an overflow deep inside a run.

``build(cls, data, prefix)`` turns a plain dict (from TOML) into a section, coercing ints to floats and lists to
tuples; ``load_toml`` and ``apply_overrides`` read files and ``section.key=value`` overrides. Every problem is a
``ConfigError`` (a ``ValueError``) that names the key, what was expected and what was given.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

__all__ = ["SEED_RANGE", "ConfigError", "FieldSpec", "Section", "apply_overrides", "build", "check_value", "load_toml",
           "parse_value", "spec", "to_dict"]

# Ints without an explicit range: wide enough for any step count, seed or size, narrow enough for int64 / C.
DEFAULT_INT_RANGE = (-(2 ** 63), 2 ** 63 - 1)
SEED_RANGE = {"ge": 0, "le": 2 ** 32 - 1}   # numpy's seed range: a seed means the same thing to every library
_MAX_SHOWN = 80   # characters of a bad value quoted in an error (a 400-digit number is cut, not printed whole)


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type or range."""


@dataclass(frozen=True)
class FieldSpec:
    """The range of one field (of each element for a tuple, of each value for a dict)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    allow_inf: bool = False    # floats: +-inf is a meaningful value of this field (still within the bounds)
    nonempty: bool = False     # str: not blank; tuple / dict: at least one element
    path: bool = False         # str: a file-system path (not blank, no NUL byte)

    def describe(self) -> str:
        """The range as ``in [0, 1)``, ``>= 1`` or ``""`` (no bound)."""
        lo, hi = (self.ge if self.ge is not None else self.gt), (self.le if self.le is not None else self.lt)
        if lo is not None and hi is not None:
            return f"in {'[' if self.ge is not None else '('}{_num(lo)}, {_num(hi)}{']' if self.le is not None else ')'}"
        if lo is not None:
            return f"{'>=' if self.ge is not None else '>'} {_num(lo)}"
        if hi is not None:
            return f"{'<=' if self.le is not None else '<'} {_num(hi)}"
        return ""


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else format(v, "g")


def spec(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """A dataclass field with ``default`` (or ``factory``) and its range (``FieldSpec`` keywords)."""
    meta = {"spec": FieldSpec(**bounds)}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else f"{text[:_MAX_SHOWN - 20]}...({len(text)} characters)"


def _fail(key: str, expected: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{key}: expected {expected}, got {_short(value)} ({type(value).__name__})")


def type_name(tp: Any, fs: FieldSpec = FieldSpec()) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a table (section.key.name = value)"
    if origin is tuple:
        args = typing.get_args(tp)
        inner = type_name(args[0], fs)
        many = "a non-empty list" if fs.nonempty else "a list"
        return f"{many} of {inner}" if args[-1] is Ellipsis else f"a list of {len(args)} ({inner})"
    if tp is str:
        return "a non-empty path" if fs.path else ("a non-empty string" if fs.nonempty else "a string")
    base = {int: "an int", float: "a finite float" if not fs.allow_inf else "a float", bool: "a bool"}.get(
        tp, str(tp))
    bounds = fs.describe()
    return f"{base} {bounds}" if bounds else base


def _check_range(key: str, tp: Any, fs: FieldSpec, value: float) -> None:
    lo_ok = (fs.ge is None or value >= fs.ge) and (fs.gt is None or value > fs.gt)
    hi_ok = (fs.le is None or value <= fs.le) and (fs.lt is None or value < fs.lt)
    if not (lo_ok and hi_ok):
        _fail(key, type_name(tp, fs), value)


def check_value(key: str, tp: Any, fs: FieldSpec, value: Any) -> Any:
    """``value`` checked against type ``tp`` and range ``fs``, returned as that type (an int for a float field
    becomes a float, a list for a tuple field a tuple, as TOML gives them). Raises ``ConfigError`` naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or not any(value == c and type(value) is type(c) for c in choices):
            _fail(key, type_name(tp), value)
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            _fail(key, type_name(tp, fs), value)
        args = typing.get_args(tp)
        if (args[-1] is not Ellipsis and len(value) != len(args)) or (fs.nonempty and not value):
            _fail(key, type_name(tp, fs), value)
        inner = dataclasses.replace(fs, nonempty=False)
        return tuple(check_value(f"{key}[{i}]", args[0], inner, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value) or (fs.nonempty and not value):
            _fail(key, type_name(tp, fs), value)
        value_type = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        if value_type is Any:
            return dict(value)
        inner = dataclasses.replace(fs, nonempty=False)
        return {k: check_value(f"{key}.{k}", value_type, inner, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return check_value(key, arg, fs, value)
            except ConfigError:
                pass
        _fail(key, " or ".join(type_name(a, fs) for a in typing.get_args(tp)), value)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, "a bool (true or false)", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, type_name(tp, fs), value)
        _check_range(key, tp, fs, value)
        lo, hi = DEFAULT_INT_RANGE
        if not lo <= value <= hi:
            _fail(key, f"an int in [{lo}, {hi}]", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, type_name(tp, fs), value)
        if isinstance(value, int):
            try:
                value = float(value)
            except OverflowError:
                _fail(key, type_name(tp, fs), value)
        if math.isnan(value) or (math.isinf(value) and not fs.allow_inf):
            _fail(key, type_name(tp, fs), value)
        _check_range(key, tp, fs, value)
        return value
    if tp is str:
        if not isinstance(value, str):
            _fail(key, type_name(tp, fs), value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            _fail(key, f"{type_name(tp, fs)} of valid Unicode (no lone surrogates)", value)
        if (fs.nonempty or fs.path) and not value.strip():
            _fail(key, type_name(tp, fs), value)
        if fs.path and "\x00" in value:
            _fail(key, "a path without NUL bytes", value)
        return value
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, FieldSpec], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], f.metadata.get("spec", FieldSpec())) for f in dataclasses.fields(cls))


class Section:
    """Base of every config dataclass: checks each field's type and range after construction.

    ``class OptimConfig(Section, section="optim")`` names the section for error messages (``optim.lr``).
    Subclasses with cross-field rules override ``__post_init__`` and call ``super().__post_init__()`` first."""

    SECTION: ClassVar[str] = ""

    def __init_subclass__(cls, section: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.SECTION = section

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def __post_init__(self) -> None:
        for name, tp, fs in _fields(type(self)):
            value = getattr(self, name)
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    _fail(self._key(name), f"a [{self._key(name)}] table", value)
                continue
            checked = check_value(self._key(name), tp, fs, value)
            if checked is not value:   # 1 -> 1.0, [a, b] -> (a, b): the field holds its declared type
                object.__setattr__(self, name, checked)


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` from a plain nested dict: unknown keys and wrong types are ``ConfigError``s naming the key."""
    prefix = prefix or getattr(cls, "SECTION", "")
    if not isinstance(data, dict):
        _fail(prefix or "config", f"a table [{prefix}]", data)
    fields = {name: (tp, fs) for name, tp, fs in _fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section [{prefix}]" if prefix else "the top level"
        raise ConfigError(f"unknown key {(prefix + '.' if prefix else '') + str(unknown[0])!r} in {where}; "
                          f"known keys: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp, fs = fields[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                _fail(key, f"a table [{key}]", value)
            kwargs[name] = build(tp, value, key)
        else:
            kwargs[name] = check_value(key, tp, fs, value)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for TOML/JSON and for comparing configs."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


def parse_value(text: str) -> Any:
    """An override's value: a TOML value (``1e-5``, ``true``, ``[0.9, 0.95]``, ``"text"``) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):   # TOMLDecodeError, or an integer beyond Python's digit limit
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with ``section.key=value`` overrides applied (checked later by ``build``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {_short(item)}: expected section.key=value (for example optim.lr=1e-5)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(p.strip() == p and p for p in parts):
            raise ConfigError(f"override {_short(item)}: the key must be dotted, section.key (for example "
                              "optim.lr), without spaces or empty parts")
        node = data
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {_short(item)}: {'.'.join(parts[:i + 1])!r} is not a section")
        node[parts[-1]] = parse_value(text.strip())
    return data


def load_toml(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; a missing, unreadable, non-UTF-8 or invalid file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: no such file {str(path)!r}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r}: not UTF-8 text (TOML must be UTF-8): byte {e.start} is "
                          f"{raw[e.start:e.start + 1]!r}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r}: invalid TOML: {e}") from None
    except (ValueError, RecursionError) as e:    # e.g. an integer beyond Python's digit limit, absurd nesting
        raise ConfigError(f"{what} {str(path)!r}: invalid TOML: {_short(str(e))}") from None
