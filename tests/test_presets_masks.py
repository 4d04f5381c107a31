"""The node package's pure-Python parts, without ComfyUI: layer presets and the editor's mask."""

import json
import re

import pytest
import torch

import sparse_core as sc
from repo_support import load_repo_module
from digits.model import DigitsDiT
from digits.presets import PRESETS as DIGITS_PRESETS

presets = load_repo_module("nodes/presets.py", "sparse_atoms_presets")
masks = load_repo_module("nodes/masks.py", "sparse_atoms_masks")

NAMED = [name for name in presets.PRESET_NAMES if name != "custom regex"]

# Layer keys as ComfyUI names them, a few per family (one block each), with what each preset selects.
UNET = "diffusion_model.input_blocks.1.1.transformer_blocks.0."
MMDIT = "diffusion_model.joint_blocks.0."
FLUX = "diffusion_model."
LAYERS = {
    "unet": ([UNET + n for n in ("attn1.to_q", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                                 "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")]
             + ["diffusion_model.input_blocks.1.1.proj_in", "diffusion_model.time_embed.0"]),
    "mmdit": [MMDIT + n for n in ("context_block.attn.qkv", "context_block.attn.proj",
                                  "x_block.attn.qkv", "x_block.attn.proj", "x_block.attn2.qkv",
                                  "x_block.mlp.fc1", "context_block.mlp.fc2", "x_block.adaLN_modulation.1")],
    "flux": [FLUX + n for n in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj",
                                "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
                                "double_blocks.0.img_mlp.0", "double_blocks.0.txt_mlp.2",
                                "single_blocks.0.linear1", "single_blocks.0.linear2",
                                "double_blocks.0.img_mod.lin")],
}
SELECTED = {  # family -> preset -> how many of LAYERS[family] it selects
    "unet": {"cross-attention k/v": 2, "cross-attention": 4, "self+cross attention": 6,
             "attention + MLP": 8},
    "mmdit": {"cross-attention k/v": 1, "cross-attention": 2, "self+cross attention": 5,
              "attention + MLP": 7},
    "flux": {"cross-attention k/v": 1, "cross-attention": 2, "self+cross attention": 5,
             "attention + MLP": 8},
}


def selected(family, preset, names):
    return presets.select_layers(names, presets.preset_regex(family, preset), family=family,
                                 preset=preset)


def test_every_family_has_every_preset_and_its_regexes_compile():
    for family, table in presets.PRESETS.items():
        assert set(table) == set(NAMED), family
        for regex in table.values():
            re.compile(regex)


@pytest.mark.parametrize("family", sorted(SELECTED))
def test_presets_select_what_they_say_and_grow_in_order(family):
    names = LAYERS[family]
    chosen = {preset: selected(family, preset, names) for preset in NAMED}
    assert {p: len(c) for p, c in chosen.items()} == SELECTED[family]
    for smaller, larger in zip(NAMED, NAMED[1:]):  # each preset contains the one before
        assert set(chosen[smaller]) <= set(chosen[larger]), (family, smaller, larger)
    never = ("proj_in", "time_embed.0", "adaLN_modulation.1", "img_mod.lin")  # not attention/MLP
    assert not [n for c in chosen.values() for n in c if n.endswith(never)]


def test_digits_presets_have_one_source_and_select_the_digits_model_layers():
    assert presets.PRESETS["digits"] is DIGITS_PRESETS
    assert presets.family_of("DigitsDiT") == "digits"
    dit = DigitsDiT()
    names = [f"diffusion_model.{n}" for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)]
    counts = {preset: len(selected("digits", preset, names)) for preset in NAMED}
    # 4 blocks: k and v; q, k, v, out of cross-attention; of both attentions; plus the MLP's two
    assert counts == {"cross-attention k/v": 8, "cross-attention": 16, "self+cross attention": 32,
                      "attention + MLP": 40}
    weights = sc.linear_weights(dit, DIGITS_PRESETS["cross-attention k/v"], prefix="diffusion_model.")
    assert sorted(weights) == sorted(selected("digits", "cross-attention k/v", names))


def test_family_detection_and_custom_regex():
    assert presets.family_of("UNetModel") == "unet" and presets.family_of("Flux") == "flux"
    assert presets.family_of("SomethingNew") == "dit"
    assert presets.preset_regex("unet", "custom regex", r"attn2\.to_k$") == r"attn2\.to_k$"
    assert selected("dit", "cross-attention k/v", ["m.blocks.0.cross_attn.k", "m.blocks.0.attn.q"]) \
        == ["m.blocks.0.cross_attn.k"]


@pytest.mark.parametrize("call, match", [
    (lambda: presets.preset_regex("unet", "custom regex", "  "), "needs a layer regex"),
    (lambda: presets.preset_regex("unet", "everything", ""), "preset must be one of"),
    (lambda: presets.select_layers(["a.b"], "attn(", family="unet", preset="custom regex"),
     "not a valid regular expression"),
    (lambda: presets.select_layers(LAYERS["unet"], r"nothing$", family="unet", preset="custom regex"),
     r"selects no layer of this model \(detected family 'unet', 10 adaptable layers, e\.g\. "),
])
def test_preset_errors_say_what_and_where(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- the mask -------------------------------------------------------------------------------

def two_layer_atoms():
    torch.manual_seed(0)
    atoms = sc.build_atoms({"a": torch.randn(8, 6), "b": torch.randn(6, 5)}, 4, "svd")
    for layer in atoms.layers.values():
        layer.coefficients.copy_(torch.arange(1.0, layer.n_atoms + 1))  # importance grows with id
    return atoms


def mask_for(atoms, off, fingerprint=None):
    return json.dumps({"version": 1, "fingerprint": fingerprint or atoms.fingerprint(),
                       "off": {key: sorted(ids) for key, ids in off.items()}})


def test_empty_mask_keeps_every_atom_and_density_keeps_the_most_important():
    atoms = two_layer_atoms()
    assert masks.parse_mask("", atoms) == {} and masks.parse_mask("  ", atoms) == {}
    keep = masks.keep_masks(atoms, {}, 1.0)
    assert all(bool(k.all()) for k in keep.values())
    half = masks.keep_masks(atoms, {}, 0.5)  # 4 of 8 atoms: the two largest of each layer
    assert [k.tolist() for k in half.values()] == [[False, False, True, True]] * 2


def test_mask_round_trip_switches_off_exactly_the_listed_atoms():
    atoms = two_layer_atoms()
    off = masks.parse_mask(mask_for(atoms, {"a": {0, 3}, "b": set()}), atoms)
    assert off == {"a": {0, 3}, "b": set()}
    keep = masks.keep_masks(atoms, off, 1.0)
    assert keep["a"].tolist() == [False, True, True, False] and bool(keep["b"].all())
    kept = atoms.select(keep)
    assert kept["a"].index.tolist() == [1, 2] and kept.n_atoms == 6


@pytest.mark.parametrize("text, match", [
    ('{"version": 1, "fingerprint": ', "not valid JSON"),
    ("[1, 2]", "version-1 object"),
    (None, "mask must be a string"),
])
def test_malformed_masks_are_refused_without_blaming_other_atoms(text, match):
    atoms = two_layer_atoms()
    with pytest.raises(masks.MaskError, match=match) as error:
        masks.parse_mask(text, atoms)
    assert "other atoms" not in str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("make, match", [
    (lambda a: mask_for(a, {}, fingerprint="0" * 64), "made for other atoms"),
    (lambda a: mask_for(a, {"c": {0}}), "layer 'c', which these atoms do not have"),
    (lambda a: mask_for(a, {"a": {9}}), r"atom L0\[9\] \('a'\), which these atoms do not have"),
    (lambda a: json.dumps({"version": 1, "fingerprint": a.fingerprint(), "off": {"a": ["1"]}}),
     "list of integer atom ids"),
])
def test_masks_that_do_not_fit_the_atoms_name_what_does_not_fit(make, match):
    atoms = two_layer_atoms()
    with pytest.raises(masks.MaskError, match=match):
        masks.parse_mask(make(atoms), atoms)
