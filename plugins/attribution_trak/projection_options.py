"""Options of the ``projection`` compressor (validated before any work is done)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ProjectionOptions(BaseModel):
    """Options of the ``projection`` compressor."""

    model_config = ConfigDict(extra="forbid")
    proj_dim: int = Field(2048, ge=1, description="k: dimension of the projected gradients.")
    projection: Literal["gaussian", "rademacher", "orthogonal", "sjlt"] = Field(
        "gaussian",
        description="Entries N(0,1/k), ±1/√k, √(p/k)·orthonormal columns (k ≤ p; tests), or a "
        "sparse JL transform (sjlt_nnz entries ±1/√s per parameter).",
    )
    sjlt_nnz: int = Field(
        4, ge=1, description="s: nonzeros per parameter row of Φ (sjlt; proj_dim % s == 0)."
    )
    backend: Literal["auto", "traker", "torch"] = Field(
        "auto",
        description="auto = torch (blocked, cached); traker = trak.projectors.BasicProjector.",
    )
    block_mb: float = Field(
        32.0, gt=0.0, description="Size of one generated block of Φ (MiB), torch back-end."
    )
    max_memory_mb: float = Field(
        2048.0,
        gt=0.0,
        description="Memory allowed for Φ (cached blocks; the whole matrix for orthogonal) and "
        "for the k×k projected Fisher.",
    )
    generator: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="Where Φ is drawn: cpu = the same Φ on every device (copied to a GPU); "
        "cuda = on the gradients' GPU (fast there; a different Φ from a CPU run).",
    )
    batch_mb: float = Field(
        256.0,
        ge=0.0,
        description="Training gradients are grouped into buffers of up to this size (MiB) "
        "before projecting: one GEMM over more rows amortises Φ (0: project each chunk).",
    )

    @model_validator(mode="after")
    def _fisher_fits(self) -> ProjectionOptions:
        """The k×k float64 projected Fisher must fit in ``max_memory_mb`` (checked before work)."""
        mb = self.proj_dim**2 * 8 / 2**20
        if mb > self.max_memory_mb:
            raise ValueError(
                f"proj_dim={self.proj_dim} needs a {self.proj_dim}×{self.proj_dim} float64 "
                f"projected Fisher, {mb:.0f} MiB > max_memory_mb={self.max_memory_mb:g}; lower "
                f"proj_dim or raise max_memory_mb"
            )
        return self
