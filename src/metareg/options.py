"""The options of a registered factory (a backbone, a perturbation, a gradient transform, a data set)
checked against its signature before it is called: an option it does not take is refused with the
ones it does take, and a value of the wrong type (``channels: "wide"``, ``p: [0.1]``, a schedule
not among a ``Literal``'s choices) is refused naming the option, instead of surfacing as a
``TypeError`` deep inside a constructor.

The type of an option is its annotation (``p: float = 0.1``) or, for an unannotated parameter,
the type of its default (``lambda p=0.1: ...``); a parameter with neither is not checked. Ranges
are the factory's own business (a negative width fails when the factory builds, and the builders
turn that into one line as well).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .config import coerce
from .errors import ConfigError


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = inspect.unwrap(factory)
    target = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(target)
    except Exception:
        return {}


def _type_name(hint: Any) -> str:
    if hint is bool:
        return "true or false"
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    what: str,
    *,
    fixed: Iterable[str] = (),
    error: type[Exception] = ConfigError,
) -> None:
    """Refuse ``options`` that ``factory`` (its ``inspect.signature``, following ``__wrapped__``)
    does not take or that have the wrong type. ``fixed``: parameters the caller fills itself
    (not options); ``what`` names the factory in the message (e.g. ``"backbone 'conv4'"``)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return
    fixed = set(fixed)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {
        name: p
        for name, p in parameters.items()
        if name not in fixed and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    hints = _hints(factory)
    for key, value in options.items():
        if not isinstance(key, str):
            raise error(f"{what}: option names are words, got {key!r}")
        parameter = named.get(key)
        if parameter is None:
            if open_ended and key not in fixed:
                continue
            valid = [n for n, p in named.items() if p.default is not inspect.Parameter.empty]
            raise error(f"unknown option {key!r} for {what}; valid options: {', '.join(valid) or 'none'}")
        hint = hints.get(key, parameter.annotation)
        if hint is inspect.Parameter.empty or isinstance(hint, str):
            default = parameter.default
            hint = type(default) if default not in (inspect.Parameter.empty, None) else None
        if hint is None or hint is Any:
            continue
        try:
            coerce(value, hint)
        except TypeError:
            raise error(f"{what} option {key!r} must be {_type_name(hint)}, got {value!r}") from None
