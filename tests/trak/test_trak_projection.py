"""The ``projection`` compressor: JL moments, seeding, blocking, back-ends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from attribution_trak.projection import _SHARED_PHI, ProjectionCompressor


def fitted(p: int, seed: int = 0, **opts) -> ProjectionCompressor:
    c = ProjectionCompressor(**opts)
    c.fit(p, seed)
    return c


def matrix(c: ProjectionCompressor, p: int, dtype=torch.float64) -> torch.Tensor:
    """Φ itself: compress the identity, ``(p, k)``."""
    return c.compress(torch.eye(p, dtype=dtype))


@pytest.mark.parametrize("backend", ["torch", "traker"])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_entries_have_variance_one_over_k(backend, kind):
    p, k = 300, 200
    c = fitted(p, proj_dim=k, projection=kind, backend=backend)
    assert c.describe()["resolved_backend"] == backend
    M = matrix(c, p).numpy() * math.sqrt(k)  # unit-variance entries
    # 60 000 entries: the sample mean has std 1/245 and the variance ~0.006 (Gaussian) -> 5σ bounds
    assert abs(M.mean()) < 5 / math.sqrt(M.size)
    assert abs(M.var() - 1) < 0.03
    if kind == "rademacher":
        assert set(np.unique(M).round(12)) == {-1.0, 1.0}


def _gradient_pairs(n_pairs: int, p: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Correlated vectors with different norms (the structure of real gradient pairs)."""
    gen = torch.Generator().manual_seed(123)
    out = []
    for i in range(n_pairs):
        u = torch.randn(p, generator=gen, dtype=torch.float64) * (1 + i)
        v = 0.6 * u + torch.randn(p, generator=gen, dtype=torch.float64)
        out.append((u, v))
    return out


@pytest.mark.parametrize("backend", ["torch", "traker"])
def test_jl_inner_product_deviation_is_within_four_sigma(backend):
    """Var[(Φᵀu)ᵀ(Φᵀv)] = (‖u‖²‖v‖² + (uᵀv)²)/k for N(0, 1/k) entries: |z| ≤ 4 per pair."""
    p, k = 2000, 256
    c = fitted(p, seed=7, proj_dim=k, backend=backend)
    for u, v in _gradient_pairs(6, p):
        U, V = c.compress(torch.stack([u, v]))
        observed = float(U @ V)
        exact = float(u @ v)
        sd = math.sqrt((float(u @ u) * float(v @ v) + exact**2) / k)
        z = (observed - exact) / sd
        assert abs(z) <= 4, f"z = {z:.2f}"


def test_jl_variance_formula_over_seeds():
    """Across 200 seeds the standardised deviations have mean ≈ 0 and variance ≈ 1."""
    p, k, m = 500, 64, 200
    ((u, v),) = _gradient_pairs(1, p)
    exact = float(u @ v)
    sd = math.sqrt((float(u @ u) * float(v @ v) + exact**2) / k)
    z = []
    for s in range(m):
        U, V = fitted(p, seed=s, proj_dim=k).compress(torch.stack([u, v]))
        z.append((float(U @ V) - exact) / sd)
    z = np.array(z)
    assert abs(z.mean()) < 4 / math.sqrt(m)
    # sample variance of 200 ~unit-variance values: std ≈ 0.1 (heavier tails allowed) -> [0.6, 1.5]
    assert 0.6 < z.var() < 1.5


def test_same_seed_same_bits_other_seed_other_matrix():
    G = torch.randn(5, 400, generator=torch.Generator().manual_seed(0))
    a = fitted(400, seed=3, proj_dim=128).compress(G)
    b = fitted(400, seed=3, proj_dim=128).compress(G)
    c = fitted(400, seed=4, proj_dim=128).compress(G)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_blocks_cached_and_streamed_give_the_same_bits():
    """Small blocks (many per-block seeds), cached vs regenerated every call: the same Φ, bit
    for bit; the projections agree to float64 round-off (the cached Φ is one GEMM, the streamed
    one a sum of per-block GEMMs: only the summation order differs, hence rtol 1e-12)."""
    p, k = 1000, 64
    cpu = torch.device("cpu")
    G = torch.randn(4, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cached = fitted(p, proj_dim=k, block_mb=0.05)  # 0.05 MiB -> 102 rows per block
    streamed = fitted(p, proj_dim=k, block_mb=0.05, max_memory_mb=0.1)  # Φ (0.5 MiB) not kept
    kept = cached.matrix_blocks(torch.float64, cpu)
    assert len(kept) == 10
    a = cached.compress(G)
    assert cached._phi_key(torch.float64, cpu) in _SHARED_PHI  # kept for reuse
    _SHARED_PHI.clear()
    regenerated = streamed.matrix_blocks(torch.float64, cpu)
    b = streamed.compress(G)
    assert not _SHARED_PHI  # streamed blocks are dropped after use
    for (s1, m1), (s2, m2) in zip(kept, regenerated, strict=True):
        assert s1 == s2 and torch.equal(m1, m2)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.equal(a, cached.compress(G))


def test_rows_are_projected_independently():
    """Chunking over examples does not change the projection (up to matmul rounding)."""
    p = 300
    G = torch.randn(10, p, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c = fitted(p, proj_dim=50)
    whole = c.compress(G)
    parts = torch.cat([c.compress(G[:3]), c.compress(G[3:])])
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-12)


def test_orthogonal_is_a_rotation_when_k_equals_p():
    p = 40
    c = fitted(p, proj_dim=p, projection="orthogonal")
    Phi = matrix(c, p)
    torch.testing.assert_close(Phi @ Phi.T, torch.eye(p, dtype=torch.float64), rtol=0, atol=1e-12)


def test_traker_with_small_proj_dim_resolves_to_torch_and_says_why():
    """traker 0.3.x BasicProjector with proj_dim ≤ 100 crashes after free_memory(): use torch."""
    c = fitted(500, proj_dim=50, backend="traker")
    d = c.describe()
    assert d["backend"] == "traker" and d["resolved_backend"] == "torch"
    assert "≤ 100" in d["backend_note"]
    out = c.compress(torch.randn(3, 500))
    assert out.shape == (3, 50)


def test_traker_backend_matches_basic_projector_scaled():
    """backend traker is BasicProjector's N(0, 1) sketch divided by √k (same seed)."""
    from trak.projectors import BasicProjector, ProjectionType

    p, k = 300, 150
    G = torch.randn(4, p, generator=torch.Generator().manual_seed(5))
    ours = fitted(p, seed=9, proj_dim=k, backend="traker").compress(G)
    ref = BasicProjector(p, k, 9, ProjectionType.normal, "cpu").project(G, model_id=0)
    torch.testing.assert_close(ours, ref / math.sqrt(k), rtol=0, atol=0)


def test_phi_is_shared_between_compressors_with_the_same_identity():
    """trak and d-trak in one run reuse one Φ (one entry held); another seed replaces it."""
    p = 200
    G = torch.randn(2, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, b = fitted(p, seed=1, proj_dim=32), fitted(p, seed=1, proj_dim=32)
    ya = a.compress(G)
    held = _SHARED_PHI[a._phi_key(torch.float64, torch.device("cpu"))]
    assert torch.equal(b.compress(G), ya)
    assert _SHARED_PHI[b._phi_key(torch.float64, torch.device("cpu"))] is held
    fitted(p, seed=2, proj_dim=32).compress(G)
    assert len(_SHARED_PHI) == 1
    assert torch.equal(a.compress(G), ya)  # regenerated from its per-block seeds


def test_preferred_rows_follow_the_memory_budget():
    """Group size = batch_mb of float32 rows; max_memory_mb when Φ is regenerated per call."""
    kept = fitted(1000, proj_dim=64, batch_mb=0.04)  # Φ 0.25 MiB fits the default budget
    assert kept.preferred_rows() == int(0.04 * 2**20 // 4000)
    streamed = fitted(1000, proj_dim=64, batch_mb=0.04, max_memory_mb=0.1)
    assert streamed.preferred_rows() == int(0.1 * 2**20 // 4000)
    assert fitted(1000, proj_dim=64, batch_mb=0).preferred_rows() == 0
    assert ProjectionCompressor().preferred_rows() == 0  # before fit


# ---- generator: cpu (default) / cuda ---------------------------------------------------------
def test_cpu_generator_is_the_default_recorded_and_its_bits_are_the_per_block_draws():
    """Φ's first block is exactly a CPU generator seeded by ``_block_seed(seed, 0)``, drawn in
    place (independent recomputation), and ``generator`` is part of the recorded identity."""
    from attribution_trak.projection import _block_seed

    p, k = 300, 16
    c = fitted(p, seed=5, proj_dim=k, block_mb=0.01)  # 0.01 MiB -> 81 float64 rows per block
    assert c.describe()["generator"] == "cpu"
    rows = c._rows_per_block(8)
    gen = torch.Generator().manual_seed(_block_seed(5, 0))
    want = torch.empty(rows, k, dtype=torch.float64).normal_(0.0, 1.0 / math.sqrt(k), generator=gen)
    assert torch.equal(matrix(c, p)[:rows], want)


def test_cuda_generator_refuses_gradients_off_the_gpu_and_other_drawers():
    from attribution_core import ConfigError

    c = fitted(200, proj_dim=16, generator="cuda")
    assert c.describe()["generator"] == "cuda"
    with pytest.raises(ConfigError, match="generator: cuda needs the gradients on a CUDA"):
        c.compress(torch.randn(2, 200))
    with pytest.raises(ConfigError, match="projection: orthogonal"):
        fitted(200, proj_dim=16, generator="cuda", projection="orthogonal")
    with pytest.raises(ConfigError, match="backend: traker"):
        fitted(200, proj_dim=128, generator="cuda", backend="traker")
    with pytest.raises(ConfigError, match="not one of cpu, cuda"):
        ProjectionCompressor(generator="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_cuda_generator_draws_a_seeded_jl_matrix_on_the_gpu(kind):
    """On a GPU: the same seed gives the same Φ, cached and streamed agree, the entries have
    variance 1/k (4σ of the sample variance over p·k entries), and Φ differs from the CPU one."""
    p, k = 2000, 64
    dev = torch.device("cuda")
    G = torch.randn(3, p, device=dev, dtype=torch.float64)
    a = fitted(p, seed=2, proj_dim=k, projection=kind, generator="cuda", block_mb=0.2)
    phi = a.compress(torch.eye(p, device=dev, dtype=torch.float64))
    _SHARED_PHI.clear()
    again = fitted(p, seed=2, proj_dim=k, projection=kind, generator="cuda", block_mb=0.2)
    assert torch.equal(again.compress(torch.eye(p, device=dev, dtype=torch.float64)), phi)
    streamed = fitted(p, seed=2, proj_dim=k, projection=kind, generator="cuda", block_mb=0.2,
                      max_memory_mb=0.5)  # fmt: skip
    torch.testing.assert_close(streamed.compress(G), a.compress(G), rtol=1e-12, atol=1e-14)
    var = phi.var().item() * k
    assert abs(var - 1.0) < 4 * math.sqrt(2.0 / (p * k)) * 1.5
    cpu = fitted(p, seed=2, proj_dim=k, projection=kind, block_mb=0.2)
    assert not torch.allclose(matrix(cpu, p), phi.cpu())
