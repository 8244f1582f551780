"""Validation errors of the config models as one line per problem, with key paths and choices.

Re-exported from :mod:`attribution_core.config`, where the models live.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from attribution_core.errors import ConfigError


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "MethodConfig", "MeasurementConfig", "ComponentConfig") or "[" in str(
            part
        ):
            continue  # union-branch tags from pydantic
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    """One line per problem: ``key.path: message (got value)``."""
    lines = []
    seen = set()
    for err in exc.errors():
        path = _loc(err["loc"])
        if where:
            path = f"{where}.{path}" if path != "(root)" else where
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        key = (path, msg)
        if key in seen:
            continue
        seen.add(key)
        got = err.get("input")
        got_s = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        lines.append(f"{path}: {msg}{got_s}")
    return "; ".join(lines)


def _submodel(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The (nested) model class that owns the last key of ``loc``."""
    current = model
    for part in loc[:-1]:
        if not isinstance(part, str) or part not in current.model_fields:
            continue
        found = _find_model(current.model_fields[part].annotation)
        if found is None:
            break
        current = found
    return current


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _find_model(arg)) is not None:
            return found
    return None


def validate_model(model: type[BaseModel], data: dict[str, Any], *, where: str = "") -> BaseModel:
    """``model.model_validate(data)`` with a :class:`ConfigError` naming key paths and choices."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        msg = format_validation_error(exc, where)
        extra = [e for e in exc.errors() if e["type"] == "extra_forbidden"]
        if extra:
            owner = _submodel(model, extra[0]["loc"])
            msg += f" — valid keys: {', '.join(sorted(owner.model_fields))}"
        raise ConfigError(msg) from None
