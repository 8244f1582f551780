"""Evaluation harness: pinned suites, LDS, retraining without top influences, executors."""
