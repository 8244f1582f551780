"""A custom baseline plugin used without installing anything: register it on a fresh registry.

python examples/custom_baseline.py
"""

from __future__ import annotations

import torch

from attribution_core import Component, MethodPreset, Scorer, attribute, get_registry, hookimpl


class LabelMatch(Scorer):
    """+1 when a training example shares the query's label, else 0 (a 'no model' baseline)."""

    name = "label-match"

    def __init__(self, parts):
        pass

    def scores(self, task, model, queries, context):
        """(n_train, n_query) float in {0, 1}."""
        y_train = task.train_data()["y"]
        return (y_train[:, None] == queries["y"][None, :]).to(torch.float32)


class LabelMatchPlugin:
    @hookimpl
    def attribution_register_components(self):
        return [
            Component("scorer", "label-match", LabelMatch, "1 if labels match."),
            Component(
                "method",
                "label-match",
                MethodPreset("label-match", "label-match"),
                "Baseline: same label as the query.",
            ),
        ]


registry = get_registry([LabelMatchPlugin()])
result = attribute(
    {
        "task": {"name": "digits-classifier", "n_train": 100, "steps": 50},
        "queries": {"count": 3},
        "target": "cross-entropy",
        "methods": ["label-match", "grad-cosine"],
    },
    registry=registry,
)
agree = (result.scores["label-match"] * result.scores["grad-cosine"]).sum(0)
print(
    "label-match scores",
    result.scores["label-match"].shape,
    "grad-cosine mass on same label:",
    agree.round(2),
)
