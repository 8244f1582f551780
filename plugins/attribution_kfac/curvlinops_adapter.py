"""Every use of curvlinops in this plugin: its version check, constructors and internals.

The ``curvlinops`` back-end reads fitted Kronecker factors and EK-FAC's corrected eigenvalues
from curvlinops' private fields (``_input_covariances``, ``_gradient_covariances``,
``_corrected_eigenvalues``, ``_mapping``, ...), injects the eigenbases it must rotate with, and
runs an operator's data pass on a data object of our choosing (``_data``). Those fields, and the
conventions the ``hooks`` back-end reproduces (:mod:`attribution_kfac.factors`), change between
curvlinops releases, so this module is the only place that touches them, and every entry point
first checks the installed version against :data:`SUPPORTED` (a :class:`ConfigError` naming the
installed version, the supported range and the fix otherwise).

Pseudo-targets: the operators are subclasses (:func:`operator_class`) whose ``draw_label``
draws per loss row (:class:`attribution_kfac.draws.PseudoTargets`; the row count starts at the
data object's ``first_row`` and the pass is its ``pass_index``), so both back-ends, and every data
shard, draw the same pseudo-targets; curvlinops' own generator is unused.

Dictionaries are keyed by module name in the curvature problem's model (``Layer.name``).
Kronecker factors: ``A: (d_in [+1], d_in [+1])`` (only for layers whose weight is included;
``+1`` for ``[W | b]`` joint blocks), ``G: (d_out, d_out)``, in the model's dtype, in
curvlinops' units (``A`` divided by ``N·L`` under expand, ``G`` by the number of MC samples).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from importlib import metadata
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from attribution_core import ConfigError, CurvatureProblem
from attribution_kfac.draws import PseudoTargets
from attribution_kfac.options import KFACOptions

DISTRIBUTION = "curvlinops-for-pytorch"
SUPPORTED = ((3, 0),)
"""``(major, minor)`` releases whose internals this module was written and tested against."""
SUPPORTED_RANGE = ">=3.0,<3.1"
""":data:`SUPPORTED` as a pip requirement specifier (used in messages)."""


@functools.cache
def installed_version() -> str:
    """The installed ``curvlinops-for-pytorch`` version string, e.g. ``"3.0.1"``.

    Raises:
        ConfigError: curvlinops is not installed.
    """
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"hessian kfac/ekfac/ggn-cg: {DISTRIBUTION} is not installed; these Hessians "
            f"need it — pip install '{DISTRIBUTION}{SUPPORTED_RANGE}'"
        ) from None


def check_version() -> str:
    """The installed version, if its ``(major, minor)`` is in :data:`SUPPORTED`.

    Raises:
        ConfigError: another version is installed (the message names it, the supported range
            and the fix).
    """
    version = installed_version()
    parts = version.split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        major_minor = None
    if major_minor not in SUPPORTED:
        raise ConfigError(
            f"{DISTRIBUTION} {version} is installed, but attribution_kfac supports "
            f"{DISTRIBUTION}{SUPPORTED_RANGE} only (it reads curvlinops' Kronecker factors and "
            f"EK-FAC eigenvalues from internals that change between releases); install a "
            f"supported version: pip install '{DISTRIBUTION}{SUPPORTED_RANGE}'"
        )
    return version


def module() -> ModuleType:
    """``curvlinops`` (version-checked), with its import-time deprecation warnings silenced."""
    check_version()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        import curvlinops
        from curvlinops import ekfac, kfac_utils  # noqa: F401  (their imports may warn)
    return curvlinops


# ---- operators ---------------------------------------------------------------------------------
def kronecker_operator(
    problem: CurvatureProblem,
    params: list[Tensor],
    data: Iterable[tuple[Any, Tensor]],
    options: KFACOptions,
    *,
    ekfac: bool,
    seed: int,
    progress: bool = False,
) -> Any:
    """``KFACLinearOperator`` (``ekfac``: ``EKFACLinearOperator``) on ``problem``, no pass yet.

    Args:
        problem: the task's curvature problem (model, loss, rows).
        params: the included parameters of ``problem.model``, in flat order.
        data: the re-iterable ``(X, y)`` batches of the factor pass (pass 0).
        options: fisher, mc_samples, approx and separate_weight_and_bias are used.
        ekfac: build the EK-FAC operator.
        seed: seed of the pseudo-targets (per loss row, :mod:`attribution_kfac.draws`).
        progress: show curvlinops' progress bars.
    """
    cls = operator_class(ekfac)
    return cls(
        problem.model,
        problem.loss_function,
        params,
        data,
        progressbar=progress,
        check_deterministic=False,
        seed=seed,
        fisher_type=options.fisher,
        mc_samples=options.mc_samples,
        kfac_approx=options.approx,
        num_per_example_loss_terms=1,
        separate_weight_and_bias=options.separate_weight_and_bias,
        num_data=problem.n_rows or None,
        batch_size_fn=problem.batch_size_fn,
    )


@functools.cache
def operator_class(ekfac: bool) -> type:
    """``KFACLinearOperator`` / ``EKFACLinearOperator`` drawing pseudo-targets per loss row.

    ``_loop_over_data`` (which every pass iterates) starts a :class:`PseudoTargets` per batch,
    counting rows from ``self._data.first_row`` in pass ``self._data.pass_index`` (0 for a plain
    iterable); ``draw_label`` (called ``mc_samples`` times per batch) draws from it.
    """
    cl = module()
    base = cl.EKFACLinearOperator if ekfac else cl.KFACLinearOperator

    class PerRowDraws(base):  # type: ignore[valid-type, misc]
        _draws: PseudoTargets | None = None

        def _loop_over_data(self, desc: str | None = None, add_device_to_desc: bool = True):
            index = getattr(self._data, "pass_index", 0)
            row = getattr(self._data, "first_row", 0)
            for X, y in super()._loop_over_data(desc, add_device_to_desc):
                self._draws = PseudoTargets(self._seed, index, row, y.shape[0])
                row += y.shape[0]
                yield X, y

        def draw_label(self, output: Tensor) -> Tensor:
            if self._draws is None:
                raise RuntimeError("draw_label outside a data pass")
            return self._draws.draw(self._loss_func, output)

    PerRowDraws.__name__ = PerRowDraws.__qualname__ = base.__name__
    return PerRowDraws


def ggn_operator(
    problem: CurvatureProblem,
    params: list[Tensor],
    data: Iterable[tuple[Any, Tensor]],
    progress: bool = False,
) -> Any:
    """``GGNLinearOperator`` of ``Σ_rows loss(f(x), y)`` on ``data`` (``op @ X``: ``(p, k)``)."""
    return module().GGNLinearOperator(
        problem.model,
        problem.loss_function,
        params,
        data,
        progressbar=progress,
        check_deterministic=False,
        num_data=problem.n_rows or None,
        batch_size_fn=problem.batch_size_fn,
    )


# ---- passes through an operator ----------------------------------------------------------------
def kronecker_factors(op: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run ``op``'s factor pass once and return ``(A, G)`` per layer name (module doc).

    Call once per fresh operator: a second call would add to the factors.
    """
    check_version()
    op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


def corrected_eigenvalues(
    op: Any,
    data: Iterable[tuple[Any, Tensor]],
    QA: dict[str, Tensor],
    QG: dict[str, Tensor],
) -> dict[str, dict[str, Tensor]]:
    """EK-FAC's eigenvalue correction of ``op`` on ``data``, in the eigenbases ``QA`` / ``QG``.

    ``op`` is an ``EKFACLinearOperator``; its Kronecker factors of the layers in ``QG`` are
    dropped (curvlinops rotates with the eigenvectors it finds, and only computes them itself
    when there are none), and the pass runs on ``data`` (a fresh pass object, not the one the
    operator was built with).

    Args:
        op: the EK-FAC operator.
        data: the batches of the correction pass (pass 1).
        QA: ``(d_a, d_a)`` input eigenbasis per layer with a weight, in the model's dtype.
        QG: ``(d_out, d_out)`` gradient eigenbasis per layer, in the model's dtype.

    Returns:
        ``{layer: {"joint": (d_out, d_in + 1)}}`` for ``[W | b]`` blocks, else
        ``{layer: {"weight": (d_out, d_in), "bias": (d_out,)}}`` (the parameters present).
    """
    check_version()
    for layer, qg in QG.items():
        op._gradient_covariances.pop(layer, None)
        op._input_covariances.pop(layer, None)
        op._gradient_covariances_eigenvectors[layer] = qg
        if layer in QA:
            op._input_covariances_eigenvectors[layer] = QA[layer]
    op._data = data
    op.compute_eigenvalue_correction()
    result: dict[str, dict[str, Tensor]] = {}
    for layer in QG:
        corrected = op._corrected_eigenvalues[layer]
        if isinstance(corrected, Tensor):
            result[layer] = {"joint": corrected}
        else:
            result[layer] = {part: corrected[pos] for part, pos in op._mapping[layer].items()}
    return result


def loss_hessian_sqrt() -> Callable[[Tensor, Tensor, nn.Module], Tensor]:
    """curvlinops' ``loss_hessian_matrix_sqrt(output, target, loss_func)``.

    For one row's output ``(1, C)`` and target (``(1,)`` or ``(1, C)``) it returns ``S: (C, C)``
    with ``S Sᵀ`` = the Hessian of the loss w.r.t. the output (the type-2 Fisher's factor).
    """
    return module().kfac_utils.loss_hessian_matrix_sqrt
