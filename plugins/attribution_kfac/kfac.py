"""Hessians ``kfac`` and ``ekfac``: factors in curvlinops' conventions, solved with exact damping.

Units: curvlinops' (E)K-FAC of ``Σ_rows loss_function(f(x), y)`` (reduction ``sum``) is
multiplied by the task's ``scale`` so that ``H`` approximates the GGN of ``L_D``; the task's
regulariser ``R = l2·‖θ‖²`` enters as ``2·l2`` added to the damping.

Data passes (one fit):

* K-FAC: one pass (``batches(0)``) — every MC pseudo-target (``mc_samples``) and every
  ``(t, ε)`` draw the task puts in a pass (``n_samples``) is handled in that pass.
* EK-FAC: the same pass for the factors, then one more pass (``batches(1)``, fresh noise)
  for the eigenvalue correction.

Back-ends (``backend`` option): ``hooks`` (default) runs those passes with our own hooks
(:mod:`attribution_kfac.factors`: no weight gradients, Toeplitz conv covariances), producing
curvlinops' factors to float round-off; ``curvlinops`` uses ``KFACLinearOperator`` /
``EKFACLinearOperator`` themselves (:mod:`attribution_kfac.backends`). A problem the hooks do
not support (grouped convs, other losses) falls back to curvlinops; the back-end used is
recorded in the curvature's info (hence the manifest) and is part of the factor cache key.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attribution_core.errors import NumericalError
from attribution_core.gradients import layout_of, model_fingerprint
from attribution_core.interfaces import (
    CurvatureProblem,
    GradientSource,
    HessianApproximation,
    Measurement,
    Task,
)
from attribution_kfac.backends import (
    check_finite,
    eigenvalue_correction,
    fit_layers,
    kronecker_factors,
    resolve_backend,
)
from attribution_kfac.cache import FactorCache
from attribution_kfac.curvature import Block, KroneckerCurvature, kronecker_trace
from attribution_kfac.factors import Layer
from attribution_kfac.problem import (
    Passes,
    check_params,
    get_problem,
    layer_blocks,
    log,
    problem_parameters,
)

_CACHE_VERSION = 1


def _mc_seed(seed: int) -> int:
    """Seed of curvlinops' pseudo-target generator, derived from the method seed."""
    return (int(seed) * 2_654_435_761 + 97) % (2**31 - 1)


def _eigh64(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of a symmetric factor, in float64."""
    M = M.to(torch.float64)
    lam, Q = torch.linalg.eigh((M + M.T) / 2)
    return lam, Q


class KFACHessian(HessianApproximation):
    """K-FAC (or, with ``ekfac=True``, EK-FAC) of the GGN of ``L_D``; see the module doc."""

    name = "kfac"
    ekfac = False

    def __init__(
        self,
        damping: float = 1e-8,
        damping_mode: str = "absolute",
        n_samples: int | None = None,
        fisher: str = "mc",
        mc_samples: int = 1,
        approx: str = "expand",
        separate_weight_and_bias: bool = True,
        damping_kind: str = "exact",
        cache: bool = True,
        backend: str = "hooks",
    ) -> None:
        self.damping = damping
        self.damping_mode = damping_mode
        self.n_samples = n_samples
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.approx = approx
        self.separate_weight_and_bias = separate_weight_and_bias
        self.damping_kind = damping_kind
        self.cache = cache
        self.backend = backend

    # ---- fit -----------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        task: Task,
        train_measurement: Measurement,
        seed: int,
        *,
        params: Mapping[str, Tensor],
        train_gradients: GradientSource,
        cache_dir: str | None = None,
        progress: bool = False,
    ) -> KroneckerCurvature:
        """Fit (or load) the factors and return the damped curvature.

        Raises:
            ConfigError: no Linear/Conv2d parameters, or a task without a curvature problem.
            NumericalError: non-finite factors (names the layer); damping 0 with a singular
                factor.
        """
        check_params(params, self.name)
        n_samples = self.n_samples or max(1, int(getattr(train_measurement, "n_samples", 1)))
        problem = get_problem(model, task, seed, n_samples, self.name)
        plist, excluded = problem_parameters(problem, params, self.name)
        blocks = layer_blocks(problem, params, not self.separate_weight_and_bias, self.name)
        layers = fit_layers(problem, blocks)
        backend = resolve_backend(self.backend, layers, problem, self.name)
        device = plist[0].device
        parts = self._key_parts(model, task, seed, params, problem, n_samples, backend)
        store = FactorCache(cache_dir) if (cache_dir is not None and self.cache) else None
        t0 = time.perf_counter()
        factors = store.load(parts, device) if store is not None else None
        cached = factors is not None
        if factors is None:
            factors = self._compute(problem, plist, blocks, layers, backend, seed, progress)
            if store is not None:
                store.save(parts, factors)
        fit_seconds = time.perf_counter() - t0
        self._check_shapes(blocks, factors)
        p = sum(t.numel() for t in params.values())
        damping = self.damping
        if self.damping_mode == "relative":
            damping = self.damping * (
                kronecker_trace(blocks, factors, problem.scale) / p + 2 * task.l2
            )
        info: dict[str, Any] = {
            "hessian": self.name,
            "fisher": self.fisher,
            "mc_samples": self.mc_samples,
            "approx": self.approx,
            "n_samples": n_samples,
            "separate_weight_and_bias": self.separate_weight_and_bias,
            "excluded": excluded,
            "from_cache": cached,
            "fit_seconds": fit_seconds,
            "data_passes": 0 if cached else (2 if self.ekfac else 1),
            "backend": backend,  # the one that fitted the factors (a cache key part)
        }
        return KroneckerCurvature(
            blocks,
            factors,
            scale=problem.scale,
            damping=damping,
            l2=task.l2,
            n_params=p,
            damping_kind=self.damping_kind,
            info=info,
        )

    def _key_parts(
        self,
        model: nn.Module,
        task: Task,
        seed: int,
        params: Mapping[str, Tensor],
        problem: CurvatureProblem,
        n_samples: int,
        backend: str,
    ) -> dict[str, Any]:
        """Everything the factors depend on (damping is applied at solve time, not cached).

        ``backend`` is the resolved one: the two agree to round-off, not bit for bit, so a
        factor fitted by one is never read back by the other.
        """
        return {
            "version": _CACHE_VERSION,
            "hessian": self.name,
            "model": model_fingerprint(model),
            "task": task.describe(),
            "seed": seed,
            "fisher": self.fisher,
            "mc_samples": self.mc_samples,
            "approx": self.approx,
            "n_samples": n_samples,
            "separate_weight_and_bias": self.separate_weight_and_bias,
            "params": layout_of(params),
            "loss": type(problem.loss_function).__name__,
            "n_rows": problem.n_rows,
            "dtype": str(next(iter(params.values())).dtype),
            "backend": backend,
        }

    def _compute(
        self,
        problem: CurvatureProblem,
        plist: list[Tensor],
        blocks: list[Block],
        layers: list[Layer],
        backend: str,
        seed: int,
        progress: bool,
    ) -> dict[str, Tensor]:
        """One (K-FAC) or two (EK-FAC) data passes with ``backend`` → float64 eigen-factors."""
        data = Passes(problem.batches)
        A, G, runner = kronecker_factors(
            self, backend, problem, plist, layers, data, _mc_seed(seed), progress
        )
        named = []
        for block in blocks:
            named.append((block.label, "input covariance A", A.get(block.layer)))
            named.append((block.label, "gradient covariance G", G[block.layer]))
        check_finite(named)
        out: dict[str, Tensor] = {}
        for block in blocks:
            lam_g, QG = _eigh64(G[block.layer])
            out[f"{block.layer}|QG"], out[f"{block.layer}|lam_g"] = QG, lam_g
            if block.layer in A:
                lam_a, QA = _eigh64(A[block.layer])
                out[f"{block.layer}|QA"], out[f"{block.layer}|lam_a"] = QA, lam_a
                out[f"{block.layer}|E"] = torch.outer(lam_g, lam_a)
            if block.bias is not None and not block.joint:
                out[f"{block.layer}|E_bias"] = lam_g.clone()
        if self.ekfac:
            eigenvalue_correction(runner, data, blocks, out, plist)
        # contiguous: the same memory layout (hence the same bits downstream) as a cache read
        return {k: v.contiguous() for k, v in out.items()}

    @staticmethod
    def _check_shapes(blocks: list[Block], factors: dict[str, Tensor]) -> None:
        for block in blocks:
            if block.weight is None:
                continue
            _, d_out, d_in = block.weight
            d_a = d_in + (1 if block.joint else 0)
            E = factors.get(f"{block.layer}|E")
            if E is None or tuple(E.shape) != (d_out, d_a):
                raise NumericalError(
                    f"factor mismatch: layer {block.label!r} expected eigenvalues ({d_out}, "
                    f"{d_a}), got {None if E is None else tuple(E.shape)}; grouped/dilated "
                    f"convolutions may be unsupported by curvlinops — exclude that layer"
                )
        log.debug("kfac factors: %d layers", len(blocks))


class EKFACHessian(KFACHessian):
    """EK-FAC: K-FAC's eigenbasis with eigenvalues re-fitted to the per-row gradients."""

    name = "ekfac"
    ekfac = True
