"""LoRA interop: exact export, atomize round trips, best rank-k pruning, bad LoRAs."""

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


@pytest.mark.parametrize("state, match", [
    ({"m.lora_up.weight": torch.zeros(4, 2)}, "no matching 'm.lora_down.weight'"),
    ({"m.lora_up.weight": torch.zeros(4, 2), "m.lora_down.weight": torch.zeros(3, 5)}, "rank"),
    ({"m.hada_w1_a": torch.zeros(4, 2)}, "not in the lora_up/lora_down/alpha or diff layout"),
    ({}, "no layer to atomize"),
])
def test_bad_loras_are_clear_errors(state, match):
    with pytest.raises(ValueError, match=match):
        sc.atomize_lora(state)


def test_unknown_export_format_is_an_error():
    with pytest.raises(ValueError, match="format must be one of"):
        sc.to_lora(trained((4, 4), 2), format="loha")
