"""Plugin manager and component registry.

``get_registry()`` builds a fresh :class:`Registry` every call (never an import-time global):
``add_hookspecs`` → load the ``builtin`` entry point → load the other ``attribution_core`` entry
points → register any explicitly passed plugins → ``check_pending()`` → collect components by
calling ``attribution_register_components`` through pluggy, once per plugin.

Environment variables:
    ATTRIBUTION_LOAD_PLUGINS: comma-separated allow-list of entry-point names to load
        (``builtin`` is always loaded).
    ATTRIBUTION_TRACE_PLUGINS: if set, print every hook call to stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from pydantic import BaseModel

from attribution_core import hookspecs
from attribution_core.config import validate_model
from attribution_core.errors import ConfigError

ENTRY_POINT_GROUP = "attribution_core"
BUILTIN = "builtin"
"""Entry-point name of :mod:`attribution_core.builtin`: always loaded, even with
``entry_points=False`` or an allow-list that omits it."""
REGISTER_HOOK = "attribution_register_components"
KINDS = ("task", "measurement", "hessian", "compressor", "scorer", "method", "executor")
"""Component kinds. Factories: task(**opts); measurement(task, **opts); hessian(**opts);
compressor(**opts); scorer(method: ResolvedMethod); method: a ``MethodPreset`` (not called);
executor(**opts)."""


@dataclass(frozen=True)
class Component:
    """One registered component.

    Attributes:
        kind: one of :data:`KINDS`.
        name: unique within its kind (``"kfac"``, ``"kfac-influence"``, ``"loss"``).
        factory: builds the component (signature per kind, see :data:`KINDS`); for
            ``kind == "method"`` a :class:`attribution_core.methods.MethodPreset`.
        help: one line shown by ``attribution list``.
        options: pydantic model of the factory's keyword options (``extra="forbid"``), or None.
        plugin: name of the plugin that registered it (filled in by the registry).
    """

    kind: str
    name: str
    factory: Any
    help: str
    options: type[BaseModel] | None = None
    plugin: str = field(default="", compare=False)


class Registry:
    """Components by kind and name, collected from a plugin manager."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._components: dict[tuple[str, str], Component] = {}
        for plugin, components in _components_by_plugin(pm):
            plugin_name = pm.get_name(plugin) or repr(plugin)
            for comp in components:
                self._add(comp, plugin_name)

    def _add(self, comp: Component, plugin_name: str) -> None:
        if comp.kind not in KINDS:
            raise ConfigError(
                f"plugin {plugin_name!r} registered {comp.name!r} with unknown kind "
                f"{comp.kind!r}; valid kinds: {', '.join(KINDS)}"
            )
        key = (comp.kind, comp.name)
        if key in self._components:
            other = self._components[key].plugin
            raise ConfigError(
                f"duplicate {comp.kind} name {comp.name!r}: registered by both plugin "
                f"{other!r} and plugin {plugin_name!r}; rename one or block it with "
                f"ATTRIBUTION_LOAD_PLUGINS"
            )
        object.__setattr__(comp, "plugin", plugin_name)
        self._components[key] = comp

    # ---- lookup ------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(n for k, n in self._components if k == kind)

    def get(self, kind: str, name: str, *, where: str = "") -> Component:
        """The component ``(kind, name)``.

        Raises:
            ConfigError: unknown name; the message lists the valid names of that kind.
        """
        try:
            return self._components[(kind, name)]
        except KeyError:
            valid = ", ".join(self.names(kind)) or "(none registered)"
            at = f"{where}: " if where else ""
            raise ConfigError(f"{at}unknown {kind} {name!r}; valid {kind}s: {valid}") from None

    def components(self, kind: str | None = None) -> list[Component]:
        """All components (of ``kind``), sorted by kind then name."""
        comps = [c for c in self._components.values() if kind is None or c.kind == kind]
        return sorted(comps, key=lambda c: (KINDS.index(c.kind), c.name))

    def validate_options(
        self, kind: str, name: str, options: dict[str, Any], *, where: str = ""
    ) -> dict[str, Any]:
        """Validate ``options`` against the component's options model; returns the full dict."""
        comp = self.get(kind, name, where=where)
        if comp.options is None:
            if options:
                raise ConfigError(
                    f"{where or name}: {kind} {name!r} takes no options, got {sorted(options)}"
                )
            return {}
        return validate_model(comp.options, options, where=where or f"{kind} {name!r}").model_dump()

    def create(self, kind: str, name: str, /, *args: Any, where: str = "", **options: Any) -> Any:
        """Validate options and call the factory: ``factory(*args, **options)``."""
        comp = self.get(kind, name, where=where)
        opts = self.validate_options(kind, name, options, where=where)
        return comp.factory(*args, **opts)

    def plugin_info(self) -> list[dict[str, Any]]:
        """Name, distribution, version and component count of every loaded plugin."""
        dist_of = {p: d for p, d in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in self.pm.list_name_plugin():
            dist = dist_of.get(plugin)
            out.append(
                {
                    "plugin": name,
                    "distribution": dist.project_name if dist else None,
                    "version": dist.version if dist else None,
                    "components": sum(1 for c in self._components.values() if c.plugin == name),
                }
            )
        return out


def _components_by_plugin(pm: pluggy.PluginManager) -> Iterator[tuple[Any, list[Component]]]:
    """``(plugin, its components)`` for every plugin implementing :data:`REGISTER_HOOK`.

    The hook is called through pluggy (a subset hook caller limited to one plugin), never by
    calling the implementation directly, so tracing (``ATTRIBUTION_TRACE_PLUGINS``) and call
    monitoring see every call while each component keeps the name of the plugin that returned
    it. Plugins come in registration order (builtins first).
    """
    plugins = [impl.plugin for impl in getattr(pm.hook, REGISTER_HOOK).get_hookimpls()]
    for plugin in plugins:
        others = [p for p in plugins if p is not plugin]
        for components in pm.subset_hook_caller(REGISTER_HOOK, remove_plugins=others)():
            yield plugin, components


def _allowed(name: str) -> bool:
    allow = os.environ.get("ATTRIBUTION_LOAD_PLUGINS")
    if not allow or name == BUILTIN:
        return True
    return name in {s.strip() for s in allow.split(",")}


def _load_builtin(pm: pluggy.PluginManager) -> None:
    """Register :mod:`attribution_core.builtin` through its entry point, like any plugin.

    Raises:
        ConfigError: the entry point is missing (the distribution is not installed).
    """
    if not metadata.entry_points(group=ENTRY_POINT_GROUP, name=BUILTIN):
        raise ConfigError(
            f"entry point {BUILTIN!r} of group {ENTRY_POINT_GROUP!r}: not found — the "
            f"attribution-framework distribution is not installed in this environment "
            f"({sys.executable}), so no builtin components can load — expected it to declare "
            f'{BUILTIN} = "attribution_core.builtin" — run `pip install -e .` in the '
            f"repository root"
        )
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=BUILTIN)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Load the other entry points of the group (allow-list applied); a failure names the plugin."""
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name) or not _allowed(ep.name):
            continue
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must name itself
            raise ConfigError(
                f"plugin {ep.name!r} (entry point {ep.value!r}) failed to load: {exc}"
            ) from exc


def get_plugin_manager(
    plugins: Iterable[Any] = (), *, entry_points: bool = True
) -> pluggy.PluginManager:
    """A fresh plugin manager: specs, entry points (filtered by the allow-list), ``plugins``.

    Args:
        plugins: extra plugin objects/modules to register (tests, notebooks).
        entry_points: load the whole ``attribution_core`` entry-point group. If False, only
            its ``builtin`` entry point and ``plugins`` are registered.

    Raises:
        ConfigError: the ``builtin`` entry point is missing, or a plugin failed to load.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    _load_builtin(pm)
    if entry_points:
        _load_entry_points(pm)
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if not pm.is_registered(plugin):
            pm.register(plugin, name=name)
    pm.check_pending()
    if os.environ.get("ATTRIBUTION_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda s: sys.stderr.write(s))
        pm.enable_tracing()
    return pm


def get_registry(plugins: Iterable[Any] = (), *, entry_points: bool = True) -> Registry:
    """A fresh :class:`Registry` (see :func:`get_plugin_manager`)."""
    return Registry(get_plugin_manager(plugins, entry_points=entry_points))
