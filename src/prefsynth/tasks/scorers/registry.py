"""Scorer kinds by name. A kind is a `Scorer` subclass whose `Spec` (a `ScorerSpec` subclass) has
`kind: Literal["name"] = "name"`; it needs no change anywhere else.

- Built-in kinds: every module of this package defining a Scorer subclass with a `Spec` is one.
- Installed packages add kinds through the entry-point group `prefsynth.scorers`, name = the kind:

      [project.entry-points."prefsynth.scorers"]
      length = "my_package.length:LengthScorer"
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from functools import cache
from importlib.metadata import entry_points

from prefsynth.errors import ConfigError
from prefsynth.schemas.config import ScorerSpec
from prefsynth.tasks.scorers.base import Scorer

GROUP = "prefsynth.scorers"


def kind_of(cls: type[Scorer]) -> str:
    """The kind a scorer class registers under: its Spec's `kind` default."""
    spec = getattr(cls, "Spec", None)
    kind = spec.model_fields["kind"].default if isinstance(spec, type) and issubclass(spec, ScorerSpec) else None
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{cls.__module__}.{cls.__qualname__} is not a scorer kind: it needs `Spec`, a ScorerSpec "
                          'subclass with `kind: Literal["<name>"] = "<name>"`')  # fmt: skip
    return kind


@cache
def _builtin() -> dict[str, type[Scorer]]:
    kinds: dict[str, type[Scorer]] = {}
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{__package__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Scorer) and cls.__module__ == module.__name__ and "Spec" in cls.__dict__:
                kinds[kind_of(cls)] = cls
    return kinds


def _installed(kind: str) -> type[Scorer] | None:
    """The scorer class an installed package registers for `kind` (loaded only when asked for)."""
    found = entry_points(group=GROUP, name=kind)
    if not found:
        return None
    ep = next(iter(found))
    try:
        cls = ep.load()
    except Exception as err:
        raise ConfigError(f"scorer kind {kind!r} from entry point {ep.value!r} cannot be loaded: {err}") from None
    if not (inspect.isclass(cls) and issubclass(cls, Scorer)):
        raise ConfigError(f"entry point {kind} = {ep.value!r} ({GROUP}) is not a Scorer subclass")
    if kind_of(cls) != kind:
        raise ConfigError(f"entry point {kind} = {ep.value!r} registers a Spec of kind {kind_of(cls)!r}")
    return cls


def kinds() -> list[str]:
    """Every kind available: built-in and installed."""
    return sorted({*_builtin(), *(ep.name for ep in entry_points(group=GROUP))})


def scorer_class(kind: object) -> type[Scorer]:
    cls = _builtin().get(kind) if isinstance(kind, str) else None
    cls = cls or (_installed(kind) if isinstance(kind, str) else None)
    if cls is None:
        given = "no `kind`" if kind is None else f"unknown kind {kind!r}"
        raise ValueError(f"{given}: `kind` must be one of: {', '.join(kinds())}")
    return cls


def spec_class(kind: object) -> type[ScorerSpec]:
    return scorer_class(kind).Spec
