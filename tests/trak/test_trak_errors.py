"""Acceptance 4: clear one-line errors (ConfigError / NumericalError, CLI exit code 2)."""

from __future__ import annotations

import pytest
import torch
import yaml
from attribution_trak.fisher import ProjectedFisher
from attribution_trak.projection import ProjectionCompressor
from trak_helpers import lr_config
from typer.testing import CliRunner

from attribution_core import ConfigError, NumericalError, attribute
from attribution_core.cli import app
from attribution_core.interfaces import FitInputs
from attribution_core.testing import MatrixStream


@pytest.mark.parametrize("k", [0, -3])
def test_proj_dim_not_positive(k):
    with pytest.raises(ConfigError, match=r"methods\[0\]\.proj_dim: .*greater than or equal to 1"):
        attribute(lr_config([{"name": "trak", "proj_dim": k}]))


def test_proj_dim_not_positive_direct():
    with pytest.raises(ConfigError, match=r"proj_dim: 0 is not a positive dimension"):
        ProjectionCompressor(proj_dim=0)


def test_proj_dim_too_large_for_memory_fisher():
    """k = 20000 needs a 3 GiB k×k Fisher > the default max_memory_mb = 2048: refused when the
    config is resolved, before the model is trained."""
    from attribution_core.config import load_config
    from attribution_core.pipeline import resolve

    cfg = load_config(lr_config([{"name": "trak", "proj_dim": 20000}]))
    with pytest.raises(ConfigError, match=r"proj_dim=20000 needs a 20000×20000 float64 projected"):
        resolve(cfg)


def test_fisher_memory_checked_again_at_fit():
    fisher = ProjectedFisher(max_memory_mb=0.001)
    with pytest.raises(ConfigError, match=r"proj_dim: 40 needs a 40×40 float64 Fisher"):
        fisher.fit(FitInputs(None, None, None, 0, {}, MatrixStream(torch.randn(3, 40))))


def test_proj_dim_too_large_for_memory_orthogonal():
    c = ProjectionCompressor(proj_dim=4000, projection="orthogonal", max_memory_mb=1.0)
    with pytest.raises(ConfigError, match=r"needs the whole \(5000, 4000\) orthogonal matrix"):
        c.fit(5000, 0)


def test_orthogonal_needs_k_at_most_p():
    with pytest.raises(ConfigError, match=r"proj_dim: 6 > n_params 5; an orthogonal projection"):
        attribute(lr_config([{"name": "trak", "proj_dim": 6, "projection": "orthogonal"}]))


def test_unknown_substitution_lists_valid_ones():
    entry = {"name": "d-trak", "train_function": "cube-norm"}
    with pytest.raises(
        ConfigError, match=r"methods\[0\]\.train_function: unknown measurement 'cube-norm'; valid"
    ) as err:
        attribute(lr_config([entry]))
    assert "mse" in str(err.value)


def test_unknown_projection_type():
    with pytest.raises(
        ConfigError, match=r"projection: .*'gaussian', 'rademacher', 'orthogonal' or 'sjlt'"
    ):
        attribute(lr_config([{"name": "trak", "projection": "sparse"}]))


def test_zero_damping_with_singular_fisher_is_refused():
    """N = 30 < k = 64: F has rank ≤ 30; λ = 0 would divide by zero eigenvalues."""
    entry = {"name": "trak", "proj_dim": 64, "damping": 0.0, "damping_mode": "absolute"}
    with pytest.raises(
        NumericalError, match=r"damping: 0 with N=30 training examples < proj_dim=64"
    ):
        attribute(lr_config([entry]))


def test_zero_relative_damping_with_singular_fisher_is_refused():
    entry = {"name": "trak", "proj_dim": 64, "damping": 0.0}
    with pytest.raises(NumericalError, match=r"leaves the projected Fisher singular"):
        attribute(lr_config([entry]))


def test_zero_damping_full_rank_is_allowed():
    """N = 30 ≥ k = 5 and full rank: λ = 0 is a valid (exact) inverse."""
    res = attribute(
        lr_config([{"name": "trak", "proj_dim": 5, "damping": 0.0, "damping_mode": "absolute"}])
    )
    assert res.manifests["trak"]["info"]["curvature"]["damping"] == 0.0


def test_solve_checks_width():
    fisher = ProjectedFisher(damping=1.0, damping_mode="absolute")
    curv = fisher.fit(FitInputs(None, None, None, 0, {}, MatrixStream(torch.randn(3, 4))))
    with pytest.raises(
        ValueError, match=r"projected gradients mismatch: expected \(n, 4\), got \(2, 5\)"
    ):
        curv.solve(torch.randn(2, 5))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "trak", "proj_dim": 0}, "proj_dim"),
        ({"name": "trak", "proj_dim": 64, "damping": 0.0, "damping_mode": "absolute"}, "singular"),
        ({"name": "d-trak", "query_function": "cube-norm"}, "unknown measurement 'cube-norm'"),
    ],
)
def test_cli_exit_code_two(tmp_path, entry, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(lr_config([entry])))
    result = CliRunner().invoke(app, ["attribute", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output
