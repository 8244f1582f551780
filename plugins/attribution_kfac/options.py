"""Options of the ``kfac``, ``ekfac`` and ``ggn-cg`` Hessian approximations (pydantic).

Each Hessian validates its keyword arguments into one frozen options object when it is built
and keeps only that; what it records (``describe()``, hence the manifest) and the option part
of the factor cache key are derived from the object's fields (:meth:`_Damping.recorded`,
:meth:`KFACOptions.factor_options`), never listed by hand.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Damping(BaseModel):
    """Damping and Monte-Carlo options shared by every Hessian of this plugin."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    damping: float = Field(
        1e-8,
        ge=0.0,
        description="λ in (H + λI)⁻¹, absolute in the units of L_D (the task's 2·l2 is added).",
    )
    damping_mode: Literal["absolute", "relative"] = Field(
        "absolute", description="relative: λ = damping · tr(H)/p."
    )
    n_samples: int | None = Field(
        None,
        ge=1,
        description="Monte-Carlo draws (e.g. of (t, ε)) per training example in the fit "
        "(None: the train_function's n_samples, as for the gradients).",
    )

    def recorded(self) -> dict[str, Any]:
        """The options as the curvature's ``describe()`` records them.

        Every field except ``damping``: the curvature reports λ itself, resolved to absolute
        units (``damping_mode`` says how it was chosen).
        """
        return self.model_dump(exclude={"damping"})


class KFACOptions(_Damping):
    """Options of the ``kfac`` Hessian."""

    fisher: Literal["mc", "empirical", "type-2", "forward-only"] = Field(
        "mc",
        description="mc = MC-Fisher (GGN^model), empirical = GGN^loss (true targets), "
        "type-2 = exact GGN factors, forward-only = input covariances only.",
    )
    mc_samples: int = Field(1, ge=1, description="Pseudo-targets per row (fisher mc only).")
    approx: Literal["expand", "reduce"] = Field(
        "expand", description="K-FAC-expand or K-FAC-reduce for weight-sharing layers."
    )
    separate_weight_and_bias: bool = Field(
        True, description="Separate Kronecker blocks for weight and bias (False: joint)."
    )
    damping_kind: Literal["exact", "factored"] = Field(
        "exact",
        description="exact: (H + λI)⁻¹ via factor eigendecompositions; factored: "
        "(√s·A + √λ·I)⁻¹ ⊗ (√s·G + √λ·I)⁻¹ (K-FAC only).",
    )
    cache: bool = Field(True, description="Cache fitted factors under <cache_dir>/kfac/.")
    backend: Literal["hooks", "curvlinops"] = Field(
        "hooks",
        description="Who runs the factor passes: hooks = our hooks (curvlinops' factors to float "
        "round-off, no weight gradients, Toeplitz conv covariances; falls back to curvlinops for "
        "unsupported layers/losses), curvlinops = KFACLinearOperator/EKFACLinearOperator. The "
        "back-end used is recorded in the manifest and keys the factor cache.",
    )

    not_in_factors: ClassVar[frozenset[str]] = frozenset(
        {"damping", "damping_mode", "damping_kind", "cache"}
    )
    """Fields the fitted factors do not depend on (applied when solving, or cache control)."""

    def factor_options(self) -> dict[str, Any]:
        """The fields the fitted factors depend on: the option part of the factor cache key.

        ``n_samples`` and ``backend`` are as requested; the fit replaces them with the resolved
        values (the train_function's draws, a back-end fallback).
        """
        return self.model_dump(exclude=set(self.not_in_factors))

    @model_validator(mode="after")
    def _check(self) -> KFACOptions:
        if self.mc_samples != 1 and self.fisher != "mc":
            raise ValueError(
                f"mc_samples={self.mc_samples} only applies to fisher 'mc' (got fisher "
                f"{self.fisher!r}); set mc_samples: 1 or fisher: mc"
            )
        return self


class EKFACOptions(KFACOptions):
    """Options of the ``ekfac`` Hessian (no forward-only Fisher, exact damping only)."""

    @model_validator(mode="after")
    def _check_ekfac(self) -> EKFACOptions:
        if self.fisher == "forward-only":
            raise ValueError(
                "fisher 'forward-only' is not supported by ekfac (its eigenvalue correction "
                "needs output gradients); use fisher mc | empirical | type-2, or hessian kfac"
            )
        if self.damping_kind != "exact":
            raise ValueError(
                "damping_kind 'factored' is not supported by ekfac (its eigenvalues are not "
                "Kronecker products); use damping_kind: exact, or hessian kfac"
            )
        return self


class GGNCGOptions(_Damping):
    """Options of the ``ggn-cg`` Hessian (exact damped GGN, conjugate gradients)."""

    damping: float = Field(
        1e-4, ge=0.0, description="λ in (H + λI)⁻¹, absolute (the task's 2·l2 is added)."
    )
    rtol: float = Field(1e-6, gt=0.0, lt=1.0, description="CG stops at ‖r‖ ≤ rtol·‖b‖ per column.")
    maxiter: int = Field(500, ge=1, description="Maximum CG iterations.")
    max_columns: int = Field(32, ge=1, description="Right-hand sides solved together.")
    trace_probes: int = Field(
        32, ge=1, description="Hutchinson probes estimating tr(H) for damping_mode relative."
    )
