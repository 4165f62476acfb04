"""Choosing parameters (or modules) by name: glob patterns and named layer groups, in one place.

Which weights adapt in the inner loop, which layers DropGrad or an MT-net mask touches, and where a
perturbation attaches are all a *selection* over names, in the manner of optax's ``masked``:

* a glob pattern (``"blocks.*.conv.*"``, ``"head.weight"``) matches names with :mod:`fnmatch`;
* a group name (``"head"``, ``"first-block"``, ``"last-block"``, ``"full"``) stands for the
  patterns a backbone lists for it in its ``layer_groups()`` (the network knows its own layout;
  nothing here depends on backbone naming); ``"a+b"`` is the union of groups ``a`` and ``b``.

Every pattern and group must match something: a typo is an error that lists the names, never a
silently empty selection.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

from .errors import ConfigError

Groups = Mapping[str, Sequence[str]]
#: Groups every network has; backbones add their own (``head``, ``first-block``, ``last-block``).
COMMON_GROUPS: dict[str, list[str]] = {"full": ["*"]}


def layer_groups(model: object) -> dict[str, list[str]] | None:
    """The groups ``model`` names in its ``layer_groups()``, None if it has no such method."""
    method = getattr(model, "layer_groups", None)
    return None if method is None else method()


def expand(spec: str | Sequence[str], groups: Groups | None = None) -> list[str]:
    """Glob patterns for ``spec``: a group name, ``"a+b"``, a pattern, or a list of any of these."""
    known = COMMON_GROUPS | dict(groups or {})
    items = [spec] if isinstance(spec, str) else list(spec)
    patterns: list[str] = []
    for item in items:
        names = item.split("+") if "+" in item and all(part in known for part in item.split("+")) else [item]
        for name in names:
            patterns += list(known[name]) if name in known else [name]
    return patterns


def select(
    names: Iterable[str],
    spec: str | Sequence[str],
    groups: Groups | None = None,
    *,
    what: str = "parameter",
    role: str = "",
) -> list[str]:
    """The names (in their order) matched by ``spec``; every pattern or group must match one.
    ``what`` the names are and the ``role`` of the selection only shape the error message."""
    names = list(names)
    chosen: list[str] = []
    items = [spec] if isinstance(spec, str) else list(spec)
    for item in items:
        hits = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in expand(item, groups))]
        if not hits:
            available = ", ".join(sorted((COMMON_GROUPS | dict(groups or {})).keys()))
            shown = ", ".join(names[:16]) + (", ..." if len(names) > 16 else "")
            raise ConfigError(
                f"{role or what} selection {item!r} matches no {what}; groups: {available}; names: {shown}"
            )
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]
