"""MC-Fisher pseudo-targets seeded per loss row, shared by both back-ends.

Row ``r`` of pass ``p`` (the ``r``-th loss row of the curvature problem, counted from the first
row of the whole pass) draws its pseudo-targets from its own CPU generator,
``example_generator(seed, "mc-target", r, p)``: the ``m``-th of ``mc_samples`` pseudo-targets is
the ``m``-th draw of that generator. A data shard therefore draws exactly the pseudo-targets a
full pass draws for its rows, and the ``hooks`` and ``curvlinops`` back-ends draw the same ones
(:mod:`attribution_kfac.curvlinops_adapter` installs :class:`PseudoTargets` into curvlinops'
``draw_label``).

The likelihoods are curvlinops': ``MSELoss`` → ``f + √½·ξ`` with ``ξ ~ N(0, I)`` (the Gaussian
whose negative log-likelihood is ``‖y − f‖²``), ``CrossEntropyLoss`` → one class from
``softmax(f)``, ``BCEWithLogitsLoss`` → Bernoulli(``sigmoid(f)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attribution_core import example_generator


class PseudoTargets:
    """The pseudo-target generators of one batch: rows ``first_row .. first_row + n_rows``.

    Args:
        seed: the fit's pseudo-target seed.
        pass_index: the data pass (0: factors, 1: EK-FAC's correction).
        first_row: the absolute index of the batch's first row in the pass.
        n_rows: the batch's rows ``B`` (the targets' first dimension).
    """

    def __init__(self, seed: int, pass_index: int, first_row: int, n_rows: int) -> None:
        self.generators = [
            example_generator(seed, "mc-target", first_row + i, pass_index) for i in range(n_rows)
        ]

    def draw(self, loss_func: nn.Module, output: Tensor) -> Tensor:
        """One pseudo-target per output row, from its batch row's generator (the next draw).

        ``output: (B·R, k)`` — the flattened model output, ``R`` consecutive output rows per
        batch row (``R = 1`` for the 2-D outputs of a curvature problem). Returns ``(B·R, k)``
        (MSE, BCE) or ``(B·R,)`` class indices (cross-entropy), on ``output``'s device.
        """
        b = len(self.generators)
        if b == 0 or output.shape[0] % b:
            raise ValueError(
                f"pseudo-targets mismatch: expected a multiple of {b} output rows, got "
                f"{tuple(output.shape)}."
            )
        rows = output.detach().cpu().reshape(b, output.shape[0] // b, *output.shape[1:])
        if isinstance(loss_func, nn.MSELoss):
            noise = torch.stack(
                [torch.randn(r.shape, generator=g, dtype=r.dtype) for r, g in self._pairs(rows)]
            )
            out = rows + math.sqrt(0.5) * noise
        elif isinstance(loss_func, nn.CrossEntropyLoss):
            probs = rows.softmax(dim=-1)
            out = torch.stack(
                [
                    p.multinomial(num_samples=1, generator=g).squeeze(-1)
                    for p, g in self._pairs(probs)
                ]
            )
        elif isinstance(loss_func, nn.BCEWithLogitsLoss):
            probs = rows.sigmoid()
            out = torch.stack([p.bernoulli(generator=g) for p, g in self._pairs(probs)])
        else:
            raise NotImplementedError(f"pseudo-targets for loss {type(loss_func).__name__}")
        return out.reshape(output.shape[0], *out.shape[2:]).to(output.device)

    def _pairs(self, rows: Tensor) -> zip:
        return zip(rows.unbind(0), self.generators, strict=True)
