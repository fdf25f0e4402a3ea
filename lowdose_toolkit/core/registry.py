"""The registry: every part that plugins registered, and how to build one from a recipe mapping."""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lowdose_toolkit.core.typecheck import check_value
from lowdose_toolkit.errors import PluginError, RecipeError, UserError
from lowdose_toolkit.parts import CONTEXT_ARGS, KINDS


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest match of ``word`` among ``choices`` (or None)."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def suggestion(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    match = closest(word, choices)
    return f" (did you mean {match!r}?)" if match else ""


@dataclass(frozen=True)
class Entry:
    """A registered part: kind, name, the factory that builds it and the plugin it came from."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    version: str

    @property
    def doc(self) -> str:
        """First line of the factory's docstring."""
        text = inspect.getdoc(self.factory) or ""
        return text.strip().splitlines()[0] if text.strip() else ""

    def _targets(self) -> list[Callable[..., Any]]:
        """The callables whose keyword parameters the factory accepts.

        A class whose ``__init__`` takes ``**kwargs`` and passes them up (``super().__init__(**kw)``)
        also accepts its base class's parameters, so they are followed along the MRO.
        """
        if not inspect.isclass(self.factory):
            return [self.factory]
        targets = []
        for cls in self.factory.__mro__:
            if "__init__" not in vars(cls) or cls is object:
                continue
            targets.append(vars(cls)["__init__"])
            params = inspect.signature(vars(cls)["__init__"]).parameters.values()
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return targets

    def parameters(self) -> dict[str, inspect.Parameter]:
        """Keyword parameters of the factory (``self`` and ``*args``/``**kwargs`` excluded)."""
        out: dict[str, inspect.Parameter] = {}
        for target in self._targets():
            for n, p in inspect.signature(target).parameters.items():
                if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in out:
                    out[n] = p
        return out

    def annotations(self) -> dict[str, Any]:
        """Resolved type hints of the factory's parameters ({} where they cannot be resolved)."""
        hints: dict[str, Any] = {}
        for target in reversed(self._targets()):
            try:
                hints.update(typing.get_type_hints(target))
            except Exception:  # noqa: BLE001 - unresolvable hints only disable type checks
                continue
        return hints


class Registry:
    """Parts by kind and name. Build one with :meth:`build` from ``{name: ..., **kwargs}``."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, name: str, factory: Callable[..., Any], plugin: str, version: str = "-") -> None:
        """Register ``factory`` as part ``name`` of ``kind``; a duplicate name names both plugins."""
        if kind not in self._entries:
            raise PluginError(f"plugin {plugin!r} registers unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registers a {kind} with invalid name {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registers {kind} {name!r} with a non-callable {factory!r}")
        old = self._entries[kind].get(name)
        if old is not None:
            raise PluginError(
                f"duplicate {kind} name {name!r}: registered by plugin {old.plugin!r} and by plugin {plugin!r}"
            )
        self._entries[kind][name] = Entry(kind, name, factory, plugin, version)

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(self._entries[kind])

    def entries(self) -> list[Entry]:
        """All entries, by kind then name."""
        return [e for kind in KINDS for _, e in sorted(self._entries[kind].items())]

    def get(self, kind: str, name: str, where: str = "") -> Entry:
        """The entry ``name`` of ``kind``; an unknown name lists the available ones and the closest."""
        try:
            return self._entries[kind][name]
        except KeyError:
            available = self.names(kind)
            prefix = f"{where}: " if where else ""
            raise RecipeError(
                f"{prefix}unknown {kind} {name!r}{suggestion(str(name), available)}; "
                f"available: {', '.join(available) or 'none'}"
            ) from None

    def resolve(
        self,
        kind: str,
        spec: str | Mapping[str, Any],
        where: str,
        engine_keys: Iterable[str] = (),
    ) -> tuple[Entry, dict[str, Any]]:
        """Check ``spec`` against the factory's signature; return the entry and the checked kwargs.

        Args:
            kind: Part kind (``generator``, ``head``...).
            spec: ``"name"`` or ``{name: ..., **kwargs}`` from the recipe.
            where: Dotted recipe path of the spec, for messages.
            engine_keys: Keys of the spec that the engine reads itself (not passed to the factory).
        """
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping):
            raise RecipeError(f"{where}: expected a part name or a mapping with 'name', got {spec!r}")
        if "name" not in spec:
            raise RecipeError(f"{where}: missing 'name' (one of: {', '.join(self.names(kind))})")
        entry = self.get(kind, spec["name"], f"{where}.name")
        params = entry.parameters()
        hints = entry.annotations()
        context = CONTEXT_ARGS[kind]
        engine = set(engine_keys)
        settable = [p for p in params if p not in context]
        kwargs: dict[str, Any] = {}
        for key, value in spec.items():
            if not isinstance(key, str):
                raise RecipeError(
                    f"{where}: key {key!r} is not a name; quote it (YAML 1.1 reads on/yes/no as booleans)"
                )
            if key == "name" or key in engine:
                continue
            path = f"{where}.{key}"
            if key in context:
                raise RecipeError(f"{path}: {key!r} is set by the engine and cannot be given in a recipe")
            if key not in params:
                raise RecipeError(
                    f"{path}: unknown parameter of {kind} {entry.name!r}{suggestion(key, settable)}; "
                    f"parameters: {', '.join(settable) or 'none'}"
                )
            kwargs[key] = check_value(value, hints.get(key), path)
        missing = [
            n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
            and n not in context
        ]
        if missing:
            raise RecipeError(f"{where}: {kind} {entry.name!r} needs {', '.join(missing)}")
        return entry, kwargs

    def build(
        self,
        kind: str,
        spec: str | Mapping[str, Any],
        where: str,
        context: Mapping[str, Any] | None = None,
        engine_keys: Iterable[str] = (),
    ) -> Any:
        """Build a part from ``spec``; context values go to the factory where its signature names them."""
        entry, kwargs = self.resolve(kind, spec, where, engine_keys)
        params = entry.parameters()
        for key, value in (context or {}).items():
            if key in params:
                kwargs[key] = value
        try:
            return entry.factory(**kwargs)
        except RecipeError:
            raise
        except (UserError, ValueError, TypeError) as exc:
            raise RecipeError(f"{where}: {kind} {entry.name!r} rejected its arguments: {exc}") from exc
