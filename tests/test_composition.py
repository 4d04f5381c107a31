"""Teaching a concept and a style apart so their atoms compose (digits/composition.py), the
unconditional share of training (cfg_dropout), and the demo's composed outputs."""

import json
import os

import pytest
import torch

import sparse_core as sc

from digits import attributes, composition
from digits.checkpoint import load_model
from digits.concept import ConceptSettings, flow_loss
from digits.data import images_of
from digits.demo import run
from digits.prompts import COMPOSED_PROMPT, CONCEPT_PROMPT, SPARE, STYLE_WORD, TRAINED_DIGITS, tokenize


@pytest.fixture(scope="module")
def model():
    return load_model()


def word_contexts(encoder, word):
    """The context rows ``word`` gets in positions 1 and 2 ``(2, C)``."""
    return torch.stack([encoder(tokenize(word))[0, 1], encoder(tokenize(f"faint {word}"))[0, 2]])


def contains(contexts, rows):
    """Whether any prompt in ``contexts (N, T, C)`` has one of ``rows (R, C)`` at some position."""
    return bool((contexts[:, :, None] - rows[None, None]).abs().amax(-1).lt(1e-6).any())


def test_concept_is_taught_after_each_known_attribute_and_preserves_the_other_words(model):
    dit, encoder, _ = model
    refs = images_of(3, 4, seed=1)
    images, prompts, (prior_images, prior_contexts) = composition.concept_data(dit, encoder, refs, seed=1)
    assert prompts[:4] == [CONCEPT_PROMPT] * 4 and len(images) == len(prompts) == 4 * (1 + len(attributes.TRAINED))
    for k, word in enumerate(attributes.TRAINED, start=1):
        assert prompts[4 * k:4 * (k + 1)] == [f"{word} {CONCEPT_PROMPT}"] * 4
        torch.testing.assert_close(images[4 * k:4 * (k + 1)], attributes.apply(refs, [word]))
    others = [w for w in SPARE if w != CONCEPT_PROMPT]
    per_word = 1 + len(TRAINED_DIGITS) + len(attributes.TRAINED)
    assert len(prior_images) == len(prior_contexts) == 16 * len(TRAINED_DIGITS) + 2 * per_word * len(others)
    assert not contains(prior_contexts, word_contexts(encoder, CONCEPT_PROMPT))
    for word in others:  # each other free word, in the first and in the second position
        rows = word_contexts(encoder, word)
        assert contains(prior_contexts, rows[:1]) and contains(prior_contexts, rows[1:])


def test_style_prior_leaves_out_the_style_word(model):
    dit, encoder, _ = model
    images, prompts, (_, prior_contexts) = composition.style_data(dit, encoder, count=12, seed=0)
    assert len(images) == 12 and all(p.startswith(f"{STYLE_WORD} ") for p in prompts)
    assert not contains(prior_contexts, word_contexts(encoder, STYLE_WORD))
    assert contains(prior_contexts, word_contexts(encoder, CONCEPT_PROMPT))


def test_cfg_dropout_trains_that_share_under_the_empty_prompt(model):
    dit, encoder, _ = model
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, context):
            seen.append(context)
            return torch.zeros_like(x)

    empty = encoder(tokenize("")[None])[0]
    images = images_of(3, 8)
    for share in (0.0, 0.5):
        seen.clear()
        settings = ConceptSettings(cfg_dropout=share, batch=256, seed=0)
        flow_loss(Recorder(), encoder, images, CONCEPT_PROMPT, settings, lambda: {})(0)
        dropped = float((seen[0] - empty).abs().amax((1, 2)).lt(1e-6).float().mean())
        assert abs(dropped - share) < 0.08, (share, dropped)
    for bad, error in ((1.0, ValueError), (-0.1, ValueError), (True, TypeError), ("0.1", TypeError)):
        with pytest.raises(error, match="cfg_dropout"):
            ConceptSettings(cfg_dropout=bad)


def test_demo_writes_the_composed_prompt_and_its_samples(tmp_path):
    """A short demo (60 training steps): its files, and its scores are what the evaluator says of
    the PNGs it saved (not the quality: 60 steps)."""
    report = run(str(tmp_path), settings=ConceptSettings(steps=60), per_prompt=32, quiet=True)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["composed_prompt"] == COMPOSED_PROMPT == report["composed_prompt"]
    assert saved["concept_prompt"] == CONCEPT_PROMPT
    for prompt in [COMPOSED_PROMPT, CONCEPT_PROMPT, *map(str, range(10))]:
        pngs = [f for f in os.listdir(tmp_path / "samples" / prompt) if f.endswith(".png")]
        assert len(pngs) >= 32, prompt
    for key in ("composition", "composed_digit_share", "composed_bold_share", "concept_bold_share"):
        assert 0.0 <= saved[key] <= 1.0
    # the report's scores are the evaluator's verdict on the very images saved as PNGs
    import numpy as np
    from PIL import Image

    from digits.evaluator import DigitEvaluator

    folder = tmp_path / "samples" / COMPOSED_PROMPT
    saved_images = torch.stack([
        torch.from_numpy(np.asarray(Image.open(folder / name), dtype=np.float32))[None] / 127.5 - 1
        for name in sorted(os.listdir(folder))])
    assert saved_images.shape[1:] == (1, 8, 8)
    evaluator = DigitEvaluator.fit()
    assert evaluator.share(saved_images, saved["concept_digit"]) == pytest.approx(
        saved["composed_digit_share"], abs=2 / len(saved_images))  # 8-bit rounding may flip one
    assert float(evaluator.is_bold(saved_images).float().mean()) == pytest.approx(
        saved["composed_bold_share"], abs=2 / len(saved_images))
    style = sc.load_atoms(str(tmp_path / f"{STYLE_WORD}_atoms.safetensors"))
    assert style.n_atoms == saved["style_atoms_kept"] > 0  # the style's kept atoms, loadable
