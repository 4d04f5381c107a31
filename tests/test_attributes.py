"""Attribute words of the digits model: exact transforms, prompts with positions and combinations,
and the evaluator's style classifier."""

import pytest
import torch

from digits import attributes
from digits.data import embolden, images_of, stroke_mass
from digits.evaluator import DigitEvaluator
from digits.prompts import ATTRIBUTES, DIGITS, STYLE_WORD, tokenize


def ink(images):
    return ((images + 1) / 2).clamp(0, 1)


@pytest.fixture(scope="module")
def sevens():
    return images_of(7, 20)


@pytest.mark.parametrize("word", list(attributes.TRANSFORMS))
def test_each_transform_keeps_shape_and_range(sevens, word):
    out = attributes.TRANSFORMS[word](sevens)
    assert out.shape == sevens.shape
    assert out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, sevens)


def test_faint_halves_the_ink(sevens):
    torch.testing.assert_close(stroke_mass(attributes.faint(sevens)), 0.5 * stroke_mass(sevens))


def test_small_shrinks_towards_the_centre(sevens):
    out = attributes.small(sevens)
    assert bool((stroke_mass(out) < 0.7 * stroke_mass(sevens)).all())
    border = torch.ones(8, 8, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert float(ink(out)[:, 0, border].sum()) < 0.2 * float(ink(sevens)[:, 0, border].sum())


def test_slant_leans_the_top_right(sevens):
    lean = attributes.lean
    assert float((lean(attributes.slant(sevens)) - lean(sevens)).mean()) > 1.0  # columns
    assert float((lean(attributes.slant(sevens.flip(-1))) - lean(sevens.flip(-1))).mean()) > 1.0


def test_apply_ignores_word_order_and_names_unknown_words(sevens):
    assert torch.equal(attributes.apply(sevens, ["slant", "small"]), attributes.apply(sevens, ["small", "slant"]))
    assert torch.equal(attributes.apply(sevens, [STYLE_WORD]), embolden(sevens))
    with pytest.raises(ValueError, match="'tall' is not one of"):
        attributes.apply(sevens, ["tall"])


def test_random_prompts_put_the_digit_last_and_vary_positions():
    labels = torch.arange(10).repeat(200)
    prompts, chosen = attributes.random_prompts(labels, torch.Generator().manual_seed(0))
    again, _ = attributes.random_prompts(labels, torch.Generator().manual_seed(0))
    assert prompts == again
    positions = {word: set() for word in ATTRIBUTES}
    for prompt, words, label in zip(prompts, chosen, labels.tolist()):
        parts = prompt.split()
        assert parts[-1] == str(label) and tuple(parts[:-1]) == words
        assert len(words) <= 2 and len(set(words)) == len(words) and STYLE_WORD not in words
        tokenize(prompt)
        for i, word in enumerate(words):
            positions[word].add(i)
    assert all(seen == {0, 1} for seen in positions.values())  # every attribute in both positions
    share = sum(1 for words in chosen if words) / len(chosen)
    assert 0.55 < share < 0.75  # 1 - 0.7 ** 3 = 0.657


def test_apply_each_matches_apply_per_image(sevens):
    sets = [(), ("slant",), ("faint", "small"), ("small", "faint")] * 5
    out = attributes.apply_each(sevens, sets)
    for i, words in enumerate(sets):
        torch.testing.assert_close(out[i:i + 1], attributes.apply(sevens[i:i + 1], words) if words else sevens[i:i + 1])


def test_vocabulary_knows_every_attribute_word():
    assert set(ATTRIBUTES) | {STYLE_WORD} == set(attributes.TRANSFORMS)
    assert not set(ATTRIBUTES) & set(DIGITS)


def test_style_classifier_tells_bold_from_plain_on_held_out_real_digits():
    evaluator = DigitEvaluator.fit()
    assert evaluator.style_held_out_accuracy >= 0.97
    threes = images_of(3, 40, seed=5)
    assert float(evaluator.is_bold(embolden(threes)).float().mean()) >= 0.9
    assert float(evaluator.is_bold(threes).float().mean()) <= 0.1
