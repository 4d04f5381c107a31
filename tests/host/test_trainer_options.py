"""Train Sparse Concept's training options on the real model-patcher: caption dropout to the empty
prompt (the share, which images, the default unchanged, bad wiring)."""

import pytest
import torch

import tiny_models
from host_support import node_module, run_node
from test_nodes import build, train


@pytest.fixture(scope="module")
def sd15(node_classes):
    model = tiny_models.build("sd15")
    return model, build(node_classes, model, preset="cross-attention k/v")


def recorded_prompts(node_classes, monkeypatch):
    """Every forward the trainer makes, as (context tensor's first value, images in the batch)."""
    training = node_module(node_classes, "training")
    calls, denoise = [], training._denoise

    def recording(model_wrap, cond, x_t, sigma, extra_args, autocast, copy_saved):
        calls.append((float(cond["model_conds"]["c_crossattn"].cond.flatten()[0]), len(x_t)))
        return denoise(model_wrap, cond, x_t, sigma, extra_args, autocast, copy_saved)

    monkeypatch.setattr(training, "_denoise", recording)
    return calls


def test_caption_dropout_trains_that_share_of_concept_images_under_the_empty_prompt(
        node_classes, sd15, monkeypatch):
    model, atoms = sd15
    concept, prior = tiny_models.conditioning("sd15", seed=1), tiny_models.conditioning("sd15", seed=2)
    empty = [[torch.full((1, 8, 64), 0.5), {}]]
    calls = recorded_prompts(node_classes, monkeypatch)
    steps, batch = 60, 4
    train(node_classes, "sd15", model, atoms, steps=steps, batch_size=batch, conditioning=concept,
          prior_latents=tiny_models.latents("sd15", seed=5), prior_conditioning=prior,
          caption_dropout=0.3, empty_conditioning=empty)
    value = {float(concept[0][0].flatten()[0]): "concept", float(prior[0][0].flatten()[0]): "prior",
             0.5: "empty"}
    images = {"concept": 0, "prior": 0, "empty": 0}
    for first, count in calls:
        images[value[first]] += count
    # only training steps drop prompts (the guard's checks run each image under its own), so the
    # empty prompt's share of the steps' concept images is the dropout: 240 draws at 0.3, sd 0.03
    share = images["empty"] / (steps * batch)
    assert 0.2 < share < 0.4, (share, images)


def test_without_dropout_the_run_is_the_same_as_before(node_classes, sd15):
    model, atoms = sd15
    default = train(node_classes, "sd15", model, atoms, steps=20)[1]
    explicit = train(node_classes, "sd15", model, atoms, steps=20, caption_dropout=0.0,
                     empty_conditioning=tiny_models.conditioning("sd15", seed=9))[1]
    assert default.info.training["losses"] == explicit.info.training["losses"]
    for key in default:
        assert torch.equal(default.delta(key), explicit.delta(key)), key


def test_dropout_without_the_empty_prompt_is_refused_by_name(node_classes, sd15):
    model, atoms = sd15
    with pytest.raises(ValueError, match=r"Train Sparse Concept: caption_dropout 0.3 trains images "
                                         r"under the empty prompt: wire its CONDITIONING .* to "
                                         r"empty_conditioning \(got none\)"):
        train(node_classes, "sd15", model, atoms, steps=2, caption_dropout=0.3)
    two = tiny_models.conditioning("sd15") * 2
    with pytest.raises(ValueError, match=r"\(got 2 entries\)"):
        train(node_classes, "sd15", model, atoms, steps=2, caption_dropout=0.3, empty_conditioning=two)


def test_join_training_data_gives_every_image_its_prompt(node_classes):
    join = node_classes["SparseAtoms_JoinTrainingData"]
    one, per_image = tiny_models.conditioning("sd15", seed=1), tiny_models.conditioning("sd15", seed=2) * 3
    first, second = tiny_models.latents("sd15", count=2), tiny_models.latents("sd15", count=3, seed=1)
    latent, conds = run_node(join, latents_1=first, conditioning_1=one,
                             latents_2=second, conditioning_2=per_image)
    assert torch.equal(latent["samples"], torch.cat([first["samples"], second["samples"]]))
    assert len(conds) == 5 and conds[0] is one[0] and conds[1] is one[0]
    assert [c is e for c, e in zip(conds[2:], per_image)] == [True] * 3
    with pytest.raises(ValueError, match=r"Join Training Data: conditioning_2 has 2 entries for 3 "
                                         r"images in latents_2: give one, or one per image"):
        run_node(join, latents_1=first, conditioning_1=one, latents_2=second,
                 conditioning_2=per_image[:2])
    with pytest.raises(ValueError, match=r"Join Training Data: latents_3 is connected but "
                                         r"conditioning_3 is not: give both"):
        run_node(join, latents_1=first, conditioning_1=one, latents_3=second)
    with pytest.raises(ValueError, match=r"Join Training Data: latents_2 has images of shape "
                                         r"\(16, 16, 16\), the first set \(4, 16, 16\): they must match"):
        run_node(join, latents_1=first, conditioning_1=one,
                 latents_2=tiny_models.latents("flux"), conditioning_2=one)
