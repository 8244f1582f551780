"""Bring your own classifier: wrap an nn.Module + data + loss and attribute with any method.

python examples/own_classifier.py [--small]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from attribution_core import attribute
from attribution_core.wrap import ModuleTask

small = "--small" in sys.argv
digits = load_digits()
X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
n_train = 200 if small else 1000


def make_model(seed: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


task = ModuleTask(
    model_fn=make_model,
    train_data={"x": X[:n_train], "y": y[:n_train]},
    loss="cross-entropy",
    queries={"x": X[1500:], "y": y[1500:]},
    steps=100 if small else 600,
    lr=1e-2,
    l2=1e-3,
)
config = {
    "queries": {"count": 4},
    "methods": ["grad-dot", {"name": "dense-influence", "curvature": "ggn", "damping": 1e-3}],
}
result = attribute(config, task=task)
for label, scores in result.scores.items():
    top = np.argsort(-scores[:, 0])[:5]
    print(
        f"{label}: scores {scores.shape}; query 0 (label {int(y[1500])}) top helpers:",
        [(int(j), int(y[j])) for j in top],
    )
