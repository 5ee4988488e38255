"""The one way the kernel cells declare a C++ operator of the native library."""

from __future__ import annotations

from pathlib import Path

from mindspore import ops


def like_first(*args):
    """out_shape/out_dtype for an operator whose output is shaped and typed like its first input."""
    return args[0]


def aot_op(library: Path, name: str, out_shape=like_first, out_dtype=like_first) -> ops.Custom:
    """`name` of the compiled `library` as a MindSpore operator (func_type "aot": a C symbol)."""
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")
