"""Supervised tasks (``linear-regression``, ``digits-classifier``) and their measurements."""
