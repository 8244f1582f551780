"""Hessians ``kfac`` and ``ekfac``: factors in curvlinops' conventions, solved with exact damping.

Units: curvlinops' (E)K-FAC of ``Σ_rows loss_function(f(x), y)`` (reduction ``sum``) is
multiplied by the task's ``scale`` so that ``H`` approximates the GGN of ``L_D``; the task's
regulariser ``R = l2·‖θ‖²`` enters as ``2·l2`` added to the damping.

Data passes (one fit):

* K-FAC: one pass (``DataPass(batches, 0)``) — every MC pseudo-target (``mc_samples``) and
  every ``(t, ε)`` draw the task puts in a pass (``n_samples``) is handled in that pass.
* EK-FAC: the same pass for the factors, then one more pass (a new ``DataPass(batches, 1)``,
  fresh noise) for the eigenvalue correction.

Back-ends (``backend`` option): ``hooks`` (default) runs those passes with our own hooks
(:mod:`attribution_kfac.factors`: no weight gradients, Toeplitz conv covariances), producing
curvlinops' factors to float round-off; ``curvlinops`` uses ``KFACLinearOperator`` /
``EKFACLinearOperator`` themselves (:mod:`attribution_kfac.backends`). A problem the hooks do
not support (grouped convs, other losses) falls back to curvlinops; the back-end used is
recorded in the curvature's info (hence the manifest) and is part of the factor cache key.

Data shards (``FitInputs.shards``, :mod:`attribution_kfac.sharded`): with the ``hooks``
back-end and several shards (or a distributed executor) both passes run as one job per shard of
training examples, summed on the driver in shard order; the eigendecompositions run once. The
curvature's info records ``sharding`` (``sharded``, the shard count and phases, or ``why`` not:
the ``curvlinops`` back-end stays local); the shard boundaries are part of the factor cache key.

Options: the constructor validates its keyword arguments once into a frozen
:class:`~attribution_kfac.options.KFACOptions` (``self.options``); the curvature's info and the
factor cache key are derived from it, and the back-ends receive it (in a
:class:`~attribution_kfac.backends.FactorFit`), never the Hessian.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from attribution_core import (
    CurvatureProblem,
    FitInputs,
    HessianApproximation,
    NumericalError,
    layout_of,
    model_fingerprint,
    validate_model,
)
from attribution_kfac.backends import FactorFit, fit_factors, fit_layers, resolve_backend
from attribution_kfac.cache import FactorCache
from attribution_kfac.curvature import Block, KroneckerCurvature, kronecker_trace
from attribution_kfac.options import EKFACOptions, KFACOptions
from attribution_kfac.problem import (
    check_params,
    fit_samples,
    get_problem,
    layer_blocks,
    log,
    problem_parameters,
)
from attribution_kfac.sharded import shard_plan

_CACHE_VERSION = 2  # 2: (t, ε) and pseudo-targets seeded per example / row (data shards)


def _mc_seed(seed: int) -> int:
    """Seed of curvlinops' pseudo-target generator, derived from the method seed."""
    return (int(seed) * 2_654_435_761 + 97) % (2**31 - 1)


class KFACHessian(HessianApproximation):
    """K-FAC (or, with ``ekfac=True``, EK-FAC) of the GGN of ``L_D``; see the module doc.

    Args:
        **options: the fields of :attr:`options_model` (validated once, kept frozen).

    Raises:
        ConfigError: an option is unknown or out of range (names the key and the choices).
    """

    name = "kfac"
    ekfac: ClassVar[bool] = False
    options_model: ClassVar[type[KFACOptions]] = KFACOptions

    def __init__(self, **options: Any) -> None:
        self.options: KFACOptions = validate_model(  # type: ignore[assignment]
            self.options_model, options, where=f"hessian {self.name!r}"
        )

    def describe(self) -> dict[str, Any]:
        """Name, space and every option (before fitting)."""
        return {**super().describe(), **self.options.model_dump()}

    # ---- fit -----------------------------------------------------------------------------
    def fit(self, inputs: FitInputs) -> KroneckerCurvature:
        """Fit (or load) the factors and return the damped curvature.

        Raises:
            ConfigError: no Linear/Conv2d parameters, or a task without a curvature problem.
            NumericalError: non-finite factors (names the layer); damping 0 with a singular
                factor.
        """
        opts, params, task = self.options, inputs.params, inputs.task
        check_params(params, self.name)
        n_samples = fit_samples(opts.n_samples, inputs.train_function)
        problem = get_problem(inputs.model, task, inputs.seed, n_samples, self.name)
        plist, excluded = problem_parameters(problem, params, self.name)
        blocks = layer_blocks(problem, params, not opts.separate_weight_and_bias, self.name)
        layers = fit_layers(problem, blocks)
        backend = resolve_backend(opts.backend, layers, problem, self.name)
        resolved = {"n_samples": n_samples, "backend": backend}
        shards, sharding = shard_plan(inputs.shards, backend, problem, self.ekfac)
        parts = self._key_parts(inputs, problem, resolved)
        if shards is not None:  # the shard boundaries set the association of the sums (bits)
            parts["shards"] = sharding["bounds"]
        use_cache = inputs.cache_dir is not None and opts.cache
        store = FactorCache(inputs.cache_dir) if use_cache else None
        t0 = time.perf_counter()
        factors = store.load(parts, plist[0].device) if store is not None else None
        cached = factors is not None
        if factors is None:
            fit = FactorFit(
                opts, self.ekfac, backend, problem, plist, blocks, layers,
                _mc_seed(inputs.seed), inputs.progress, shards,
            )  # fmt: skip
            factors = fit_factors(fit)
            if store is not None:
                store.save(parts, factors)
        fit_seconds = time.perf_counter() - t0
        self._check_shapes(blocks, factors)
        p = sum(t.numel() for t in params.values())
        damping = opts.damping
        if opts.damping_mode == "relative":
            damping = opts.damping * (
                kronecker_trace(blocks, factors, problem.scale) / p + 2 * task.l2
            )
        info: dict[str, Any] = {
            "hessian": self.name,
            **opts.recorded(),
            **resolved,  # backend: the one that fitted the factors (a cache key part)
            "excluded": excluded,
            "from_cache": cached,
            "fit_seconds": fit_seconds,
            "data_passes": 0 if cached else (2 if self.ekfac else 1),
            "sharding": {k: v for k, v in sharding.items() if k != "bounds"},
        }
        return KroneckerCurvature(
            blocks,
            factors,
            scale=problem.scale,
            damping=damping,
            l2=task.l2,
            n_params=p,
            damping_kind=opts.damping_kind,
            info=info,
        )

    def _key_parts(
        self, inputs: FitInputs, problem: CurvatureProblem, resolved: dict[str, Any]
    ) -> dict[str, Any]:
        """Everything the factors depend on (damping is applied at solve time, not cached).

        The option part is :meth:`KFACOptions.factor_options` with ``resolved`` (the fit's
        ``n_samples`` and back-end) in place of the requested values: the two back-ends agree
        to round-off, not bit for bit, so a factor fitted by one is never read back by the other.
        """
        params: Mapping[str, Tensor] = inputs.params
        return {
            "version": _CACHE_VERSION,
            "hessian": self.name,
            "model": model_fingerprint(inputs.model),
            "task": inputs.task.describe(),
            "seed": inputs.seed,
            **self.options.factor_options(),
            **resolved,
            "params": layout_of(params),
            "loss": type(problem.loss_function).__name__,
            "n_rows": problem.n_rows,
            "dtype": str(next(iter(params.values())).dtype),
        }

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
    options_model = EKFACOptions
