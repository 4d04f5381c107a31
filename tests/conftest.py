"""Shared fixtures. Core tests need only torch (and scikit-learn where they compare against it).

Host tests (tests/host/) need a ComfyUI checkout: ``COMFYUI_PATH`` pointing at one. Without it
they are not collected, and the run says so in one line.
"""

import importlib.util
import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
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


def load_repo_module(relative: str, name: str):
    """Import one pure-Python file of the node package (``nodes/presets.py``...) without the
    package, whose other modules need ComfyUI (and whose name ComfyUI's own ``nodes`` takes)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
