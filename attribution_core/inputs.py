"""Inputs read before work — the device and query files — checked into one-line errors.

Every malformed input (a device this machine lacks, a truncated ``.npz``, pickled or non-numeric
arrays) becomes a :class:`~attribution_core.errors.ConfigError`/:class:`DataError` naming the key
or the file (CLI exit 2), never a traceback.
"""

from __future__ import annotations

import numpy as np
import torch

from attribution_core.batches import Batch
from attribution_core.errors import ConfigError, DataError
from attribution_core.interfaces import Task


def run_device(name: str) -> torch.device:
    """``config.device`` as a torch device that exists here.

    Raises:
        ConfigError: not a device name, or a device this machine does not have.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(
            f"device: {name!r} is not a torch device; valid: cpu, cuda, cuda:N"
        ) from None
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (device.index or 0) >= n:
            raise ConfigError(
                f"device: {name!r} is not available here ({n} CUDA devices); use device: cpu"
            )
    elif device.type != "cpu":
        raise ConfigError(f"device: {name!r} is not supported; valid: cpu, cuda, cuda:N")
    return device


def read_query_file(path: str, task: Task, train: Batch) -> Batch:
    """The named arrays of an ``.npz`` query file, cast to the training data's dtypes.

    Raises:
        DataError: the file is not a readable ``.npz`` (truncated, another format, pickled
            objects), or an array is empty or not numeric.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise ValueError("a single array, not an archive of named arrays")
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zipfile, zlib, numpy format errors: all mean "not a good .npz"
        raise DataError(
            f"queries.path: {path!r} is not a readable .npz of named arrays "
            f"({type(exc).__name__}: {exc}); write it with numpy.savez(path, x=...)"
        ) from None
    queries = {}
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf" or a.ndim == 0 or a.shape[0] == 0:
            raise DataError(
                f"queries.path: array {k!r} of {path!r} has dtype {a.dtype} and shape {a.shape}; "
                f"expected a non-empty numeric array with the queries on axis 0"
            )
        dtype = train[k].dtype if k in train else None
        queries[k] = torch.as_tensor(a).to(device=task.device, dtype=dtype)
    return queries
