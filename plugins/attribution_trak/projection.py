"""Compressor ``projection``: seeded Johnson–Lindenstrauss projections ``(n, p) -> (n, k)``.

``C(G) = G Φ`` with ``Φ: (p, k)`` whose entries are

* ``gaussian``: i.i.d. ``N(0, 1/k)``,
* ``rademacher``: i.i.d. ``±1/√k`` (probability ½ each),
* ``orthogonal``: ``√(p/k) · Q`` with ``Q`` the orthonormal columns of a Gaussian ``(p, k)``
  matrix (``k ≤ p``); with ``k = p`` this is an exact rotation, used by the exactness tests.
* ``sjlt``: a sparse JL transform, ``s = sjlt_nnz`` entries ``±1/√s`` per row of Φ, one in each
  of ``s`` blocks of ``k/s`` columns (:mod:`attribution_trak.sjlt`): not the same Φ as the dense
  kinds, but ``p·s`` instead of ``p·k`` numbers to draw and one sparse product to apply.

All three satisfy ``E[ΦΦᵀ] = I``, so inner products are preserved in expectation:
``E[(Φᵀu)ᵀ(Φᵀv)] = uᵀv``; for the Gaussian case ``Var = (‖u‖²‖v‖² + (uᵀv)²)/k``.

Back-ends (the resolved one is recorded by :meth:`ProjectionCompressor.describe`, hence in the
manifest and in the gradient-cache key; the projection *type* never changes with the back-end):

* ``torch`` (the ``auto`` default): ``Φ`` is generated in blocks of parameter rows, block ``b``
  from its own CPU generator seeded by ``(seed, b)``; blocks are kept in memory when the whole
  ``Φ`` fits in ``max_memory_mb``, otherwise regenerated block by block on every call (the full
  matrix is then never materialised).
* ``traker``: ``trak.projectors.BasicProjector`` (traker 0.3.x), whose N(0, 1)/±1 entries are
  rescaled by ``1/√k``. It regenerates its ``(p, 100)`` column blocks on every call. With
  ``proj_dim ≤ 100`` it keeps a single block that ``free_memory()`` deletes and never rebuilds
  (``AttributeError`` on the next call), so there ``auto``/``traker`` resolve to ``torch`` and the
  reason is recorded. traker's ``CudaProjector`` needs the ``fast_jl`` CUDA extension, which this
  project does not install; it is not used.

Generator (``generator``, recorded with the back-end): ``cpu`` (default) draws Φ with torch's CPU
generator on every device, so a CPU and a GPU run project with the same Φ; on a GPU the blocks
are drawn on the CPU and copied, which for a large ``p·k`` (Φ streamed, regenerated per call)
makes the projection CPU-bound. ``cuda`` draws each block with a CUDA generator seeded the same
way, on the gradients' GPU: fast, deterministic for a seed on that device, but a *different* Φ
from a CPU run — the gradient-cache key holds ``generator``, so the two never share a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attribution_core import ConfigError, GradientCompressor
from attribution_trak.projection_options import ProjectionOptions  # noqa: F401  (re-export)
from attribution_trak.sjlt import sjlt_project, sjlt_transpose

TRAKER_BLOCK = 100
"""Column-block size of traker's ``BasicProjector`` (its default ``block_size``)."""


_SHARED_PHI: dict[tuple[Any, ...], list[Tensor]] = {}
"""The most recently generated Φ, as blocks (at most one entry). Methods with the same
distribution, seed, p, k, dtype and device — e.g. ``trak`` and ``d-trak`` in one run — reuse it
instead of each generating and holding its own copy."""


def _block_seed(seed: int, block: int) -> int:
    """Seed of parameter-row block ``block`` (a fixed odd-multiplier mix, < 2**63)."""
    return (int(seed) * 1_000_003 + 0x5DEECE66D + int(block) * 2_654_435_761) % (2**63)


class ProjectionCompressor(GradientCompressor):
    """Seeded JL projection ``(n, p) -> (n, k)`` (see the module docstring)."""

    name = "projection"
    sketch = True  # applied to both sides: training rows become Φᵀ g_j

    def __init__(
        self,
        proj_dim: int = 2048,
        projection: str = "gaussian",
        backend: str = "auto",
        block_mb: float = 32.0,
        max_memory_mb: float = 2048.0,
        batch_mb: float = 256.0,
        generator: str = "cpu",
        sjlt_nnz: int = 4,
    ) -> None:
        if proj_dim < 1:
            raise ConfigError(
                f"proj_dim: {proj_dim} is not a positive dimension; give an integer ≥ 1 "
                f"(TRAK uses 2048 on CIFAR, the diffusion paper 32768)"
            )
        self.proj_dim = int(proj_dim)
        self.projection = projection
        self.backend = backend
        self.block_mb = block_mb
        self.max_memory_mb = max_memory_mb
        self.batch_mb = batch_mb
        if generator not in ("cpu", "cuda"):
            raise ConfigError(f"generator: {generator!r} is not one of cpu, cuda")
        self.generator = generator
        if projection == "sjlt" and (sjlt_nnz < 1 or self.proj_dim % sjlt_nnz):
            raise ConfigError(
                f"sjlt_nnz: {sjlt_nnz} must be ≥ 1 and divide proj_dim {self.proj_dim} (Φ's "
                f"columns are split into sjlt_nnz equal blocks)"
            )
        self.sjlt_nnz = int(sjlt_nnz)
        self.n_params: int | None = None
        self.seed = 0
        self.resolved_backend: str | None = None
        self.backend_note = ""
        self._traker: Any = None

    # ---- set-up --------------------------------------------------------------------------------
    def fit(self, n_params: int, seed: int, *, layout: Sequence[tuple[str, int]] = ()) -> None:
        """Fix ``p = n_params`` and the seed; resolve the back-end; check memory.

        Raises:
            ConfigError: ``orthogonal`` with ``k > p``, or a matrix that exceeds
                ``max_memory_mb`` where it must be materialised.
        """
        p, k = int(n_params), self.proj_dim
        self.n_params, self.seed = p, int(seed)
        self._traker = None
        drawn_elsewhere = self.projection in ("orthogonal", "sjlt") or self.backend == "traker"
        if self.generator == "cuda" and drawn_elsewhere:
            what = (
                f"projection: {self.projection}"
                if self.projection in ("orthogonal", "sjlt")
                else "backend: traker"
            )
            raise ConfigError(
                f"generator: cuda draws Φ's dense blocks on the GPU; {what} draws it elsewhere "
                f"(orthogonal: a CPU QR; sjlt: p·s CPU indices; traker: its own projector) — use "
                f"generator: cpu"
            )
        if self.projection == "sjlt":
            if self.backend == "traker":
                raise ConfigError(
                    "projection: sjlt is not one of traker's projection types (normal, "
                    "rademacher); use backend: torch"
                )
            self.resolved_backend = "torch"
            self.backend_note = f"sparse JL: {self.sjlt_nnz} entries per parameter, one sparse mm"
            return
        if self.projection == "orthogonal":
            if k > p:
                raise ConfigError(
                    f"proj_dim: {k} > n_params {p}; an orthogonal projection needs proj_dim ≤ "
                    f"n_params — lower proj_dim or use projection: gaussian"
                )
            mb = p * k * 8 / 2**20
            if mb > self.max_memory_mb:
                raise ConfigError(
                    f"proj_dim: {k} needs the whole ({p}, {k}) orthogonal matrix, {mb:.0f} MiB > "
                    f"max_memory_mb={self.max_memory_mb:g}; lower proj_dim, raise max_memory_mb, "
                    f"or use projection: gaussian (generated in blocks)"
                )
            self.resolved_backend, self.backend_note = "torch", "orthogonal (QR) needs torch"
            return
        if self.backend == "traker":
            if k <= TRAKER_BLOCK:
                self.resolved_backend = "torch"
                self.backend_note = (
                    f"traker BasicProjector with proj_dim {k} ≤ {TRAKER_BLOCK} keeps one block "
                    f"that free_memory() deletes (AttributeError on reuse); used torch instead"
                )
            else:
                block_mb = p * TRAKER_BLOCK * 8 / 2**20
                if block_mb > self.max_memory_mb:
                    raise ConfigError(
                        f"backend: traker generates ({p}, {TRAKER_BLOCK}) blocks, {block_mb:.0f} "
                        f"MiB > max_memory_mb={self.max_memory_mb:g}; use backend: torch"
                    )
                self.resolved_backend = "traker"
                self.backend_note = "trak.projectors.BasicProjector"
        else:
            self.resolved_backend = "torch"
            self.backend_note = (
                "torch: Φ in row blocks with per-block seeds, kept if it fits max_memory_mb, "
                "else regenerated per call"
            )

    def preferred_rows(self) -> int:
        """Rows of float32 gradients that fit in ``batch_mb`` (0 before ``fit``).

        When Φ does not fit ``max_memory_mb`` it is regenerated on every call, so the memory
        it would have taken buffers gradients instead (fewer calls, fewer regenerations).
        """
        if self.n_params is None or self.batch_mb == 0:
            return 0
        budget = self.batch_mb
        if self.projection not in ("orthogonal", "sjlt") and not self._fits(torch.float32):
            budget = max(budget, self.max_memory_mb)
        return int(budget * 2**20 // (self.n_params * 4))

    def _rows_per_block(self, itemsize: int) -> int:
        return max(1, int(self.block_mb * 2**20 // (self.proj_dim * itemsize)))

    def _check_fitted(self, G: Tensor) -> None:
        if self.n_params is None:
            raise ConfigError("compressor projection: call fit(n_params, seed) before compress()")
        if G.ndim != 2 or G.shape[1] != self.n_params:
            raise ValueError(
                f"gradients mismatch: expected (n, {self.n_params}), got {tuple(G.shape)}."
            )

    # ---- Φ -----------------------------------------------------------------------------------
    def _draw_device(self, device: torch.device) -> torch.device:
        """Where Φ's blocks are drawn for gradients on ``device`` (see ``generator``)."""
        if self.generator == "cpu":
            return torch.device("cpu")
        if device.type != "cuda":
            raise ConfigError(
                f"generator: cuda needs the gradients on a CUDA device (they are on {device}); "
                f"use generator: cpu"
            )
        return device

    def _gen_block(
        self,
        b: int,
        rows: int,
        dtype: torch.dtype,
        out: Tensor | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Block ``b`` of Φ: ``(rows, k)`` with the configured distribution, drawn on
        ``device`` (the CPU unless ``generator: cuda``).

        ``out`` (a contiguous ``(rows, k)`` view on that device, e.g. rows of the whole Φ) is
        filled in place with the same values instead of allocating a block and copying it.
        """
        device = device or torch.device("cpu")
        gen = torch.Generator(device=device).manual_seed(_block_seed(self.seed, b))
        k = self.proj_dim
        if out is None:
            out = torch.empty(rows, k, dtype=dtype, device=device)
        if self.projection == "gaussian":
            return out.normal_(0.0, 1.0 / math.sqrt(k), generator=gen)
        signs = torch.randint(0, 2, (rows, k), generator=gen, dtype=torch.int8, device=device)
        return out.copy_(signs).mul_(2).sub_(1).div_(math.sqrt(k))

    def _orthogonal(self, dtype: torch.dtype) -> Tensor:
        p, k = self.n_params, self.proj_dim
        gen = torch.Generator().manual_seed(_block_seed(self.seed, 0))
        A = torch.randn(p, k, generator=gen, dtype=torch.float64)
        Q, R = torch.linalg.qr(A)
        Q = Q * torch.sign(torch.diagonal(R))  # unique (Haar) choice of signs
        return (Q * math.sqrt(p / k)).to(dtype)

    def _phi_key(self, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
        rows = self._rows_per_block(torch.finfo(dtype).bits // 8)
        return (
            self.projection,
            self.generator,
            self.seed,
            self.n_params,
            self.proj_dim,
            rows,
            str(dtype),
            str(device),
        )

    def matrix_blocks(self, dtype: torch.dtype, device: torch.device) -> list[tuple[slice, Tensor]]:
        """``[(rows, Φ[rows])]`` covering all ``p`` rows (kept for reuse if Φ fits in memory)."""
        if self.n_params is None:
            raise ConfigError("compressor projection: call fit(n_params, seed) before use")
        p = self.n_params
        key = self._phi_key(dtype, device)
        if self.projection == "sjlt":  # dense, for inspection and tests only
            return [(slice(0, p), self._sjlt(dtype, device).to_dense().T.contiguous())]
        if self.projection == "orthogonal":  # fit() checked that it fits
            if key not in _SHARED_PHI:
                _SHARED_PHI.clear()
                _SHARED_PHI[key] = [self._orthogonal(dtype).to(device)]
            return [(slice(0, p), _SHARED_PHI[key][0])]
        rows = key[5]
        bounds = [(b, slice(a, min(a + rows, p))) for b, a in enumerate(range(0, p, rows))]
        if not self._fits(dtype):
            draw = self._draw_device(device)
            return [
                (s, self._gen_block(b, s.stop - s.start, dtype, device=draw).to(device))
                for b, s in bounds
            ]
        full = self._full_matrix(dtype, device)
        return [(s, full[s]) for _, s in bounds]

    def _full_matrix(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The whole ``Φ: (p, k)`` as one contiguous tensor (its row blocks as generated),
        kept in ``_SHARED_PHI`` for reuse; only when it fits ``max_memory_mb``."""
        key = self._phi_key(dtype, device)
        if key not in _SHARED_PHI:
            _SHARED_PHI.clear()  # hold one Φ at a time
            p, rows = self.n_params, key[5]
            draw = self._draw_device(device)
            in_place = draw.type == device.type
            full = torch.empty(p, self.proj_dim, dtype=dtype, device=device)
            for b, a in enumerate(range(0, p, rows)):
                stop = min(a + rows, p)
                if in_place:  # generated where Φ lives: no block copy
                    self._gen_block(b, stop - a, dtype, out=full[a:stop], device=draw)
                else:
                    full[a:stop] = self._gen_block(b, stop - a, dtype, device=draw).to(device)
            _SHARED_PHI[key] = [full]
        return _SHARED_PHI[key][0]

    def _sjlt(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``Φᵀ`` of ``projection: sjlt`` (sparse ``(k, p)``), kept in ``_SHARED_PHI``."""
        key = (*self._phi_key(dtype, device), "sjlt", self.sjlt_nnz)
        if key not in _SHARED_PHI:
            _SHARED_PHI.clear()
            p, k, s = self.n_params, self.proj_dim, self.sjlt_nnz
            seed = _block_seed(self.seed, 0)
            _SHARED_PHI[key] = [sjlt_transpose(p, k, s, seed, dtype, device)]
        return _SHARED_PHI[key][0]

    def plan_bytes(self, n_params: int, itemsize: int) -> int:
        """``Φ`` (``p × k``) where it is kept (fits ``max_memory_mb``; twice while it is drawn),
        else one block of ``block_mb``; sjlt: its sparse ``(k, p)`` matrix."""
        if self.projection == "sjlt":
            return n_params * self.sjlt_nnz * (itemsize + 16)
        full = n_params * self.proj_dim * itemsize
        return 2 * full if full / 2**20 <= self.max_memory_mb else int(self.block_mb * 2**20)

    def _fits(self, dtype: torch.dtype) -> bool:
        itemsize = torch.finfo(dtype).bits // 8
        return self.n_params * self.proj_dim * itemsize / 2**20 <= self.max_memory_mb

    # ---- compress ----------------------------------------------------------------------------
    def compress(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, k)``: ``G Φ`` in the gradients' dtype and device."""
        self._check_fitted(gradients)
        if self.resolved_backend == "traker":
            return self._compress_traker(gradients)
        dtype, device = gradients.dtype, gradients.device
        if self.projection == "sjlt":
            return sjlt_project(self._sjlt(dtype, device), gradients)
        if self.projection != "orthogonal" and not self._fits(dtype):
            # stream: generate, use and drop one block at a time
            out = torch.zeros(gradients.shape[0], self.proj_dim, dtype=dtype, device=device)
            itemsize = torch.finfo(dtype).bits // 8
            rows = self._rows_per_block(itemsize)
            draw = self._draw_device(device)
            for b, a in enumerate(range(0, self.n_params, rows)):
                s = slice(a, min(a + rows, self.n_params))
                block = self._gen_block(b, s.stop - s.start, dtype, device=draw)
                out += gradients[:, s] @ block.to(device)
            return out
        if self.projection == "orthogonal":
            return gradients @ self.matrix_blocks(dtype, device)[0][1]
        return gradients @ self._full_matrix(dtype, device)  # one GEMM over all of Φ

    def _compress_traker(self, gradients: Tensor) -> Tensor:
        from trak.projectors import BasicProjector, ProjectionType

        if self._traker is None or self._traker.dtype != gradients.dtype:
            self._traker = BasicProjector(
                grad_dim=self.n_params,
                proj_dim=self.proj_dim,
                seed=self.seed,
                proj_type=ProjectionType.normal
                if self.projection == "gaussian"
                else ProjectionType.rademacher,
                device=gradients.device,
                block_size=TRAKER_BLOCK,
                dtype=gradients.dtype,
            )
        out = self._traker.project(gradients, model_id=0)
        return out / math.sqrt(self.proj_dim)

    def describe(self) -> dict[str, Any]:
        """Name, k, p, distribution, seed and the resolved back-end (with the reason)."""
        return {
            "name": self.name,
            "proj_dim": self.proj_dim,
            "n_params": self.n_params,
            "projection": self.projection,
            "scale": {"orthogonal": "sqrt(p/k)", "sjlt": "1/sqrt(s)"}.get(
                self.projection, "1/sqrt(k)"
            ),
            **({"sjlt_nnz": self.sjlt_nnz} if self.projection == "sjlt" else {}),
            "seed": self.seed,
            "backend": self.backend,
            "resolved_backend": self.resolved_backend,
            "backend_note": self.backend_note,
            "generator": self.generator,
        }
