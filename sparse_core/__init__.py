"""Sparse coding and the atom adapter, host-independent (torch only; never imports ComfyUI).

Conventions follow scikit-learn: signals are rows ``X (n_samples, n_features)``, atoms are rows
``D (n_components, n_features)``, codes ``A (n_samples, n_components)`` with ``X ≈ A @ D``.
Every function takes and returns torch tensors on any device.
"""

from ._omp import omp, omp_gram
from ._lasso import lasso, lasso_gram, lasso_objective
from ._dictionary import DictionaryLearningResult, learn_dictionary
from ._synthetic import SyntheticSignals, atom_recovery, sparse_coded_signals
from ._atoms import AtomLayer, AtomRanking, AtomsInfo, SparseAtoms
from ._builders import DICTIONARY_METHODS, build_atoms, build_layer
from ._schedules import LR_SCHEDULES, budget_schedule, learning_rate_at
from ._state import TrainingState, load_training_state, save_training_state
from ._training import TrainConfig, TrainingResult, sparse_step_, train_atoms, trainable_parameters
from ._atomic_write import check_folder_path, clean_temp_files, write_atomic
from ._files import (AtomsFileError, FORMAT_NAME, FORMAT_VERSION, atoms_from_bytes, atoms_to_bytes,
                     load_atoms, save_atoms, tensor_name)
from ._heatmap import importance_heatmap, importance_table
from ._modules import apply_atoms, linear_weights, patched_weights
from ._lora import LORA_FORMATS, LowRankDelta, atomize, atomize_lora, lora_deltas, to_lora
from ._effects import EFFECT_METHODS, NonFiniteOutput, ablation_effects, measure_effects

__all__ = [
    "omp", "omp_gram", "lasso", "lasso_gram", "lasso_objective",
    "DictionaryLearningResult", "learn_dictionary",
    "SyntheticSignals", "atom_recovery", "sparse_coded_signals",
    "AtomLayer", "AtomRanking", "AtomsInfo", "SparseAtoms",
    "DICTIONARY_METHODS", "build_atoms", "build_layer",
    "LR_SCHEDULES", "budget_schedule", "learning_rate_at",
    "TrainConfig", "TrainingResult", "sparse_step_", "train_atoms", "trainable_parameters",
    "TrainingState", "load_training_state", "save_training_state",
    "AtomsFileError", "FORMAT_NAME", "FORMAT_VERSION", "atoms_from_bytes", "atoms_to_bytes",
    "check_folder_path", "clean_temp_files", "load_atoms", "save_atoms", "tensor_name", "write_atomic",
    "importance_heatmap", "importance_table",
    "apply_atoms", "linear_weights", "patched_weights",
    "LORA_FORMATS", "LowRankDelta", "atomize", "atomize_lora", "lora_deltas", "to_lora",
    "EFFECT_METHODS", "NonFiniteOutput", "ablation_effects", "measure_effects",
]
