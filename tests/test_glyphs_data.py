"""The glyph data set: the shipped eval pack, the split rule and the renderer's rules (the
renderer itself runs only where the Debian fonts are installed)."""

import os
import pathlib

import numpy as np
import pytest
import torch

from glyphs import render

PACK = pathlib.Path(render.__file__).parent / "data" / "eval_pack.npz"
LICENSES = PACK.parent / "LICENSES.md"


def test_the_eval_pack_holds_every_character_of_the_held_out_families():
    pack = np.load(PACK)
    images = pack["images"]
    assert images.dtype == np.uint8 and images.shape[1:] == (len(render.CHARS), 32, 32)
    assert "".join(pack["chars"]) == render.CHARS and set(pack["held_out_chars"]) <= set(render.CHARS)
    assert len(pack["families"]) == len(pack["styles"]) == len(images) >= 10
    assert PACK.stat().st_size <= 5 * 2**20
    ink = images.reshape(len(images), len(render.CHARS), -1).max(-1)
    assert (ink >= 64).all()  # every glyph draws something
    fonts = {(f, s) for f, s in zip(pack["families"].tolist(), pack["styles"].tolist())}
    assert len(fonts) == len(images)  # one font per family and style
    listed = LICENSES.read_text()
    assert all(f"| {family} | {style} |" in listed for family, style in fonts)
    # no two fonts draw the same alphabet (one file under two names would)
    flat = images.reshape(len(images), -1).astype(np.float32)
    apart = np.abs(flat[:, None] - flat[None]).mean(-1)
    np.fill_diagonal(apart, np.inf)
    assert apart.min() > 0.5


def test_the_split_holds_out_whole_typeface_groups_and_a_tenth_of_each_class():
    fonts = ([{"family": f"Alpha {k}", "class": "serif"} for k in range(6)] +
             [{"family": f"Beta{k}", "class": "serif"} for k in range(14)] +
             [{"family": f"Gamma {k}", "class": "sans"} for k in range(9)] +
             [{"family": "Delta Sans", "class": "sans"}] +
             [{"family": "Lonely Mono", "class": "mono"}])
    held = render.split(fonts)
    for kind in ("serif", "sans"):
        families = {f["family"] for f in fonts if f["class"] == kind}
        assert len(held & families) >= 0.1 * len(families)
    groups = {render.typeface_group(f["family"], f["class"]) for f in fonts}
    for group in groups:  # a group is held out whole or not at all
        members = {f["family"] for f in fonts if render.typeface_group(f["family"], f["class"]) == group}
        assert members <= held or not members & held
    assert "Lonely Mono" not in held  # a class of one group keeps it
    assert render.split(fonts) == held  # fixed by the seed


def test_symbol_fonts_are_told_by_their_glyph_names():
    names = [render.DIGIT_NAMES[int(c)] if c.isdigit() else c for c in render.CHARS]
    assert not render._symbol_names(names)
    assert not render._symbol_names([f"glyph{k:05d}" for k in range(len(render.CHARS))])
    assert render._symbol_names(["Alpha"] * len(render.CHARS))  # Symbol: A is Alpha
    assert render._symbol_names([f"a{k}" for k in range(len(render.CHARS))])  # Dingbats


def test_serif_from_shape_reads_the_capital_is_foot():
    images = np.zeros((len(render.CHARS), 32, 32), dtype=np.uint8)
    i = render.CHARS.index("I")
    images[i, 6:26, 15:17] = 255
    assert render.serif_from_shape(images) == "sans"
    images[i, 24:26, 11:21] = 255
    assert render.serif_from_shape(images) == "serif"


DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@pytest.mark.skipif(not os.path.exists(DEJAVU), reason="fonts-dejavu-core is not installed")
def test_one_rule_puts_every_glyph_on_the_baseline():
    pytest.importorskip("fontTools")
    images = render.render(DEJAVU)
    meta = render.metadata(DEJAVU)
    assert images.shape == (len(render.CHARS), 32, 32)
    assert meta["family"] == "DejaVu Sans" and meta["class"] == "sans" and not meta["italic"]
    bottom = lambda c: int(np.flatnonzero((images[render.CHARS.index(c)] > 96).any(1)).max())
    assert bottom("x") == bottom("H") == bottom("0") <= render.BASELINE  # the baseline
    assert bottom("g") > render.BASELINE  # descenders go below it


def test_glyph_prompts_name_the_character_then_its_typeface():
    from glyphs import prompts

    tokens = prompts.tokenize("g serif bold italic")
    assert tokens.shape == (prompts.LENGTH,)
    assert [prompts.VOCAB[t] for t in tokens[:5]] == ["<bos>", "g", "serif", "bold", "italic"]
    assert prompts.tokenize("G")[1] != prompts.tokenize("g")[1]  # case matters
    assert prompts.typeface_words("sans", 700, True) == ["sans", "bold", "italic"]
    assert prompts.typeface_words("mono", 300, False) == ["mono", "light"]
    with pytest.raises(ValueError, match="'gothic' is not in the glyph vocabulary"):
        prompts.tokenize("g gothic")
    with pytest.raises(ValueError, match="at most 5 words"):
        prompts.tokenize("g serif bold italic light sks")


def test_the_character_reader_reads_real_unseen_fonts():
    """Its floor: fit on four fifths of the held-out fonts, it reads the other fifth."""
    pytest.importorskip("sklearn")
    from glyphs.evaluator import CharacterReader

    reader = CharacterReader.fit()
    assert reader.held_out_accuracy >= 0.95
    pack = np.load(PACK)
    real = torch.from_numpy(pack["images"][:3].astype(np.float32) / 127.5 - 1).reshape(-1, 1, 32, 32)
    asked = list(render.CHARS) * 3
    assert reader.legibility(real, asked) >= 0.95
    assert reader.legibility(torch.zeros(10, 1, 32, 32) - 1, ["A"] * 10) <= 0.1  # blank is no A
