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
from ._training import (TrainingResult, budget_schedule, sparse_step_, train_atoms,
                        trainable_parameters)
from ._files import (AtomsFileError, FORMAT_NAME, FORMAT_VERSION, atoms_from_bytes, atoms_to_bytes,
                     load_atoms, save_atoms, tensor_name, write_atomic)
from ._heatmap import importance_heatmap, importance_table
from ._modules import apply_atoms, linear_weights, patched_weights
from ._lora import LORA_FORMATS, LowRankDelta, atomize, atomize_lora, lora_deltas, to_lora

__all__ = [
    "omp", "omp_gram", "lasso", "lasso_gram", "lasso_objective",
    "DictionaryLearningResult", "learn_dictionary",
    "SyntheticSignals", "atom_recovery", "sparse_coded_signals",
    "AtomLayer", "AtomRanking", "AtomsInfo", "SparseAtoms",
    "DICTIONARY_METHODS", "build_atoms", "build_layer",
    "TrainingResult", "budget_schedule", "sparse_step_", "train_atoms", "trainable_parameters",
    "AtomsFileError", "FORMAT_NAME", "FORMAT_VERSION", "atoms_from_bytes", "atoms_to_bytes",
    "load_atoms", "save_atoms", "tensor_name", "write_atomic",
    "importance_heatmap", "importance_table",
    "apply_atoms", "linear_weights", "patched_weights",
    "LORA_FORMATS", "LowRankDelta", "atomize", "atomize_lora", "lora_deltas", "to_lora",
]
