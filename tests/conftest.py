"""Shared fixtures. Core tests need only torch (and scikit-learn where they compare against it)."""

import pytest
import torch


def devices():
    """CPU always; CUDA too when this machine has it (the core is device-agnostic)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    return found


@pytest.fixture(params=devices())
def device(request):
    return torch.device(request.param)
