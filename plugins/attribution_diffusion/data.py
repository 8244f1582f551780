"""Image sources for the DDPM task, all returned as ``(N, C, H, W)`` float64 in [-1, 1].

* ``digits`` — scikit-learn's bundled 8×8 digits (1797 images, no download), C = 1.
* ``cifar10`` — torchvision's CIFAR-10 training split from a local ``path`` (never downloaded).
* ``folder`` — an ImageFolder-style tree ``path/<class>/<image>`` (png/jpg/jpeg/bmp), classes in
  sorted sub-folder order.

``classes`` picks class indices; examples keep the source's order. ``image_size`` resizes
(bilinear, antialiased) when it differs from the source's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from attribution_core import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
NATIVE_SIZE = {"digits": 8, "cifar10": 32}


def _select(
    images: np.ndarray, labels: np.ndarray, classes: list[int], n_classes: int, source: str
):
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise ConfigError(
            f"task.classes: {bad} not a class of {source} (valid: 0–{n_classes - 1}); pick "
            f"classes from that range"
        )
    keep = np.isin(labels, classes)
    return images[keep], labels[keep]


def load_digits_images(classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 1, 8, 8)`` in [-1, 1] and ``(N,)`` labels of the chosen digit classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0 * 2.0 - 1.0)[:, None].astype(np.float64)
    return _select(x, d.target.astype(np.int64), classes, 10, "digits")


def load_cifar10_images(path: str | None, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 training images ``(N, 3, 32, 32)`` in [-1, 1] from a local torchvision copy."""
    if not path:
        raise DataError(
            "task.path: data 'cifar10' needs a local CIFAR-10 folder (the one containing "
            "cifar-10-batches-py); set task.path"
        )
    if not Path(path).is_dir():
        raise DataError(
            f"task.path: {path!r} does not exist; give the folder containing cifar-10-batches-py "
            f"(downloads are never made)"
        )
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=path, train=True, download=False)
    except RuntimeError as exc:
        raise DataError(
            f"task.path: {path!r} holds no CIFAR-10 python batches ({exc}); give the folder "
            f"containing cifar-10-batches-py"
        ) from None
    x = ds.data.transpose(0, 3, 1, 2).astype(np.float64) / 255.0 * 2.0 - 1.0
    return _select(x, np.asarray(ds.targets, dtype=np.int64), classes, 10, "cifar10")


def load_folder_images(
    path: str | None, classes: list[int], image_size: int, grayscale: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Images from ``path/<class>/*`` resized to ``image_size``, ``(N, C, S, S)`` in [-1, 1]."""
    if not path or not Path(path).is_dir():
        raise DataError(
            f"task.path: {path!r} does not exist; give a folder with one sub-folder of images "
            f"per class"
        )
    from PIL import Image

    class_dirs = sorted(p for p in Path(path).iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(
            f"task.path: {path!r} has no class sub-folders; put images in path/<class>/"
        )
    bad = [c for c in classes if not 0 <= c < len(class_dirs)]
    if bad:
        raise ConfigError(
            f"task.classes: {bad} not a class of folder {path!r} (valid: 0–{len(class_dirs) - 1}, "
            f"sub-folders {[p.name for p in class_dirs]})"
        )
    images, labels = [], []
    mode = "L" if grayscale else "RGB"
    for c in classes:
        files = sorted(f for f in class_dirs[c].iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            with Image.open(f) as im:
                im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float64) / 255.0 * 2.0 - 1.0
            images.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            labels.append(c)
    if not images:
        raise DataError(f"task.path: no {IMAGE_SUFFIXES} images in the chosen classes of {path!r}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def resize(x: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased) resize of ``(N, C, H, W)`` to ``size × size``; identity if equal."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def load_images(
    data: str, path: str | None, classes: list[int], image_size: int, grayscale: bool = False
) -> tuple[Tensor, Tensor]:
    """``(x: (N, C, S, S) float64 in [-1, 1], labels: (N,) int64)`` from the named source."""
    if data == "digits":
        x, y = load_digits_images(classes)
    elif data == "cifar10":
        x, y = load_cifar10_images(path, classes)
    elif data == "folder":
        x, y = load_folder_images(path, classes, image_size, grayscale)
    else:  # pragma: no cover - the options model restricts the choices
        raise ConfigError(f"task.data: {data!r} unknown; valid: digits, cifar10, folder")
    xt = resize(torch.from_numpy(x), image_size).clamp(-1.0, 1.0)
    return xt, torch.from_numpy(y)


def take_examples(
    x: Tensor, labels: Tensor, n_train: int | None, cycle: bool, classes: list[int]
) -> tuple[Tensor, Tensor]:
    """The first ``n_train`` examples (None: all); with ``cycle``, the examples repeated in order
    until there are ``n_train`` (a scale benchmark's N beyond the data; every process that
    builds the task from its options gets the same rows)."""
    if n_train is None:
        return x, labels
    if n_train > x.shape[0]:
        if not cycle:
            raise ConfigError(
                f"task.n_train: {n_train} > the {x.shape[0]} examples of classes {classes}; "
                f"use at most {x.shape[0]} (or null for all), or set cycle: true to repeat them"
            )
        index = torch.arange(n_train) % x.shape[0]
        return x[index], labels[index]
    return x[:n_train], labels[:n_train]
