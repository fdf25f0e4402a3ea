"""Plugin discovery (entry points) and the registry built from the plugins' registration hooks."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import pluggy

from lowdose_toolkit import hookspecs
from lowdose_toolkit.core.registry import Registry
from lowdose_toolkit.errors import PluginError
from lowdose_toolkit.parts import KINDS

STRICT_ENV = "LDT_STRICT_PLUGINS"
HOOKS: dict[str, str] = {kind: f"ldt_register_{kind}{'es' if kind.endswith('s') else 's'}" for kind in KINDS}


@dataclass(frozen=True)
class PluginFailure:
    """An entry point that could not be loaded."""

    name: str
    value: str
    reason: str

    def __str__(self) -> str:
        return f"plugin {self.name!r} ({self.value}) failed to load: {self.reason}"


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with our hook specs, plugin versions and the failures seen while loading."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.versions: dict[str, str] = {}
        self.failures: list[PluginFailure] = []

    def load_entry_points(self, strict: bool | None = None) -> None:
        """Load every entry point of our group, each in its own try.

        A failing plugin is recorded (name + reason) and reported once on stderr; the others still load.
        ``strict`` (default: env ``LDT_STRICT_PLUGINS=1``) makes the first failure a PluginError.
        """
        if strict is None:
            strict = os.environ.get(STRICT_ENV, "") not in ("", "0", "false", "no")
        seen: set[str] = set()
        for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if ep.name in seen:  # the same distribution seen twice on sys.path
                continue
            seen.add(ep.name)
            try:
                module = ep.load()
                if self.is_registered(module):
                    continue
                self.register(module, name=ep.name)
                self.check_hooks(ep.name)
            except Exception as exc:  # noqa: BLE001 - one broken plugin must not break the rest
                failure = PluginFailure(ep.name, ep.value, f"{type(exc).__name__}: {exc}")
                if strict:
                    raise PluginError(f"{failure} ({STRICT_ENV} is set)") from exc
                self.failures.append(failure)
                print(f"warning: {failure}; the other plugins are loaded", file=sys.stderr)
                continue
            dist = getattr(ep, "dist", None)
            self.versions[ep.name] = dist.version if dist is not None else "-"
        self.check_pending()  # every hook implementation left has a spec

    def check_hooks(self, name: str) -> None:
        """pluggy's ``check_pending`` for one plugin: a hook implementation without a spec (a misspelt
        ``ldt_register_head``) unregisters the plugin and raises a PluginError naming the hook."""
        plugin = self.get_plugin(name)
        unknown = sorted(hook for hook, caller in vars(self.hook).items() if not hook.startswith("_")
                         and not caller.has_spec()
                         and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()))
        if not unknown:
            return
        self.unregister(name=name)
        hint = "".join(f" (did you mean {m!r}?)" for hook in unknown for m in _close(hook))
        raise PluginError(f"plugin {name!r} implements unknown hook {', '.join(map(repr, unknown))}{hint}; "
                          f"the hooks are {', '.join(HOOKS.values())}")

    def build_registry(self) -> Registry:
        """Call every plugin's registration hooks and collect the parts, attributed to their plugin."""
        registry = Registry()
        for kind, hook_name in HOOKS.items():
            hook = getattr(self.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):  # registration order
                plugin = impl.plugin_name
                register = partial(
                    _register_one, registry, kind, plugin=plugin, version=self.versions.get(plugin, "-")
                )
                impl.function(register=register)
        return registry


def _close(name: str) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, list(HOOKS.values()), n=1)


def _register_one(registry: Registry, kind: str, name: str, factory: object, *, plugin: str, version: str) -> None:
    registry.add(kind, name, factory, plugin, version)  # type: ignore[arg-type]


_MANAGER: PluginManager | None = None
_REGISTRY: Registry | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, with entry points loaded on first use."""
    global _MANAGER
    if _MANAGER is None:
        manager = PluginManager()
        manager.load_entry_points()
        _MANAGER = manager
    return _MANAGER


def get_registry() -> Registry:
    """The process-wide registry (rebuilt after :func:`register_plugin` / :func:`reset`)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = get_plugin_manager().build_registry()
    return _REGISTRY


def register_plugin(plugin: ModuleType | object, name: str | None = None) -> str:
    """Register an in-process plugin object (tests, notebooks); returns its plugin name."""
    global _REGISTRY
    manager = get_plugin_manager()
    plugin_name = manager.register(plugin, name=name)
    if plugin_name is None:
        raise PluginError(f"plugin {name or plugin!r} is blocked or already registered")
    manager.check_hooks(plugin_name)
    _REGISTRY = None
    return plugin_name


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`."""
    global _REGISTRY
    get_plugin_manager().unregister(name=name)
    _REGISTRY = None


def reset() -> None:
    """Forget loaded plugins; the next call rediscovers entry points (tests that change sys.path)."""
    global _MANAGER, _REGISTRY
    _MANAGER = None
    _REGISTRY = None
    importlib.invalidate_caches()
