"""Shared fixtures. Core tests need only torch (and scikit-learn where they compare against it).

Host tests (tests/host/) need a ComfyUI checkout: ``COMFYUI_PATH`` pointing at one. Without it
they are not collected, and the run says so in one line.
"""

import os

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
HOST_SKIP_LINE = ("host tests skipped: COMFYUI_PATH is not set (point it at a ComfyUI checkout to "
                  "run tests/host)")

if not COMFYUI_PATH:
    collect_ignore = ["host"]


def pytest_report_header(config):
    return f"ComfyUI host tests: {COMFYUI_PATH}" if COMFYUI_PATH else HOST_SKIP_LINE


def pytest_terminal_summary(terminalreporter):
    if not COMFYUI_PATH:
        terminalreporter.write_line(HOST_SKIP_LINE)


def devices():
    """CPU always; CUDA too when this machine has it (the core is device-agnostic)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    return found


@pytest.fixture(params=devices())
def device(request):
    return torch.device(request.param)

