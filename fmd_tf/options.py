"""Options declared once: a dataclass field carries its default, help text, valid range and
choices, and everything else (validation, command-line flags, Keras configs) is derived from it.

Declaring a config::

    @dataclass(frozen=True)
    class DefenseConfig:
        rho: float = option(0.999, "clean VAL false-positive rate <= 1 - rho",
                            check=(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
                            member_shared=True)
        recon_metric: str = option("mae", "the gate's error", choices=RECON_METRICS)

        def __post_init__(self):
            normalize(self)  # types from the annotations (lists -> tuples, 1 -> 1.0, ...)

        def _cross_checks(self):  # optional: checks of several fields, run by `validate`
            ...

Using it from a script::

    parser = argparse.ArgumentParser()
    add_arguments(parser.add_argument_group("defense"), DefenseConfig, skip=("chunk_size",))
    args = parser.parse_args(["--rho", "0.95", "--recon-metric", "mse"])
    defense = apply_arguments(cfg.defense, args)  # only the flags given; ValueError names --rho

Types come from the field annotations: ``int``, ``float``, ``str``, ``bool``, ``tuple[T, ...]``
and ``tuple[T1, T2]`` of those, and ``X | None``. On the command line a tuple is written
comma-separated (``--range-percentiles 1,99``), a bool as ``true`` / ``false`` (also yes/no,
on/off, 1/0; a flag, not a switch, so that it can turn an option off as well as on), and the
value None of an ``X | None`` field as ``none``. Every flag has ``default=None``, so that only
the flags a user gave override a config; a flag given as ``none`` parses to :data:`NONE`, which
:func:`given_arguments` turns into None.

This module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import operator
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "NONE",
    "OptionError",
    "add_arguments",
    "apply_arguments",
    "check_value",
    "cli_fields",
    "flag",
    "given_arguments",
    "member_shared_fields",
    "normalize",
    "option",
    "option_help",
    "parse_text",
    "unknown_option_error",
    "validate",
]

_KEY = "fmd_tf.option"  # key of the field metadata
_SCALARS = (int, float, str, bool)
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class _NoneFlag:
    """The value of a flag given as ``none`` (None itself means "flag not given")."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "NONE"

    def __reduce__(self):
        return (_NoneFlag, ())


NONE = _NoneFlag()


class OptionError(ValueError):
    """An invalid option value: ``"<name>: <message>, got <value>"``.

    `name` is the field (or, from `apply_arguments`, the ``--flag``), `fields` every field the
    check involves (one for a field check, several for a cross-field check).
    """

    _NO_VALUE = object()

    def __init__(self, name: str, message: str, value: Any = _NO_VALUE, fields=None):
        self.name, self.message, self.value = name, message, value
        self.fields = tuple(fields) if fields is not None else (name,)
        got = "" if value is OptionError._NO_VALUE else f", got {value!r}"
        super().__init__(f"{name}: {message}{got}")

    def renamed(self, name: str) -> OptionError:
        return OptionError(name, self.message, self.value, self.fields)


# ----------------------------------------------------------------------------- declaring


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    check: Callable[[Any], bool] | tuple[Callable[[Any], bool], str] | None = None,
    choices: Iterable | None = None,
    cli: bool = True,
    member_shared: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A `dataclasses.field` carrying the option's help, check and choices.

    Args:
        default: the default value (lists, dicts and sets are copied per instance).
        help: what the option does (becomes the flag's help and the docs of properties derived
            from it).
        check: predicate of a valid value, or (predicate, message describing the valid range,
            e.g. "must be in (0, 1]"). A value for which it returns false or raises is invalid.
            None of an ``X | None`` field skips it.
        choices: the allowed values (checked before `check`).
        cli: whether `add_arguments` makes a flag for it.
        member_shared: whether every member of an ensemble must have the same value
            (`member_shared_fields`).
        factory: zero-argument callable giving the default (instead of `default`).
    """
    if check is not None and not isinstance(check, tuple):
        check = (check, "is out of range")
    if check is not None and (len(check) != 2 or not callable(check[0])):
        raise TypeError(f"check must be a predicate or (predicate, message), got {check!r}")
    metadata = {_KEY: {"help": " ".join(help.split()), "check": check,
                       "choices": None if choices is None else tuple(choices), "cli": bool(cli),
                       "member_shared": bool(member_shared)}}
    if factory is not None:
        if default is not dataclasses.MISSING:
            raise TypeError("give either default or factory, not both")
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _meta(f: dataclasses.Field) -> dict:
    return f.metadata.get(_KEY) or {"help": "", "check": None, "choices": None, "cli": True,
                                    "member_shared": False}


def _fields(cls_or_cfg) -> dict[str, dataclasses.Field]:
    if not dataclasses.is_dataclass(cls_or_cfg):
        raise TypeError(f"expected a dataclass or dataclass instance, got {cls_or_cfg!r}")
    return {f.name: f for f in dataclasses.fields(cls_or_cfg) if f.init}


def _class(cls_or_cfg) -> type:
    return cls_or_cfg if isinstance(cls_or_cfg, type) else type(cls_or_cfg)


# ----------------------------------------------------------------------------- types


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What an annotation allows: `base` (a scalar type, or tuple with `items`) and None."""

    base: type | None  # None: unsupported (kept as is)
    optional: bool = False
    items: tuple = ()  # element types of a tuple; (T, Ellipsis) for tuple[T, ...]

    @property
    def variadic(self) -> bool:
        return len(self.items) == 2 and self.items[1] is Ellipsis

    def element(self, i: int) -> type:
        return self.items[0] if self.variadic else self.items[i]


_KIND_CACHE: dict[type, dict[str, _Kind]] = {}


def _kind_of(annotation) -> _Kind:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return dataclasses.replace(_kind_of(rest[0]), optional=True)
        return _Kind(None)
    if annotation in _SCALARS:
        return _Kind(annotation)
    if origin is tuple and args:
        variadic = len(args) == 2 and args[1] is Ellipsis
        elements = args[:1] if variadic else args
        if all(a in _SCALARS for a in elements):
            return _Kind(tuple, items=tuple(args))
    return _Kind(None)


def _kinds(cls) -> dict[str, _Kind]:
    cls = _class(cls)
    if cls not in _KIND_CACHE:
        hints = typing.get_type_hints(cls)
        _KIND_CACHE[cls] = {name: _kind_of(hints.get(name)) for name in _fields(cls)}
    return _KIND_CACHE[cls]


def _scalar(value, typ: type):
    """A Python value as int / float / str / bool, or ValueError (no silent rounding)."""
    numpy_kind = getattr(getattr(value, "dtype", None), "kind", None)
    if typ is bool:
        if isinstance(value, bool) or numpy_kind == "b":
            return bool(value)
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected a bool")
    if typ is int:
        if isinstance(value, (bool, str, bytes)) or numpy_kind == "b":
            raise ValueError("expected an int")
        try:
            return operator.index(value)
        except TypeError:
            pass
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError("expected an int") from None
        if number.is_integer():
            return int(number)
        raise ValueError("expected an int")
    if typ is float:
        if isinstance(value, (str, bytes, bool)):
            raise ValueError("expected a float")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a float") from None
    if not isinstance(value, str):
        raise ValueError("expected a str")
    return value


def _coerce(kind: _Kind, value):
    if (value is None and kind.optional) or kind.base is None:
        return value
    if kind.base is not tuple:
        return _scalar(value, kind.base)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("expected a sequence")
    value = tuple(value)
    if not kind.variadic and len(value) != len(kind.items):
        raise ValueError(f"expected {len(kind.items)} values")
    return tuple(_scalar(v, kind.element(i)) for i, v in enumerate(value))


def _parse_scalar(text: str, typ: type):
    text = text.strip()
    if typ is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an int") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a float") from None
    return text


def parse_text(cls, name: str, text: str):
    """The value of field `name` of `cls` written as on the command line (see the module
    docstring); :data:`NONE` for ``none`` where the field allows None. ValueError if it does
    not parse."""
    kind = _kinds(cls)[name]
    if kind.base is None:
        raise TypeError(f"{_class(cls).__name__}.{name}: no command-line form for this type")
    if kind.optional and text.strip().lower() == "none":
        return NONE
    if kind.base is not tuple:
        return _parse_scalar(text, kind.base)
    parts = [p for p in text.split(",") if p.strip()]
    if not kind.variadic and len(parts) != len(kind.items):
        raise ValueError(f"expected {len(kind.items)} comma-separated values")
    return tuple(_parse_scalar(p, kind.element(i)) for i, p in enumerate(parts))


# ----------------------------------------------------------------------------- checking


def normalize(cfg) -> None:
    """Convert every field of the (frozen) dataclass instance `cfg` to its annotated type, in
    place: lists to tuples, ints to floats, numpy scalars to Python ones. Call it from
    ``__post_init__``. OptionError for a value of another kind (a str for an int, 2.5 for an
    int, a tuple of the wrong length); ranges are checked by `validate`, not here."""
    kinds = _kinds(cfg)
    for name in _fields(cfg):
        value = getattr(cfg, name)
        try:
            converted = _coerce(kinds[name], value)
        except ValueError as err:
            raise OptionError(name, str(err), value) from None
        if converted is not value:
            object.__setattr__(cfg, name, converted)


def check_value(cls, name: str, value):
    """`value` converted to the type of field `name` of `cls`, after its choices and check;
    OptionError naming the field otherwise."""
    field = _fields(cls).get(name)
    if field is None:
        raise unknown_option_error(cls, [name])
    kind = _kinds(cls)[name]
    try:
        value = _coerce(kind, value)
    except ValueError as err:
        raise OptionError(name, str(err), value) from None
    if value is None and kind.optional:
        return value
    meta = _meta(field)
    if meta["choices"] is not None and value not in meta["choices"]:
        raise OptionError(name, f"must be one of {', '.join(map(str, meta['choices']))}", value)
    if meta["check"] is not None:
        predicate, message = meta["check"]
        try:
            ok = bool(predicate(value))
        except (TypeError, ValueError, ArithmeticError):
            ok = False
        if not ok:
            raise OptionError(name, message, value)
    return value


def validate(cfg) -> None:
    """Check every field of `cfg` (choices, then check, in field order), then the class's
    ``_cross_checks()`` if it has one. Raises OptionError (a ValueError)
    ``"<field>: <message>, got <value>"`` for the first failure."""
    for name in _fields(cfg):
        check_value(cfg, name, getattr(cfg, name))
    cross = getattr(cfg, "_cross_checks", None)
    if cross is not None:
        cross()


def unknown_option_error(cls, names: Iterable[str]) -> TypeError:
    """TypeError naming unknown option `names` of `cls`, with close matches."""
    known = list(_fields(cls))
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(f"unknown {_class(cls).__name__} option(s) {', '.join(hints)}")


def member_shared_fields(cls) -> tuple[str, ...]:
    """Names of the fields marked ``member_shared`` (in field order): the settings every
    member of an ensemble must share."""
    return tuple(name for name, f in _fields(cls).items() if _meta(f)["member_shared"])


def cli_fields(cls, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """Names of the fields that get a flag (``cli=True``), less `skip`."""
    fields = _fields(cls)
    unknown = [s for s in skip if s not in fields]
    if unknown:
        raise unknown_option_error(cls, unknown)
    return tuple(n for n, f in fields.items() if _meta(f)["cli"] and n not in set(skip))


def option_help(cls, name: str) -> str:
    """The help text of field `name` of `cls`."""
    return _meta(_fields(cls)[name])["help"]


# ----------------------------------------------------------------------------- argparse


def flag(name: str, prefix: str = "") -> str:
    """``--prefix-field-name`` of field `name`."""
    return "--" + (prefix + name).replace("_", "-")


def _text(value) -> str:
    """A value as written on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_text(v) for v in value)
    return str(value)


def _type_name(typ) -> str:
    return {int: "INT", float: "FLOAT", str: "STR", bool: "true|false"}[typ]


def add_arguments(parser, cls, skip: Iterable[str] = (), prefix: str = "") -> list[str]:
    """Add one ``--field-name`` flag per ``cli=True`` field of `cls` to `parser` (an
    ArgumentParser or argument group) and return the flags.

    Every flag has ``default=None`` (so that `apply_arguments` only overrides what was given),
    a ``type`` parsing the command-line form of the field's annotation (module docstring), its
    choices, and the field's help with its valid range and default. `cls` may be an instance:
    its values are shown as the defaults. `prefix` (e.g. ``"classifier_"``) goes in front of
    every flag and ``dest``, for configs whose field names clash. argparse raises if a flag
    exists already.
    """
    kinds, fields, added = _kinds(cls), _fields(cls), []
    for name in cli_fields(cls, skip):
        kind, meta = kinds[name], _meta(fields[name])
        if kind.base is None:
            raise TypeError(f"{_class(cls).__name__}.{name}: no command-line form for its type; "
                            "declare it with cli=False")
        if isinstance(cls, type):
            f = fields[name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        else:
            default = getattr(cls, name)

        def parse(text, _name=name):
            try:
                return parse_text(cls, _name, text)
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"{err}, got {text!r}") from None

        if kind.base is tuple:
            element = _type_name(kind.items[0])
            metavar = f"{element}[,{element}...]" if kind.variadic \
                else ",".join(_type_name(t) for t in kind.items)
        elif kind.base is bool:
            metavar = "true|false"
        elif meta["choices"] is not None:
            metavar = "{" + ",".join(map(str, meta["choices"])) + "}"
        else:
            metavar = None
        if metavar and kind.optional:
            metavar = metavar[:-1] + ",none}" if metavar.endswith("}") else metavar + "|none"
        choices = meta["choices"]
        if choices is not None and kind.optional:
            choices = (*choices, NONE)
        text = meta["help"] or name.replace("_", " ")
        valid = f"{meta['check'][1]}; " if meta["check"] is not None else ""
        text = f"{text} ({valid}default: {_text(default)})".replace("%", "%%")
        parser.add_argument(
            flag(name, prefix), dest=prefix + name, default=None, type=parse,
            choices=choices, metavar=metavar, help=textwrap.fill(text, 72),
        )
        added.append(flag(name, prefix))
    return added


def given_arguments(args, cls, skip: Iterable[str] = (), prefix: str = "") -> dict:
    """{field: value} of the flags of `cls` given in `args` (an argparse Namespace), with
    ``none`` as None. Values are as parsed, not yet checked."""
    given = {}
    for name in cli_fields(cls, skip):
        value = getattr(args, prefix + name, None)
        if value is not None:
            given[name] = None if value is NONE else value
    return given


def apply_arguments(cfg, args, cls=None, skip: Iterable[str] = (), prefix: str = ""):
    """``dataclasses.replace(cfg, **given)`` for the flags given in `args`, then `validate`.

    OptionError (a ValueError) naming the ``--flag`` when a given value is invalid (or, for a
    cross-field check, the flags involved that were given; the field names when none was).
    `cls` defaults to ``type(cfg)``.
    """
    cls = type(cfg) if cls is None else cls
    given = given_arguments(args, cls, skip, prefix)
    try:
        new = dataclasses.replace(cfg, **given)
        validate(new)
    except OptionError as err:
        named = [flag(f, prefix) for f in err.fields if f in given]
        raise (err.renamed(", ".join(named)) if named else err) from None
    return new
