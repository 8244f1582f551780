"""Named method presets and their resolution into concrete components.

A preset (registered with kind ``"method"``) names a scorer, a Hessian approximation, a
compressor and the two functions. A config entry ``{name: trak, damping: 0.1, proj_dim: 2048}``
routes each override to whichever of the preset's components declares that field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attribution_core.config import MeasurementConfig, MethodConfig, as_measurement, label_of
from attribution_core.errors import ConfigError

if TYPE_CHECKING:
    from attribution_core.interfaces import GradientCompressor, HessianApproximation, Measurement
    from attribution_core.registry import Registry


@dataclass(frozen=True)
class MethodPreset:
    """A named method: which components, with which default options.

    Attributes:
        name: method name (``"kfac-influence"``).
        scorer: scorer name (``"influence"``, ``"similarity"``, ...).
        hessian: Hessian approximation name, or None.
        compressor: compressor name, or None.
        train_function: measurement standing for ∇ℓ(θ, x_j) (default: the task's ``loss``).
        query_function: measurement differentiated on the queries; None = the run's target.
        defaults: default options, routed like user overrides (user overrides win).
        help: one line for ``attribution list``.
    """

    name: str
    scorer: str
    hessian: str | None = None
    compressor: str | None = None
    train_function: str | dict[str, Any] = "loss"
    query_function: str | dict[str, Any] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    help: str = ""


@dataclass
class ResolvedMethod:
    """A method entry with every name resolved and every option validated.

    The ``*_options`` dicts are complete (defaults filled in). ``hessian``, ``compressor``,
    ``train_function`` and ``query_function`` are the built components (filled in by
    :func:`attribution_core.pipeline.build_method` once the task exists).
    """

    label: str
    name: str
    seed: int
    scorer_name: str
    scorer_options: dict[str, Any]
    hessian_name: str | None
    hessian_options: dict[str, Any]
    compressor_name: str | None
    compressor_options: dict[str, Any]
    train_function_config: MeasurementConfig
    query_function_config: MeasurementConfig | None
    hessian: HessianApproximation | None = None
    compressor: GradientCompressor | None = None
    train_function: Measurement | None = None
    query_function: Measurement | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-able resolved configuration (recorded in ``manifest.json``)."""
        return {
            "label": self.label,
            "method": self.name,
            "seed": self.seed,
            "scorer": {"name": self.scorer_name, **self.scorer_options},
            "hessian": {"name": self.hessian_name, **self.hessian_options}
            if self.hessian_name
            else None,
            "compressor": {"name": self.compressor_name, **self.compressor_options}
            if self.compressor_name
            else None,
            "train_function": self.train_function_config.model_dump(),
            "query_function": self.query_function_config.model_dump()
            if self.query_function_config
            else "target",
        }


def resolve_method(
    entry: str | MethodConfig, registry: Registry, *, run_seed: int, where: str
) -> ResolvedMethod:
    """Resolve a config entry against its preset; validates every option.

    Raises:
        ConfigError: unknown method, unknown override key (lists the valid keys), bad value.
    """
    cfg = MethodConfig(name=entry) if isinstance(entry, str) else entry
    preset: MethodPreset = registry.get("method", cfg.name, where=f"{where}.name").factory
    parts: list[tuple[str, str]] = [("scorer", preset.scorer)]
    if preset.hessian:
        parts.append(("hessian", preset.hessian))
    if preset.compressor:
        parts.append(("compressor", preset.compressor))
    fields = {
        kind: set(opt.model_fields) if (opt := registry.get(kind, name).options) else set()
        for kind, name in parts
    }
    routed: dict[str, dict[str, Any]] = {kind: {} for kind, _ in parts}
    for source in (preset.defaults, cfg.options):
        for key, value in source.items():
            targets = [kind for kind, _ in parts if key in fields[kind]]
            if not targets:
                valid = sorted(set().union(*fields.values()) | set(MethodConfig.model_fields))
                raise ConfigError(
                    f"{where}.{key}: unknown option for method {cfg.name!r}; valid keys: "
                    f"{', '.join(valid)}"
                )
            for kind in targets:
                routed[kind][key] = value
    names = dict(parts)
    opts = {
        kind: registry.validate_options(kind, names[kind], routed[kind], where=where)
        for kind, _ in parts
    }
    train_fn = cfg.train_function if cfg.train_function is not None else preset.train_function
    query_fn = cfg.query_function if cfg.query_function is not None else preset.query_function
    return ResolvedMethod(
        label=label_of(cfg),
        name=cfg.name,
        seed=run_seed if cfg.seed is None else cfg.seed,
        scorer_name=preset.scorer,
        scorer_options=opts["scorer"],
        hessian_name=preset.hessian,
        hessian_options=opts.get("hessian", {}),
        compressor_name=preset.compressor,
        compressor_options=opts.get("compressor", {}),
        train_function_config=_measurement(train_fn),
        query_function_config=None if query_fn is None else _measurement(query_fn),
    )


def _measurement(ref: str | dict[str, Any] | MeasurementConfig) -> MeasurementConfig:
    if isinstance(ref, dict):
        return MeasurementConfig(**ref)
    return as_measurement(ref)
