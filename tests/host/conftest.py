"""Host tests: a real ComfyUI checkout (COMFYUI_PATH), its model patcher, its loaders, its server.

The extension is loaded the way ComfyUI loads custom nodes (``nodes.load_custom_node`` on this
repository), with every ComfyUI folder redirected into a temporary directory.
"""

import asyncio
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_support import COMFYUI_PATH, REPO  # noqa: E402

# ComfyUI's modules first: its top-level ``nodes`` must win over this repository's ``nodes/``.
if COMFYUI_PATH not in sys.path:
    sys.path.insert(0, COMFYUI_PATH)
sys.path.insert(2, os.path.join(REPO, "tools"))
sys.modules.pop("nodes", None)

from comfy.cli_args import args  # noqa: E402

# before comfy.model_management is imported; SPARSE_ATOMS_TEST_DEVICE=cuda runs on ComfyUI's GPU
args.cpu = os.environ.get("SPARSE_ATOMS_TEST_DEVICE", "cpu") != "cuda"

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("SPARSE_ATOMS_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def comfy_dirs(tmp_path_factory):
    """ComfyUI's models/output/input/temp folders inside a temporary directory."""
    import folder_paths

    root = tmp_path_factory.mktemp("comfy")
    for name in ("models", "output", "input", "temp"):
        (root / name).mkdir()
    folder_paths.models_dir = str(root / "models")
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_input_directory(str(root / "input"))
    folder_paths.set_temp_directory(str(root / "temp"))
    (root / "models" / "loras").mkdir()
    folder_paths.add_model_folder_path("loras", str(root / "models" / "loras"), is_default=True)
    return root


@pytest.fixture(scope="session")
def node_classes(comfy_dirs):
    """Our node classes by id, registered by ComfyUI's own custom-node loader."""
    import nodes

    before = set(nodes.NODE_CLASS_MAPPINGS)
    loaded = asyncio.run(nodes.load_custom_node(REPO, ignore=before))
    assert loaded, "ComfyUI could not load the extension (see the log above)"
    ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("SparseAtoms_")}
    assert ours, "the extension registered no SparseAtoms_ node"
    return ours


@pytest.fixture(autouse=True)
def clean_models():
    """Every test starts and ends with ComfyUI's model management empty."""
    import comfy.model_management

    yield
    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def server():
    """A real ComfyUI server on loopback with this package, one per test module."""
    from comfy_server import ComfyServer

    comfy = ComfyServer(COMFYUI_PATH).start()
    yield comfy
    comfy.stop()
