"""Save / Load Sparse Atoms, Sparse Atoms to LoRA, LoRA to Sparse Atoms."""

from __future__ import annotations

import logging
import math
import os

import torch

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths
from comfy_api.latest import io
from safetensors.torch import save as save_safetensors

import sparse_core as sc

from .common import CATEGORY, FOLDER, SparseAtomsType, atoms_files, listed_file, save_numbered
from .patching import adaptable_layers, model_family

log = logging.getLogger("sparse_atoms")

_OVERWRITE_TOOLTIP = ("Off: write a new numbered file, <filename>_00001.safetensors, _00002 ... "
                      "(never replaces a file). On: write exactly <filename>.safetensors, "
                      "replacing a file of that name.")


def _save(folder_name: str, filename: str, what: str, overwrite: bool, write) -> str:
    """Save into the model folder ``folder_name`` through ``write(path, overwrite=...)`` (see
    :func:`save_numbered`); logs and returns the name written, relative to the folder."""
    folder = folder_paths.get_folder_paths(folder_name)[0]
    path = save_numbered(folder, filename, what, write, overwrite=overwrite)
    log.info("%s: wrote %s", what, path)
    return os.path.relpath(path, folder)


class SaveSparseAtoms(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_Save", display_name="Save Sparse Atoms", category=CATEGORY,
            description="Writes the atoms to models/sparse_atoms/<filename>_00001.safetensors (the "
                        "next free number; atomically), or to <filename>.safetensors with overwrite.",
            inputs=[SparseAtomsType.Input("sparse_atoms", tooltip="The atoms to save."),
                    io.String.Input("filename", default="concept",
                                    tooltip="A name inside models/sparse_atoms (sub-folders allowed, no '..')."),
                    io.Boolean.Input("overwrite", default=False, optional=True, tooltip=_OVERWRITE_TOOLTIP)],
            outputs=[], is_output_node=True,
        )

    @classmethod
    def execute(cls, sparse_atoms, filename, overwrite=False):
        written = _save(FOLDER, filename, "Save Sparse Atoms", overwrite,
                        lambda target, overwrite: sc.save_atoms(sparse_atoms, target, overwrite=overwrite))
        return io.NodeOutput(ui={"text": [f"saved {sparse_atoms.n_atoms} atoms to {written}"]})


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
        atoms = sc.load_atoms(listed_file(FOLDER, atoms_name, "Load Sparse Atoms"))
        return io.NodeOutput(atoms, ui={"text": [f"{atoms.n_atoms} atoms in {len(atoms)} layers "
                                                 f"({atoms.info.architecture or 'unknown model'})"]})


class SparseAtomsToLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_ToLoRA", display_name="Sparse Atoms to LoRA", category=CATEGORY,
            description="Exports the atoms as a LoRA in models/loras (<filename>_00001.safetensors, "
                        "the next free number, or <filename>.safetensors with overwrite), exact: "
                        "'lora' writes lora_up/lora_down/alpha (rank = kept atoms), 'diff' the full "
                        "delta W. Both load in the stock LoRA loaders.",
            inputs=[SparseAtomsType.Input("sparse_atoms", tooltip="The atoms to export."),
                    io.String.Input("filename", default="sparse_atoms_lora",
                                    tooltip="A name inside models/loras (no '..')."),
                    io.Combo.Input("format", options=list(sc.LORA_FORMATS), default="lora",
                                   tooltip="lora: up/down/alpha at rank = kept atoms; diff: the full delta W."),
                    io.Combo.Input("dtype", options=["fp32", "fp16", "bf16"], default="fp32",
                                   tooltip="Stored precision (fp32 is exact)."),
                    io.Boolean.Input("overwrite", default=False, optional=True, tooltip=_OVERWRITE_TOOLTIP)],
            outputs=[], is_output_node=True,
        )

    @classmethod
    def execute(cls, sparse_atoms, filename, format, dtype, overwrite=False):
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        state = sc.to_lora(sparse_atoms, format=format, dtype=dtypes[dtype])
        if not state:
            raise ValueError("Sparse Atoms to LoRA: no atom has a non-zero coefficient; nothing to export")
        data = save_safetensors(state, metadata={"sparse_atoms_format": format,
                                                 "architecture": sparse_atoms.info.architecture})
        written = _save("loras", filename, "Sparse Atoms to LoRA", overwrite,
                        lambda target, overwrite: sc.write_atomic(target, data, overwrite=overwrite))
        return io.NodeOutput(ui={"text": [f"wrote {written} ({len(state)} tensors)"]})


class LoRAToSparseAtoms(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_FromLoRA", display_name="LoRA to Sparse Atoms", category=CATEGORY,
            description="Atomizes a LoRA: each layer's delta W is factored by SVD into atoms ranked "
                        "by importance, prunable like trained ones (keeping the top k is the best "
                        "rank-k approximation).",
            inputs=[io.Model.Input("model", tooltip="The model the LoRA is for (its layer names and shapes)."),
                    io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras") + [_NO_FILE],
                                   tooltip="A LoRA in models/loras, in any format the stock loader reads."),
                    io.LoraModel.Input("lora", optional=True,
                                       tooltip="A LoRA made in this graph (e.g. by the stock Train "
                                               "LoRA node); when connected, lora_name is not read.")],
            outputs=[SparseAtomsType.Output("sparse_atoms", display_name="SPARSE_ATOMS")],
        )

    @classmethod
    def execute(cls, model, lora_name, lora=None):
        if lora is not None:
            atoms, dropped = atomize_for_model(model, dict(lora), "the lora input")
            return cls._report(model, atoms, dropped, "the lora input")
        if lora_name == _NO_FILE:
            raise ValueError(f"{_FROM_LORA}: choose a LoRA file in lora_name, or connect a LoRA to "
                             "the lora input")
        path = listed_file("loras", lora_name, _FROM_LORA)
        try:
            state = comfy.utils.load_torch_file(path, safe_load=True)
        except Exception as error:  # its message may quote the file's bytes: name the file only
            raise ValueError(f"{_FROM_LORA}: {lora_name!r} could not be read as a LoRA file "
                             f"({type(error).__name__}: corrupt, incomplete or not a tensor file)") from None
        atoms, dropped = atomize_for_model(model, state, lora_name)
        return cls._report(model, atoms, dropped, lora_name)

    @classmethod
    def _report(cls, model, atoms, dropped, lora_name):
        text = f"{atoms.n_atoms} atoms in {len(atoms)} layers from {lora_name}"
        if dropped:
            shown = "; ".join(dropped[:5]) + (f"; and {len(dropped) - 5} more" if len(dropped) > 5 else "")
            text += (f". Dropped {len(dropped)} module(s) that do not fit this {model_family(model)[1]} "
                     f"model: {shown}")
            log.warning("%s: %s from %s; dropped %d module(s) that do not fit: %s", _FROM_LORA,
                        f"{atoms.n_atoms} atoms in {len(atoms)} layers", lora_name, len(dropped),
                        "; ".join(dropped))
        return io.NodeOutput(atoms, ui={"text": [text]})


_FROM_LORA = "LoRA to Sparse Atoms"
_NO_FILE = "[None]"  # lora_name when the LoRA comes from the lora input


def atomize_for_model(model, state: dict, name: str) -> tuple[sc.SparseAtoms, list[str]]:
    """Read a LoRA the way the stock loader does (its key map and adapters: LoRA, LoHa, LoKr...),
    take each patched weight's delta W, and atomize it.

    Returns the atoms and the modules dropped, each as ``"module (why)"``: tensors the loader does
    not map to this model, and patches that are not on a linear/convolution weight or do not match
    its shape. A LoRA of which nothing fits, NaN/inf values or a rank-0 module raise a ValueError
    naming the LoRA ``name``.
    """
    architecture = model_family(model)[1]
    if not isinstance(state, dict) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{_FROM_LORA}: {name!r} holds no LoRA tensors (an empty file, or not a "
                         "state dict of tensors)")
    lora = _ReadTracking(comfy.lora_convert.convert_lora(state))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    try:
        patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    except Exception as error:
        raise ValueError(f"{_FROM_LORA}: the stock LoRA loader cannot read {name!r} "
                         f"({type(error).__name__}: {error})") from error
    dropped = sorted({f"{_module_of(k)} (not in this model)" for k in lora if k not in lora.read})
    layers = adaptable_layers(model)
    deltas = {}
    for weight_key, patch in patches.items():
        target = weight_key[0] if isinstance(weight_key, tuple) else weight_key  # (key, slice)
        key = target[: -len(".weight")]
        if isinstance(weight_key, tuple) or not target.endswith(".weight") or key not in layers:
            dropped.append(f"{target} (not a whole linear or convolution weight)")
            continue
        shape = tuple(layers[key].weight.shape)
        delta = _layer_delta(patch, shape, weight_key, key, name)
        if delta is None:
            dropped.append(f"{key} (its update does not match the layer's shape {shape}, or is zero)")
        else:
            deltas[key] = delta
    if not deltas:
        shown = "; ".join(dropped[:5]) + (f"; and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        raise ValueError(f"{_FROM_LORA}: LoRA {name!r} fits none of this {architecture} model's "
                         f"layers (is it for another model?): {shown}")
    try:
        atoms = sc.atomize(deltas, info=sc.AtomsInfo(architecture=architecture,
                                                     dictionary_method=f"lora:{name}"))
    except ValueError as error:
        raise ValueError(f"{_FROM_LORA}: LoRA {name!r}: {error}") from None
    return atoms, dropped


class _ReadTracking(dict):
    """A LoRA state dict that records which tensors the stock loader read (the rest was dropped)."""

    def __init__(self, state):
        super().__init__(state)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def _module_of(tensor_name: str) -> str:
    """``"m.lora_up.weight"``, ``"m.alpha"``, ``"m.hada_w1_a"`` -> ``"m"``."""
    return tensor_name.removesuffix(".weight").rpartition(".")[0] or tensor_name


def _layer_delta(patch, shape, weight_key, key, name):
    """The update of the layer ``key`` (weight ``shape``): a ``LowRankDelta`` for a plain LoRA, else
    the full delta W from the stock adapter; None when it does not fit the shape or is zero."""
    from comfy.weight_adapter import LoRAAdapter

    where = f"{_FROM_LORA}: LoRA {name!r}, module {key!r}"
    if isinstance(patch, LoRAAdapter) and all(w is None for w in patch.weights[3:]):  # no mid/DoRA/reshape
        up, down, alpha = patch.weights[:3]
        rank = down.shape[0]
        if rank == 0 or up.numel() == 0:
            raise ValueError(f"{where}: has rank 0 (empty lora_up/lora_down); nothing to atomize")
        if up.shape[0] != shape[0] or up.numel() != shape[0] * rank or down[0].numel() != math.prod(shape[1:]):
            return None
        scale = (alpha / rank) if alpha is not None else 1.0
        if scale == 0:
            raise ValueError(f"{where}: alpha is 0, so its update is zero; nothing to atomize")
        up = up.float().reshape(shape[0], rank) * scale
        down = down.float().reshape(rank, -1)
        if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
            raise ValueError(f"{where}: contains NaN or inf values (alpha {alpha})")
        return sc.LowRankDelta(up, down, shape)
    zero = torch.zeros(shape, dtype=torch.float32)
    delta = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], zero, weight_key)
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(f"{where}: contains NaN or inf values")
    return delta if bool(delta.any()) else None


NODES = [SaveSparseAtoms, LoadSparseAtoms, SparseAtomsToLoRA, LoRAToSparseAtoms]
