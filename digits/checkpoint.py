"""The shipped digits model file: ``digits_dit.safetensors`` next to this module.

Tensors ``diffusion_model.*`` (the :class:`DigitsDiT`) and ``prompt_encoder.*`` (its token
embeddings); metadata ``config`` (model settings), ``vocab``, ``held_out`` and ``training``
(the settings, seed and evaluator accuracy of the run that made it), all JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save
from safetensors import safe_open

import sparse_core as sc

from .model import DEFAULT_CONFIG, DigitsDiT, PromptEncoder
from .prompts import LENGTH, VOCAB

MODEL_PATH = Path(__file__).resolve().parent / "digits_dit.safetensors"


def save_checkpoint(dit: DigitsDiT, encoder: PromptEncoder, path, *, config: dict,
                    training: dict, held_out: int) -> None:
    tensors = {f"diffusion_model.{k}": v.detach().cpu().contiguous() for k, v in dit.state_dict().items()}
    tensors.update({f"prompt_encoder.{k}": v.detach().cpu().contiguous()
                    for k, v in encoder.state_dict().items()})
    metadata = {"config": json.dumps(config), "vocab": json.dumps(VOCAB), "held_out": str(held_out),
                "training": json.dumps(training)}
    sc.write_atomic(path, save(tensors, metadata=metadata), overwrite=True)


def read_metadata(path=MODEL_PATH) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    return {key: json.loads(value) for key, value in raw.items()}


def split_state(path=MODEL_PATH) -> tuple[dict, dict]:
    """The file's tensors as (diffusion model state dict, prompt encoder state dict)."""
    state = load_file(str(path))
    dit = {k[len("diffusion_model."):]: v for k, v in state.items() if k.startswith("diffusion_model.")}
    encoder = {k[len("prompt_encoder."):]: v for k, v in state.items() if k.startswith("prompt_encoder.")}
    return dit, encoder


def load_prompt_encoder(path=MODEL_PATH) -> PromptEncoder:
    metadata = read_metadata(path)
    config = metadata["config"]
    encoder = PromptEncoder(len(metadata["vocab"]), LENGTH, config["context_dim"])
    encoder.load_state_dict(split_state(path)[1])
    return encoder.eval().requires_grad_(False)


def load_model(path=MODEL_PATH, device="cpu") -> tuple[DigitsDiT, PromptEncoder, dict]:
    """The model in plain torch (for the demo and benchmarks), frozen, in eval mode."""
    metadata = read_metadata(path)
    dit = DigitsDiT(**{**DEFAULT_CONFIG, **metadata["config"]})
    dit.load_state_dict(split_state(path)[0])
    encoder = load_prompt_encoder(path)
    return (dit.to(device).eval().requires_grad_(False), encoder.to(device), metadata)
