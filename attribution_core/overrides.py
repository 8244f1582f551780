"""``--set KEY.PATH=VALUE`` overrides: parsing and applying them to a config mapping."""

from __future__ import annotations

from typing import Any

import yaml

from attribution_core.errors import ConfigError


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``"a.b.0.c=1e-3"`` -> (["a", "b", 0, "c"], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. methods.0.damping=1e-3")
    key, value = text.split("=", 1)
    if not key:
        raise ConfigError(f"--set {text!r}: empty key path")
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(
            f"--set {text!r}: the value is not valid YAML ({msg}); quote it, e.g. KEY='\"text\"'"
        ) from None
    if isinstance(parsed, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return path, parsed


def apply_override(data: dict[str, Any], path: list[str | int], value: Any) -> None:
    """Set ``data[path] = value``, creating dicts on the way; a string method entry becomes a dict."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(
                    f"--set {'.'.join(map(str, path))}: index {part} out of range "
                    f"(list has {len(node)} entries)"
                )
            if isinstance(node[part], str):
                node[part] = {"name": node[part]}
            node = node[part]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if isinstance(nxt, int) else {}
        elif isinstance(node[part], str) and not isinstance(nxt, int):
            node[part] = {"name": node[part]}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise ConfigError(f"--set {'.'.join(map(str, path))}: index out of range")
    node[last] = value
