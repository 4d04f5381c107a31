"""Dictionary learning: recovery of a hidden dictionary, determinism, bad input."""

import pytest
import torch

import sparse_core as sc


def test_recovers_a_hidden_overcomplete_dictionary():
    """128 atoms in dimension 64, 6 per signal, 1 % noise -> >= 90 % of the atoms recovered to
    |cosine| > 0.99 (a second; bench/bench_core.py times the full-size task, 640 atoms in
    dimension 320 from 16000 signals)."""
    data = sc.sparse_coded_signals(4000, 128, 64, 6, noise=0.01, seed=0)
    result = sc.learn_dictionary(data.signals, 128, n_nonzero_coefs=6, n_iter=30, seed=0)
    assert sc.atom_recovery(data.atoms, result.atoms) >= 0.90
    assert float(result.errors[-1]) < 0.01


def relative_error(X, result):
    residual = X - result.codes @ result.atoms
    return float(residual.pow(2).sum() / X.pow(2).sum())


def test_codes_match_the_atoms_after_a_used_near_duplicate_is_replaced():
    """Atoms 0 and 1 start as near-duplicates and both code signals; after the one iteration the
    duplicate is replaced. The returned codes must be those of the returned atoms, and the
    reported error theirs (it was 0.029 reported against 0.139 recomputed)."""
    data = sc.sparse_coded_signals(300, 12, 10, 2, noise=0.01, seed=0)
    init = data.atoms.clone()
    init[1] = init[0] + 1e-3 * torch.randn(10, generator=torch.Generator().manual_seed(0))
    result = sc.learn_dictionary(data.signals, 12, n_nonzero_coefs=2, n_iter=1, init=init)
    assert result.n_replaced >= 1
    assert float(result.errors[-1]) == pytest.approx(relative_error(data.signals, result), rel=1e-4)
    assert int((result.codes != 0).sum(1).max()) <= 2


def test_huge_signals_learn_the_same_atoms_with_scaled_codes():
    """float32 signals of size 2^100 overflow ||X||^2; the result is that of X, codes scaled."""
    data = sc.sparse_coded_signals(300, 24, 16, 2, noise=0.01, seed=2)
    reference = sc.learn_dictionary(data.signals, 24, n_nonzero_coefs=2, n_iter=3, seed=7)
    result = sc.learn_dictionary(data.signals * 2.0**100, 24, n_nonzero_coefs=2, n_iter=3, seed=7)
    assert torch.equal(result.atoms, reference.atoms)
    assert torch.equal(result.codes, reference.codes * 2.0**100)
    assert torch.equal(result.errors, reference.errors)


def test_small_problem_errors_fall_atoms_are_unit_and_codes_sparse():
    data = sc.sparse_coded_signals(600, 40, 20, 3, noise=0.01, seed=1)
    result = sc.learn_dictionary(data.signals, 40, n_nonzero_coefs=3, n_iter=15, seed=1)
    assert result.atoms.shape == (40, 20) and result.codes.shape == (600, 40)
    assert torch.allclose(result.atoms.norm(dim=1), torch.ones(40), atol=1e-5)
    assert int((result.codes != 0).sum(1).max()) <= 3
    assert float(result.errors[-1]) < 0.5 * float(result.errors[0])
    residual = data.signals - result.codes @ result.atoms
    assert float(residual.pow(2).sum() / data.signals.pow(2).sum()) == pytest.approx(
        float(result.errors[-1]), rel=1e-3)


def test_seeded_runs_are_identical_and_seeds_differ():
    data = sc.sparse_coded_signals(300, 24, 16, 2, seed=2)
    a = sc.learn_dictionary(data.signals, 24, n_nonzero_coefs=2, n_iter=3, seed=7)
    b = sc.learn_dictionary(data.signals, 24, n_nonzero_coefs=2, n_iter=3, seed=7)
    c = sc.learn_dictionary(data.signals, 24, n_nonzero_coefs=2, n_iter=3, seed=8)
    assert torch.equal(a.atoms, b.atoms) and torch.equal(a.errors, b.errors)
    assert not torch.equal(a.atoms, c.atoms)


def test_lasso_codes_and_tolerance_stop():
    data = sc.sparse_coded_signals(300, 24, 16, 2, noise=0.01, seed=3)
    result = sc.learn_dictionary(data.signals, 24, alpha=0.05, n_iter=50, tol=1e-3, seed=0)
    assert result.n_iter < 50
    assert float(result.errors[-1]) < float(result.errors[0])


def test_more_atoms_than_signals_and_zero_signals_still_work():
    X = torch.zeros(5, 8)
    X[:3] = torch.randn(3, 8)
    result = sc.learn_dictionary(X, 12, n_nonzero_coefs=2, n_iter=2)
    assert torch.isfinite(result.atoms).all()
    assert torch.allclose(result.atoms.norm(dim=1), torch.ones(12), atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n_components=0), ValueError, "n_components must be positive"),
    (dict(n_components=8, n_nonzero_coefs=2, alpha=0.1), ValueError, "not both"),
    (dict(n_components=8, n_nonzero_coefs=9), ValueError, "n_nonzero_coefs must be at most 4"),
    (dict(n_components=8, alpha=-1.0), ValueError, "alpha must be a finite number >= 0"),
    (dict(n_components=8, n_iter=0), ValueError, "n_iter must be positive"),
    (dict(n_components=8, init=torch.randn(7, 4)), ValueError, "init must have n_components=8 rows"),
    (dict(n_components=8, init=torch.full((8, 4), float("nan"))), ValueError, "init contains NaN"),
    (dict(X=torch.zeros(0, 4), n_components=8), ValueError, r"X has no signals \(rows\)"),
    (dict(X=torch.zeros(5, 0), n_components=8), ValueError, r"X has no features \(columns\)"),
])
def test_bad_input_is_a_clear_error(kwargs, error, match):
    X = kwargs.pop("X", torch.randn(20, 4))
    with pytest.raises(error, match=match):
        sc.learn_dictionary(X, **kwargs)


def test_nan_signals_are_refused():
    X = torch.randn(20, 4)
    X[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"X contains NaN or inf .* \(3, 2\)"):
        sc.learn_dictionary(X, 8)
