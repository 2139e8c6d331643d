"""What a user sees: scalars as JSON lines and TensorBoard events, image grids, and the final summary table.

Only process 0 writes. TensorBoard events are written with tensorboardX (no TensorFlow needed); without it the JSON
lines are still written.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np
from PIL import Image


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tensorboard = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # tensorboardX is a dependency; a broken install should not stop training
            return
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        # NaN and Infinity are not JSON: a non-finite value is written as null (the run stops on it, see train.py).
        finite = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **finite}, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, int(step))
            self._tensorboard.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def image_grid(images_bhwc: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile images in [0, 1] into one uint8 image (rows of `columns`, white padding)."""
    images = np.clip(np.asarray(images_bhwc, np.float32), 0.0, 1.0)
    count, height, width, channels = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = np.ones((rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
                   np.float32)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top:top + height, left:left + width] = image
    return (grid * 255).round().astype(np.uint8)


def save_image_grid(images_bhwc: np.ndarray, path: str, columns: int | None = None) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid = image_grid(images_bhwc, columns)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * len(title)] + [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
