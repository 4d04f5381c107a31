"""The shipped digits model: loads, samples deterministically, and learns the held-out digit."""


import pytest
import torch

from digits.checkpoint import MODEL_PATH, load_model, read_metadata
from digits.concept import ConceptSettings, build_dictionary, sample_prompts, train_concept
from digits.attributes import lean
from digits.data import embolden, images_of, stroke_mass
from digits.evaluator import DigitEvaluator, reference_similarity
from digits.prompts import ATTRIBUTES, CONCEPT_PROMPT, HELD_OUT, STYLE_WORD, VOCAB, tokenize


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def evaluator():
    return DigitEvaluator.fit()


def test_shipped_file_is_small_and_documents_its_training():
    assert MODEL_PATH.stat().st_size < 5 * 2**20
    metadata = read_metadata()
    assert metadata["held_out"] == HELD_OUT
    assert metadata["training"]["seed"] == 0 and metadata["training"]["steps"] > 0
    final = metadata["training"]["final_accuracy"]  # digit accuracy per attribute prefix
    assert set(final) == {"plain", *ATTRIBUTES} and min(final.values()) >= 0.95
    assert metadata["training"]["held_out_style"] == STYLE_WORD
    assert metadata["vocab"] == VOCAB


def test_the_model_draws_each_attribute_it_was_trained_on(model, evaluator):
    """Attributes change the samples the way they change real images, and keep the digit."""
    dit, encoder, _ = model
    prompts = [f"{prefix} {digit}".strip() for prefix in ["", *ATTRIBUTES] for digit in "158"]
    samples = sample_prompts(dit, encoder, prompts, 16, seed=7)
    of = lambda prefix: torch.cat([samples[f"{prefix} {d}".strip()] for d in "158"])
    plain = of("")
    for prefix in ATTRIBUTES:
        assert evaluator.accuracy({d: samples[f"{prefix} {d}"] for d in "158"}) >= 0.8
    assert 0.35 < float(stroke_mass(of("faint")).mean() / stroke_mass(plain).mean()) < 0.7
    assert float(stroke_mass(of("small")).mean() / stroke_mass(plain).mean()) < 0.75
    assert float(lean(of("slant")).mean() - lean(plain).mean()) > 0.8
    assert float(evaluator.is_bold(plain).float().mean()) <= 0.1  # the held-out style is unknown


def test_evaluator_is_accurate_on_held_out_real_digits(evaluator):
    assert evaluator.held_out_accuracy >= 0.97


def test_sampling_is_deterministic_and_draws_the_prompted_digits(model, evaluator):
    dit, encoder, _ = model
    prompts = ["0", "5", "8"]
    first = sample_prompts(dit, encoder, prompts, 12, seed=3)
    second = sample_prompts(dit, encoder, prompts, 12, seed=3)
    for prompt in prompts:
        assert torch.equal(first[prompt], second[prompt])
        assert evaluator.share(first[prompt], int(prompt)) >= 0.9


def test_short_training_teaches_the_held_out_digit(model, evaluator):
    """Under a minute on CPU: fidelity goes from about zero to well above chance (10 %)."""
    dit, encoder, _ = model
    settings = ConceptSettings(steps=120, budget=24)
    before = sample_prompts(dit, encoder, [CONCEPT_PROMPT], 32, seed=5)[CONCEPT_PROMPT]
    atoms = build_dictionary(dit, settings)
    result = train_concept(dit, encoder, atoms, images_of(HELD_OUT, 8), CONCEPT_PROMPT, settings)
    assert result.stopped is None and atoms.n_active <= 24
    after = sample_prompts(dit, encoder, [CONCEPT_PROMPT], 32, atoms=atoms, seed=5)[CONCEPT_PROMPT]
    assert evaluator.share(before, HELD_OUT) <= 0.2
    assert evaluator.share(after, HELD_OUT) >= 0.6
    assert reference_similarity(after, images_of(HELD_OUT, 8)) > reference_similarity(before, images_of(HELD_OUT, 8))


def test_patching_restores_the_model_exactly(model):
    dit, encoder, _ = model
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    atoms = build_dictionary(dit, ConceptSettings())
    for layer in atoms.layers.values():
        layer.coefficients.normal_()
    sample_prompts(dit, encoder, ["1"], 2, atoms=atoms)
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


def test_bold_style_has_more_ink_and_prompts_are_checked():
    plain = images_of(5, 10)
    assert bool((stroke_mass(embolden(plain)) > stroke_mass(plain)).all())
    with pytest.raises(ValueError, match="not in the digits vocabulary"):
        tokenize("eleven")
    with pytest.raises(ValueError, match="at most 3"):
        tokenize("1 2 3 4")
