"""Argument checks shared by every public function.

Errors name the argument and what was expected, so a wrong call fails loudly instead of
producing a silent NaN or a wrong answer.
"""

from __future__ import annotations

import torch


def check_tensor(name: str, x, ndim: int | None = None, shape_hint: str = "") -> torch.Tensor:
    """Check that ``x`` is a floating-point tensor of rank ``ndim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{name} must have {ndim} dimensions{hint}, got shape {tuple(x.shape)}")
    return x


def check_int_tensor(name: str, x, shape: tuple[int, ...]) -> torch.Tensor:
    """Check that ``x`` is an integer tensor of the given shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 or int64, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def check_same_device(**tensors: torch.Tensor) -> None:
    """Check that all tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: arithmetic is never below float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
