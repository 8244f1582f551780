"""Acceptance 3: bad model folders fail with exit 2 and a message naming the file/field."""

from __future__ import annotations

import json

import pytest
from attribution_diffusion.diffusers_task import DiffusersDDPMTask

from attribution_core import ConfigError, DataError
from attribution_core.testing import run_attribute


def _cli(tmp_path, task: dict):
    cfg = {
        "task": {"name": "ddpm-diffusers", "n_train": 4, "n_samples": 1, **task},
        "methods": ["grad-dot"],
        "queries": {"source": "train", "count": 2},
    }
    return run_attribute(cfg, tmp_path / "out")


def test_missing_model_dir_exit_2(tmp_path):
    missing = tmp_path / "nowhere"
    code, output = _cli(tmp_path, {"model_dir": str(missing)})
    assert code == 2, output
    assert "task.model_dir" in output and "does not exist" in output
    with pytest.raises(DataError, match=r"task\.model_dir: .*nowhere.* does not exist"):
        DiffusersDDPMTask(model_dir=str(missing))


def test_missing_scheduler_file(make_model_dir):
    root = make_model_dir()
    (root / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(DataError, match=r"scheduler_config\.json.* does not exist"):
        DiffusersDDPMTask(model_dir=str(root))


def test_sample_size_mismatch_exit_2(tmp_path, make_model_dir):
    root = make_model_dir(sample_size=16)  # digits are 8×8
    code, output = _cli(tmp_path, {"model_dir": str(root)})
    assert code == 2, output
    assert "config.json" in output and "sample_size 16" in output
    with pytest.raises(ConfigError, match=r"unet/config\.json: sample_size 16 does not match"):
        DiffusersDDPMTask(model_dir=str(root))
    # the fix the message names: resize the data to the U-Net's sample_size
    task = DiffusersDDPMTask(model_dir=str(root), image_size=16, n_train=2)
    assert task.train_data()["x"].shape == (2, 1, 16, 16)


def test_channel_mismatch_exit_2(tmp_path, make_model_dir):
    root = make_model_dir(in_channels=3, out_channels=3)  # digits have one channel
    code, output = _cli(tmp_path, {"model_dir": str(root)})
    assert code == 2, output
    assert "in_channels 3" in output
    with pytest.raises(ConfigError, match=r"config\.json: in_channels 3 != the data's 1 channels"):
        DiffusersDDPMTask(model_dir=str(root))


def test_unsupported_scheduler_exit_2(tmp_path, make_model_dir):
    root = make_model_dir(scheduler="DDIMScheduler")
    code, output = _cli(tmp_path, {"model_dir": str(root)})
    assert code == 2, output
    assert "scheduler_config.json" in output and "DDIMScheduler" in output
    with pytest.raises(
        ConfigError, match=r"scheduler_config\.json: _class_name 'DDIMScheduler' is not supported"
    ):
        DiffusersDDPMTask(model_dir=str(root))


def test_v_prediction_scheduler(make_model_dir):
    root = make_model_dir()
    path = root / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(
        ConfigError, match=r"scheduler_config\.json: prediction_type 'v_prediction'"
    ):
        DiffusersDDPMTask(model_dir=str(root))


def test_not_a_unet2dmodel(make_model_dir):
    root = make_model_dir()
    path = root / "unet" / "config.json"
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "_class_name": "UNet2DConditionModel"})
    )
    with pytest.raises(ConfigError, match=r"config\.json: _class_name 'UNet2DConditionModel'"):
        DiffusersDDPMTask(model_dir=str(root))


def test_model_dir_xor_unet(tmp_path, model_dir):
    code, output = _cli(tmp_path, {"model_dir": str(model_dir), "unet": {"sample_size": 8}})
    assert code == 2, output
    assert "exactly one of model_dir" in output
    with pytest.raises(ConfigError, match="exactly one of model_dir"):
        DiffusersDDPMTask()


def test_unet_config_scheduler_checked():
    with pytest.raises(ConfigError, match=r"task\.scheduler: prediction_type 'sample'"):
        DiffusersDDPMTask(
            unet={"sample_size": 8, "in_channels": 1, "out_channels": 1},
            scheduler={"prediction_type": "sample"},
        )
