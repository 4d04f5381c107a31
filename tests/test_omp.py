"""Orthogonal matching pursuit: exactness, sparsity, parity with scikit-learn, bad input."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

import sparse_core as sc

CASES = [  # n_samples, n_components, n_features, n_nonzero_coefs, dtype
    (300, 128, 64, 5, torch.float64),
    (300, 128, 64, 5, torch.float32),
    (200, 256, 96, 12, torch.float64),
    (64, 40, 40, 1, torch.float32),
]


@pytest.mark.parametrize("n, m, d, k, dtype", CASES)
def test_noiseless_support_is_recovered_exactly(n, m, d, k, dtype, device):
    data = sc.sparse_coded_signals(n, m, d, k, noise=0.0, seed=1, dtype=dtype)
    X, D = data.signals.to(device), data.atoms.to(device)
    codes = sc.omp(X, D, k)
    assert codes.shape == (n, m) and codes.dtype == dtype and codes.device == X.device
    assert torch.equal(codes.cpu() != 0, data.codes != 0)
    tolerance = 1e-9 if dtype == torch.float64 else 2e-4
    assert (codes.cpu() - data.codes).abs().max() < tolerance


@pytest.mark.parametrize("n, m, d, k, dtype", CASES)
def test_at_most_k_nonzeros_and_residual_no_worse_than_sklearn(n, m, d, k, dtype, device):
    data = sc.sparse_coded_signals(n, m, d, k, noise=0.2, seed=2, dtype=torch.float64)
    X, D = data.signals, data.atoms
    codes = sc.omp(X.to(device, dtype), D.to(device, dtype), k).cpu().double()
    assert int((codes != 0).sum(1).max()) <= k
    reference = orthogonal_mp_gram((D @ D.T).numpy(), (X @ D.T).numpy().T, n_nonzero_coefs=k).T
    ours = (X - codes @ D).norm(dim=1)
    theirs = torch.from_numpy(np.linalg.norm(X.numpy() - reference @ D.numpy(), axis=1))
    slack = 1e-4 if dtype == torch.float64 else 2e-3
    assert bool((ours <= theirs * (1 + slack) + 1e-12).all()), float((ours / theirs).max())


def test_omp_gram_matches_omp_and_chunking_does_not_matter():
    data = sc.sparse_coded_signals(257, 96, 48, 6, noise=0.1, seed=3, dtype=torch.float64)
    X, D = data.signals, data.atoms
    whole = sc.omp(X, D, 6)
    chunked = sc.omp(X, D, 6, chunk_size=16)
    gram = sc.omp_gram(D @ D.T, X @ D.T, 6)
    assert torch.allclose(whole, chunked, atol=1e-12)
    assert torch.allclose(whole, gram, atol=1e-12)


def test_tol_stops_once_the_residual_is_small_enough():
    data = sc.sparse_coded_signals(100, 64, 32, 3, noise=0.0, seed=4, dtype=torch.float64)
    codes = sc.omp(data.signals, data.atoms, 10, tol=1e-10)
    assert int((codes != 0).sum(1).max()) == 3


def test_half_precision_inputs_are_computed_in_float32_and_returned_in_their_dtype():
    data = sc.sparse_coded_signals(50, 64, 32, 3, noise=0.0, seed=5)
    codes = sc.omp(data.signals.bfloat16(), data.atoms.bfloat16(), 3)
    assert codes.dtype == torch.bfloat16
    assert torch.equal(codes != 0, data.codes != 0)


def test_linearly_dependent_atoms_stop_early_with_a_runtime_warning():
    D = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    X = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    codes = sc.omp(X, D, 2)  # residual is zero after one atom: a benign stop, no warning
    assert int((codes != 0).sum()) == 1
    # Nearly parallel atoms: the second explains a residual that is not negligible, but only
    # through a pivot below rounding level.
    X = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    D = torch.tensor([[1.0, 0.0], [1.0, 1e-9]], dtype=torch.float64)
    D = D / D.norm(dim=1, keepdim=True)
    with pytest.warns(RuntimeWarning, match="linearly dependent"):
        sc.omp(X, D, 2)


@pytest.mark.parametrize("call, error, match", [
    (lambda X, D: sc.omp(X.numpy(), D, 2), TypeError, "X must be a torch.Tensor"),
    (lambda X, D: sc.omp(X[0], D, 2), ValueError, "X must be 2-D"),
    (lambda X, D: sc.omp(X.long(), D, 2), TypeError, "X must be a floating-point"),
    (lambda X, D: sc.omp(X, D[:, :-1], 2), ValueError, "dictionary must have 16 columns"),
    (lambda X, D: sc.omp(X, D, 0), ValueError, "n_nonzero_coefs must be positive"),
    (lambda X, D: sc.omp(X, D, 17), ValueError, r"n_nonzero_coefs must be at most 16"),
    (lambda X, D: sc.omp(X, D, 2.5), TypeError, "n_nonzero_coefs must be an int"),
    (lambda X, D: sc.omp(X, D.to("meta"), 2), ValueError, "one device"),
    (lambda X, D: sc.omp(X, D.index_put((torch.tensor(3), torch.tensor(1)), torch.tensor(float("nan"))), 2),
     ValueError, r"dictionary contains NaN or inf .* first at index \(3, 1\)"),
    (lambda X, D: sc.omp(X, D, 2, tol=-1.0), ValueError, "tol must be a finite number >= 0"),
    (lambda X, D: sc.omp_gram(D @ D.T + torch.triu(torch.ones(32, 32), 1), X @ D.T, 2),
     ValueError, "gram must be symmetric"),
    (lambda X, D: sc.omp_gram(D @ D.T, X @ D.T, 2, tol=0.1), ValueError, "tol needs norms_squared"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    data = sc.sparse_coded_signals(8, 32, 16, 2, seed=6)
    with pytest.raises(error, match=match):
        call(data.signals, data.atoms)
