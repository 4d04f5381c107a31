"""Lasso: objective parity with scikit-learn's coordinate descent, optimality, bad input."""

import warnings

import pytest
import torch
from sklearn.decomposition import sparse_encode

import sparse_core as sc

CASES = [  # n_samples, n_components, n_features, n_nonzero_coefs, noise, alpha, dtype
    (200, 128, 64, 6, 0.01, 0.05, torch.float64),
    (200, 128, 64, 6, 0.01, 0.05, torch.float32),
    (150, 256, 96, 10, 0.05, 0.02, torch.float64),
    (150, 64, 96, 4, 0.10, 0.30, torch.float32),
    (100, 64, 32, 8, 0.20, 0.01, torch.float64),  # many non-zeros: exercises the fallback
]


@pytest.mark.parametrize("n, m, d, k, noise, alpha, dtype", CASES)
def test_objective_within_a_tenth_of_a_percent_of_sklearn(n, m, d, k, noise, alpha, dtype, device):
    data = sc.sparse_coded_signals(n, m, d, k, noise=noise, seed=7, dtype=torch.float64)
    X, D = data.signals, data.atoms
    codes = sc.lasso(X.to(device, dtype), D.to(device, dtype), alpha).cpu().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's own convergence warnings
        # sparse_encode divides alpha by n_features, matching its 1 / (2 n_features) loss scale
        reference = torch.from_numpy(sparse_encode(X.numpy(), D.numpy(), algorithm="lasso_cd",
                                                   alpha=alpha))
    ours = sc.lasso_objective(X, D, codes, alpha)
    theirs = sc.lasso_objective(X, D, reference, alpha)
    assert bool((ours <= theirs * 1.001).all()), float((ours / theirs).max())


def test_solution_satisfies_the_optimality_conditions():
    data = sc.sparse_coded_signals(100, 96, 48, 5, noise=0.05, seed=8, dtype=torch.float64)
    X, D, alpha = data.signals, data.atoms, 0.05
    codes = sc.lasso(X, D, alpha, tol=1e-10)
    grad = (codes @ D - X) @ D.T  # gradient of the smooth part
    on = codes != 0
    assert (grad[on] + alpha * codes[on].sign()).abs().max() < 1e-6
    assert grad[~on].abs().max() <= alpha * (1 + 1e-6)


def test_alpha_above_every_correlation_gives_zero_codes():
    data = sc.sparse_coded_signals(20, 32, 16, 3, seed=9)
    alpha = float((data.signals @ data.atoms.T).abs().max()) * 1.01
    assert torch.count_nonzero(sc.lasso(data.signals, data.atoms, alpha)) == 0


@pytest.mark.parametrize("alpha", [1e300, float(torch.finfo(torch.float64).max)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_alpha_beyond_the_dtype_gives_zero_codes_not_an_overflow(alpha, dtype):
    data = sc.sparse_coded_signals(20, 32, 16, 3, seed=9)
    codes = sc.lasso(data.signals.to(dtype), data.atoms.to(dtype), alpha)
    assert codes.dtype == dtype and torch.count_nonzero(codes) == 0
    gram, Xy = data.atoms @ data.atoms.T, data.signals @ data.atoms.T
    codes = sc.lasso_gram(gram.to(dtype), Xy.to(dtype), alpha,
                          norms_squared=data.signals.pow(2).sum(1).to(dtype))
    assert torch.count_nonzero(codes) == 0


def test_warm_start_and_gram_entry_point_agree():
    data = sc.sparse_coded_signals(80, 64, 32, 4, noise=0.05, seed=10, dtype=torch.float64)
    X, D, alpha = data.signals, data.atoms, 0.05
    cold = sc.lasso(X, D, alpha, tol=1e-12)
    warm = sc.lasso(X, D, alpha, tol=1e-12, init=cold + 0.01)
    gram = sc.lasso_gram(D @ D.T, X @ D.T, alpha, norms_squared=(X * X).sum(1), tol=1e-12)
    objective = lambda c: sc.lasso_objective(X, D, c, alpha)
    assert torch.allclose(objective(warm), objective(cold), rtol=1e-9)
    assert torch.allclose(objective(gram), objective(cold), rtol=1e-9)


def test_max_iter_exhausted_warns():
    data = sc.sparse_coded_signals(30, 64, 32, 8, noise=0.2, seed=11, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        sc.lasso(data.signals, data.atoms, 1e-4, tol=1e-14, max_iter=1,
                 init=torch.zeros(30, 64, dtype=torch.float64))


@pytest.mark.parametrize("call, error, match", [
    (lambda X, D: sc.lasso(X, D, -0.1), ValueError, "alpha must be a finite number >= 0"),
    (lambda X, D: sc.lasso(X, D, float("nan")), ValueError, "alpha must be a finite number"),
    (lambda X, D: sc.lasso(X, D, "0.1"), TypeError, "alpha must be a number"),
    (lambda X, D: sc.lasso(X, D.T, 0.1), ValueError, "dictionary must have 16 columns"),
    (lambda X, D: sc.lasso(X, D, 0.1, init=torch.zeros(3, 32)), ValueError, "init must have 8 rows"),
    (lambda X, D: sc.lasso(X.index_fill(0, torch.tensor(2), float("inf")), D, 0.1),
     ValueError, "X contains NaN or inf"),
    (lambda X, D: sc.lasso_gram(D @ D.T, X @ D.T, 0.1, norms_squared=torch.ones(7)),
     ValueError, r"norms_squared must be a tensor of shape \(8,\)"),
    (lambda X, D: sc.lasso(X, D, 0.1, max_iter=0), ValueError, "max_iter must be positive"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    data = sc.sparse_coded_signals(8, 32, 16, 2, seed=12)
    with pytest.raises(error, match=match):
        call(data.signals, data.atoms)


def test_no_signals_give_empty_codes():
    data = sc.sparse_coded_signals(8, 32, 16, 2, seed=12)
    codes = sc.lasso(data.signals[:0], data.atoms, 0.1)
    assert codes.shape == (0, 32) and codes.dtype == data.signals.dtype
    empty = sc.lasso_gram(data.atoms @ data.atoms.T, torch.zeros(0, 32), 0.1, norms_squared=torch.zeros(0))
    assert empty.shape == (0, 32)


@pytest.mark.parametrize("x_exponent, d_exponent", [(100, 0), (0, 100), (-100, 0), (90, -30)])
def test_huge_and_tiny_magnitudes_give_exactly_scaled_codes(x_exponent, d_exponent):
    """The lasso of X 2^p over D 2^q at alpha 2^(p+q) has the codes of X over D at alpha times
    2^(p-q); today these products overflow or underflow float32."""
    data = sc.sparse_coded_signals(60, 48, 24, 4, noise=0.05, seed=13)
    X, D, alpha = data.signals, data.atoms, 0.05
    reference = sc.lasso(X, D, alpha)
    codes = sc.lasso(X * 2.0**x_exponent, D * 2.0**d_exponent, alpha * 2.0 ** (x_exponent + d_exponent))
    assert torch.equal(codes, reference * 2.0 ** (x_exponent - d_exponent))
    warm = sc.lasso(X * 2.0**x_exponent, D * 2.0**d_exponent, alpha * 2.0 ** (x_exponent + d_exponent),
                    init=codes)
    assert torch.allclose(warm, codes, rtol=1e-3, atol=1e-3 * float(codes.abs().max()))


@pytest.mark.parametrize("call, error, match", [
    (lambda X, D: sc.lasso(X, D[:0], 0.1), ValueError, r"dictionary has no atoms \(rows\)"),
    (lambda X, D: sc.lasso(X[:, :0], D[:, :0], 0.1), ValueError, r"X has no features \(columns\)"),
    (lambda X, D: sc.lasso_gram(torch.zeros(0, 0), torch.zeros(3, 0), 0.1, norms_squared=torch.ones(3)),
     ValueError, "gram has no atoms"),
    (lambda X, D: sc.lasso(X, D, 0.1, chunk_size=0), ValueError, "chunk_size must be positive, got 0"),
    (lambda X, D: sc.lasso(X, D, 0.1, chunk_size=-1), ValueError, "chunk_size must be positive, got -1"),
    (lambda X, D: sc.lasso(X, D, 0.1, chunk_size=8.0), TypeError, "chunk_size must be an int"),
])
def test_empty_dimensions_and_bad_chunk_sizes_are_clear_errors(call, error, match):
    data = sc.sparse_coded_signals(8, 32, 16, 2, seed=12)
    with pytest.raises(error, match=match):
        call(data.signals, data.atoms)
