"""The diffusion measurements and curvature hooks against mathematics (float64, T = 10).

Schedules, weights and Gaussian log-densities are recomputed here from their textbook
definitions (Ho et al. 2020), not taken from the plugin.
"""

from __future__ import annotations

import math

import torch
from attribution_diffusion.measurements import NegELBO, TimestepLoss, TrajectoryNLL
from torch.distributions import Normal
from torch.func import functional_call, jacrev

from attribution_core import get_registry
from attribution_core.builtin.hessians import dense_ggn
from attribution_core.gradients import per_example_gradients, select_parameters


def reference_schedule(T: int, b0: float = 1e-4, b1: float = 0.02):
    """β, α, ᾱ, β̃ as Python lists indexed 1..T (index 0 unused)."""
    beta = [0.0] + [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
    alpha = [1.0 - b for b in beta]
    abar = [1.0]
    for t in range(1, T + 1):
        abar.append(abar[-1] * alpha[t])
    btilde = [0.0, 0.0] + [(1 - abar[t - 1]) / (1 - abar[t]) * beta[t] for t in range(2, T + 1)]
    return beta, alpha, abar, btilde


def eps_sq(model, x0, t: int, eps, abar) -> torch.Tensor:
    """‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² per row, computed directly."""
    x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps
    pred = model(x_t, torch.full((x0.shape[0],), t, dtype=torch.int64))
    return (eps - pred).pow(2).flatten(1).sum(1)


def test_neg_elbo_is_weighted_timestep_losses_plus_constant(task, model):
    T, x = task.schedule.T, task.train_data()["x"][:3]
    beta, alpha, abar, btilde = reference_schedule(T)
    elbo = NegELBO(task.schedule, n_samples=2, timesteps="all")
    noise = elbo.draw({"x": x}, torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = elbo.evaluate(model, {"x": x}, noise)
        # same ε draws: row s·T + (t−1) of the enumeration holds timestep t of draw s
        expected = torch.zeros(3, dtype=torch.float64)
        for t in range(1, T + 1):
            eps_t = noise["eps"][:, t - 1 :: T]  # (B, 2, C, H, W)
            lt = torch.stack([eps_sq(model, x, t, eps_t[:, s], abar) for s in range(2)], 1).mean(1)
            sub = {"t": noise["t"][:, t - 1 :: T], "eps": eps_t}
            plugin_lt = TimestepLoss(task.schedule, 2, t=t).evaluate(model, {"x": x}, sub)
            torch.testing.assert_close(plugin_lt, lt, rtol=1e-12, atol=1e-12)
            w = (
                1 / (2 * alpha[1])
                if t == 1
                else beta[t] ** 2 / (2 * btilde[t] * alpha[t] * (1 - abar[t]))
            )
            expected += w * lt
        expected += 0.5 * 64 * math.log(2 * math.pi * beta[1])  # documented L_0 constant
    # exact identity in float64: only summation order differs
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


def test_l0_term_is_gaussian_reconstruction_nll(task, model):
    """ℓ_1/(2α_1) + (D/2)log(2πβ_1) = −log N(x_0; μ_θ(x_1, 1), β_1 I) for the same ε."""
    beta, alpha, abar, _ = reference_schedule(task.schedule.T)
    x = task.train_data()["x"][:2]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    with torch.no_grad():
        x1 = math.sqrt(abar[1]) * x + math.sqrt(1 - abar[1]) * eps
        pred = model(x1, torch.ones(2, dtype=torch.int64))
        mu = (x1 - beta[1] / math.sqrt(1 - abar[1]) * pred) / math.sqrt(alpha[1])
        nll = -Normal(mu, math.sqrt(beta[1])).log_prob(x).flatten(1).sum(1)
        lhs = eps_sq(model, x, 1, eps, abar) / (2 * alpha[1]) + 32 * math.log(2 * math.pi * beta[1])
    torch.testing.assert_close(lhs, nll, rtol=1e-10, atol=1e-8)


def test_trajectory_nll_is_sum_of_gaussian_log_densities(task, model):
    T = task.schedule.T
    beta, alpha, abar, btilde = reference_schedule(T)
    queries = task.make_queries(model, 3, seed=5)
    traj = queries["trajectory"]
    assert traj.shape == (3, T + 1, 1, 8, 8)
    torch.testing.assert_close(traj[:, -1], queries["x"], rtol=0, atol=0)
    # also a trajectory the model did not generate (every term non-trivial)
    other = traj + 0.1 * torch.randn(
        traj.shape, generator=torch.Generator().manual_seed(0), dtype=traj.dtype
    )
    for tr in (traj, other):
        with torch.no_grad():
            got = TrajectoryNLL(task.schedule).evaluate(model, {"trajectory": tr}, {})
            ref = -Normal(0.0, 1.0).log_prob(tr[:, 0]).flatten(1).sum(1)
            for t in range(T, 0, -1):
                x_t, x_prev = tr[:, T - t], tr[:, T - t + 1]
                pred = model(x_t, torch.full((3,), t, dtype=torch.int64))
                mu = (x_t - beta[t] / math.sqrt(1 - abar[t]) * pred) / math.sqrt(alpha[t])
                var = beta[1] if t == 1 else btilde[t]
                ref = ref - Normal(mu, math.sqrt(var)).log_prob(x_prev).flatten(1).sum(1)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-8)


def test_monte_carlo_loss_agrees_with_enumeration_over_t(task, model):
    """Uniform-t MC loss vs the mean over t = 1..T (both with ε draws) within 4 standard errors."""
    x = {"x": task.train_data()["x"][:1]}
    mc = task.training_loss(n_samples=4000)
    enum = task.training_loss(n_samples=400)
    enum.timesteps = "all"  # 400 ε draws for every t: (1/T) Σ_t ℓ_t
    with torch.no_grad():
        v_mc = mc.per_draw(model, x, mc.draw(x, torch.Generator().manual_seed(0)))[0]
        v_en = enum.per_draw(model, x, enum.draw(x, torch.Generator().manual_seed(1)))[0]
    T = task.schedule.T
    per_t = v_en.reshape(400, T)  # column t−1: ℓ_t draws
    exact = per_t.mean(0).mean()
    se_enum = (per_t.var(0) / 400).sum().sqrt() / T
    se_mc = v_mc.std() / math.sqrt(v_mc.numel())
    assert abs(float(v_mc.mean() - exact)) < 4 * float((se_mc**2 + se_enum**2).sqrt())
    # the measurement's (B,) value is the mean of its per-draw values
    with torch.no_grad():
        val = mc(model, x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(val[0], v_mc.mean(), rtol=1e-12, atol=0)


def test_per_example_gradients_match_autograd_per_example(task, model):
    """vmap(grad(functional_call)) through the U-Net equals a loop of .backward() calls."""
    loss = task.training_loss(n_samples=3)
    data = {"x": task.train_data()["x"][:3]}
    noise = loss.draw(data, torch.Generator().manual_seed(2))
    params, excluded = select_parameters(model)
    assert any("norm" in n for n in excluded)  # GroupNorm parameters are excluded
    G = per_example_gradients(model, loss, data, noise, params)
    for i in range(3):
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in data.items()}
        loss.evaluate(model, one, {k: v[i : i + 1] for k, v in noise.items()}).sum().backward()
        g = torch.cat([p.grad.reshape(-1) for p in params.values()])
        torch.testing.assert_close(G[i], g, rtol=1e-10, atol=1e-12)


def test_dense_ggn_equals_two_over_ns_sum_jtj(task, model):
    """dense_ggn(curvature_problem) = (2/(N·S)) Σ_rows JᵀJ with J = ∂ε_θ(x_t, t)/∂θ."""
    n_samples = 2
    params, _ = select_parameters(model)
    G = dense_ggn(model, task, params, seed=7, n_samples=n_samples)
    problem = task.curvature_problem(model, seed=7, n_samples=n_samples)
    N = task.n_train
    assert problem.n_rows == N * n_samples
    assert problem.scale == 1.0 / (N * n_samples)
    names = list(params)
    theta = {k: v.detach() for k, v in params.items()}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    x0 = task.train_data()["x"].repeat_interleave(n_samples, 0)
    rows = 0
    ref = torch.zeros_like(G)
    abar = reference_schedule(task.schedule.T)[2]
    for inputs, eps in problem.batches(0):
        b = inputs["x_t"].shape[0]
        ab = torch.tensor([abar[int(t)] for t in inputs["t"]], dtype=torch.float64)
        x_t = ab.sqrt()[:, None, None, None] * x0[rows : rows + b] + (1 - ab).sqrt()[
            :, None, None, None
        ] * eps.reshape(b, 1, 8, 8)
        torch.testing.assert_close(inputs["x_t"], x_t, rtol=1e-12, atol=1e-12)
        rows += b

        def out(th, x_t=inputs["x_t"], t=inputs["t"]):
            return functional_call(model, {**fixed, **th}, (x_t, t)).reshape(x_t.shape[0], -1)

        jac = jacrev(out)(theta)
        J = torch.cat([jac[k].reshape(b * 64, -1) for k in names], dim=1)
        ref += 2.0 * J.T @ J
    assert rows == N * n_samples
    ref /= N * n_samples
    torch.testing.assert_close(G, ref, rtol=1e-10, atol=1e-12)
    # a second pass draws fresh noise
    first = next(iter(problem.batches(0)))[1]
    again = next(iter(problem.batches(0)))[1]
    other = next(iter(problem.batches(1)))[1]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_train_ensemble_equals_separate_training(make_task):
    """M models trained at once (vmap + one Adam over stacked leaves) = M separate runs."""
    task = make_task(
        width=4, channel_mult=[1, 2], train_steps=20, n_train=12, ema=True, ema_decay=0.9
    )
    n = task.n_train
    weights = torch.ones(3, n, dtype=torch.float64)
    weights[1, ::2] = 0.0  # half removed: half the steps
    weights[2, :4] = 0.5
    seeds = [11, 12, 13]
    together = task.train_ensemble(weights, seeds)
    for w, s, m in zip(weights, seeds, together, strict=True):
        alone = task.train(task.build_model(s), w, s)
        for (k, a), b in zip(alone.state_dict().items(), m.state_dict().values(), strict=True):
            # 20 Adam steps; rtol 1e-4 per the acceptance criterion (float64 keeps it far below)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-9, msg=k)


def test_registry_exposes_targets_and_functions():
    reg = get_registry()
    for name in ("timestep-loss", "neg-elbo", "trajectory-nll"):
        assert getattr(reg.get("measurement", name).factory, "is_target", True)
    for name in ("square-norm", "l1-norm", "l2-norm"):
        assert reg.get("measurement", name).factory.is_target is False
    assert "ddpm-digits" in reg.names("task")


def test_norm_functions_are_norms_of_the_output(task, model):
    reg = get_registry()
    x = {"x": task.train_data()["x"][:2]}
    sq = reg.create("measurement", "square-norm", task, n_samples=3)
    noise = sq.draw(x, torch.Generator().manual_seed(4))
    with torch.no_grad():
        b, s = noise["t"].shape
        x_t = task.schedule.noised(x["x"][:, None], noise["t"], noise["eps"])
        out = model(x_t.reshape(b * s, 1, 8, 8), noise["t"].reshape(-1)).reshape(b, s, -1)
        for name, ref in (
            ("square-norm", out.pow(2).sum(-1).mean(1)),
            ("l1-norm", out.abs().sum(-1).mean(1)),
            ("l2-norm", out.pow(2).sum(-1).sqrt().mean(1)),
        ):
            m = reg.create("measurement", name, task, n_samples=3)
            torch.testing.assert_close(m.evaluate(model, x, noise), ref, rtol=1e-12, atol=0)
