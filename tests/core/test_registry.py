"""Registry: fresh managers, entry points, duplicates, unknown names, allow-list, typo'd hooks,
tracing."""

from __future__ import annotations

from importlib import metadata

import pluggy
import pytest

from attribution_core import Component, ConfigError, MethodPreset, hookimpl
from attribution_core.registry import get_plugin_manager, get_registry


class Dup:
    @hookimpl
    def attribution_register_components(self):
        return [Component("method", "grad-dot", MethodPreset("grad-dot", "influence"), "dup")]


class BadKind:
    @hookimpl
    def attribution_register_components(self):
        return [Component("widget", "w", object, "?")]


class Extra:
    @hookimpl
    def attribution_register_components(self):
        return [Component("method", "extra-dot", MethodPreset("extra-dot", "influence"), "x")]


class Typo:
    @hookimpl
    def attribution_register_component(self):  # missing "s": no such hook
        return []


def test_fresh_registry_each_call():
    a, b = get_registry(), get_registry()
    assert a is not b and a.pm is not b.pm
    assert "builtin" in dict(a.pm.list_name_plugin())


def test_first_party_plugins_come_from_entry_points(registry):
    plugins = {c.plugin for c in registry.components()}
    assert {"builtin", "supervised"} <= plugins
    info = {p["plugin"]: p for p in registry.plugin_info()}
    assert info["supervised"]["distribution"] == "attribution-framework"


def test_duplicate_names_error_names_both_plugins():
    with pytest.raises(ConfigError, match=r"duplicate method name 'grad-dot'.*'builtin'.*'Dup'"):
        get_registry([Dup()])


def test_unknown_kind():
    with pytest.raises(ConfigError, match="unknown kind 'widget'; valid kinds: task"):
        get_registry([BadKind()])


def test_typo_hook_is_rejected():
    with pytest.raises(pluggy.PluginValidationError, match="attribution_register_component"):
        get_plugin_manager([Typo()])


def test_unknown_name_lists_valid(registry):
    with pytest.raises(ConfigError, match=r"unknown hessian 'kfak'; valid hessians: .*dense"):
        registry.get("hessian", "kfak")


def test_allow_list_blocks_other_plugins(monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_LOAD_PLUGINS", "builtin")
    reg = get_registry()
    assert {c.plugin for c in reg.components()} == {"builtin"}


def test_entry_points_off_keeps_builtins():
    reg = get_registry(entry_points=False)
    assert "grad-dot" in reg.names("method") and "linear-regression" not in reg.names("task")


def test_builtin_comes_from_its_entry_point_without_the_others():
    info = {p["plugin"]: p for p in get_registry(entry_points=False).plugin_info()}
    assert set(info) == {"builtin"}
    assert info["builtin"]["distribution"] == "attribution-framework"  # loaded as an entry point


def test_missing_builtin_entry_point_says_how_to_install(monkeypatch):
    monkeypatch.setattr(metadata, "entry_points", lambda **selection: [])
    with pytest.raises(ConfigError, match=r"entry point 'builtin'.*not found.*pip install -e \."):
        get_plugin_manager(entry_points=False)


def test_components_keep_their_plugin_name():
    reg = get_registry([Extra()], entry_points=False)
    assert reg.get("method", "extra-dot").plugin == "Extra"
    assert reg.get("method", "grad-dot").plugin == "builtin"


def test_registration_hook_is_traced(monkeypatch, capsys):
    """The registry calls the hook through pluggy, so ATTRIBUTION_TRACE_PLUGINS sees each call."""
    monkeypatch.setenv("ATTRIBUTION_TRACE_PLUGINS", "1")
    get_registry([Extra()], entry_points=False)
    err = capsys.readouterr().err
    calls = [line for line in err.splitlines() if line.strip().startswith("attribution_register_")]
    assert len(calls) == 2, err  # one per implementing plugin: builtin, Extra
    assert all("attribution_register_components [hook]" in line for line in calls), err


def test_options_are_validated(registry):
    with pytest.raises(ConfigError, match="damping"):
        registry.create("hessian", "dense", damping=-1.0)
    with pytest.raises(ConfigError, match="takes no options"):
        registry.create("compressor", "none", foo=1)


def test_every_hookspec_is_documented_and_tested():
    """Meta-test (datasette style): each hook appears in the docs and in a test."""
    from pathlib import Path

    from attribution_core import hookspecs

    root = Path(__file__).resolve().parents[2]
    docs = "".join(p.read_text() for p in (root / "docs").rglob("*.md"))
    tests = "".join(p.read_text() for p in (root / "tests").rglob("*.py"))
    hooks = [n for n in dir(hookspecs) if n.startswith("attribution_")]
    assert hooks
    for name in hooks:
        assert name in docs, f"hook {name} is not documented under docs/"
        assert f"def {name}" in tests, f"hook {name} has no implementation in a test"
