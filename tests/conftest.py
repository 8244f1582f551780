"""Shared test configuration: one thread for bitwise repeatability, fresh registries."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def registry():
    """A fresh registry from the installed entry points (never a global)."""
    from attribution_core import get_registry

    return get_registry()
