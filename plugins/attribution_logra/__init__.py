"""LoGra (Choe et al. 2024): per-layer Kronecker-structured gradient projection from hooks."""
