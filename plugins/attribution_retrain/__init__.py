"""Exact retraining: leave-one-out scores and the retrained-subset oracle for LDS."""
