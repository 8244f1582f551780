"""A full disk ends the run with exit 1 naming the path; nothing partial is kept; re-run resumes."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import LIN

from attribution_core import storage
from attribution_core.storage import DiskFullError, atomic_save_npy
from attribution_core.testing import run_cli, write_config


def test_atomic_write_removes_its_temporary_file_on_enospc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full)
    with pytest.raises(DiskFullError, match=rf"no space left .* writing '{tmp_path / 'a.npy'}'"):
        atomic_save_npy(tmp_path / "a.npy", np.zeros(10))
    assert list(tmp_path.iterdir()) == []


def test_cli_exit_1_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the disk fills when the second method's scores.npy is allocated."""
    from attribution_core import sinks

    cfg = write_config(tmp_path / "cfg.yaml", LIN)
    out = tmp_path / "out"
    real = sinks.os.posix_fallocate
    calls = {"n": 0}

    def fallocate(fd: int, offset: int, length: int) -> None:  # grad-dot fits, the 2nd not
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(sinks.os, "posix_fallocate", fallocate)
    code, text = run_cli("attribute", str(cfg), "--out", str(out), "--quiet")
    assert code == 1, text
    bad = out / "dense-influence" / "scores.npy"
    assert f"no space left on the device writing '{bad}'" in text
    assert "Traceback" not in text
    assert not bad.exists() and not list(out.rglob(".*.tmp*"))
    finished = out / "grad-dot" / "scores.npy"
    mtime = finished.stat().st_mtime_ns
    monkeypatch.setattr(sinks.os, "posix_fallocate", real)
    code, text = run_cli("attribute", str(cfg), "--out", str(out), "--quiet")
    assert code == 0, text
    assert finished.stat().st_mtime_ns == mtime and bad.is_file()


SCRIPT = r"""
set -u
mount -t tmpfs -o size={size} none "$1" || exit 77
dd if=/dev/zero of="$1/filler" bs=4096 count={fill} 2>/dev/null
"$2" -m attribution_core.cli attribute "$3" --out "$1/out" --quiet; echo "rc=$?"
find "$1/out" -name '.*tmp*' | sed 's/^/left: /'
rm "$1/filler"
"$2" -m attribution_core.cli attribute "$3" --out "$1/out" --quiet; echo "rc=$?"
ls "$1/out/grad-dot" "$1/out/dense-influence"
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_real_tiny_filesystem(tmp_path: Path) -> None:
    """A 64 KiB tmpfs in an unprivileged mount namespace, almost filled up."""
    cfg = write_config(tmp_path / "cfg.yaml", LIN)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = SCRIPT.format(size="64k", fill=14)  # 2 pages left: queries.npz fits, not all
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(mnt), sys.executable, str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if "rc=" not in proc.stdout:
        pytest.skip(f"no unprivileged mount namespace here: {proc.stderr[-300:]}")
    first, second = [line for line in proc.stdout.splitlines() if line.startswith("rc=")]
    assert first == "rc=1", proc.stdout + proc.stderr
    assert "no space left on the device writing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "left:" not in proc.stdout  # no partial file kept
    assert second == "rc=0", proc.stdout + proc.stderr
    assert proc.stdout.count("scores.npy") == 2
