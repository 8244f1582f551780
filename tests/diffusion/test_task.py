"""Task behaviour: determinism, checkpoints, loaders, samplers, bad input (exit 2 via the CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from attribution_diffusion import load_checkpoint, save_checkpoint
from attribution_diffusion.measurements import TrajectoryNLL

from attribution_core import ConfigError, DataError, Task, get_registry
from attribution_core.testing import run_attribute

TINY_CLI = {
    "name": "ddpm-digits",
    "width": 2,
    "channel_mult": [1],
    "T": 10,
    "n_train": 6,
    "train_steps": 2,
    "batch_size": 4,
    "n_samples": 2,
}


# ---- determinism (acceptance 4) ----------------------------------------------------------------
def test_same_seed_gives_bitwise_same_model_samples_and_measurements(make_task):
    a, b = make_task(dtype=torch.float32), make_task(dtype=torch.float32)
    ones = torch.ones(a.n_train)
    ma = a.train(a.build_model(3), ones, 3)
    mb = b.train(b.build_model(3), ones, 3)
    for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    qa, qb = a.make_queries(ma, 4, seed=9), b.make_queries(mb, 4, seed=9)
    assert torch.equal(qa["x"], qb["x"]) and torch.equal(qa["trajectory"], qb["trajectory"])
    reg = get_registry()
    for name in ("loss", "neg-elbo", "square-norm", "trajectory-nll"):
        va = reg.create("measurement", name, a)(ma, qa, torch.Generator().manual_seed(1))
        vb = reg.create("measurement", name, b)(mb, qb, torch.Generator().manual_seed(1))
        assert torch.equal(va, vb), name
    # a different seed gives a different model and different samples
    mc = a.train(a.build_model(4), ones, 4)
    assert not torch.equal(ma.conv_in.weight, mc.conv_in.weight)
    assert not torch.equal(a.make_queries(ma, 4, seed=10)["x"], qa["x"])


def test_train_uses_kept_examples_and_scaled_steps(make_task):
    """Weight 0 everywhere but one example: the model only ever sees that example."""
    task = make_task(train_steps=10)
    from attribution_diffusion.training import step_count

    w = torch.zeros(task.n_train, dtype=torch.float64)
    w[: task.n_train // 2] = 1.0
    assert step_count(w, task.train_config) == 5
    assert step_count(torch.ones(task.n_train), task.train_config) == 10
    with pytest.raises(DataError, match="every example has weight 0"):
        task.train(task.build_model(0), torch.zeros(task.n_train), 0)
    with pytest.raises(DataError, match="weights mismatch"):
        task.train(task.build_model(0), torch.ones(task.n_train + 1), 0)


def test_checkpoint_round_trip_is_safetensors_and_json(make_task, tmp_path):
    task = make_task()
    model = task.train(task.build_model(0), torch.ones(task.n_train, dtype=task.dtype), 0)
    path = save_checkpoint(model, task, tmp_path / "ckpt")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["task"]["name"] == "ddpm-digits" and meta["dtype"] == "float64"
    task2, model2 = load_checkpoint(path)
    x = task.train_data()["x"][:2]
    t = torch.tensor([1, 7])
    assert torch.equal(model(x, t), model2(x, t))
    assert task2.describe() == task.describe()
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_samplers_shapes_and_images(make_task, model):
    task = make_task()
    x, traj = task.sample(model, 5, seed=0, trajectory=True)
    assert x.shape == (5, 1, 8, 8) and traj.shape == (5, task.schedule.T + 1, 1, 8, 8)
    img = task.images({"x": x})
    assert img.min() >= 0 and img.max() <= 1
    ddim = make_task(sampler="ddim", ddim_steps=4)
    q = ddim.make_queries(model, 3, seed=0)
    assert set(q) == {"x"} and q["x"].shape == (3, 1, 8, 8) and torch.isfinite(q["x"]).all()
    with pytest.raises(DataError, match="no 'trajectory'"):
        TrajectoryNLL(ddim.schedule).evaluate(model, q, {})


def test_digits_data_and_classes(make_task):
    task = make_task(n_train=None, classes=[1, 0])
    x = task.train_data()["x"]
    assert x.shape == (360, 1, 8, 8)  # digits-2: 178 zeros + 182 ones
    assert x.min() >= -1 and x.max() <= 1
    assert sorted(task.labels.unique().tolist()) == [0, 1]
    ten = make_task(n_train=None, classes=list(range(10)))
    assert ten.n_train == 1797


def test_image_folder_loader(make_task, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cats", 3), ("dogs", 2)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    task = make_task(data="folder", path=str(tmp_path), classes=[0, 1], image_size=8, n_train=None)
    x = task.train_data()["x"]
    assert x.shape == (5, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert task.labels.tolist() == [0, 0, 0, 1, 1]
    gray = make_task(
        data="folder", path=str(tmp_path), classes=[1], image_size=8, n_train=None, grayscale=True
    )
    assert gray.train_data()["x"].shape == (2, 1, 8, 8)
    model = gray.build_model(0)
    assert model(gray.train_data()["x"], torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    with pytest.raises(ConfigError, match="not a class of folder"):
        make_task(data="folder", path=str(tmp_path), classes=[2], image_size=8, n_train=None)


# ---- bad input (acceptance 5) ------------------------------------------------------------------
def test_bad_classes(make_task):
    with pytest.raises(ConfigError, match=r"task\.classes: .*0–9"):
        make_task(classes=[0, 11])


def test_bad_image_size(make_task):
    with pytest.raises(ConfigError, match=r"task\.image_size: 6 cannot pass through a U-Net"):
        make_task(channel_mult=[1, 2, 2], image_size=6)


def test_bad_timestep(task):
    reg = get_registry()
    for t in (0, task.schedule.T + 1):
        with pytest.raises(ConfigError, match=r"timestep .* outside \[1, 10\]"):
            reg.create("measurement", "timestep-loss", task, t=t)


def test_bad_trajectory_length(task, model):
    traj = torch.zeros(2, task.schedule.T, 1, 8, 8, dtype=task.dtype)
    with pytest.raises(DataError, match=r"expected 11 states x_T..x_0 \(T = 10\)"):
        TrajectoryNLL(task.schedule).evaluate(model, {"x": traj[:, 0], "trajectory": traj}, {})


def test_missing_cifar_path(make_task, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        make_task(data="cifar10", path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="holds no CIFAR-10"):
        make_task(data="cifar10", path=str(tmp_path))  # exists, but empty


@pytest.mark.parametrize(
    ("task_options", "target", "message"),
    [
        ({"classes": [3, 12]}, "loss", "task.classes"),
        ({"channel_mult": [1, 2, 2], "image_size": 6}, "loss", "task.image_size: 6"),
        ({}, {"name": "timestep-loss", "t": 11}, "timestep 11 is outside [1, 10]"),
        ({"data": "cifar10", "path": "/no/such/cifar"}, "loss", "'/no/such/cifar' does not exist"),
        ({}, "square-norm", "function only"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, task_options, target, message):
    config = {
        "task": {**TINY_CLI, **task_options},
        "methods": ["grad-dot"],
        "target": target,
        "queries": {"count": 2},
    }
    code, output = run_attribute(config, tmp_path / "out")
    assert code == 2, output
    assert message in output


def test_cli_trajectory_of_wrong_length_exits_2(tmp_path):
    traj = np.zeros((2, 7, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "q.npz", x=traj[:, -1], trajectory=traj)
    config = {
        "task": TINY_CLI,
        "methods": ["grad-dot"],
        "target": "trajectory-nll",
        "queries": {"source": "file", "path": str(tmp_path / "q.npz"), "count": 2},
    }
    code, output = run_attribute(config, tmp_path / "out")
    assert code == 2, output
    assert "expected 11 states" in output


# ---- end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target", ["loss", "neg-elbo", "trajectory-nll", {"name": "timestep-loss", "t": 3}]
)
def test_cli_attribute_grad_dot_end_to_end(tmp_path, target):
    config = {
        "task": TINY_CLI,
        "methods": ["grad-dot"],
        "target": target,
        "queries": {"count": 3, "seed": 1},
    }
    code, output = run_attribute(config, tmp_path / "out", "--quiet")
    assert code == 0, output
    scores = np.load(tmp_path / "out" / "grad-dot" / "scores.npy")
    assert scores.shape == (6, 3) and np.isfinite(scores).all() and np.abs(scores).sum() > 0
    queries = np.load(tmp_path / "out" / "queries.npz")
    assert queries["trajectory"].shape == (3, 11, 1, 8, 8)


# ---- hooks -------------------------------------------------------------------------------------
def test_full_step_options_switches_scale_steps_off():
    """Diffusion tasks train a subset for all ``train_steps``; the base Task keeps the options."""
    options = {"scale_steps": True, "train_steps": 7}
    registry = get_registry()
    for name in ("ddpm-digits", "ddpm-diffusers"):
        factory = registry.get("task", name).factory
        assert factory.full_step_options(options) == {"scale_steps": False, "train_steps": 7}
    assert options == {"scale_steps": True, "train_steps": 7}  # not modified in place
    assert Task.full_step_options(options) == options
