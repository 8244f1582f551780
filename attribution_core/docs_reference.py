"""Generate the config reference (docs/config-reference.md) from the pydantic models.

The page is never hand-copied: ``python -m attribution_core.docs_reference > docs/config-reference.md``
regenerates it and a test fails when it is stale.
"""

from __future__ import annotations

import sys
from typing import Any, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

import attribution_core.config as c
from attribution_core.config import RunConfig
from attribution_core.registry import Registry, get_registry


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is not None:
        text = str(annotation)
    else:
        text = getattr(annotation, "__name__", None) or str(annotation)
    text = text.replace("typing.", "").replace("attribution_core.config.", "")
    return text.replace(" | ", " or ")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return "see below"
    return f"`{field.default!r}`"


def model_table(model: type[BaseModel]) -> list[str]:
    """Markdown table rows: field, type, default, description."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | `{_type_name(field.annotation)}` | {_default(field)} | {desc} |")
    return rows


def render(registry: Registry | None = None) -> str:
    """The whole reference page."""
    reg = registry or get_registry()
    out = [
        "# Config reference",
        "",
        "Generated from the pydantic models by `python -m attribution_core.docs_reference`; do not "
        "edit by hand. Unknown keys are errors everywhere.",
        "",
    ]
    sections = [
        ("Run config (top level)", RunConfig),
        ("`queries`", c.QueriesConfig),
        ("`model`", c.ModelConfig),
        ("`evaluation`", c.EvaluationConfig),
        ("`evaluation.lds`", c.LDSConfig),
        ("`evaluation.counterfactual`", c.CounterfactualConfig),
        ("Method entries (`methods[i]`, besides the routed component options)", c.MethodConfig),
        ("`methods[i].hessian`, `.compressor`, `.scorer` (as a mapping)", c.ComponentConfig),
        ("`methods[i].ensemble`", c.EnsembleConfig),
    ]
    for title, model in sections:
        out += [f"## {title}", "", *model_table(model), ""]
    titles = {
        "task": "Tasks",
        "measurement": "Measurements",
        "hessian": "Hessian approximations",
        "compressor": "Compressors",
        "scorer": "Scorers",
        "executor": "Executors",
    }
    for kind, title in titles.items():
        out += [f"## {title}", ""]
        for comp in reg.components(kind):
            out += [f"### `{comp.name}` ({comp.plugin})", "", comp.help, ""]
            if comp.options is not None and comp.options.model_fields:
                out += [*model_table(comp.options), ""]
    out += [
        "## Methods (presets)",
        "",
        "Any component may be replaced, or a method composed directly; the valid combinations "
        "are in [Composing methods](composing-methods.md).",
        "",
        "| method | scorer | hessian | compressor | train_function | query_function | defaults "
        "| ensemble |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for comp in reg.components("method"):
        p = comp.factory
        out.append(
            f"| `{p.name}` | {p.scorer} | {p.hessian or '–'} | {p.compressor or '–'} | "
            f"{p.train_function} | {p.query_function or 'target'} | {p.defaults or ''} | "
            f"{p.ensemble or ''} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
