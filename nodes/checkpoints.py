"""Saving a training run as it goes, and taking it up again (Train Sparse Concept's save_every,
save_name and resume_from).

Every ``save_every`` steps (and after the last), two files are written atomically under a run
number that no earlier file uses (``<save_name>_<run>_step<step>``, never replacing a file):

- ``models/sparse_atoms/<...>.safetensors``: the atoms that carry the concept at that step (the
  active ones, as the node would output them), for Load Sparse Atoms: try a step's atoms while
  training goes on, or keep the best step;
- ``models/sparse_atoms_states/<...>.safetensors``: the whole :class:`sparse_core.TrainingState`
  (every atom, optimizer, Taylor scores, the random generator, the guard's reference), which
  ``resume_from`` continues exactly: the same run, step for step, as if it had never stopped.
"""

from __future__ import annotations

import logging
import os
import re

import torch

import folder_paths

import sparse_core as sc

from .common import FOLDER, STATES_FOLDER, highest_number, listed_file, safe_target, send_text

log = logging.getLogger("sparse_atoms")

NODE = "Train Sparse Concept"
NO_RESUME = "none"
# the node's names for TrainSettings fields, for resume's messages
WIDGET_NAMES = {"lr": "learning_rate", "batch": "batch_size", "budget": "atom_budget",
                "train_atoms": "tune_atoms", "dtype": "training_dtype"}


def state_files() -> list[str]:
    return [NO_RESUME, *folder_paths.get_filename_list(STATES_FOLDER)]


def data_fingerprint(latents: list[torch.Tensor], n_concept: int) -> torch.Tensor:
    """``(images, concept images, sum, sum of squares)`` of the training latents, float64: a
    resumed run must train on the data its state was trained on."""
    data = torch.cat([t.detach().reshape(-1).double().cpu() for t in latents])  # any sizes
    return torch.tensor([sum(len(t) for t in latents), n_concept, float(data.sum()),
                         float(data.pow(2).sum())], dtype=torch.float64)


def load_state(name: str) -> sc.TrainingState:
    return sc.load_training_state(listed_file(STATES_FOLDER, name, NODE))


def check_resume(state: sc.TrainingState, fingerprint: torch.Tensor,
                 name: str = "the training state") -> None:
    """The state's data must be this run's (its generator state only continues the same draws)."""
    theirs = state.extra.get("data")
    if "generator" not in state.extra or theirs is None or theirs.shape != fingerprint.shape:
        raise ValueError(f"{NODE}: {name} was not saved by Train Sparse Concept (no random "
                         "generator or data record); it cannot be resumed here")
    if int(theirs[0]) != int(fingerprint[0]) or int(theirs[1]) != int(fingerprint[1]):
        raise ValueError(f"{NODE}: {name} was trained on {int(theirs[1])} concept images and "
                         f"{int(theirs[0]) - int(theirs[1])} prior images, this run has "
                         f"{int(fingerprint[1])} and {int(fingerprint[0] - fingerprint[1])}: "
                         "resume with the same images")
    if not torch.allclose(theirs[2:], fingerprint[2:], rtol=1e-6, atol=1e-6):
        raise ValueError(f"{NODE}: {name} was trained on other images (their values differ "
                         "from this run's latents): resume with the same images")


def widget_message(error: ValueError) -> str:
    """A resume refusal in the node's own widget names (``lr`` -> ``learning_rate``...)."""
    message = str(error)
    for field, widget in WIDGET_NAMES.items():
        message = re.sub(rf"\b{field}=", f"{widget}=", message)
    return f"{NODE}: {message}"


class PeriodicSaver:
    """``on_state`` for :func:`sparse_core.train_atoms`: writes a step's atoms and training
    state (see the module's docstring) and tells the user where."""

    def __init__(self, save_name: str, node_id):
        self.atoms_stem = safe_target(folder_paths.get_folder_paths(FOLDER)[0], save_name, NODE)
        self.states_stem = safe_target(folder_paths.get_folder_paths(STATES_FOLDER)[0], save_name, NODE)
        self.atoms_stem, self.states_stem = self.atoms_stem[:-12], self.states_stem[:-12]
        self.run = 1 + max(highest_number(stem, r"_step\d{5,}")
                           for stem in (self.atoms_stem, self.states_stem))
        self.node_id, self.saved = node_id, []

    def paths(self, step: int) -> tuple[str, str]:
        tail = f"_{self.run:05d}_step{step:05d}.safetensors"
        return self.atoms_stem + tail, self.states_stem + tail

    def __call__(self, state: sc.TrainingState) -> None:
        atoms_path, state_path = self.paths(state.step)
        active = state.atoms.without_effects().top_k(state.atoms.n_active)
        active.info.training = {**active.info.training, "steps_done": state.step}
        try:
            for path, write in ((atoms_path, lambda p: sc.save_atoms(active, p)),
                                (state_path, lambda p: sc.save_training_state(state, p))):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write(path)
        except FileExistsError as error:  # appeared since the run number was chosen: kept as is
            log.warning("%s: step %d not saved, %s exists", NODE, state.step, error.filename)
            return
        self.saved.append(state_path)
        log.info("%s: step %d saved to %s and %s", NODE, state.step, atoms_path, state_path)
        send_text(f"step {state.step}: saved {os.path.basename(atoms_path)}", self.node_id)
