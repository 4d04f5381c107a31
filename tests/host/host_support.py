"""Helpers the host tests share (a real module: test files import it by name, never a conftest).

``tests/host/conftest.py`` has already put ComfyUI first on ``sys.path`` when these run."""

import os

import torch

COMFYUI_PATH = os.path.abspath(os.environ["COMFYUI_PATH"])
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def node_module(node_classes, name: str):
    """The extension's module ``nodes.<name>`` as ComfyUI loaded it (under the folder's name)."""
    import importlib
    import sys

    package = sys.modules[node_classes["SparseAtoms_Apply"].__module__].__package__
    return importlib.import_module(f"{package}.{name}")


def run_node(node_class, **inputs):
    """Call a V3 node as the executor does (inside torch.inference_mode) and return its outputs."""
    from comfy_api.latest import io

    prepared = node_class.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "1"})
    with torch.inference_mode():
        output = prepared.execute(**inputs)
    return output


def saved_digits(server, entry, node: str) -> torch.Tensor:
    """The images SaveImage ``node`` of history ``entry`` wrote, as digits ``(N, 1, 8, 8)`` in
    ``[-1, 1]`` (Digits to Image's nearest-neighbour upscale undone by averaging each block)."""
    import numpy as np
    from PIL import Image

    digits = []
    for image in entry["outputs"][node]["images"]:
        path = os.path.join(server.base, image["type"], image.get("subfolder", ""), image["filename"])
        grey = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)
        scale = grey.shape[0] // 8
        assert grey.shape == (8 * scale, 8 * scale), (path, tuple(grey.shape))
        digits.append(grey.reshape(8, scale, 8, scale).mean((1, 3))[None, None] * 2 - 1)
    return torch.cat(digits)
