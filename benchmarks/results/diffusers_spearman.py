"""kfac-influence vs ggn-cg-influence (and grad-dot, trak) on a random-weight diffusers U-Net.

.venv/bin/python benchmarks/results/diffusers_spearman.py   (figures: benchmarks/results/diffusers.md)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from attribution_core import attribute

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "diffusers"))
from conftest import save_tiny

torch.set_num_threads(1)
root = save_tiny(
    Path(tempfile.mkdtemp()), block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=8
)
for dmp in [1.0]:
    t0 = time.time()
    damping = {"damping": dmp, "damping_mode": "absolute"}
    methods = [
        {"name": "kfac-influence", **damping},
        {"name": "ggn-cg-influence", **damping, "rtol": 1e-5, "maxiter": 300},
        "grad-dot",
        "trak",
    ]
    task = {"name": "ddpm-diffusers", "model_dir": str(root), "n_train": 32, "n_samples": 4}
    cfg = {"task": task, "queries": {"count": 6, "seed": 1}, "dtype": "float64"}
    r = attribute({**cfg, "methods": methods, "threads": 1})
    a, b = r.scores["kfac-influence"], r.scores["ggn-cg-influence"]
    g = r.scores["grad-dot"]
    rho = [spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])]
    rho_g = [spearmanr(g[:, q], b[:, q])[0] for q in range(a.shape[1])]
    wall = round(time.time() - t0, 1)
    print(f"damping {dmp} wall {wall} s; Spearman kfac vs ggn-cg per query", np.round(rho, 3))
    print("  grad-dot vs ggn-cg", np.round(rho_g, 3))
    for k, m in r.manifests.items():
        print("  ", k, {x: round(v, 2) for x, v in m["timings"].items()})
