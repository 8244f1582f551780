"""Builtin compressors, Hessians, executors and config overrides."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from attribution_core import ConfigError
from attribution_core.builtin import executors
from attribution_core.builtin.compressors import Int8Compression
from attribution_core.builtin.hessians import DenseCurvature
from attribution_core.config import load_config
from attribution_core.errors import NumericalError


def test_int8_is_symmetric_absmax_per_row_and_tensor():
    torch.manual_seed(0)
    G = torch.randn(4, 30, dtype=torch.float64)
    G[:, 10:] *= 1e-3  # second tensor much smaller: its own scale keeps its precision
    comp = Int8Compression()
    comp.fit(30, seed=0, layout=[("a", 10), ("b", 20)])
    Q = comp.compress(G)
    for a, b in ((0, 10), (10, 30)):
        scale = G[:, a:b].abs().amax(1, keepdim=True) / 127
        codes = Q[:, a:b] / scale
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)  # integer codes
        assert codes.abs().max() <= 127 + 1e-9
        assert ((Q[:, a:b] - G[:, a:b]).abs() <= scale / 2 + 1e-15).all()  # round-to-nearest
    with pytest.raises(ValueError, match="layout mismatch"):
        comp.fit(31, seed=0, layout=[("a", 10), ("b", 20)])


def test_dense_curvature_solves_and_refuses_indefinite():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    c = DenseCurvature(A, damping=0.1, what="hessian")
    G = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    expected = torch.linalg.solve(A + 0.1 * torch.eye(2, dtype=torch.float64), G.T).T
    torch.testing.assert_close(c.solve(G), expected, rtol=1e-12, atol=0)
    with pytest.raises(NumericalError, match="not positive definite.*smallest eigenvalue"):
        DenseCurvature(torch.tensor([[1.0, 0.0], [0.0, -1.0]]), damping=0.0, what="hessian")


BASE = {"task": {"name": "linear-regression"}, "methods": ["grad-dot", {"name": "dense-influence"}]}


def test_set_overrides_nested_and_list_entries():
    cfg = load_config(
        BASE, ["methods.1.damping=1e-3", "task.dim=4", "methods.0.label=gd", "seed=3"]
    )
    assert cfg.methods[1].model_extra["damping"] == 1e-3
    assert cfg.task.model_extra["dim"] == 4
    assert cfg.methods[0].label == "gd" and cfg.seed == 3


def test_set_rejects_bad_syntax_and_ranges():
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(BASE, ["seed"])
    with pytest.raises(ConfigError, match="index 5 out of range"):
        load_config(BASE, ["methods.5.damping=1"])
    with pytest.raises(
        ConfigError, match="evaluation.lds.kept_fraction: Input should be less than 1"
    ):
        load_config(BASE, ["evaluation.lds.kept_fraction=1.5"])


def test_make_executor_builds_the_named_executor(registry):
    base = {"task": {"name": "linear-regression"}, "methods": ["grad-dot"]}
    local = executors.make_executor(load_config(base), registry)
    assert isinstance(local, executors.LocalExecutor)
    assert list(local.map(abs, [-3, 4])) == [(0, 3), (1, 4)]
    ray = executors.make_executor(
        load_config({**base, "executor": {"name": "ray", "num_cpus": 2}}), registry
    )
    assert isinstance(ray, executors.RayExecutor) and ray.num_cpus == 2  # Ray not started yet
    with pytest.raises(ConfigError, match="cpus_per_task"):
        executors.make_executor(
            load_config({**base, "executor": {"name": "ray", "cpus_per_task": 0}}), registry
        )


def test_executors_module_imports_no_registry_or_config_at_run_time():
    """``builtin`` registers the executors: importing the registry there would be a cycle."""
    tree = ast.parse(Path(executors.__file__).read_text())
    imported = {
        node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"attribution_core.registry", "attribution_core.config"}, imported
