"""The importance table and heat-map: one importance kind for the whole model, both values per atom."""

import json

import pytest
import torch

import sparse_core as sc
from sparse_core._heatmap import PALETTE, colours, describe_effects

EFFECTS_INFO = {"method": "jacobian probes + exact ablation of top 4", "calibration": "2 latents x 2 noise levels",
                "metric": "rms change of the model prediction", "exact": 4, "seconds": 0.25}


def atoms_with(effects: dict[str, list[float]] | None = None, info: dict | None = None) -> sc.SparseAtoms:
    """Two layers of 5 atoms whose weight norms rise with the position (0.1 ... 0.5 and 1 ... 5);
    ``effects`` sets ``layer.effect`` for the layers it names."""
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    atoms = sc.build_atoms({"blocks.0.attn.to_k": weight, "blocks.1.attn.to_v": weight}, 5, "svd")
    for scale, layer in zip((0.1, 1.0), atoms.layers.values()):
        layer.coefficients.copy_(scale * torch.arange(1.0, 6.0))
    for key, values in (effects or {}).items():
        atoms[key].effect = torch.tensor(values, dtype=torch.float32)
    atoms.info.effects = dict(info or {})
    return atoms


def widget_order(table):
    """The widget's ranking (atom_mask_state.js): importance, then row, then column."""
    cells = [(-value, r, c) for r, row in enumerate(table["layers"]) for c, value in enumerate(row["importance"])]
    return [(table["layers"][r]["key"], table["layers"][r]["atoms"][c]) for _, r, c in sorted(cells)]


def ranking_order(atoms):
    ranking = atoms.ranking()
    return [(ranking.keys[int(layer)], int(atom)) for layer, atom in zip(ranking.layer, ranking.atom_id)]


# Effects falling with the position: the opposite of the weight norm's order.
FALLING = {"blocks.0.attn.to_k": [50.0, 40.0, 30.0, 20.0, 10.0], "blocks.1.attn.to_v": [5.0, 4.0, 3.0, 2.0, 1.0]}


@pytest.mark.parametrize("case, effects, kind, ranked_by", [
    ("no effects", None, "weight norm", "ranked by weight norm (no measured effects in these atoms)"),
    ("one layer", {"blocks.0.attn.to_k": FALLING["blocks.0.attn.to_k"]}, "weight norm",
     "ranked by weight norm (effects measured in only 1 of 2 layers)"),
    ("every layer", FALLING, "effect", "ranked by measured effect"),
])
def test_table_uses_one_importance_for_the_whole_model(case, effects, kind, ranked_by):
    atoms = atoms_with(effects, EFFECTS_INFO)
    table = sc.importance_table(atoms)
    assert table["importance_kind"] == kind == atoms.importance_kind
    assert table["ranked_by"] == ranked_by
    for row in table["layers"]:
        layer = atoms[row["key"]]
        position = [int((layer.index == i).nonzero()) for i in row["atoms"]]
        norms = layer.weight_norm().double()[position].tolist()
        measured = None if layer.effect is None else layer.effect.double()[position].tolist()
        assert row["weight_norm"] == pytest.approx(norms)
        assert row["effect"] == (measured if measured is not None else [None] * len(position))
        # "one layer": that layer's effects are shown but do not rank (weight norms do).
        assert row["importance"] == pytest.approx(measured if kind == "effect" else norms)
        assert row["importance"] == sorted(row["importance"], reverse=True)
    assert widget_order(table) == ranking_order(atoms)
    json.dumps(table, allow_nan=False)  # what the node sends the page


def test_effects_rank_the_columns_and_colour_the_image():
    atoms = atoms_with(FALLING, EFFECTS_INFO)
    table = sc.importance_table(atoms)
    assert table["layers"][0]["atoms"] == [0, 1, 2, 3, 4]  # by effect; the weight norm says 4 ... 0
    assert table["max"] == 50.0 and table["min"] == 1.0 and table["total"] == pytest.approx(165.0)
    assert table["effects"] == ("jacobian probes + exact ablation of top 4 on 2 latents x 2 noise levels "
                                "(rms change of the model prediction) in 0.25 s")
    image = sc.importance_heatmap(table)
    cell_h = image.shape[0] // 2
    cell_w = image.shape[1] // 5
    top_left = image[0, 0].tolist()
    assert top_left == list(PALETTE[-1]), "the largest effect gets the brightest colour"
    expected = colours(torch.tensor(FALLING["blocks.1.attn.to_v"]), 1.0, 50.0).round().int()
    drawn = image[cell_h, ::cell_w][:5].int()
    assert torch.equal(drawn, expected)


def test_weight_norm_tables_say_nothing_about_effects():
    table = sc.importance_table(atoms_with(None, EFFECTS_INFO))
    assert table["effects"] == ""


@pytest.mark.parametrize("effects, text", [
    ({}, "how these effects were measured is not recorded"),
    ({"method": "exact ablation"}, "exact ablation"),
    ({"calibration": "4 latents", "seconds": float("nan")}, "measured on 4 latents"),
    (EFFECTS_INFO, "jacobian probes + exact ablation of top 4 on 2 latents x 2 noise levels "
                   "(rms change of the model prediction) in 0.25 s"),
])
def test_describe_effects(effects, text):
    assert describe_effects(effects) == text


def load_masks_module():
    """nodes/masks.py by its path (the ``nodes`` package itself needs ComfyUI)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "nodes" / "masks.py"
    spec = importlib.util.spec_from_file_location("sparse_atoms_masks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("effects, words", [
    (FALLING, "ranked by measured effect (jacobian probes"),
    (None, "ranked by weight norm (no measured effects in these atoms)"),
])
def test_editor_text_and_picture_name_the_importance(effects, words):
    masks = load_masks_module()
    table = sc.importance_table(atoms_with(effects, EFFECTS_INFO), kept={"blocks.0.attn.to_k": {0, 1}, "blocks.1.attn.to_v": set()})
    assert masks.editor_summary(table).startswith(f"2 of 10 atoms kept; {words}")
    picture = masks.heatmap_picture(table)
    cells = sc.importance_heatmap(table)
    assert picture.dtype == torch.uint8 and picture.shape[0] == cells.shape[0] + 16
    assert torch.equal(picture[16:, : cells.shape[1]], cells)
    caption = picture[:16].int()
    assert (caption.sum(-1) > 400).sum() > 50, "the caption is missing"
    other = masks.heatmap_picture({**table, "ranked_by": "ranked by something else"})
    assert not torch.equal(other[:16], picture[:16]), "the caption does not follow the table"


@pytest.mark.parametrize("text, message", [
    ('{"version": 1, "off": ', "mask is not valid JSON: Expecting value at line 1 column 23 (character 22"),
    ('{"version": 1, "off": {}}', "mask has no 'fingerprint' string"),
    ('{"version": 1, "fingerprint": "abc", "off": {}}', "this mask was made for other atoms"),
])
def test_mask_errors_say_what_is_wrong(text, message):
    masks = load_masks_module()
    with pytest.raises(masks.MaskError, match=message.replace("(", r"\(").replace(")", r"\)")):
        masks.parse_mask(text, atoms_with())


def test_a_huge_method_string_is_cut_for_the_ui():
    text = describe_effects({"method": "x" * (8 << 20), "calibration": "y" * 1000})
    assert len(text) < 600
    assert f"({8 << 20} characters)" in text and "(1000 characters)" in text
