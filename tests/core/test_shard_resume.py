"""Resume at shard granularity (issue 20): kill -9 of the driver, re-run → only missing shards.

The killed run is the CLI in a subprocess; it is killed once at least two score shards are on
disk. The re-run (in-process) must reuse every finished shard, compute only the others, and give
the same bits as an uninterrupted run with the same shards (a stored shard is the float32 block
the uninterrupted run writes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from attribution_core import attribute
from attribution_core.testing import write_config

SHARDS = 12


def _config():
    return {
        "task": {"name": "ddpm-digits", "classes": [0, 1], "train_steps": 20, "width": 8},
        "methods": ["grad-dot"],
        "queries": {"count": 3},
        "chunk_size": 8,
        "shards": SHARDS,
    }


def _shard_files(out):
    return sorted((out / "grad-dot" / ".shards" / "scores").glob("*.pt"))


def test_killed_driver_resumes_with_only_the_missing_shards(tmp_path):
    config = write_config(tmp_path / "run.yaml", _config())
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "attribution_core.cli", "attribute", str(config), "--out",
           str(out), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(_shard_files(out)) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    finished = len(_shard_files(out))
    assert 2 <= finished < SHARDS
    assert not (out / "grad-dot" / "scores.npy").exists()

    resumed = attribute(_config(), out=out)
    counts = resumed.manifests["grad-dot"]["shards"]["phases"]["scores"]
    assert counts["reused"] == finished, counts
    assert counts["computed"] == SHARDS - finished, counts
    fresh = attribute(_config(), out=tmp_path / "fresh")
    assert np.array_equal(np.asarray(resumed.scores["grad-dot"]), fresh.scores["grad-dot"])
