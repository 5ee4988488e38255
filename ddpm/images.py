"""Sample tensors -> uint8 image grid (numpy), and PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

GRID_PADDING = 2  # pixels between tiles


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    scaled = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5)
    return scaled.astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> one (rows*(H+pad)+pad, cols*(W+pad)+pad) uint8 image, grey for C=1."""
    tiles = to_uint8(images)
    b, h, w, c = tiles.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = np.zeros((nrows * (h + GRID_PADDING) + GRID_PADDING, ncols * (w + GRID_PADDING) + GRID_PADDING, c), np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, ncols)
        top, left = GRID_PADDING + r * (h + GRID_PADDING), GRID_PADDING + col * (w + GRID_PADDING)
        grid[top : top + h, left : left + w] = tile
    return grid[..., 0] if c == 1 else grid


def save_grid(images: np.ndarray, path: str | Path, ncols: int | None = None) -> Path:
    """Write a PNG grid of `images` (B, C, H, W) in [-1, 1]."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, ncols)).save(path)
    return path
