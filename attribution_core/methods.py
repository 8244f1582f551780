"""Method presets, and the one function that resolves a method entry into a read-only spec.

A preset (registered with kind ``"method"``) names a scorer, a Hessian approximation, a
compressor and the two functions. A config entry may

* override options: ``{name: trak, damping: 0.1, proj_dim: 2048}`` routes each flat key to the
  one component of the method that declares it;
* replace components: ``{name: kfac-influence, compressor: none}``,
  ``{name: trak, hessian: {name: kfac, damping: 1e-6}}`` (the replaced component's preset
  defaults are dropped);
* name its components directly: ``{label: x, scorer: influence, hessian: {name: ekfac},
  compressor: {name: projection, proj_dim: 4096}}``;
* average over independently trained models: ``ensemble: {models: M}``.

:func:`resolve_method` validates all of it against the registry, before any work, and returns
a frozen :class:`MethodSpec`; :mod:`attribution_core.composition` says which combinations are
valid. :func:`attribution_core.build.build_method` turns a spec into a built ``Method``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from attribution_core.composition import COMPONENT_KINDS, check_composition
from attribution_core.config import (
    ComponentConfig,
    MeasurementConfig,
    MethodConfig,
    as_measurement,
    label_of,
    validate_model,
)
from attribution_core.errors import ConfigError

if TYPE_CHECKING:
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
        defaults: default options, routed like user overrides (user overrides win); the
            defaults of a component the entry replaces are dropped.
        ensemble: default ``{models: M}`` (None: one model).
        help: one line for ``attribution list``.
    """

    name: str
    scorer: str
    hessian: str | None = None
    compressor: str | None = None
    train_function: str | dict[str, Any] = "loss"
    query_function: str | dict[str, Any] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    ensemble: dict[str, Any] | None = None
    help: str = ""

    def composition(self, registry: Registry | None = None) -> str:
        """One line: ``influence · hessian kfac · compressor int8 · loss / target``.

        With a registry, the functions are shown only for gradient-based scorers (the others,
        such as CLIP or retraining, do not differentiate them).
        """
        parts = [self.scorer]
        parts += [
            f"{kind} {name}"
            for kind, name in (("hessian", self.hessian), ("compressor", self.compressor))
            if name
        ]
        if self.ensemble:
            parts.append(f"ensemble of {self.ensemble.get('models')}")
        scorer = registry.get("scorer", self.scorer).factory if registry is not None else None
        if scorer is None or getattr(scorer, "gradient_based", False):
            query = self.query_function if self.query_function is not None else "target"
            parts.append(f"{_ref_name(self.train_function)} / {_ref_name(query)}")
        return " · ".join(parts)


@dataclass(frozen=True)
class ComponentSpec:
    """A resolved component: its registered name and its complete, validated options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def describe(self) -> dict[str, Any]:
        """``{name, **options}`` (JSON-able)."""
        return {"name": self.name, **self.options}


@dataclass(frozen=True)
class MethodSpec:
    """A method entry with every name resolved and every option validated (read-only).

    The seed lives here and only here. Nothing is built yet: building needs the task
    (measurements are task-specific), see :func:`attribution_core.build.build_method`.

    Attributes:
        label: output directory and ``lds.csv`` row.
        name: the preset's name, or the label when the entry named its components directly.
        seed: seed of every random choice of the method.
        scorer: the scorer and its options.
        hessian: the Hessian approximation and its options, or None.
        compressor: the compressor and its options, or None.
        train_function: measurement standing for ∇ℓ(θ, x_j).
        query_function: measurement differentiated on the queries; None = the run's target.
        ensemble_models: M of ``ensemble: {models: M}``, or None.
    """

    label: str
    name: str
    seed: int
    scorer: ComponentSpec
    hessian: ComponentSpec | None
    compressor: ComponentSpec | None
    train_function: MeasurementConfig
    query_function: MeasurementConfig | None
    ensemble_models: int | None = None

    def member(self, index: int) -> MethodSpec:
        """Ensemble member ``index``: the same method, one model, seed ``seed + index``."""
        return replace(self, seed=self.seed + index, ensemble_models=None)

    def option(self, key: str) -> Any:
        """The value of option ``key`` in the Hessian's, then the scorer's options (or None)."""
        for comp in (self.hessian, self.scorer):
            if comp is not None and comp.options.get(key) is not None:
                return comp.options[key]
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-able resolved configuration (recorded in ``manifest.json``)."""
        out = {
            "label": self.label,
            "method": self.name,
            "seed": self.seed,
            "scorer": self.scorer.describe(),
            "hessian": self.hessian.describe() if self.hessian else None,
            "compressor": self.compressor.describe() if self.compressor else None,
            "train_function": self.train_function.model_dump(),
            "query_function": self.query_function.model_dump() if self.query_function else "target",
        }
        if self.ensemble_models is not None:
            out["ensemble"] = {"models": self.ensemble_models}
        return out


def resolve_method(
    entry: str | dict[str, Any] | MethodConfig, registry: Registry, *, run_seed: int, where: str
) -> MethodSpec:
    """Resolve a config entry into a :class:`MethodSpec`; validates every name and option.

    Raises:
        ConfigError: unknown method or component, invalid composition (lists the valid ones),
            unknown or ambiguous override key (lists the valid keys), bad value.
    """
    if isinstance(entry, str):
        cfg = MethodConfig(name=entry)
    elif isinstance(entry, dict):
        cfg = validate_model(MethodConfig, entry, where=where)
    else:
        cfg = entry
    preset = _preset_of(cfg, registry, where)
    names = {kind: getattr(preset, kind) for kind in COMPONENT_KINDS}
    replaced: dict[str, dict[str, Any]] = {}
    for kind in COMPONENT_KINDS:
        ref = getattr(cfg, kind)
        if ref is not None:
            comp = ComponentConfig(name=ref) if isinstance(ref, str) else ref
            registry.get(kind, comp.name, where=f"{where}.{kind}")
            names[kind] = comp.name
            replaced[kind] = comp.options
    ensemble = cfg.ensemble.models if cfg.ensemble else (preset.ensemble or {}).get("models")
    check_composition(names, ensemble, registry, where=where)
    kinds = [k for k in COMPONENT_KINDS if names[k]]
    fields = {
        k: set(
            _options_model(registry, k, names[k]).model_fields
            if _options_model(registry, k, names[k])
            else ()
        )
        for k in kinds
    }
    routed: dict[str, dict[str, Any]] = {k: {} for k in kinds}
    defaults = {k: v for k, v in preset.defaults.items()}
    for source, what in ((defaults, "preset default"), (cfg.options, "option")):
        for key, value in source.items():
            targets = [k for k in kinds if key in fields[k]]
            if what == "preset default":
                targets = [k for k in targets if k not in replaced]
                if not targets:
                    continue  # belonged to a replaced component
            _check_target(key, targets, fields, cfg, where)
            routed[targets[0]][key] = value
    for kind, opts in replaced.items():
        routed[kind].update(opts)
    specs = {
        k: ComponentSpec(
            names[k],
            MappingProxyType(
                registry.validate_options(
                    k, names[k], routed[k], where=f"{where}.{k}" if k in replaced else where
                )
            ),
        )
        for k in kinds
    }
    train_fn = cfg.train_function if cfg.train_function is not None else preset.train_function
    query_fn = cfg.query_function if cfg.query_function is not None else preset.query_function
    functions = {
        "train_function": _measurement(train_fn),
        "query_function": None if query_fn is None else _measurement(query_fn),
    }
    for role, ref in functions.items():
        if ref is not None:
            registry.validate_options("measurement", ref.name, ref.options, where=f"{where}.{role}")
    return MethodSpec(
        label=label_of(cfg),
        name=cfg.name or label_of(cfg),
        seed=run_seed if cfg.seed is None else cfg.seed,
        scorer=specs["scorer"],
        hessian=specs.get("hessian"),
        compressor=specs.get("compressor"),
        train_function=functions["train_function"],
        query_function=functions["query_function"],
        ensemble_models=ensemble,
    )


def _preset_of(cfg: MethodConfig, registry: Registry, where: str) -> MethodPreset:
    """The entry's preset, or an empty one for entries that name their components directly."""
    if cfg.name is not None:
        return registry.get("method", cfg.name, where=f"{where}.name").factory
    return MethodPreset(label_of(cfg), scorer="")


def _options_model(registry: Registry, kind: str, name: str) -> Any:
    return registry.get(kind, name).options


def _check_target(
    key: str, targets: list[str], fields: dict[str, set[str]], cfg: MethodConfig, where: str
) -> None:
    """A flat option must belong to exactly one of the method's components."""
    method = cfg.name or label_of(cfg)
    if not targets:
        valid = sorted(set().union(*fields.values()) | set(MethodConfig.model_fields))
        raise ConfigError(
            f"{where}.{key}: unknown option for method {method!r}; valid keys: {', '.join(valid)}"
        )
    if len(targets) > 1:
        nested = " or ".join(f"`{k}: {{name: ..., {key}: ...}}`" for k in targets)
        raise ConfigError(
            f"{where}.{key}: ambiguous option for method {method!r}: declared by its "
            f"{' and '.join(targets)}; give it nested under its component, e.g. {nested}"
        )


def _measurement(ref: str | dict[str, Any] | MeasurementConfig) -> MeasurementConfig:
    if isinstance(ref, dict):
        return MeasurementConfig(**ref)
    return as_measurement(ref)


def _ref_name(ref: str | dict[str, Any]) -> str:
    return ref if isinstance(ref, str) else str(ref.get("name"))
