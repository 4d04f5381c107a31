"""Save / Load Sparse Atoms, Sparse Atoms to LoRA, LoRA to Sparse Atoms."""

from __future__ import annotations

import os

import torch

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths
from comfy_api.latest import io
from safetensors.torch import save as save_safetensors

import sparse_core as sc

from .common import CATEGORY, FOLDER, SparseAtomsType, atoms_files, safe_target
from .patching import adaptable_layers, model_family


class SaveSparseAtoms(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_Save", display_name="Save Sparse Atoms", category=CATEGORY,
            description="Writes the atoms to models/sparse_atoms/<name>.safetensors (atomically).",
            inputs=[SparseAtomsType.Input("sparse_atoms", tooltip="The atoms to save."),
                    io.String.Input("filename", default="concept",
                                    tooltip="A name inside models/sparse_atoms (sub-folders allowed, no '..').")],
            outputs=[], is_output_node=True,
        )

    @classmethod
    def execute(cls, sparse_atoms, filename):
        target = safe_target(folder_paths.get_folder_paths(FOLDER)[0], filename, "Save Sparse Atoms")
        sc.save_atoms(sparse_atoms, target)
        return io.NodeOutput(ui={"text": [f"saved {sparse_atoms.n_atoms} atoms to {os.path.basename(target)}"]})


class LoadSparseAtoms(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_Load", display_name="Load Sparse Atoms", category=CATEGORY,
            description="Reads a Sparse Atoms file from models/sparse_atoms (validated).",
            inputs=[io.Combo.Input("atoms_name", options=atoms_files(),
                                   tooltip="A file in models/sparse_atoms.")],
            outputs=[SparseAtomsType.Output("sparse_atoms", display_name="SPARSE_ATOMS")],
        )

    @classmethod
    def execute(cls, atoms_name):
        path = folder_paths.get_full_path_or_raise(FOLDER, atoms_name)
        atoms = sc.load_atoms(path)
        return io.NodeOutput(atoms, ui={"text": [f"{atoms.n_atoms} atoms in {len(atoms)} layers "
                                                 f"({atoms.info.architecture or 'unknown model'})"]})


class SparseAtomsToLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_ToLoRA", display_name="Sparse Atoms to LoRA", category=CATEGORY,
            description="Exports the atoms as a LoRA in models/loras, exact: 'lora' writes "
                        "lora_up/lora_down/alpha (rank = kept atoms), 'diff' the full delta W. "
                        "Both load in the stock LoRA loaders.",
            inputs=[SparseAtomsType.Input("sparse_atoms", tooltip="The atoms to export."),
                    io.String.Input("filename", default="sparse_atoms_lora",
                                    tooltip="A name inside models/loras (no '..')."),
                    io.Combo.Input("format", options=list(sc.LORA_FORMATS), default="lora",
                                   tooltip="lora: up/down/alpha at rank = kept atoms; diff: the full delta W."),
                    io.Combo.Input("dtype", options=["fp32", "fp16", "bf16"], default="fp32",
                                   tooltip="Stored precision (fp32 is exact).")],
            outputs=[], is_output_node=True,
        )

    @classmethod
    def execute(cls, sparse_atoms, filename, format, dtype):
        target = safe_target(folder_paths.get_folder_paths("loras")[0], filename, "Sparse Atoms to LoRA")
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        state = sc.to_lora(sparse_atoms, format=format, dtype=dtypes[dtype])
        if not state:
            raise ValueError("Sparse Atoms to LoRA: no atom has a non-zero coefficient; nothing to export")
        data = save_safetensors(state, metadata={"sparse_atoms_format": format,
                                                 "architecture": sparse_atoms.info.architecture})
        sc.write_atomic(target, data)
        return io.NodeOutput(ui={"text": [f"wrote {os.path.basename(target)} ({len(state)} tensors)"]})


class LoRAToSparseAtoms(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_FromLoRA", display_name="LoRA to Sparse Atoms", category=CATEGORY,
            description="Atomizes a LoRA: each layer's delta W is factored by SVD into atoms ranked "
                        "by importance, prunable like trained ones (keeping the top k is the best "
                        "rank-k approximation).",
            inputs=[io.Model.Input("model", tooltip="The model the LoRA is for (its layer names and shapes)."),
                    io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A LoRA in models/loras, in any format the stock loader reads.")],
            outputs=[SparseAtomsType.Output("sparse_atoms", display_name="SPARSE_ATOMS")],
        )

    @classmethod
    def execute(cls, model, lora_name):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        state = comfy.utils.load_torch_file(path, safe_load=True)
        atoms = atomize_for_model(model, state, lora_name)
        return io.NodeOutput(atoms, ui={"text": [f"{atoms.n_atoms} atoms in {len(atoms)} layers from {lora_name}"]})


def atomize_for_model(model, state: dict, name: str) -> sc.SparseAtoms:
    """Read a LoRA the way the stock loader does (its key map and adapters: LoRA, LoHa, LoKr...),
    take each patched weight's delta W, and atomize it."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(state), key_map, log_missing=False)
    layers = adaptable_layers(model)
    deltas = {}
    for weight_key, patch in patches.items():
        key = weight_key[: -len(".weight")] if isinstance(weight_key, str) else None
        if key is None or key not in layers:
            continue
        shape = tuple(layers[key].weight.shape)
        low_rank = _plain_lora_factors(patch, shape)
        if low_rank is not None:  # factored without ever forming delta W
            deltas[key] = low_rank
            continue
        zero = torch.zeros(shape, dtype=torch.float32)
        deltas[key] = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], zero, weight_key)
    if not deltas:
        raise ValueError(f"LoRA {name!r} has no weight this model's loader recognises (is it for "
                         f"another model? this one is {model_family(model)[1]})")
    return sc.atomize(deltas, info=sc.AtomsInfo(architecture=model_family(model)[1],
                                                dictionary_method=f"lora:{name}"))


def _plain_lora_factors(patch, shape):
    """``LowRankDelta`` for a plain LoRA patch (no mid, DoRA or reshape), else None."""
    from comfy.weight_adapter import LoRAAdapter

    if not isinstance(patch, LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = patch.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    rank = down.shape[0]
    scale = (alpha / rank) if alpha is not None else 1.0
    return sc.LowRankDelta(up.float().reshape(up.shape[0], rank) * scale,
                           down.float().reshape(rank, -1), shape)


NODES = [SaveSparseAtoms, LoadSparseAtoms, SparseAtomsToLoRA, LoRAToSparseAtoms]
