"""Helpers the host tests share (a real module: test files import it by name, never a conftest).

``tests/host/conftest.py`` has already put ComfyUI first on ``sys.path`` when these run."""

import os

import torch

COMFYUI_PATH = os.path.abspath(os.environ["COMFYUI_PATH"])
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run_node(node_class, **inputs):
    """Call a V3 node as the executor does (inside torch.inference_mode) and return its outputs."""
    from comfy_api.latest import io

    prepared = node_class.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "1"})
    with torch.inference_mode():
        output = prepared.execute(**inputs)
    return output
