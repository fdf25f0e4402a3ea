"""Check recipe values against type annotations (int, float, bool, str, Literal, unions, lists)."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from lowdose_toolkit.errors import RecipeError


def describe(annotation: Any) -> str:
    """Readable name of a type annotation (``int``, ``list[int]``, ``'avg' | 'max'``)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else describe(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _fail(value: Any, annotation: Any, where: str) -> RecipeError:
    return RecipeError(
        f"{where}: expected {describe(annotation)}, got {type(value).__name__} {value!r}"
    )


def check_value(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` (ints widened to float where a float is asked) or raise a RecipeError.

    Args:
        value: The value from the recipe (YAML-typed).
        annotation: The parameter's annotation; unknown or missing annotations accept anything.
        where: Dotted recipe path used in the error message.
    """
    if annotation in (Any, None) or annotation is typing.Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value in args and not (isinstance(value, bool) != any(isinstance(a, bool) for a in args)):
            return value
        raise _fail(value, annotation, where)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return check_value(value, arg, where)
            except RecipeError:
                continue
        raise _fail(value, annotation, where)
    if origin in (list, tuple, typing.Sequence, __import__("collections.abc").abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise _fail(value, annotation, where)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise RecipeError(f"{where}: expected {len(args)} values ({describe(annotation)}), got {value!r}")
            return [check_value(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        item = args[0] if args else Any
        return [check_value(v, item, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(value, annotation, where)
        return value
    if annotation is type(None):
        if value is None:
            return None
        raise _fail(value, annotation, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _fail(value, annotation, where)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(value, annotation, where)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(value, annotation, where)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _fail(value, annotation, where)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise _fail(value, annotation, where)
    return value
