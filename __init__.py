"""Sparse Atoms for ComfyUI: the custom-node package entry point.

ComfyUI imports this file and calls ``comfy_entrypoint``. Importing registers nothing and loads no
model; the entry point adds the ``models/sparse_atoms`` folder and the editor's table route, and
lists the nodes.
"""

import os
import sys

# sparse_core and digits are imported by their top-level names everywhere (tests, demo, nodes), so
# that there is one copy of each module; make them importable when ComfyUI loads this package.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import NODE_LIST, routes
    from .nodes.common import register_folder

    register_folder()
    # A running ComfyUI has imported its server already; importing it here would load it outside
    # one (tests, scripts) with ComfyUI's own import order broken.
    prompt_server = getattr(sys.modules.get("server"), "PromptServer", None)
    routes.register(getattr(prompt_server, "instance", None))  # the Atom Mask Editor's tables

    class SparseAtomsExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODE_LIST)

    return SparseAtomsExtension()
