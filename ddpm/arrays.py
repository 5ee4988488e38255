"""Many samples to a .npy or .npz file, batch by batch: memory holds one batch, never the whole array.

Images are stored as drawn, float32 in [-1, 1], shape (num, C, H, W). A .npz also holds the
settings that drew them, one small array each (`np.load(path)["sampler"]`); a .npy holds only images.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.files import atomic_path

ARRAY_SUFFIXES = (".npy", ".npz")
IMAGES_KEY = "images"  # the images' name inside a .npz


def write_arrays(
    path: str | Path, batches: Iterable[np.ndarray], shape: tuple[int, ...], settings: dict[str, Any] | None = None
) -> Path:
    """Write the float32 `batches` (concatenated: `shape`) to `path` (.npy or .npz) atomically."""
    path = Path(path)
    if path.suffix not in ARRAY_SUFFIXES:
        raise ValueError(f"{path}: array files end in {' or '.join(ARRAY_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=True) as tmp:  # an interrupted write leaves nothing behind
        with open(tmp, "wb") as out:
            written = (_write_npy if path.suffix == ".npy" else _write_npz)(out, batches, shape, settings or {})
        if written != shape[0]:
            raise ValueError(f"{path}: got {written} images, expected {shape[0]}")
    return path


def _stream(out, batches: Iterable[np.ndarray], shape: tuple[int, ...]) -> int:
    """The .npy format written as a stream: header, then each batch's bytes in C order."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_2_0(out, header)
    written = 0
    for batch in batches:  # (B, C, H, W)
        if batch.shape[1:] != shape[1:] or written + len(batch) > shape[0]:
            raise ValueError(f"a batch of shape {batch.shape} does not fit an array of shape {shape}")
        out.write(np.ascontiguousarray(batch, np.float32).tobytes())
        written += len(batch)
    return written


def _write_npy(out, batches, shape, settings) -> int:
    return _stream(out, batches, shape)


def _write_npz(out, batches, shape, settings) -> int:
    """A .npz is a zip of .npy members, as np.savez writes it (stored, not compressed)."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(IMAGES_KEY + ".npy", "w", force_zip64=True) as member:
            written = _stream(member, batches, shape)
        for key, value in settings.items():
            with archive.open(f"{key}.npy", "w") as member:
                np.save(member, np.asarray(value), allow_pickle=False)
    return written
