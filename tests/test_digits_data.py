"""The digits the project ships (digits/digits_8x8.npz) are scikit-learn's, and what the ComfyUI
nodes use of the digits package runs without scikit-learn installed."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from repo_support import REPO
from digits.data import DATA_PATH, images_of, load_digits


def test_shipped_digits_equal_scikit_learns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bundle = sklearn_datasets.load_digits()
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert np.array_equal(((images[:, 0] + 1.0) * 8.0).round().numpy(), bundle.images)
    assert np.array_equal(labels.numpy(), bundle.target)
    assert DATA_PATH.stat().st_size < 64 * 1024


def test_loading_excludes_classes_and_returns_fresh_tensors():
    images, labels = load_digits(exclude=(3,))
    assert 3 not in labels.tolist() and len(images) == len(labels) == 1797 - 183
    images[:] = 0  # callers own what they get
    assert float(load_digits()[0].abs().sum()) > 0
    assert images_of(3, 5).shape == (5, 1, 8, 8)


def test_what_the_nodes_import_of_digits_runs_without_scikit_learn():
    """nodes/digits_nodes.py and nodes/digits_model.py use these modules; sklearn is blocked."""
    script = (
        "import sys; sys.modules['sklearn'] = None\n"  # any 'import sklearn' now fails
        "import digits.checkpoint, digits.data, digits.model, digits.presets, digits.prompts\n"
        "from digits.data import embolden, images_of\n"
        "from digits.checkpoint import load_model\n"
        "load_model(); assert embolden(images_of(7, 3)).shape == (3, 1, 8, 8)\n"
        "assert not [m for m in sys.modules if m.startswith('sklearn.')]\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
