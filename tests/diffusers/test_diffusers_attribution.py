"""Acceptance 1: a saved tiny ``UNet2DModel`` attributed through ``attribution attribute``.

grad-dot is checked against an independent autograd computation (diffusers' own U-Net and
scheduler, no wrapper, no vmap) on the same (t, ε) draws; kfac-influence is compared with
ggn-cg-influence by Spearman (printed, not asserted equal: K-FAC is not exact on a U-Net).
"""

from __future__ import annotations

import numpy as np
import torch
from attribution_diffusion.diffusers_task import DiffusersDDPMTask
from scipy.stats import spearmanr

from attribution_core import attribute
from attribution_core.gradients import example_noise
from attribution_core.testing import run_attribute

N_TRAIN, N_QUERY, N_SAMPLES = 10, 3, 2


def _config(model_dir, methods, **extra):
    return {
        "task": {
            "name": "ddpm-diffusers",
            "model_dir": str(model_dir),
            "n_train": N_TRAIN,
            "n_samples": N_SAMPLES,
        },
        "queries": {"count": N_QUERY, "seed": 1},
        "methods": methods,
        "dtype": "float64",
        "threads": 1,
        **extra,
    }


def _independent_loss_grads(unet, x, noise, alphas_cumprod):
    """Per-example ∇ of mean_s ‖ε − unet(x_t, t − 1)‖² over Linear/Conv2d parameters (loop)."""
    params = [
        p
        for m in unet.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        for p in m.parameters(recurse=False)
    ]
    rows = []
    for i in range(x.shape[0]):
        t, eps = noise["t"][i], noise["eps"][i]  # (S,), (S, C, H, W)
        ab = alphas_cumprod[t - 1].reshape(-1, 1, 1, 1)
        x_t = ab.sqrt() * x[i] + (1 - ab).sqrt() * eps
        loss = (eps - unet(x_t, t - 1).sample).pow(2).flatten(1).sum(1).mean()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_cli_kfac_trak_grad_dot(model_dir, tmp_path):
    cfg = _config(model_dir, ["kfac-influence", "trak", "grad-dot"])
    out = tmp_path / "out"
    code, output = run_attribute(cfg, out, "--quiet")
    assert code == 0, output
    scores = {m: np.load(out / m / "scores.npy") for m in ("kfac-influence", "trak", "grad-dot")}
    for name, s in scores.items():
        assert s.shape == (N_TRAIN, N_QUERY), name
        assert np.isfinite(s).all() and np.abs(s).sum() > 0, name
    queries = np.load(out / "queries.npz")
    assert queries["trajectory"].shape == (N_QUERY, 51, 1, 8, 8)  # x_T..x_0, T = 50


def test_grad_dot_equals_independent_autograd(model_dir):
    """attribute() in float64 (the CLI's files are float32) vs diffusers' U-Net + autograd."""
    from diffusers import DDPMScheduler, UNet2DModel

    cfg = _config(model_dir, ["grad-dot"])
    res = attribute(cfg)
    scores = res.scores["grad-dot"]
    assert scores.shape == (N_TRAIN, N_QUERY) and scores.dtype == np.float64

    # diffusers' own U-Net (default attention processor) and the scheduler's betas; no wrapper
    unet = UNet2DModel.from_pretrained(str(model_dir / "unet"), local_files_only=True).double()
    sched = DDPMScheduler.from_pretrained(str(model_dir / "scheduler"), local_files_only=True)
    alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), 0)
    options = {k: v for k, v in cfg["task"].items() if k != "name"}
    task = DiffusersDDPMTask(dtype=torch.float64, **options)
    measurement = task.training_loss()  # only its draw(): the (t, ε) the core uses
    x_train, x_query = task.train_data()["x"], res.queries["x"]
    g_train = _independent_loss_grads(
        unet, x_train, example_noise(measurement, {"x": x_train}, 0, "train", 0), alphas_cumprod
    )
    g_query = _independent_loss_grads(
        unet, x_query, example_noise(measurement, {"x": x_query}, 0, "query", 0), alphas_cumprod
    )
    expected = (g_train @ g_query.T).numpy()
    # float64 on both sides; they differ only in summation order and attention kernels
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def test_kfac_vs_ggn_cg_spearman(model_dir):
    """Same damping for both (absolute 1.0 in units of L_D); Spearman per query is printed."""
    damping = {"damping": 1.0, "damping_mode": "absolute"}
    cfg = _config(
        model_dir,
        [
            {"name": "kfac-influence", **damping},
            {"name": "ggn-cg-influence", **damping, "rtol": 1e-5, "maxiter": 100},
        ],
    )
    res = attribute(cfg)
    a, b = res.scores["kfac-influence"], res.scores["ggn-cg-influence"]
    assert a.shape == b.shape == (N_TRAIN, N_QUERY)
    rho = [spearmanr(a[:, q], b[:, q])[0] for q in range(N_QUERY)]
    print("kfac-influence vs ggn-cg-influence Spearman per query:", np.round(rho, 3))
    assert np.isfinite(rho).all()
