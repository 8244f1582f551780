"""Iterative inverse-GGN influence: Hessians ``lissa`` and ``arnoldi`` and their presets.

* ``lissa`` — LiSSA (Agarwal et al., 2017; Koh & Liang, 2017): stochastic Neumann series on
  minibatch GGN-vector products (``docs/methods/lissa.md``).
* ``arnoldi`` — Arnoldi influence (Schioppa et al., 2022): the top-r eigenspace of the GGN
  (``docs/methods/arnoldi.md``).

Both use the task's curvature problem and torch.func GGN-vector products
(:mod:`attribution_influence.ggn`); H is the GGN of ``L_D`` in the task's units, the damping λ
is absolute and the task's ``2·l2`` is added to it.
"""
