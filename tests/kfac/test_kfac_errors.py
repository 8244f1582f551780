"""Acceptance 4: clear errors (one ``pytest.raises(match=...)`` per bad input; CLI exit 2)."""

from __future__ import annotations

import pytest
import torch
import yaml
from attribution_kfac.ggn_cg import GGNCGHessian
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from kfac_toys import ToyTask, fit, inputs
from torch import nn
from typer.testing import CliRunner

from attribution_core import ConfigError, NumericalError
from attribution_core.cli import app


@pytest.mark.parametrize("name", ["kfac", "ekfac", "ggn-cg"])
def test_negative_damping(registry, name):
    with pytest.raises(ConfigError, match="damping"):
        registry.validate_options("hessian", name, {"damping": -1.0})


def test_negative_damping_cli_exit_2(tmp_path):
    cfg = {
        "task": {"name": "linear-regression", "n_train": 20, "dim": 3},
        "methods": [{"name": "kfac-influence", "damping": -1.0}],
        "queries": {"source": "train", "count": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["attribute", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "damping" in result.output


def test_forward_only_with_ekfac(registry):
    with pytest.raises(ConfigError, match="forward-only.*not supported by ekfac"):
        registry.validate_options("hessian", "ekfac", {"fisher": "forward-only"})
    # kfac accepts it
    registry.validate_options("hessian", "kfac", {"fisher": "forward-only"})


def test_factored_damping_with_ekfac(registry):
    with pytest.raises(ConfigError, match="factored.*not supported by ekfac"):
        registry.validate_options("hessian", "ekfac", {"damping_kind": "factored"})


def test_mc_samples_only_for_mc(registry):
    with pytest.raises(ConfigError, match="mc_samples=4 only applies to fisher 'mc'"):
        registry.validate_options("hessian", "kfac", {"fisher": "type-2", "mc_samples": 4})


def test_unknown_fisher(registry):
    with pytest.raises(ConfigError, match="fisher"):
        registry.validate_options("hessian", "kfac", {"fisher": "exact"})


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian])
def test_zero_damping_singular_factor_names_layer(cls):
    x = inputs(30, (4,))
    x[:, 0] = 0.0  # a dead input feature: the input covariance A is singular
    task = ToyTask(lambda: nn.Sequential(nn.Linear(4, 3)), x, l2=0.0)
    with pytest.raises(NumericalError, match=r"damping: 0 .* layer '0' has singular"):
        fit(cls(fisher="type-2", damping=0.0), task)
    fit(cls(fisher="type-2", damping=1e-6), task)  # any positive damping works


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, 3, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian, GGNCGHessian])
def test_model_without_linear_or_conv(cls):
    task = ToyTask(NoLinear, inputs(10, (4,)))
    with pytest.raises(ConfigError, match="no Linear/Conv2d parameters"):
        fit(cls(), task)


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian])
def test_nan_factor_names_layer(cls, mlp_task):
    model = mlp_task.build_model(0)
    with torch.no_grad():
        model[2].bias[0] = float("nan")  # layer 2's output, hence every G factor, is NaN
    with pytest.raises(NumericalError, match=r"non-finite .* layer '0' \(gradient covariance G"):
        fit(cls(fisher="type-2"), mlp_task, model=model)
    with pytest.raises(NumericalError, match=r"'2' \(gradient covariance G: 9 entries\)"):
        fit(cls(fisher="type-2"), mlp_task, model=model)


def test_task_without_curvature_problem(registry):
    class Plain(ToyTask):
        def curvature_problem(self, model, seed, n_samples):
            raise NotImplementedError

    task = Plain(lambda: nn.Linear(4, 2), inputs(10, (4,)), n_out=2)
    with pytest.raises(ConfigError, match="does not expose a curvature problem"):
        fit(KFACHessian(), task)


def test_ggn_cg_zero_damping_singular():
    x = inputs(30, (4,))
    x[:, 0] = 0.0
    task = ToyTask(lambda: nn.Linear(4, 3), x)
    _, _params, curv = fit(GGNCGHessian(damping=0.0, maxiter=50), task)
    # a right-hand side with a component in the null space (dead feature) cannot be solved
    G = torch.zeros(1, curv.n_params, dtype=torch.float64)
    G[0, 0] = 1.0
    with pytest.raises(NumericalError, match="not positive definite .* set damping > 0"):
        curv.solve(G)
