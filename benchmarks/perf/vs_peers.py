"""Ours vs kronfluence (EK-FAC) and traker (TRAK) on the same model, data, measurement and draws.

One process, back to back (repeated ``--repeats`` times, after one discarded warm-up round on 64
examples so that no side pays first-call costs in the timed rounds; the machine may be shared,
so only the ratios of one round are meaningful):

* ``ekfac-influence`` (ours, default hook back-end) vs kronfluence 1.0 EK-FAC. Matched settings:
  the same (x_t, t, ε) rows (the fit rows of ``task.curvature_problem`` and the per-example training /
  query draws of ``attribution_core.gradients.example_noise``), MC-Fisher pseudo-targets with std
  √½ on both sides (curvlinops' convention; kronfluence's usual recipe uses std 1, which
  estimates 2·H — the peer task here samples with std √½ so the same absolute damping means the
  same thing), weight and bias in one Kronecker block (kronfluence's layout; ours
  ``separate_weight_and_bias: false``), absolute damping 1e-8 on both. kronfluence's per-sample
  gradients are per module-input row, so its data set is the N·S rows and its scores are averaged
  over the S draws of each example (linear, hence the score of the draw-averaged gradient).
* ``trak`` (ours) vs traker 0.3 ``TRAKer`` with ``BasicProjector`` (CPU), ``proj_dim`` 2048,
  float32 (``use_half_precision=False``), the same draws, ``grad_wrt`` = our parameter set,
  ``lambda_reg = N·λ·k/p`` (ours is ``(XᵀX/N + λI)⁻¹`` with Φ entries N(0, 1/k); traker divides
  its projected features by √p). Timing: ours as shipped
  (torch back-end, Φ generated once) vs traker. Agreement: ours with ``backend: traker`` (traker's
  own projection matrix, same seed) vs traker — Spearman and cosine per query.

    .venv/bin/python benchmarks/perf/vs_peers.py [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from typing import Any

import numpy as np
import torch
from _common import build, fixed_queries, floor_seconds, header, table, task_options
from scipy.stats import spearmanr
from torch.func import functional_call
from vs_floor import repeated_task, run_method

from attribution_core.gradients import example_noise, select_parameters


def spearman_mean(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over queries (columns) of the Spearman correlation of two ``(n_train, n_query)``."""
    return float(np.mean([spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])]))


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-query cosine similarity of two ``(n_train, n_query)`` score matrices."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    return float(cos.min())


# ---- kronfluence -----------------------------------------------------------------------------
def fit_rows(task: Any, model: torch.nn.Module, seed: int, samples: int) -> tuple:
    """The (x_t, t, ε) rows of our K-FAC fit pass 0 (``task.curvature_problem``)."""
    problem = task.curvature_problem(model, seed, samples)
    xs, ts, es = [], [], []
    for inputs, eps in problem.batches(0):
        xs.append(inputs["x_t"])
        ts.append(inputs["t"])
        es.append(eps)
    return torch.cat(xs), torch.cat(ts), torch.cat(es)


def example_rows(task: Any, meas: Any, data: dict, seed: int, stream: str) -> tuple:
    """(x_t, t, ε) rows of every (example, draw) pair of ``example_noise`` (example-major)."""
    noise = example_noise(meas, data, seed, stream, 0)
    x0, t, eps = data["x"], noise["t"], noise["eps"]
    b, s = t.shape
    xt = task.schedule.noised(x0[:, None], t, eps).reshape(b * s, *x0.shape[1:])
    return xt, t.reshape(b * s), eps.reshape(b * s, -1), s


def kronfluence_ekfac(task, model, fit, train, query, damping: float, batch: int) -> tuple:
    """kronfluence EK-FAC scores averaged to ``(n_train, n_query)`` and phase seconds."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask
    from torch.utils.data import TensorDataset

    std = math.sqrt(0.5)  # curvlinops' MSE MC-Fisher convention (std 1 would estimate 2·H)

    class EpsTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            xt, t, eps = batch
            pred = model(xt, t).flatten(1)
            if sample:
                with torch.no_grad():
                    eps = pred + std * torch.randn_like(pred)
            return (pred - eps).pow(2).sum()

        def compute_measurement(self, batch, model):
            xt, t, eps = batch
            return (model(xt, t).flatten(1) - eps).pow(2).sum()

    kmodel = prepare_model(copy.deepcopy(model), EpsTask())
    out = tempfile.mkdtemp(prefix="kron-")
    an = Analyzer("perf", kmodel, EpsTask(), cpu=True, disable_tqdm=True, output_dir=out)
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=False)
    sargs = ScoreArguments(damping_factor=damping)
    c0 = time.process_time()
    t0 = time.perf_counter()
    an.fit_all_factors(
        "f",
        TensorDataset(*fit),
        per_device_batch_size=batch,
        factor_args=fargs,
        overwrite_output_dir=True,
    )
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    an.compute_pairwise_scores(
        "s",
        "f",
        TensorDataset(*query[:3]),
        TensorDataset(*train[:3]),
        per_device_query_batch_size=len(query[0]),
        per_device_train_batch_size=batch,
        score_args=sargs,
        overwrite_output_dir=True,
    )
    t_scores = time.perf_counter() - t0
    cpu = time.process_time() - c0
    rows = an.load_pairwise_scores("s")["all_modules"].double().numpy()  # (nq·S, N·S)
    sq, st = query[3], train[3]
    nq, n = rows.shape[0] // sq, rows.shape[1] // st
    scores = rows.reshape(nq, sq, n, st).mean(axis=(1, 3)).T  # (N, n_query)
    return scores, {"fit": t_fit, "scores": t_scores, "total": t_fit + t_scores, "cpu": cpu}


# ---- traker ------------------------------------------------------------------------------------
def traker_trak(task, model, params, train_fn, target, queries, seed, proj_dim, lam, batch):
    """traker TRAKer scores ``(n_train, n_query)`` (float32, BasicProjector) and seconds."""
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    sched = task.schedule

    class EpsOutput(AbstractModelOutput):
        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, x0, t, eps):
            xt = sched.noised(x0[None], t, eps)  # (S, C, H, W)
            pred = functional_call(model, (weights, buffers), (xt, t))
            return (eps - pred).pow(2).flatten(1).sum(1).mean()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    # traker divides its features by √p where ours are scaled by 1/√k: with X_traker =
    # √(k/p)·X_ours, (X_tᵀX_t + λ_t I)⁻¹ ∝ (X_oᵀX_o/N + λ I)⁻¹ needs λ_t = N·λ·k/p.
    data = task.train_data()
    names = list(params)
    p = sum(v.numel() for v in params.values())
    out = tempfile.mkdtemp(prefix="traker-")
    c0 = time.process_time()
    t0 = time.perf_counter()
    projector = BasicProjector(
        grad_dim=p,
        proj_dim=proj_dim,
        seed=seed,
        proj_type=ProjectionType.normal,
        device="cpu",
        block_size=100,
        dtype=torch.float32,
    )
    tr = TRAKer(
        model=model,
        task=EpsOutput(),
        train_set_size=task.n_train,
        save_dir=out,
        load_from_save_dir=True,
        device="cpu",
        projector=projector,
        use_half_precision=False,
        grad_wrt=names,
        lambda_reg=lam * task.n_train * proj_dim / p,
        logging_level=40,
    )
    tr.load_checkpoint(model.state_dict(), model_id=0)
    tn = example_noise(train_fn, data, seed, "train", 0)
    for s in range(0, task.n_train, batch):
        sl = slice(s, min(s + batch, task.n_train))
        tr.featurize(batch=(data["x"][sl], tn["t"][sl], tn["eps"][sl]), num_samples=sl.stop - s)
    tr.finalize_features()
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    qn = example_noise(target, queries, seed, "query", 0)
    nq = queries["x"].shape[0]
    tr.start_scoring_checkpoint("q", model.state_dict(), model_id=0, num_targets=nq)
    tr.score(batch=(queries["x"], qn["t"], qn["eps"]), num_samples=nq)
    scores = np.asarray(tr.finalize_scores("q"), dtype=np.float64)
    t_sc = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return scores, {"features": t_feat, "scores": t_sc, "total": t_feat + t_sc, "cpu": cpu}


def _row(
    rep: int,
    comparison: str,
    floor: float,
    ours: dict,
    peer: dict,
    spearman: float,
    cosine: float,
    detail: str,
) -> dict[str, Any]:
    """One table row: times, ratios to the floor, speed-ups (wall and CPU), agreement."""
    t_ours, t_peer = ours["timings"]["total"], peer["total"]
    return {
        "run": rep,
        "comparison": comparison,
        "floor s": floor,
        "ours s": t_ours,
        "peer s": t_peer,
        "ours ×floor": t_ours / floor,
        "peer ×floor": t_peer / floor,
        "speed-up": t_peer / t_ours,
        "CPU speed-up": peer["cpu"] / ours["cpu"],
        "Spearman": spearman,
        "min cosine": cosine,
        "detail": detail,
    }


def _label(rep: int) -> str:
    return "warm-up" if rep < 0 else f"run {rep}"


def compare(
    a: argparse.Namespace,
    task: Any,
    model: torch.nn.Module,
    opts: dict,
    path,
    qpath,
    queries: dict,
    rep: int,
    floor: float,
) -> list[dict]:
    """One round: ours and each peer on ``task``, back to back; one row per comparison."""
    params, _ = select_parameters(model)
    train_fn = task.training_loss(a.samples)
    target = task.training_loss(a.samples)
    rows: list[dict] = []
    if "kronfluence" in a.peers:
        entry = {
            "name": "ekfac-influence",
            "n_samples": a.samples,
            "damping": a.damping,
            "separate_weight_and_bias": False,
        }
        ours = run_method_entry(entry, opts, path, qpath, a.samples, task)
        seed = ours["seed"]
        fit = fit_rows(task, model, seed, a.samples)
        tr_rows = example_rows(task, train_fn, task.train_data(), seed, "train")
        q_rows = example_rows(task, target, queries, seed, "query")
        ks, kt = kronfluence_ekfac(
            task, model, fit, tr_rows, q_rows, a.damping, a.kronfluence_batch
        )
        rho = spearman_mean(ours["scores"], ks)
        detail = (
            f"ours fit {ours['timings']['fit']:.1f}s; peer fit {kt['fit']:.1f}s, "
            f"scores {kt['scores']:.1f}s"
        )
        rows.append(
            _row(
                rep,
                "ekfac-influence vs kronfluence EK-FAC",
                floor,
                ours,
                kt,
                rho,
                cosine_min(ours["scores"], ks),
                detail,
            )
        )
        print(
            f"  {_label(rep)} kronfluence: ours {ours['timings']['total']:.1f}s peer "
            f"{kt['total']:.1f}s rho {rho:.3f}",
            flush=True,
        )
    if "traker" in a.peers:
        ours = run_method_entry(
            {"name": "trak", "proj_dim": a.proj_dim}, opts, path, qpath, a.samples, task
        )
        lam = ours["info"]["curvature"]["damping"]
        seed = ours["seed"]
        ts, tt = traker_trak(
            task, model, params, train_fn, target, queries, seed, a.proj_dim, lam, a.traker_batch
        )
        same = run_method_entry(
            {
                "name": "trak",
                "proj_dim": a.proj_dim,
                "backend": "traker",
                "damping": lam,
                "damping_mode": "absolute",
            },
            opts,
            path,
            qpath,
            a.samples,
            task,
        )
        detail = (
            f"agreement with traker's Φ injected (ours backend traker, "
            f"{same['timings']['total']:.1f}s); own-Φ Spearman "
            f"{spearman_mean(ours['scores'], ts):.3f}"
        )
        rows.append(
            _row(
                rep,
                f"trak vs traker (k={a.proj_dim})",
                floor,
                ours,
                tt,
                spearman_mean(same["scores"], ts),
                cosine_min(same["scores"], ts),
                detail,
            )
        )
        print(
            f"  {_label(rep)} traker: ours {ours['timings']['total']:.1f}s peer {tt['total']:.1f}s",
            flush=True,
        )
        if a.sjlt:  # ours with the sparse JL transform: a different Φ, so not the same work
            sp = run_method_entry(
                {"name": "trak", "proj_dim": a.proj_dim, "projection": "sjlt"},
                opts,
                path,
                qpath,
                a.samples,
                task,
            )
            rho_g = spearman_mean(sp["scores"], ours["scores"])
            rows.append(
                _row(
                    rep,
                    f"trak (projection: sjlt, s=4) vs traker (k={a.proj_dim}), not the same Φ",
                    floor,
                    sp,
                    tt,
                    spearman_mean(sp["scores"], ts),
                    cosine_min(sp["scores"], ts),
                    f"vs ours with the Gaussian Φ: Spearman {rho_g:.3f}",
                )
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peers", nargs="+", default=["kronfluence", "traker"])
    ap.add_argument("--damping", type=float, default=1e-8, help="EK-FAC damping (absolute)")
    ap.add_argument(
        "--kronfluence-batch",
        type=int,
        default=64,
        help="kronfluence's per-device batch, in (example, draw) rows (ours: 64 examples × S)",
    )
    ap.add_argument(
        "--traker-batch",
        type=int,
        default=64,
        help="examples per traker featurize call (each call regenerates its Φ)",
    )
    ap.add_argument(
        "--train-steps-10",
        type=int,
        default=300,
        help="base-model steps when more than two classes are given (as vs_floor.py)",
    )
    ap.add_argument(
        "--sjlt",
        action="store_true",
        help="also time ours with projection: sjlt (a sparse Φ: a different projection)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 examples, S=2, k=256")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    extra: dict[str, Any] = {}
    if len(a.classes) > 2:
        extra["train_steps"] = a.train_steps_10
    if a.quick:
        extra, a.samples, a.proj_dim, a.repeats = {"n_train": 64, "train_steps": 20}, 2, 256, 1
    opts = task_options(a.classes, n_samples=a.samples, **extra)
    task, model, path = build(opts)
    qpath = fixed_queries(task, model, path, 16)
    queries = {"x": torch.as_tensor(np.load(qpath)["x"])}
    # warm-up round on 64 examples, results discarded: imports, the first vmap / autograd
    # set-up and allocator growth are paid here by every method, ours and the peers', so the
    # first timed round is not a cold start for some and a warm one for others
    small, _, _ = repeated_task(opts, 64)
    compare(a, small, model, opts, path, qpath, queries, -1, float("nan"))
    rows: list[dict] = []
    for rep in range(a.repeats):
        floor = floor_seconds(model, task, a.samples)
        rows += compare(a, task, model, opts, path, qpath, queries, rep, floor)
    print(
        header(
            f"ours vs peers, digits-{len(a.classes)} N={task.n_train} S={a.samples}, 16 queries",
            ("kronfluence", "traker"),
        )
    )
    print()
    print(table(rows))
    print()
    summ = []
    for comp in dict.fromkeys(r["comparison"] for r in rows):
        sub = [r for r in rows if r["comparison"] == comp]
        summ.append(
            f"{comp}: speed-up {min(r['speed-up'] for r in sub):.2f}–"
            f"{max(r['speed-up'] for r in sub):.2f}× (CPU time "
            f"{min(r['CPU speed-up'] for r in sub):.2f}–{max(r['CPU speed-up'] for r in sub):.2f}×), "
            f"Spearman "
            f"{min(r['Spearman'] for r in sub):.3f}"
        )
    print("SUMMARY vs_peers: " + "; ".join(summ))
    return rows


def run_method_entry(
    entry: dict, opts: dict, path, qpath, samples: int, task: Any = None
) -> dict[str, Any]:
    """:func:`vs_floor.run_method` with a full method entry (on ``task`` if given)."""
    return run_method(entry["name"], opts, path, qpath, samples, task=task, entry=entry)


if __name__ == "__main__":
    main()
