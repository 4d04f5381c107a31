"""Sparse Training Samples: images sampled every N steps while Train Sparse Concept runs, with the
model's own sampler, shown on the node and returned as an IMAGE batch."""

import numpy as np
import pytest
import torch

import nodes as comfy_nodes

import tiny_models
from host_support import node_module, run_node
from test_nodes import build, train


@pytest.fixture(scope="module")
def digits(node_classes):
    model = run_node(node_classes["SparseAtoms_LoadDigitsModel"])[0]
    prompt = lambda text: run_node(node_classes["SparseAtoms_DigitPrompt"], prompt=text)[0]
    latent, conds = run_node(node_classes["SparseAtoms_DigitExamples"], digits="3", per_digit=8,
                             seed=0, style="bold", prompt="sks")
    return model, prompt, latent, conds


def samples_node(node_classes, positive, latent, every, negative=None, cfg=1.0, **extra):
    inputs = dict(positive=positive, latent=latent, every=every, seed=7, steps=8, cfg=cfg,
                  sampler_name="euler", scheduler="normal", negative=negative, **extra)
    return run_node(node_classes["SparseAtoms_TrainingSamples"], **inputs)[0]


def train_digits(node_classes, digits, steps, **extra):
    model, _, latent, conds = digits
    atoms = build(node_classes, model, n_atoms=8, preset="cross-attention k/v")
    return run_node(node_classes["SparseAtoms_TrainConcept"], model=model, latents=latent,
                    conditioning=conds, atom_dict=atoms, steps=steps, learning_rate=3e-2,
                    batch_size=4, l1=0.0, atom_budget=0, tune_atoms=True, seed=0,
                    training_dtype="fp32", gradient_checkpointing=False, **extra)


def ksampler_images(node_classes, model, positive, negative, latent):
    """What a KSampler with the samples node's settings draws, as the same images."""
    explorer = node_module(node_classes, "explorer")
    with torch.inference_mode():
        drawn = comfy_nodes.common_ksampler(model, 7, 8, 2.5, "euler", "normal", positive,
                                            negative, latent)[0]["samples"]
    return explorer.to_rgb(model, drawn)


def test_samples_are_what_a_ksampler_draws_at_that_step(node_classes, digits):
    """Before training the samples are the base model's KSampler images for that seed; after the
    last step, the trained model's (the patched MODEL output); between, neither."""
    model, prompt, _, _ = digits
    latent = run_node(node_classes["SparseAtoms_EmptyDigitsLatent"], batch_size=4)[0]
    requests = samples_node(node_classes, prompt("sks"), latent, every=5, negative=prompt(""),
                            cfg=2.5)
    trained_model, _, _, images, = train_digits(node_classes, digits, 10, samples=requests)
    assert images.shape == (3 * 4, 8, 8, 3)  # steps 0, 5 and 10, four images each
    before = ksampler_images(node_classes, model, prompt("sks"), prompt(""), latent)
    after = ksampler_images(node_classes, trained_model, prompt("sks"), prompt(""), latent)
    assert torch.allclose(images[:4], before, atol=1e-5)
    assert torch.allclose(images[8:], after, atol=1e-5)  # exact here: the same weights
    assert (before - after).abs().max() > 0.1  # training changed what the prompt draws
    assert (images[4:8] - after).abs().max() > 1e-3 and (images[4:8] - before).abs().max() > 1e-3


def test_training_is_the_same_with_and_without_samples(node_classes):
    """Sampling draws no numbers from the training's streams and keeps no gradients: the atoms
    and the losses are bit for bit those of a run without it; without samples the output is an
    empty batch."""
    model = tiny_models.build("sd15")
    atoms = build(node_classes, model, preset="cross-attention k/v")
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    requests = samples_node(node_classes, tiny_models.conditioning("sd15", seed=3), latent, every=3)
    _, plain, _, none = train(node_classes, "sd15", model, atoms, steps=6)
    _, sampled, _, images = train(node_classes, "sd15", model, atoms, steps=6, samples=requests)
    assert none.shape[0] == 0 and images.shape[0] == 3 * 2 and images.shape[-1] == 3
    assert plain.info.training["losses"] == sampled.info.training["losses"]
    for key, layer in plain.layers.items():
        assert torch.equal(layer.coefficients, sampled.layers[key].coefficients)
        assert torch.equal(layer.atoms, sampled.layers[key].atoms)


def test_the_node_shows_the_latest_samples_under_the_loss_curve(node_classes, digits, monkeypatch):
    import comfy.utils

    _, prompt, _, _ = digits
    latent = run_node(node_classes["SparseAtoms_EmptyDigitsLatent"], batch_size=3)[0]
    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: calls.append((value, preview)))
    train_digits(node_classes, digits, 6, samples=samples_node(node_classes, prompt("sks"),
                                                               latent, every=3))
    shown = {value: preview[1] for value, preview in calls if preview}
    assert 3 in shown and 6 in shown  # each sampling is shown at once
    assert shown[6].size[0] == 480 and shown[6].size[1] > 240  # the curve, samples beneath


def test_bad_sample_inputs_are_refused_by_name(node_classes, digits):
    model, prompt, _, _ = digits
    latent = run_node(node_classes["SparseAtoms_EmptyDigitsLatent"], batch_size=2)[0]
    with pytest.raises(ValueError, match="Sparse Training Samples: cfg 3 guides away from the "
                                         "negative prompt: wire negative"):
        samples_node(node_classes, prompt("sks"), latent, every=2, cfg=3.0)
    with pytest.raises(ValueError, match="positive must be one prompt \\(got 2 entries\\)"):
        samples_node(node_classes, prompt("sks") + prompt("3"), latent, every=2)
    with pytest.raises(ValueError, match="latent contains NaN"):
        samples_node(node_classes, prompt("sks"), {"samples": torch.full((1, 1, 8, 8), float("nan"))},
                     every=2)
    first = samples_node(node_classes, prompt("sks"), latent, every=2)
    with pytest.raises(ValueError, match="chained nodes must all get the same vae"):
        samples_node(node_classes, prompt("3"), latent, every=2, previous=first, vae=object())
    wrong = samples_node(node_classes, prompt("3"), {"samples": torch.zeros(1, 1, 16, 16)}, every=2,
                         previous=first)
    with pytest.raises(ValueError, match=r"Sparse Training Samples #2: latent has shape \(1, 16, 16\) "
                                         r"per image, the training latents \(1, 8, 8\)"):
        train_digits(node_classes, digits, 2, samples=wrong)
    with pytest.raises(ValueError, match="samples must come from a Sparse Training Samples node"):
        train_digits(node_classes, digits, 2, samples=[latent])


def test_the_digits_latent_preview_draws_what_digits_to_image_draws(node_classes, digits):
    """ComfyUI's own latent previewer (what KSampler shows while it samples) with the digits
    model's factors: a black background and white ink, as Digits to Image draws the digit."""
    import latent_preview

    model, _, latent, _ = digits
    fmt = model.get_model_object("latent_format")
    preview = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)
    digit = latent["samples"][:1]
    grey = np.asarray(preview.decode_latent_to_preview(digit).convert("L"), dtype=np.float32)
    picture = torch.from_numpy(grey) / 255
    drawn = run_node(node_classes["SparseAtoms_DigitsToImage"], latent={"samples": digit}, scale=1)[0]
    assert float(picture.min()) == 0.0  # the background is black, not grey
    assert torch.allclose(picture, drawn[0, :, :, 0], atol=1 / 255 + 1e-6)
