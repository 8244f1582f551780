"""What a manifest records about the software that produced it."""

from __future__ import annotations

import platform
import re
from importlib import metadata

import numpy as np
import torch

from attribution_core.registry import Registry


def versions(registry: Registry | None = None) -> dict[str, str]:
    """Versions of Python, torch, numpy, this package, each loaded plugin's distribution and
    every installed package those distributions require (recorded in manifests)."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    dists = {"attribution-framework"}
    if registry is not None:
        dists |= {p["distribution"] for p in registry.plugin_info() if p["distribution"]}
    for dist in sorted(dists):
        for name in [dist, *_requirements(dist)]:
            try:
                out.setdefault(name, metadata.version(name))
            except metadata.PackageNotFoundError:
                pass
    return out


def _requirements(dist: str) -> list[str]:
    """Names of the distributions ``dist`` requires (extras included)."""
    try:
        reqs = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    return [m.group(0) for r in reqs if (m := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r))]
