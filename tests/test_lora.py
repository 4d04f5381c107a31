"""LoRA interop: exact export, atomize round trips, best rank-k pruning, bad LoRAs."""

import numpy as np
import pytest
import torch

import sparse_core as sc

SHAPES = [(24, 16), (12, 8, 3, 3), (10, 6, 1, 1)]


def trained(shape, n_atoms=6):
    generator = torch.Generator().manual_seed(1)
    atoms = sc.build_atoms({"diffusion_model.x.proj": torch.randn(shape, generator=generator)},
                           n_atoms, "svd")
    layer = atoms["diffusion_model.x.proj"]
    layer.coefficients.copy_(torch.randn(n_atoms, generator=generator))
    layer.coefficients[1] = 0.0  # an inactive atom is not exported
    return atoms


def lora_delta(state, key, shape):
    up, down = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"]
    scale = float(state[f"{key}.alpha"]) / down.shape[0]
    return (up.flatten(1) @ down.flatten(1) * scale).reshape(shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_export_reproduces_delta_in_both_formats(shape):
    atoms = trained(shape)
    key = "diffusion_model.x.proj"
    delta = atoms.delta(key)
    lora = sc.to_lora(atoms, format="lora")
    assert lora[f"{key}.lora_down.weight"].shape[0] == 5  # rank = active atoms
    assert torch.allclose(lora_delta(lora, key, shape), delta, atol=1e-6)
    diff = sc.to_lora(atoms, format="diff")
    assert torch.allclose(diff[f"{key}.diff"], delta, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("format", ["lora", "diff"])
def test_atomize_then_export_round_trips(shape, format):
    atoms = trained(shape)
    key = "diffusion_model.x.proj"
    imported = sc.atomize_lora(sc.to_lora(atoms, format=format))
    assert imported[key].weight_shape == tuple(shape)
    assert imported[key].n_atoms == 5
    assert torch.allclose(imported.delta(key), atoms.delta(key), atol=1e-5)
    again = sc.to_lora(imported, format=format)
    assert torch.allclose(sc.atomize_lora(again).delta(key), atoms.delta(key), atol=1e-5)


def test_top_k_of_an_atomized_lora_is_the_best_rank_k_approximation():
    generator = torch.Generator().manual_seed(2)
    up, down = torch.randn(32, 8, generator=generator), torch.randn(8, 20, generator=generator)
    state = {"m.lora_up.weight": up, "m.lora_down.weight": down, "m.alpha": torch.tensor(4.0)}
    delta = up @ down * 0.5
    atoms = sc.atomize_lora(state)
    singular = torch.linalg.svdvals(delta.double())
    for k in (1, 3, 8):
        error = (atoms.top_k(k).delta("m").double() - delta.double()).norm()
        assert float(error) == pytest.approx(float(singular[k:].norm()), rel=1e-4, abs=1e-5)
    assert torch.allclose(atoms["m"].importance(), singular[:8].float(), rtol=1e-4)


UP, DOWN = "m.lora_up.weight", "m.lora_down.weight"


@pytest.mark.parametrize("state, error, match", [
    ({UP: torch.zeros(4, 2)}, ValueError, "no matching 'm.lora_down.weight'"),
    ({UP: torch.zeros(4, 2), DOWN: torch.zeros(3, 5)}, ValueError, "rank"),
    ({"m.hada_w1_a": torch.zeros(4, 2)}, ValueError, "not in the lora_up/lora_down/alpha or diff layout"),
    ({}, ValueError, "no layer to atomize"),
    ({UP: torch.full((4, 2), float("nan")), DOWN: torch.ones(2, 3)}, ValueError,
     "'m.lora_up.weight' contains NaN or inf"),
    ({"m.diff": torch.tensor([[1.0, float("inf")]])}, ValueError, "'m.diff' contains NaN or inf"),
    ({UP: torch.ones(4, 2), DOWN: torch.ones(2, 3), "m.alpha": torch.tensor(float("nan"))}, ValueError,
     "'m.alpha' contains NaN or inf"),
    ({UP: torch.zeros(4, 0), DOWN: torch.zeros(0, 3)}, ValueError, "LoRA 'm' has rank 0"),
    ({UP: torch.ones(4), DOWN: torch.ones(3)}, ValueError, r"'m.lora_up.weight' must be a matrix .* shape \(4,\)"),
    ({UP: torch.ones(4, 2, 3, 3), DOWN: torch.ones(2, 3, 1, 1)}, ValueError, "does not match the rank 2"),
    ({"m.diff": torch.ones(4)}, ValueError, r"'m.diff' must be weight-shaped \(ndim >= 2\)"),
    ({UP: np.ones((4, 2), np.float32), DOWN: np.ones((2, 3), np.float32)}, TypeError,
     "'m.lora_up.weight' must be a torch.Tensor, got numpy.ndarray .*torch.from_numpy"),
    ({UP: torch.ones(4, 2), DOWN: torch.ones(2, 3), "m.alpha": torch.tensor([1.0, 2.0])}, ValueError,
     r"'m.alpha' must hold one number, got shape \(2,\)"),
    ({UP: torch.ones(4, 2), DOWN: torch.ones(2, 3), "m.alpha": 4.0}, TypeError, "'m.alpha' must be a torch.Tensor"),
    # finite factors whose product overflows float32: refused here, not at the first save
    ({UP: torch.full((4, 2), 1e20), DOWN: torch.full((2, 3), 1e20)}, ValueError,
     r"delta for 'm' is too large for float32 atoms \(its largest singular value is 6\.93e\+40\)"),
    ({UP: torch.ones(4, 2), DOWN: torch.ones(2, 3), "m.alpha": torch.tensor(0.0)}, ValueError,
     r"every update is zero \(1 layers; an alpha of 0\?\)"),
    ({UP: torch.zeros(4, 2), DOWN: torch.ones(2, 3)}, ValueError, "every update is zero"),
])
def test_bad_loras_are_clear_errors(state, error, match):
    with pytest.raises(error, match=match):
        sc.atomize_lora(state)


def test_bad_deltas_given_to_atomize_directly_are_clear_errors():
    nan_delta = sc.LowRankDelta(torch.full((4, 2), float("nan")), torch.ones(2, 3), (4, 3))
    with pytest.raises(ValueError, match="delta for 'm' contains NaN or inf"):
        sc.atomize({"m": nan_delta})
    with pytest.raises(ValueError, match="delta for 'm' has rank 0"):
        sc.atomize({"m": sc.LowRankDelta(torch.zeros(4, 0), torch.zeros(0, 3), (4, 3))})


def test_unknown_export_format_is_an_error():
    with pytest.raises(ValueError, match="format must be one of"):
        sc.to_lora(trained((4, 4), 2), format="loha")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, "float16"])
def test_export_refuses_dtypes_that_are_not_floating_point(dtype):
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        sc.to_lora(trained((4, 4), 2), dtype=dtype)


def test_export_refuses_nan_and_values_the_dtype_cannot_hold():
    atoms = trained((24, 16))
    atoms["diffusion_model.x.proj"].coefficients[0] = float("nan")
    with pytest.raises(ValueError, match="layer 'diffusion_model.x.proj': coefficients contains NaN"):
        sc.to_lora(atoms)
    atoms["diffusion_model.x.proj"].coefficients[0] = 1e6  # down = diag(s) C: beyond float16's 65504
    with pytest.raises(ValueError, match="'diffusion_model.x.proj.lora_down.weight' does not fit torch.float16"):
        sc.to_lora(atoms, dtype=torch.float16)
    with pytest.raises(TypeError, match="atoms must be SparseAtoms"):
        sc.to_lora({"diffusion_model.x.proj": atoms["diffusion_model.x.proj"]})


def test_a_lora_with_one_zero_layer_keeps_the_others():
    state = {UP: torch.ones(4, 2), DOWN: torch.ones(2, 3), "n.lora_up.weight": torch.ones(4, 2),
             "n.lora_down.weight": torch.ones(2, 3), "n.alpha": torch.tensor(0.0)}
    atoms = sc.atomize_lora(state)
    assert atoms["m"].n_atoms == 1 and atoms["n"].n_atoms == 0
    assert bool(torch.isfinite(atoms["m"].coefficients).all())
