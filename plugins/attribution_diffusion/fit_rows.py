"""The rows of a DDPM's curvature problem: ``(x_t, t) → ε`` draws, seeded per training example.

Pass ``p`` of a fit gives training example ``i`` ``S`` rows ``(x_t = √ᾱ_t x_i + √(1−ᾱ_t) ε, t)``
with target ``ε``; its ``S`` timesteps and then its ``S`` noises come from one generator,
``example_generator(seed, "fit", i, p)``. A row range of the data set (a data shard) therefore
yields exactly the rows a full pass yields there, whatever the chunking or the process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from attribution_core import example_generator, row_chunks
from attribution_diffusion.schedule import Schedule


def fit_draws(
    seed: int, pass_index: int, rows: slice, n_samples: int, T: int, shape: torch.Size,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(t, ε)`` of examples ``rows``: ``t: (B·S,)`` int64 in 1..T, ``ε: (B·S, *shape)``.

    Rows are example-major (example ``i``'s ``S`` draws are consecutive), as
    ``x[rows].repeat_interleave(S, 0)``.
    """
    b, s = rows.stop - rows.start, int(n_samples)
    t = torch.empty(b * s, dtype=torch.int64)
    eps = torch.empty((b * s, *shape), dtype=dtype)
    for k, i in enumerate(range(rows.start, rows.stop)):
        gen = example_generator(seed, "fit", i, pass_index)
        torch.randint(1, T + 1, (s,), generator=gen, out=t[k * s : (k + 1) * s])
        torch.randn((s, *shape), generator=gen, dtype=dtype, out=eps[k * s : (k + 1) * s])
    return t, eps


@dataclass(frozen=True)
class FitRows:
    """``CurvatureProblem.batches`` of a DDPM (picklable: tensors and the schedule, no task).

    Attributes:
        x: the training images ``(N, C, H, W)``.
        schedule: the noise schedule (``T``, ``noised``).
        n_samples: ``S``, (t, ε) draws per example (rows per example).
        seed: the fit's seed.
        chunk: training examples per batch (a batch has ``chunk · S`` rows).
    """

    x: Tensor
    schedule: Schedule
    n_samples: int
    seed: int
    chunk: int

    def __call__(
        self, pass_index: int, rows: slice | None = None
    ) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """``({"x_t": (B·S, C, H, W), "t": (B·S,)}, ε: (B·S, C·H·W))`` per chunk of ``rows``."""
        x, s = self.x, self.n_samples
        for r in row_chunks(rows, x.shape[0], self.chunk):
            x0 = x[r].repeat_interleave(s, dim=0)
            t, eps = fit_draws(self.seed, pass_index, r, s, self.schedule.T, x.shape[1:], x.dtype)
            t, eps = t.to(x.device), eps.to(x.device)
            yield {"x_t": self.schedule.noised(x0, t, eps), "t": t}, eps.reshape(x0.shape[0], -1)


def x_t_rows(inputs: dict[str, Tensor]) -> int:
    """``batch_size_fn`` of a DDPM curvature problem: the rows of ``inputs["x_t"]``."""
    return inputs["x_t"].shape[0]
