"""Pluggy hook specifications — the only way components reach the registry.

Every plugin, first-party or third-party (and ``attribution_core.builtin`` itself), is a module
or object with ``@hookimpl`` functions, announced through the ``attribution_core`` entry-point
group. Hooks are called by keyword; an implementation may accept a subset of the arguments.

Lifecycle sections:

1. Registration — :func:`attribution_register_components` (called through ``pm.hook`` once per
   implementing plugin when a registry is built, so ``ATTRIBUTION_TRACE_PLUGINS`` traces it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

PROJECT = "attribution_core"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

if TYPE_CHECKING:
    from attribution_core.registry import Component


# ---- 1. registration -------------------------------------------------------------------------
@hookspec
def attribution_register_components() -> list[Component]:
    """Return the components this plugin provides.

    Returns:
        A list of :class:`attribution_core.registry.Component` — each a ``(kind, name, factory,
        help, options)`` record. ``kind`` is one of :data:`attribution_core.registry.KINDS`.
        Names are unique per kind across all loaded plugins; a duplicate is an error naming both
        plugins. Results of all plugins are collected (not ``firstresult``).
    """
