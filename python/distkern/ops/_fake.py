"""Checks shared by the fake (meta) implementations of the ops.

A fake implementation also serves the Meta dispatch key, which the dispatcher picks when any argument
is a meta tensor: without a device check, a call mixing a CPU tensor with a meta one would return an
uninitialised CPU tensor (the fake's ``x.new_empty``) instead of the error the real kernels raise."""

from __future__ import annotations

import torch


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of the ops' outputs: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the arguments when the given tensors (``None`` skipped) are on
    different devices, as the compiled ops' own checks do."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{op}: {name} is on {t.device} but {first[0]} is on {first[1]}; "
                             "the tensors must be on one device")
