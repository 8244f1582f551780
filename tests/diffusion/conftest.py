"""Fixtures for the diffusion tests: tiny float64 DDPM tasks (T = 10, a few-hundred-parameter U-Net)."""

from __future__ import annotations

import pytest
import torch
from attribution_diffusion import DDPMDigitsTask

TINY = {"width": 2, "channel_mult": [1], "T": 10, "n_train": 6, "train_steps": 4, "batch_size": 4}


def tiny_task(dtype: torch.dtype = torch.float64, **overrides) -> DDPMDigitsTask:
    """A digits-2 task with a 721-parameter U-Net and T = 10 (options overridable)."""
    return DDPMDigitsTask(dtype=dtype, **{**TINY, **overrides})


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_task():
    """The :func:`tiny_task` factory (test modules cannot import conftest)."""
    return tiny_task


@pytest.fixture
def task() -> DDPMDigitsTask:
    return tiny_task()


@pytest.fixture
def model(task):
    """A briefly trained tiny model (float64)."""
    return task.train(task.build_model(0), torch.ones(task.n_train, dtype=task.dtype), 0)
