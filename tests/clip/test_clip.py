"""``clip`` and ``pixel-similarity`` against cosines computed independently in the test.

The reference path never touches the plugin: the model is ``open_clip.model.CLIP`` built from the
JSON config and loaded with ``load_state_dict``; preprocessing is written out by hand (grayscale →
3 channels, bicubic antialiased resize as torchvision's tensor ``Resize`` does, OpenAI mean/std);
cosines are taken in float64 numpy.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torchvision
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file

from attribution_core import attribute, get_registry

DIGITS = {"name": "digits-classifier", "n_train": 24, "steps": 1, "hidden": 4}


def reference_embeddings(config, weights, images: torch.Tensor) -> np.ndarray:
    """Unit-norm CLIP image embeddings, computed without the plugin: ``(B, D)`` float64."""
    from open_clip.model import CLIP

    cfg = json.loads(config.read_text())
    model = CLIP(**cfg)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    size = cfg["vision_cfg"]["image_size"]
    x = images.float().repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(
        x, size=(size, size), mode="bicubic", align_corners=False, antialias=True
    )
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        e = model.encode_image((x - mean) / std).double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_torch_torchvision_open_clip_import_and_run():
    """A broken torch/torchvision pair fails here loudly (torchvision's compiled ops)."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert "ViT-B-32" in open_clip.list_models()


def test_tiny_clip_scores_equal_independent_cosine(tiny_clip, no_network):
    config, weights = tiny_clip
    run = attribute(
        {
            "task": DIGITS,
            "queries": {"count": 5, "seed": 3},
            "methods": [{"name": "clip", "architecture": str(config), "checkpoint": str(weights)}],
        }
    )
    scores = run.scores["clip"]
    assert scores.shape == (24, 5)
    train_img = run.task.images(run.task.train_data())
    query_img = run.task.images(run.queries)
    E_train = reference_embeddings(config, weights, train_img)
    E_query = reference_embeddings(config, weights, query_img)
    # float32 encoder on both paths, identical ops up to kernel choice: 1e-5 absolute on cosines.
    np.testing.assert_allclose(scores, E_train @ E_query.T, atol=1e-5, rtol=0)
    info = run.manifests["clip"]["info"]["clip"]
    assert info["architecture"] == "tiny-clip-test"
    assert info["source"] == "checkpoint"
    assert info["embedding_dim"] == 16


def test_embeddings_are_unit_norm(tiny_clip, no_network):
    from attribution_clip.scorers import ClipScorer

    from attribution_core.testing import build_scorer

    config, weights = tiny_clip
    reg = get_registry()
    task = reg.create("task", "digits-classifier", n_train=24)
    entry = {"name": "clip", "architecture": str(config), "checkpoint": str(weights)}
    scorer = build_scorer(entry, task, registry=reg)
    assert isinstance(scorer, ClipScorer)
    E = scorer.embed(task, task.train_data())
    assert E.shape == (24, 16) and E.dtype == torch.float64
    # float64 normalisation: norms are 1 to rounding.
    np.testing.assert_allclose(E.norm(dim=1).numpy(), 1.0, atol=1e-12)
    # the preprocessing is open_clip's own eval transform, resized to the model's input size
    x = scorer.preprocess(task.images(task.train_data())[:2])
    assert tuple(x.shape) == (2, 3, 32, 32)


def test_pixel_similarity_is_pixel_cosine(no_network):
    run = attribute({"task": DIGITS, "queries": {"count": 4}, "methods": ["pixel-similarity"]})
    X = run.task.train_data()["x"].double().numpy()
    Q = run.queries["x"].double().numpy()
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    # float32 result of a float64 computation: 1e-6 absolute.
    np.testing.assert_allclose(run.scores["pixel-similarity"], Xn @ Qn.T, atol=1e-6, rtol=0)
    assert "no weights" in run.manifests["pixel-similarity"]["info"]["pixel_similarity"]


def test_pixel_similarity_is_not_clip(tiny_clip, no_network):
    """Two distinct methods with distinct scores: pixel space never stands in for CLIP."""
    config, weights = tiny_clip
    run = attribute(
        {
            "task": DIGITS,
            "queries": {"count": 3},
            "methods": [
                {"name": "clip", "architecture": str(config), "checkpoint": str(weights)},
                "pixel-similarity",
            ],
        }
    )
    assert not np.allclose(run.scores["clip"], run.scores["pixel-similarity"], atol=1e-3)


@pytest.mark.slow
def test_vit_b32_default_architecture_from_local_random_weights(tmp_path, no_network):
    """The user default ViT-B-32, random weights saved locally, loaded by path."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = open_clip.get_model_config("ViT-B-32")
    model = CLIP(**cfg)
    path = tmp_path / "vit-b-32-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    config = tmp_path / "ViT-B-32-reference.json"  # for the reference path only
    config.write_text(json.dumps(cfg))
    run = attribute(
        {
            "task": DIGITS | {"n_train": 10},
            "queries": {"count": 2},
            "methods": [{"name": "clip", "checkpoint": str(path)}],
        }
    )
    info = run.manifests["clip"]["info"]["clip"]
    assert info["architecture"] == "ViT-B-32" and info["embedding_dim"] == 512
    ref = reference_embeddings(config, path, run.task.images(run.task.train_data())) @ (
        reference_embeddings(config, path, run.task.images(run.queries)).T
    )
    # float32 ViT-B/32 forward on both paths: 1e-5 absolute on cosines.
    np.testing.assert_allclose(run.scores["clip"], ref, atol=1e-5, rtol=0)


def test_clip_on_ddpm_digits_images(tiny_clip, no_network):
    """The diffusion task's images ([-1, 1] data mapped to [0, 1]) go through the same path."""
    if "ddpm-digits" not in get_registry().names("task"):
        pytest.skip("ddpm-digits (plugin attribution_diffusion) is not installed")
    config, weights = tiny_clip
    task = {"name": "ddpm-digits", "n_train": 8, "T": 10, "width": 4, "train_steps": 1}
    run = attribute(
        {
            "task": task,
            "queries": {"source": "train", "count": 3},
            "methods": [{"name": "clip", "architecture": str(config), "checkpoint": str(weights)}],
        }
    )
    images = run.task.images(run.task.train_data())
    assert images.min() >= 0 and images.max() <= 1
    E = reference_embeddings(config, weights, images)
    # float32 encoder on both paths: 1e-5 absolute; queries are the first 3 training images.
    np.testing.assert_allclose(run.scores["clip"], E @ E[:3].T, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.diag(run.scores["clip"][:3]), 1.0, atol=1e-5)
