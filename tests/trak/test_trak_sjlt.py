"""``projection: sjlt``: the sparse JL transform's structure, its JL statistics, and TRAK through it.

Statistics are checked against the closed forms in ``attribution_trak.sjlt`` (unbiased inner
products; variance ``(‖u‖²‖v‖² + (uᵀv)² − 2Σu_i²v_i²)/k``) over 400 seeds: the mean within 4
standard errors, the sample variance within ±30 % of the formula (the sample variance of 400
draws has a relative standard error of ≈ √(2/400) = 7 %, so ±30 % is > 4σ).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from attribution_trak.projection import ProjectionCompressor
from trak_helpers import dense_fisher_influence, linear_gradients, lr_config, rel_err

from attribution_core import ConfigError, attribute


def sjlt(p: int, k: int = 64, s: int = 4, seed: int = 0) -> ProjectionCompressor:
    c = ProjectionCompressor(proj_dim=k, projection="sjlt", sjlt_nnz=s)
    c.fit(p, seed)
    return c


def dense(c: ProjectionCompressor) -> torch.Tensor:
    return c.matrix_blocks(torch.float64, torch.device("cpu"))[0][1]


def test_phi_has_one_signed_entry_per_block_in_every_row():
    p, k, s = 500, 64, 4
    phi = dense(sjlt(p, k, s, seed=3))
    assert phi.shape == (p, k)
    blocks = phi.reshape(p, s, k // s)
    assert torch.equal((blocks != 0).sum(-1), torch.ones(p, s, dtype=torch.long))
    assert torch.equal(phi[phi != 0].abs().unique(), torch.tensor([1 / math.sqrt(s)]).double())
    torch.testing.assert_close((phi**2).sum(1), torch.ones(p, dtype=torch.float64))


def test_compress_is_the_product_with_phi_and_seeded():
    G = torch.randn(7, 500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = sjlt(500, seed=3)
    torch.testing.assert_close(c.compress(G), G @ dense(c), rtol=1e-12, atol=1e-14)
    assert torch.equal(sjlt(500, seed=3).compress(G), c.compress(G))
    assert not torch.allclose(sjlt(500, seed=4).compress(G), c.compress(G))
    assert c.compress(G.float()).dtype == torch.float32
    assert c.describe()["projection"] == "sjlt" and c.describe()["sjlt_nnz"] == 4


def test_inner_products_unbiased_with_the_closed_form_variance():
    p, k, s, n_seeds = 300, 64, 4, 400
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(p, generator=gen, dtype=torch.float64)
    v = 0.5 * u + torch.randn(p, generator=gen, dtype=torch.float64)
    est = torch.tensor(
        [(lambda c: (c.compress(u[None]) @ c.compress(v[None]).T).item())(sjlt(p, k, s, seed))
         for seed in range(n_seeds)]
    )  # fmt: skip
    var = ((u @ u) * (v @ v) + (u @ v) ** 2 - 2 * (u**2 * v**2).sum()).item() / k
    assert abs(est.mean().item() - (u @ v).item()) < 4 * math.sqrt(var / n_seeds)
    assert 0.7 < est.var().item() / var < 1.3


def test_bad_configurations_are_refused():
    with pytest.raises(ConfigError, match="divide proj_dim 64"):
        ProjectionCompressor(proj_dim=64, projection="sjlt", sjlt_nnz=5)
    with pytest.raises(ConfigError, match="not one of traker's projection types"):
        ProjectionCompressor(proj_dim=128, projection="sjlt", backend="traker").fit(500, 0)
    with pytest.raises(ConfigError, match="projection: sjlt draws it elsewhere"):
        ProjectionCompressor(proj_dim=64, projection="sjlt", generator="cuda").fit(500, 0)


def test_trak_through_sjlt_equals_dense_fisher_influence_in_its_projected_space():
    """The pipeline with a sparse Φ equals the projected empirical-Fisher influence computed
    here from closed-form gradients and Φ materialised: ``(GΦ)(ΦᵀFΦ + λI)⁻¹(G_qΦ)ᵀ``."""
    lam = 1e-3
    method = {
        "name": "trak",
        "proj_dim": 8,
        "projection": "sjlt",
        "sjlt_nnz": 2,
        "damping": lam,
        "damping_mode": "absolute",
    }
    res = attribute(lr_config([method]))
    man = res.manifests["trak"]
    assert man["info"]["compressor"]["projection"] == "sjlt"
    G = linear_gradients(res.task, res.model, res.task.train_data())
    Gq = linear_gradients(res.task, res.model, res.queries)
    phi = dense(sjlt(G.shape[1], 8, 2, seed=man["seeds"]["method"])).numpy()
    ref = dense_fisher_influence(G @ phi, Gq @ phi, lam)
    assert rel_err(res.scores["trak"], ref) < 1e-8
    assert rel_err(res.scores["trak"], dense_fisher_influence(G, Gq, lam)) > 1e-6  # projected
    assert np.isfinite(res.scores["trak"]).all()
