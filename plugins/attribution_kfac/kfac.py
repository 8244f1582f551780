"""Hessians ``kfac`` and ``ekfac``: curvlinops fits the factors, we solve with exact damping.

Units: curvlinops' (E)K-FAC of ``Σ_rows loss_function(f(x), y)`` (reduction ``sum``) is
multiplied by the task's ``scale`` so that ``H`` approximates the GGN of ``L_D``; the task's
regulariser ``R = l2·‖θ‖²`` enters as ``2·l2`` added to the damping.

Data passes (one fit):

* K-FAC: one pass (``batches(0)``) — every MC pseudo-target (``mc_samples``) and every
  ``(t, ε)`` draw the task puts in a pass (``n_samples``) is handled in that pass.
* EK-FAC: the same pass for the factors, then one more pass (``batches(1)``, fresh noise)
  for the eigenvalue correction.
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
from attribution_kfac.cache import FactorCache
from attribution_kfac.curvature import Block, KroneckerCurvature, kronecker_trace
from attribution_kfac.problem import (
    Passes,
    check_params,
    curvlinops,
    get_problem,
    layer_blocks,
    log,
    problem_parameters,
)

_CACHE_VERSION = 1


def _mc_seed(seed: int) -> int:
    """Seed of curvlinops' pseudo-target generator, derived from the method seed."""
    return (int(seed) * 2_654_435_761 + 97) % (2**31 - 1)


def _check_finite(named: list[tuple[str, str, Tensor | None]]) -> None:
    """Raise NumericalError listing every ``(layer, factor)`` with NaN/Inf entries."""
    bad = [
        f"{label!r} ({what}: {int((~torch.isfinite(t)).sum())} entries)"
        for label, what, t in named
        if t is not None and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise NumericalError(
            f"non-finite (NaN/Inf) K-FAC factors in layer {', '.join(bad)}; check the model "
            f"weights and training data for NaN/Inf (e.g. a diverged training run)"
        )


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
        device = plist[0].device
        parts = self._key_parts(model, task, seed, params, problem, n_samples)
        store = FactorCache(cache_dir) if (cache_dir is not None and self.cache) else None
        t0 = time.perf_counter()
        factors = store.load(parts, device) if store is not None else None
        cached = factors is not None
        if factors is None:
            factors = self._compute(problem, plist, blocks, seed, progress)
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
    ) -> dict[str, Any]:
        """Everything the factors depend on (damping is applied at solve time, not cached)."""
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
        }

    def _operator(
        self,
        problem: CurvatureProblem,
        plist: list[Tensor],
        data: Passes,
        seed: int,
        progress: bool,
    ):
        cl = curvlinops()
        cls = cl.EKFACLinearOperator if self.ekfac else cl.KFACLinearOperator
        return cls(
            problem.model,
            problem.loss_function,
            plist,
            data,
            progressbar=progress,
            check_deterministic=False,
            seed=_mc_seed(seed),
            fisher_type=self.fisher,
            mc_samples=self.mc_samples,
            kfac_approx=self.approx,
            num_per_example_loss_terms=1,
            separate_weight_and_bias=self.separate_weight_and_bias,
            num_data=problem.n_rows or None,
            batch_size_fn=problem.batch_size_fn,
        )

    def _compute(
        self,
        problem: CurvatureProblem,
        plist: list[Tensor],
        blocks: list[Block],
        seed: int,
        progress: bool,
    ) -> dict[str, Tensor]:
        """One (K-FAC) or two (EK-FAC) curvlinops data passes → float64 eigen-factors."""
        data = Passes(problem.batches)
        op = self._operator(problem, plist, data, seed, progress)
        data.pass_index = 0
        op.compute_kronecker_factors()  # once per fresh operator (a second call would add)
        out: dict[str, Tensor] = {}
        named = []
        for block in blocks:
            named.append(
                (block.label, "input covariance A", op._input_covariances.get(block.layer))
            )
            named.append(
                (block.label, "gradient covariance G", op._gradient_covariances[block.layer])
            )
        _check_finite(named)
        for block in blocks:
            A = op._input_covariances.get(block.layer)
            G = op._gradient_covariances[block.layer]
            lam_g, QG = _eigh64(G)
            out[f"{block.layer}|QG"], out[f"{block.layer}|lam_g"] = QG, lam_g
            if A is not None:
                lam_a, QA = _eigh64(A)
                out[f"{block.layer}|QA"], out[f"{block.layer}|lam_a"] = QA, lam_a
                out[f"{block.layer}|E"] = torch.outer(lam_g, lam_a)
            if block.bias is not None and not block.joint:
                out[f"{block.layer}|E_bias"] = lam_g.clone()
        if self.ekfac:
            self._correct(op, data, blocks, out, plist)
        # contiguous: the same memory layout (hence the same bits downstream) as a cache read
        return {k: v.contiguous() for k, v in out.items()}

    def _correct(
        self,
        op: Any,
        data: Passes,
        blocks: list[Block],
        out: dict[str, Tensor],
        plist: list[Tensor],
    ) -> None:
        """EK-FAC: corrected eigenvalues in our float64 eigenbases (pass 1, fresh noise)."""
        dtype = plist[0].dtype
        # curvlinops' eigenvalue correction rotates with the eigenvectors it finds in these
        # dicts (it only computes them itself, in the model's dtype, when they are empty).
        for block in blocks:
            op._gradient_covariances.pop(block.layer, None)
            op._input_covariances.pop(block.layer, None)
            QG = out[f"{block.layer}|QG"].to(dtype)
            op._gradient_covariances_eigenvectors[block.layer] = QG
            out[f"{block.layer}|QG"] = QG.to(torch.float64)
            if f"{block.layer}|QA" in out:
                QA = out[f"{block.layer}|QA"].to(dtype)
                op._input_covariances_eigenvectors[block.layer] = QA
                out[f"{block.layer}|QA"] = QA.to(torch.float64)
        data.pass_index = 1
        op.compute_eigenvalue_correction()
        position = {id(p): i for i, p in enumerate(plist)}
        named = []
        for block in blocks:
            corrected = op._corrected_eigenvalues[block.layer]
            mod = op._model_func.get_submodule(block.layer)
            if isinstance(corrected, Tensor):
                named.append((block.label, "EK-FAC eigenvalues", corrected))
                out[f"{block.layer}|E"] = corrected.to(torch.float64)
                continue
            for pname, key in (("weight", "E"), ("bias", "E_bias")):
                t = getattr(mod, pname, None)
                if t is not None and id(t) in position and position[id(t)] in corrected:
                    vals = corrected[position[id(t)]]
                    named.append((block.label, f"EK-FAC eigenvalues of {pname}", vals))
                    out[f"{block.layer}|{key}"] = vals.to(torch.float64)
        _check_finite(named)

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
