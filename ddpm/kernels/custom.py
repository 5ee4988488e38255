"""The one way the kernel cells declare a C++ operator of the native library (`aot_op`), and one that
writes its inputs in place (`in_place_op`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mindspore as ms
from mindspore import ops
from mindspore.ops import signature as sig


def like_first(*args):
    """out_shape/out_dtype for an operator whose output is shaped and typed like its first input."""
    return args[0]


def aot_op(library: Path, name: str, out_shape=like_first, out_dtype=like_first) -> ops.Custom:
    """`name` of the compiled `library` as a MindSpore operator (func_type "aot": a C symbol)."""
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def done_flag(*args):
    """out_shape of an operator that writes its inputs: a (1,) flag, set once the update is done."""
    return [1]


def float32(*args):
    return ms.float32


def in_place_op(library: Path, name: str, written: Sequence[bool]) -> ops.Custom:
    """`name` of `library`, its inputs declared to MindSpore as read or, where `written`, written in
    place, as nn.Adam's own operator declares its weight and moments: the written tensors reach it as
    themselves, not as copies, and MindSpore runs it after every reader of them in the step and every
    later reader after it. Both declarations are needed: without the side effect the signature is
    ignored, and the operator may update a copy."""
    op = aot_op(library, name, out_shape=done_flag, out_dtype=float32)
    rw = [sig.sig_rw.RW_WRITE if w else sig.sig_rw.RW_READ for w in written]
    op.set_signatures(tuple(sig.make_sig(f"x{i}", mode) for i, mode in enumerate(rw)))
    op.add_prim_attr("side_effect_mem", True)
    return op
