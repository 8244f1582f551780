"""Bad weights and bad tasks fail with exit 2 and a message naming what was looked for.

Every test here runs with the network blocked (``no_network``): nothing is downloaded.
"""

from __future__ import annotations

import pytest

from attribution_core import ConfigError, DataError, attribute
from attribution_core.testing import run_attribute

DIGITS = {"name": "digits-classifier", "n_train": 12, "steps": 1, "hidden": 4}


def attribute_cli(tmp_path, method: dict, task: dict = DIGITS) -> tuple[int, str]:
    """``attribution attribute`` of one method on ``task`` (2 queries): (exit code, output)."""
    config = {"task": task, "queries": {"count": 2}, "methods": [method]}
    return run_attribute(config, tmp_path / "out")


def test_missing_checkpoint_exits_2(tmp_path, tiny_clip, no_network):
    config, _ = tiny_clip
    missing = tmp_path / "nowhere.safetensors"
    code, output = attribute_cli(
        tmp_path, {"name": "clip", "architecture": str(config), "checkpoint": str(missing)}
    )
    assert code == 2, output
    assert f"checkpoint: '{missing}' does not exist" in output
    assert not (tmp_path / "out" / "clip").exists()


def test_checkpoint_of_another_architecture_exits_2(tmp_path, tiny_clip, other_clip, no_network):
    config, _ = tiny_clip
    _, other_weights = other_clip
    code, output = attribute_cli(
        tmp_path, {"name": "clip", "architecture": str(config), "checkpoint": str(other_weights)}
    )
    assert code == 2, output
    assert "is not a state dict of open_clip 'tiny-clip-test'" in output
    assert "differ in shape, e.g." in output


def test_file_that_is_no_checkpoint_raises(tmp_path, tiny_clip, no_network):
    config, _ = tiny_clip
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    method = {"name": "clip", "architecture": str(config), "checkpoint": str(junk)}
    with pytest.raises(DataError, match="cannot be read as a state dict"):
        attribute({"task": DIGITS, "queries": {"count": 2}, "methods": [method]})


def test_default_tag_not_in_cache_exits_2_naming_what_was_looked_for(tmp_path, no_network):
    """The user default (ViT-B-32, tag 'openai') with an empty cache: no download, exit 2."""
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    code, output = attribute_cli(tmp_path, {"name": "clip", "cache_dir": str(cache)})
    assert code == 2, output
    out = " ".join(output.split())
    assert "'ViT-B-32'/'openai' are not in the local cache" in out
    assert "timm/vit_base_patch32_clip_224.openai/open_clip_model.safetensors" in out
    assert f"{cache}/ViT-B-32.pt" in out
    assert "nothing is downloaded" in out and "set checkpoint:" in out
    assert list(cache.iterdir()) == []  # nothing was written into the cache either


def test_unknown_tag(tiny_clip, no_network):
    with pytest.raises(
        ConfigError, match="'laion-nope' is not an open_clip tag of 'ViT-B-32'; valid tags: openai"
    ):
        attribute({"task": DIGITS, "methods": [{"name": "clip", "pretrained": "laion-nope"}]})


def test_checkpoint_and_pretrained_both_set(tiny_clip, no_network):
    _, weights = tiny_clip
    method = {"name": "clip", "checkpoint": str(weights), "pretrained": "openai"}
    with pytest.raises(ConfigError, match="both set; give one"):
        attribute({"task": DIGITS, "methods": [method]})


def test_unknown_architecture(tiny_clip, no_network):
    _, weights = tiny_clip
    method = {"name": "clip", "architecture": "ViT-Nope", "checkpoint": str(weights)}
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-Nope'; valid names"):
        attribute({"task": DIGITS, "methods": [method]})


def test_missing_architecture_json(tmp_path, tiny_clip, no_network):
    _, weights = tiny_clip
    method = {"name": "clip", "architecture": str(tmp_path / "x.json"), "checkpoint": str(weights)}
    with pytest.raises(ConfigError, match=r"model-config file .* does not exist"):
        attribute({"task": DIGITS, "methods": [method]})


def test_unknown_option_exits_2(tmp_path, no_network):
    code, output = attribute_cli(tmp_path, {"name": "clip", "checkpont": "x"})
    assert code == 2, output
    assert "checkpont: unknown option" in output


@pytest.mark.parametrize("method", ["clip", "pixel-similarity"])
def test_task_without_images(method, tiny_clip, tmp_path, no_network):
    config, weights = tiny_clip
    entry = (
        {"name": "clip", "architecture": str(config), "checkpoint": str(weights)}
        if method == "clip"
        else {"name": method}
    )
    code, output = attribute_cli(
        tmp_path, entry, task={"name": "linear-regression", "n_train": 10, "dim": 2}
    )
    assert code == 2, output
    assert "task 'linear-regression' has no images" in " ".join(output.split())
