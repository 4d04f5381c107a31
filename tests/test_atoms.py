"""The atom adapter: delta W identities, importance, masks, builders, training helpers."""

import math

import numpy as np
import pytest
import torch

import sparse_core as sc

SHAPES = [(24, 16), (16, 24), (12, 8, 3, 3), (10, 6, 1, 1)]
METHODS = ["svd", "sparse", "random"]


def trained(shape, method="svd", n_atoms=6, seed=0):
    """Atoms with random non-zero coefficients (as after training)."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    atoms = sc.build_atoms({"block.0.proj": weight, "block.1.proj": weight * 2}, n_atoms, method,
                           seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for layer in atoms.layers.values():
        layer.coefficients.copy_(torch.randn(layer.n_atoms, generator=generator))
    return atoms


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_untrained_update_is_exactly_zero_and_rows_are_unit(shape, method):
    atoms = sc.build_atoms({"w": torch.randn(shape)}, 6, method, seed=3)
    layer = atoms["w"]
    assert torch.count_nonzero(layer.delta()) == 0
    assert layer.delta().shape == shape
    assert torch.allclose(layer.atoms.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(layer.readouts.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.equal(layer.index, torch.arange(6))


@pytest.mark.parametrize("shape", SHAPES)
def test_delta_is_the_sum_of_atoms_and_importance_is_each_share(shape):
    layer = trained(shape)["block.0.proj"]
    shares = [layer.coefficients[i] * torch.outer(layer.atoms[i], layer.readouts[i])
              for i in range(layer.n_atoms)]
    assert torch.allclose(layer.delta().reshape(shape[0], -1), sum(shares), atol=1e-6)
    norms = torch.stack([share.norm() for share in shares])
    assert torch.allclose(layer.importance(), norms, rtol=1e-5)


def test_svd_atoms_are_the_principal_directions():
    weight = torch.randn(20, 12, dtype=torch.float64)
    layer = sc.build_layer(weight, 5, "svd")
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    # D W C^T is diagonal with the top singular values
    projected = layer.atoms @ weight.float() @ layer.readouts.T
    assert torch.allclose(projected, torch.diag(S[:5]), atol=1e-4)


def test_sparse_dictionary_can_be_overcomplete_and_is_seeded():
    weight = torch.randn(16, 40)
    a = sc.build_layer(weight, 32, "sparse", seed=5)
    b = sc.build_layer(weight, 32, "sparse", seed=5)
    assert a.atoms.shape == (32, 16)
    assert torch.equal(a.atoms, b.atoms) and torch.equal(a.readouts, b.readouts)


def test_random_atoms_are_orthonormal_when_they_fit():
    layer = sc.build_layer(torch.randn(32, 8), 10, "random", seed=1)
    assert torch.allclose(layer.atoms @ layer.atoms.T, torch.eye(10), atol=1e-5)


def test_layer_seed_does_not_depend_on_other_layers():
    weight = torch.randn(16, 16)
    alone = sc.build_atoms({"b": weight}, 4, "random", seed=2)
    together = sc.build_atoms({"a": weight, "b": weight}, 4, "random", seed=2)
    assert torch.equal(alone["b"].atoms, together["b"].atoms)


def test_ranking_labels_and_whole_model_top_k():
    atoms = trained((24, 16))
    ranking = atoms.ranking()
    assert len(ranking.importance) == atoms.n_atoms
    assert bool((ranking.importance[:-1] >= ranking.importance[1:]).all())
    top = atoms.top_k(4)
    assert top.n_atoms == 4
    kept = sorted(float(v) for layer in top.layers.values() for v in layer.importance())
    assert kept == pytest.approx(sorted(ranking.importance[:4].tolist()), rel=1e-6)
    first = ranking.label(0)
    assert first == f"L{int(ranking.layer[0])}[{int(ranking.atom_id[0])}]"


def test_masks_keep_atom_ids_and_layers():
    atoms = trained((24, 16))
    keep = {"block.0.proj": torch.tensor([False, True, False, True, False, False])}
    masked = atoms.select(keep)
    assert masked.keys() == atoms.keys()
    assert masked["block.0.proj"].index.tolist() == [1, 3]
    assert masked["block.1.proj"].n_atoms == 6  # not named: kept whole
    expected = sum(atoms["block.0.proj"].coefficients[i] * torch.outer(
        atoms["block.0.proj"].atoms[i], atoms["block.0.proj"].readouts[i]) for i in (1, 3))
    assert torch.allclose(masked.delta("block.0.proj"), expected, atol=1e-6)
    assert masked.fingerprint() == atoms.fingerprint()


@pytest.mark.parametrize("density, per_layer, expected", [
    (1.0, False, 12), (0.5, False, 6), (0.1, False, 2), (0.0, False, 0), (0.25, True, 4),
])
def test_density_keeps_the_top_ceil_fraction(density, per_layer, expected):
    atoms = trained((24, 16))
    kept = atoms.density(density, per_layer=per_layer)
    assert kept.n_atoms == expected
    if per_layer:
        assert all(layer.n_atoms == math.ceil(density * 6) for layer in kept.layers.values())


def test_full_density_reproduces_delta_and_zero_density_removes_it():
    atoms = trained((12, 8, 3, 3))
    for key in atoms:
        assert torch.equal(atoms.density(1.0).delta(key), atoms.delta(key))
        assert torch.count_nonzero(atoms.density(0.0).delta(key)) == 0


@pytest.mark.parametrize("call, error, match", [
    (lambda a: a.density(1.5), ValueError, r"density must be in \[0, 1\]"),
    (lambda a: a.top_k(-1), ValueError, "k must be >= 0"),
    (lambda a: a.select({"nope": torch.ones(6, dtype=torch.bool)}), KeyError, "'nope'"),
    (lambda a: a.select({"block.0.proj": torch.ones(5, dtype=torch.bool)}), ValueError,
     r"keep must have shape \(6,\)"),
    (lambda a: a["missing"], KeyError, "no layer 'missing'"),
    (lambda a: sc.build_layer(torch.randn(8, 4), 5, "svd"), ValueError, "exceeds min"),
    (lambda a: sc.build_layer(torch.randn(8, 4), 2, "pca"), ValueError, "method must be one of"),
    (lambda a: sc.build_layer(torch.full((8, 4), float("nan")), 2), ValueError, "weight contains NaN"),
    (lambda a: sc.build_layer(torch.randn(8), 2), ValueError, "ndim >= 2"),
    (lambda a: sc.build_atoms({}, 2), ValueError, "weights is empty"),
    (lambda a: sc.AtomLayer(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2),
                            torch.arange(2), (3, 5)), ValueError, r"readouts must have shape \(2, 5\)"),
    (lambda a: sc.build_atoms({"w": torch.zeros(0, 5)}, 2), ValueError,
     r"layer 'w': weight is empty \(shape \(0, 5\)\)"),
    (lambda a: sc.build_atoms({"w": torch.zeros(5, 0)}, 2, fit_to_layer=True), ValueError,
     r"layer 'w': weight is empty"),
    (lambda a: sc.build_atoms([torch.randn(4, 4)], 2), TypeError, "weights must be a mapping .* got list"),
    (lambda a: sc.build_atoms({3: torch.randn(4, 4)}, 2), TypeError, "layer keys must be strings .* int 3"),
    (lambda a: sc.build_atoms({"w": [[1.0, 2.0]]}, 2), TypeError, "layer 'w': weight must be a torch.Tensor"),
    (lambda a: sc.AtomLayer(torch.zeros(1, 3), torch.zeros(1, 5), torch.tensor([float("nan")]),
                            torch.arange(1), (3, 5)), ValueError, "coefficients contains NaN or inf"),
    (lambda a: sc.AtomLayer(torch.full((1, 3), float("inf")), torch.zeros(1, 5), torch.zeros(1),
                            torch.arange(1), (3, 5)), ValueError, "atoms contains NaN or inf"),
    (lambda a: sc.AtomLayer(torch.zeros(1, 3), torch.zeros(1, 5), torch.zeros(1), torch.arange(1),
                            (3, 5), effect=torch.tensor([-1.0])), ValueError, "effect must be finite and >= 0"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(trained((24, 16)))


def test_normalising_moves_norms_into_coefficients_without_changing_delta():
    atoms = trained((24, 16))
    layer = atoms["block.0.proj"]
    with torch.no_grad():
        layer.atoms.mul_(torch.linspace(0.5, 2.0, 6)[:, None])
        layer.readouts.mul_(3.0)
    before = layer.delta().clone()
    sc.sparse_step_(atoms)
    assert torch.allclose(layer.delta(), before, atol=1e-5)
    assert torch.allclose(layer.atoms.norm(dim=1), torch.ones(6), atol=1e-6)
    assert torch.allclose(layer.importance(), layer.coefficients.abs(), rtol=1e-5)


def test_proximal_step_soft_thresholds_and_budget_keeps_the_top():
    atoms = trained((24, 16))
    before = {k: layer.coefficients.clone() for k, layer in atoms.layers.items()}
    sc.sparse_step_(atoms, l1_threshold=0.5)
    for key, layer in atoms.layers.items():
        s = before[key]
        assert torch.allclose(layer.coefficients, s.sign() * (s.abs() - 0.5).clamp_min(0), atol=1e-6)
    sc.sparse_step_(atoms, budget=3)
    assert atoms.n_active <= 3
    sc.sparse_step_(atoms, budget=1, per_layer=True)
    assert all(int((layer.coefficients != 0).sum()) <= 1 for layer in atoms.layers.values())
    sc.sparse_step_(atoms, budget=np.int64(2))  # numpy integers are integers
    assert 0 < atoms.n_active <= 2
    for bad in (0, -1):  # one meaning of budget everywhere: None or at least one atom
        with pytest.raises(ValueError, match=rf"budget must be None \(no budget\) or >= 1 atom, got {bad}"):
            sc.sparse_step_(atoms, budget=bad)
    assert atoms.n_active > 0  # nothing was zeroed by the refused call


def test_budget_schedule_declines_from_all_to_the_budget():
    values = [sc.budget_schedule(step, 100, 10, 200) for step in range(101)]
    assert values[0] == 200 and values[10] == 200 and values[60] == 10 and values[100] == 10
    assert all(a >= b for a, b in zip(values, values[1:]))


def fitting_problem():
    """delta W should equal a target that uses three of the atoms."""
    torch.manual_seed(0)
    atoms = sc.build_atoms({"w": torch.randn(16, 12)}, 12, "svd")
    target = 0.5 * atoms["w"].atoms[:3].T @ atoms["w"].readouts[:3]
    return atoms, lambda step: (atoms.delta("w") - target).pow(2).sum()


def test_training_loop_reduces_the_loss_and_respects_the_budget():
    atoms, loss = fitting_problem()
    result = sc.train_atoms(atoms, loss, steps=150, lr=0.05, l1=1e-3, budget=3, train_atoms=False)
    assert result.stopped is None and result.steps_done == 150
    assert result.losses[-1] < 1e-3 * result.losses[0]
    assert atoms.n_active == 3
    assert sorted(atoms["w"].index[atoms["w"].coefficients != 0].tolist()) == [0, 1, 2]
    assert not atoms["w"].coefficients.requires_grad


def test_non_finite_loss_stops_and_keeps_the_last_good_atoms():
    atoms, loss = fitting_problem()
    snapshots = {}

    def poisoned(step):
        snapshots[step] = atoms["w"].coefficients.detach().clone()
        value = loss(step)
        return value * float("nan") if step == 5 else value

    result = sc.train_atoms(atoms, poisoned, steps=20, lr=0.05)
    # the atoms of step 5 gave the NaN, so the ones before them are kept
    assert result.steps_done == 4 and "step 6" in result.stopped
    assert torch.equal(atoms["w"].coefficients, snapshots[4])
    assert bool(torch.isfinite(atoms["w"].atoms).all())


def test_cancelling_from_the_step_callback_stops_within_one_step():
    atoms, loss = fitting_problem()
    seen = []

    def on_step(step, value):
        seen.append(step)
        if step == 3:
            raise KeyboardInterrupt("cancel")

    with pytest.raises(KeyboardInterrupt):
        sc.train_atoms(atoms, loss, steps=100, lr=0.05, on_step=on_step)
    assert seen == [0, 1, 2, 3]
    assert atoms.n_active > 0 and bool(torch.isfinite(atoms["w"].coefficients).all())


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0, lr=0.1), "steps must be >= 1"), (dict(steps=1, lr=0.0), "lr must be > 0"),
    (dict(steps=1, lr=0.1, l1=-1.0), "l1 must be >= 0"), (dict(steps=1, lr=0.1, budget=0), "budget"),
])
def test_bad_training_settings_are_clear_errors(kwargs, match):
    atoms, loss = fitting_problem()
    with pytest.raises(ValueError, match=match):
        sc.train_atoms(atoms, loss, **kwargs)


def test_plain_module_patching_merges_and_restores_bit_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Conv1d(8, 4, 1))
    weights = sc.linear_weights(net, r"\.0$|\.2$", prefix="diffusion_model.")
    assert list(weights) == ["diffusion_model.0", "diffusion_model.2"]
    atoms = sc.build_atoms({k: w.detach() for k, w in weights.items()}, 3, "svd")
    for layer in atoms.layers.values():
        layer.coefficients.normal_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    patched = sc.patched_weights(net, atoms, 0.5, prefix="diffusion_model.")
    with sc.apply_atoms(net, atoms, 0.5, prefix="diffusion_model."):
        assert torch.allclose(net[0].weight, before["0.weight"] + 0.5 * atoms.delta("diffusion_model.0"))
        assert torch.allclose(net[0].weight, patched["0.weight"])
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(KeyError, match="does not start with 'other.'"):
        sc.patched_weights(net, atoms, prefix="other.")
    with pytest.raises(KeyError, match="has no weight '1.weight'"):
        sc.patched_weights(net, sc.SparseAtoms({"diffusion_model.1": atoms["diffusion_model.0"]}),
                           prefix="diffusion_model.")


def test_fit_to_layer_caps_svd_dictionaries_of_small_layers():
    weights = {"small": torch.randn(4, 30), "large": torch.randn(16, 16)}
    atoms = sc.build_atoms(weights, 8, "svd", fit_to_layer=True)
    assert atoms["small"].n_atoms == 4 and atoms["large"].n_atoms == 8
    with pytest.raises(ValueError, match="layer 'small'.*exceeds min"):
        sc.build_atoms(weights, 8, "svd")


def test_svd_of_a_large_layer_finds_the_top_directions():
    """Large layers take the randomized path; with a decaying spectrum it matches the full SVD."""
    generator = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(600, 600, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(500, 500, generator=generator))
    spectrum = 0.9 ** torch.arange(500, dtype=torch.float32)
    weight = (U[:, :500] * spectrum) @ V.T
    layer = sc.build_layer(weight, 16, "svd")
    overlap = (layer.atoms @ U[:, :16]).abs().diagonal()
    assert bool((overlap > 0.999).all()), overlap.min()
    assert torch.allclose(layer.atoms @ layer.atoms.T, torch.eye(16), atol=1e-4)


def test_numpy_integers_are_accepted_as_counts():
    import numpy as np
    atoms = sc.build_atoms({"w": torch.randn(8, 6)}, np.int64(3), seed=np.int32(1))
    assert atoms["w"].n_atoms == 3
    assert atoms.top_k(np.int64(2)).n_atoms == 2
