"""Validation at the public edge.

Public functions validate their arguments once, here, and then call unchecked cores. Every message
names the parameter, the rule and the offending value. ``ValueError`` for bad values, ``TypeError``
for bad types.

Dtype policy: half-precision inputs (float16, bfloat16) are computed in float32, float32 stays
float32 (GEMM speed), float64 stays float64 (reference accuracy). Results are cast back to the
input dtype by the caller.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_matrix(name: str, value, *, n_cols: int | None = None, cols_of: str = "") -> torch.Tensor:
    """Check that ``value`` is a 2-D floating tensor (finiteness is :func:`check_finite`, after
    the device check); return it unchanged."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if n_cols is not None and value.shape[1] != n_cols:
        raise ValueError(
            f"{name} must have {n_cols} columns{' to match ' + cols_of if cols_of else ''}, "
            f"got shape {tuple(value.shape)}"
        )
    return value


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first non-finite entry of ``value``."""
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} contains NaN or inf ({int(bad.sum())} entries; first at index {first})"
        )


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; return it."""
    devices = {name: t.device for name, t in tensors.items()}
    unique = set(devices.values())
    if len(unique) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")
    return unique.pop()


def check_positive_int(name: str, value, *, upper: int | None = None, upper_name: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper} ({upper_name}), got {value}")
    return value


def check_nonnegative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
