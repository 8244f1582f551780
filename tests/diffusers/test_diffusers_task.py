"""The ddpm-diffusers task's hooks: wrapper, schedule, training (vmapped ensemble), sampling, curvature."""

from __future__ import annotations

import pytest
import torch
from attribution_diffusion.diffusers_task import DiffusersDDPMTask

TRAIN = {"n_train": 6, "n_samples": 2, "train_steps": 3, "batch_size": 4, "lr": 1e-3}


@pytest.fixture
def task(model_dir) -> DiffusersDDPMTask:
    return DiffusersDDPMTask(dtype=torch.float64, model_dir=str(model_dir), **TRAIN)


def test_forward_maps_t_to_t_minus_1_and_schedule_is_schedulers(task, model_dir):
    from diffusers import DDPMScheduler, UNet2DModel

    model = task.base_model(0)
    unet = UNet2DModel.from_pretrained(str(model_dir / "unet"), local_files_only=True).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([1, 25, 50])
    # float64; plain vs default attention processors differ only by rounding
    torch.testing.assert_close(model(x, t), unet(x, t - 1).sample, rtol=1e-10, atol=1e-12)
    sched = DDPMScheduler.from_pretrained(str(model_dir / "scheduler"), local_files_only=True)
    assert task.schedule.T == 50
    torch.testing.assert_close(task.schedule.beta[1:], sched.betas.double())
    torch.testing.assert_close(
        task.schedule.alpha_bar[1:], torch.cumprod(1 - sched.betas.double(), 0)
    )


def test_train_ensemble_vmap_equals_separate_train(task):
    """UNet2DModel runs under stack_module_state + vmap: the ensemble equals separate calls."""
    weights = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1]], dtype=torch.float64)
    seeds = [3, 4]
    together = task.train_ensemble(weights, seeds)
    for model, w, s in zip(together, weights, seeds, strict=True):
        alone = task.train(task.build_model(s), w, s)
        for (name, a), b in zip(model.named_parameters(), alone.parameters(), strict=True):
            # float64; vmap and the plain forward differ only by summation order
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    fresh = task.build_model(3)
    moved = [
        not torch.equal(a, b)
        for a, b in zip(fresh.parameters(), together[0].parameters(), strict=True)
    ]
    assert any(moved)


def test_sampling_through_scheduler(task):
    model = task.base_model(0)
    q1 = task.make_queries(model, 2, seed=5)
    q2 = task.make_queries(model, 2, seed=5)
    assert q1["trajectory"].shape == (2, 51, 1, 8, 8)
    torch.testing.assert_close(q1["trajectory"][:, -1], q1["x"], rtol=0, atol=0)
    torch.testing.assert_close(q1["x"], q2["x"], rtol=0, atol=0)  # same seed, same bits
    assert not torch.equal(task.make_queries(model, 2, seed=6)["x"], q1["x"])


def test_sampling_step_is_ddpm_posterior(task):
    """One scheduler step from x_t: mean μ_θ(x_t, t) of our schedule (variance β̃_t)."""
    from attribution_diffusion.diffusers_model import sample_with_scheduler

    zero = torch.nn.Module()
    zero.forward = lambda x, t: torch.zeros_like(x)  # ε_θ = 0: x_{t-1} = x_t/√α_t + σ_t z
    _, traj = sample_with_scheduler(
        zero,
        task.scheduler_config,
        4000,
        (1, 1, 1),
        0,
        dtype=torch.float64,
        device=torch.device("cpu"),
        trajectory=True,
    )
    s = task.schedule
    prev = traj[:, 0] / s.alpha[50].sqrt()
    resid = traj[:, 1] - prev
    # Monte-Carlo std of a 4000-draw variance estimate ≈ √(2/4000) ≈ 2.2 % → allow 10 %
    assert abs(float(resid.var()) / float(s.beta_tilde[50]) - 1) < 0.1
    assert abs(float(resid.mean())) < 4 * float(s.beta_tilde[50].sqrt()) / 4000**0.5


def test_curvature_problem_shapes(task):
    model = task.base_model(0)
    problem = task.curvature_problem(model, seed=0, n_samples=2)
    inputs, targets = next(iter(problem.batches(0)))
    out = problem.model(inputs)
    assert out.shape == targets.shape == (12, 64)  # N·S rows, C·H·W outputs
    assert problem.scale == pytest.approx(1 / 12)
    assert problem.batch_size_fn(inputs) == 12


def test_built_from_config_trains(model_dir):
    """No model_dir: a UNet2DModel config dict; the base model is trained from scratch."""
    import json

    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    task = DiffusersDDPMTask(
        dtype=torch.float64, unet=unet, scheduler={"num_train_timesteps": 20}, **TRAIN
    )
    assert task.schedule.T == 20
    base = task.base_model(1)
    fresh = task.build_model(1)
    assert any(
        not torch.equal(a, b) for a, b in zip(base.parameters(), fresh.parameters(), strict=True)
    )
    assert "model_sha256" not in task.describe()


def test_describe_fingerprints_weights(model_dir, make_model_dir):
    a = DiffusersDDPMTask(model_dir=str(model_dir), n_train=2).describe()
    other = make_model_dir(seed=1)
    b = DiffusersDDPMTask(model_dir=str(other), n_train=2).describe()
    assert a["model_sha256"] != b["model_sha256"]
