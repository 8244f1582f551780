"""Sample grids: ``python -m attribution_diffusion.figures OUT.png [--n 64] [--seed 0]``.

Trains the default ``ddpm-digits`` model (model seed 0) and saves an ``n``-sample grid.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import Tensor


def save_grid(images: Tensor, path: str | Path, title: str = "") -> Path:
    """Save ``(n, C, H, W)`` images in [0, 1] as a square PNG grid (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    side = math.ceil(math.sqrt(n))
    fig, axes = plt.subplots(side, side, figsize=(side * 0.8, side * 0.8 + (0.3 if title else 0)))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].detach().cpu().permute(1, 2, 0).numpy()
            if img.shape[2] == 1:
                ax.imshow(img[:, :, 0], cmap="gray_r", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(img.clip(0.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Train the default task's model and save a grid of its samples."""
    from attribution_diffusion.task import DDPMDigitsTask

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = DDPMDigitsTask()
    t0 = time.perf_counter()
    model = task.base_model(0)
    t1 = time.perf_counter()
    x, _ = task.sample(model, args.n, args.seed)
    t2 = time.perf_counter()
    save_grid(task.images({"x": x}), args.out, f"ddpm-digits {task.opts.classes}, seed {args.seed}")
    print(f"train {t1 - t0:.1f} s, sample {args.n}: {t2 - t1:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
