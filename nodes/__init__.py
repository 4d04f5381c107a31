"""ComfyUI nodes: thin V3 wrappers over ``sparse_core`` (imported only inside ComfyUI)."""

from .atom_nodes import NODES as ATOM_NODES
from .data_nodes import NODES as DATA_NODES
from .digits_nodes import NODES as DIGITS_NODES
from .effect_nodes import NODES as EFFECT_NODES
from .file_nodes import NODES as FILE_NODES
from .option_nodes import NODES as OPTION_NODES
from .previews import NODES as PREVIEW_NODES

NODE_LIST = [*ATOM_NODES, *OPTION_NODES, *PREVIEW_NODES, *DATA_NODES, *EFFECT_NODES, *FILE_NODES,
             *DIGITS_NODES]
