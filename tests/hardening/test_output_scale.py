"""Output at any size: scores.npy written in place (memmap), top-k output, their errors."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LIN

from attribution_core import attribute, records, sinks
from attribution_core.errors import ConfigError, DataError
from attribution_core.outputs import MethodOutput
from attribution_core.report.topk import topk
from attribution_core.sinks import MemmapSink, TopK, TopKSink
from attribution_core.storage import DiskFullError
from attribution_core.testing import run_cli, write_config

F32 = {**LIN, "dtype": "float32"}


def _stream(sink, full: torch.Tensor, block: int) -> None:
    for start in range(0, full.shape[0], block):
        sink.write(slice(start, start + block), full[start : start + block])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_sink_equals_torch_topk_on_the_full_matrix(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(103, 7, generator=g, dtype=torch.float64)
    full[5, :] = full[60, :]  # ties: the smaller index first
    sink = TopKSink(None, 103, 7, k=9)
    _stream(sink, full, 10)
    top = sink.commit()
    f32 = full.float()
    for sign, index, score in (
        (1, top.positive_index, top.positive_score),
        (-1, top.negative_index, top.negative_score),
    ):
        want = torch.topk(sign * f32, 9, dim=0)
        assert np.array_equal(score.T, (sign * want.values).numpy())
        col = f32.numpy()
        order = np.stack([np.argsort(-sign * col[:, q], kind="stable")[:9] for q in range(7)], 1)
        assert np.array_equal(index.T, order)


def test_memmap_sink_is_bit_identical_to_the_in_memory_path(tmp_path: Path) -> None:
    full = torch.randn(50, 3, dtype=torch.float32)
    sink = MemmapSink(tmp_path / "scores.npy", 50, 3)
    _stream(sink, full, 16)
    arr = sink.commit()
    ref = tmp_path / "ref.npy"
    np.save(ref, full.numpy())
    assert (tmp_path / "scores.npy").read_bytes() == ref.read_bytes()
    assert not arr.flags.writeable and np.array_equal(arr, full.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npy", "scores.npy"]


def test_memmap_sink_refuses_a_full_disk_at_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sinks.os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match="no space left .* writing '.*scores.npy'"):
        MemmapSink(tmp_path / "scores.npy", 1000, 4)
    assert list(tmp_path.iterdir()) == []


def test_memmap_sink_commits_only_when_every_row_was_written(tmp_path: Path) -> None:
    sink = MemmapSink(tmp_path / "scores.npy", 10, 2)
    sink.write(slice(0, 5), torch.zeros(5, 2))
    with pytest.raises(RuntimeError, match="5 of 10 training rows never written"):
        sink.commit()
    assert list(tmp_path.iterdir()) == []


def test_influence_with_an_output_never_allocates_the_full_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[tuple] = []
    real = records.MemorySink.__init__

    def spy(self, *args, **kwargs) -> None:
        made.append(args)
        real(self, *args, **kwargs)

    monkeypatch.setattr(records.MemorySink, "__init__", spy)
    cfg = {
        **F32,
        "task": {"name": "linear-regression", "n_train": 3000, "dim": 4},
        "methods": ["grad-dot", "dense-influence"],
        "chunk_size": 256,
    }
    result = attribute(cfg, out=tmp_path / "out")
    assert made == []
    for label in ("grad-dot", "dense-influence"):
        assert isinstance(result.scores[label], np.memmap)
        assert result.scores[label].shape == (3000, 5)
    plain = attribute(cfg)  # in memory, no out: the same scores
    for label, arr in plain.scores.items():
        assert np.array_equal(np.load(tmp_path / "out" / label / "scores.npy"), arr)


def test_topk_run_writes_topk_npz_only_and_topk_cli_reads_both(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", F32)
    code, text = run_cli("attribute", str(cfg), "--out", str(tmp_path / "full"), "--quiet")
    assert code == 0, text
    code, text = run_cli(
        "attribute", str(cfg), "--out", str(tmp_path / "top"), "--topk", "6", "--quiet"
    )
    assert code == 0, text
    for label in ("grad-dot", "dense-influence"):
        d = tmp_path / "top" / label
        assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "topk.npz"]
        assert TopK.load(d / "topk.npz").positive_index.shape == (5, 6)
        assert json.loads((d / "manifest.json").read_text())["identity"]["topk"] == 6
    for q in range(5):
        assert topk(tmp_path / "top", q, 6) == topk(tmp_path / "full", q, 6)
    code, text = run_cli("topk", str(tmp_path / "top"), "--query", "1", "--k", "3")
    assert code == 0 and "grad-dot (query 1)" in text
    code, text = run_cli("topk", str(tmp_path / "top"), "--query", "1", "--k", "7")
    assert code == 2 and "holds only the top 6" in text and "Traceback" not in text
    # resumed: the finished top-k output is reused
    code, text = run_cli(
        "attribute", str(cfg), "--out", str(tmp_path / "top"), "--topk", "6", "--quiet"
    )
    assert code == 0, text


def test_topk_larger_than_n_train_exits_2_before_work(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", F32)
    out = tmp_path / "out"
    code, text = run_cli("attribute", str(cfg), "--out", str(out), "--topk", "41", "--quiet")
    assert code == 2 and "larger than the task's 40 training examples" in text, text
    assert not any(out.rglob("*.npy")) and not any(out.rglob("*.npz"))
    with pytest.raises(ConfigError, match="topk"):
        attribute({**F32, "topk": 41})


def test_bench_and_counterfactual_refuse_topk(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", {**F32, "topk": 3})
    for command in ("bench", "counterfactual"):
        code, text = run_cli(command, str(cfg), "--out", str(tmp_path / command), "--quiet")
        assert code == 2 and f"`{command}` needs the full scores" in text, text


def test_a_scorer_returning_its_own_tensor_is_still_written(tmp_path: Path) -> None:
    full = torch.randn(20, 3, dtype=torch.float64)
    out = MethodOutput(tmp_path / "m", None, "float32")
    out(20, 3, torch.float32)  # opened but not returned (e.g. a composite's member)
    arr, files = out.finish(full)
    assert arr.dtype == np.float32 and np.array_equal(arr, full.float().numpy())
    assert set(files) == {"scores.npy"}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["scores.npy"]
    top, _ = MethodOutput(tmp_path / "t", 4, "float32").finish(full)
    assert np.array_equal(top.positive_index[:, 0], full.argmax(0).numpy())


def test_topk_npz_without_its_arrays_is_a_data_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "topk.npz", x=np.zeros(2))
    with pytest.raises(DataError, match="not a topk.npz"):
        TopK.load(tmp_path / "topk.npz")
