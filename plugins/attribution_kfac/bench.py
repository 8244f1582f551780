"""Benchmark: damping sweep of K-FAC/EK-FAC influence against ``ggn-cg`` on a digits DDPM.

``python -m attribution_kfac.bench --n-train 64 --n-samples 4 --queries 4`` prints markdown:

* per damping λ (1e-10 … 1e2): Spearman (over training examples, mean ± s.e. over queries) of
  K-FAC and EK-FAC scores against ``ggn-cg`` scores at the same λ (where CG was run), and of
  int8-compressed against uncompressed queries (acceptance 2);
* K-FAC vs EK-FAC vs GGN-CG on the same U-Net.

Factors are fitted once per approximation; the damping is applied at solve time (as the cache
does), so the sweep costs one fit plus one solve per λ. Scores: ``g_jᵀ (H + λI)⁻¹ g_q``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from attribution_core import (
    FitInputs,
    Int8Compression,
    get_registry,
    gradient_chunks,
    layout_of,
    select_parameters,
    stack_gradients,
)
from attribution_kfac.curvature import KroneckerCurvature
from attribution_kfac.ggn_cg import GGNCGHessian
from attribution_kfac.kfac import EKFACHessian, KFACHessian

DAMPINGS = [10.0**k for k in range(-10, 3)]


def _rho(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    r = np.array([spearmanr(a[:, q].numpy(), b[:, q].numpy())[0] for q in range(a.shape[1])])
    return float(r.mean()), float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0


def _fmt(x: tuple[float, float] | None) -> str:
    return "–" if x is None else f"{x[0]:.3f} ± {x[1]:.3f}"


def main(argv: list[str] | None = None) -> None:
    """Run the sweep and print markdown tables (see module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=1400)
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--cg-dampings", type=float, nargs="*", default=[1e2, 1e1, 1.0, 1e-1, 1e-2])
    ap.add_argument("--cg-maxiter", type=int, default=150)
    ap.add_argument("--cg-rtol", type=float, default=1e-3)
    ap.add_argument("--fisher", default="mc", choices=["mc", "empirical", "type-2"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    task = get_registry().create(
        "task",
        "ddpm-digits",
        n_train=args.n_train,
        train_steps=args.train_steps,
        n_samples=args.n_samples,
        width=args.width,
        T=args.T,
    )
    t0 = time.perf_counter()
    model = task.base_model(0)
    print(f"training {time.perf_counter() - t0:.0f}s", flush=True)
    params, excluded = select_parameters(model)
    queries = task.make_queries(model, args.queries, 0)
    fn = task.training_loss(args.n_samples)
    t0 = time.perf_counter()
    Gt = stack_gradients(gradient_chunks(model, fn, task.train_data(), params, seed=0))
    Gq = stack_gradients(gradient_chunks(model, fn, queries, params, seed=0, stream="query"))
    t_grad = time.perf_counter() - t0
    int8 = Int8Compression()
    int8.fit(Gt.shape[1], 0, layout=layout_of(params))
    p = Gt.shape[1]
    print(
        f"task ddpm-digits: N={task.n_train}, steps={args.train_steps}, n_samples="
        f"{args.n_samples}, queries={args.queries}, p={p} (excluded {len(excluded)} norm "
        f"params); gradients {t_grad:.1f}s\n"
    )

    fit_inputs = FitInputs(model=model, task=task, train_function=fn, seed=0, params=params)
    fits: dict[str, KroneckerCurvature] = {}
    for cls in (KFACHessian, EKFACHessian):
        t0 = time.perf_counter()
        curv = cls(damping=1.0, fisher=args.fisher).fit(fit_inputs)
        fits[cls.name] = curv
        print(f"{cls.name} (fisher {args.fisher}) fit: {time.perf_counter() - t0:.1f}s")

    cg_scores: dict[float, torch.Tensor] = {}
    for lam in args.cg_dampings:
        t0 = time.perf_counter()
        cg = GGNCGHessian(damping=lam, rtol=args.cg_rtol, maxiter=args.cg_maxiter).fit(fit_inputs)
        cg_scores[lam] = Gt @ cg.solve(Gq).T
        print(
            f"ggn-cg λ={lam:g}: {time.perf_counter() - t0:.1f}s, iterations "
            f"{cg.describe()['cg_iterations']}"
        )
    print()
    _print_table(fits, cg_scores, Gt, Gq, int8, task.l2)
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


def _print_table(
    fits: dict[str, KroneckerCurvature],
    cg_scores: dict[float, torch.Tensor],
    Gt: torch.Tensor,
    Gq: torch.Tensor,
    int8: Int8Compression,
    l2: float,
) -> None:
    """One markdown row per damping λ: Spearman of scores ``(n_train, n_query)`` pairs.

    The fitted factors are re-damped at each λ (``Gt: (n_train, p)``, ``Gq: (n_query, p)``).
    """
    print(
        "| damping | K-FAC vs GGN-CG | EK-FAC vs GGN-CG | K-FAC vs EK-FAC | "
        "int8 vs fp32 (K-FAC) | int8 vs fp32 (EK-FAC) |"
    )
    print("|---|---|---|---|---|---|")
    for lam in sorted(set(DAMPINGS) | set(cg_scores)):
        row = {}
        for name, c in fits.items():
            at = KroneckerCurvature(
                c.blocks, c.factors, scale=c.scale, damping=lam, l2=l2, n_params=c.n_params
            )
            Q = at.solve(Gq)
            row[name] = (Gt @ Q.T, Gt @ int8.compress(Q).T)
        ref = cg_scores.get(lam)
        print(
            f"| {lam:.0e} | {_fmt(None if ref is None else _rho(row['kfac'][0], ref))} | "
            f"{_fmt(None if ref is None else _rho(row['ekfac'][0], ref))} | "
            f"{_fmt(_rho(row['kfac'][0], row['ekfac'][0]))} | "
            f"{_fmt(_rho(row['kfac'][0], row['kfac'][1]))} | "
            f"{_fmt(_rho(row['ekfac'][0], row['ekfac'][1]))} |"
        )


if __name__ == "__main__":
    main()
