"""Train Sparse Concept's pipeline, apart from the node's widgets: train, keep the atoms that
carry the concept, record how they were made, rank them by their measured effect on the
training images, patch the model. The node checks its inputs, calls :func:`train_concept` and
unpacks the :class:`ConceptRun`; a cancel anywhere raises :class:`guided.Cancelled` with the
atoms to keep."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

import comfy.model_management

import sparse_core as sc

from . import effects
from .common import loss_curve
from .guided import Cancelled
from .patching import apply_to_model
from .previews import sample_images
from .datasets import Dataset
from .training import RunState, TrainSettings, train

log = logging.getLogger("sparse_atoms")
NODE = "Train Sparse Concept"


@dataclass
class ConceptRun:
    """What a run gives: the input ``model`` patched with the kept ``atoms`` (ranked by
    measured effect, ``info.training`` their provenance), the loop's ``result``, the loss curve
    IMAGE ``(1, H, W, 3)``, the samples IMAGE ``(N, H, W, 3)`` (empty without samples) and the
    line the node shows."""

    model: object
    atoms: sc.SparseAtoms
    result: sc.TrainingResult
    loss_curve: torch.Tensor
    samples: torch.Tensor
    message: str


def train_concept(model, atoms: sc.SparseAtoms, concept: Dataset, settings: TrainSettings, *,
                  run_state: RunState, on_step=None, prior: Dataset | None = None,
                  validation: Dataset | None = None, empty_cond=None,
                  resume_file: str | None = None, node_id=None) -> ConceptRun:
    """Train ``atoms`` on ``concept`` (see :func:`training.train` for the rest), keep the
    ``n_active`` atoms that carry it (any effects the dictionary had are stale: dropped), and
    measure their effects. A guard that reached no working state is a ValueError."""
    started = time.time()
    trained, result = train(model, atoms, concept, settings, prior, on_step, empty_cond, run_state,
                            validation)
    if result.no_working_state:
        raise ValueError(f"{NODE}: {result.stopped}")
    trained = trained.without_effects().top_k(trained.n_active)
    trained.info.prompt = ""
    resume = run_state.resume
    trained.info.training = {
        **vars(settings), "images": len(concept), "prior_images": 0 if prior is None else len(prior),
        "validation_losses": [[step, round(v, 6)] for step, v in run_state.validation_losses],
        "resumed_from": None if resume is None else {"file": resume_file, "step": resume.step},
        "steps_done": result.steps_done, "stopped": result.stopped, "warnings": result.warnings,
        "losses": [round(v, 6) for v in result.losses[:: max(1, len(result.losses) // 2000)]],
        "seconds": round(time.time() - started, 1)}
    message = _summary(result, trained.n_atoms, atoms.n_atoms)
    try:  # rank the kept atoms by their measured effect on the training images
        trained, measured = effects.after_training(model, trained, concept, settings,
                                                   prior is not None, node_id)
    except comfy.model_management.InterruptProcessingException:
        raise Cancelled(trained) from None
    message = f"{message}; {measured}"
    if run_state.validation_losses:
        first, last = run_state.validation_losses[0][1], run_state.validation_losses[-1][1]
        message = f"{message}; validation loss {first:.4f} -> {last:.4f}"
    if run_state.samples:
        message = (f"{message}; samples at steps "
                   f"{', '.join(str(done) for done, _, _ in run_state.samples)}")
    return ConceptRun(apply_to_model(model, trained, 1.0), trained, result,
                      loss_curve(result.losses, validation=run_state.validation_losses),
                      sample_images(model, run_state.samples), message)


def _summary(result: sc.TrainingResult, kept: int, of: int) -> str:
    """The run in one line; an early stop or a warning leads it (and goes to the log)."""
    message = (f"{result.steps_done} steps, final loss {result.final_loss:.4f}; {kept} atoms kept "
               f"of {of}") if result.losses else "no step completed"
    if result.stopped:
        message = f"STOPPED EARLY: {result.stopped}. {message}"
    for warning in result.warnings:
        message = f"WARNING: {warning}. {message}"
    if result.stopped or result.warnings:
        log.warning("%s: %s", NODE, message)
    return message
