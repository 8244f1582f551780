"""Weighted DDPM training: one model (:func:`train`) or M at once (:func:`train_ensemble`).

Objective (paper eq. 4 with the ε-loss of eq. 2): minibatches of ``batch_size`` indices drawn
uniformly (with replacement) from the examples with weight > 0, ``t ~ U{1..T}``, ``ε ~ N(0, I)``,
loss = mean over the minibatch of ``w_b ‖ε − ε_θ(x_t, t)‖²``. Adam (or plain SGD), constant
learning rate after an optional linear warm-up (:meth:`TrainConfig.optimizer_config`).
Step count: ``train_steps``, times ``Σw/N`` when ``scale_steps`` (half the data → half the
steps). With ``ema`` the exponential moving average of the weights is returned.

Each model's draws come from its own generator seeded by its seed, in the same order in both
functions, so ``train_ensemble`` reproduces separate :func:`train` calls (``torch.optim.Adam`` is
element-wise: one Adam over the stacked ``(M, ...)`` leaves on the sum of the M losses is M
independent Adams).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from attribution_core import DataError, OptimizerConfig
from attribution_diffusion.schedule import Schedule


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train` (see module docstring)."""

    train_steps: int
    batch_size: int
    lr: float
    scale_steps: bool = True
    ema: bool = False
    ema_decay: float = 0.999
    optimizer: str = "adam"
    adam_eps: float = 1e-8
    warmup_steps: int = 0

    def optimizer_config(self) -> OptimizerConfig:
        """The optimiser as the training-step hook's record (``lr_at`` gives each step's η)."""
        return OptimizerConfig(
            self.optimizer,  # type: ignore[arg-type]
            self.lr,
            eps=self.adam_eps,
            warmup_steps=self.warmup_steps,
        )


def make_optimizer(params: list[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``torch.optim.Adam(lr, eps)`` or ``torch.optim.SGD(lr)`` over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)


def set_step_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """Before step ``step`` (1-based): the warm-up learning rate (untouched without warm-up)."""
    if cfg.warmup_steps > 0:
        for group in opt.param_groups:
            group["lr"] = cfg.optimizer_config().lr_at(step)


def step_count(weights: Tensor, cfg: TrainConfig) -> int:
    """``train_steps · Σw/N`` (rounded, ≥ 1) when ``scale_steps``, else ``train_steps``."""
    if not cfg.scale_steps:
        return cfg.train_steps
    frac = float(weights.sum()) / weights.numel()
    return max(1, round(cfg.train_steps * frac))


def _check_weights(weights: Tensor, n: int) -> None:
    if weights.ndim != 1 or weights.shape[0] != n:
        raise DataError(f"weights mismatch: expected shape ({n},), got {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise DataError("weights: every training weight must be finite and ≥ 0")
    if not bool((weights > 0).any()):
        raise DataError("weights: every example has weight 0; keep at least one example")


class _Draws:
    """Per-model minibatch stream: indices among kept examples, t, ε (one generator)."""

    def __init__(self, weights: Tensor, seed: int, T: int, batch_size: int) -> None:
        self.kept = torch.nonzero(weights > 0).reshape(-1)
        self.w = weights
        self.gen = torch.Generator().manual_seed(int(seed))
        self.T, self.bs = T, batch_size

    def next(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_0: (B, C, H, W), w: (B,), t: (B,), ε: (B, C, H, W))`` on ``x``'s device."""
        pos = torch.randint(self.kept.numel(), (self.bs,), generator=self.gen)
        idx = self.kept[pos]
        t = torch.randint(1, self.T + 1, (self.bs,), generator=self.gen)
        eps = torch.randn((self.bs, *x.shape[1:]), generator=self.gen, dtype=x.dtype)
        dev = x.device
        return x[idx.to(dev)], self.w[idx].to(dev, x.dtype), t.to(dev), eps.to(dev)


def _loss(pred: Tensor, eps: Tensor, w: Tensor) -> Tensor:
    """``mean_b w_b ‖ε_b − pred_b‖²`` over the last three dims (pixels)."""
    return (w * (eps - pred).pow(2).flatten(-3).sum(-1)).mean(-1)


def train(
    model: nn.Module, x: Tensor, weights: Tensor, seed: int, schedule: Schedule, cfg: TrainConfig
) -> nn.Module:
    """Train ``model`` in place on ``x: (N, C, H, W)`` with ``weights: (N,)``; eval mode."""
    ema = [p.detach().clone() for p in model.parameters()] if cfg.ema else None
    for _ in adam_steps(model, x, weights, seed, schedule, cfg):
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, model.parameters(), strict=True):
                    e.lerp_(p.detach(), 1.0 - cfg.ema_decay)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, model.parameters(), strict=True):
                p.copy_(e)
    return model.eval()


def adam_steps(
    model: nn.Module, x: Tensor, weights: Tensor, seed: int, schedule: Schedule, cfg: TrainConfig
) -> Iterator[tuple[int, torch.optim.Optimizer]]:
    """Train ``model`` in place (no EMA); yield ``(step, optimiser)`` after every step.

    :func:`train` and the task's training checkpoints both run this loop, so a replay from the
    same seed reproduces the trained weights bit for bit.
    """
    _check_weights(weights, x.shape[0])
    draws = _Draws(weights.detach().cpu(), seed, schedule.T, cfg.batch_size)
    opt = make_optimizer(list(model.parameters()), cfg)
    model.train()
    for step in range(1, step_count(weights, cfg) + 1):
        x0, w, t, eps = draws.next(x)
        loss = _loss(model(schedule.noised(x0, t, eps), t), eps, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        set_step_lr(opt, cfg, step)
        opt.step()
        yield step, opt


def train_ensemble(
    build: Callable[[int], nn.Module],
    x: Tensor,
    weights: Tensor,
    seeds: Sequence[int],
    schedule: Schedule,
    cfg: TrainConfig,
) -> list[nn.Module]:
    """Train ``M = len(seeds)`` models at once (``stack_module_state`` + ``vmap``).

    Args:
        build: ``seed -> fresh model`` (the task's ``build_model``).
        x: ``(N, C, H, W)`` training images.
        weights: ``(M, N)`` per-model example weights.
        seeds: one seed per model (initialisation and draws, as in :func:`train`).

    Returns:
        M trained models in eval mode, equal to ``train(build(s), x, w, s, ...)`` per row.
    """
    if weights.ndim != 2 or weights.shape[0] != len(seeds):
        raise DataError(
            f"weights mismatch: expected (M, N) with M = len(seeds) = {len(seeds)}, got "
            f"{tuple(weights.shape)}"
        )
    for w in weights:
        _check_weights(w, x.shape[0])
    models = [build(int(s)) for s in seeds]
    params, buffers = stack_module_state(models)
    names = list(params)
    template = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict[str, Tensor], b: dict[str, Tensor], xt: Tensor, t: Tensor) -> Tensor:
        return functional_call(template, (p, b), (xt, t))

    batched = vmap(forward)
    wcpu = weights.detach().cpu()
    draws = [_Draws(w, s, schedule.T, cfg.batch_size) for w, s in zip(wcpu, seeds, strict=True)]
    steps = [step_count(w, cfg) for w in wcpu]
    opt = make_optimizer(list(params.values()), cfg)
    ema = {k: v.detach().clone() for k, v in params.items()} if cfg.ema else None
    final: list[dict[str, Tensor] | None] = [None] * len(seeds)
    for step in range(max(steps)):
        parts = [d.next(x) for d in draws]
        x0, w, t, eps = (torch.stack(z) for z in zip(*parts, strict=True))
        pred = batched(params, buffers, schedule.noised(x0, t, eps), t)
        loss = _loss(pred, eps, w).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        set_step_lr(opt, cfg, step + 1)
        opt.step()
        source = params
        if ema is not None:
            with torch.no_grad():
                for k in names:
                    ema[k].lerp_(params[k].detach(), 1.0 - cfg.ema_decay)
            source = ema
        for m, n_steps in enumerate(steps):
            if n_steps == step + 1:
                final[m] = {k: source[k][m].detach().clone() for k in names}
    for model, state in zip(models, final, strict=True):
        if state is None:  # unreachable: every model reaches its own step count
            raise RuntimeError("train_ensemble: a model never reached its step count")
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(state[k])
        model.eval()
    return models
