"""Validation at the public edge.

Public functions validate their arguments once, here, and then call unchecked cores. Every message
names the parameter, the rule and the offending value. ``ValueError`` for bad values, ``TypeError``
for bad types.

Dtype policy: half-precision inputs (float16, bfloat16) are computed in float32, float32 stays
float32 (GEMM speed), float64 stays float64 (reference accuracy). Results are cast back to the
input dtype by the caller.

Scale policy: the solvers work on inputs scaled by powers of two (:func:`power_of_two_exponent`,
:func:`times_power_of_two`), so that no product overflows or underflows whatever the inputs'
magnitude; scaling by a power of two is exact, so well-scaled inputs give the same codes bit for
bit. Codes that do not fit the output dtype are refused (:func:`unscale_codes`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
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


def check_not_empty(name: str, value: torch.Tensor, axis: int, what: str) -> None:
    """Raise ``ValueError`` when ``value`` has no entries along ``axis`` (``what`` names them)."""
    if value.shape[axis] == 0:
        raise ValueError(f"{name} has no {what} (shape {tuple(value.shape)}); at least one is needed")


def check_chunk_size(value) -> int | None:
    """``None`` (automatic) or a positive int."""
    return None if value is None else check_positive_int("chunk_size", value)


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


def check_int(name: str, value) -> int:
    """An integer (Python or numpy, not bool) as an ``int``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {_shown(value)}")
    return int(value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_positive_int(name: str, value, *, upper: int | None = None, upper_name: str = "") -> int:
    value = check_int(name, value)
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper} ({upper_name}), got {value}")
    return value


def check_nonnegative_float(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {_shown(value)}")
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def power_of_two_exponent(value: torch.Tensor) -> int:
    """The ``e`` with ``max|value| < 2**e`` and ``max|value| >= 2**(e - 1)``; 0 for an empty or
    all-zero tensor. Multiplying by ``2**-e`` brings the peak into ``[0.5, 1)`` exactly."""
    if value.numel() == 0:
        return 0
    low, high = torch.aminmax(value)  # one pass, no |value| temporary
    peak = max(-float(low), float(high))
    return math.frexp(peak)[1] if peak > 0.0 else 0


def times_power_of_two(value: torch.Tensor, exponent: int) -> torch.Tensor:
    """``value * 2**exponent``, exact: applied in factors of at most ``2**100`` so that each factor
    fits float32 (``2**148`` does not, although ``2**-149 * 2**148`` does)."""
    while exponent:
        step = max(-100, min(100, exponent))
        value = value * 2.0**step
        exponent -= step
    return value


def unscale_codes(codes: torch.Tensor, exponent: int, dtype: torch.dtype) -> torch.Tensor:
    """``codes * 2**exponent`` cast to ``dtype`` (the codes of the unscaled problem); a
    ``ValueError`` when they do not fit ``dtype`` (signals very large relative to the atoms)."""
    if codes.numel() == 0:
        return codes.to(dtype)
    peak = float(codes.abs().amax())
    if not math.isfinite(peak):
        raise ValueError("the solver produced NaN or inf codes (numerical breakdown on these inputs)")
    result = times_power_of_two(codes, exponent).to(dtype)
    if not bool(torch.isfinite(result).all()):
        magnitude = math.frexp(peak)[1] + exponent
        raise ValueError(
            f"the codes do not fit {dtype} (the largest is about 2**{magnitude}): the signals are "
            "too large relative to the atoms for this dtype; pass float64 inputs or rescale X or "
            "the dictionary"
        )
    return result


def scaled_float(value: float, exponent: int) -> float:
    """``value * 2**exponent`` as a Python float (a tolerance or penalty in scaled units); inf
    where it overflows a double."""
    try:
        return math.ldexp(value, exponent)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class GramScale:
    """Exponents of the scaled problem behind precomputed products: atoms ``D 2^-atoms``,
    signals ``X 2^-signals``, so ``gram 2^(-2 atoms)``, ``Xy 2^-products``, ``||x||^2
    2^(-2 signals)``; codes of the scaled problem are the codes times ``2^(atoms - signals)``."""

    atoms: int
    signals: int

    @property
    def products(self) -> int:
        return self.atoms + self.signals


def gram_scaling(gram: torch.Tensor, Xy: torch.Tensor, norms_squared: torch.Tensor | None) -> GramScale:
    """Powers of two that bring ``gram`` and the signals' squared norms (or, without them,
    ``Xy``) to at most 1."""
    atoms = -(-power_of_two_exponent(gram) // 2)  # ceil(e / 2): gram's peak is ||d||^2
    if norms_squared is not None:
        return GramScale(atoms, -(-power_of_two_exponent(norms_squared) // 2))
    return GramScale(atoms, power_of_two_exponent(Xy) - atoms)
