"""A training run's whole state, to continue it exactly where it stopped, and its file.

:class:`TrainingState` holds what :func:`sparse_core.train_atoms` needs to go on as if it had
never stopped: the whole dictionary (atoms that are switched off included: the budget may switch
them on again), the updates done, the optimizer's moments, the Taylor budget's scores, the guard's
reference (the start's losses, so a resumed run is judged against the same start), the history
(losses, rates) and the front end's own state in ``extra`` (its random generator's, so batches,
noise and noise levels continue the same stream).

The file is a safetensors file (extension ``.safetensors``) whose tensors are the atoms, as a
complete Sparse Atoms file in bytes (``atoms``, read with the same checks as any atoms file), the
optimizer's tensors (``optimizer.<parameter>.<name>``), the Taylor scores (``taylor.<layer>``) and
``extra.<name>``; its metadata ``sparse_atoms.training_state`` (JSON) holds the rest. It is written
atomically and never replaces a file unless asked.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ._atomic_write import exists_error, write_atomic
from ._atoms import SparseAtoms
from ._files import FORMAT_NAME, AtomsFileError, atoms_from_bytes, atoms_to_bytes

__all__ = ["TrainingState", "save_training_state", "load_training_state", "STATE_FORMAT"]

STATE_FORMAT = "sparse_atoms.training_state"
STATE_VERSION = 1
HISTORY = ("losses", "learning_rates", "gradient_norms", "growth")


@dataclass
class TrainingState:
    """The state of a run after ``step`` updates (see the module's docstring).

    ``config`` is the run's :class:`TrainConfig` as a dict (a resumed run must agree with it on
    every field but ``steps``); ``optimizer`` a ``torch.optim`` ``state_dict()``; ``taylor``
    ``{layer key: (m,)}`` or ``None``; ``reference`` the guard's ``{part: [losses]}`` and
    ``loss_reference`` its starting training losses; ``history`` the run's ``losses``,
    ``learning_rates``, ``gradient_norms``, ``growth`` (lists) and ``parts`` (``{part: list}``).
    """

    atoms: SparseAtoms
    step: int
    config: dict
    optimizer: dict
    taylor: dict[str, torch.Tensor] | None = None
    reference: dict[str, list[float]] = field(default_factory=dict)
    loss_reference: list[float] = field(default_factory=list)
    history: dict = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def state_to_bytes(state: TrainingState) -> bytes:
    atoms_bytes = atoms_to_bytes(state.atoms)
    tensors = {"atoms": torch.frombuffer(bytearray(atoms_bytes), dtype=torch.uint8)}
    optimizer_state = state.optimizer.get("state", {})
    for index, values in optimizer_state.items():
        for name, value in values.items():
            tensors[f"optimizer.{int(index)}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    keys = list(state.atoms.layers)
    if state.taylor is not None:
        for position, key in enumerate(keys):
            tensors[f"taylor.{position}"] = state.taylor[key].detach().cpu().contiguous()
    for name, value in state.extra.items():
        tensors[f"extra.{name}"] = value.detach().cpu().contiguous()
    meta = {"version": STATE_VERSION, "step": state.step, "config": state.config,
            "param_groups": state.optimizer.get("param_groups", []),
            "taylor": state.taylor is not None, "reference": state.reference,
            "loss_reference": state.loss_reference, "history": state.history,
            "extra": sorted(state.extra)}
    return save_safetensors(tensors, metadata={STATE_FORMAT: json.dumps(meta, allow_nan=True)})


def save_training_state(state: TrainingState, path: str | os.PathLike, *,
                        overwrite: bool = False) -> None:
    """Write ``state`` to ``path`` atomically; an existing file is kept (``FileExistsError``
    names it) unless ``overwrite``."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)
    write_atomic(path, state_to_bytes(state), overwrite=overwrite)


def load_training_state(path: str | os.PathLike) -> TrainingState:
    """The :class:`TrainingState` in ``path``; :class:`AtomsFileError` names the file and what is
    wrong with it (not a training state, an atoms file given instead, damaged parts)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise AtomsFileError(f"{path}: cannot read the training state ({error.strerror or error})") from None
    return state_from_bytes(data, source=path)


def state_from_bytes(data: bytes, *, source: str = "<bytes>") -> TrainingState:
    def bad(why: str) -> AtomsFileError:
        return AtomsFileError(f"{source}: not a usable training state: {why}")

    try:
        tensors = load_safetensors(bytes(data))
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(bytes(data[8:8 + header_length])).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError, RuntimeError) as error:
        raise bad(f"it is not a readable safetensors file ({str(error)[:120]})") from None
    if STATE_FORMAT not in metadata:
        hint = (" (this is a Sparse Atoms file: it holds the atoms but not the optimizer and "
                "random state a resume needs)") if metadata.get("format") == FORMAT_NAME else ""
        raise bad(f"its metadata has no {STATE_FORMAT!r} entry{hint}")
    try:
        meta = json.loads(metadata[STATE_FORMAT])
    except ValueError:
        raise bad(f"its {STATE_FORMAT!r} metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("version") != STATE_VERSION:
        raise bad(f"version {meta.get('version') if isinstance(meta, dict) else meta!r}, this "
                  f"version reads {STATE_VERSION}")
    if "atoms" not in tensors or tensors["atoms"].dtype != torch.uint8:
        raise bad("it has no 'atoms' tensor")
    atoms = atoms_from_bytes(tensors["atoms"].numpy().tobytes(), source=f"{source} (its atoms)")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"step {step!r} is not a count of updates")
    optimizer: dict = {"state": {}, "param_groups": meta.get("param_groups", [])}
    keys = list(atoms.layers)
    taylor = {} if meta.get("taylor") else None
    extra = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "optimizer":
            index, _, field_name = rest.partition(".")
            if not index.isdigit() or not field_name:
                raise bad(f"unexpected tensor {name!r}")
            optimizer["state"].setdefault(int(index), {})[field_name] = tensor
        elif kind == "taylor" and taylor is not None and rest.isdigit() and int(rest) < len(keys):
            taylor[keys[int(rest)]] = tensor
        elif kind == "extra" and rest:
            extra[rest] = tensor
        elif name != "atoms":
            raise bad(f"unexpected tensor {name!r}")
    if taylor is not None and (len(taylor) != len(keys) or any(
            taylor[key].shape != (atoms[key].n_atoms,) for key in keys)):
        raise bad("its Taylor scores do not match its atoms")
    history = meta.get("history") if isinstance(meta.get("history"), dict) else {}
    for name in HISTORY:
        values = history.get(name, [])
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise bad(f"its history {name!r} is not a list of numbers")
    if len(history.get("losses", [])) != step or not all(map(math.isfinite, history.get("losses", []))):
        raise bad(f"its loss history does not have {step} finite losses")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise bad("it has no training configuration")
    return TrainingState(atoms=atoms, step=step, config=config, optimizer=optimizer, taylor=taylor,
                         reference=meta.get("reference") or {},
                         loss_reference=meta.get("loss_reference") or [], history=history,
                         extra=extra)


# -- taking a state out of a run and putting it back -------------------------------------------

RESUMABLE_DIFFERENCES = {"steps"}  # the settings a resumed run may change


def capture_state(atoms, steps_done, config, optimizer, taylor, guard, result) -> TrainingState:
    """The run after ``steps_done`` updates, as copies on the CPU."""
    def cpu(value):
        return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value

    saved = optimizer.state_dict()
    saved = {"state": {index: {name: cpu(value) for name, value in values.items()}
                       for index, values in saved["state"].items()},
             "param_groups": [dict(group) for group in saved["param_groups"]]}
    return TrainingState(
        atoms=atoms.clone().to("cpu"), step=steps_done, config=dict(vars(config)), optimizer=saved,
        taylor=None if taylor is None else {key: cpu(value) for key, value in taylor.items()},
        reference={name: list(values) for name, values in guard.reference.items()},
        loss_reference=list(guard.loss_reference),
        history={"losses": list(result.losses), "learning_rates": list(result.learning_rates),
                 "gradient_norms": list(result.gradient_norms), "growth": list(result.growth),
                 "parts": {name: list(values) for name, values in result.parts.items()}})


def resume_run(state, atoms, config, params, optimizer, taylor, guard, result) -> int:
    """Put ``state`` into the run (optimizer moments, Taylor scores, the guard's reference, the
    history); returns the updates already done. Refuses a state that does not fit by name."""
    if not isinstance(state, TrainingState):
        raise TypeError(f"resume must be a TrainingState, got {type(state).__name__}")
    if not 1 <= state.step < config.steps:
        raise ValueError(f"resume: the state has done {state.step} updates; steps must be more "
                         f"than that to continue it (got {config.steps})")
    ours = vars(config)
    for name in sorted((set(state.config) | set(ours)) - RESUMABLE_DIFFERENCES):
        if state.config.get(name) != ours.get(name):
            raise ValueError(f"resume: the state was trained with {name}={state.config.get(name)!r}, "
                             f"this run has {name}={ours.get(name)!r}; every setting but steps "
                             "must match to continue the run")
    shapes = {key: (layer.atoms.shape, layer.readouts.shape) for key, layer in atoms.layers.items()}
    theirs = {key: (layer.atoms.shape, layer.readouts.shape) for key, layer in state.atoms.layers.items()}
    if shapes != theirs:
        raise ValueError("resume: the atoms given are not the state's atoms (other layers or "
                         "shapes); train the atoms the state holds")
    moments = state.optimizer.get("state", {})
    ordered = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's order
    for index, values in moments.items():
        if not 0 <= index < len(ordered) or any(
                value.shape != ordered[index].shape for name, value in values.items() if name != "step"):
            raise ValueError(f"resume: the state's optimizer entry {index} does not fit the "
                             "parameters being trained")
    # copies: the run updates its moments in place, and the state may be resumed again (or hold
    # inference tensors, when it was read inside ComfyUI's inference mode)
    copied = {"state": {index: {name: value.clone() if isinstance(value, torch.Tensor) else value
                                for name, value in values.items()}
                        for index, values in moments.items()},
              "param_groups": state.optimizer.get("param_groups", [])}
    try:
        optimizer.load_state_dict(copied)
    except (ValueError, KeyError) as error:
        raise ValueError(f"resume: the state's optimizer does not fit this run ({error})") from None
    if taylor is not None:
        for key, scores in taylor.items():
            scores.copy_(state.taylor[key])
    losses = state.history.get("losses", [])
    if not state.loss_reference or len(losses) != state.step:
        raise ValueError("resume: the state has no guard reference or loss history to continue")
    guard.resume(state.reference, state.loss_reference, state.step, losses[-1])
    result.losses = list(losses)
    for name in ("learning_rates", "gradient_norms", "growth"):
        setattr(result, name, list(state.history.get(name, [])))
    result.parts = {name: list(values) for name, values in state.history.get("parts", {}).items()}
    return state.step
