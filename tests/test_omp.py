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


def test_no_signals_give_empty_codes():
    data = sc.sparse_coded_signals(8, 32, 16, 2, seed=6)
    codes = sc.omp(data.signals[:0], data.atoms, 2)
    assert codes.shape == (0, 32) and codes.dtype == data.signals.dtype
    gram = data.atoms @ data.atoms.T
    assert sc.omp_gram(gram, torch.zeros(0, 32), 2).shape == (0, 32)


@pytest.mark.parametrize("x_exponent, d_exponent", [(0, 100), (0, -100), (-60, -60), (90, -30)])
def test_huge_and_tiny_magnitudes_give_exactly_scaled_codes(x_exponent, d_exponent):
    """Products of these overflow or underflow float32 (today: NaN or zero codes, silently); the
    codes of X 2^p over D 2^q are those of X over D times 2^(p-q), exactly."""
    data = sc.sparse_coded_signals(60, 48, 24, 4, noise=0.05, seed=7)
    X, D = data.signals, data.atoms
    reference = sc.omp(X, D, 4)
    codes = sc.omp(X * 2.0**x_exponent, D * 2.0**d_exponent, 4)
    assert torch.equal(codes, reference * 2.0 ** (x_exponent - d_exponent))


@pytest.mark.parametrize("exponent", [-100, -120])
def test_tiny_precomputed_products_give_the_same_codes(exponent):
    """(Today these give codes off by 2.7: pivots and corrections sink below float32's range.)"""
    data = sc.sparse_coded_signals(60, 48, 24, 4, noise=0.05, seed=7)
    gram, Xy = data.atoms @ data.atoms.T, data.signals @ data.atoms.T
    norms = (data.signals * data.signals).sum(1)
    reference = sc.omp_gram(gram, Xy, 4, norms_squared=norms, tol=1e-3)
    codes = sc.omp_gram(gram * 2.0**exponent, Xy * 2.0**exponent, 4,
                        norms_squared=norms * 2.0**exponent, tol=1e-3 * 2.0**exponent)
    assert torch.equal(codes, reference)


def test_tol_is_scaled_with_the_signals():
    """float32 signals of size 2^70: their squared norms overflow unless scaled."""
    data = sc.sparse_coded_signals(100, 64, 32, 3, noise=0.01, seed=4)
    reference = sc.omp(data.signals, data.atoms, 10, tol=0.01)
    assert int((reference != 0).sum(1).max()) == 3  # tol stopped it: the noise needs more atoms
    codes = sc.omp(data.signals * 2.0**70, data.atoms, 10, tol=0.01 * 2.0**140)
    assert torch.equal(codes, reference * 2.0**70)


def test_codes_that_do_not_fit_the_dtype_are_refused():
    data = sc.sparse_coded_signals(8, 32, 16, 2, seed=6)
    X = (data.signals * 1e4).half()  # fits float16; the codes over atoms 1e-3 times smaller do not
    with pytest.raises(ValueError, match="codes do not fit torch.float16"):
        sc.omp(X, (data.atoms * 1e-3).half(), 2)


@pytest.mark.parametrize("call, error, match", [
    (lambda X, D: sc.omp(X, D[:0], 1), ValueError, r"dictionary has no atoms \(rows\) \(shape \(0, 16\)\)"),
    (lambda X, D: sc.omp(X[:, :0], D[:, :0], 1), ValueError, r"X has no features \(columns\)"),
    (lambda X, D: sc.omp_gram(torch.zeros(0, 0), torch.zeros(3, 0), 1), ValueError, "gram has no atoms"),
    (lambda X, D: sc.omp(X, D, 2, chunk_size=0), ValueError, "chunk_size must be positive, got 0"),
    (lambda X, D: sc.omp(X, D, 2, chunk_size=-4), ValueError, "chunk_size must be positive, got -4"),
    (lambda X, D: sc.omp(X, D, 2, chunk_size=2.5), TypeError, "chunk_size must be an int"),
    (lambda X, D: sc.omp_gram(D @ D.T, X @ D.T, 2, chunk_size=True), TypeError, "chunk_size must be an int"),
    (lambda X, D: sc.omp_gram(D @ D.T, X @ D.T, 2, norms_squared=torch.full((8,), float("nan")), tol=0.1),
     ValueError, "norms_squared contains NaN"),
])
def test_empty_dimensions_and_bad_chunk_sizes_are_clear_errors(call, error, match):
    data = sc.sparse_coded_signals(8, 32, 16, 2, seed=6)
    with pytest.raises(error, match=match):
        call(data.signals, data.atoms)
