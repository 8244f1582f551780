"""Metagradient attribution: exact ∂m(θ_T(w), x')/∂w_j through the training run (MAGIC/REPLAY)."""
