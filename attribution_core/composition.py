"""Which compositions of scorer, Hessian and compressor are valid, and what each computes.

For the ``influence`` scorer (``g`` = per-example gradients, ``Φ`` a projection, ``F_Φ`` the
projected Fisher, ``C`` the compressor)::

    Hessian space / compressor       query side          training side
    parameter / none or int8         C(H⁻¹ g_q)          g_j (unchanged)
    parameter / projection           Φᵀ H⁻¹ g_q          Φᵀ g_j
    compressed / projection          F_Φ⁻¹ Φᵀ g_q        Φᵀ g_j            (TRAK)
    compressed / none                F⁻¹ g_q             g_j               (dense empirical Fisher)

Everything else fails before any work, with a message listing these: a compressed-space
Hessian with a compressor that is neither a sketch nor ``none`` (int8), and any Hessian or
compressor given to a scorer that does not compose them (similarity, retraining, CLIP, pixel).
``ensemble`` needs a gradient-based scorer.

Capabilities are read from the registered classes: ``HessianApproximation.space``,
``GradientCompressor.sketch``, ``Scorer.accepts`` and ``Scorer.gradient_based``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attribution_core.errors import ConfigError

if TYPE_CHECKING:
    from attribution_core.registry import Registry

COMPONENT_KINDS = ("scorer", "hessian", "compressor")
"""The components of a method, in resolution order."""


def valid_combinations(registry: Registry) -> str:
    """The valid compositions, in words, with the registered names of each class."""
    by_space: dict[str, list[str]] = {"parameter": [], "compressed": []}
    for c in registry.components("hessian"):
        by_space[getattr(c.factory, "space", "parameter")].append(c.name)
    sketches = [c.name for c in registry.components("compressor") if _sketch(c.factory)]
    composing = [
        c.name for c in registry.components("scorer") if getattr(c.factory, "accepts", None)
    ]
    others = [c.name for c in registry.components("scorer") if c.name not in composing]
    compressors = [c.name for c in registry.components("compressor")]
    return (
        f"scorer {' | '.join(composing)} with a parameter-space hessian "
        f"({' | '.join(by_space['parameter'])}) and any compressor ({' | '.join(compressors)}); "
        f"with a compressed-space hessian ({' | '.join(by_space['compressed'])}) and compressor "
        f"{' | '.join([*sketches, 'none'])}; scorers {' | '.join(others)} take no hessian and no "
        f"compressor"
    )


def check_composition(
    names: dict[str, str | None], ensemble: int | None, registry: Registry, *, where: str
) -> None:
    """Refuse an invalid combination of components before any work.

    Args:
        names: ``{"scorer": ..., "hessian": ... | None, "compressor": ... | None}``.
        ensemble: ``models`` of ``ensemble: {models: M}``, or None.
        registry: where the component classes are looked up.
        where: key path for messages (``methods[2]``).

    Raises:
        ConfigError: naming the offending component and listing the valid combinations.
    """
    if not names.get("scorer"):
        raise ConfigError(f"{where}.scorer: required when the entry has no preset `name`")
    scorer = registry.get("scorer", names["scorer"], where=f"{where}.scorer").factory
    accepts = getattr(scorer, "accepts", frozenset())
    for kind in ("hessian", "compressor"):
        if names.get(kind) and kind not in accepts:
            raise ConfigError(
                f"{where}.{kind}: scorer {names['scorer']!r} takes no {kind} (got "
                f"{names[kind]!r}); valid combinations: {valid_combinations(registry)}"
            )
    if names.get("hessian") and names.get("compressor"):
        hessian = registry.get("hessian", names["hessian"]).factory
        compressor = registry.get("compressor", names["compressor"]).factory
        space = getattr(hessian, "space", "parameter")
        if space == "compressed" and not _sketch(compressor) and names["compressor"] != "none":
            raise ConfigError(
                f"{where}.compressor: {names['compressor']!r} cannot feed the compressed-space "
                f"hessian {names['hessian']!r} (it needs a sketch of the gradients, or none); "
                f"valid combinations: {valid_combinations(registry)}"
            )
    if ensemble is not None and not getattr(scorer, "gradient_based", False):
        raise ConfigError(
            f"{where}.ensemble: scorer {names['scorer']!r} is not gradient-based, so there is "
            f"nothing to average over models; ensembles take scorers "
            f"{', '.join(_gradient_based(registry))}"
        )


def _sketch(factory: Any) -> bool:
    return bool(getattr(factory, "sketch", False))


def _gradient_based(registry: Registry) -> list[str]:
    return [
        c.name for c in registry.components("scorer") if getattr(c.factory, "gradient_based", False)
    ]
