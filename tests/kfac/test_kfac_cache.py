"""Factor caching: reuse on the second run; a corrupted file is detected, warned and recomputed."""

from __future__ import annotations

import pytest
import torch
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from kfac_toys import fit


def _files(root):
    return sorted((root / "kfac").glob("*.safetensors"))


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian])
def test_second_fit_reuses_factors(tmp_path, conv_task, cls):
    model, _, first = fit(cls(fisher="mc", mc_samples=2), conv_task, cache_dir=tmp_path)
    assert not first.describe()["from_cache"]
    assert len(_files(tmp_path)) == 1
    _, _, second = fit(
        cls(fisher="mc", mc_samples=2, damping=0.5), conv_task, model=model, cache_dir=tmp_path
    )
    assert second.describe()["from_cache"]  # damping is applied at solve time, not cached
    assert second.describe()["data_passes"] == 0
    assert torch.equal(first.dense(), second.dense())
    # other options or another model → another file
    fit(cls(fisher="mc", mc_samples=3), conv_task, model=model, cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 2
    with torch.no_grad():
        model[0].weight.add_(1.0)
    _, _, third = fit(cls(fisher="mc", mc_samples=2), conv_task, model=model, cache_dir=tmp_path)
    assert not third.describe()["from_cache"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupted_cache_is_recomputed_with_warning(tmp_path, conv_task, damage):
    model, _, first = fit(KFACHessian(), conv_task, cache_dir=tmp_path)
    (path,) = _files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF  # one byte of tensor data: only the checksum can tell
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="corrupted"):
        _, _, again = fit(KFACHessian(), conv_task, model=model, cache_dir=tmp_path)
    assert not again.describe()["from_cache"]
    assert torch.equal(first.dense(), again.dense())
    # the file was rewritten: the next fit reads it silently
    _, _, third = fit(KFACHessian(), conv_task, model=model, cache_dir=tmp_path)
    assert third.describe()["from_cache"]


def test_cache_off(tmp_path, conv_task):
    fit(KFACHessian(cache=False), conv_task, cache_dir=tmp_path)
    assert _files(tmp_path) == []


def test_pipeline_second_run_reuses_factors(tmp_path):
    """Through ``attribute()``: the second run with the same config loads the factors."""
    from attribution_core import attribute

    cfg = {
        "task": {"name": "digits-classifier", "n_train": 60, "hidden": 8, "steps": 20},
        "methods": ["kfac-influence", "ekfac-influence"],
        "queries": {"count": 3},
        "cache_dir": str(tmp_path / "cache"),
    }
    first = attribute(cfg)
    second = attribute(cfg)  # no `out`: nothing resumed, the scorer runs again
    for label in ("kfac-influence", "ekfac-influence"):
        assert not first.manifests[label]["info"]["curvature"]["from_cache"]
        assert second.manifests[label]["info"]["curvature"]["from_cache"]
        assert (first.scores[label] == second.scores[label]).all()
    assert len(_files(tmp_path / "cache")) == 2


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian])
def test_backends_never_share_a_cache_file(tmp_path, conv_task, cls):
    """hooks and curvlinops agree to round-off, not bit for bit: each reads only its own file."""
    model, _, hooks = fit(cls(backend="hooks"), conv_task, cache_dir=tmp_path)
    _, _, ref = fit(cls(backend="curvlinops"), conv_task, model=model, cache_dir=tmp_path)
    assert not ref.describe()["from_cache"]  # not the hooks' factors
    assert len(_files(tmp_path)) == 2
    for backend, first in (("hooks", hooks), ("curvlinops", ref)):
        _, _, again = fit(cls(backend=backend), conv_task, model=model, cache_dir=tmp_path)
        info = again.describe()
        assert info["from_cache"] and info["backend"] == backend
        assert torch.equal(again.dense(), first.dense())  # same config → same bits


def test_fallback_shares_the_curvlinops_file(tmp_path, grouped_conv_task):
    """hooks on a grouped conv runs curvlinops: its factors are curvlinops' (one file)."""
    task = grouped_conv_task
    model, _, ref = fit(KFACHessian(backend="curvlinops"), task, cache_dir=tmp_path)
    _, _, got = fit(KFACHessian(backend="hooks"), task, model=model, cache_dir=tmp_path)
    info = got.describe()
    assert info["from_cache"] and info["backend"] == "curvlinops"
    assert torch.equal(got.dense(), ref.dense())
    assert len(_files(tmp_path)) == 1
