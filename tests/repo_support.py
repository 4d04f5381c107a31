"""Helpers the core tests share (a real module: test files import it by name, never a conftest)."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_repo_module(relative: str, name: str):
    """Import one pure-Python file of the node package (``nodes/presets.py``...) without the
    package, whose other modules need ComfyUI (and whose name ComfyUI's own ``nodes`` takes)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
